"""Cost per denoising step of head perturbation guidance against CFG alone and diffusers' PAG.

The transformer has the real SD3-medium shape (hidden 1536 = 24 heads x 64, joint dim 4096, patch 2,
16 latent channels) with random weights and --layers of its 24 blocks; text encoders are tiny (their
cost is outside the denoising loop). Timing: one process, all configurations sharing one transformer,
interleaved call by call over --repeats rounds (min and median per step). Peak memory: each
configuration once more in its own subprocess (CUDA: max allocated; CPU: peak RSS).

    python benchmarks/bench_head_perturbation.py --layers 2 --size 512 --steps 2 --repeats 4
"""

from __future__ import annotations

import argparse
import json
import statistics

from measure import device_options, interleaved, peak_bytes, peak_in_own_process, step_seconds  # benchmarks/measure.py, beside this script

CONFIGS = {
    "cfg": "CFG alone (StableDiffusion3Pipeline)",
    "pag-diffusers": "CFG + diffusers StableDiffusion3PAGPipeline, layer 1 (all 24 heads)",
    "ours-layer-batched": "CFG + ours, all 24 heads of layer 1, image mode, batched",
    "ours-layer-sequential": "CFG + ours, all 24 heads of layer 1, image mode, sequential",
    "ours-heads-batched": "CFG + ours, 12 heads over all layers, joint mode, u=0.5, batched",
    "ours-heads-sequential": "CFG + ours, 12 heads over all layers, joint mode, u=0.5, sequential",
}


def build(config: str, layers: int, device: str, transformer=None, dtype: str = "float32"):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3PAGPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from attnsteer.pipelines import StableDiffusion3SteerPipeline
    from attnsteer.pipelines.tiny import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they are used (fast on a GPU)
        transformer = transformer or SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
        ).to(getattr(torch, dtype))
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=4, projection_dim=1024)
    components = dict(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=CLIPTextModelWithProjection(text), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(text), tokenizer_2=clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    if config == "pag-diffusers":
        pipe = StableDiffusion3PAGPipeline(**components, pag_applied_layers=[r"^transformer_blocks\.1\.attn$"])
    else:
        pipe = StableDiffusion3SteerPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, getattr(torch, dtype))


def steering_arguments(config: str, layers: int) -> dict:
    if config == "pag-diffusers":
        return {"pag_scale": 3.0}
    if config.startswith("ours-layer"):
        heads, extra = "transformer_blocks.1.attn:*", {"perturbation_mode": "image", "softpag_u": 1.0}
    elif config.startswith("ours-heads"):
        heads = " ".join(f"{i % layers}:{(5 * i) % 24}" for i in range(12))
        extra = {"perturbation_mode": "joint", "softpag_u": 0.5}
    else:
        return {}
    batching = "sequential" if config.endswith("sequential") else "batched"
    return {"perturbed_heads": heads, "perturbation_scale": 3.0, "perturbation_batching": batching, **extra}


def timed_call(pipe, config: str, layers: int, size: int, steps: int, device: str) -> list[float]:
    """Seconds of each denoising step after the first (warm-up) of one pipeline call."""
    import torch

    return step_seconds(lambda stamp: pipe(
        "a photo of a cat", height=size, width=size, num_inference_steps=steps + 1, guidance_scale=5.0,
        output_type="latent", callback_on_step_end=stamp, generator=torch.Generator(device).manual_seed(0),
        **steering_arguments(config, layers)), device)


def peak_memory(config: str, layers: int, size: int, device: str, dtype: str = "float32") -> int:
    """Peak bytes one call of ``config`` needs beyond the loaded model (run in a fresh process)."""
    pipe = build(config, layers, device, dtype=dtype)
    return peak_bytes(lambda: timed_call(pipe, config, layers, size, 1, device), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (SD3-medium has 24)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per call (one more runs as warm-up)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds of every configuration")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    device_options(parser)
    args = parser.parse_args()
    if args.layers < 2:
        parser.error(f"--layers {args.layers}: at least 2 (the perturbed layer is block 1)")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(peak_memory(args.one, args.layers, args.size, device, args.dtype)))
        return

    pipes = {}
    for config in args.configs:
        shared = next(iter(pipes.values())).transformer if pipes else None
        pipes[config] = build(config, args.layers, device, shared, args.dtype)
    results = interleaved(args.configs, lambda c: timed_call(pipes[c], c, args.layers, args.size, args.steps, device),
                          args.repeats)
    del pipes
    for config in args.configs:
        results[config]["peak_bytes"] = peak_in_own_process(__file__, config, device)

    base = results["cfg"]["step_s"] if "cfg" in results else None
    tokens = (args.size // 16) ** 2
    print(f"SD3-medium shape, {args.layers} of 24 blocks, {args.size}x{args.size} ({tokens} image + 333 text tokens), "
          f"device {device}, {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} rounds x {args.steps} timed steps per configuration\n")
    print("| configuration | s / step, min | s / step, median | x CFG alone (min) | x CFG alone (median) | peak memory beyond the model (MiB) |")
    print("|---|---|---|---|---|---|")
    for config, r in results.items():
        low, mid = min(r["step_s"]), statistics.median(r["step_s"])
        ratios = (f"{low / min(base):.2f} | {mid / statistics.median(base):.2f}") if base else "- | -"
        print(f"| {CONFIGS[config]} | {low:.3f} | {mid:.3f} | {ratios} | {r['peak_bytes'] / 2**20:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Cost per denoising step of head perturbation guidance against CFG alone and diffusers' PAG.

--model sd3: the real SD3-medium transformer shape (hidden 1536 = 24 heads x 64, joint dim 4096, patch 2,
16 latent channels) with --layers of its 24 blocks; text encoders are tiny (their cost is outside the
denoising loop). --model flux: FLUX.1's shape (hidden 3072 = 24 heads x 128, joint dim 4096, 64 latent
channels) with --layers double blocks and 2 x --layers single ones (FLUX.1 has 19 and 38), given prompt
embeddings of 512 text tokens and true CFG with a negative prompt (FLUX.1-dev's distilled guidance 3.5
besides); diffusers has no PAG for FLUX. Random weights. Every head of one attention layer is perturbed
(image mode, as diffusers' PAG) at an early, a middle and a late layer of the model's list (first,
middle, last), batched or sequential, with the shared prefix reused (the default) or run whole ("-whole":
before prefix reuse). Timing: one process, all configurations sharing one transformer, interleaved call
by call over --repeats rounds (min and median per step). Peak memory: each configuration once more in its
own subprocess (CUDA: max allocated; CPU: peak RSS).

    python benchmarks/bench_head_perturbation.py --layers 6 --size 256 --steps 2 --repeats 3
    python benchmarks/bench_head_perturbation.py --model flux --layers 19 --size 1024 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics

from measure import device_options, interleaved, peak_bytes, peak_in_own_process, step_seconds  # benchmarks/measure.py, beside this script

POSITIONS = ("early", "middle", "late")
CONFIGS = {
    "cfg": "CFG alone (the parent pipeline)",
    "pag-diffusers": "CFG + diffusers StableDiffusion3PAGPipeline, middle layer (all 24 heads)",
    **{f"ours-{where}-{batching}{whole}": f"CFG + ours, all 24 heads of the {where} layer, {batching}"
                                          f"{', whole (no prefix reuse)' if whole else ''}"
       for where in POSITIONS for batching in ("batched", "sequential") for whole in ("", "-whole")},
    "ours-heads-batched": "CFG + ours, 12 heads over all layers, joint mode, u=0.5, batched",
    "ours-heads-sequential": "CFG + ours, 12 heads over all layers, joint mode, u=0.5, sequential",
}
TEXT_TOKENS = {"sd3": 333, "flux": 512}  # SD3: 77 CLIP + 256 T5 (zeros without T5); FLUX.1-dev: 512 T5


def layer_names(model: str, layers: int) -> list[str]:
    """The perturbable attention layers of the benchmark's transformer, in its order."""
    if model == "sd3":
        return [f"transformer_blocks.{i}.attn" for i in range(layers)]
    return ([f"transformer_blocks.{i}.attn" for i in range(layers)]
            + [f"single_transformer_blocks.{i}.attn" for i in range(2 * layers)])


def layer(where: str, model: str, layers: int) -> str:
    names = layer_names(model, layers)
    return names[{"early": 0, "middle": len(names) // 2, "late": -1}[where]]


def transformer_of(model: str, layers: int, tiny: bool):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if model == "sd3":
        head_dim, joint, pooled = (4, 64, 64) if tiny else (64, 4096, 2048)
        return SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=head_dim,
            num_attention_heads=24, joint_attention_dim=joint, caption_projection_dim=24 * head_dim,
            pooled_projection_dim=pooled, out_channels=16, pos_embed_max_size=192)
    head_dim, joint, pooled, rope = (8, 32, 32, (2, 2, 4)) if tiny else (128, 4096, 768, (16, 56, 56))
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=layers, num_single_layers=2 * layers, attention_head_dim=head_dim,
        num_attention_heads=24, joint_attention_dim=joint, pooled_projection_dim=pooled, guidance_embeds=True,
        axes_dims_rope=rope)


def build(config: str, model: str, layers: int, device: str, transformer=None, dtype: str = "float32",
          tiny: bool = False):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3PAGPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from attnsteer.pipelines import FluxSteerPipeline, StableDiffusion3SteerPipeline
    from attnsteer.pipelines.tiny import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they are used (fast on a GPU)
        transformer = transformer or transformer_of(model, layers, tiny).to(getattr(torch, dtype))
    if model == "flux":  # the call gives prompt embeddings: no text encoders
        pipe = FluxSteerPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                 vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    else:
        text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                              num_attention_heads=4, projection_dim=transformer.config.pooled_projection_dim // 2)
        components = dict(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
            text_encoder=CLIPTextModelWithProjection(text), tokenizer=clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(text), tokenizer_2=clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None,
        )
        if config == "pag-diffusers":
            middle = layer("middle", model, layers).replace(".", r"\.")
            pipe = StableDiffusion3PAGPipeline(**components, pag_applied_layers=[rf"^{middle}$"])
        else:
            pipe = StableDiffusion3SteerPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, getattr(torch, dtype))


def steering_arguments(config: str, model: str, layers: int) -> dict:
    if config == "pag-diffusers":
        return {"pag_scale": 3.0}
    if config == "cfg":
        return {}
    _, where, batching, *whole = config.split("-")
    if where == "heads":
        count = len(layer_names(model, layers))
        heads = " ".join(f"{i % count}:{(5 * i) % 24}" for i in range(12))
        extra = {"perturbation_mode": "joint", "softpag_u": 0.5}
    else:
        heads = f"{layer(where, model, layers)}:*"
        extra = {"perturbation_mode": "image", "softpag_u": 1.0, "perturbation_prefix_reuse": not whole}
    return {"perturbed_heads": heads, "perturbation_scale": 3.0, "perturbation_batching": batching, **extra}


def timed_call(pipe, config: str, model: str, layers: int, size: int, steps: int, device: str) -> list[float]:
    """Seconds of each denoising step after the first (warm-up) of one pipeline call."""
    import torch

    common = dict(height=size, width=size, num_inference_steps=steps + 1, output_type="latent",
                  generator=torch.Generator(device).manual_seed(0), **steering_arguments(config, model, layers))
    if model == "flux":
        c, g = pipe.transformer.config, torch.Generator(device).manual_seed(1)
        embeds = lambda *shape: torch.randn(*shape, generator=g, device=device).to(pipe.transformer.dtype)
        common.update(prompt_embeds=embeds(1, TEXT_TOKENS["flux"], c.joint_attention_dim),
                      pooled_prompt_embeds=embeds(1, c.pooled_projection_dim),
                      negative_prompt_embeds=embeds(1, TEXT_TOKENS["flux"], c.joint_attention_dim),
                      negative_pooled_prompt_embeds=embeds(1, c.pooled_projection_dim), true_cfg_scale=5.0,
                      guidance_scale=3.5)
    else:
        common.update(prompt="a photo of a cat", guidance_scale=5.0)
    return step_seconds(lambda stamp: pipe(**common, callback_on_step_end=stamp), device)


def peak_memory(config: str, args, device: str) -> int:
    """Peak bytes one call of ``config`` needs beyond the loaded model (run in a fresh process)."""
    pipe = build(config, args.model, args.layers, device, dtype=args.dtype, tiny=args.tiny)
    return peak_bytes(lambda: timed_call(pipe, config, args.model, args.layers, args.size, 1, device), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd3", choices=["sd3", "flux"], help="transformer shape")
    parser.add_argument("--layers", type=int, default=6,
                        help="blocks (SD3-medium has 24; FLUX.1 19 double blocks, and twice as many single ones)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per call (one more runs as warm-up)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds of every configuration")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    device_options(parser)
    args = parser.parse_args()
    if args.layers < 3:
        parser.error(f"--layers {args.layers}: at least 3 (an early, a middle and a late block)")
    if args.model == "flux" and "pag-diffusers" in args.configs:
        parser.error("--configs pag-diffusers: diffusers has no PAG pipeline for FLUX")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(peak_memory(args.one, args, device)))
        return

    pipes = {}
    for config in args.configs:
        shared = next(iter(pipes.values())).transformer if pipes else None
        pipes[config] = build(config, args.model, args.layers, device, shared, args.dtype, args.tiny)
    results = interleaved(args.configs, lambda c: timed_call(pipes[c], c, args.model, args.layers, args.size,
                                                             args.steps, device), args.repeats)
    del pipes
    for config in args.configs:
        results[config]["peak_bytes"] = peak_in_own_process(__file__, config, device)

    base = results["cfg"]["step_s"] if "cfg" in results else None
    tokens = (args.size // 16) ** 2
    shape = (f"SD3-medium shape, {args.layers} of 24 blocks" if args.model == "sd3" else
             f"FLUX.1 shape, {args.layers} of 19 double and {2 * args.layers} of 38 single blocks")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"{shape}{' (--tiny widths)' if args.tiny else ''}, {args.size}x{args.size} ({tokens} image + "
          f"{TEXT_TOKENS[args.model]} text tokens), {name}, {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} rounds x {args.steps} timed steps per configuration\n")
    print("| configuration | s / step, min | s / step, median | x CFG alone (min) | x CFG alone (median) | peak memory beyond the model (MiB) |")
    print("|---|---|---|---|---|---|")
    for config, r in results.items():
        low, mid = min(r["step_s"]), statistics.median(r["step_s"])
        ratios = (f"{low / min(base):.2f} | {mid / statistics.median(base):.2f}") if base else "- | -"
        print(f"| {CONFIGS[config]} | {low:.3f} | {mid:.3f} | {ratios} | {r['peak_bytes'] / 2**20:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Cost of one guided denoising step: A-STAR against Attend-and-Excite and a plain CFG step.

The UNet has the real SD1.5 shape (or SDXL's) with random weights; text encoders are one-layer
stand-ins of the real widths (their cost is outside the loop); latents only, no VAE decode. Every
step is guided: A-STAR with one gradient step per step; Attend-and-Excite (diffusers'
StableDiffusionAttendAndExcitePipeline, SD1.x only) with max_iter_to_alter past the last step and
no thresholds, so it too takes exactly one gradient step per step and no refinement loop.
Timing: one process, the configurations sharing one UNet, interleaved call by call over --repeats
rounds (the first step of each call is a warm-up and not timed). Peak memory: each configuration
once more in its own process (CUDA: max allocated; CPU: peak RSS) minus what the loaded model holds.

    python benchmarks/bench_astar.py --model sd15 --size 512 --steps 10 --repeats 3 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import statistics

from measure import device_options, interleaved, peak_bytes, peak_in_own_process, step_seconds  # benchmarks/measure.py, beside this script

PROMPT, WORDS, INDICES = "a cat and a dog", ["cat", "dog"], [2, 5]  # CLIP tokens: <bos> a cat and a dog <eos>
CONFIGS = {
    "cfg": "plain CFG step (parent pipeline)",
    "astar": "A-STAR (ours): CFG step + one gradient step",
    "astar-ckpt": "A-STAR (ours) with astar_checkpointing=True",
    "ae": "Attend-and-Excite (diffusers): CFG step + one gradient step",
}


def unet_config(model: str, tiny: bool = False) -> dict:
    if tiny:  # the same block types at 32-64 channels
        shape = unet_config(model)
        width = dict(block_out_channels=(32, 64, 64, 64)[: len(shape["block_out_channels"])], attention_head_dim=2)
        if model == "sdxl":
            width.update(transformer_layers_per_block=(1, 1, 1), addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=6 * 8 + 1280)
        return {**shape, **width}
    if model == "sd15":
        return dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    cross_attention_dim=768, attention_head_dim=8)
    return dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


def build(config: str, model: str, device: str, dtype: str, unet=None, tiny: bool = False):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionAttendAndExcitePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from attnsteer.pipelines import StableDiffusionSteerPipeline, StableDiffusionXLSteerPipeline
    from attnsteer.pipelines.tiny import clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = unet or UNet2DConditionModel(**unet_config(model, tiny)).to(getattr(torch, dtype))
        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=8)

        def text(width, projection=False):
            config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, projection_dim=width)
            return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        if model == "sdxl":
            pipe = StableDiffusionXLSteerPipeline(vae=vae, text_encoder=text(768), text_encoder_2=text(1280, True),
                                                  tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                                  scheduler=scheduler)
        else:
            cls = StableDiffusionAttendAndExcitePipeline if config == "ae" else StableDiffusionSteerPipeline
            pipe = cls(vae=vae, text_encoder=text(768), tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, getattr(torch, dtype))


def timed_call(pipe, config: str, size: int, steps: int, device: str, batch: int = 1) -> list[float]:
    """Seconds of each denoising step after the first (warm-up) of one pipeline call."""
    import torch

    common = dict(height=size, width=size, num_inference_steps=steps + 1, guidance_scale=7.5, output_type="latent",
                  num_images_per_prompt=batch,
                  generator=torch.Generator(device).manual_seed(0))
    if config == "ae":
        return step_seconds(lambda stamp: pipe(PROMPT, token_indices=INDICES, max_iter_to_alter=steps + 2, thresholds={},
                                               attn_res=(size // 32,) * 2, callback=stamp, **common), device)
    extra = {"astar_tokens": WORDS, "astar_checkpointing": config == "astar-ckpt"} if config.startswith("astar") else {}
    return step_seconds(lambda stamp: pipe(PROMPT, callback_on_step_end=stamp, **common, **extra), device)


def peak_memory(config: str, args) -> int:
    """Peak bytes one call of ``config`` needs beyond the loaded model (run in a fresh process)."""
    pipe = build(config, args.model, args.device, args.dtype, tiny=args.tiny)
    return peak_bytes(lambda: timed_call(pipe, config, args.size, 1, args.device, args.batch), args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl"], help="UNet shape")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (num_images_per_prompt)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per call (one more runs as warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every configuration")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    device_options(parser)
    args = parser.parse_args()
    if args.size % 32 or args.size < 64:
        parser.error(f"--size {args.size}: a multiple of 32, at least 64 (maps at size / 32)")
    if args.steps < 1 or args.repeats < 1 or args.batch < 1:
        parser.error(f"--steps {args.steps}, --repeats {args.repeats} and --batch {args.batch} must be at least 1")
    configs = args.configs or [c for c in CONFIGS if not (c == "ae" and args.model == "sdxl")]
    if "ae" in configs and args.model == "sdxl":
        parser.error("--configs ae: Attend-and-Excite is SD1.x only in diffusers")

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(peak_memory(args.one, args)))
        return
    pipes = {}
    for config in configs:
        shared = next(iter(pipes.values())).unet if pipes else None
        pipes[config] = build(config, args.model, args.device, args.dtype, shared, args.tiny)
    results = interleaved(configs, lambda c: timed_call(pipes[c], c, args.size, args.steps, args.device, args.batch),
                          args.repeats)
    del pipes
    for config in configs:
        results[config]["peak_bytes"] = peak_in_own_process(__file__, config, args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} UNet shape, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, {name}, "
          f"{args.repeats} rounds x {args.steps} timed steps per configuration\n")
    print("| configuration | s / step, min | s / step, median | x CFG (median) | peak memory beyond the model (MiB) |")
    print("|---|---|---|---|---|")
    base = statistics.median(results["cfg"]["step_s"]) if "cfg" in results else None
    for config, r in results.items():
        low, mid = min(r["step_s"]), statistics.median(r["step_s"])
        ratio = f"{mid / base:.2f}" if base else "-"
        print(f"| {CONFIGS[config]} | {low:.4f} | {mid:.4f} | {ratio} | {r['peak_bytes'] / 2**20:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

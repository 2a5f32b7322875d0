"""Cost of head perturbation per denoising step on the newer families, against the step without it.

Each family's transformer has its real width (heads, head size, text width, latent channels) with random
weights and --layers of its blocks; one step is the denoiser calls its pipeline makes: Chroma, FLUX.2 Klein,
Qwen-Image and HunyuanVideo 1.5 (its guider) a conditional and an unconditional call of one row each, CogVideoX
and LTX-Video one batched call of [uncond, cond], Z-Image one of [cond, uncond] (its per-row lists). "heads" perturbs every head of the middle attention layer (image mode, w = 3,
batched, prefix reuse) through the guidance the pipelines attach. Inputs: --size px images (latent / 8, the
families' 2x2 packing) or --frames latent frames of video, --text tokens. Timing: configurations interleaved
step by step over --repeats rounds, after a warm-up step each; the median step and its ratio.

    python benchmarks/bench_families.py --layers 4 --size 512 --frames 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from measure import device_options  # benchmarks/measure.py, beside this script

FAMILIES = ("chroma", "flux2", "qwenimage", "zimage", "cogvideox", "ltx", "hunyuanvideo15")
BATCHED = ("cogvideox", "ltx", "zimage")  # one batched CFG call a step


def transformer(family: str, layers: int, tiny: bool):
    """The family's transformer at its real width (``tiny``: 2 heads of 16), ``layers`` blocks."""
    import diffusers

    if family == "chroma":
        return diffusers.ChromaTransformer2DModel(
            num_layers=layers, num_single_layers=2 * layers, **({} if not tiny else dict(
                num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                approximator_hidden_dim=32)))
    if family == "flux2":  # FLUX.2 [dev]'s width, without its distilled guidance (as Klein base)
        return diffusers.Flux2Transformer2DModel(
            num_layers=layers, num_single_layers=2 * layers, guidance_embeds=False, **({} if not tiny else dict(
                num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32, axes_dims_rope=(4, 4, 4, 4),
                timestep_guidance_channels=32)))
    if family == "qwenimage":
        return diffusers.QwenImageTransformer2DModel(
            num_layers=layers, **({} if not tiny else dict(
                num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))))
    if family == "zimage":  # Z-Image: 30 x 128, 2 refiner blocks for the image and the caption each
        return diffusers.ZImageTransformer2DModel(
            n_layers=layers, **({} if not tiny else dict(dim=32, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                                         axes_dims=[4, 6, 6])))
    if family == "cogvideox":  # CogVideoX-5b
        return diffusers.CogVideoXTransformer3DModel(
            num_layers=layers, use_rotary_positional_embeddings=True, **(
                dict(num_attention_heads=48, attention_head_dim=64) if not tiny else dict(
                    num_attention_heads=2, attention_head_dim=16, text_embed_dim=32, time_embed_dim=8)))
    if family == "hunyuanvideo15":  # HunyuanVideo 1.5 (text-to-video): 16 x 128
        return diffusers.HunyuanVideo15Transformer3DModel(
            num_layers=layers, task_type="t2v", **({} if not tiny else dict(
                num_attention_heads=2, attention_head_dim=16, text_embed_dim=32, text_embed_2_dim=32,
                image_embed_dim=16, rope_axes_dim=(4, 6, 6))))
    return diffusers.LTXVideoTransformer3DModel(
        num_layers=layers, **({} if not tiny else dict(num_attention_heads=2, attention_head_dim=8,
                                                       cross_attention_dim=16, caption_channels=32)))


def inputs(family: str, model, rows: int, size: int, frames: int, text: int, device, dtype) -> dict:
    """One denoiser call's keyword arguments for ``rows`` rows, as the family's pipeline makes them."""
    import torch

    c, g = model.config, torch.Generator(device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)
    latent = size // 8
    if family in ("chroma", "flux2", "qwenimage"):
        h = w = latent // 2
        ids = torch.stack(torch.meshgrid(*[torch.zeros(1), torch.arange(float(h)), torch.arange(float(w))]
                                         + [torch.zeros(1)] * (family == "flux2"), indexing="ij"), -1)
        call = dict(hidden_states=randn(rows, h * w, c.in_channels), encoder_hidden_states=randn(rows, text, c.joint_attention_dim),
                    timestep=torch.full((rows,), 0.5, device=device))
        if family == "qwenimage":
            return {**call, "encoder_hidden_states_mask": torch.ones(rows, text, device=device),
                    "img_shapes": [[(1, h, w)]] * rows}
        ids = ids.reshape(h * w, -1).to(device)
        return {**call, "img_ids": ids, "txt_ids": torch.zeros(text, ids.shape[1], device=device)}
    if family == "zimage":  # lists: one latent [C, 1, H, W] and one caption [L, D] a row
        return dict(x=[randn(c.in_channels, 1, latent, latent) for _ in range(rows)],
                    t=torch.full((rows,), 0.5, device=device), cap_feats=[randn(text, c.cap_feat_dim) for _ in range(rows)])
    if family == "hunyuanvideo15":  # VAE 16x; the glyph text 16 tokens, the 729 image tokens zero and masked out
        latent = size // 16
        return dict(hidden_states=randn(rows, c.in_channels, frames, latent, latent),
                    timestep=torch.full((rows,), 500.0, device=device),
                    encoder_hidden_states=randn(rows, text, c.text_embed_dim),
                    encoder_attention_mask=torch.ones(rows, text, device=device),
                    encoder_hidden_states_2=randn(rows, 16, c.text_embed_2_dim),
                    encoder_attention_mask_2=torch.ones(rows, 16, device=device),
                    image_embeds=torch.zeros(rows, 729, c.image_embed_dim, device=device, dtype=dtype))
    if family == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        p = c.patch_size
        grid = (latent // p, latent // p)
        rope = get_3d_rotary_pos_embed(c.attention_head_dim, ((0, 0), grid), grid, frames, device=device)
        return dict(hidden_states=randn(rows, frames, c.in_channels, latent, latent),
                    encoder_hidden_states=randn(rows, text, c.text_embed_dim),
                    timestep=torch.full((rows,), 500, device=device), image_rotary_emb=rope)
    latent = size // 32  # LTX's VAE: 32x spatial
    return dict(hidden_states=randn(rows, frames * latent * latent, c.in_channels),
                encoder_hidden_states=randn(rows, text, c.caption_channels),
                timestep=torch.full((rows,), 500.0, device=device),
                encoder_attention_mask=torch.ones(rows, text, device=device), num_frames=frames, height=latent,
                width=latent)


def step(family: str, model, guided: bool, call_one: dict, call_two: dict, sync) -> float:
    """Seconds of one step's denoiser calls; with ``guided`` the middle layer's heads are perturbed."""
    from contextlib import ExitStack

    import torch

    from attnsteer.attention_processors import list_layers
    from attnsteer.guidance import BranchInfo, HeadPerturbationGuidance

    layers = [n for n, info in list_layers(model).items() if info.kind != "cross"]
    middle = layers[len(layers) // 2]
    batched = family in BATCHED
    with ExitStack() as stack, torch.no_grad():
        if guided:
            guidance = HeadPerturbationGuidance({middle: tuple(range(list_layers(model)[middle].heads))}, 3.0, 1.0, "image")
            info = BranchInfo(batched, 4.0, 1000, cond_first=family == "zimage")
            stack.enter_context(guidance.attached(model, lambda m: info))
        sync()
        t = time.perf_counter()
        if family == "zimage":  # its pipeline names no calls
            model(**call_two)
        elif batched:
            with model.cache_context("cond_uncond"):
                model(**call_two)
        else:
            for name in ("cond", "uncond"):
                with model.cache_context(name):
                    model(**call_one)
        sync()
        return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--layers", type=int, default=4, help="blocks of each (double and twice as many single ones)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--frames", type=int, default=3, help="latent frames of the video families")
    p.add_argument("--text", type=int, default=128, help="text tokens")
    p.add_argument("--repeats", type=int, default=3)
    device_options(p)
    args = p.parse_args()
    if args.layers < 2 or args.repeats < 1 or args.frames < 1 or args.size % 64:
        p.error("--layers at least 2, --repeats and --frames at least 1, --size a multiple of 64")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    results = {}
    for family in args.families:
        torch.manual_seed(0)
        with torch.device(device):
            model = transformer(family, args.layers, args.tiny).to(dtype).eval()
        one = inputs(family, model, 1, args.size, args.frames, args.text, device, dtype)
        two = inputs(family, model, 2, args.size, args.frames, args.text, device, dtype)
        times = {"cfg": [], "heads": []}
        for config in times:  # warm-up
            step(family, model, config == "heads", one, two, sync)
        for repeat in range(args.repeats):
            for config in times:
                times[config].append(step(family, model, config == "heads", one, two, sync))
                print(f"{family} round {repeat} {config}: {times[config][-1]:.3f} s", file=sys.stderr)
        cfg, heads = statistics.median(times["cfg"]), statistics.median(times["heads"])
        results[family] = {"cfg_s": times["cfg"], "heads_s": times["heads"], "ratio": heads / cfg,
                           "width": getattr(model.config, "dim", None) or model.config.num_attention_heads * model.config.attention_head_dim}
        del model
    print(f"{name}, {args.dtype}, {args.layers} blocks each, {args.size} px / {args.frames} latent frames, "
          f"{args.text} text tokens{' (--tiny widths)' if args.tiny else ''}, {args.repeats} rounds\n")
    print("| family | width | CFG step s (median) | + head perturbation s (median) | x CFG |\n|---|---|---|---|---|")
    for family, r in results.items():
        print(f"| {family} | {r['width']} | {statistics.median(r['cfg_s']):.3f} | {statistics.median(r['heads_s']):.3f} "
              f"| {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Block-sparse attention end to end: one forward of Wan2.1-1.3B's transformer (random weights), dense
against DraftAttention, on the token grid of 480 x 832 (30 x 52 tokens a frame).

The transformer has Wan2.1-1.3B's width (1536, 12 heads of 128, FFN 8960, text 4096) and ``--layers``
of its blocks (all 30 by default; fewer where a forward of all of them takes too long, e.g. on a CPU).
The sparse steer leaves block 0 dense (the pipelines' default) and runs every other block at
``--sparsity`` from the first step. Configurations alternate forward by forward; the first forward of
each (flex's compile) is reported apart. Each block is timed on its own (hooks around it), so the
30-block forward is composed from the measured parts when fewer blocks ran, as the blocks are
identical: the parts outside the blocks + block 0 + 29 x a later block (the median of blocks 1..).
Besides the forward ratio, the table gives the ratio of a whole run of ``--steps`` steps whose first
30% are dense (the pipelines' default warm-up): steps x dense / (warm-up x dense + rest x sparse).

    python benchmarks/bench_sparse_model.py --frames 11 --threads 2               # 17160 tokens
    python benchmarks/bench_sparse_model.py --frames 11 --layers 3 --threads 2    # on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

from measure import device_options

GRID = (60, 104)  # latent height and width of 480 x 832 (VAE 8x); patch (1, 2, 2) -> 30 x 52 tokens
TINY_GRID = (32, 32)  # --tiny: 16 x 16 tokens a frame, 2 heads of 16, text width 32
WARMUP = 0.3


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=11, help="latent frames (5: 7800 tokens, 11: 17160, 21: 32760)")
    p.add_argument("--layers", type=int, default=30, help="transformer blocks (Wan2.1-1.3B has 30)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    p.add_argument("--backend", default="auto", choices=["auto", "flex", "gather"])
    p.add_argument("--pool", type=int, nargs=2, default=None,
                   help="tokens per block (default: the pipelines' default for the frame, (10, 13); flex on CUDA "
                        "needs a multiple of 128 tokens, e.g. 16 8)")
    p.add_argument("--steps", type=int, default=50, help="steps of the whole run the warm-up ratio is given for")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per configuration")
    device_options(p)
    args = p.parse_args()
    if args.frames < 1 or args.layers < 2 or args.repeats < 1 or args.steps < 1:
        p.error("--frames, --repeats and --steps must be at least 1, --layers at least 2 (block 0 stays dense)")
    if any(not 0 <= s < 1 for s in args.sparsity):
        p.error(f"--sparsity {args.sparsity}: each must be in [0, 1)")
    return args


def main() -> None:
    args = parse_args()
    import torch
    from diffusers import WanTransformer3DModel

    from attnsteer.attention_processors import SELF, list_layers, steering
    from attnsteer.attention_processors.sparse import DraftAttention, resolve_backend, tiling_pool

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    heads, head_dim, text_dim, ffn, grid = (2, 16, 32, 64, TINY_GRID) if args.tiny else (12, 128, 4096, 8960, GRID)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=args.layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6).to(device, dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 16, args.frames, *grid, generator=g, device=device, dtype=dtype)
    text = torch.randn(1, 512, text_dim, generator=g, device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)
    tokens = args.frames * (grid[0] // 2) * (grid[1] // 2)
    pool = tuple(args.pool or tiling_pool((grid[0] // 2, grid[1] // 2)))
    backend = resolve_backend(args.backend, torch.device(device), pool)
    sparse_layers = [n for n, info in list_layers(model).items() if info.kind == SELF][1:]
    steers = {"dense": []}
    steers.update({f"draft {s:g}": [DraftAttention(sparse_layers, s, pool, 0, backend)] for s in args.sparsity})

    stamps = []

    def stamp(*_):
        sync()
        stamps.append(time.perf_counter())

    for block in model.blocks:
        block.register_forward_pre_hook(stamp)
        block.register_forward_hook(stamp)

    def forward(name: str) -> tuple[float, list[float]]:
        """(seconds of the forward, seconds of each block)."""
        stamps.clear()
        with torch.no_grad(), steering(model, steers[name]):
            sync()
            t = time.perf_counter()
            model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)
            sync()
            total = time.perf_counter() - t
        return total, [b - a for a, b in zip(stamps[::2], stamps[1::2])]

    results = {name: {"first_s": forward(name)[0], "seconds": [], "blocks_s": []} for name in steers}
    for repeat in range(args.repeats):
        for name in steers:
            total, blocks = forward(name)
            results[name]["seconds"].append(total)
            results[name]["blocks_s"].append(blocks)
            print(f"round {repeat} {name}: {total:.2f} s", file=sys.stderr)
    for entry in results.values():
        entry["median_s"] = statistics.median(entry["seconds"])
        entry["block0_s"] = statistics.median(b[0] for b in entry["blocks_s"])
        entry["block_s"] = statistics.median(t for b in entry["blocks_s"] for t in b[1:])
        entry["outside_s"] = statistics.median(s - sum(b) for s, b in zip(entry["seconds"], entry["blocks_s"]))
        entry["composed_30_s"] = entry["outside_s"] + entry["block0_s"] + 29 * entry["block_s"]
    dense = results["dense"]
    warm = math.ceil(WARMUP * args.steps)
    print(f"device {device}, {torch.get_num_threads()} threads, {args.dtype}; {tokens} tokens ({args.frames} latent "
          f"frames of {grid[0] // 2} x {grid[1] // 2}), {args.layers} blocks, pool {pool}, backend {backend}")
    print(f"| configuration | s / forward of {args.layers} blocks | a later block s | outside the blocks s | 30-block "
          f"forward s (composed) | vs dense | {args.steps} steps, first {warm} dense, vs dense | first forward s |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        entry["speedup"] = dense["composed_30_s"] / entry["composed_30_s"]
        entry["run_speedup"] = args.steps * dense["composed_30_s"] / (
            warm * dense["composed_30_s"] + (args.steps - warm) * entry["composed_30_s"])
        print(f"| {name} | {entry['median_s']:.2f} | {entry['block_s']:.2f} | {entry['outside_s']:.2f} | "
              f"{entry['composed_30_s']:.1f} | {entry['speedup']:.2f}x | {entry['run_speedup']:.2f}x | "
              f"{entry['first_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "tokens": tokens, "pool": pool, "backend": backend,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

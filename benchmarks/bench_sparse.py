"""Block-sparse attention alone against dense SDPA, on Wan2.1-1.3B's head shape and token layouts.

One attention call [1, 12 heads, L, 128] on the token grid Wan2.1 gives at 480 x 832 (30 x 52 tokens a
frame) with 5, 11 or 21 latent frames (17, 41, 81 video frames: 7800, 17160, 32760 tokens), random
q, k, v. Each configuration is timed whole: for the draft map the pooling, the draft, the threshold and
the permutation are included. The compiled flex backend is timed after its compile (the first call,
reported apart as compile_s). Rounds interleave the configurations, so that a slow spell of the
machine hits them all; the table gives each configuration's median seconds and its ratio to dense.

    python benchmarks/bench_sparse.py --threads 1 --json sparse-1t.json
    python benchmarks/bench_sparse.py --threads 2 --json sparse-2t.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from measure import device_options

FRAMES = {"8k": 5, "16k": 11, "32k": 21}
GRID = (30, 52)  # tokens per frame of Wan2.1 at 480 x 832 (VAE 8x, patch 2)
HEADS, HEAD_DIM = 12, 128
TINY_GRID, TINY_HEADS, TINY_HEAD_DIM = (16, 16), 2, 16  # --tiny


def configs(args) -> list[tuple[str, str, str, float | None]]:
    """(name, mask, backend, sparsity): dense SDPA, then each backend x sparsity, then the static masks."""
    out = [("dense sdpa", "dense", "sdpa", None)]
    for backend in args.backends:
        out += [(f"draft {backend} {s:g}", "draft", backend, s) for s in args.sparsity]
        out += [(f"radial {backend}", "radial", backend, None), (f"tile {backend}", "tile", backend, None)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(FRAMES), choices=list(FRAMES))
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--backends", nargs="+", default=["flex", "gather"], choices=["flex", "gather"])
    parser.add_argument("--pool", type=int, nargs=2, default=None,
                        help="tokens per block (default: the pipelines' default for the frame, (10, 13))")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    device_options(parser)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from attnsteer.attention_processors import TokenLayout
    from attnsteer.attention_processors.sparse import (DraftMask, RadialMask, TileMask, block_layout, block_mask,
                                                       density, sparse_attention, tiling_pool, to_slots)

    frame, heads, head_dim = (TINY_GRID, TINY_HEADS, TINY_HEAD_DIM) if args.tiny else (GRID, HEADS, HEAD_DIM)
    args.pool = tuple(args.pool or tiling_pool(frame))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sources = {"draft": DraftMask, "radial": lambda _: RadialMask(), "tile": lambda _: TileMask()}
    results = {}
    for size in args.sizes:
        grid = (FRAMES[size], *frame)
        n = grid[0] * grid[1] * grid[2]
        layout = TokenLayout(slice(0, n), None, grid)
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
        scale = head_dim ** -0.5
        blocks = block_layout(layout, n, tuple(args.pool)).on(device)

        def run(mask, backend, sparsity):
            if mask == "dense":
                return F.scaled_dot_product_attention(q, k, v)
            return sparse_attention(q, k, v, layout, sources[mask](sparsity), tuple(args.pool), scale, backend)

        row = {}
        for name, mask, backend, sparsity in configs(args):
            m = block_mask(sources[mask](sparsity), to_slots(q, blocks), to_slots(k, blocks), blocks, scale) if mask != "dense" else None
            t = time.perf_counter()
            with torch.no_grad():
                run(mask, backend, sparsity)
            sync()
            row[name] = {"first_s": time.perf_counter() - t, "seconds": [],
                         "density": 1.0 if m is None else density(m)}
        for repeat in range(args.repeats):
            for name, mask, backend, sparsity in configs(args):
                t = time.perf_counter()
                with torch.no_grad():
                    run(mask, backend, sparsity)
                sync()
                row[name]["seconds"].append(time.perf_counter() - t)
                print(f"{size} round {repeat} {name}: {row[name]['seconds'][-1]:.3f} s", file=sys.stderr)
        dense = statistics.median(row["dense sdpa"]["seconds"])
        for entry in row.values():
            entry["median_s"] = statistics.median(entry["seconds"])
            entry["speedup"] = dense / entry["median_s"]
        results[size] = {"tokens": n, "grid": grid, "configs": row}

    print(f"device {device}, {torch.get_num_threads()} threads, {args.dtype}, pool {tuple(args.pool)}")
    print(f"{'tokens':>7} {'configuration':<22} {'density':>8} {'median s':>9} {'vs dense':>9} {'first call s':>13}")
    for size, result in results.items():
        for name, entry in result["configs"].items():
            print(f"{result['tokens']:>7} {name:<22} {entry['density']:>8.3f} {entry['median_s']:>9.3f} "
                  f"{entry['speedup']:>8.2f}x {entry['first_s']:>13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Block-sparse attention on shapes-wan against dense attention with the same prompts and seeds.

Each held-out prompt of a video set x seed is generated dense and with each block mask; per video: the
PSNR and SSIM of each frame to the dense video (means over frames; SSIM as scikit-image computes it,
Wang et al. 2004's Gaussian window), and the shapes video metrics, paired against the dense row on the
same prompts and seeds. Rows: the draft map at each --sparsity, with the default dense warm-up (the
first 30% of the steps and the first block dense) and without any; the Radial mask and a sliding-tile
mask for each --tile window (their density is fixed by the pattern and printed beside them: on shapes-wan's
17 x 2 x 2 blocks a window of (t, 2, 2) keeps t / 17). shapes-wan has 8 x 8 tokens a frame
and 17 latent frames (its VAE keeps every frame): the default --pool 4 4 makes 4 blocks a frame, 68 in
all (at Wan's pool of 128 tokens a frame would be under one block). Needs ``pip install -e ".[bench]"``.

    python benchmarks/bench_sparse_quality.py --set one-moving --count 60 --seeds 2 --out sparse-quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from measure import check_video_set, video_set_options

METRICS = ("psnr", "ssim", "binding", "identity", "smooth", "followed", "flicker")
FIDELITY = ("psnr", "ssim")  # against the dense video, so not paired
MASK_ROWS = ("draft", "draft-no-warm-up", "radial", "tile")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    video_set_options(p, batch_size=8)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--pool", type=int, nargs=2, default=(4, 4))
    p.add_argument("--tile", type=int, nargs="+", default=[3, 1, 1],
                   help="sliding-tile windows of blocks, 3 numbers each (frames rows columns): a tile row each")
    p.add_argument("--backend", default="gather", choices=["auto", "flex", "gather", "dense"])
    p.add_argument("--masks", nargs="+", default=list(MASK_ROWS), choices=list(MASK_ROWS),
                   help="which rows beside dense: the draft map with its warm-up, without it, Radial, sliding tile")
    args = p.parse_args()
    check_video_set(p, args)
    if len(args.tile) % 3:
        p.error(f"--tile {' '.join(map(str, args.tile))}: give 3 numbers (frames rows columns) per window")
    args.tile = [tuple(args.tile[i:i + 3]) for i in range(0, len(args.tile), 3)]
    return args


def rows(args) -> dict[str, dict]:
    """Row name -> the sparse keyword arguments (None: dense)."""
    common = dict(sparse_pool=tuple(args.pool), sparse_backend=args.backend)
    out = {"dense": None}
    for s in args.sparsity:
        if "draft" in args.masks:
            out[f"draft {s:g}"] = dict(sparsity=s, **common)
        if "draft-no-warm-up" in args.masks:
            out[f"draft {s:g} no warm-up"] = dict(sparsity=s, sparse_dense_steps=0, sparse_dense_layers=[], **common)
    if "radial" in args.masks:
        out["radial"] = dict(sparse_mask="radial", **common)
    if "tile" in args.masks:
        for window in args.tile:
            out[tile_row(window)] = dict(sparse_mask="tile", sparse_tile=window, **common)
    return out


def tile_row(window: tuple[int, int, int]) -> str:
    return "tile " + " x ".join(map(str, window))


def static_densities(pipe, call: dict, args) -> dict[str, float]:
    """The fraction of block pairs the radial and each tile mask keep on the call's token grid (the diagonal
    included, as computed)."""
    from attnsteer.attention_processors import TokenLayout
    from attnsteer.attention_processors.sparse import RadialMask, TileMask, block_layout, block_mask, density
    from attnsteer.pipelines.sparse import token_grid

    frames = call["num_frames"] // pipe.vae_scale_factor_temporal + 1  # WanPipeline's latent frames, factor 4 or 1
    grid = (frames, *token_grid(pipe, call))
    n = int(np.prod(grid))
    blocks = block_layout(TokenLayout(slice(0, n), None, grid), n, tuple(args.pool))
    marker = torch.zeros(1)
    sources = {"radial": RadialMask(), **{tile_row(window): TileMask(window) for window in args.tile}}
    return {name: density(block_mask(source, marker, None, blocks, 1.0)) for name, source in sources.items()}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of each frame's PSNR (frames in [0, 1]); identical frames count 60 dB."""
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-6))))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of each frame's SSIM (frames [H, W, 3] in [0, 1]), Gaussian window of sigma 1.5."""
    from skimage.metrics import structural_similarity

    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False) for x, y in zip(a, b)]))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from attnsteer.guidance.shapes import VIDEO_METRICS, mean_interval, score_video, video_prompt_set
    from attnsteer.guidance.stats import paired_difference
    from attnsteer.pipelines.cli import load_pipeline
    from attnsteer.pipelines.evaluate import paired_table, table

    pipe, _ = load_pipeline(args.model, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    call = {**pipe.call_defaults, "output_type": "np"}
    prompts = video_prompt_set(args.set, args.split)[:args.count]
    items = [(p, s) for p in prompts for s in range(args.seeds)]
    records, seconds, t = [], {}, time.time()
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        generators = lambda: [torch.Generator().manual_seed(1000 * s + prompts.index(p)) for p, s in batch]
        dense = None
        for row, extra in rows(args).items():
            t_row = time.time()
            frames = pipe([p for p, _ in batch], generator=generators(), **call, **(extra or {})).frames
            seconds[row] = seconds.get(row, 0.0) + time.time() - t_row
            dense = frames if extra is None else dense
            for (prompt, seed), video, reference in zip(batch, frames, dense):
                scores = score_video(list(video), prompt)
                records.append({"row": row, "prompt": prompt, "seed": seed, "psnr": psnr(video, reference),
                                "ssim": ssim(video, reference), **{m: scores[m] for m in VIDEO_METRICS}})
    by_row = {row: [r for r in records if r["row"] == row] for row in rows(args)}
    metrics = [m for m in METRICS if all(r[m] is not None for r in records)]  # followed: captions that name motion
    summary = {row: {"n_images": len(rs), **{m: mean_interval([r[m] for r in rs], [r["prompt"] for r in rs])
                                             for m in metrics}} for row, rs in by_row.items()}
    base = by_row["dense"]
    paired = {row: {m: paired_difference([r[m] for r in base], [r[m] for r in rs], [r["prompt"] for r in rs])
                    for m in metrics if m not in FIDELITY} for row, rs in by_row.items() if row != "dense"}
    heading = (f"{args.model}, {args.set} {args.split} prompts x seeds 0..{args.seeds - 1} ({len(items)} videos), pool "
               f"{tuple(args.pool)}, backend {args.backend}; {time.time() - t:.0f} s; seconds per row: "
               + ", ".join(f"{row} {s:.0f}" for row, s in seconds.items()) + "; static mask densities: "
               + ", ".join(f"{k} {v:.2f}" for k, v in static_densities(pipe, call, args).items()))
    print(f"{heading}\n\n{table(summary, metrics)}\n\n"
          f"{paired_table(paired, 'dense', [m for m in metrics if m not in FIDELITY])}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "paired": paired,
                                              "seconds": seconds, "records": records}, indent=1))


if __name__ == "__main__":
    main()

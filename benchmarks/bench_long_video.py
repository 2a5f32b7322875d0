"""Long video: a video model asked for more frames than it was trained on, by each method.

Rows (--rows): "direct", the model asked for all --frames in one call; "clips", independent clips of the
trained length concatenated (clip c of seed s at seed 1000 s + c); "fifo" (FIFO-Diffusion without
lookahead), "fifo-lookahead", and Ouroboros on FIFO with lookahead: each part alone ("ouroboros-tail",
coherent tail sampling; "ouroboros-cross-frame" and "ouroboros-guidance", the subject parts with the
prompt's object nouns as subjects) and all together ("ouroboros"). Each held-out
prompt of a video set x seed is generated at --frames (e.g. 137 on shapes-wan, 8x its 17) and scored
whole (``score_video``: identity over the whole video) and per window of --window frames (``video_drift``:
the first window against the last, identity against each object's first detection in the whole video).
Every row is paired against the first on the same prompts and seeds. Model calls per output frame are
counted for each row, and its peak memory beyond the loaded model (CPU resident set) is measured over its run.

    python benchmarks/bench_long_video.py --model shapes-wan --set one-moving --count 50 --seeds 2 --frames 137
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from measure import check_video_set, peak_bytes, video_set_options

from attnsteer.guidance.shapes import VIDEO_METRICS

ROWS = {"direct": None, "clips": None, "fifo": dict(fifo_lookahead=False), "fifo-lookahead": dict(fifo_lookahead=True),
        "ouroboros-tail": dict(fifo_lookahead=True, ouroboros_tail=True),
        "ouroboros-cross-frame": dict(fifo_lookahead=True, ouroboros_guidance=0.0),
        "ouroboros-guidance": dict(fifo_lookahead=True, ouroboros_cross_frame=False),
        "ouroboros": dict(fifo_lookahead=True, ouroboros_tail=True)}
SUBJECT_ROWS = ("ouroboros-cross-frame", "ouroboros-guidance", "ouroboros")  # subjects: the prompt's object nouns


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    video_set_options(p, batch_size=4)
    p.add_argument("--frames", type=int, default=65, help="frames asked for (1 + 4k for Wan's 4x temporal VAE)")
    p.add_argument("--window", type=int, default=None, help="frames per scored window (default: the model's trained clip)")
    p.add_argument("--rows", nargs="+", default=["direct", "fifo"], choices=list(ROWS))
    p.add_argument("--partitions", type=int, default=4, help="FIFO's n")
    args = p.parse_args()
    check_video_set(p, args)
    return args


def generate(pipe, fifo, row: str, batch, call: dict, trained: int, args) -> list:
    """The videos of one batch of (prompt, seed) by ``row``'s method."""
    from attnsteer.pipelines.frames import parent_frames

    prompts = [p for p, _ in batch]
    if row == "direct":  # num_frames is WanPipeline's, which adds a frame at temporal factor 1
        return list(pipe(prompts, generator=[torch.Generator().manual_seed(s) for _, s in batch],
                         **{**call, "num_frames": parent_frames(args.frames, pipe.vae_scale_factor_temporal)}).frames)
    if row == "clips":
        count = -(-(args.frames - 1) // (trained - 1))
        clips = [pipe(prompts, generator=[torch.Generator().manual_seed(1000 * s + c) for _, s in batch],
                      **{**call, "num_frames": parent_frames(trained, pipe.vae_scale_factor_temporal)}).frames
                 for c in range(count)]
        return [np.concatenate([clip[i] for clip in clips])[:args.frames] for i in range(len(batch))]
    from attnsteer.guidance.shapes import caption_concepts

    subjects = lambda p: {"ouroboros_subjects": caption_concepts(p)} if row in SUBJECT_ROWS else {}
    return [fifo(p, generator=torch.Generator().manual_seed(s), fifo_partitions=args.partitions, **ROWS[row],
                 **subjects(p), **call).frames[0] for p, s in batch]


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from attnsteer.guidance.shapes import score_video, summarize_drift, summarize_videos, video_drift, video_prompt_set
    from attnsteer.guidance.stats import paired_difference
    from attnsteer.pipelines.cli import load_pipeline
    from attnsteer.pipelines.evaluate import paired_table, table
    from attnsteer.pipelines.fifo import fifo_pipeline

    pipe, is_video = load_pipeline(args.model, "cpu", "float32")
    if not is_video:
        raise SystemExit(f"--model {args.model} is not a video model")
    pipe.set_progress_bar_config(disable=True)
    fifo = fifo_pipeline(pipe)
    fifo.set_progress_bar_config(disable=True)
    trained = fifo.trained_frames()
    window = args.window or trained
    try:
        fifo.check_fifo(args.frames, args.partitions, window, False, None, 0, None)
    except ValueError as error:
        raise SystemExit(f"--frames {args.frames} / --window {window} / --partitions {args.partitions}: {error}")
    if args.frames < 2 * window:
        raise SystemExit(f"--frames {args.frames}: at least two windows of {window} frames are needed")
    call = {"num_inference_steps": 20, **pipe.call_defaults, "num_frames": args.frames, "output_type": "np"}
    prompts = video_prompt_set(args.set, args.split)[:args.count]
    items = [(p, s) for p in prompts for s in range(args.seeds)]
    groups = [p for p, _ in items]
    calls = {}

    def counted(*a, **k):
        calls[row] = calls.get(row, 0) + 1
        return forward(*a, **k)

    forward = pipe.transformer.forward
    pipe.transformer.forward = counted
    results, t = {}, time.time()
    try:
        for row in args.rows:
            drifts, wholes = [], []

            def run():
                for i in range(0, len(items), args.batch_size):
                    batch = items[i:i + args.batch_size]
                    for (prompt, _), video in zip(batch, generate(pipe, fifo, row, batch, call, trained, args)):
                        drifts.append(video_drift(list(video), prompt, window))
                        wholes.append(score_video(list(video), prompt))

            peak = peak_bytes(run, "cpu")
            results[row] = {"drifts": drifts, "wholes": wholes, "peak": peak}
    finally:
        del pipe.transformer.forward
    frames_out = len(items) * args.frames
    print(f"{args.model}, {args.set} {args.split} prompts x {args.seeds} seeds ({len(items)} videos), {args.frames} frames "
          f"asked (trained on {trained}), windows of {window}, FIFO n = {args.partitions}; {time.time() - t:.0f} s\n")
    print("model calls per output frame (a CFG step is two calls; per batch of videos for direct and clips): "
          + ", ".join(f"{row} {calls.get(row, 0) / frames_out:.2f}" for row in args.rows))
    print(f"peak MiB beyond the loaded model (a batch of {args.batch_size} for direct and clips, one video for FIFO): "
          + ", ".join(f"{row} {r['peak'] / 2 ** 20:.0f}" for row, r in results.items()) + "\n")
    summary, paired, first_row = {}, {}, args.rows[0]
    for row, r in results.items():
        summary[f"{row} whole"] = summarize_videos(r["wholes"], groups)
        summary[f"{row} first window"] = summarize_videos([d["windows"][0] for d in r["drifts"]], groups)
        summary[f"{row} last window"] = summarize_videos([d["windows"][-1] for d in r["drifts"]], groups)
        summary[f"{row} drift"] = summarize_drift(r["drifts"], groups)
    print(table({k: v for k, v in summary.items() if not k.endswith("drift")}, VIDEO_METRICS))
    print("\n" + paired_table({row: summary[f"{row} drift"] for row in results}, "first window (drift: last - first)",
                               VIDEO_METRICS))
    for row, r in results.items():
        if row == first_row:
            continue
        base = results[first_row]
        paired[row] = {m: paired_difference([w[m] for w in base["wholes"]], [w[m] for w in r["wholes"]], groups)
                       for m in ("identity", "binding", "smooth", "flicker")}
        paired[row]["drift binding"] = paired_difference([d["change"]["binding"] for d in base["drifts"]],
                                                         [d["change"]["binding"] for d in r["drifts"]], groups)
    if paired:
        print("\n" + paired_table(paired, f"{first_row} (whole video; drift binding: change of last - first)",
                                   ("identity", "binding", "smooth", "flicker", "drift binding")))
    if args.out:
        records = {row: [{"prompt": p, "seed": s, "whole": {m: w[m] for m in VIDEO_METRICS}, "first": d["first"],
                          "last": d["last"], "change": d["change"]} for (p, s), d, w in zip(items, r["drifts"], r["wholes"])]
                   for row, r in results.items()}
        Path(args.out).write_text(json.dumps({"args": vars(args), "calls": calls,
                                              "peak": {row: r["peak"] for row, r in results.items()}, "summary": summary, "paired": paired,
                                              "records": records}, indent=1, default=str))


if __name__ == "__main__":
    main()

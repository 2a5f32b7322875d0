"""Plain long generation: a video model asked for more frames than it was trained on, in one call.

The baseline the long-video methods (FIFO, Ouroboros) must beat. Each held-out prompt of a video set is
generated at --frames (e.g. 65 on shapes-wan, trained on 17) and scored whole (``score_video``) and per
window of --window frames (``video_drift``: the first window against the last, identity against each
object's first detection in the whole video).

    python benchmarks/bench_long_video.py --model shapes-wan --set one-moving --count 100 --seeds 2 --frames 65
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnsteer.guidance.shapes import VIDEO_METRICS


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-wan")
    p.add_argument("--set", default="one-moving", choices=["one", "two", "one-moving", "two-moving"])
    p.add_argument("--split", default="heldout", choices=["tune", "heldout"])
    p.add_argument("--count", type=int, default=20, help="prompts")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per prompt")
    p.add_argument("--frames", type=int, default=65, help="frames asked for (1 + 4k for Wan)")
    p.add_argument("--window", type=int, default=None, help="frames per scored window (default: the model's trained clip)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the records and tables here (JSON)")
    args = p.parse_args()
    if args.count < 1 or args.seeds < 1 or args.batch_size < 1:
        p.error("--count, --seeds and --batch-size must be at least 1")
    if args.frames < 5 or (args.frames - 1) % 4:
        p.error(f"--frames {args.frames}: Wan needs 1 + 4k frames, at least 5")
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from attnsteer.guidance.shapes import summarize_drift, summarize_videos, video_drift, video_prompt_set
    from attnsteer.pipelines.cli import load_pipeline
    from attnsteer.pipelines.evaluate import paired_table, table

    pipe, is_video = load_pipeline(args.model, "cpu", "float32")
    if not is_video:
        raise SystemExit(f"--model {args.model} is not a video model")
    pipe.set_progress_bar_config(disable=True)
    trained = pipe.call_defaults.get("num_frames", 17)
    window = args.window or trained
    if args.frames < 2 * window:
        raise SystemExit(f"--frames {args.frames}: at least two windows of {window} frames are needed")
    call = {"num_inference_steps": 20, **pipe.call_defaults, "num_frames": args.frames, "output_type": "np"}
    prompts = video_prompt_set(args.set, args.split)[:args.count]
    items = [(p, s) for p in prompts for s in range(args.seeds)]
    drifts, t = [], time.time()
    for i in range(0, len(items), args.batch_size):
        batch = items[i:i + args.batch_size]
        frames = pipe([p for p, _ in batch], generator=[torch.Generator().manual_seed(s) for _, s in batch], **call).frames
        drifts += [video_drift(list(video), prompt, window) for (prompt, _), video in zip(batch, frames)]
    groups = [p for p, _ in items]
    first = summarize_videos([d["windows"][0] for d in drifts], groups)
    last = summarize_videos([d["windows"][-1] for d in drifts], groups)
    change = summarize_drift(drifts, groups)
    print(f"{args.model}, {args.set} {args.split} prompts x {args.seeds} seeds, {args.frames} frames asked "
          f"(trained on {trained}), windows of {window}; {time.time() - t:.0f} s\n")
    print(table({"first window": first, "last window": last}, VIDEO_METRICS))
    print("\n" + paired_table({"last window": change}, "first window", VIDEO_METRICS))
    if args.out:
        records = [{"prompt": p, "seed": s, "first": d["first"], "last": d["last"], "change": d["change"]}
                   for (p, s), d in zip(items, drifts)]
        Path(args.out).write_text(json.dumps({"args": vars(args), "first": first, "last": last, "change": change,
                                              "records": records}, indent=1))


if __name__ == "__main__":
    main()

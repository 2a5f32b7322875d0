"""FIFO-Diffusion's memory against video length: peak memory of one long video written frame by frame.

Each length runs in its own fresh process (``measure.peak_in_own_process``): peak memory beyond what was
held before the call (CPU: peak RSS; CUDA: max allocated), the frames handed to a callback that keeps
none of them, as ``attnsteer video --frames N`` does. Also the transformer calls per output frame (a CFG
step is two calls; the initial clip's are counted too).

    python benchmarks/bench_fifo_memory.py --model shapes-wan --frames 65 257 1025
"""

from __future__ import annotations

import argparse
import json

from measure import device_options, peak_bytes, peak_in_own_process


def run(args, frames: int) -> dict:
    import torch

    from attnsteer.pipelines.cli import load_pipeline
    from attnsteer.pipelines.fifo import fifo_pipeline

    pipe, _ = load_pipeline(args.model, args.device, args.dtype)
    fifo = fifo_pipeline(pipe)
    fifo.set_progress_bar_config(disable=True)
    calls, seen = [0], [0]
    forward = fifo.transformer.forward

    def counted(*a, **k):
        calls[0] += 1
        return forward(*a, **k)

    fifo.transformer.forward = counted

    def drop(_, first, chunk):
        seen[0] = first + chunk.shape[1]

    peak = peak_bytes(lambda: fifo("a red circle moving left", num_frames=frames, fifo_partitions=args.partitions,
                                   frame_callback=drop, generator=torch.Generator().manual_seed(0)), args.device)
    return {"frames": frames, "frames_seen": seen[0], "peak_bytes": peak, "calls": calls[0],
            "calls_per_frame": calls[0] / frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-wan")
    parser.add_argument("--frames", type=int, nargs="+", default=[65, 257, 1025])
    parser.add_argument("--partitions", type=int, default=4)
    device_options(parser)
    args = parser.parse_args()

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run(args, int(args.one))))
        return
    results = [peak_in_own_process(__file__, str(frames), args.device) for frames in args.frames]
    base = results[0]["peak_bytes"]
    print(f"{args.model}, FIFO n = {args.partitions} with lookahead, {args.device}, {args.dtype}")
    print("| frames | peak MiB | vs shortest | transformer calls per frame |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['frames']} | {r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / base:.3f}x | {r['calls_per_frame']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

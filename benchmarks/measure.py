"""What the benchmark scripts share: their device options, peak memory of one run beyond what was held
before it, measured in a fresh process, and the report of per-picture scores paired against a reference row."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable


def device_options(parser: argparse.ArgumentParser) -> None:
    """--threads, --device, --dtype, --json, --tiny, and the hidden --one CONFIG that ``peak_in_own_process`` uses."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny widths and token grids, the same code: the GPU suite's dry run (gpu_suite.py)")
    parser.add_argument("--device", default=None, help="default: cuda if a GPU is visible, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)


def video_set_options(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """The video quality benchmarks' --model, --set, --split, --count, --seeds (a video prompt set x seeds),
    --batch-size, --threads and --out; ``check_video_set`` checks them after parsing."""
    parser.add_argument("--model", default="shapes-wan")
    parser.add_argument("--set", default="one-moving", choices=["one", "two", "one-moving", "two-moving"])
    parser.add_argument("--split", default="heldout", choices=["tune", "heldout"])
    parser.add_argument("--count", type=int, default=20, help="prompts")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per prompt")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the records and tables here (JSON)")


def check_video_set(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.count < 1 or args.seeds < 1 or args.batch_size < 1:
        parser.error("--count, --seeds and --batch-size must be at least 1")


def step_seconds(call: Callable[[Callable], object], device: str) -> list[float]:
    """Seconds of each denoising step after the first (warm-up) of ``call(stamp)``, which runs one
    pipeline call with ``stamp`` as its step callback (``callback_on_step_end`` or the older ``callback``)."""
    import torch

    stamps = []

    def stamp(*args):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return args[-1]  # callback_on_step_end's kwargs

    call(stamp)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def interleaved(configs, timed: Callable[[str], list[float]], repeats: int) -> dict:
    """``{config: {"step_s": [...], "peak_bytes": 0}}``: ``timed(config)``'s step seconds over ``repeats``
    rounds, every configuration once per round, so that a slow spell of the machine hits them all."""
    results = {config: {"step_s": [], "peak_bytes": 0} for config in configs}
    for repeat in range(repeats):
        for config in configs:
            steps = timed(config)
            results[config]["step_s"] += steps
            print(f"round {repeat} {config}: {statistics.median(steps):.4f} s/step", file=sys.stderr)
    return results


def peak_in_own_process(script: str, config: str, device: str) -> int:
    """Peak bytes of ``config``: ``script`` rerun with this run's arguments and ``--one config`` in a fresh
    process, which prints them on its last line."""
    command = [sys.executable, script, *sys.argv[1:], "--device", device, "--one", config]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.splitlines()[-1])


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_bytes(run, device: str) -> int:
    """Peak bytes ``run()`` needs beyond what is held before it. CUDA: max allocated minus allocated
    before; CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS before."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss("VmRSS")
    run()
    return (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss("VmHWM")) - before


def paired_report(records: list[dict], rows, reference: str, metrics: tuple, heading: str, out: str | None,
                  args: argparse.Namespace) -> None:
    """Print each row's means and each other row minus ``reference`` on the same prompts and seeds (95%
    intervals, seeds grouped by prompt); with ``out``, write them and the records as JSON."""
    from attnsteer.guidance.shapes import mean_interval
    from attnsteer.guidance.stats import paired_difference
    from attnsteer.pipelines.evaluate import paired_table, table

    by_row = {row: [r for r in records if r["row"] == row] for row in rows}
    summary = {row: {"n_images": len(rs), **{m: mean_interval([r[m] for r in rs], [r["prompt"] for r in rs])
                                             for m in metrics}} for row, rs in by_row.items()}
    base = by_row[reference]
    paired = {row: {m: paired_difference([r[m] for r in base], [r[m] for r in rs], [r["prompt"] for r in rs])
                    for m in metrics} for row, rs in by_row.items() if row != reference}
    print(f"{heading}\n\n{table(summary, metrics)}\n\n{paired_table(paired, reference, metrics)}")
    if out:
        with open(out, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "paired": paired, "records": records}, f, indent=1)

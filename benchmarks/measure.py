"""What the benchmark scripts share: their device options, and peak memory of one run beyond what was
held before it, measured in a fresh process."""

import argparse
import json
import os
import subprocess
import sys


def device_options(parser: argparse.ArgumentParser) -> None:
    """--threads, --device, --dtype, --json, and the hidden --one CONFIG that ``peak_in_own_process`` uses."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="default: cuda if a GPU is visible, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)


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

"""Every GPU row of BENCHMARKS.md in one command, most important first, for a lent GPU's few minutes.

Each row runs one benchmark script in its own process and leaves, as soon as it ends, ``ROW.json`` (the
script's results), ``ROW.md`` (its table) and ``ROW.log`` under --out, and the suite rewrites
``suite.json`` (commit, device, versions, each row's command, status and seconds) after every row, so a
run cut off keeps what it finished. A row that would start past --budget-s is skipped, and each row is
stopped at its own limit. ``--dry-run`` runs every row with the same options plus ``--tiny --device cpu``
(tiny widths and grids) and the dry overrides below: the test that keeps the suite runnable between GPU
sessions.

On the device (an H200 has torch, transformers and accelerate, not diffusers): once here,
``echo /.whl/ >> .git/info/exclude`` and
``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1``; then the device command, with ``.whl`` in
``carry`` and a limit of 560 s:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . && \\
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_suite.py --out $OUT/gpu --commit COMMIT --budget-s 480

Here: ``python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu-dry``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADS_CONFIGS = ["cfg", "pag-diffusers", "ours-middle-batched", "ours-middle-batched-whole", "ours-middle-sequential",
                 "ours-middle-sequential-whole", "ours-early-batched", "ours-late-batched", "ours-heads-batched"]
# name, script, options on the GPU, options replaced in the dry run, seconds allowed on the GPU
ROWS = [
    ("sparse-attention", "bench_sparse.py",
     ["--sizes", "32k", "--sparsity", "0.75", "0.9", "--pool", "16", "8", "--backends", "flex", "gather",
      "--repeats", "5", "--dtype", "bfloat16"],
     ["--backends", "gather", "--repeats", "1"], 150),
    ("sparse-model", "bench_sparse_model.py",
     ["--frames", "21", "--layers", "30", "--sparsity", "0.75", "0.9", "--pool", "16", "8", "--backend", "flex",
      "--repeats", "3", "--dtype", "bfloat16"],
     ["--layers", "2", "--frames", "2", "--backend", "gather", "--repeats", "1"], 150),
    ("heads-sd3", "bench_head_perturbation.py",
     ["--layers", "24", "--size", "1024", "--steps", "4", "--repeats", "3", "--dtype", "bfloat16",
      "--configs", *HEADS_CONFIGS],
     ["--layers", "3", "--size", "64", "--steps", "1", "--repeats", "1", "--configs", "cfg", "ours-middle-batched"],
     150),
    ("heads-flux", "bench_head_perturbation.py",
     ["--model", "flux", "--layers", "19", "--size", "1024", "--steps", "3", "--repeats", "3", "--dtype", "bfloat16",
      "--configs", "cfg", "ours-middle-batched", "ours-middle-batched-whole", "ours-middle-sequential",
      "ours-late-batched"],
     ["--layers", "3", "--size", "64", "--steps", "1", "--repeats", "1", "--configs", "cfg", "ours-middle-batched"],
     120),
    ("families", "bench_families.py",
     ["--layers", "8", "--size", "1024", "--frames", "13", "--text", "256", "--repeats", "3", "--dtype", "bfloat16"],
     ["--layers", "2", "--size", "128", "--frames", "2", "--text", "8", "--repeats", "1"], 120),
    ("astar", "bench_astar.py", ["--model", "sd15", "--size", "512", "--steps", "8", "--repeats", "3",
                                 "--dtype", "float16"],
     ["--size", "64", "--steps", "1", "--repeats", "1", "--configs", "cfg", "astar"], 90),
    ("story", "bench_story.py", ["--model", "sdxl", "--size", "1024", "--steps", "5", "--repeats", "3",
                                 "--dtype", "float16"],
     ["--size", "64", "--steps", "1", "--repeats", "1"], 90),
]
DRY = ["--tiny", "--device", "cpu", "--dtype", "float32", "--threads", "1"]


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def device_name(dry: bool) -> str:
    import torch

    if not dry and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()} (torch {torch.__version__})"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "triton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for suite.json and each row's .json, .md and .log")
    p.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    p.add_argument("--budget-s", type=float, default=480, help="no row starts after this many seconds")
    p.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD, where there is a .git)")
    p.add_argument("--dry-run", action="store_true", help="every row at tiny sizes on the CPU")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s} must be positive")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"commit": args.commit or commit(), "device": device_name(args.dry_run), "versions": versions(),
              "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": {}}
    start = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for name, script, options, dry, limit in (r for r in ROWS if r[0] in args.rows):
        command = [sys.executable, str(HERE / script), *options, *((dry + DRY) if args.dry_run else []),
                   "--json", str(out / f"{name}.json")]
        entry = record["rows"][name] = {"command": " ".join([Path(script).name, *command[2:]])}
        if time.time() - start > args.budget_s:
            entry["status"] = "skipped: past --budget-s"
        else:
            t = time.time()
            try:
                run = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True,
                                     timeout=None if args.dry_run else limit)
                entry["status"] = "done" if run.returncode == 0 else f"failed (exit {run.returncode})"
                stdout, stderr = run.stdout, run.stderr
            except subprocess.TimeoutExpired as stopped:
                entry["status"] = f"stopped at its {limit} s limit"
                stdout, stderr = (s.decode() if isinstance(s, bytes) else s or "" for s in (stopped.stdout, stopped.stderr))
            entry["seconds"] = round(time.time() - t, 1)
            (out / f"{name}.md").write_text(stdout)
            (out / f"{name}.log").write_text(stderr)
        print(f"{name}: {entry['status']}" + (f" in {entry['seconds']} s" if "seconds" in entry else ""), flush=True)
        (out / "suite.json").write_text(json.dumps(record, indent=1))
    failed = [n for n, e in record["rows"].items() if not e["status"].startswith(("done", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

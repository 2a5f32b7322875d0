"""Run the attnsteer CLI in 2 CPU processes, as users scale out with accelerate."""

import os
import subprocess
import sys


def accelerate_cli(args: list[str], processes: int = 2) -> None:
    """``accelerate launch --multi_gpu``: on a machine without CUDA its processes join over gloo
    (``--cpu`` would start a single process)."""
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "attnsteer.pipelines.cli", *args],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)

"""Run the attnsteer CLI in 2 CPU processes, as users scale out with accelerate."""

import os
import socket
import subprocess
import sys


def free_port() -> int:
    """A port free now: two launches at once (one per pytest worker) must not share accelerate's default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cli(args: list[str], processes: int = 2) -> None:
    """``accelerate launch --multi_gpu``: on a machine without CUDA its processes join over gloo
    (``--cpu`` would start a single process)."""
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), "-m", "attnsteer.pipelines.cli", *args],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)

"""The training scripts refuse bad options before drawing or training anything."""

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def refused(script, option, value, work):
    """The script's stderr for one bad option; it must exit with argparse's 2 before starting its log."""
    run = subprocess.run([sys.executable, str(SAMPLES / script), option, value, "--work", str(work),
                          "--output", str(work / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert not (work / "train.log").exists()
    return run.stderr


@pytest.mark.parametrize("script,weights", [("train_shapes_sd.py", w) for w in ("2,1", "1,-1,1", "0,0,0", "a,b,c")]
                         + [("train_shapes_sd3.py", "2,1")])
def test_bad_sample_weights_are_named(script, weights, tmp_path):
    stderr = refused(script, "--sample-weights", weights, tmp_path)
    assert f"argument --sample-weights: '{weights}' is not three non-negative weights" in stderr


@pytest.mark.parametrize("option,value,message", [
    ("--patch", "3", "argument --patch: invalid choice: 3 (choose from 1, 2, 4)"),
    ("--default-steps", "0", "argument --default-steps: '0' is not a whole number >= 1"),
    ("--default-steps", "forty", "argument --default-steps: 'forty' is not a whole number >= 1"),
])
def test_bad_sd3_model_options_are_named(option, value, message, tmp_path):
    assert message in refused("train_shapes_sd3.py", option, value, tmp_path)

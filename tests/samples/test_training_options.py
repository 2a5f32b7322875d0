"""The training scripts refuse bad options before drawing or training anything."""

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.mark.parametrize("script,weights", [("train_shapes_sd.py", w) for w in ("2,1", "1,-1,1", "0,0,0", "a,b,c")]
                         + [("train_shapes_sd3.py", "2,1")])
def test_bad_sample_weights_are_named(script, weights, tmp_path):
    run = subprocess.run([sys.executable, str(SAMPLES / script), "--sample-weights", weights, "--work", str(tmp_path),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert f"argument --sample-weights: '{weights}' is not three non-negative weights" in run.stderr
    assert not (tmp_path / "train.log").exists()

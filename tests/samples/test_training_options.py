"""The training scripts refuse bad options before drawing or training anything."""

from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.fixture
def refused(run_script, tmp_path):
    """The script's stderr for one bad option; it must exit with argparse's 2 before starting its log."""
    def run(script, option, value):
        code, _, stderr = run_script(SAMPLES / script, option, value, "--work", tmp_path, "--output", tmp_path / "out")
        assert code == 2
        assert not (tmp_path / "train.log").exists()
        return stderr
    return run


@pytest.mark.parametrize("script,weights", [("train_shapes_sd.py", w) for w in ("2,1", "1,-1,1", "0,0,0", "a,b,c")]
                         + [("train_shapes_sd3.py", "2,1")])
def test_bad_sample_weights_are_named(script, weights, refused):
    stderr = refused(script, "--sample-weights", weights)
    assert f"argument --sample-weights: '{weights}' is not three non-negative weights" in stderr


@pytest.mark.parametrize("option,value,message", [
    ("--patch", "3", "argument --patch: invalid choice: 3 (choose from 1, 2, 4)"),
    ("--default-steps", "0", "argument --default-steps: '0' is not a whole number >= 1"),
    ("--default-steps", "forty", "argument --default-steps: 'forty' is not a whole number >= 1"),
])
def test_bad_sd3_model_options_are_named(option, value, message, refused):
    assert message in refused("train_shapes_sd3.py", option, value)

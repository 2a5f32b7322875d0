"""The sample-generation scripts run end to end on tiny models with the smallest settings: each writes
the baseline, the method's picture and their grid, and the method changes the picture."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
sys.path.insert(0, str(SAMPLES))
import astar  # noqa: E402
import head_perturbation  # noqa: E402
import story  # noqa: E402


def pictures(out: Path, stem: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(path), np.float64) for path in sorted(out.glob(f"{stem}_*.png")) if "grid" not in path.name]


@pytest.mark.parametrize("script,argv", [
    (head_perturbation, ["--model", "tiny-sd3", "--heads", "0:0", "--scale", "3"]),
    (astar, ["--model", "tiny-sd", "--scale", "20", "--concepts", "red,blue"]),
])
def test_sample_script_writes_baseline_method_and_grid(script, argv, tmp_path, capsys):
    grids = script.main(argv + ["--steps", "2", "--prompts", "a red circle and a blue square", "--out", str(tmp_path)])
    assert grids == [tmp_path / "prompt0_grid.png"] and grids[0].exists()
    baseline, steered = pictures(tmp_path, "prompt0")  # sorted: baseline first
    assert baseline.shape == steered.shape and np.abs(baseline - steered).mean() > 0.01  # the method acted
    assert f"in {tmp_path}" in capsys.readouterr().out


def test_story_script_writes_references_independent_and_ir_scenes(tmp_path):
    grids = story.main(["--model", "tiny-sd", "--steps", "4", "--scenes", "a red circle and a blue square",
                        "--out", str(tmp_path)])
    shown = {p.name for p in tmp_path.glob("*.png")}
    assert grids == [tmp_path / "seed0_grid.png"] and shown == {
        "seed0_grid.png", "seed0_reference-a-red-circle.png", "seed0_reference-a-blue-square.png",
        "seed0_independent-a-red-circle-and-a-blue-square.png", "seed0_ir-a-red-circle-and-a-blue-square.png"}
    independent, ir = (np.asarray(Image.open(tmp_path / f"seed0_{n}-a-red-circle-and-a-blue-square.png"), np.float64)
                       for n in ("independent", "ir"))
    assert np.abs(independent - ir).mean() > 0.01  # the same seed: IR changed the scene


def test_bad_input_is_refused_before_any_picture(tmp_path):
    with pytest.raises(ValueError, match="'dog'"):
        astar.main(["--model", "tiny-sd", "--concepts", "dog", "--prompts", "a red circle", "--out", str(tmp_path)])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())

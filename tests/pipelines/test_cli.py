"""The attnsteer command line, run in-process on tiny random pipelines."""

import numpy as np
import pytest
from PIL import Image

from attnsteer.pipelines.cli import main


def test_generate_writes_baseline_and_steered_pngs(tmp_path, capsys):
    main(["generate", "--model", "tiny-sd3", "--prompt", "a red circle", "--steps", "2", "--heads", "1:0,2",
          "--u", "0.5", "--baseline", "--out", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir() if "grid" not in p.name)
    assert written == ["seed0_baseline_0.png", "seed0_steered_0.png"]
    assert Image.open(tmp_path / "seed0_grid.png").size == (2 * 32, 32 + 14)
    baseline, steered = (Image.open(tmp_path / name) for name in written)
    assert baseline.size == (32, 32) and not np.array_equal(np.asarray(baseline), np.asarray(steered))
    captured = capsys.readouterr()
    assert str(tmp_path / "seed0_steered_0.png") in captured.out
    assert "2/2" in captured.err  # the pipeline's progress bar


def test_generate_writes_video_frames(tmp_path):
    main(["generate", "--model", "tiny-wan", "--prompt", "a cat", "--steps", "2", "--heads", "blocks.1.attn1:*",
          "--height", "16", "--width", "16", "--frames", "5", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"seed0_steered_0_frame{f:03d}.png" for f in range(5)]


@pytest.mark.parametrize("option,message", [
    (["--u", "2"], "softpag_u 2.0 must be in [0, 1]"),
    (["--heads", "transformer_blocks.4.attn:0"], "unknown layer 'transformer_blocks.4.attn'"),
    (["--mode", "both"], "perturbation_mode 'both' is not one of"),
])
def test_bad_options_exit_with_the_reason(tmp_path, option, message):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", "tiny-sd3", "--prompt", "x", "--out", str(tmp_path), "--heads", "0:0", *option])
    assert message in str(exit.value) and not any(tmp_path.iterdir())


def test_unknown_tiny_model_is_named():
    with pytest.raises(SystemExit, match="unknown tiny model 'tiny-sd4'; choose one of tiny-sd, "):
        main(["layers", "--model", "tiny-sd4"])


def test_layers_lists_names_heads_and_layouts(capsys):
    main(["layers", "--model", "tiny-flux", "--layout", "--height", "32", "--width", "32"])
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "single_transformer_blocks.0.attn" in line).split()
    assert row[:4] == ["2", "single_transformer_blocks.0.attn", "joint", "2"]
    assert "grid (8, 8)" in lines[-1]

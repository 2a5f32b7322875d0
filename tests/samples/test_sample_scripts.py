"""The sample-generation scripts run end to end on tiny models with the smallest settings: each writes
the baseline, the method's picture and their grid, and the method changes the picture."""

import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
sys.path.insert(0, str(SAMPLES))
import astar  # noqa: E402
import head_perturbation  # noqa: E402
import long_video  # noqa: E402
import sparse_attention  # noqa: E402
import story  # noqa: E402


def pictures(out: Path, stem: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(path), np.float64) for path in sorted(out.glob(f"{stem}_*.png")) if not path.stem.endswith(("grid", "maps"))]


@pytest.mark.parametrize("script,argv", [
    (head_perturbation, ["--model", "tiny-sd3", "--heads", "0:0", "--scale", "3"]),
    (astar, ["--model", "tiny-sd", "--scale", "20", "--concepts", "red,blue"]),
])
def test_sample_script_writes_baseline_method_and_grid(script, argv, tmp_path, capsys):
    grids = script.main(argv + ["--steps", "2", "--prompts", "a red circle and a blue square", "--out", str(tmp_path)])
    assert grids[0] == tmp_path / "prompt0_grid.png" and all(path.exists() for path in grids)
    baseline, steered = pictures(tmp_path, "prompt0")  # in name order: which is which does not matter here
    assert baseline.shape == steered.shape and np.abs(baseline - steered).mean() > 0.01  # the method acted
    assert f"in {tmp_path}" in capsys.readouterr().out


def test_astar_script_draws_the_concepts_maps_without_and_with_it(tmp_path):
    made = astar.main(["--model", "tiny-sd", "--steps", "2", "--concepts", "red,blue", "--prompts",
                       "a red circle and a blue square", "--out", str(tmp_path)])
    assert made == [tmp_path / "prompt0_grid.png", tmp_path / "prompt0_maps.png"]
    maps = Image.open(made[1])
    assert maps.size == (3 * 128, 2 * (128 + 12))  # rows baseline, A-STAR: the image enlarged, a map per concept


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
    story.main(["--model", "tiny-sd", "--steps", "4", "--scenes", "a red circle and a blue square", "--masks", "detector",
                "--out", str(tmp_path / "detector")])
    first_pass = np.asarray(Image.open(tmp_path / "detector" / "seed0_independent-a-red-circle-and-a-blue-square.png"),
                            np.float64)
    assert np.abs(first_pass - independent).max() <= 1  # the segmenter's first pass is the independent scene


def test_sparse_attention_script_writes_one_gif_with_each_configuration_side_by_side(tmp_path):
    gifs = sparse_attention.main(["--model", "tiny-wan", "--steps", "4", "--configs", "dense", "draft 0.9",
                                  "--prompts", "a red circle moving left", "--out", str(tmp_path)])
    gif = Image.open(gifs[0])
    assert gifs == [tmp_path / "prompt0.gif"] and gif.n_frames == 9  # tiny-wan's clip
    first = np.asarray(gif.convert("RGB"), np.float64)
    side = (first.shape[1] - 6) // 2  # two square panels, 6 px apart, under their labels
    assert np.abs(first[-side:, :side] - first[-side:, -side:]).mean() > 0.01  # dense and sparse frames differ


def test_long_video_script_runs_direct_fifo_and_ouroboros(tmp_path, capsys):
    gifs = long_video.main(["--model", "tiny-wan", "--steps", "2", "--frames", "17", "--partitions", "2",
                            "--prompt", "a red circle moving left", "--out", str(tmp_path)])
    assert gifs == [tmp_path / "seed0.gif"] and Image.open(gifs[0]).n_frames == 17
    strip = Image.open(tmp_path / "seed0_strip.png")  # a row per video, 6 of its frames
    assert strip.height > 3 * 128 and strip.width > 6 * 128
    assert "17 frames" in capsys.readouterr().out


@pytest.mark.parametrize("script,argv,message", [
    (astar, ["--model", "tiny-sd", "--concepts", "dog", "--prompts", "a red circle"], "'dog'"),
    (head_perturbation, ["--model", "tiny-sd3", "--heads", "9:9"], "layer index 9 is out of range"),
    (story, ["--model", "tiny-sd", "--subjects", "a dog"], "the word 'dog' of subject 0 is not in scene 0"),
    (story, ["--model", "tiny-sd", "--masks", "detector", "--subjects", "a dog"], "subject 'a dog' must name one shapes"),
    (sparse_attention, ["--model", "tiny-wan", "--steps", "-1"], "num_inference_steps -1 must be a positive integer"),
    (long_video, ["--model", "tiny-wan", "--frames", "6"], "num_frames 6 must be 1 \\+ 4k frames"),
    (sparse_attention, ["--model", "tiny-wan", "--frames", "6"], "--frames 6 must be 1 \\+ 4k frames"),
    (sparse_attention, ["--model", "tiny-wan", "--pool", "0", "0"], "sparse_pool \\(0, 0\\) must be \\(rows, columns\\)"),
    (sparse_attention, ["--model", "tiny-wan", "--tile", "0", "1", "1"], "tile window \\(0, 1, 1\\) must be 3 positive"),
    (long_video, ["--model", "tiny-wan", "--partitions", "0"], "fifo_partitions 0 must be a whole number"),
    (long_video, ["--model", "tiny-wan", "--partitions", "1"], "ouroboros_subjects needs fifo_partitions >= 2, got 1"),
])
def test_bad_input_is_refused_before_any_picture(script, argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        script.main(argv + ["--out", str(tmp_path)])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_gallery_rewrites_only_its_block_and_keeps_the_rows_it_does_not_make():
    import gallery

    readme = f"intro\n{gallery.BEGIN}\n{gallery.END}\nrest\n"
    once = gallery.replace_block(readme, {"astar": "A-STAR row\n", "heads": "heads row\n"})
    assert once.index("heads row") < once.index("A-STAR row")  # in METHODS order
    twice = gallery.replace_block(once, {"astar": "new A-STAR row\n"})
    assert "heads row" in twice and "new A-STAR row" in twice and "\nA-STAR row" not in twice
    assert twice.startswith("intro\n") and twice.endswith(f"{gallery.END}\nrest\n")
    with pytest.raises(ValueError, match="README.md has no gallery block"):
        gallery.replace_block("no block", {})


def test_gallery_links_each_method_to_a_benchmarks_heading_that_exists():
    import gallery

    headings = {gallery.anchor(line.lstrip("#").strip()) for line in
                (SAMPLES.parent / "BENCHMARKS.md").read_text().splitlines() if line.startswith("#")}
    for name, (_, _, _, heading, _) in gallery.METHODS.items():
        assert gallery.anchor(heading) in headings, (name, heading)


def test_gallery_rows_show_the_exact_command_of_their_pictures():
    import gallery

    options = gallery.METHODS["story"][2]
    shown = gallery.row("story", [Path("story_seed0_grid.png")])
    assert shlex.split(shown.split("`")[1]) == ["python", "samples/story.py", *options]
    assert "(docs/gallery/story_seed0_grid.png)](samples/story.py)" in shown


def test_every_gallery_picture_and_script_the_readme_links_exists():
    readme = (SAMPLES.parent / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/gallery|samples)/[^)]+)\)", readme)
    assert any(link.startswith("docs/gallery/") for link in links)
    for link in links:
        assert (SAMPLES.parent / link).is_file(), link

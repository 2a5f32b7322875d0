"""The eval harness: scores from the detector, tables, files, and the same table under accelerate."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from attnsteer.pipelines.cli import main
from attnsteer.pipelines.evaluate import FONT, contact_sheet, evaluate, paired, paired_table, table
from launch import accelerate_cli


class DrawingPipeline:
    """Stands in for a diffusion pipeline: draws each prompt's objects at the generator's seed,
    dropping the second object when ``drop_second`` is set (a "method" that fails)."""

    device = "cpu"

    def __call__(self, prompt, generator, drop_second=False):
        from attnsteer.guidance.shapes import parse_caption
        from attnsteer.guidance.shapes.scene import draw_objects

        images = []
        for text, g in zip(prompt, generator):
            specs = parse_caption(text)[: 1 if drop_second else None]
            images.append(draw_objects(specs, int(g.initial_seed()))[0])
        return type("Output", (), {"images": images})


def test_rates_follow_the_images():
    prompts = ["a red circle and a blue square", "a green star and a yellow triangle"]
    result = evaluate(DrawingPipeline(), prompts, [0, 1, 2], {"right": {}, "half": {"drop_second": True}},
                      batch_size=4, keep_images=2)
    right, half = result["summary"]["right"], result["summary"]["half"]
    assert right["bound"]["k"] == 12 and right["binding"]["k"] == 6 and right["n_images"] == 6
    assert half["coverage"]["k"] == 6 and half["coverage"]["n"] == 12 and half["binding"]["k"] == 0
    assert [r["index"] for r in result["records"]] == list(range(6)) * 2
    assert len(result["images"]["half"]) == 2
    assert "| half | 6 | 0.500 [" in table(result["summary"])
    # paired on the same prompts and seeds: dropping the second object loses exactly half of
    # every image's objects, so the difference has no spread at all
    half_vs_right = result["paired"]["half"]
    assert list(result["paired"]) == ["half"]
    assert half_vs_right["bound"] == {"diff": -0.5, "low": -0.5, "high": -0.5, "n": 6, "groups": 2}
    assert half_vs_right["binding"]["diff"] == -1.0
    assert "| half | 6 | -0.500 [-0.500, -0.500] | -0.500 [" in paired_table(result["paired"], "right")
    assert paired(result["records"], "half")["right"]["coverage"]["diff"] == 0.5
    with pytest.raises(ValueError, match="reference method 'none' is not one of \\['right', 'half'\\]"):
        paired(result["records"], "none")


class DrawingVideoPipeline:
    """Draws each prompt's objects moving as named, 9 frames; ``still`` repeats the first frame (a
    "method" that does not move)."""

    device = "cpu"

    def __call__(self, prompt, generator, still=False):
        from attnsteer.guidance.shapes import draw_video_objects, parse_motion

        videos = []
        for text, g in zip(prompt, generator):
            frames = draw_video_objects(parse_motion(text), int(g.initial_seed()), frames=9)[0]
            videos.append([frames[0]] * 9 if still else frames)
        return type("Output", (), {"frames": videos})


def test_video_metrics_follow_the_videos():
    prompts = ["a red circle moving left", "a green star and a blue square moving up"]
    result = evaluate(DrawingVideoPipeline(), prompts, [0, 1], {"moving": {}, "still": {"still": True}},
                      batch_size=3, keep_images=1, video=True)
    moving, still = result["summary"]["moving"], result["summary"]["still"]
    assert moving["n_videos"] == 4 and moving["followed"]["k"] == 4 and moving["followed"]["n"] == 4
    assert still["followed"]["k"] == 0 and moving["identity"]["mean"] > 0.9 and still["identity"]["mean"] == 1.0
    assert still["flicker"]["mean"] == moving["flicker"]["mean"] == 0.0  # the drawn background never changes
    differences = result["paired"]["still"]
    assert differences["followed"]["diff"] == -1.0 and differences["followed"]["n"] == 4
    assert set(result["records"][0]["objects"][0]) == {"colour", "shape", "direction", "identity", "smooth", "followed"}
    strip = result["images"]["moving"][0]
    assert strip.size == (3 * 128 + 2 * 2, 128)  # first, middle and last frame, 64 px enlarged 2x
    assert "| still | 4 | " in table(result["summary"], ("followed",)) and "| still | 4 | -1.000 [" in paired_table(
        result["paired"], "moving", ("followed",))


def test_video_followed_is_paired_only_where_a_motion_is_named():
    prompts = ["a red circle", "a blue square moving down"]
    result = evaluate(DrawingVideoPipeline(), prompts, [0], {"moving": {}, "still": {"still": True}}, video=True)
    assert result["paired"]["still"]["followed"]["n"] == 1 and result["paired"]["still"]["coverage"]["n"] == 2
    none_named = evaluate(DrawingVideoPipeline(), ["a red circle"], [0], {"a": {}, "b": {}}, video=True)
    assert none_named["paired"]["b"]["followed"] is None and none_named["summary"]["a"]["followed"] is None
    assert "| b | 1 | " in paired_table(none_named["paired"], "a", ("coverage", "followed"))


def test_cli_eval_writes_table_json_and_contact_sheet(tmp_path, capsys):
    main(["eval", "--model", "tiny-sd", "--set", "two", "--limit", "2", "--seeds", "2", "--steps", "2",
          "--heads", "0:*", "--keep", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| baseline | 4 |" in out and "| heads | 4 |" in out and "| heads | 4 | " in out.split("| method - baseline |")[1]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["config"]["heads"] == "0:*" and len(saved["records"]) == 8 and list(saved["paired"]) == ["heads"]
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.height > 2 * 192 and sheet.width - 3 * 192 >= ImageDraw.Draw(sheet).textlength("baseline", font=FONT)


def test_two_accelerate_processes_give_the_same_images(tmp_path):
    """About 15-25 s: accelerate starts two processes, and each imports torch and diffusers (10 s)."""
    import torch

    args = ["eval", "--model", "tiny-sd", "--set", "two", "--limit", "2", "--seeds", "3", "--steps", "2",
            "--heads", "0:*", "--batch-size", "2", "--keep", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each accelerate process computes (OMP_NUM_THREADS=1)
    try:
        main([*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    accelerate_cli([*args, "--out", str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("one", "two"))
    assert (one["config"]["processes"], two["config"]["processes"]) == (1, 2)
    assert one["summary"] == two["summary"] and one["paired"] == two["paired"]
    assert one["records"] == two["records"]  # pixel means too: the same images, bit for bit


def test_contact_sheet_shows_whole_row_names():
    tile = Image.new("RGB", (32, 32), "gray")
    sheet = contact_sheet({"none": [tile], "transformer_blocks.0.attn:1": [tile]}, ["a red circle and a blue square"])
    margin = sheet.width - 192
    name_width = ImageDraw.Draw(sheet).textlength("transformer_blocks.0.attn:1", font=FONT)
    assert margin >= name_width
    second_row = np.asarray(sheet.convert("L"))[192:384, :margin]
    assert (second_row[:, int(name_width) - 10:margin] < 128).any()  # the name's end is drawn, not cut

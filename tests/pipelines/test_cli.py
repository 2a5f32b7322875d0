"""The attnsteer command line, run in-process on tiny random pipelines."""

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnsteer.pipelines.cli import main


def test_generate_writes_baseline_and_steered_pngs(tmp_path, capsys):
    main(["generate", "--model", "tiny-sd3", "--prompt", "a red circle", "--steps", "2", "--heads", "1:0,2",
          "--u", "0.5", "--baseline", "--out", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir() if "grid" not in p.name)
    assert written == ["seed0_baseline_0.png", "seed0_steered_0.png"]
    grid = Image.open(tmp_path / "seed0_grid.png")
    assert grid.width == 2 * 256 + 6 and grid.height > 256  # enlarged 8x, 6 px apart, labels above
    pixels = np.asarray(grid.convert("L"))
    assert (pixels[:grid.height - 256] < 128).any()  # the prompt and method labels are drawn
    baseline, steered = (Image.open(tmp_path / name) for name in written)
    assert baseline.size == (32, 32) and not np.array_equal(np.asarray(baseline), np.asarray(steered))
    captured = capsys.readouterr()
    assert str(tmp_path / "seed0_steered_0.png") in captured.out
    assert "2/2" in captured.err  # the pipeline's progress bar


def test_video_writes_frames_and_an_animated_gif(tmp_path):
    main(["video", "--model", "tiny-wan", "--prompt", "a cat", "--steps", "2", "--heads", "blocks.1.attn1:*",
          "--height", "16", "--width", "16", "--frames", "5", "--out", str(tmp_path)])
    frames = [f"seed0_steered_0_frame{f:04d}.png" for f in range(5)]  # the scheme of FIFO's long videos too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0_steered_0.gif", *frames, "seed0_steered_0_strip.png"]
    strip = Image.open(tmp_path / "seed0_steered_0_strip.png")
    assert strip.size == (5 * (128 + 2) - 2, 128)  # all 5 frames (of at most 6), each enlarged to 128 px
    gif = Image.open(tmp_path / "seed0_steered_0.gif")
    assert gif.n_frames == 5 and gif.size == (192, 192)  # 16 px enlarged 12x to be seen
    first = np.asarray(Image.open(tmp_path / frames[0]).convert("RGB"), dtype=float)
    assert np.abs(np.asarray(gif.convert("RGB"), dtype=float)[::12, ::12] - first).mean() < 8  # up to the GIF palette


def test_video_and_frames_need_a_video_model(tmp_path, capsys):
    assert "--model tiny-sd is an image model; `attnsteer video` needs a video model, e.g. shapes-wan" in refused(
        ["video", "--model", "tiny-sd", "--prompt", "x", "--out", str(tmp_path)], capsys)
    assert "--frames 5: tiny-sd is an image model; --frames is for video models" in refused(
        ["generate", "--model", "tiny-sd", "--prompt", "x", "--frames", "5", "--out", str(tmp_path)], capsys)
    assert "--model tiny-wan is a video model: add --video" in refused(["eval", "--model", "tiny-wan", "--limit", "1"], capsys)
    assert "--model tiny-sd is an image model: --video needs a video model, e.g. shapes-wan" in refused(
        ["eval", "--video", "--model", "tiny-sd", "--limit", "1"], capsys)
    assert "--set one-moving is not an image prompt set; allowed: one, two, three (the moving sets need --video)" in refused(
        ["eval", "--model", "tiny-sd", "--set", "one-moving"], capsys)
    assert "--set three is not a video prompt set; allowed: one, two, one-moving, two-moving" in refused(
        ["eval", "--video", "--model", "tiny-wan", "--set", "three"], capsys)


def test_eval_video_scores_videos(tmp_path, capsys):
    main(["eval", "--video", "--model", "tiny-wan", "--set", "one-moving", "--limit", "2", "--seeds", "1", "--steps", "1",
          "--frames", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| method | videos | coverage | bound | binding | identity | smooth | followed | flicker |" in out
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["config"]["video"] and len(saved["records"]) == 2 and saved["records"][0]["objects"][0]["direction"] == "left"
    assert (tmp_path / "contact_sheet.png").is_file()


def refused(argv, capsys) -> str:
    """The message ``attnsteer ARGV`` exits with (argparse's on stderr, or the command's own)."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    return str(exit.value) + capsys.readouterr().err


GENERATE = ["generate", "--model", "tiny-sd3", "--prompt", "x", "--heads", "0:0"]
# Each is refused on parse, before any model is loaded, with the flag and what is allowed.
ON_PARSE = [
    (["--steps", "0"], "argument --steps: 0 is not allowed: a whole number >= 1"),
    (["--steps", "2.5"], "argument --steps: '2.5' is not a whole number"),
    (["--height", "0"], "argument --height: 0 is not allowed: a whole number >= 1"),
    (["--guidance-scale", "nan"], "argument --guidance-scale: nan is not allowed: a finite number"),
    (["--scale", "inf"], "argument --scale: inf is not allowed: a finite number"),
    (["--scale", "true"], "argument --scale: 'true' is not a number"),
    (["--u", "2"], "argument --u: 2 is not allowed: a fraction in [0, 1]"),
    (["--mode", "both"], "argument --mode: invalid choice: 'both' (choose from 'joint', 'image')"),
    (["--seed", "-1"], "argument --seed: -1 is not allowed: a whole number >= 0"),
]


@pytest.mark.parametrize("option,message", ON_PARSE, ids=[m.split(":")[0] for _, m in ON_PARSE])
def test_bad_generate_options_are_refused_on_parse(tmp_path, capsys, option, message):
    assert message in refused([*GENERATE, "--out", str(tmp_path / "o"), *option], capsys)
    assert not (tmp_path / "o").exists()


EVAL = ["eval", "--model", "tiny-sd", "--steps", "1"]


@pytest.mark.parametrize("option,message", [
    (["--limit", "0"], "argument --limit: 0 is not allowed: a whole number >= 1"),
    (["--limit", "-1"], "argument --limit: -1 is not allowed: a whole number >= 1"),
    (["--seeds", "0"], "argument --seeds: 0 is not allowed: a whole number >= 1"),
    (["--batch-size", "0"], "argument --batch-size: 0 is not allowed: a whole number >= 1"),
    (["--keep", "-2"], "argument --keep: -2 is not allowed: a whole number >= 0"),
])
def test_bad_eval_options_are_refused_on_parse(capsys, option, message):
    assert message in refused([*EVAL, *option], capsys)


def test_api_errors_name_the_flags(tmp_path, capsys):
    message = refused([*GENERATE, "--out", str(tmp_path), "--window", "0.5", "0.2"], capsys)
    assert "attnsteer generate: --window (0.5, 0.2) must be (start, stop) fractions of the steps" in message
    assert not any(tmp_path.iterdir())
    message = refused([*GENERATE[:-2], "--heads", "transformer_blocks.4.attn:0", "--out", str(tmp_path)], capsys)
    assert "attnsteer generate: unknown layer 'transformer_blocks.4.attn'" in message


def test_mistyped_or_missing_model_is_named_without_a_hub_lookup(tmp_path, capsys):
    message = refused(["generate", "--model", "shapes-sdx", "--prompt", "x", "--out", str(tmp_path)], capsys)
    assert ("attnsteer generate: --model 'shapes-sdx' is neither a local folder nor a known name (shapes-sd, "
            "shapes-sd3, shapes-wan, tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux, tiny-wan, tiny-chroma, tiny-flux2, "
            "tiny-flux2dev, tiny-qwenimage, tiny-zimage, tiny-cogvideox, tiny-ltx, tiny-hunyuanvideo15), and not a hub id of the form org/name. "
            "Did you mean shapes-sd?") in message
    missing = str(tmp_path / "no-such-model")
    assert f"--model {missing!r} is neither a local folder nor a known name" in refused(
        ["layers", "--model", missing], capsys)
    assert "--model 'someone/no-such-model' is not a local folder nor a known name, and the hub id is not in the " \
           "local Hugging Face cache; HF_HUB_OFFLINE is set" in refused(["layers", "--model", "someone/no-such-model"], capsys)
    (tmp_path / "empty").mkdir()
    assert "the folder has no model_index.json, so it is not a diffusers pipeline" in refused(
        ["layers", "--model", str(tmp_path / "empty")], capsys)


def test_missing_files_and_bad_output_folders_are_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import attnsteer.pipelines.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    missing = str(tmp_path / "missing.txt")
    assert f"attnsteer eval: --prompts file {missing!r} does not exist" in refused([*EVAL, "--prompts", missing], capsys)
    assert f"head-set file {str(tmp_path / 'h.json')!r} does not exist" in refused(
        [*GENERATE[:-2], "--heads", str(tmp_path / "h.json"), "--out", str(tmp_path)], capsys)
    (tmp_path / "bad.json").write_text('{"heads": ["0:1"')
    assert f"head-set file {str(tmp_path / 'bad.json')!r} is not valid JSON" in refused(
        [*GENERATE[:-2], "--heads", str(tmp_path / "bad.json"), "--out", str(tmp_path)], capsys)
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file" / "sub")
    assert f"attnsteer generate: --out {out}: {tmp_path / 'file'} is a file, not a folder" in refused(
        [*GENERATE, "--out", out], capsys)
    if not torch_cuda():
        assert "--device cuda: no CUDA GPU is visible to torch here; use --device cpu" in refused(
            [*GENERATE, "--device", "cuda"], capsys)


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_help_shows_every_default_and_starts_without_torch():
    """About 10-15 s: whether the CLI starts without torch can only be seen in a fresh process, which then
    imports a pipeline class (torch and diffusers) to check that no third-party notice is printed."""
    import argparse
    import subprocess
    import sys

    from attnsteer.pipelines.cli import parser

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.required or isinstance(
                    action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            assert "default" in formatter._get_help_string(action), (name, action.option_strings)
    assert "prompt<TAB>seed" in commands["search-heads"].format_help()
    assert "TAB" not in commands["eval"].format_help()
    code = ("import sys; from attnsteer.pipelines.cli import parser; parser().format_help(); "
            "print('torch' in sys.modules, 'diffusers' in sys.modules); "
            "from attnsteer.pipelines import StableDiffusionSteerPipeline")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
    assert done.stderr == ""  # no third-party notices on import


def test_video_defaults_are_the_pipelines():
    """FIFO's options default to None (so that giving one without FIFO can be refused); the help states
    the pipeline's defaults, which the run uses."""
    import argparse

    from attnsteer.pipelines.cli import parser
    from attnsteer.pipelines.fifo import FIFO_PARTITIONS, OUROBOROS_GUIDANCE

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    helps = {a.dest: a.help for a in commands["video"]._actions}
    assert helps["ouroboros_guidance"].endswith(f"default {OUROBOROS_GUIDANCE:g})")
    assert helps["fifo_partitions"].endswith(f"(default {FIFO_PARTITIONS})")


def test_tiny_wan_runs_without_a_size(tmp_path, capsys):
    main(["generate", "--model", "tiny-wan", "--prompt", "a cat", "--steps", "1", "--frames", "5", "--out", str(tmp_path)])
    assert Image.open(tmp_path / "seed0_output_0_frame0000.png").size == (32, 32)
    main(["layers", "--model", "tiny-wan", "--layout"])
    assert "grid (3, 4, 4)" in capsys.readouterr().out  # 9 frames (the default) -> 3 latent frames


def test_unknown_tiny_model_is_named():
    with pytest.raises(SystemExit, match="unknown tiny model 'tiny-sd4'; choose one of tiny-sd, "):
        main(["layers", "--model", "tiny-sd4"])


def test_layers_lists_names_heads_and_layouts(capsys):
    main(["layers", "--model", "tiny-flux", "--layout", "--height", "32", "--width", "32"])
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "single_transformer_blocks.0.attn" in line).split()
    assert row[:4] == ["2", "single_transformer_blocks.0.attn", "joint", "2"]
    assert "grid (8, 8)" in lines[-1]


def test_generate_and_eval_with_astar(tmp_path, capsys):
    main(["generate", "--model", "tiny-sd", "--prompt", "a red circle and a blue square", "--steps", "2",
          "--astar", "circle,square", "--astar-scale", "5", "--baseline", "--out", str(tmp_path)])
    baseline, steered = (np.asarray(Image.open(tmp_path / f"seed0_{n}_0.png")) for n in ("baseline", "steered"))
    assert not np.array_equal(baseline, steered)
    main(["eval", "--model", "tiny-sd", "--set", "two", "--limit", "1", "--seeds", "1", "--steps", "2",
          "--astar", "nouns", "--heads", "0:*", "--keep", "0", "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "| heads+astar | 1 |" in out and "| method - baseline |" in out
    assert "(n = 1: no interval)" in out and "nan" not in out
    config = json.loads((tmp_path / "eval" / "eval.json").read_text())["config"]
    assert {k: config[k] for k in ("steps", "guidance_scale", "scale", "u", "mode")} == dict(
        steps=2, guidance_scale=7.5, scale=5.0, u=1.0, mode="joint")  # the values used, not the unset options


def test_astar_words_are_checked_before_any_picture(tmp_path, capsys):
    message = refused(["generate", "--model", "tiny-sd", "--prompt", "a red circle and a blue square", "--steps", "2",
                       "--astar", "circle,dog", "--baseline", "--out", str(tmp_path)], capsys)
    assert "attnsteer generate: --astar: word 'dog' is not in the prompt 'a red circle and a blue square'" in message
    assert not any(tmp_path.iterdir())
    assert "argument --astar-scale: -1 is not allowed: a finite number >= 0" in refused(
        ["generate", "--model", "tiny-sd", "--prompt", "x", "--astar", "x", "--astar-scale", "-1"], capsys)


def test_maps_draws_each_word_over_the_picture(tmp_path, capsys):
    main(["maps", "--model", "tiny-sd", "--prompt", "a red circle and a blue square", "--words", "circle,blue square",
          "--steps", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "maps of circle, blue square at grid (16, 16), averaged over" in out
    picture = Image.open(tmp_path / "seed0_maps.png")
    assert picture.width == 3 * Image.open(tmp_path / "seed0_image.png").width * 6  # image + 2 maps, enlarged 6x


def test_story_writes_references_scenes_and_the_independent_scenes(tmp_path, capsys):
    main(["story", "--model", "tiny-sd", "--subject", "a red circle", "--subject", "a blue square",
          "--scene", "a red circle and a blue square", "--steps", "2", "--baseline", "--out", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["seed0_reference0.png", "seed0_reference1.png", "seed0_scene0.png", "seed0_scene0_independent.png",
                       "seed0_story.png"]
    assert Image.open(tmp_path / "seed0_story.png").width == 4 * 256 + 3 * 6
    main(["story", "--model", "tiny-sd", "--subject", "a red circle", "--subject", "a blue square",
          "--scene", "a red circle and a blue square", "--steps", "2", "--mutual", "0", "--out", str(tmp_path / "m")])
    scene = lambda folder: np.asarray(Image.open(folder / "seed0_scene0.png"))
    assert not np.array_equal(scene(tmp_path), scene(tmp_path / "m"))  # --mutual reaches the pipeline
    assert "argument --mutual: 1.5 is not allowed: a fraction in [0, 1]" in refused(
        ["story", "--subject", "a", "--scene", "a", "--mutual", "1.5"], capsys)
    assert "the word 'green star' of subject 1 is not in scene 0" in refused(
        ["story", "--model", "tiny-sd", "--subject", "a red circle", "--subject", "a green star",
         "--scene", "a red circle and a blue square", "--out", str(tmp_path)], capsys)


def test_story_with_detector_masks_reuses_the_first_pass_as_the_independent_scenes(tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    calls, parent = [], StableDiffusionPipeline.__call__

    @functools.wraps(parent)  # the steer pipeline reads the parent's signature
    def counted(self, *args, **kwargs):
        calls.append((self, dict(kwargs)))
        return parent(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted)
    main(["story", "--model", "tiny-sd", "--subject", "a red circle", "--subject", "a blue square", "--masks", "detector",
          "--scene", "a red circle and a blue square", "--steps", "2", "--baseline", "--out", str(tmp_path)])
    rows = ["a red circle", "a blue square", "a red circle and a blue square"]
    assert [k["prompt"] for _, k in calls] == [rows, rows]  # the first pass and the IR pass: no third for the baseline
    pipe, first = calls[0]
    alone = parent(pipe, **{**first, "prompt": rows[2:], "generator": [torch.Generator().manual_seed(2)]}).images[0]
    independent = np.asarray(Image.open(tmp_path / "seed0_scene0_independent.png"), dtype=int)
    assert np.abs(independent - np.asarray(alone, dtype=int)).max() <= 1  # the scene drawn alone at its seed
    assert "--masks detector: segment_subjects: the subjects ['a red circle', 'a red square'] must differ in colour" in refused(
        ["story", "--model", "tiny-sd", "--subject", "a red circle", "--subject", "a red square", "--masks", "detector",
         "--scene", "a red circle and a red square", "--out", str(tmp_path)], capsys)


def test_video_with_block_sparse_attention(tmp_path, capsys):
    main(["video", "--model", "tiny-wan", "--prompt", "a cat", "--steps", "2", "--sparsity", "0.5",
          "--sparse-pool", "2", "2", "--sparse-backend", "gather", "--sparse-dense-steps", "0", "--baseline",
          "--height", "32", "--width", "32", "--frames", "5", "--out", str(tmp_path)])
    baseline, sparse = (np.asarray(Image.open(tmp_path / f"seed0_{name}_0_frame0004.png")) for name in ("baseline", "steered"))
    assert not np.array_equal(baseline, sparse)
    message = refused(["video", "--model", "tiny-wan", "--prompt", "a cat", "--sparsity", "0.5", "--sparse-pool", "8", "16",
                       "--height", "32", "--width", "32", "--frames", "5", "--out", str(tmp_path / "o")], capsys)
    assert "attnsteer video: --sparse-pool (8, 16) must be (rows, columns) of tokens that fit in the call's 4 x 4" in message
    assert "argument --sparsity: 1 is not allowed: a fraction in [0, 1)" in refused(
        ["video", "--model", "tiny-wan", "--prompt", "a", "--sparsity", "1"], capsys)


def test_video_beyond_the_models_clip_runs_fifo_and_streams_frames(tmp_path, capsys):
    main(["video", "--model", "tiny-wan", "--prompt", "a cat", "--steps", "2", "--frames", "13", "--fifo-partitions", "1",
          "--height", "32", "--width", "32", "--baseline", "--out", str(tmp_path)])
    for name in ("baseline", "fifo"):
        assert sorted(p.name for p in tmp_path.glob(f"seed0_{name}_0_frame*.png")) == [
            f"seed0_{name}_0_frame{f:04d}.png" for f in range(13)]
        assert Image.open(tmp_path / f"seed0_{name}_0.gif").n_frames == 13
    assert "--frames 12 must be 1 + 4k frames" in refused(
        ["video", "--model", "tiny-wan", "--prompt", "a", "--frames", "12", "--height", "32", "--width", "32"], capsys)
    assert "does not combine with heads" in refused(
        ["video", "--model", "tiny-wan", "--prompt", "a", "--frames", "13", "--heads", "0:0"], capsys)


def test_video_runs_ouroboros_on_fifo_and_refuses_its_options_without_fifo(tmp_path, capsys):
    main(["video", "--model", "tiny-wan", "--prompt", "a cat", "--steps", "2", "--frames", "13", "--fifo-partitions", "2",
          "--height", "32", "--width", "32", "--ouroboros-tail", "--ouroboros-subjects", "cat", "--out", str(tmp_path)])
    assert Image.open(tmp_path / "seed0_fifo_0.gif").n_frames == 13
    bad = ["video", "--model", "tiny-wan", "--prompt", "a cat", "--frames", "13", "--height", "32", "--width", "32",
           "--baseline", "--ouroboros-subjects", "dog", "--out", str(tmp_path / "bad")]
    assert "word 'dog' is not in the prompt 'a cat'" in refused(bad, capsys)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())  # refused before the baseline ran
    assert "--ouroboros-tail acts on FIFO-Diffusion, which runs for --frames longer than the model's clip of 9" in refused(
        ["video", "--model", "tiny-wan", "--prompt", "a cat", "--frames", "5", "--ouroboros-tail"], capsys)


IMAGE = ["generate", "--model", "tiny-sd", "--prompt", "a red circle and a blue square"]
VIDEO = ["video", "--model", "tiny-wan", "--prompt", "a red circle", "--frames", "5"]
# What a new user tries: each refused before the model loads, naming the option and what it needs.
BEFORE_LOADING = [
    (IMAGE + ["--scale", "3"], "--scale acts only with --heads, which is not given"),
    (IMAGE + ["--u", "0.5"], "--u acts only with --heads"),
    (IMAGE + ["--window", "0", "0.5"], "--window acts only with --heads"),
    (IMAGE + ["--batching", "sequential"], "--batching acts only with --heads"),
    (IMAGE + ["--astar-scale", "5"], "--astar-scale acts only with --astar, which is not given"),
    (IMAGE + ["--astar-checkpointing"], "--astar-checkpointing acts only with --astar"),
    (VIDEO + ["--sparse-pool", "2", "2"], "--sparse-pool acts only with --sparsity or --sparse-mask radial|tile"),
    (VIDEO + ["--sparse-dense-steps", "1"], "--sparse-dense-steps acts only with --sparsity"),
    (VIDEO + ["--sparse-backend", "gather"], "--sparse-backend acts only with --sparsity"),
    (VIDEO + ["--frames", "13", "--no-cross-frame"], "--no-cross-frame acts only with --ouroboros-subjects"),
    (VIDEO + ["--frames", "13", "--ouroboros-guidance", "0.2"], "--ouroboros-guidance acts only with --ouroboros-subjects"),
    (["story", "--model", "tiny-sd", "--subject", "a red circle", "--scene", "a red circle", "--u", "1"],
     "--u acts only with --heads"),
    (["story", "--model", "tiny-sd", "--subject", "a red circle", "--scene", "a red circle", "--no-read", "--mutual",
      "0.5"], "--mutual does nothing with --no-read: --no-read turns reading off, mutual cross-attention included"),
    (["story", "--model", "tiny-sd", "--subject", "a red circle", "--scene", "a red circle", "--no-read",
      "--no-reposition"], "--no-reposition does nothing with --no-read"),
    (["search-heads", "--model", "tiny-sd", "--screen-steps", "1"], "--screen-steps acts only with --halving-keep"),
    (IMAGE + ["--heads", ""], "argument --heads: an empty head spec"),
    (IMAGE + ["--astar", ""], "argument --astar: '' is not a comma list of words (an empty word)"),
    (IMAGE + ["--astar", ","], "argument --astar: ',' is not a comma list of words (an empty word)"),
    (IMAGE + ["--astar", "circle,circle"], "argument --astar: 'circle,circle' gives 'circle' twice"),
    (["maps", "--model", "tiny-sd", "--prompt", "a red circle", "--words", ""], "argument --words: '' is not a comma list"),
    (["maps", "--model", "tiny-sd", "--prompt", "a red circle", "--words", ","], "argument --words: ',' is not a comma list"),
    (IMAGE + ["--device", "gpu"], "--device 'gpu' is not a torch device: use cpu, cuda or cuda:N"),
    (IMAGE + ["--out", "/proc/attnsteer/out"], "--out /proc/attnsteer/out: cannot be created or written ("),
    (["eval", "--model", "tiny-sd", "--prompts", "PROMPTS"], "prompt 'a photo of a cat' names no shapes object"),
    (["search-heads", "--model", "tiny-sd", "--prompts", "PROMPTS"], "prompt 'a photo of a cat' names no shapes object"),
]


@pytest.mark.parametrize("argv,message", BEFORE_LOADING, ids=[m.split(",")[0][:40] for _, m in BEFORE_LOADING])
def test_options_that_cannot_act_and_degenerate_values_are_refused_before_loading(argv, message, tmp_path, capsys,
                                                                                  monkeypatch):
    import attnsteer.pipelines.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "prompts.txt").write_text("a red circle\na photo of a cat\n")
    argv = [str(tmp_path / "prompts.txt") if a == "PROMPTS" else a for a in argv]
    assert message in refused([*argv, "--out", str(tmp_path / "o")] if "--out" not in argv else argv, capsys)


# Refused after the model loads (what they need depends on it), before any picture is made.
AFTER_LOADING = [
    (IMAGE + ["--baseline"], "--baseline draws the unsteered output beside a steered one: give a method too"),
    (VIDEO + ["--fifo-partitions", "2"], "--fifo-partitions acts on FIFO-Diffusion, which runs for --frames longer "
                                         "than the model's clip of 9"),
    (VIDEO + ["--no-lookahead"], "--no-lookahead acts on FIFO-Diffusion"),
    (VIDEO + ["--frames", "13", "--ouroboros-subjects", "circle", "--fifo-partitions", "1"],
     "--ouroboros-subjects needs --fifo-partitions >= 2, got 1"),
    (VIDEO + ["--frames", "13", "--ouroboros-subjects", "circle", "circle"], "gives 'circle' twice"),
    (IMAGE + ["--negative-prompt", "blue", "--guidance-scale", "1"],
     "--negative-prompt acts through CFG, which is off at --guidance-scale 1; give a scale above 1"),
    (["generate", "--model", "tiny-flux", "--prompt", "a red circle", "--negative-prompt", "blue"],
     "--negative-prompt needs true CFG on FLUX"),
    (["generate", "--model", "tiny-flux2", "--prompt", "a red circle", "--negative-prompt", "blue"],
     "--negative-prompt: Flux2KleinPipeline takes no negative prompt"),
    (["story", "--model", "tiny-sd", "--subject", "a red circle", "--subject", "a red circle", "--scene", "a red circle"],
     "--subject gives 'a red circle' twice"),
]


@pytest.mark.parametrize("argv,message", AFTER_LOADING, ids=[m.split(":")[0][:40] for _, m in AFTER_LOADING])
def test_options_that_cannot_act_on_the_model_are_refused_before_compute(argv, message, tmp_path, capsys):
    assert message in refused([*argv, "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("kind", ["qwenimage", "flux2"])
def test_generate_with_astar_on_the_chat_template_families(kind, tmp_path):
    """Qwen-Image and FLUX.2 Klein (no negative prompt argument) from the command line, steered by their words."""
    main(["generate", "--model", f"tiny-{kind}", "--prompt", "a red circle and a blue square", "--astar", "circle,square",
          "--steps", "2", "--baseline", "--out", str(tmp_path)])
    baseline, steered = (np.asarray(Image.open(tmp_path / f"seed0_{n}_0.png"), np.int16) for n in ("baseline", "steered"))
    assert baseline.shape == (32, 32, 3) and np.abs(baseline - steered).max() > 0


def test_edit_draws_over_a_picture_with_and_without_a_mask(tmp_path, capsys):
    main(["generate", "--model", "tiny-sd", "--prompt", "a red circle", "--steps", "2", "--out", str(tmp_path)])
    picture = tmp_path / "seed0_output_0.png"
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8)).save(mask)
    edit = ["edit", "--model", "tiny-sd", "--image", str(picture), "--prompt", "a red circle", "--steps", "3",
            "--heads", "mid_block.attentions.0.transformer_blocks.0.attn1:*", "--baseline"]
    main([*edit, "--strength", "0.7", "--out", str(tmp_path / "img2img")])
    main([*edit, "--mask", str(mask), "--out", str(tmp_path / "inpaint")])
    for task in ("img2img", "inpaint"):
        baseline, steered = (np.asarray(Image.open(tmp_path / task / f"seed0_{n}_0.png"), np.int16)
                             for n in ("baseline", "steered"))
        assert baseline.shape == (32, 32, 3) and np.abs(baseline - steered).max() > 0
    inpainted = np.asarray(Image.open(tmp_path / "inpaint" / "seed0_baseline_0.png"), np.int16)
    kept = np.asarray(Image.open(picture), np.int16)
    outside = np.pad(np.zeros((16, 16), bool), 8, constant_values=True)
    assert np.abs(inpainted - kept)[outside].mean() < np.abs(inpainted - kept)[~outside].mean()  # redrawn in the mask
    assert f"--mask {str(tmp_path / 'none.png')!r} does not exist" in refused(
        [*edit, "--mask", str(tmp_path / "none.png"), "--out", str(tmp_path / "o")], capsys)
    assert "--height and --width: `attnsteer edit` draws at the size of --image" in refused(
        [*edit, "--height", "64", "--out", str(tmp_path / "o")], capsys)
    assert "argument --strength: 0 is not allowed: a fraction in (0, 1]" in refused([*edit, "--strength", "0"], capsys)


def test_edit_with_a_controlnet_follows_the_control_picture(tmp_path, capsys):
    """--control with --controlnet runs the family's ControlNet img2img (or inpainting) pipeline with that
    ControlNet: another control picture gives another edit."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from attnsteer.pipelines.tiny import editing_parts, tiny_components

    editing_parts(StableDiffusionControlNetImg2ImgPipeline, tiny_components("sd"))["controlnet"].save_pretrained(tmp_path / "cn")
    picture, left, right = (tmp_path / f"{n}.png" for n in ("picture", "left", "right"))
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(picture)
    Image.fromarray(np.pad(np.full((32, 16, 3), 255, np.uint8), ((0, 0), (0, 16), (0, 0)))).save(left)
    Image.fromarray(np.pad(np.full((32, 16, 3), 255, np.uint8), ((0, 0), (16, 0), (0, 0)))).save(right)
    edit = ["edit", "--model", "tiny-sd", "--image", str(picture), "--prompt", "a red circle", "--steps", "2",
            "--controlnet", str(tmp_path / "cn")]
    outs = []
    for control in (left, right):
        main([*edit, "--control", str(control), "--out", str(tmp_path / control.stem)])
        outs.append(np.asarray(Image.open(tmp_path / control.stem / "seed0_output_0.png"), np.int16))
    assert outs[0].shape == (32, 32, 3) and np.abs(outs[0] - outs[1]).max() > 0
    assert "--control and --controlnet go together" in refused(edit, capsys)
    assert "--controlnet 'nowhere' is neither a ControlNet folder nor a hub id" in refused(
        [*edit[:-1], "nowhere", "--control", str(left)], capsys)
    assert "has no ControlNet img2img pipeline in diffusers" in refused(
        ["edit", "--model", "tiny-sd3", "--image", str(picture), "--prompt", "a circle", "--controlnet",
         str(tmp_path / "cn"), "--control", str(left), "--out", str(tmp_path / "o")], capsys)


def test_video_frames_are_the_frames_out_with_a_per_frame_vae(tmp_path, monkeypatch):
    """With a VAE of temporal factor 1, WanPipeline makes num_frames + 1 frames: --frames N still gives N,
    by the model's clip (5 here: its call default num_frames 4) directly, beyond it by FIFO."""
    import attnsteer.pipelines.cli as cli
    from attnsteer.pipelines.steer import WanSteerPipeline
    from test_fifo_pipeline import per_frame_vae_pipeline

    pipe = WanSteerPipeline(**per_frame_vae_pipeline().components)
    pipe.call_defaults = {"num_frames": 4, "height": 32, "width": 32}
    monkeypatch.setattr(cli, "load_pipeline", lambda *a: (pipe, True))
    for frames, runs in ((5, "output"), (3, "output"), (9, "fifo")):
        out = tmp_path / str(frames)
        fifo = ["--fifo-partitions", "2"] if runs == "fifo" else []
        main(["video", "--model", "tiny-wan", "--prompt", "a cat", "--steps", "1", "--frames", str(frames), *fifo,
              "--out", str(out)])
        assert len(list(out.glob(f"seed0_{runs}_0_frame*.png"))) == frames


@pytest.mark.parametrize("kind,layer,layout", [
    # FLUX-like: 512 T5 tokens (Chroma's default length), then 32 px / VAE 2 / patches 2 = 8 x 8 image tokens
    ("chroma", "single_transformer_blocks.1.attn", "image 512:576 grid (8, 8) text 0:512"),
    # 5 frames, VAE 4x in time (1 + 4 / 4 = 2 latent frames) and 2x in space, patches 2: 2 x 8 x 8 after 226 text tokens
    ("cogvideox", "transformer_blocks.1.attn1", "image 226:354 grid (2, 8, 8) text 0:226"),
    # 5 frames, VAE 2x in time (3 latent frames) and 4x in space, patches 1: 3 x 8 x 8, text only as cross-attention keys
    ("ltx", "transformer_blocks.1.attn1", "image 0:192 grid (3, 8, 8) text none"),
    # 32 px / VAE 2 / patches 2 = 8 x 8 image tokens first, then the caption's tokens padded to a multiple of 32
    ("zimage", "layers.1.attention", "image 0:64 grid (8, 8) text 64:96"),
])
def test_layers_lists_the_newer_families_with_their_layouts(kind, layer, layout, capsys):
    main(["layers", "--model", f"tiny-{kind}", "--layout"])
    row = next(line for line in capsys.readouterr().out.splitlines() if f" {layer} " in line)
    assert layout in row


def test_video_on_a_newer_video_family_counts_its_own_frames(tmp_path, capsys):
    """CogVideoX's num_frames is passed as given (1 + 4k; WanPipeline's rounding does not apply) and every
    frame the pipeline makes is written; FIFO-Diffusion is Wan's only."""
    from attnsteer.pipelines.tiny import tiny_pipeline

    main(["video", "--model", "tiny-cogvideox", "--prompt", "a red circle", "--steps", "1", "--frames", "5",
          "--heads", "transformer_blocks.1.attn1:0", "--out", str(tmp_path)])
    # the tiny VAE upsamples time once (2 latent frames -> 4), unlike its configured factor 4
    made = tiny_pipeline("cogvideox")("a red circle", num_frames=5, num_inference_steps=1, height=32, width=32,
                                      output_type="np").frames.shape[1]
    assert len(list(tmp_path.glob("seed0_steered_0_frame*.png"))) == made == 4
    assert "--frames 6 must be 1 + 4k frames" in refused(
        ["video", "--model", "tiny-cogvideox", "--prompt", "a", "--frames", "6", "--out", str(tmp_path / "o")], capsys)
    assert "--fifo-partitions acts on FIFO-Diffusion, which runs on Wan pipelines, not on CogVideoXPipeline" in refused(
        ["video", "--model", "tiny-cogvideox", "--prompt", "a", "--frames", "9", "--fifo-partitions", "2",
         "--out", str(tmp_path / "o")], capsys)


def test_a_folder_of_a_pipeline_attnsteer_cannot_steer_is_refused_by_its_denoiser(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline", "_diffusers_version": "0.42.1"}))
    message = refused(["layers", "--model", str(tmp_path)], capsys)
    assert (f"--model {tmp_path}: pipeline class SanaPipeline cannot be steered: SanaPipeline's denoiser "
            "SanaTransformer2DModel is not supported") in message


def test_video_from_an_image_on_an_image_to_video_model(tmp_path, capsys, monkeypatch):
    """--image reaches an image-to-video pipeline's call (here Wan 2.2 TI2V's first-frame conditioning):
    the frames written are the pipeline's own for that image and seed; a text-to-video model refuses it."""
    from types import SimpleNamespace

    from diffusers import WanImageToVideoPipeline
    from diffusers.pipelines.wan import pipeline_wan_i2v

    import attnsteer.pipelines.cli as cli
    from attnsteer.pipelines import steer_pipeline
    from attnsteer.pipelines.tiny import tiny_components

    monkeypatch.setattr(pipeline_wan_i2v, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)  # not installed here
    pipe = steer_pipeline(WanImageToVideoPipeline)(**tiny_components("wan"), image_encoder=None, image_processor=None,
                                                   expand_timesteps=True)
    pipe.call_defaults = {"height": 32, "width": 32}
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: (pipe, True))
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[8:24, 8:24] = (220, 30, 30)
    Image.fromarray(picture).save(tmp_path / "first.png")
    video = ["video", "--model", "tiny-wan", "--prompt", "a red square", "--steps", "2", "--frames", "5"]
    main([*video, "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "i2v")])
    direct = pipe(image=Image.fromarray(picture), prompt="a red square", num_inference_steps=2, num_frames=5, height=32,
                  width=32, generator=torch.Generator().manual_seed(0), output_type="pil").frames[0]
    other = pipe(image=Image.fromarray(255 - picture), prompt="a red square", num_inference_steps=2, num_frames=5,
                 height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="pil").frames[0]
    written = [np.asarray(Image.open(tmp_path / "i2v" / f"seed0_output_0_frame{k:04d}.png")) for k in range(5)]
    assert all(np.array_equal(w, np.asarray(d)) for w, d in zip(written, direct))
    assert not np.array_equal(written[0], np.asarray(other[0]))  # the picture shapes the video
    monkeypatch.undo()
    assert "--image: --model tiny-wan (WanPipeline) is a text-to-video model" in refused(
        [*video, "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "o")], capsys)

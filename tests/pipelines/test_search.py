"""The head search on real (tiny) pipelines: per-prompt head sets, the command, its journal, accelerate."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attnsteer.pipelines import StableDiffusion3SteerPipeline
from attnsteer.pipelines.cli import main
from attnsteer.pipelines.tiny import tiny_pipeline
from launch import accelerate_cli

OBJECTIVE = f"{Path(__file__).with_name('redness.py')}:redness"
A = ["transformer_blocks.0.attn:1", "transformer_blocks.1.attn:0"]
B = ["transformer_blocks.1.attn:2"]


@pytest.fixture(scope="module")
def sd3():
    return tiny_pipeline("sd3", StableDiffusion3SteerPipeline)


def images(pipe, prompts, seeds, **kwargs):
    """The pipeline's images; with heads, perturbed at w 2 and u 0.7 (without heads those options are refused)."""
    heads = kwargs.get("perturbed_heads") is not None or kwargs.get("perturbed_heads_per_prompt") is not None
    perturbation = dict(perturbation_scale=2.0, softpag_u=0.7) if heads else {}
    if not heads:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("perturb")}
    out = pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=3,
               output_type="np", **perturbation, **kwargs)
    return out.images


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("batching", ["batched", "sequential"])
def test_a_head_set_per_prompt_equals_separate_calls(sd3, cfg, batching):
    prompts = ["a red circle", "a blue square", "a green star"]
    together = images(sd3, prompts, [0, 1, 2], perturbed_heads_per_prompt=[A, B, None], guidance_scale=cfg,
                      perturbation_batching=batching)
    alone = [images(sd3, [p], [s], perturbed_heads=h, guidance_scale=cfg, perturbation_batching=batching)[0]
             for p, s, h in zip(prompts, [0, 1, 2], [A, B, None])]
    np.testing.assert_allclose(together, np.stack(alone), atol=2e-5)
    assert np.abs(together[0] - images(sd3, prompts[:1], [0], guidance_scale=cfg)[0]).max() > 1e-3


def test_per_prompt_head_sets_are_checked_before_compute(sd3):
    with pytest.raises(ValueError, match=r"one head spec per prompt \(2 prompts\)"):
        images(sd3, ["a red circle", "a blue square"], [0, 1], perturbed_heads_per_prompt=[A])
    with pytest.raises(ValueError, match="not both"):
        images(sd3, ["a red circle"], [0], perturbed_heads=A, perturbed_heads_per_prompt=[B])
    with pytest.raises(ValueError, match="head 9 of layer 'transformer_blocks.1.attn' is out of range"):
        images(sd3, ["a red circle"], [0], perturbed_heads_per_prompt=[["transformer_blocks.1.attn:9"]])


SEARCH = ["search-heads", "--model", "tiny-sd3", "--device", "cpu", "--set", "two", "--limit", "2", "--seeds", "2",
          "--rounds", "2", "--top-k", "2", "--steps", "2", "--batch-size", "4", "--objective", OBJECTIVE]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """The folder of one SEARCH run in this process, on one thread as the killed run's subprocess, so
    that every test compares with the same scores; shared by the tests that need a clean run."""
    out, threads = tmp_path_factory.mktemp("search"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*SEARCH, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out


def test_search_writes_a_head_set_the_pipeline_takes_as_it_is(sd3, searched, tmp_path, capsys):
    for name in ("journal.jsonl", "heads.json", "contact_sheet.png"):
        (tmp_path / name).write_bytes((searched / name).read_bytes())
    saved = json.loads((tmp_path / "heads.json").read_text())
    assert len(saved["heads"]) == 4 and saved["w"] == 3.0 and saved["u"] == 1.0 and saved["mode"] == "joint"
    assert saved["model"] == "tiny-sd3" and saved["objective"] == OBJECTIVE
    assert [len(r["scores"]) for r in saved["rounds"]] == [8, 6]
    assert saved["search"]["image_steps"] == (1 + 8 + 6) * 4 * 2
    # the model's call defaults (a tiny model's size) and the CFG; options left unset stay out of the journal
    assert saved["search"]["call"] == {"height": 32, "width": 32, "guidance_scale": 1.0}
    assert (tmp_path / "contact_sheet.png").exists()
    from_file = images(sd3, ["a red circle"], [0], perturbed_heads=str(tmp_path / "heads.json"))
    explicit = images(sd3, ["a red circle"], [0], perturbed_heads=saved["heads"], perturbation_mode="joint")
    np.testing.assert_array_equal(from_file, explicit)
    capsys.readouterr()
    main([*SEARCH, "--out", str(tmp_path)])  # the same command again: all from the journal
    out = capsys.readouterr().out
    assert f"{(1 + 8 + 6) * 4 * 2} image-steps (0 computed now)" in out
    gain = saved["rounds"][1]["gain"]
    assert gain["diff"] == pytest.approx(saved["rounds"][1]["score"] - saved["baseline_score"]) and gain["n"] == 4
    assert f"{gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}] over no heads, paired" in out
    with pytest.raises(SystemExit, match=r"other settings \(w: journal 3.0, now 5.0\)"):
        main([*SEARCH, "--out", str(tmp_path), "--scale", "5"])
    with pytest.raises(SystemExit, match=r"other settings \(dtype: journal 'float32', now 'bfloat16'\)"):
        main([*SEARCH, "--out", str(tmp_path), "--dtype", "bfloat16"])
    assert (saved["search"]["dtype"], saved["search"]["device"]) == ("float32", "cpu")
    # the resumed run computed nothing: its time is the first run's, read from the journal
    assert json.loads((tmp_path / "heads.json").read_text())["search"]["wall_s"] == saved["search"]["wall_s"] > 0


def cli(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "attnsteer.pipelines.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


def test_sigkilled_search_rerun_ends_with_the_same_head_set(searched, tmp_path):
    """Killed in a subprocess (only a real process can be killed mid-write; its import of torch and
    diffusers makes this test 10-17 s); resumed in this one, on one thread as the subprocess."""
    journal = tmp_path / "killed" / "journal.jsonl"
    proc = cli([*SEARCH, "--out", str(tmp_path / "killed")])
    while not journal.exists() or len(journal.read_text().splitlines()) < 6:
        assert proc.poll() is None, "the search ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*SEARCH, "--out", str(tmp_path / "killed")])
    finally:
        torch.set_num_threads(threads)
    clean, resumed = (json.loads((d / "heads.json").read_text()) for d in (searched, tmp_path / "killed"))
    assert resumed["heads"] == clean["heads"] and resumed["rounds"] == clean["rounds"]
    assert 0 < resumed["search"]["computed_image_steps"] < clean["search"]["computed_image_steps"]


def test_two_accelerate_processes_find_the_same_heads(searched, tmp_path):
    """About 15-25 s: accelerate starts two processes, and each imports torch and diffusers (10 s)."""
    accelerate_cli([*SEARCH, "--out", str(tmp_path / "two")])
    one, two = (json.loads((d / "heads.json").read_text()) for d in (searched, tmp_path / "two"))
    assert one["heads"] == two["heads"] and two["search"]["processes"] == 2
    for r1, r2 in zip(one["rounds"], two["rounds"]):
        assert r1["selected"] == r2["selected"]
        np.testing.assert_allclose(list(r1["scores"].values()), list(r2["scores"].values()), atol=1e-3)
    journal = (tmp_path / "two" / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 1 + 4 + 3  # header, baseline, ceil(8/2) + ceil(6/2) chunks of 2 candidates


def test_items_take_fixed_seeds_from_tab_separated_lines():
    from attnsteer.pipelines.search import read_items

    assert read_items(["a red circle\t7", "a blue square"], 2) == [
        ("a red circle", 7), ("a blue square", 0), ("a blue square", 1)]


def test_halving_settings_are_checked_before_any_compute(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"successive halving needs a cheaper screen: set screen items below the "
                                         r"4 items or screen steps below 2"):
        main([*SEARCH, "--out", str(tmp_path), "--halving-keep", "0.5"])
    with pytest.raises(SystemExit):
        main([*SEARCH, "--out", str(tmp_path), "--halving-keep", "1", "--screen-steps", "1"])
    assert "argument --halving-keep: 1 is not allowed: 0 (off) or a fraction in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "heads.json").exists()


TINY_SEARCH = ["search-heads", "--model", "tiny-sd3", "--device", "cpu", "--limit", "1", "--seeds", "1", "--steps", "1",
               "--layers", "0"]


@pytest.mark.parametrize("body,message", [
    ("return [float('nan')] * len(images)", r"objective '.*:score' returned 1 non-finite score\(s\) \(nan\) for 1 images"),
    ("return []", r"objective '.*:score' returned 0 scores for 1 images; it must return one number per image"),
    ("raise KeyError('colour')", r"objective '.*:score' raised KeyError: 'colour'"),
    ("return ['high']", r"objective '.*:score' returned a score that is not a number: \['high'\]"),
])
def test_a_broken_objective_is_named_and_nothing_is_written(tmp_path, body, message):
    (tmp_path / "objective.py").write_text(f"def score(images, prompts):\n    {body}\n")
    with pytest.raises(SystemExit, match=message):
        main([*TINY_SEARCH, "--objective", f"{tmp_path / 'objective.py'}:score", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s" / "heads.json").exists()


def test_a_search_where_no_candidate_changes_the_score_says_so(tmp_path, capsys):
    (tmp_path / "objective.py").write_text("def score(images, prompts):\n    return [0.5] * len(images)\n")
    main([*TINY_SEARCH, "--objective", f"{tmp_path / 'objective.py'}:score", "--top-k", "1", "--out", str(tmp_path)])
    assert ("warning: in round 0 every candidate scored exactly as no heads (0.5000): the perturbation changed no "
            "score at these settings") in capsys.readouterr().out

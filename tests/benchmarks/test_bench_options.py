"""The benchmark scripts refuse bad options with a message naming the value, before any image is made."""

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def refused(run_script):
    def run(script, *options):
        code, stdout, stderr = run_script(BENCHMARKS / script, *options, "--threads", "1")
        assert code != 0 and "image-step" not in stdout and "methods x" not in stdout
        return stderr
    return run


@pytest.mark.parametrize("options,message", [
    (["--first", "150"], "--first 150 is not a tune prompt of set 'two' (0 to 149)"),
    (["--set", "one", "--first", "-1"], "--first -1 is not a tune prompt of set 'one' (0 to 14)"),
    (["--count", "0"], "--count 0 must be at least 1"),
    (["--seeds", "-2"], "--seeds -2 must be at least 1"),
    (["--u", "2"], "softpag_u 2.0 must be in [0, 1]"),
    (["--scales", "nan"], "perturbation_scale nan must be a finite number"),
])
def test_layer_scale_options(options, message, refused):
    assert message in refused("bench_layer_scale.py", *options)


def test_head_search_u_is_refused_before_the_search(tmp_path, refused):
    stderr = refused("bench_head_search.py", "--model", "shapes-sd3", "--u", "1.5", "--out", str(tmp_path))
    assert "softpag_u 1.5 must be in [0, 1]" in stderr
    assert not any(tmp_path.iterdir())  # no journal was started


@pytest.mark.parametrize("script,options,message", [
    ("bench_astar.py", ["--size", "100"], "--size 100: a multiple of 32, at least 64"),
    ("bench_astar.py", ["--steps", "0"], "--steps 0, --repeats 3 and --batch 1 must be at least 1"),
    ("bench_astar.py", ["--model", "sdxl", "--configs", "ae"], "Attend-and-Excite is SD1.x only in diffusers"),
    ("bench_astar_quality.py", ["--count", "0"], "--count and --seeds must be at least 1"),
    ("bench_astar_quality.py", ["--model", "shapes-sd3", "--methods", "ae"], "Attend-and-Excite is SD1.x only"),
    ("bench_astar_quality.py", ["--scale", "-1"], "--scale [-1.0]: alpha must be >= 0"),
    ("bench_story_quality.py", ["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
])
def test_astar_benchmark_options(script, options, message, refused):
    assert message in refused(script, *options)


@pytest.mark.parametrize("options,message", [
    (["--tile", "3", "1"], "--tile 3 1: give 3 numbers (frames rows columns) per window"),
    (["--masks", "draft", "diagonal"], "argument --masks: invalid choice: 'diagonal'"),
    (["--count", "0"], "--count, --seeds and --batch-size must be at least 1"),
])
def test_sparse_quality_options(options, message, refused):
    assert message in refused("bench_sparse_quality.py", *options)

"""The README's Python examples run as written on the shipped models (those that need a GPU or a
modular pipeline are left out)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """About 10-12 s: the examples load the shipped models and generate, as a reader would."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    runnable = [b for b in blocks if "cuda" not in b and "modular_pipe" not in b]
    assert len(runnable) >= 2
    (tmp_path / "samples").symlink_to(ROOT / "samples")  # the examples' relative model paths; files land here
    monkeypatch.chdir(tmp_path)
    scope = {}
    for block in runnable:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["image"].size == scope["perturbed"].size == (64, 64)
    assert (tmp_path / "maps.png").is_file()


def test_readme_table_of_pipelines_and_methods_is_the_codes():
    """About 10 s: it asks each method's checks on a tiny pipeline of every kind and task."""
    from attnsteer.pipelines.support import support_table

    block = re.search(r"<!-- support: .*? -->\n(.*?)\n<!-- end of support -->", (ROOT / "README.md").read_text(), re.S)
    assert block is not None and block.group(1) == support_table()


def test_readme_table_of_denoiser_classes_is_the_codes():
    from attnsteer.pipelines.support import denoiser_table

    block = re.search(r"<!-- denoisers: .*? -->\n(.*?)\n<!-- end of denoisers -->", (ROOT / "README.md").read_text(), re.S)
    assert block is not None and block.group(1) == denoiser_table()

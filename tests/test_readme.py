"""The README's Python examples run as written on the shipped models (those that need a GPU or a
modular pipeline are left out)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    runnable = [b for b in blocks if "cuda" not in b and "modular_pipe" not in b]
    assert len(runnable) >= 2
    monkeypatch.chdir(ROOT)
    scope = {}
    for block in runnable:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["image"].size == scope["perturbed"].size == (64, 64)

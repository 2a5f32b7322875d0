"""The GPU suite runs every row (tiny widths on the CPU), so that it still runs when a GPU is lent."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_suite  # noqa: E402  (benchmarks/ is scripts, not a package)


def test_the_dry_run_finishes_every_row_with_its_table(tmp_path):
    """About 130 s: each row is a benchmark script in its own process, with a process per configuration for
    its peak memory, each importing torch and diffusers (5-8 s here); the one test that keeps the device
    suite runnable between GPU sessions."""
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "suite.json").read_text())
    assert record["dry_run"] and record["versions"]["diffusers"]
    assert list(record["rows"]) == [row[0] for row in gpu_suite.ROWS]
    for name, entry in record["rows"].items():
        assert entry["status"] == "done", (name, (tmp_path / f"{name}.log").read_text()[-2000:])
        assert json.loads((tmp_path / f"{name}.json").read_text())["results"], name
        assert "|" in (tmp_path / f"{name}.md").read_text() or "vs dense" in (tmp_path / f"{name}.md").read_text(), name


def test_rows_past_the_budget_are_skipped_and_recorded(tmp_path):
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "1e-9", "--rows", "astar", "story"]) == 0
    rows = json.loads((tmp_path / "suite.json").read_text())["rows"]
    assert {name: entry["status"] for name, entry in rows.items()} == dict.fromkeys(["astar", "story"],
                                                                                     "skipped: past --budget-s")
    assert rows["astar"]["command"].startswith("bench_astar.py --model sd15 --size 512")

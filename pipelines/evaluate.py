"""Measure a pipeline and its methods on shapes prompts x seeds: the ``attnsteer eval`` harness.

Items (prompt, seed) are cut into fixed batches first; under ``accelerate launch`` the batches,
not the items, are shared out across processes, so every image is computed exactly as in one
process and the table is the same. Only the main process writes results.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from attnsteer.guidance.distributed import process_state
from attnsteer.guidance.shapes import detect, score, summarize
from attnsteer.guidance.stats import paired_difference

METRICS = ("coverage", "bound", "binding", "count_right")


def _images(pipe, prompts, seeds, call_kwargs, method_kwargs):
    generators = [torch.Generator(pipe.device).manual_seed(seed) for seed in seeds]
    return pipe(prompt=list(prompts), generator=generators, **call_kwargs, **method_kwargs).images


def evaluate(pipe, prompts: list[str], seeds: list[int], methods: dict[str, dict], call_kwargs: dict | None = None,
             batch_size: int = 8, keep_images: int = 0) -> dict:
    """Run ``pipe`` on every (prompt, seed) for each method (name -> pipeline keyword arguments).

    Returns ``{"records": [...], "summary": {method: rates}, "paired": {method: differences from the
    first method}, "images": {method: [first keep_images PIL]}}``, complete on every process.
    """
    from accelerate.utils import gather_object

    state = process_state()
    items = [(i, prompt, seed) for i, (prompt, seed) in enumerate((p, s) for p in prompts for s in seeds)]
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    records, kept = [], []
    with state.split_between_processes(batches) as mine:
        for method, method_kwargs in methods.items():
            for batch in mine:
                _, batch_prompts, batch_seeds = zip(*batch)
                for (index, prompt, seed), image in zip(batch, _images(pipe, batch_prompts, batch_seeds, call_kwargs or {}, method_kwargs)):
                    result = score(detect(image), prompt)
                    records.append({"method": method, "index": index, "prompt": prompt, "seed": seed,
                                    "pixel_mean": float(np.asarray(image, dtype=np.float64).mean()), **result})
                    if index < keep_images:
                        kept.append((method, index, image))
    if state.num_processes > 1:
        records, kept = gather_object(records), gather_object(kept)
    order = list(methods)
    records.sort(key=lambda r: (order.index(r["method"]), r["index"]))
    kept.sort(key=lambda k: (order.index(k[0]), k[1]))
    return {
        "records": records,
        "summary": {m: summarize([r for r in records if r["method"] == m]) for m in methods},
        "paired": paired(records, order[0]),
        "images": {m: [image for method, _, image in kept if method == m] for m in methods},
    }


def table(summary: dict) -> str:
    """Markdown table of each method's rates with 95% intervals."""
    lines = ["| method | images | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for method, s in summary.items():
        cells = [f"{s[m]['rate']:.3f} [{s[m]['low']:.3f}, {s[m]['high']:.3f}]" for m in METRICS]
        lines.append(f"| {method} | {s['n_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(records: list[dict], reference: str) -> dict:
    """Each other method minus ``reference`` on the same prompts and seeds, per metric
    (``paired_difference``, seeds grouped by prompt; coverage and bound per image, which for
    images with equal object counts is the pooled rates' difference)."""
    by_method = {}
    for r in records:
        by_method.setdefault(r["method"], {})[(r["prompt"], r["seed"])] = r
    if reference not in by_method:
        raise ValueError(f"reference method {reference!r} is not one of {list(by_method)}")
    keys = sorted(by_method[reference])
    base = [by_method[reference][k] for k in keys]
    prompts = [p for p, _ in keys]
    return {method: {m: paired_difference([float(r[m]) for r in base], [float(rows[k][m]) for k in keys], prompts)
                     for m in METRICS}
            for method, rows in by_method.items() if method != reference}


def paired_table(differences: dict, reference: str) -> str:
    """Markdown table of ``paired`` differences with 95% intervals."""
    lines = [f"| method - {reference} | pairs | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for method, d in differences.items():
        cells = [f"{d[m]['diff']:+.3f} [{d[m]['low']:+.3f}, {d[m]['high']:+.3f}]" for m in METRICS]
        lines.append(f"| {method} | {d[METRICS[0]]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contact_sheet(images: dict[str, list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    """One row per method (its name at the left, if named), the same items in each column."""
    rows = [(m, row) for m, row in images.items() if row]
    width, height = rows[0][1][0].size
    margin = 90 if any(m for m, _ in rows) else 0
    sheet = Image.new("RGB", (margin + width * max(len(r) for _, r in rows), height * len(rows) + 14), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (method, row) in enumerate(rows):
        draw.text((4, y * height + height // 2), method[:14], fill="black")
        for x, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (margin + x * width, y * height))
    for x, label in enumerate(labels or []):
        draw.text((margin + x * width + 2, len(rows) * height + 2), label[:12], fill="black")
    return sheet


def write(result: dict, out: str | Path, config: dict) -> list[Path]:
    """Write ``eval.json`` (config, summary, paired differences, records) and ``contact_sheet.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.json", "w") as f:
        json.dump({"config": config, "summary": result["summary"], "paired": result["paired"],
                   "records": result["records"]}, f, indent=1)
    paths = [out / "eval.json"]
    if any(result["images"].values()):
        first = next(iter(result["images"]))
        shown = len(result["images"][first])
        labels = [r["prompt"] for r in result["records"] if r["method"] == first][:shown]
        contact_sheet(result["images"], labels).save(out / "contact_sheet.png")
        paths.append(out / "contact_sheet.png")
    return paths

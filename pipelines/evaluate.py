"""Measure a pipeline and its methods on shapes prompts x seeds: the ``attnsteer eval`` harness, for
images (``shapes.score``) and, with ``video=True``, videos (``shapes.score_video``).

Items (prompt, seed) are cut into fixed batches first; under ``accelerate launch`` the batches,
not the items, are shared out across processes, so every image is computed from the same inputs in
the same batch as in one process. It is then bit for bit the same image where the processes compute
as the one process did (same device, same torch thread count: ``accelerate launch`` and ``torchrun``
start CPU processes with OMP_NUM_THREADS=1, a lone process uses every core); otherwise float sums in
another order can move a pixel by one level, and rarely a detection. Only the main process writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from attnsteer.guidance.distributed import process_state
from attnsteer.guidance.shapes import VIDEO_METRICS, detect, score, score_video, summarize, summarize_videos
from attnsteer.guidance.stats import paired_difference

METRICS = ("coverage", "bound", "binding", "count_right")
OBJECT_FIELDS = ("colour", "shape", "direction", "identity", "smooth", "followed")  # a video record's objects


def _outputs(pipe, prompts, seeds, call_kwargs, method_kwargs, video: bool):
    generators = [torch.Generator(pipe.device).manual_seed(seed) for seed in seeds]
    if callable(method_kwargs):  # arguments that depend on the batch's prompts (e.g. their concept words)
        method_kwargs = method_kwargs(list(prompts))
    result = pipe(prompt=list(prompts), generator=generators, **call_kwargs, **method_kwargs)
    return result.frames if video else result.images


def _scored(output, prompt: str, video: bool) -> dict:
    """A record's scores: ``score`` of an image, or a video's ``score_video`` metrics and per-object scores."""
    pixel_mean = float(np.asarray(output, dtype=np.float64).mean())
    if not video:
        return {"pixel_mean": pixel_mean, **score(detect(output), prompt)}
    result = score_video(output, prompt)
    return {"pixel_mean": pixel_mean, **{m: result[m] for m in VIDEO_METRICS},
            "objects": [{k: o[k] for k in OBJECT_FIELDS} for o in result["objects"]]}


def frame_strip(frames, shown: int = 3, view: int = 128) -> Image.Image:
    """``shown`` frames of a video, evenly spaced from first to last, side by side, each enlarged to
    about ``view`` pixels."""
    picks = [frames[round(i * (len(frames) - 1) / max(shown - 1, 1))] for i in range(min(shown, len(frames)))]
    picks = [enlarged(frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)), view)
             for frame in picks]
    width, height = picks[0].size
    strip = Image.new("RGB", (len(picks) * (width + 2) - 2, height), "white")
    for i, frame in enumerate(picks):
        strip.paste(frame.convert("RGB"), (i * (width + 2), 0))
    return strip


def evaluate(pipe, prompts: list[str], seeds: list[int], methods: dict[str, dict], call_kwargs: dict | None = None,
             batch_size: int = 8, keep_images: int = 0, video: bool = False) -> dict:
    """Run ``pipe`` on every (prompt, seed) for each method (name -> pipeline keyword arguments, or a
    function of a batch's prompts returning them); ``video``: score videos (``VIDEO_METRICS``).

    Returns ``{"records": [...], "summary": {method: rates}, "paired": {method: differences from the
    first method}, "images": {method: [first keep_images PIL, a video as a strip of frames]}}``,
    complete on every process.
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
                outputs = _outputs(pipe, batch_prompts, batch_seeds, call_kwargs or {}, method_kwargs, video)
                for (index, prompt, seed), output in zip(batch, outputs):
                    records.append({"method": method, "index": index, "prompt": prompt, "seed": seed,
                                    **_scored(output, prompt, video)})
                    if index < keep_images:
                        kept.append((method, index, frame_strip(output) if video else output))
    if state.num_processes > 1:
        records, kept = gather_object(records), gather_object(kept)
    order = list(methods)
    records.sort(key=lambda r: (order.index(r["method"]), r["index"]))
    kept.sort(key=lambda k: (order.index(k[0]), k[1]))
    def summary(rows):
        return summarize_videos(rows, [r["prompt"] for r in rows]) if video else summarize(rows)

    return {
        "records": records,
        "summary": {m: summary([r for r in records if r["method"] == m]) for m in methods},
        "paired": paired(records, order[0], VIDEO_METRICS if video else METRICS),
        "images": {m: [image for method, _, image in kept if method == m] for m in methods},
    }


def _cell(s: dict | None, sign: str = "") -> str:
    if s is None:
        return "-"
    value = s["rate"] if "rate" in s else s["mean"] if "mean" in s else s["diff"]
    if not math.isfinite(s["low"]):  # one item, or one prompt whose seeds are not independent
        one = "n = 1" if s["n"] == 1 else "1 prompt"
        return f"{value:{sign}.3f} ({one}: no interval)"
    return f"{value:{sign}.3f} [{s['low']:{sign}.3f}, {s['high']:{sign}.3f}]"


def table(summary: dict, metrics: tuple = METRICS) -> str:
    """Markdown table of each method's rates (or, for videos, means) with 95% intervals."""
    unit = "videos" if "n_videos" in next(iter(summary.values())) else "images"
    lines = [f"| method | {unit} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for method, s in summary.items():
        lines.append(f"| {method} | {s['n_' + unit]} | " + " | ".join(_cell(s[m]) for m in metrics) + " |")
    return "\n".join(lines)


def paired(records: list[dict], reference: str, metrics: tuple = METRICS) -> dict:
    """Each other method minus ``reference`` on the same prompts and seeds, per metric
    (``paired_difference``, seeds grouped by prompt; coverage and bound per image, which for
    images with equal object counts is the pooled rates' difference). Pairs where either value is
    None (a video's "followed" when its caption names no motion) are left out; None if none is left."""
    by_method = {}
    for r in records:
        by_method.setdefault(r["method"], {})[(r["prompt"], r["seed"])] = r
    if reference not in by_method:
        raise ValueError(f"reference method {reference!r} is not one of {list(by_method)}")
    keys = sorted(by_method[reference])

    def difference(rows, m):
        kept = [k for k in keys if by_method[reference][k][m] is not None and rows[k][m] is not None]
        return paired_difference([float(by_method[reference][k][m]) for k in kept], [float(rows[k][m]) for k in kept],
                                 [p for p, _ in kept]) if kept else None

    return {method: {m: difference(rows, m) for m in metrics} for method, rows in by_method.items() if method != reference}


def paired_table(differences: dict, reference: str, metrics: tuple = METRICS) -> str:
    """Markdown table of ``paired`` differences with 95% intervals."""
    lines = [f"| method - {reference} | pairs | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for method, d in differences.items():
        lines.append(f"| {method} | {d[metrics[0]]['n']} | " + " | ".join(_cell(d[m], "+") for m in metrics) + " |")
    return "\n".join(lines)


VIEW = 192  # pixels: small model outputs are enlarged (nearest neighbour) to about this size to be seen
FONT = ImageFont.load_default(size=14)
LINE = 18  # pixels per line of FONT
GAP = 6  # pixels between pictures side by side


def enlarged(image: Image.Image, view: int = VIEW) -> Image.Image:
    """``image`` scaled up by a whole factor (nearest neighbour) to about ``view`` pixels."""
    factor = max(1, view // max(image.size))
    return image.convert("RGB").resize((image.width * factor, image.height * factor), Image.NEAREST)


def _wrapped(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` cut into lines of at most ``width`` pixels, at spaces where it can be."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=FONT) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line] if line else lines


def contact_sheet(images: dict[str, list[Image.Image]], labels: list[str] | None = None,
                  view: int = VIEW) -> Image.Image:
    """One row per method (its whole name at the left, if named), the same items in each column with
    their labels (e.g. prompts) wrapped below; pictures enlarged to about ``view`` pixels."""
    rows = [(m, [enlarged(image, view) for image in row]) for m, row in images.items() if row]
    width, height = rows[0][1][0].size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max((int(measure.textlength(m, font=FONT)) + 12 for m, _ in rows if m), default=0)
    wrapped = [_wrapped(measure, label, width - 4) for label in labels or []]
    footer = LINE * max((len(w) for w in wrapped), default=0) + 4
    sheet = Image.new("RGB", (margin + width * max(len(r) for _, r in rows), height * len(rows) + footer), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (method, row) in enumerate(rows):
        draw.text((6, y * height + height // 2 - LINE // 2), method, fill="black", font=FONT)
        for x, image in enumerate(row):
            sheet.paste(image, (margin + x * width, y * height))
    for x, lines in enumerate(wrapped):
        for i, line in enumerate(lines):
            draw.text((margin + x * width + 2, len(rows) * height + 2 + LINE * i), line, fill="black", font=FONT)
    return sheet


def labelled_grid(images: list[Image.Image], labels: list[str], title: str = "", view: int = 256) -> Image.Image:
    """Pictures side by side, enlarged to about ``view`` pixels, each with its label above and ``title``
    (e.g. the prompt) on top: the quick start's baseline-versus-method comparison."""
    shown = [enlarged(image, view) for image in images]
    width, height = shown[0].size
    step = width + GAP
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heads = [_wrapped(measure, label, width - 8) for label in labels]
    titled = _wrapped(measure, title, step * len(shown) - 8)
    top = LINE * len(titled) + (6 if titled else 0)
    label_height = LINE * max(len(h) for h in heads) + 6
    sheet = Image.new("RGB", (step * len(shown) - GAP, top + label_height + height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(titled):
        draw.text((4, 3 + LINE * i), line, fill="black", font=FONT)
    for x, (image, lines) in enumerate(zip(shown, heads)):
        for i, line in enumerate(lines):
            draw.text((x * step + 4, top + 3 + LINE * i), line, fill="black", font=FONT)
        sheet.paste(image, (x * step, top + label_height))
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

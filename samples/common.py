"""What the sample scripts share: their common options, the model by name (shipped, tiny-*, a
diffusers folder or a hub id), seeded generators, and pictures written with a labelled grid."""

import argparse
import re
from pathlib import Path

import torch

from attnsteer.pipelines.cli import GIF_FRAME_MS, load_pipeline
from attnsteer.pipelines.evaluate import contact_sheet, labelled_grid


def options(doc: str, model: str, out: str) -> argparse.ArgumentParser:
    """A parser with the options every sample script has, ``model`` and ``out`` as their defaults."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model, help="a shipped model, tiny-<kind>, a diffusers folder or a hub id")
    p.add_argument("--seed", type=int, default=0, help="the seed of every picture")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=out, help="folder the pictures go to")
    return p


def load(args):
    """The attnsteer pipeline of --model on --device, in float32, without a progress bar per picture."""
    pipe, _ = load_pipeline(args.model, args.device, "float32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(args) -> dict:
    """The call arguments the options set: a seeded generator, and --steps when given."""
    steps = {} if args.steps is None else {"num_inference_steps": args.steps}
    return {"generator": torch.Generator(args.device).manual_seed(args.seed), **steps}


def save(out: str | Path, stem: str, title: str, pictures: list, labels: list[str]) -> Path:
    """Each picture as ``stem_<label>.png`` and all of them side by side, labelled, as ``stem_grid.png``
    (the grid's path is returned and printed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for picture, label in zip(pictures, labels):
        picture.save(out / f"{stem}_{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.png")
    grid = out / f"{stem}_grid.png"
    labelled_grid(pictures, labels, title).save(grid)
    print(grid)
    return grid


def save_video(out: str | Path, stem: str, title: str, videos: list, labels: list[str], view: int = 128,
               shown: int = 6) -> Path:
    """Equally long videos (lists of PIL frames) side by side, labelled, as one animated GIF
    ``stem.gif`` (its path is returned and printed), and ``stem_strip.png``: a row per video of
    ``shown`` evenly spaced frames, to be seen without a GIF viewer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = [labelled_grid(list(step), labels, title, view) for step in zip(*videos)]
    path = out / f"{stem}.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    picks = [round(i * (len(videos[0]) - 1) / max(shown - 1, 1)) for i in range(min(shown, len(videos[0])))]
    strip = contact_sheet({label: [video[k] for k in picks] for label, video in zip(labels, videos)},
                          [f"frame {k + 1} of {len(videos[0])}" for k in picks], view)
    strip.save(out / f"{stem}_strip.png")
    print(path)
    print(out / f"{stem}_strip.png")
    return path

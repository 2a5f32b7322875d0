"""Objectives for the head search: images and their prompts in, one score per image out, higher better.

    objective(images: list[PIL.Image], prompts: list[str]) -> list[float]

``load_objective(spec)`` accepts
- ``shapes`` or ``shapes-<metric>``: the weight-free shapes detector, metric ``binding`` (default:
  every prompt object drawn in its colour), ``bound``, ``coverage`` or ``count_right``;
- ``clip:PATH``: CLIP image-text cosine similarity from a local transformers CLIP checkpoint;
- ``module:function`` or ``path/to/file.py:function``: any user function of the signature above.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable

import torch

Objective = Callable[[list, list], list]
SHAPES_METRICS = ("binding", "bound", "coverage", "count_right")


def shapes_objective(metric: str = "binding") -> Objective:
    """Score each image's detections against its prompt (see ``attnsteer.guidance.shapes.score``)."""
    if metric not in SHAPES_METRICS:
        raise ValueError(f"shapes metric {metric!r} is not one of {SHAPES_METRICS}")
    from .shapes import detect, score

    def objective(images, prompts):
        return [float(score(detect(image), prompt)[metric]) for image, prompt in zip(images, prompts)]

    return objective


class ClipObjective:
    """Cosine similarity between CLIP's image and text embeddings, from a local checkpoint folder
    (CLIPModel weights, tokenizer and image processor, as ``save_pretrained`` writes them)."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        if not Path(path).is_dir():
            raise ValueError(f"CLIP checkpoint {path!r} is not a local folder")
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, prompts):
        text = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        image_emb = self.model.get_image_features(pixel_values=pixels.to(self.device))
        text_emb = self.model.get_text_features(**text)
        image_emb, text_emb = (getattr(e, "pooler_output", e) for e in (image_emb, text_emb))
        return torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1).tolist()


def _user_function(spec: str) -> Objective:
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise ValueError(f"objective file {target!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"objective module {target!r} cannot be imported: {type(error).__name__}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"objective {spec!r}: {target!r} has no function {name!r}")
    return function


def objective_scores(objective: Objective, name: str, images: list, prompts: list) -> list[float]:
    """``objective``'s scores of ``images``, checked: one finite number per image, else ValueError naming it."""
    try:
        scores = list(objective(images, prompts))
    except Exception as error:
        raise ValueError(f"objective {name!r} raised {type(error).__name__}: {error}") from error
    if len(scores) != len(images):
        raise ValueError(f"objective {name!r} returned {len(scores)} scores for {len(images)} images; "
                         "it must return one number per image")
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise ValueError(f"objective {name!r} returned a score that is not a number: {scores[:4]!r}") from None
    bad = [s for s in scores if not math.isfinite(s)]
    if bad:
        raise ValueError(f"objective {name!r} returned {len(bad)} non-finite score(s) ({bad[0]}) for "
                         f"{len(images)} images; scores must be finite numbers")
    return scores


def load_objective(spec: str, device: str = "cpu") -> Objective:
    """The objective named by ``spec`` (see the module docstring); ValueError if it cannot be had."""
    if spec == "shapes" or spec.startswith("shapes-"):
        return shapes_objective(spec.partition("-")[2] or "binding")
    if spec.startswith("clip:"):
        return ClipObjective(spec[len("clip:"):], device)
    if ":" in spec:
        return _user_function(spec)
    raise ValueError(f"objective {spec!r} is not 'shapes[-{'|'.join(SHAPES_METRICS)}]', 'clip:PATH' or 'module:function'")

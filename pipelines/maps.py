"""Per-token attention maps of one generation, on any steered call, and a picture of them.

    out = pipe("a red circle and a blue square", return_attention_maps=["circle", "square"])
    render_attention_maps(out.images[0], out.attention_maps.maps[0], out.attention_maps.labels[0]).save("maps.png")

Keyword arguments (defaults in ``MAPS_DEFAULTS``):
    return_attention_maps: the tokens to map, as ``astar_tokens`` takes them (words, indices, index
        lists; one list per prompt for a prompt list). The output gets ``attention_maps``
        (``AttentionMaps``; appended to the tuple when ``return_dict=False``).
    attention_maps_steps: (start, stop) fractions of the steps averaged; all by default.
    attention_maps_layers, attention_maps_grid: as ``astar_layers`` and ``astar_grid``.

How the maps are computed, with A-STAR's: docs/methods.md, section 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from attnsteer.attention_processors import map_layers
from attnsteer.guidance.maps import MapRecorder

from .astar import check_image_pipeline, check_window, latent_size, per_prompt, resolve_concepts
from .parent import denoiser

MAPS_DEFAULTS = dict(return_attention_maps=None, attention_maps_steps=(0.0, 1.0), attention_maps_layers=None,
                     attention_maps_grid=None)


@dataclass
class AttentionMaps:
    """maps: [images, tokens, h, w], the head-mean attention probabilities of each token (a word's
    tokens summed) averaged over ``steps`` and ``layers``, at ``grid`` (None when no step was in
    the window); labels: per image, the tokens as given; tokens missing from a prompt's shorter list
    have maps of 0."""

    maps: torch.Tensor | None
    labels: list[list[str]]
    layers: list[str]
    grid: tuple[int, ...]
    steps: list[int]


def map_recorder(pipe, arguments: dict, options: dict) -> tuple[MapRecorder, list[list[str]]] | None:
    """The recorder of one call and each prompt's labels, or None; ValueError before compute."""
    o = {**MAPS_DEFAULTS, **options}
    check_window("attention_maps_steps", o["attention_maps_steps"])
    if o["return_attention_maps"] is None:
        return None
    check_image_pipeline(pipe, "return_attention_maps")
    groups, _ = resolve_concepts(pipe, arguments, o["return_attention_maps"], "return_attention_maps")
    try:
        layers, grid = map_layers(denoiser(pipe), latent_size(pipe, arguments), o["attention_maps_layers"], o["attention_maps_grid"])
    except ValueError as error:
        raise ValueError(f"attention_maps_layers / attention_maps_grid: {error}") from None
    labels = [[str(t) for t in row] for row in per_prompt("return_attention_maps", o["return_attention_maps"], arguments)]
    return MapRecorder(groups, layers, grid, o["attention_maps_steps"]), labels


def _heat(m: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white colour map of values in [0, 1]."""
    return np.clip(np.stack([3 * m, 3 * m - 1, 3 * m - 2], axis=-1), 0, 1)


def render_attention_maps(image, maps: torch.Tensor, labels: list[str]) -> Image.Image:
    """The image, then one heat map per token over it (each stretched from its minimum to its
    maximum), labelled, in a row."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.uint8(np.clip(np.asarray(image), 0, 1) * 255))
    rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255
    height, width = rgb.shape[:2]
    label_height = 12
    canvas = Image.new("RGB", (width * (1 + len(labels)), height + label_height), "white")
    canvas.paste(picture.convert("RGB"), (0, label_height))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 0), "image", fill="black")
    up = F.interpolate(maps.detach().float()[None].cpu(), size=(height, width), mode="bilinear", align_corners=False)[0]
    for k, (heat, label) in enumerate(zip(up, labels)):
        heat = ((heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)).numpy()
        tile = 0.4 * rgb + 0.6 * _heat(heat)
        canvas.paste(Image.fromarray(np.uint8(tile * 255)), ((k + 1) * width, label_height))
        draw.text(((k + 1) * width + 2, 0), label, fill="black")
    return canvas

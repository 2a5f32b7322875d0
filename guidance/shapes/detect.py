"""Detect shapes-scene objects with no learned weights.

Pixels are sorted by hue into the palette's colours (low saturation is background),
each colour's mask becomes objects by connected components, and each object's
shape is the template (the generator's own shape mask, stretched to the object's
box) that overlaps it best. Anything that fits no template well, or fits two about
equally, is "unknown" rather than a confident wrong label, so blurry or odd
generated images are not scored as correct by accident.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from .scene import PALETTE, SHAPES, SUPERSAMPLE, TEXTURE_CONTRAST, shape_image

SAT_MIN = 0.35  # HSV saturation below this is background (an edge pixel ~45% covered)
VAL_MIN = 0.2  # HSV value below this is too dark to trust its hue
HUE_TOL = 25  # degrees; a coloured pixel further from every palette hue is "unknown"
MIN_AREA = 0.004  # components smaller than this fraction of the image are noise
MAX_ASPECT = 1.4  # every shape has a square box; longer boxes are "unknown"
# The best template must overlap the object at least this much (IoU). Circle and
# square fit tightly even when blurred (>= 0.89), while a blurred star fits a circle
# at <= 0.85; pointed shapes lose their tips to blur, so they get lower bars.
SHAPE_MIN_IOU = {"circle": 0.87, "square": 0.87, "triangle": 0.7, "star": 0.7, "cross": 0.75}
SHAPE_MARGIN = 0.05  # ... and beat the second best template by this much
TEXTURE_MIN_FRACTION = 0.05  # share of off-tone pixels that makes a texture
STRIPES_MIN_ROW_SHARE = 0.6  # share of off-tone variance explained by rows: stripes

UNKNOWN = "unknown"
_HUES = np.array([h for h, _, _ in PALETTE.values()], float)
_CLASSES = tuple(PALETTE) + (UNKNOWN,)
_EIGHT = np.ones((3, 3), bool)


@dataclass(eq=False)  # holds an array: compare fields, not detections
class Detection:
    """A detected object. ``box`` is (x0, y0, x1, y1), end exclusive; ``mask`` a bool
    image; ``size``, ``shade``, ``texture`` estimate the generator's unnamed attributes;
    ``fit`` is the overlap (IoU) with the chosen shape's template."""

    colour: str
    shape: str
    box: tuple
    mask: np.ndarray
    size: float
    shade: float
    texture: str
    fit: float


def colour_classes(image):
    """Per pixel: index into ``_CLASSES`` (palette colours, then unknown), -1 for
    background. Hue survives anti-aliasing against grey, so edges keep their colour."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), float) / 255
    distance = np.abs((hsv[..., :1] * 360 - _HUES + 180) % 360 - 180)
    classes = distance.argmin(-1)
    classes[distance.min(-1) > HUE_TOL] = len(PALETTE)
    classes[(hsv[..., 1] < SAT_MIN) | (hsv[..., 2] < VAL_MIN)] = -1
    return classes


@lru_cache(maxsize=4096)
def _template(shape, w, h):
    big = shape_image(shape, w * SUPERSAMPLE, h * SUPERSAMPLE)
    return np.asarray(big.resize((w, h), Image.BOX)) >= 128


def classify_shape(crop):
    """(shape, IoU) for a bool mask cropped to its box; "unknown" if no template fits
    clearly."""
    h, w = crop.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return UNKNOWN, 0.0
    ious = {s: (crop & _template(s, w, h)).sum() / (crop | _template(s, w, h)).sum() for s in SHAPES}
    ranked = sorted(ious, key=ious.get, reverse=True)
    best, second = ious[ranked[0]], ious[ranked[1]]
    if best < SHAPE_MIN_IOU[ranked[0]] or best - second < SHAPE_MARGIN:
        return UNKNOWN, float(best)
    return ranked[0], float(best)


def _shade_and_texture(colour, mask, lightness):
    """Shade: median HLS lightness inside the object (edge pixels dropped) against the
    palette's. Texture: off-tone pixels; stripes if rows explain their variance."""
    inside = ndimage.binary_erosion(mask)
    if inside.sum() < 4:
        inside = mask
    base = np.median(lightness[inside])
    shade = float(base - PALETTE.get(colour, (0, 0.5, 0))[1])  # unknown hue: vs mid-grey
    off = inside & (np.abs(lightness - base) > TEXTURE_CONTRAST / 2)
    share = off.sum() / inside.sum()
    if share < TEXTURE_MIN_FRACTION:
        return shade, "plain"
    per_row, row_off = inside.sum(1), off.sum(1)
    rows = per_row > 0
    between = (per_row[rows] * (row_off[rows] / per_row[rows] - share) ** 2).sum()
    row_share = between / (inside.sum() * share * (1 - share))
    return shade, "stripes" if row_share >= STRIPES_MIN_ROW_SHARE else "dots"


def detect(image):
    """Objects in a shapes image, sorted by box. Each colour's mask is hole-filled
    before labelling, so textures neither split an object nor change its colour."""
    classes = colour_classes(image)
    rgb = np.asarray(image.convert("RGB"), float) / 255
    lightness = (rgb.max(-1) + rgb.min(-1)) / 2
    detections = []
    for k, colour in enumerate(_CLASSES):
        labels, _ = ndimage.label(ndimage.binary_fill_holes(classes == k), _EIGHT)
        for i, (ys, xs) in enumerate(ndimage.find_objects(labels), 1):
            mask = labels == i
            if mask.sum() < MIN_AREA * mask.size:
                continue
            shape, fit = classify_shape(mask[ys, xs])
            shade, texture = _shade_and_texture(colour, mask, lightness)
            size = max(ys.stop - ys.start, xs.stop - xs.start) / mask.shape[1]
            detections.append(Detection(colour, shape, (xs.start, ys.start, xs.stop, ys.stop),
                                        mask, size, shade, texture, fit))
    return sorted(detections, key=lambda d: d.box)

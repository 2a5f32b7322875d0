"""Procedural shapes scenes: coloured shapes on a plain background, with captions.

Each image holds 1 to 3 objects that the caption names by colour and shape. Size,
shade and texture vary but are never named, so a model trained on these images can
be checked for keeping a subject's unnamed attributes consistent between images.
Everything is drawn at ``SUPERSAMPLE`` times the final resolution and box-filtered
down, which gives anti-aliased edges.
"""

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Colours as HLS (hue in degrees, lightness, saturation). The hues are far apart so a
# hue test separates them; shade and texture move only the lightness, never the hue.
PALETTE = {
    "red": (0, 0.50, 0.80),
    "orange": (30, 0.50, 0.90),
    "yellow": (57, 0.50, 0.85),
    "green": (125, 0.42, 0.70),
    "blue": (220, 0.50, 0.80),
    "purple": (280, 0.50, 0.65),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "cross")
TEXTURES = ("plain", "stripes", "dots")
BACKGROUND = (235, 235, 235)
MAX_OBJECTS = 3

# Lengths are fractions of the image side, so every size draws the same scene.
SIZE_RANGE = (14 / 64, 26 / 64)  # side of an object's (square) box
BORDER = 2 / 64  # free space between objects and the image edge
GAP = 3 / 64  # free space between two objects' boxes
STRIPE_PERIOD, STRIPE_WIDTH = 6 / 64, 2 / 64  # texture covers well under half
DOT_SPACING, DOT_RADIUS = 5 / 64, 1.3 / 64  # of an object, so its median is the base
SHADE_RANGE = (-0.1, 0.1)  # offset of the HLS lightness from the palette's
TEXTURE_CONTRAST = 0.2  # lightness step between an object's texture and its base
SUPERSAMPLE = 4
PLACEMENT_TRIES = 100


def _star(points=5, inner=0.55):
    angle = np.pi * (np.arange(2 * points) / points - 0.5)
    radius = np.where(np.arange(2 * points) % 2, inner, 1.0)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)


def _unit(xy):
    """Scale a polygon so that its bounding box is the unit square."""
    xy = np.asarray(xy, float)
    return (xy - xy.min(0)) / (xy.max(0) - xy.min(0))


_A, _B = 0.32, 0.68  # the cross's arms are 0.36 of its side thick
POLYGONS = {
    "square": _unit([(0, 0), (1, 0), (1, 1), (0, 1)]),
    "triangle": _unit([(0.5, 0), (1, 1), (0, 1)]),
    "star": _unit(_star()),
    "cross": _unit([(_A, 0), (_B, 0), (_B, _A), (1, _A), (1, _B), (_B, _B),
                    (_B, 1), (_A, 1), (_A, _B), (0, _B), (0, _A), (_A, _A)]),
}


@dataclass
class ObjectSpec:
    """One drawn object. ``box`` is (x0, y0, x1, y1) in pixels, end exclusive; ``size``
    is the box side as a fraction of the image side; ``shade`` the lightness offset."""

    colour: str
    shape: str
    box: tuple
    size: float
    shade: float
    texture: str


def shape_image(shape, w, h):
    """Mask of ``shape`` filling a w x h box, as an 'L' image (255 inside)."""
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    else:
        draw.polygon([(x * (w - 1), y * (h - 1)) for x, y in POLYGONS[shape]], fill=255)
    return image


def colour_rgb(colour, shade=0.0, texture_tone=False):
    """RGB of a palette colour at a shade; the texture tone steps the lightness
    towards mid-grey so it stays saturated and keeps the hue."""
    hue, lightness, saturation = PALETTE[colour]
    lightness += shade
    if texture_tone:
        lightness += -TEXTURE_CONTRAST if lightness > 0.45 else TEXTURE_CONTRAST
    return tuple(round(255 * c) for c in colorsys.hls_to_rgb(hue / 360, lightness, saturation))


def _texture(texture, w, h, scale):
    """Texture pattern over a w x h box as an 'L' mask; ``scale`` is the image side in
    the same pixels. None for plain."""
    if texture == "plain":
        return None
    y, x = np.mgrid[0:h, 0:w] / scale
    if texture == "stripes":
        on = y % STRIPE_PERIOD < STRIPE_WIDTH
    else:
        half = DOT_SPACING / 2
        on = np.hypot(x % DOT_SPACING - half, y % DOT_SPACING - half) < DOT_RADIUS
    return Image.fromarray(np.uint8(on) * 255)


def render(objects, size=64):
    """Draw fully specified objects (boxes in pixels of a ``size`` image)."""
    ss = SUPERSAMPLE
    canvas = Image.new("RGB", (size * ss, size * ss), BACKGROUND)
    for obj in objects:
        x0, y0, x1, y1 = (v * ss for v in obj.box)
        mask = shape_image(obj.shape, x1 - x0, y1 - y0)
        canvas.paste(colour_rgb(obj.colour, obj.shade), (x0, y0), mask)
        pattern = _texture(obj.texture, x1 - x0, y1 - y0, size * ss)
        if pattern is not None:
            both = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(pattern)))
            canvas.paste(colour_rgb(obj.colour, obj.shade, texture_tone=True), (x0, y0), both)
    return canvas.resize((size, size), Image.BOX)


def caption(specs):
    """'a red circle', 'a red circle and a blue square', 'a red circle, a blue square
    and a green triangle' for a list of (colour, shape)."""
    parts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in specs]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _apart(a, b, gap):
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(sides, rng, size):
    """Random non-overlapping boxes of the given sides, or None if placement fails."""
    border, gap = round(BORDER * size), round(GAP * size)
    boxes = []
    for side in sides:
        for _ in range(PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(border, size - border - side + 1, 2))
            box = (x, y, x + int(side), y + int(side))
            if all(_apart(box, other, gap) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def draw_objects(specs, seed, size=64):
    """Draw the given (colour, shape) list with layout, size, shade and texture drawn
    from ``seed`` (an int or a numpy Generator). Returns (image, caption, objects)."""
    rng = np.random.default_rng(seed)
    low, high = (round(f * size) for f in SIZE_RANGE)
    boxes = None
    while boxes is None:  # resample the sides when they do not fit
        boxes = _place(rng.integers(low, high + 1, len(specs)), rng, size)
    objects = [
        ObjectSpec(colour, shape, box, (box[2] - box[0]) / size,
                   float(rng.uniform(*SHADE_RANGE)), str(rng.choice(TEXTURES)))
        for (colour, shape), box in zip(specs, boxes)
    ]
    return render(objects, size), caption(specs), objects


def draw(seed, n_objects=None, size=64):
    """A random scene: 1 to ``MAX_OBJECTS`` objects (or ``n_objects``) with distinct
    colours and distinct shapes. Deterministic per seed. Returns (image, caption,
    objects)."""
    rng = np.random.default_rng(seed)
    n = n_objects or int(rng.integers(1, MAX_OBJECTS + 1))
    colours = rng.choice(COLOURS, n, replace=False)
    shapes = rng.choice(SHAPES, n, replace=False)
    return draw_objects([(str(c), str(s)) for c, s in zip(colours, shapes)], rng, size)

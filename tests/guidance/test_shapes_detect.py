"""The shapes generator and the weight-free detector agree with each other."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from attnsteer.guidance.shapes import (COLOURS, SHAPES, ObjectSpec, detect, draw,
                                       draw_objects, render)
from attnsteer.guidance.shapes.scene import BACKGROUND, colour_rgb


def _agreement(n, size, blur=0.0):
    """Fraction of n drawn images whose detected (colour, shape) multiset equals the
    ground truth; also the failures and the attribute errors on agreeing images."""
    failures, attributes = [], []
    for seed in range(n):
        image, _, objects = draw(seed, size=size)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur * size / 64))
        found = detect(image)
        truth = sorted((o.colour, o.shape) for o in objects)
        if sorted((d.colour, d.shape) for d in found) != truth:
            failures.append((seed, truth, [(d.colour, d.shape, round(d.fit, 2)) for d in found]))
            continue
        for o in objects:
            d = next(d for d in found if (d.colour, d.shape) == (o.colour, o.shape))
            attributes.append((o, d))
    for failure in failures:
        print("disagree", *failure)
    return 1 - len(failures) / n, attributes


def test_detector_agrees_with_generator_64():
    agreement, attributes = _agreement(500, 64)
    print(f"agreement at 64: {agreement:.3f}")
    assert agreement >= 0.99
    assert np.mean([o.texture == d.texture for o, d in attributes]) >= 0.98
    assert max(abs(o.shade - d.shade) for o, d in attributes) < 0.05
    assert max(abs(o.size - d.size) for o, d in attributes) <= 2 / 64


def test_detector_agrees_with_generator_128():
    agreement, attributes = _agreement(100, 128)
    assert agreement >= 0.99
    assert np.mean([o.texture == d.texture for o, d in attributes]) >= 0.98


def test_blur_gives_unknown_not_wrong_labels():
    """A blurred image (like a soft generated one) may lose shapes to "unknown" but
    never relabels one as another shape or colour."""
    agreement, _ = _agreement(150, 64, blur=0.7)
    assert agreement >= 0.95
    for seed in range(150):
        image, _, objects = draw(seed)
        truth = {o.colour: o.shape for o in objects}
        for d in detect(image.filter(ImageFilter.GaussianBlur(0.7))):
            assert d.colour in truth and d.shape in (truth[d.colour], "unknown")


def test_draw_is_deterministic_per_seed():
    a, b, c = draw(7), draw(7), draw(8)
    assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]
    assert a[0].tobytes() != c[0].tobytes()
    assert draw_objects([("red", "star")], 3)[2] == draw_objects([("red", "star")], 3)[2]


@pytest.mark.parametrize("size", [64, 96, 128])
def test_scenes_are_well_formed(size):
    for seed in range(40):
        image, caption, objects = draw(seed, size=size)
        assert image.size == (size, size) and image.mode == "RGB"
        assert 1 <= len(objects) <= 3
        assert len({o.colour for o in objects}) == len({o.shape for o in objects}) == len(objects)
        for i, o in enumerate(objects):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert 14 / 64 - 1 / size <= o.size <= 26 / 64 + 1 / size
            for p in objects[i + 1:]:  # boxes do not overlap
                assert x1 <= p.box[0] or p.box[2] <= x0 or y1 <= p.box[1] or p.box[3] <= y0
        assert all(f"{o.colour} {o.shape}" in caption for o in objects)


def test_captions_and_given_specs():
    specs = [("red", "circle"), ("orange", "square"), ("green", "triangle")]
    assert draw_objects(specs[:1], 0)[1] == "a red circle"
    assert draw_objects(specs[:2], 0)[1] == "a red circle and an orange square"
    _, caption, objects = draw_objects(specs, 0)
    assert caption == "a red circle, an orange square and a green triangle"
    assert [(o.colour, o.shape) for o in objects] == specs


def test_every_colour_shape_and_texture_is_detected():
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            for texture in ("plain", "stripes", "dots"):
                obj = ObjectSpec(colour, shape, (20, 20, 34, 34), 14 / 64, 0.1 * (i % 3 - 1), texture)
                (d,) = detect(render([obj]))
                assert (d.colour, d.shape, d.texture) == (colour, shape, texture)
                assert d.mask.sum() > 0.4 * 14 * 14


def _paint(polygon, fill=colour_rgb("red"), size=64):
    image = Image.new("RGB", (size, size), BACKGROUND)
    ImageDraw.Draw(image).polygon(polygon, fill=fill)
    return image


def test_odd_shapes_are_unknown():
    ell = [(10, 10), (18, 10), (18, 30), (32, 30), (32, 38), (10, 38)]
    bar = [(10, 10), (40, 10), (40, 20), (10, 20)]
    for polygon in (ell, bar):
        (d,) = detect(_paint(polygon))
        assert (d.colour, d.shape) == ("red", "unknown")
    (d,) = detect(_paint([(10, 10), (30, 10), (30, 30), (10, 30)], fill=(30, 200, 200)))
    assert (d.colour, d.shape) == ("unknown", "square")  # cyan is off the palette


def test_background_and_specks_are_not_objects():
    assert detect(Image.new("RGB", (64, 64), BACKGROUND)) == []
    assert detect(_paint([(10, 10), (12, 10), (12, 12), (10, 12)])) == []

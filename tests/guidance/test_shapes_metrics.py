"""Shapes metrics on hand-worked examples, and the prompt sets."""

import dataclasses

import numpy as np
import pytest

from attnsteer.guidance.shapes import (Detection, ObjectSpec, attribute_match, detect,
                                       draw_objects, parse_caption, prompt_set, render, score,
                                       score_frames, segment_subjects, summarize, wilson)


def _det(colour, shape):
    return Detection(colour, shape, (0, 0, 1, 1), np.ones((1, 1), bool), 0.3, 0.0, "plain", 1.0)


def test_parse_caption():
    assert parse_caption("a red circle") == [("red", "circle")]
    assert parse_caption("a red circle and an orange star") == [("red", "circle"), ("orange", "star")]
    assert parse_caption("a red circle, a blue square and a green triangle") == [
        ("red", "circle"), ("blue", "square"), ("green", "triangle")]
    assert parse_caption("A Purple Cross") == [("purple", "cross")]
    assert parse_caption("a cat") == []


def test_score_two_objects_colour_leak():
    # Both shapes are there, but the square took the circle's colour.
    s = score([_det("red", "circle"), _det("red", "square")], "a red circle and a blue square")
    assert s["coverage"] == 1.0 and s["bound"] == 0.5
    assert s["binding"] is False and s["count_right"] is True
    assert [(o["present"], o["bound"]) for o in s["objects"]] == [(True, True), (True, False)]


def test_score_three_objects_missing_and_extra():
    dets = [_det("blue", "square"), _det("green", "star"), _det("yellow", "circle"),
            _det("purple", "unknown")]
    s = score(dets, "a red circle, a blue square and a green triangle")
    # circle present (in yellow), square bound, triangle missing; 4 detections for 3
    assert s["coverage"] == pytest.approx(2 / 3) and s["bound"] == pytest.approx(1 / 3)
    assert s["binding"] is False and s["count_right"] is False
    assert [(o["present"], o["bound"]) for o in s["objects"]] == [
        (True, False), (True, True), (False, False)]


def test_score_matches_one_to_one():
    s = score([_det("red", "circle")], "a red circle and a red circle")
    assert s["coverage"] == 0.5 and s["bound"] == 0.5
    with pytest.raises(ValueError):
        score([], "a cat")


def test_wilson_against_hand_computation():
    # 8/10, z = 1.959964, z^2/n = 0.3841459:
    # centre = (0.8 + 0.1920729) / 1.3841459 = 0.716743
    # half = 1.959964 / 1.3841459 * sqrt(0.8 * 0.2 / 10 + 3.841459 / 400) = 0.226577
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.490166, abs=1e-5) and high == pytest.approx(0.943320, abs=1e-5)
    # 0/10: the interval is [0, (z^2/n) / (1 + z^2/n)] = [0, 0.277533]
    assert wilson(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-5)


def test_summarize():
    scores = [
        score([_det("red", "circle"), _det("red", "square")], "a red circle and a blue square"),
        score([_det("blue", "square"), _det("green", "star"), _det("yellow", "circle"),
               _det("purple", "unknown")], "a red circle, a blue square and a green triangle"),
        score([_det("red", "circle")], "a red circle"),
    ]
    summary = summarize(scores)
    assert summary["n_images"] == 3
    # 6 prompt objects: present 2 + 2 + 1, bound 1 + 1 + 1; images: 1 bound, 2 counted right
    expected = {"coverage": (5, 6), "bound": (3, 6), "binding": (1, 3), "count_right": (2, 3)}
    for key, (k, n) in expected.items():
        low, high = wilson(k, n)
        assert summary[key] == {"rate": pytest.approx(k / n), "low": low, "high": high, "k": k, "n": n}


def test_attribute_match():
    a = ObjectSpec("red", "circle", (0, 0, 20, 20), 0.30, 0.05, "dots")
    assert attribute_match(a, dataclasses.replace(a)) == 1.0
    assert attribute_match(a, dataclasses.replace(a, texture="plain")) == pytest.approx(2 / 3)
    # shade differs by half its range (0.2), size by the whole range (12/64)
    assert attribute_match(a, dataclasses.replace(a, shade=-0.05)) == pytest.approx(5 / 6)
    assert attribute_match(a, dataclasses.replace(a, size=0.30 + 12 / 64)) == pytest.approx(2 / 3)
    assert attribute_match(a, None) == 0.0


def test_score_frames():
    image, caption, objects = draw_objects([("red", "circle"), ("blue", "square")], 1)
    changed = [dataclasses.replace(o, texture="stripes" if o.texture != "stripes" else "plain")
               if o.shape == "square" else o for o in objects]
    result = score_frames([image, image, render(changed)], caption)
    assert len(result["frames"]) == 3 and all(s["binding"] for s in result["frames"])
    assert result["summary"]["binding"]["rate"] == 1.0
    assert result["consistency"][0] == 1.0
    assert result["consistency"][1] == pytest.approx(1 - 1 / 6, abs=0.02)  # one texture of two


@pytest.mark.parametrize("name,n,size", [("one", 1, 15), ("two", 2, 150), ("three", 3, 600)])
def test_prompt_sets(name, n, size):
    tune, heldout = prompt_set(name, "tune"), prompt_set(name, "heldout")
    assert len(tune) == len(heldout) == size
    assert tune == prompt_set(name, "tune")  # deterministic
    key = lambda p: frozenset(parse_caption(p))  # noqa: E731
    assert not {key(p) for p in tune} & {key(p) for p in heldout}  # disjoint, even reordered
    for p in tune + heldout:
        objects = parse_caption(p)
        assert len(objects) == n
        assert len({c for c, _ in objects}) == len({s for _, s in objects}) == n


def test_segment_subjects_masks_each_subjects_colour_whatever_its_shape():
    scene, _, objects = draw_objects([("red", "circle"), ("blue", "square")], seed=3)
    alone, _, _ = draw_objects([("red", "star")], seed=4)  # the red subject drawn with the wrong shape
    masks = segment_subjects([alone, scene], ["a red circle", "a blue square"])
    assert masks.shape == (2, 2, 64, 64) and set(np.unique(masks)) <= {0.0, 1.0}
    for row, image in enumerate([alone, scene]):
        for k, colour in enumerate(["red", "blue"]):
            found = [d.mask for d in detect(image) if d.colour == colour]
            expected = found[0] if found else np.zeros((64, 64), bool)
            np.testing.assert_array_equal(masks[row, k], expected)
    assert masks[0, 0].any() and not masks[0, 1].any() and masks[1].any(axis=(1, 2)).all()
    x0, y0, x1, y1 = objects[1].box  # the blue square's mask lies in its drawn box
    assert masks[1, 1, y0:y1, x0:x1].sum() == masks[1, 1].sum()


@pytest.mark.parametrize("subjects,message", [
    (["a red circle and a blue square"], r"subject 'a red circle and a blue square' must name one shapes object"),
    (["a red circle", "a red square"], r"the subjects \['a red circle', 'a red square'\] must differ in colour"),
])
def test_segment_subjects_refuses_what_it_cannot_tell_apart(subjects, message):
    with pytest.raises(ValueError, match=message):
        segment_subjects([draw_objects([("red", "circle")], seed=0)[0]], subjects)

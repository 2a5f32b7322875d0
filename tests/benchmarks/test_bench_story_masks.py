"""bench_story_quality's detector masks: each subject's pixels in its reference and in the target."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_story_quality import detector_masks  # noqa: E402

from attnsteer.guidance.shapes import detect  # noqa: E402
from attnsteer.guidance.shapes.scene import draw_objects  # noqa: E402


def test_detector_masks_put_each_subject_in_its_own_rows():
    target, scene, _ = draw_objects([("red", "circle"), ("blue", "square")], seed=0)
    references = [draw_objects([spec], seed=k)[0] for k, spec in enumerate([("red", "circle"), ("green", "star")])]
    masks = detector_masks(references, target, scene).bool().numpy()
    assert masks.shape == (3, 2, 64, 64)
    colour = {d.colour: d.mask for d in detect(target)}
    np.testing.assert_array_equal(masks[2, 0], colour["red"])
    np.testing.assert_array_equal(masks[2, 1], colour["blue"])
    np.testing.assert_array_equal(masks[0, 0], detect(references[0])[0].mask)
    assert not masks[0, 1].any() and not masks[1, 0].any()
    assert not masks[1, 1].any()  # the second reference holds no blue object: its subject is not found
    assert masks[0, 0].any() and masks[2, 0].any() and masks[2, 1].any()

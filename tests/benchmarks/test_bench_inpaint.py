"""The inpainting benchmark's scene and scores: the picture holds the first object alone, the mask covers
where the second goes, and the scores tell a picture with the second object drawn in from one without."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_inpaint_quality as bench  # noqa: E402

from attnsteer.guidance.shapes import parse_caption  # noqa: E402
from attnsteer.guidance.shapes.scene import draw_objects, render  # noqa: E402


def test_the_scene_and_the_scores_tell_the_asked_object_drawn_in_the_mask():
    caption = "a red circle and a blue square"
    picture, mask = bench.scene(caption, 3, 4)
    rng = np.random.default_rng([3, bench.zlib.crc32(caption.encode())])
    _, _, objects = draw_objects(parse_caption(caption), rng)
    x0, y0, x1, y1 = objects[1].box
    assert mask[y0:y1, x0:x1].all() and mask.sum() == (min(y1 + 4, 64) - max(y0 - 4, 0)) * (min(x1 + 4, 64) - max(x0 - 4, 0))
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(render(objects[:1])))
    full = render(objects)  # the second object drawn where it was laid out, nothing else changed
    assert bench.scored(full, picture, mask, caption) == {"drawn": 1.0, "kept": 1.0, "outside": 0.0}
    assert bench.scored(picture, picture, mask, caption) == {"drawn": 0.0, "kept": 1.0, "outside": 0.0}
    moved = render([objects[1]])  # the second object alone: the first is gone
    assert bench.scored(moved, picture, mask, caption)["kept"] == 0.0
    assert bench.scored(moved, picture, mask, caption)["outside"] > 0

"""Named video prompt sets: the image sets' objects, with and without named motion.

"one" and "two" are prompts.py's sets (the same captions, the same tune/heldout split). "one-moving"
gives each one-object caption every direction; "two-moving" names a direction for both objects of each
two-object caption, drawn once with a fixed seed. A caption stays on its object set's side of the split
whatever motion it names, so a held-out object set is never tuned on.
"""

import numpy as np

from .metrics import parse_caption
from .prompts import SPLIT_SEED, prompt_set
from .video import DIRECTIONS, motion_caption

VIDEO_SETS = ("one", "two", "one-moving", "two-moving")


def video_prompt_set(name, split):
    """Captions of video set ``name`` (one of ``VIDEO_SETS``) in ``split`` ("tune" or "heldout"):
    one: 15, two: 150, one-moving: 60, two-moving: 150."""
    if name not in VIDEO_SETS:
        raise ValueError(f"video prompt set must be one of {VIDEO_SETS}, not {name!r}")
    base = prompt_set(name.removesuffix("-moving"), split)
    if name in ("one", "two"):
        return base
    if name == "one-moving":
        return [motion_caption([(c, s, d)]) for text in base for c, s in parse_caption(text) for d in DIRECTIONS]
    rng = np.random.default_rng([SPLIT_SEED, split == "heldout"])
    return [motion_caption([(c, s, str(rng.choice(list(DIRECTIONS)))) for c, s in parse_caption(text)])
            for text in base]

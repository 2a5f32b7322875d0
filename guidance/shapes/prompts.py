"""Named prompt sets of 1, 2 or 3 objects with distinct colours and distinct shapes.

Each set is split once, deterministically, into "tune" (for choosing a method's
settings) and "heldout" (for reporting). The split is over unordered object sets, so
a prompt and its reordering ('a red circle and a blue square' / 'a blue square and a
red circle') never land on different sides; each set appears once, in a random order.
"""

from itertools import combinations, permutations

import numpy as np

from .scene import COLOURS, SHAPES, caption

SETS = {"one": 1, "two": 2, "three": 3}
SPLITS = ("tune", "heldout")
SPLIT_SEED = 0


def prompt_set(name, split):
    """Captions of set ``name`` ("one", "two", "three") in ``split`` ("tune" or
    "heldout"): half of the set's object sets each (one: 15, two: 150, three: 600)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    n = SETS[name]
    groups = [list(zip(cs, ss)) for cs in combinations(COLOURS, n) for ss in permutations(SHAPES, n)]
    rng = np.random.default_rng(SPLIT_SEED)
    prompts = [caption([g[i] for i in rng.permutation(n)]) for g in groups]
    order = rng.permutation(len(prompts))
    half = len(prompts) // 2
    return [prompts[i] for i in (order[:half] if split == "tune" else order[half:])]

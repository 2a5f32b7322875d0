"""A user objective for the head-search tests (loaded as ``path/redness.py:redness``)."""

import numpy as np


def redness(images, prompts):
    """Mean red excess of each image: continuous, so candidates rarely tie."""
    return [float((np.asarray(im, np.float64) @ [1.0, -0.5, -0.5]).mean()) for im in images]

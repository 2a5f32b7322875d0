"""Paired differences: how much a change moves a score, measured on the same items."""

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def paired_difference(a, b, groups=None):
    """Mean of ``b - a`` over paired scores (the same prompt and seed under two methods), with a
    95% interval from the spread of the differences.

    Pairing removes the prompt-and-seed variance both methods share, so a small change is measured
    far more tightly than by comparing two rates' intervals. ``groups`` (e.g. each pair's prompt)
    keeps the seeds of one prompt from counting as independent (a cluster-robust interval);
    default: every pair its own group."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_difference needs two equally long, non-empty lists, not {len(a)} and {len(b)}")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    keys = np.unique(np.arange(len(d)) if groups is None else np.asarray(groups), return_inverse=True)[1]
    sums = np.bincount(keys, weights=d - d.mean())
    g = len(sums)
    half = Z95 * np.sqrt(g / (g - 1) * (sums ** 2).sum()) / len(d) if g > 1 else float("nan")
    return {"diff": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half),
            "n": len(d), "groups": g}

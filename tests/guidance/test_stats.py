"""Paired differences against hand computation."""

import pytest

from attnsteer.guidance.stats import paired_difference

A = [0, 0.5, 1, 0, 1, 0]
B = [0.5, 0.5, 1, 1, 1, 0]


def test_ungrouped_interval_is_the_normal_one_over_pairs():
    # differences 0.5, 0, 0, 1, 0, 0: mean 0.25, sample sd sqrt(0.875 / 5) = 0.418330
    d = paired_difference(A, B)
    assert d["diff"] == pytest.approx(0.25) and (d["n"], d["groups"]) == (6, 6)
    assert d["high"] - 0.25 == pytest.approx(1.959964 * 0.418330 / 6 ** 0.5, abs=1e-5)
    assert d["low"] == pytest.approx(0.25 - (d["high"] - 0.25))
    assert paired_difference(B, A)["diff"] == pytest.approx(-0.25)


def test_groups_count_once():
    # per-group mean differences 0.25, 0.5, 0: sd 0.25 over 3 groups
    d = paired_difference(A, B, groups=["x", "x", "y", "y", "z", "z"])
    assert d["groups"] == 3
    assert (d["low"], d["high"]) == pytest.approx((0.25 - 1.959964 * 0.25 / 3 ** 0.5,
                                                  0.25 + 1.959964 * 0.25 / 3 ** 0.5), abs=1e-5)
    # unequal groups (x: 0.5, 0, 0, 1; z: 0, 0): the mean over pairs, with residual sums 0.5 and -0.5
    uneven = paired_difference(A, B, groups=["x", "x", "x", "x", "z", "z"])
    assert uneven["diff"] == pytest.approx(0.25)
    assert uneven["high"] - 0.25 == pytest.approx(1.959964 * (2 * 0.5 ** 2 * 2) ** 0.5 / 6, abs=1e-5)


def test_no_spread_gives_a_zero_width_interval():
    d = paired_difference([1, 0, 1], [0, -1, 0], groups=["p", "p", "q"])
    assert (d["diff"], d["low"], d["high"]) == (-1.0, -1.0, -1.0)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="equally long, non-empty lists, not 6 and 5"):
        paired_difference(A, B[:5])
    with pytest.raises(ValueError, match="not 0 and 0"):
        paired_difference([], [])

"""A-STAR: losses against hand-computed values, normalisation, binarisation."""

import math

import pytest
import torch

from attnsteer.guidance.astar import (
    binarize,
    concept_maps,
    gaussian_smooth,
    otsu_threshold,
    retention_loss,
    segregation_loss,
)

A1 = torch.tensor([[1.0, 0.5, 0.0], [0.5, 0.25, 0.0], [0.0, 0.0, 0.0]])  # sum 2.25
A2 = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])  # sum 2.5; min with A1 sums to 0.75
A3 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # disjoint from A1 and A2
B1 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # sum 3; min with A1 sums to 2


def test_segregation_loss_by_hand():
    maps = torch.stack([torch.stack([A1, A2, A3]), torch.stack([A1, A1, A2])])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    loss = segregation_loss(maps, valid)
    # row 0: (A1, A2) 0.75 / 4.75, the pairs with A3 0; row 1: (A1, A1) 2.25 / 4.5, A2 is padding
    torch.testing.assert_close(loss, torch.tensor([0.75 / 4.75, 0.5]))


def test_retention_loss_by_hand():
    maps = torch.stack([torch.stack([A1, A2])])
    masks = torch.stack([torch.stack([B1, A2])])
    # A1 vs B1: 1 - 2 / 5.25; A2 vs itself: 1 - 2.5 / 5 = 0.5
    torch.testing.assert_close(retention_loss(maps, masks, torch.tensor([[True, True]])), torch.tensor([1 - 2 / 5.25 + 0.5]))
    torch.testing.assert_close(retention_loss(maps, masks, torch.tensor([[True, False]])), torch.tensor([1 - 2 / 5.25]))


def test_otsu_and_tau_binarisation():
    values = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.0, 0.0, 1.0, 0.5]])
    torch.testing.assert_close(otsu_threshold(values), torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(binarize(A1[None], "otsu")[0], (A1 > 0.25).float())
    torch.testing.assert_close(binarize(A1[None], 0.5)[0], (A1 >= 0.5).float())
    assert not binarize(A1.clone().requires_grad_(True), 0.5).requires_grad


def test_gaussian_smoothing_is_a_normalised_gaussian():
    impulse = torch.zeros(5, 5)
    impulse[2, 2] = 1.0
    out = gaussian_smooth(impulse[None, None], 3, 0.5)[0, 0]
    g = torch.tensor([math.exp(-1 / (2 * 0.25)), 1.0, math.exp(-1 / (2 * 0.25))])
    torch.testing.assert_close(out[1:4, 1:4], torch.outer(g, g) / g.sum() ** 2)
    torch.testing.assert_close(gaussian_smooth(torch.full((1, 2, 4, 4), 0.3)), torch.full((1, 2, 4, 4), 0.3))
    torch.testing.assert_close(gaussian_smooth(A1[None], 3, 0.0), A1[None])


def test_concept_maps_normalise_to_one_and_sum_a_concepts_tokens():
    tokens = torch.stack([A1, A2, A3, torch.zeros(3, 3)])[None] * 0.01  # raw probabilities are small
    membership = torch.tensor([[[1.0, 1.0, 0, 0], [0, 0, 1.0, 0]]])
    plain = concept_maps(tokens, membership, normalize="max", smoothing=(0, 0.0))
    torch.testing.assert_close(plain[0, 0], (A1 + A2) / (A1 + A2).max())
    torch.testing.assert_close(plain[0, 1], A3)
    valid = torch.tensor([[True, True, True, False]])
    soft = concept_maps(tokens, membership, valid, smoothing=(0, 0.0))
    probs = torch.softmax(torch.stack([A1, A2, A3]), dim=0)
    torch.testing.assert_close(soft[0, 0], (probs[0] + probs[1]) / (probs[0] + probs[1]).max())
    with_padding = concept_maps(tokens, membership, None, smoothing=(0, 0.0))
    assert (with_padding[0, 1] - soft[0, 1]).abs().max() > 1e-3  # an unmasked padding token takes mass
    assert soft.amax((-2, -1)).allclose(torch.ones(1, 2))

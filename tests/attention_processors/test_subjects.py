"""Subject attention (IR-Diffusion's isolation, reposition, mask dropout and mutual cross-attention)
against explicit per-query references."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from attnsteer.attention_processors import CROSS, JOINT, SELF, AttentionCall, LayerInfo, TokenLayout
from attnsteer.attention_processors.subjects import (SubjectAttention, Subjects, check_reposition, isolation,
                                                     reposition, resize_masks)

GRID = (4, 4)


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def call(kind=SELF, text=0, grid=GRID, name="layer"):
    image = slice(0, grid[0] * grid[1])
    layout = TokenLayout(image, slice(image.stop, image.stop + text) if text else None, grid)
    return AttentionCall(LayerInfo(name, kind, 2, None), layout)


def box(top, bottom, left, right):
    mask = torch.zeros(GRID, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def barred(masks, qi, ki):
    """The authors' rule: a query of subject i does not see a key of subject j != i. ``masks``: [S, L]."""
    subjects = range(masks.shape[0])
    return any(masks[i, qi] and masks[j, ki] for i in subjects for j in subjects if i != j)


def isolation_reference(masks, qi, ki):
    """Whether query ``qi`` may see key ``ki``: not barred, unless the query is barred from every key."""
    if all(barred(masks, qi, k) for k in range(masks.shape[-1])):
        return True
    return not barred(masks, qi, ki)


@pytest.mark.parametrize("masks,pairs", [
    # overlapping at (1, 1), token 5: it and subject 0's own tokens are barred from each other
    (torch.stack([box(0, 2, 0, 2), box(1, 3, 1, 4)]), {(5, 0): False, (0, 5): False, (0, 1): True}),
    # covering the grid, overlapping on rows 1-2: a query there is barred from every key, so keeps all
    (torch.stack([box(0, 3, 0, 4), box(1, 4, 0, 4), box(3, 4, 3, 4)]), {(5, 0): True, (0, 15): False}),
], ids=["overlap", "cover"])
def test_isolation_bars_every_query_of_a_subject_from_every_key_of_the_others(masks, pairs):
    flat = masks.flatten(1)
    allowed = isolation(flat[None])[0]
    for qi, ki in itertools.product(range(16), range(16)):
        assert allowed[qi, ki] == isolation_reference(flat, qi, ki), (qi, ki)
    assert {pair: bool(allowed[pair]) for pair in pairs} == pairs


def test_reposition_resizes_the_source_box_onto_the_target_box_nearest():
    source, target = box(0, 2, 0, 2), box(1, 4, 2, 4)  # a 2 x 2 box read onto a 3 x 2 box
    source[1, 1] = False  # a hole in the source mask: the canvas tokens landing on it stay closed
    index, valid = reposition(source, target)
    expected = {(1, 2): (0, 0), (1, 3): (0, 1), (2, 2): (0, 0), (2, 3): (0, 1), (3, 2): (1, 0), (3, 3): (1, 1)}
    for y, x in itertools.product(range(4), range(4)):
        at = y * 4 + x
        if (y, x) in expected:
            sy, sx = expected[(y, x)]
            assert index[at] == sy * 4 + sx and valid[at] == source[sy, sx], (y, x)
        else:
            assert not valid[at]
    assert not reposition(torch.zeros(GRID, dtype=torch.bool), target)[1].any()


def reference(q, k, v, masks, sources, text=0, isolate=True, move=True, own=None):
    """Per row and query: softmax over the explicitly listed keys it may see (own keys under isolation
    and the layer's own mask ``own``, then each read subject's canvas tokens), the canvas built token
    by token."""
    out = torch.zeros_like(q)
    n_img = 16
    for b in range(q.shape[0]):
        for qi in range(q.shape[-2]):
            keys, values = [], []
            for ki in range(k.shape[-2]):
                if own is not None and not own[b, 0, qi, ki]:
                    continue
                if isolate and qi < n_img and ki < n_img and not isolation_reference(masks[b], qi, ki):
                    continue
                keys.append(k[b, :, ki]), values.append(v[b, :, ki])
            for s in range(masks.shape[1]):
                src = -1 if sources is None else int(sources[b, s])
                if src < 0 or qi >= n_img or not masks[b, s, qi]:
                    continue
                index, valid = reposition(masks[src, s].view(GRID), masks[b, s].view(GRID)) if move else (
                    torch.arange(n_img), masks[src, s])
                for p in range(n_img):
                    if valid[p]:
                        keys.append(k[src, :, index[p]]), values.append(v[src, :, index[p]])
            kk, vv = torch.stack(keys, 1), torch.stack(values, 1)  # [H, n, D]
            weights = torch.softmax((q[b, :, qi, None, :] * kk).sum(-1) / q.shape[-1] ** 0.5, -1)
            out[b, :, qi] = (weights[..., None] * vv).sum(1)
    return out


@pytest.mark.parametrize("text", [0, 3], ids=["self", "joint"])
def test_isolation_and_reading_equal_the_explicit_reference(text):
    torch.manual_seed(0)
    rows, length = 3, 16 + text
    q, k, v = (torch.randn(rows, 2, length, 8) for _ in range(3))
    masks = torch.zeros(rows, 2, *GRID, dtype=torch.bool)
    masks[0, 0], masks[1, 1] = box(0, 2, 0, 3), box(2, 4, 1, 4)  # each reference holds its own subject
    masks[2, 0], masks[2, 1] = box(0, 3, 0, 2), box(1, 4, 2, 4)  # the target holds both, elsewhere
    sources = torch.tensor([[-1, -1], [-1, -1], [0, 1]])
    steer = SubjectAttention(["layer"], ["layer"])
    steer.subjects = Subjects(masks, sources)
    out = steer.attention(call(JOINT if text else SELF, text), q, k, v, None, sdpa)
    flat = masks.flatten(2)
    torch.testing.assert_close(out, reference(q, k, v, flat, sources, text), atol=1e-5, rtol=1e-5)
    steer.subjects = Subjects(masks)  # isolation only
    torch.testing.assert_close(steer.attention(call(JOINT if text else SELF, text), q, k, v, None, sdpa),
                               reference(q, k, v, flat, None, text), atol=1e-5, rtol=1e-5)
    steer.subjects = Subjects(masks, sources, isolation=False, reposition=False)  # shared attention
    torch.testing.assert_close(steer.attention(call(JOINT if text else SELF, text), q, k, v, None, sdpa),
                               reference(q, k, v, flat, sources, text, isolate=False, move=False), atol=1e-5, rtol=1e-5)


def test_each_stack_of_rows_reads_within_itself():
    torch.manual_seed(1)
    q, k, v = (torch.randn(6, 2, 16, 8) for _ in range(3))  # [uncond refs+target, cond refs+target]
    masks = torch.zeros(3, 2, *GRID, dtype=torch.bool)
    masks[0, 0], masks[1, 1], masks[2, 0], masks[2, 1] = box(0, 2, 0, 2), box(2, 4, 2, 4), box(0, 2, 2, 4), box(2, 4, 0, 2)
    sources = torch.tensor([[-1, -1], [-1, -1], [0, 1]])
    steer = SubjectAttention(["layer"], ["layer"])
    steer.subjects = Subjects(masks, sources)
    out = steer.attention(call(), q, k, v, None, sdpa)
    both = torch.tensor([[-1, -1], [-1, -1], [0, 1], [-1, -1], [-1, -1], [3, 4]])
    torch.testing.assert_close(out, reference(q, k, v, masks.flatten(2).repeat(2, 1, 1), both), atol=1e-5, rtol=1e-5)


def test_no_subjects_or_empty_masks_pass_the_call_through_untouched():
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    seen = []

    def record(*args):
        seen.append(args)
        return sdpa(*args)

    steer = SubjectAttention(["layer"], ["layer"])
    steer.attention(call(), q, k, v, None, record)
    steer.subjects = Subjects(torch.zeros(2, 2, 8, 8), torch.full((2, 2), -1))
    steer.attention(call(), q, k, v, None, record)
    assert all(a[0] is q and a[1] is k and a[2] is v and a[3] is None for a in seen) and len(seen) == 2


def test_masks_are_resized_to_each_layer_grid_by_area():
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, :4, :3] = 1  # half of the 2-wide cells of column 1 are covered
    assert resize_masks(masks, (4, 4))[0, 0].tolist() == [[True, True, False, False]] * 2 + [[False] * 4] * 2


def test_rotary_models_are_refused_for_reposition():
    class FluxTransformer2DModel(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="FluxTransformer2DModel rotates positions into its keys \\(RoPE\\)"):
        check_reposition(FluxTransformer2DModel())


def test_a_layers_own_mask_is_kept_on_its_keys():
    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 2, 16, 8) for _ in range(3))
    own = torch.ones(3, 1, 16, 16, dtype=torch.bool)
    own[..., 12:] = False  # the layer itself hides keys 12-15
    masks = torch.zeros(3, 2, *GRID, dtype=torch.bool)
    masks[0, 0], masks[1, 1], masks[2, 0], masks[2, 1] = box(0, 2, 0, 2), box(0, 2, 2, 4), box(2, 4, 0, 2), box(0, 2, 0, 2)
    sources = torch.tensor([[-1, -1], [-1, -1], [0, 1]])
    steer = SubjectAttention(["layer"], ["layer"])
    steer.subjects = Subjects(masks, sources)
    out = steer.attention(call(), q, k, v, own, sdpa)
    torch.testing.assert_close(out, reference(q, k, v, masks.flatten(2), sources, own=own), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.5, 0.2])
def test_dropout_keeps_the_asked_fraction_of_reading_queries_at_every_grid_and_the_boxes_whole(dropout):
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.bool)  # given at 16 x 16, read at 4 x 4 to 16 x 16
    masks[0, 0, 2:12, 3:13] = True  # the reference's subject
    masks[1, 0, :9] = True  # the target's: 8, 40 and 144 tokens at the three grids
    sources, draws = torch.tensor([[-1], [0]]), 60
    for grid in [(4, 4), (8, 8), (16, 16)]:
        length = grid[0] * grid[1]
        reference, inside = resize_masks(masks, grid)[:, 0].flatten(1)
        q, k, v = (torch.randn(2, 1, length, 4) for _ in range(3))
        seen = []

        def record(q, k, v, mask):  # only the mask matters here
            seen.append(mask)
            return torch.zeros_like(q)

        steer = SubjectAttention(["layer"], ["layer"])
        steer.subjects = Subjects(masks, sources)
        steer.attention(call(grid=grid), q, k, v, None, record)
        whole = seen[-1][0, 0, :, length:]  # [queries, canvas tokens] of the target without dropout
        kept = 0
        for seed in range(draws):
            steer.subjects = Subjects(masks, sources, dropout=dropout, seed=seed)
            steer.attention(call(grid=grid), q, k, v, None, record)
            canvas = seen[-1][0, 0, :, length:]
            reading = canvas.any(1)
            assert not reading[~inside].any()
            assert torch.equal(canvas[reading], whole[reading])  # a kept query reads the whole box
            kept += int(reading.sum())
            if seed < 10:  # shared attention: the reference's keys lose the tokens of the same draw
                steer.subjects = Subjects(masks, sources, reposition=False, dropout=dropout, seed=seed)
                steer.attention(call(grid=grid), q, k, v, None, record)
                canvas, both = seen[-1][0, 0, :, length:], inside & reference
                assert torch.equal(canvas.any(1)[both], canvas.any(0)[both]) and canvas.any(0)[both].any()
        n = int(inside.sum())
        expected = (1 - dropout) + dropout ** n  # a draw that drops every query keeps them all
        spread = (dropout * (1 - dropout) / (n * draws)) ** 0.5
        assert abs(kept / (n * draws) - expected) < 4 * spread + dropout ** n, (grid, kept / (n * draws), expected)


def test_mutual_cross_attention_equals_the_rule_computed_by_hand():
    torch.manual_seed(3)
    rows, heads, text, lam = 6, 2, 5, 0.9  # [uncond refs + target, cond refs + target]
    q = torch.randn(rows, heads, 16, 8)
    k, v = torch.randn(rows, heads, text, 8), torch.randn(rows, heads, text, 8)
    masks = torch.zeros(3, 2, *GRID, dtype=torch.bool)
    masks[0, 0], masks[1, 1] = box(0, 2, 0, 2), box(2, 4, 2, 4)
    masks[2, 0], masks[2, 1] = box(0, 3, 0, 3), box(2, 4, 1, 4)  # overlapping on row 2, columns 1-2
    steer = SubjectAttention([], [], ["cross"])
    steer.subjects = Subjects(masks, torch.tensor([[-1, -1], [-1, -1], [0, 1]]), mutual=lam)
    out = steer.attention(call(CROSS, name="cross"), q, k, v, None, sdpa)
    both = masks.flatten(2).repeat(2, 1, 1)
    reads = {2: [0, 1], 5: [3, 4]}  # target row: source row of each subject

    def attend(b, h, qi, source):
        weights = torch.softmax(k[source, h] @ q[b, h, qi] / 8 ** 0.5, 0)
        return weights @ v[source, h]

    for b, h, qi in itertools.product(range(rows), range(heads), range(16)):
        own = attend(b, h, qi, b)
        readings = [attend(b, h, qi, src) for s, src in enumerate(reads.get(b, [])) if both[b, s, qi]]
        expected = (1 - lam) * own + lam * sum(readings) / len(readings) if readings else own
        torch.testing.assert_close(out[b, h, qi], expected, atol=1e-5, rtol=1e-5)
    steer.subjects = Subjects(masks, torch.tensor([[-1, -1], [-1, -1], [0, 1]]))  # lambda 0: the plain layer
    torch.testing.assert_close(steer.attention(call(CROSS, name="cross"), q, k, v, None, sdpa), sdpa(q, k, v, None))

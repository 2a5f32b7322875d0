"""Subject attention (IR-Diffusion's isolation and reposition) against explicit per-query references."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from attnsteer.attention_processors import JOINT, SELF, AttentionCall, LayerInfo, TokenLayout
from attnsteer.attention_processors.subjects import (SubjectAttention, Subjects, check_reposition, isolation,
                                                     reposition, resize_masks)

GRID = (4, 4)


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def call(kind=SELF, text=0):
    image = slice(0, 16)
    layout = TokenLayout(image, slice(16, 16 + text) if text else None, GRID)
    return AttentionCall(LayerInfo("layer", kind, 2, None), layout)


def box(top, bottom, left, right):
    mask = torch.zeros(GRID, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def test_isolation_bars_each_subject_from_the_others_only():
    masks = torch.stack([box(0, 2, 0, 2), box(1, 3, 1, 4)]).flatten(1)[None]  # overlapping at (1, 1)
    allowed = isolation(masks)[0]
    for qi, ki in itertools.product(range(16), range(16)):
        q_in, k_in = masks[0, :, qi], masks[0, :, ki]
        blocked = bool(q_in.any() and k_in.any() and not (q_in & k_in).any())
        assert allowed[qi, ki] == (not blocked), (qi, ki)


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
                if isolate and qi < n_img and ki < n_img:
                    q_in, k_in = masks[b, :, qi], masks[b, :, ki]
                    if q_in.any() and k_in.any() and not (q_in & k_in).any():
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

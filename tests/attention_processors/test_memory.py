"""Frame memory: recorded subject tokens and pooled values, extra keys read against an explicit softmax."""

import pytest
import torch

from attnsteer.attention_processors import SELF, AttentionCall, LayerInfo, TokenLayout
from attnsteer.attention_processors.memory import FrameMemory, pack

GRID = (2, 2, 3)  # frames, h, w: 12 tokens


def call():
    return AttentionCall(LayerInfo("layer", SELF, 2, None), TokenLayout(slice(0, 12), None, GRID))


def sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def tensors(seed, rows=2, tokens=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 2, tokens, 4, generator=g) for _ in range(3)]


def test_pack_keeps_the_chosen_tokens_in_order_and_pads_shorter_rows():
    x = torch.arange(2 * 1 * 5 * 1, dtype=torch.float32).view(2, 1, 5, 1)
    keep = torch.tensor([[True, False, True, True, False], [False, True, False, False, False]])
    packed, valid = pack(x, keep)
    assert packed[0, 0, :, 0].tolist() == [0, 2, 3] and packed[1, 0, 0, 0] == 6
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_recording_pools_each_subjects_values_and_stores_the_subject_tokens():
    q, k, v = tensors(0)
    masks = torch.zeros(2, 2, 12, dtype=torch.bool)
    masks[0, 0, [1, 4]] = True
    masks[0, 1, [4, 7, 11]] = True
    masks[1, 1, [0]] = True  # row 1 lacks subject 0
    memory = FrameMemory(["layer"])
    memory.masks, memory.keep = masks, True
    out = memory.attention(call(), q, k, v, None, sdpa)
    torch.testing.assert_close(out, sdpa(q, k, v, None))  # recording changes nothing
    pooled = memory.pooled["layer"]
    torch.testing.assert_close(pooled[0, 0], v[0, :, [1, 4]].mean(1))
    torch.testing.assert_close(pooled[0, 1], v[0, :, [4, 7, 11]].mean(1))
    torch.testing.assert_close(pooled[1, 0], torch.zeros(2, 4))
    k_kept, v_kept, valid = memory.stored["layer"]
    torch.testing.assert_close(k_kept[0], k[0, :, [1, 4, 7, 11]])
    torch.testing.assert_close(v_kept[1, :, :1], v[1, :, [0]])
    assert valid.tolist() == [[True] * 4, [True, False, False, False]]


@pytest.mark.parametrize("own_mask", [False, True])
def test_extra_keys_join_each_rows_softmax_and_padding_is_never_read(own_mask):
    q, k, v = tensors(1)
    k_extra, v_extra, _ = tensors(2, tokens=3)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    mask = torch.randn(2, 1, 12, 12) if own_mask else None
    memory = FrameMemory(["layer"])
    memory.extra = {"layer": (k_extra, v_extra, valid)}
    out = memory.attention(call(), q, k, v, mask, sdpa)
    for row in range(2):
        n = int(valid[row].sum())
        keys = torch.cat([k[row], k_extra[row, :, :n]], 1)
        values = torch.cat([v[row], v_extra[row, :, :n]], 1)
        scores = q[row] @ keys.transpose(-1, -2) / 2.0  # head_dim 4
        if own_mask:
            scores[..., :12] += mask[row, 0]
        torch.testing.assert_close(out[row], torch.softmax(scores, -1) @ values, atol=1e-5, rtol=1e-5)


def test_masks_that_do_not_fit_the_call_are_refused():
    q, k, v = tensors(3)
    memory = FrameMemory(["layer"])
    memory.masks = torch.zeros(2, 1, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"subject masks of shape \(2, 1, 10\) for 2 rows of 12 image tokens"):
        memory.attention(call(), q, k, v, None, sdpa)
    memory.masks, memory.extra = None, {"layer": tuple(tensors(4, rows=3, tokens=2)[:2]) + (torch.ones(3, 2, dtype=torch.bool),)}
    with pytest.raises(ValueError, match="extra keys for 3 rows in a batch of 2"):
        memory.attention(call(), q, k, v, None, sdpa)

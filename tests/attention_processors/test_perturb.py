"""The cheap SoftPAG forms equal an explicit L x L reference map."""

import pytest
import torch

from attnsteer.attention_processors import AttentionCall, HeadPerturbation, LayerInfo, TokenLayout, identity_output


def reference(q, k, v, layout, mode, u, mask=None):
    """(1 - u) A V + u A_pert V with explicit L x L maps."""
    L, D = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-1, -2) / D**0.5
    if mask is not None:
        scores = scores + mask
    attn = torch.softmax(scores, -1)
    if mode == "joint" or layout.text is None:
        pert = torch.eye(L).expand_as(attn)
    else:
        block = torch.zeros(L, L)
        img = torch.arange(L)[layout.image]
        block[img.unsqueeze(1), img] = float("-inf")
        block[img, img] = 0.0
        pert = torch.softmax(scores + block, -1)
    return ((1 - u) * attn + u * pert) @ v


LAYOUTS = {
    "image-first (SD3)": TokenLayout(slice(0, 12), slice(12, 17), (3, 4)),
    "text-first (FLUX)": TokenLayout(slice(5, 17), slice(0, 5), (3, 4)),
    "self-attention": TokenLayout(slice(0, 17), None, None),
}


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("u", [0.3, 1.0])
def test_cheap_form_equals_explicit_map(mode, layout, u):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    target = identity_output(q, k, v, out, layout, mode, 8**-0.5)
    torch.testing.assert_close(torch.lerp(out, target, u), reference(q, k, v, layout, mode, u))


def test_image_mode_respects_an_additive_mask():
    torch.manual_seed(1)
    layout = LAYOUTS["text-first (FLUX)"]
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 17, dtype=torch.float64)
    mask[1, ..., 3:5] = float("-inf")  # padded text keys of sample 1
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    target = identity_output(q, k, v, out, layout, "image", 8**-0.5, mask)
    torch.testing.assert_close(target, reference(q, k, v, layout, "image", 1.0, mask))


def test_steer_touches_only_chosen_samples_and_heads():
    torch.manual_seed(2)
    layout = LAYOUTS["image-first (SD3)"]
    q, k, v = (torch.randn(3, 4, 17, 8, dtype=torch.float64) for _ in range(3))
    steer = HeadPerturbation(["layer"], mode="image")
    w = torch.zeros(3, 4, dtype=torch.float64)
    w[2, 1], w[2, 3], w[0, 2] = 0.5, 1.0, 0.25
    steer.set_weights({"layer": w})
    call = AttentionCall(LayerInfo("layer", "joint", 4, None), layout)
    sdpa = lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = steer.attention(call, q, k, v, None, sdpa)
    plain = sdpa(q, k, v, None)
    for b in range(3):
        for h in range(4):
            expected = reference(q[b, h], k[b, h], v[b, h], layout, "image", float(w[b, h]))
            torch.testing.assert_close(out[b, h], expected)
    assert torch.equal(out[1], plain[1])


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"'diagonal' is not one of \('joint', 'image'\)"):
        HeadPerturbation(["layer"], mode="diagonal")


def test_a_head_vector_perturbs_every_sample_alike():
    torch.manual_seed(3)
    layout = LAYOUTS["text-first (FLUX)"]
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    call = AttentionCall(LayerInfo("layer", "joint", 3, None), layout)
    sdpa = lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    outs = []
    for weights in (torch.tensor([0.0, 0.4, 1.0]), torch.tensor([[0.0, 0.4, 1.0]] * 2)):
        steer = HeadPerturbation(["layer"], mode="image")
        steer.set_weights({"layer": weights.double()})
        outs.append(steer.attention(call, q, k, v, None, sdpa))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0][:, 1], reference(q[:, 1], k[:, 1], v[:, 1], layout, "image", 0.4))

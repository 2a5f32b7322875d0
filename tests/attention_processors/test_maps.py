"""Attention-map capture: exact maps against an explicit softmax, rows and groups, early stop, layer choice."""

import pytest
import torch

from attnsteer.attention_processors import (
    CROSS,
    JOINT,
    AttentionMapCapture,
    LayoutRecorder,
    TokenLayout,
    architecture_of,
    list_layers,
    map_layers,
    steering,
    text_attention,
    token_weights,
)
from attnsteer.pipelines.tiny import tiny_components

TEXT_LEN = 7


def denoiser(kind):
    components = tiny_components(kind)
    return components["unet"] if "unet" in components else components["transformer"]


def call_args(model, kind, batch=2, seed=0):
    """Model-call arguments for a latent of 8 x 12 (FLUX: 4 x 6 tokens) and a text of TEXT_LEN tokens."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    if kind in ("sd", "sdxl"):
        args = dict(sample=torch.randn(batch, 4, 8, 12, generator=g), timestep=10,
                    encoder_hidden_states=torch.randn(batch, TEXT_LEN, c.cross_attention_dim, generator=g))
        if kind == "sdxl":
            args["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 32, generator=g), time_ids=torch.zeros(batch, 6))
        return args
    if kind == "sd3":
        return dict(hidden_states=torch.randn(batch, c.in_channels, 8, 12, generator=g), timestep=torch.full((batch,), 10.0),
                    encoder_hidden_states=torch.randn(batch, TEXT_LEN, c.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g))
    h, w = 4, 6
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(batch, h * w, c.in_channels, generator=g), timestep=torch.full((batch,), 0.5),
                encoder_hidden_states=torch.randn(batch, TEXT_LEN, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g), img_ids=img_ids,
                txt_ids=torch.zeros(TEXT_LEN, 3), guidance=torch.full((batch,), 3.0))


def output(model, args):
    out = model(**args, return_dict=False)
    return out[0]


class Grab:
    """Records each layer's q, k and SDPA scale."""

    def __init__(self, layers):
        self.layers, self.seen = frozenset(layers), {}

    def attention(self, call, q, k, v, mask, next):
        self.seen[call.name] = (q, k, call.scale(q.shape[-1]), call.layout)
        return next(q, k, v, mask)


def explicit_maps(q, k, scale, layout, weights):
    """Head-mean maps from the full L x L softmax(q k^T scale), restricted to image queries and text keys."""
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)[..., layout.image, :]
    if layout.text is not None:
        probs = probs[..., layout.text]
    maps = weights @ probs.mean(1).transpose(-1, -2)
    return maps.reshape(*maps.shape[:2], *layout.grid)


TOKENS = [[[1], [2, 3], []], [[4], [0], [6]]]  # row 0: 2 groups (one of 2 tokens), padded; row 1: 3 groups


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux"])
def test_maps_equal_an_explicit_softmax_and_leave_the_output_alone(kind):
    model = denoiser(kind)
    layers = [n for n, info in list_layers(model).items() if info.kind in (CROSS, JOINT)]
    args = call_args(model, kind)
    with torch.no_grad():
        plain = output(model, args)
        grab, capture = Grab(layers), AttentionMapCapture(layers)
        with steering(model, [grab, capture]):
            capture.arm(TOKENS)
            steered = output(model, args)
    torch.testing.assert_close(steered, plain, atol=1e-6, rtol=0)
    assert set(capture.maps) == set(layers)
    if kind == "flux":
        assert any(n.startswith("single_") for n in layers)
    for name in layers:
        q, k, scale, layout = grab.seen[name]
        expected = explicit_maps(q, k, scale, layout, token_weights(TOKENS, TEXT_LEN))
        assert capture.maps[name].shape == (2, 3, *layout.grid)
        torch.testing.assert_close(capture.maps[name], expected, atol=1e-5, rtol=0)
        assert capture.maps[name][0, 2].abs().max() == 0  # the padded group
    if kind != "sd":
        total = text_attention(q, k, layout, scale).sum(-1)
        assert (total < 1 - 1e-3).all()  # joint: image keys take part of each query's mass


def test_joint_text_probabilities_with_a_mask():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 17, 8, dtype=torch.float64), torch.randn(2, 3, 17, 8, dtype=torch.float64)
    mask = torch.rand(2, 1, 17, 17) > 0.3
    mask[..., torch.arange(17), torch.arange(17)] = True
    for layout in (TokenLayout(slice(0, 12), slice(12, 17), (3, 4)), TokenLayout(slice(5, 17), slice(0, 5), (3, 4))):
        scores = (q @ k.transpose(-1, -2)) * 0.3 + torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        expected = torch.softmax(scores, -1)[..., layout.image, layout.text]
        torch.testing.assert_close(text_attention(q, k, layout, 0.3, mask), expected)


def test_only_the_asked_rows_are_recorded_and_groups_sum_their_tokens():
    model = denoiser("sd3")
    layers = ["transformer_blocks.1.attn"]
    args = call_args(model, "sd3", batch=3)
    capture = AttentionMapCapture(layers)
    with torch.no_grad(), steering(model, [capture]):
        capture.arm([[[2, 3]], [[1], [4]]], rows=torch.tensor([2, 0]))
        output(model, args)
        pair = capture.maps[layers[0]]
        capture.arm([[[2], [3]]] * 3)
        output(model, args)
        singles = capture.maps[layers[0]]
    assert pair.shape[:2] == (2, 2)
    torch.testing.assert_close(pair[0, 0], singles[2, 0] + singles[2, 1])
    assert pair[0, 1].abs().max() == 0 and pair[1, 1].abs().max() > 0


def test_a_second_forward_of_one_arming_is_not_recorded():
    model = denoiser("sd")
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2"
    capture = AttentionMapCapture([layer])
    with torch.no_grad(), steering(model, [capture]):
        capture.arm([[[1]]], rows=torch.tensor([1]))
        output(model, call_args(model, "sd", seed=0))
        first = capture.maps[layer].clone()
        output(model, call_args(model, "sd", batch=1, seed=1))
    torch.testing.assert_close(capture.maps[layer], first, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_gradients_reach_the_input_and_early_stop_gives_the_same_maps(kind):
    model = denoiser(kind)
    grids = architecture_of(model).layer_grids(model, (8, 12))
    layers = [n for n, info in list_layers(model).items() if info.kind in (CROSS, JOINT)][:1]
    args = call_args(model, kind)
    key = "sample" if kind == "sd" else "hidden_states"
    last = model.up_blocks[-1] if kind == "sd" else model.single_transformer_blocks[-1]
    runs = []
    handle = last.register_forward_hook(lambda *a: runs.append(1))
    capture = AttentionMapCapture(layers)
    results = {}
    try:
        with steering(model, [capture]):
            for stop in (True, False):
                x = args[key].clone().requires_grad_(True)
                maps = capture.collect(lambda: model(**{**args, key: x}), [[[1], [2]]] * 2, grad=True, stop=stop)
                loss = (maps[layers[0]] ** 2).sum()
                results[stop] = (loss.detach(), torch.autograd.grad(loss, x)[0], len(runs))
                assert maps[layers[0]].shape[2:] == grids[layers[0]]
            with torch.no_grad():
                maps = capture.collect(lambda: model(**args), [[[1]]] * 2, grad=True)
            assert not maps[layers[0]].requires_grad
    finally:
        handle.remove()
    (loss_stop, grad_stop, runs_stop), (loss_full, grad_full, runs_full) = results[True], results[False]
    assert runs_stop == 0 and runs_full == 1
    assert grad_stop.abs().max() > 0
    torch.testing.assert_close(loss_stop, loss_full, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_stop, grad_full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_static_grids_equal_the_grids_of_a_call(kind):
    model = denoiser(kind)
    recorder = LayoutRecorder(list_layers(model))
    with torch.no_grad(), steering(model, [recorder]):
        output(model, call_args(model, kind, batch=1))
    grids = architecture_of(model).layer_grids(model, (8, 12))  # FLUX: 4 x 6 tokens of 2 x 2 latent pixels
    assert grids == {name: layout.grid for name, (layout, _, _) in recorder.seen.items()}


def test_default_layers_and_grid():
    sd = denoiser("sd")  # cross-attention at 16 x 16 (down 0, up 1 twice) and 8 x 8 (mid) for a 16 x 16 latent
    layers, grid = map_layers(sd, (16, 16))
    assert grid == (16, 16) and layers == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                                           "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                           "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    assert map_layers(sd, (64, 64)) == (["mid_block.attentions.0.transformer_blocks.0.attn2"], (32, 32))
    assert map_layers(sd, (16, 16), layers=[1]) == (["up_blocks.1.attentions.0.transformer_blocks.0.attn2"], (16, 16))
    sd3 = denoiser("sd3")
    assert map_layers(sd3, (16, 16)) == (["transformer_blocks.0.attn", "transformer_blocks.1.attn"], (8, 8))
    assert map_layers(denoiser("flux"), (16, 24), layers=["single_transformer_blocks.1.attn"])[1] == (8, 12)


BAD_LAYERS = [
    (dict(layers=["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]),
     r"layer 'down_blocks.0.attentions.0.transformer_blocks.0.attn1' is self-attention: it has no text keys to map"),
    (dict(grid=(4, 4)), r"map grid \(4, 4\) is not the grid of any chosen layer; their grids are \[\(8, 8\), \(16, 16\)\]"),
    (dict(layers=[0], grid=(8, 8)), r"map grid \(8, 8\) is not the grid of any chosen layer; their grids are \[\(16, 16\)\]"),
    (dict(layers=[0, 3]), r"the chosen layers have grids \[\(8, 8\), \(16, 16\)\]: maps are averaged at one grid"),
    (dict(layers=[0, 3], grid=(16, 16)), r"layer\(s\) \['mid_block.attentions.0.transformer_blocks.0.attn2'\] are not at the map grid \(16, 16\)"),
    (dict(layers=[4]), r"layer index 4 is out of range: the model has 4 layers with text keys \(0-3\)"),
    (dict(layers=["nope"]), r"unknown layer 'nope': allowed are the model's 4 cross/joint attention layers"),
]


@pytest.mark.parametrize("bad,message", BAD_LAYERS, ids=[m[:40] for _, m in BAD_LAYERS])
def test_bad_layer_choices_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        map_layers(denoiser("sd"), (16, 16), **bad)


def test_token_index_past_the_sequence_is_refused():
    with pytest.raises(ValueError, match=r"token index 7 is past the text sequence of 7 tokens \(0-6\)"):
        token_weights([[[1], [7]]], 7)


def test_a_self_attention_layer_armed_for_maps_is_refused():
    model = denoiser("sd")
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    capture = AttentionMapCapture([layer])
    with torch.no_grad(), steering(model, [capture]), pytest.raises(ValueError, match="is self-attention"):
        capture.collect(lambda: output(model, call_args(model, "sd")), [[[1]]] * 2)


@pytest.mark.parametrize("capture_outside", [True, False])
def test_capture_composes_with_a_perturbation_on_the_same_layer(capture_outside):
    from attnsteer.attention_processors import HeadPerturbation

    model = denoiser("sd3")
    layer = "transformer_blocks.0.attn"
    args = call_args(model, "sd3")
    perturb, capture = HeadPerturbation([layer], "image"), AttentionMapCapture([layer])
    perturb.set_weights({layer: torch.tensor([0.0, 1.0, 0.5, 0.0])})
    with torch.no_grad():
        with steering(model, [capture]):
            capture.arm([[[1]]] * 2)
            output(model, args)
            alone = capture.maps[layer]
        with steering(model, [perturb]):
            perturbed = output(model, args)
        outer, inner = (capture, perturb) if capture_outside else (perturb, capture)
        with steering(model, [outer]), steering(model, [inner]):
            capture.arm([[[1]]] * 2)
            both = output(model, args)
    torch.testing.assert_close(both, perturbed, atol=1e-6, rtol=0)
    torch.testing.assert_close(capture.maps[layer], alone, atol=1e-6, rtol=0)

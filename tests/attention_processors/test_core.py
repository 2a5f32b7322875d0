"""Steering core: addresses, token layouts from the tensors, install and restore."""

import inspect

import pytest
import torch

from attnsteer.attention_processors import (
    CROSS,
    JOINT,
    SELF,
    HeadPerturbation,
    LayoutRecorder,
    head_weights,
    list_layers,
    resolve_heads,
    steering,
)
from attnsteer.pipelines.tiny import tiny_components


def denoiser(kind):
    components = tiny_components(kind)
    return components["unet"] if "unet" in components else components["transformer"]


def test_layer_names_kinds_and_heads():
    flux = list_layers(denoiser("flux"))
    assert [n for n in flux if n.startswith("single_")] == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert {info.kind for info in flux.values()} == {JOINT}
    wan = list_layers(denoiser("wan"))
    assert wan["blocks.0.attn1"].kind == SELF and wan["blocks.0.attn2"].kind == CROSS
    unet = list_layers(denoiser("sd"))
    assert all(info.kind == (SELF if n.endswith("attn1") else CROSS) for n, info in unet.items())
    assert all(info.heads == info.module.heads for info in unet.values())


def test_indices_count_only_perturbable_layers():
    layers = list_layers(denoiser("sd"))
    selfs = [n for n, info in layers.items() if info.kind == SELF]
    assert resolve_heads("1:0-1", layers) == {selfs[1]: (0, 1)}
    assert resolve_heads([(selfs[0], 1), f"{selfs[0]}:0", {selfs[2]: "*"}][:2], layers) == {selfs[0]: (0, 1)}


def test_unsupported_architecture_is_named():
    from diffusers import SanaTransformer2DModel

    sana = SanaTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=4, in_channels=4,
                                  out_channels=4, cross_attention_dim=8, caption_channels=8, sample_size=8)
    with pytest.raises(ValueError, match="SanaTransformer2DModel cannot be steered: it uses linear attention"):
        list_layers(sana)


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux", "wan"])
def test_token_layouts_come_from_the_call(kind):
    model = denoiser(kind)
    recorder = LayoutRecorder(list_layers(model))
    torch.manual_seed(0)
    text_len = 7
    if kind == "sd":
        args = dict(sample=torch.randn(1, 4, 12, 20), timestep=10, encoder_hidden_states=torch.randn(1, text_len, 32))
    elif kind == "sd3":
        c = model.config
        args = dict(hidden_states=torch.randn(1, c.in_channels, 12, 20), timestep=torch.tensor([10.0]),
                    encoder_hidden_states=torch.randn(1, text_len, c.joint_attention_dim),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim))
    elif kind == "flux":
        c = model.config
        h, w = 3, 5
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1).reshape(-1, 3)
        args = dict(hidden_states=torch.randn(1, h * w, c.in_channels), timestep=torch.tensor([0.5]),
                    encoder_hidden_states=torch.randn(1, text_len, c.joint_attention_dim),
                    pooled_projections=torch.randn(1, c.pooled_projection_dim), img_ids=img_ids,
                    txt_ids=torch.zeros(text_len, 3), guidance=torch.tensor([3.0]) if c.guidance_embeds else None)
    else:
        c = model.config
        args = dict(hidden_states=torch.randn(1, c.in_channels, 3, 4, 6), timestep=torch.tensor([10.0]),
                    encoder_hidden_states=torch.randn(1, text_len, c.text_dim))
    with steering(model, [recorder]):
        model(**args)
    assert set(recorder.seen) == set(list_layers(model))
    for name, (layout, q, k) in recorder.seen.items():
        kind_of = list_layers(model)[name].kind
        n_image = layout.image.stop - layout.image.start
        assert n_image == torch.Size(layout.grid).numel()
        if kind_of == JOINT:
            assert layout.text.stop - layout.text.start == text_len and q[2] == n_image + text_len
            assert layout.image_first == (kind == "sd3")
        else:
            assert layout.text is None and q[2] == n_image
    grids = {layout.grid for layout, _, _ in recorder.seen.values()}
    if kind == "sd3":
        expected = {(12 // model.config.patch_size, 20 // model.config.patch_size)}
    else:
        expected = {"sd": {(12, 20), (6, 10)}, "flux": {(3, 5)}, "wan": {(3, 2, 3)}}[kind]
    assert grids == expected


def test_wrapped_processor_declares_the_same_arguments():
    model = denoiser("flux")
    name = "transformer_blocks.0.attn"
    module = list_layers(model)[name].module
    before = inspect.signature(module.processor.__call__)
    with steering(model, [HeadPerturbation([name])]):
        assert type(module.processor).__name__.startswith("Steered")
        assert inspect.signature(module.processor.__call__) == before
    assert not type(module.processor).__name__.startswith("Steered")


def test_model_is_restored_after_an_exception():
    model = denoiser("sd3")
    processors = dict(model.attn_processors)

    class Boom:
        layers = frozenset(["transformer_blocks.0.attn"])

        def attention(self, call, q, k, v, mask, next):
            raise RuntimeError("boom")

    c = model.config
    with pytest.raises(RuntimeError, match="boom"):
        with steering(model, [Boom()]):
            model(hidden_states=torch.randn(1, c.in_channels, 8, 8), timestep=torch.tensor([1.0]),
                  encoder_hidden_states=torch.randn(1, 3, c.joint_attention_dim),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim))
    assert model.attn_processors == processors and "forward" not in model.__dict__


def test_unknown_layer_in_a_steer_is_refused():
    with pytest.raises(ValueError, match=r"unknown attention layer\(s\) \['blocks.9.attn1'\] in WanTransformer3DModel"):
        with steering(denoiser("wan"), [HeadPerturbation(["blocks.9.attn1"])]):
            pass


def test_a_non_sdpa_attention_backend_is_refused():
    model = denoiser("wan")
    list_layers(model)["blocks.0.attn1"].module.processor._attention_backend = "flash"
    with pytest.raises(ValueError, match=r"layer 'blocks.0.attn1' uses attention backend 'flash', which bypasses"):
        with steering(model, [HeadPerturbation(["blocks.0.attn1"])]):
            pass


def test_a_processor_that_bypasses_sdpa_is_refused_at_install():
    from diffusers.models.attention_processor import AttnProcessor

    model = denoiser("sd")
    name = next(iter(list_layers(model)))
    list_layers(model)[name].module.set_processor(AttnProcessor())  # explicit softmax, no SDPA
    with pytest.raises(ValueError, match=rf"layer '{name}' uses processor AttnProcessor, which bypasses torch's"):
        with steering(model, [HeadPerturbation([name])]):
            pass
    assert type(list_layers(model)[name].module.processor) is AttnProcessor


def test_a_steered_call_that_bypasses_sdpa_is_reported():
    """The last safety net: a processor swapped in after the install check."""
    from diffusers.models.attention_processor import AttnProcessor

    model = denoiser("sd")
    name = next(iter(list_layers(model)))
    with pytest.raises(RuntimeError, match=rf"layer '{name}': its processor AttnProcessor did not call torch's"):
        with steering(model, [HeadPerturbation([name])]):
            list_layers(model)[name].module.processor.inner = AttnProcessor()
            model(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 3, 32))


def test_a_session_inside_another_sees_the_processor_it_wraps():
    model = denoiser("sd3")
    c = model.config
    inputs = dict(hidden_states=torch.randn(1, c.in_channels, 8, 8), timestep=torch.tensor([1.0]),
                  encoder_hidden_states=torch.randn(1, 3, c.joint_attention_dim),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim), return_dict=False)
    heads = {"transformer_blocks.0.attn": (0,)}
    steer = HeadPerturbation(heads)
    steer.set_weights(head_weights(heads, list_layers(model), 1.0))
    recorder = LayoutRecorder(list_layers(model))
    with torch.no_grad(), steering(model, [steer]):
        perturbed = model(**inputs)[0]
        with steering(model, [recorder]):
            inside = model(**inputs)[0]
    assert set(recorder.seen) == set(list_layers(model))
    torch.testing.assert_close(inside, perturbed, atol=0, rtol=0)


def test_every_denoiser_class_is_steered_or_refused_with_its_reason():
    from attnsteer.attention_processors.architectures import architecture_for, denoiser_classes, unsupported_reason

    classes = {cls.__name__: cls for cls in denoiser_classes()}
    assert {"Flux2Transformer2DModel", "QwenImageTransformer2DModel", "ZImageTransformer2DModel",
            "HunyuanVideo15Transformer3DModel", "SanaTransformer2DModel", "UNet2DConditionModel"} <= set(classes)
    steered = {name for name, cls in classes.items() if unsupported_reason(cls) is None}
    assert steered == {"UNet2DConditionModel", "DreamLiteUNetModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
                       "ChromaTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel",
                       "WanTransformer3DModel", "WanVACETransformer3DModel", "CogVideoXTransformer3DModel",
                       "HunyuanVideo15Transformer3DModel", "ZImageTransformer2DModel",
                       "LTXVideoTransformer3DModel"}
    assert all((architecture_for(cls) is None) == bool(unsupported_reason(cls)) for cls in classes.values())
    assert unsupported_reason(classes["SanaTransformer2DModel"]).startswith("it uses linear attention")
    assert unsupported_reason(classes["LTX2VideoTransformer3DModel"]).startswith("its blocks run a video and an audio stream")

"""Per-token attention maps of one generation through the pipelines' keyword arguments, and their picture."""

import numpy as np
import pytest
import torch
from PIL import Image

from attnsteer.pipelines import AttentionMaps, render_attention_maps
from diffusers import ChromaPipeline

from attnsteer.pipelines.steer import (FluxSteerPipeline, StableDiffusion3SteerPipeline, StableDiffusionSteerPipeline,
                                       steer_pipeline)
from attnsteer.pipelines.tiny import tiny_pipeline

CLASSES = {"sd": StableDiffusionSteerPipeline, "sd3": StableDiffusion3SteerPipeline, "flux": FluxSteerPipeline,
           "chroma": steer_pipeline(ChromaPipeline)}
PROMPT = "a red circle and a blue square"
_PIPES = {}


def pipe_of(kind):
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind, CLASSES[kind])
    return _PIPES[kind]


def call(kind, **extra):
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32, output_type="np")
    if kind in ("sd3", "flux", "chroma"):
        kwargs["max_sequence_length"] = 16
    kwargs.update(extra)
    return pipe_of(kind)(**kwargs, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", CLASSES)
def test_maps_average_the_steps_and_leave_the_images_alone(kind):
    plain = call(kind).images
    out = call(kind, return_attention_maps=["circle", "square"])
    np.testing.assert_array_equal(out.images, plain)
    maps = out.attention_maps
    assert isinstance(maps, AttentionMaps) and maps.steps == [0, 1] and maps.labels == [["circle", "square"]]
    assert maps.maps.shape == (1, 2, *maps.grid) and (maps.maps >= 0).all() and (maps.maps <= 1).all()
    first = call(kind, return_attention_maps=["circle", "square"], attention_maps_steps=(0.0, 0.5)).attention_maps
    second = call(kind, return_attention_maps=["circle", "square"], attention_maps_steps=(0.5, 1.0)).attention_maps
    assert first.steps == [0] and second.steps == [1]
    torch.testing.assert_close(maps.maps, (first.maps + second.maps) / 2)


@pytest.mark.parametrize("batching", ["batched", "sequential"])
def test_maps_are_of_the_conditional_rows_and_compose_with_astar_and_perturbation(batching):
    tokens = dict(return_attention_maps=[["circle", "square"], ["circle"]], attention_maps_steps=(0.0, 0.5))
    prompts = dict(prompt=[PROMPT, "a green circle"], guidance_scale=4.0, num_images_per_prompt=2)
    alone = call("sd3", **prompts, **tokens).attention_maps
    heads = dict(perturbed_heads="transformer_blocks.0.attn:*", softpag_u=1.0, perturbation_batching=batching)
    perturbed = call("sd3", **prompts, **tokens, **heads).attention_maps
    torch.testing.assert_close(perturbed.maps, alone.maps)  # step 0's conditional rows are not perturbed
    assert alone.maps.shape[:2] == (4, 2) and alone.labels == [["circle", "square"]] * 2 + [["circle"]] * 2
    assert alone.maps[2:, 1].abs().max() == 0
    astar = dict(astar_tokens=[["circle", "square"], []], astar_scale=200.0)
    with_astar = call("sd3", **prompts, **astar, return_attention_maps=[["circle", "square"], ["circle"]])
    np.testing.assert_array_equal(with_astar.images, call("sd3", **prompts, **astar).images)
    assert with_astar.attention_maps.steps == [0, 1]  # the gradient passes are not recorded
    assert (with_astar.attention_maps.maps[:2] - alone.maps[:2]).abs().max() > 0


def test_tuple_output_gets_the_maps_last_and_the_picture_has_a_tile_per_token():
    images, nsfw, maps = call("sd", return_attention_maps=["red circle", 5], return_dict=False, output_type="pil")
    assert maps.labels == [["red circle", "5"]]
    picture = render_attention_maps(images[0], maps.maps[0], maps.labels[0])
    assert isinstance(picture, Image.Image) and picture.size == (32 * 3, 32 + 12)
    array = np.asarray(picture)
    assert array[12:, 32:].std() > 0


def test_bad_map_arguments_are_refused_before_any_denoising():
    pipe = pipe_of("sd")
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"return_attention_maps: word 'hexagon' is not in the prompt"):
            call("sd", return_attention_maps=["hexagon"])
        with pytest.raises(ValueError, match=r"attention_maps_steps \(1.0, 0.5\) must be"):
            call("sd", return_attention_maps=["circle"], attention_maps_steps=(1.0, 0.5))
        with pytest.raises(ValueError, match=r"attention_maps_layers / attention_maps_grid: map grid \(5, 5\) is not"):
            call("sd", return_attention_maps=["circle"], attention_maps_grid=(5, 5))
    finally:
        handle.remove()
    assert calls == []

"""A-STAR: losses against hand-computed values, normalisation, binarisation; the latent update in a pipeline call."""

import inspect
import math

import numpy as np
import pytest
import torch

from attnsteer.attention_processors import map_layers, patched_attribute
from attnsteer.guidance.astar import (
    AStarGuidance,
    binarize,
    concept_maps,
    gaussian_smooth,
    otsu_threshold,
    retention_loss,
    segregation_loss,
)
from attnsteer.guidance.auxiliary import in_auxiliary_call
from attnsteer.pipelines.steer import (
    FluxSteerPipeline,
    StableDiffusion3SteerPipeline,
    StableDiffusionSteerPipeline,
    StableDiffusionXLSteerPipeline,
)
from attnsteer.pipelines.tiny import tiny_pipeline

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


# ---- the latent update inside a pipeline call -------------------------------------------------------------

CLASSES = {"sd": StableDiffusionSteerPipeline, "sdxl": StableDiffusionXLSteerPipeline,
           "sd3": StableDiffusion3SteerPipeline, "flux": FluxSteerPipeline}
LATENT = (16, 16)  # 32 px images, VAE factor 2 (FLUX: before packing)
_PIPES = {}


def pipe_of(kind):
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind, CLASSES[kind])
    return _PIPES[kind]


def model_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def run(kind, guidance=None, steps=2, **extra):
    pipe = pipe_of(kind)
    kwargs = dict(prompt="a red circle and a blue square", num_inference_steps=steps, height=32, width=32,
                  output_type="latent", generator=torch.Generator().manual_seed(0))
    if kind in ("sd3", "flux"):
        kwargs["max_sequence_length"] = 8
    kwargs.update(extra)
    if guidance is None:
        return pipe(**kwargs).images
    bound = inspect.signature(type(pipe).__bases__[-1].__call__).bind(pipe, **kwargs)
    bound.apply_defaults()
    with guidance.attached(model_of(pipe), pipe.scheduler, lambda m: pipe.branch_info(m, bound.arguments)):
        return pipe(**kwargs).images


def astar(kind, cls=AStarGuidance, layers=None, **options):
    names, grid = map_layers(model_of(pipe_of(kind)), LATENT, layers)
    return cls([[[2], [5]]], names, grid, context=[[1, 2, 3, 4, 5, 6]], **options)


def assert_restored(pipe):
    model = model_of(pipe)
    assert "forward" not in model.__dict__
    assert "step" not in pipe.scheduler.__dict__ and "scale_model_input" not in pipe.scheduler.__dict__
    assert all(not type(p).__name__.startswith("Steered") for p in model.attn_processors.values())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", CLASSES)
def test_alpha_zero_attached_is_the_parent_pipeline_and_the_loss_has_a_gradient(kind):
    guidance = astar(kind, scale=0.0)
    np.testing.assert_array_equal(run(kind, guidance).numpy(), run(kind).numpy())
    assert len(guidance.losses) == 2 and all(loss.shape == (1,) and loss.item() > 0 for loss in guidance.losses)
    moved = astar(kind, scale=50.0)
    assert (run(kind, moved) - run(kind)).abs().max() > 1e-4
    assert_restored(pipe_of(kind))


class KnownGradient(AStarGuidance):
    """A mocked loss: its gradient at step t is (t + 1) * G, and the latents it was given are recorded."""

    def gradient(self, maps_at, z, rows):
        self.seen.append(z.clone())
        g = torch.Generator().manual_seed(len(self.seen))
        self.grads.append(torch.randn(z.shape, generator=g))
        return self.grads[-1], torch.zeros(z.shape[0], 2, *self.grid)


def recording(log, key, position):
    """Wraps a function to log its argument ``key`` (or positional ``position``), except in auxiliary calls."""
    def wrap(original):
        def call(*args, **kwargs):
            if not in_auxiliary_call():
                log.append(kwargs[key] if key in kwargs else args[position])
            return original(*args, **kwargs)

        return call

    return wrap


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_the_scheduler_steps_from_z_minus_alpha_grad_and_the_model_sees_it(kind):
    pipe = pipe_of(kind)
    guidance = astar(kind, cls=KnownGradient, scale=3.0, window=(0.0, 0.5))
    guidance.seen, guidance.grads = [], []
    stepped, inputs = [], []
    model = model_of(pipe)
    key = "sample" if kind in ("sd", "sdxl") else "hidden_states"
    with patched_attribute(pipe.scheduler, "step", recording(stepped, "sample", 2)(pipe.scheduler.step)), \
            patched_attribute(model, "forward", recording(inputs, key, 0)(model.forward)):
        run(kind, guidance, steps=3, guidance_scale=5.0 if kind != "flux" else 3.5)
    assert len(guidance.seen) == 2 and len(stepped) == 3  # window (0, 0.5) of 3 steps: steps 0 and 1
    for t, (z, g) in enumerate(zip(guidance.seen, guidance.grads)):
        expected = z - guidance.alpha(t, 3) * g
        torch.testing.assert_close(stepped[t], expected, atol=1e-6, rtol=0)
        c_in = (pipe.scheduler.sigmas[t] ** 2 + 1) ** -0.5 if kind == "sdxl" else 1.0  # Euler scales the input
        torch.testing.assert_close(inputs[t][-z.shape[0]:], expected * c_in, atol=1e-6, rtol=0)
        if kind != "flux":
            torch.testing.assert_close(inputs[t][: z.shape[0]], expected * c_in, atol=1e-6, rtol=0)
    assert guidance.alpha(1, 3) == pytest.approx(3.0 * (0.75**0.5))


def test_early_stop_gives_the_loss_of_a_full_forward_and_skips_the_later_blocks():
    layer = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    model = model_of(pipe_of("sd"))
    runs = []
    handle = model.up_blocks[-1].register_forward_hook(lambda *a: runs.append(1))
    results = {}
    try:
        for early_stop in (True, False):
            runs.clear()
            guidance = astar("sd", layers=layer, early_stop=early_stop)
            results[early_stop] = (run("sd", guidance), torch.cat(guidance.losses), len(runs))
    finally:
        handle.remove()
    (stopped, loss_stopped, runs_stopped), (full, loss_full, runs_full) = results[True], results[False]
    torch.testing.assert_close(loss_stopped, loss_full, atol=1e-6, rtol=0)
    torch.testing.assert_close(stopped, full, atol=1e-5, rtol=0)
    assert runs_stopped == 2 and runs_full == 4  # the last up block runs in the 2 denoising calls, not in the gradient passes


def test_each_image_moves_only_its_own_latent():
    prompts = ["a red circle and a blue square", "a green triangle"]
    names, grid = map_layers(model_of(pipe_of("sd3")), LATENT)
    both = AStarGuidance([[[2], [5]], []], names, grid, context=[[1, 2, 3, 4, 5, 6], [1, 2, 3]], scale=50.0)
    guided = run("sd3", both, prompt=prompts)
    plain = run("sd3", prompt=prompts)
    assert (guided[0] - plain[0]).abs().max() > 1e-4
    np.testing.assert_array_equal(guided[1].numpy(), plain[1].numpy())
    alone = astar("sd3", scale=50.0)
    torch.testing.assert_close(run("sd3", alone)[0], guided[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.losses[1], both.losses[1][:1], atol=1e-6, rtol=0)
    assert both.losses[1][1] == 0


def test_retention_uses_the_previous_steps_masks_or_the_layout_masks():
    seg_only = astar("sd3", weights=(1.0, 0.0))
    both = astar("sd3")
    run("sd3", seg_only, steps=3)
    run("sd3", both, steps=3)
    torch.testing.assert_close(both.losses[0], seg_only.losses[0])  # no masks before the first guided step
    assert (both.losses[1] - seg_only.losses[1]).abs().max() > 1e-4
    assert both.retained.shape == (1, 2, *both.grid) and set(both.retained.unique().tolist()) <= {0.0, 1.0}
    left, right = torch.zeros(32, 32), torch.zeros(32, 32)
    left[:, :16], right[:, 16:] = 1, 1
    layout = astar("sd3", masks=[torch.stack([left, right])])
    run("sd3", layout, steps=1)
    rows = layout.rows(1)
    assert rows["masks"][0, 0, :, : layout.grid[1] // 2].min() == 1 and rows["masks"][0, 0, :, layout.grid[1] // 2:].max() == 0
    assert (layout.losses[0] - seg_only.losses[0]).abs().max() > 1e-4


def test_iterations_take_several_gradient_steps():
    guidance = astar("sd", iterations=3)
    run("sd", guidance, steps=1)
    assert len(guidance.losses) == 3 and guidance.losses[2] < guidance.losses[0]


class Boom(AStarGuidance):
    def loss(self, maps, rows):
        raise KeyboardInterrupt("boom")


def test_the_model_is_restored_when_the_call_raises():
    pipe = pipe_of("sdxl")
    with pytest.raises(KeyboardInterrupt, match="boom"):
        run("sdxl", astar("sdxl", cls=Boom))
    assert_restored(pipe)

    def fail(pipe, step, t, kwargs):
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt, match="stop"):
        run("sdxl", astar("sdxl"), callback_on_step_end=fail)
    assert_restored(pipe)


def test_sd3_skip_layer_calls_get_the_updated_latents_too():
    pipe = pipe_of("sd3")
    guidance = astar("sd3", cls=KnownGradient, scale=3.0)
    guidance.seen, guidance.grads = [], []
    stepped, inputs = [], []
    model = model_of(pipe)
    with patched_attribute(pipe.scheduler, "step", recording(stepped, "sample", 2)(pipe.scheduler.step)), \
            patched_attribute(model, "forward", recording(inputs, "hidden_states", 0)(model.forward)):
        run("sd3", guidance, steps=3, guidance_scale=5.0, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0)
    skip_calls = [x for x in inputs if x.shape[0] == 1]  # SD3 skips layers from step 1 on
    assert len(skip_calls) == 2 and len(guidance.seen) == 3
    for z_new, x in zip(stepped[1:], skip_calls):
        torch.testing.assert_close(x, z_new, atol=1e-6, rtol=0)

"""Every method that wraps ``scheduler.step`` passes it what the parent pipeline passes.

SD's ``prepare_extra_step_kwargs`` gives ``eta`` and ``generator`` to ``scheduler.step`` only when its
signature has them: a wrapper that hides the signature silently turns DDIM's eta into 0 and makes an
ancestral scheduler draw from the global RNG.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from attnsteer.pipelines.steer import StableDiffusionSteerPipeline
from attnsteer.pipelines.tiny import tiny_pipeline

SCENE, SUBJECTS = "a red circle and a blue square", ["a red circle", "a blue square"]
EMPTY_MASKS = np.zeros((3, 2, 8, 8), np.float32)
# Each method with arguments that leave the images as the parent's (None: A-STAR moves the latents).
METHODS = {
    "maps": dict(return_attention_maps=["circle", "square"]),
    "astar": dict(astar_tokens=["circle", "square"], astar_scale=20.0),
    "story": dict(story_subjects=SUBJECTS, story_masks=EMPTY_MASKS, story_read=False),
    "heads": dict(perturbed_heads="0:*", perturbation_scale=1.0, softpag_u=1.0),
}
NEUTRAL = ("maps", "story")


class RecordingDDIM(DDIMScheduler):
    """DDIM that records the ``eta`` and ``generator`` each step receives."""

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        self.seen.append((eta, generator is not None))
        return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise,
                            return_dict)


@pytest.fixture(scope="module")
def components():
    return tiny_pipeline("sd", StableDiffusionSteerPipeline).components


def pipe_with(components, scheduler_class):
    pipe = StableDiffusionSteerPipeline(**{**components, "scheduler": scheduler_class.from_config(
        components["scheduler"].config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, method=None, parent=False, **extra):
    prompts = SUBJECTS + [SCENE] if method == "story" else [SCENE]
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np", **extra,
                  generator=[torch.Generator().manual_seed(k) for k in range(len(prompts))])
    if parent:
        return super(StableDiffusionSteerPipeline, pipe).__call__(prompts, **kwargs).images
    return pipe(SCENE, **kwargs, **METHODS.get(method, {})).images


@pytest.mark.parametrize("method", METHODS)
def test_step_gets_the_parents_eta_and_generator(components, method):
    pipe = pipe_with(components, RecordingDDIM)
    pipe.scheduler.seen = []
    generate(pipe, method, parent=True, eta=0.7)
    parents = pipe.scheduler.seen
    pipe.scheduler.seen = []
    generate(pipe, method, eta=0.7)
    assert parents == [(0.7, True)] * 2 and pipe.scheduler.seen == parents


@pytest.mark.parametrize("method", METHODS)
def test_eta_and_the_generator_act_as_in_the_parent(components, method):
    ddim = pipe_with(components, DDIMScheduler)
    with_eta = generate(ddim, method, eta=1.0)
    assert np.abs(with_eta - generate(ddim, method, eta=0.0)).max() > 1e-4
    ancestral = pipe_with(components, EulerAncestralDiscreteScheduler)
    torch.manual_seed(1)
    first = generate(ancestral, method)
    torch.manual_seed(2)  # the global RNG must not matter: the steps draw from the call's generator
    np.testing.assert_array_equal(generate(ancestral, method), first)
    if method in NEUTRAL:
        np.testing.assert_array_equal(with_eta, generate(ddim, method, parent=True, eta=1.0))
        np.testing.assert_array_equal(first, generate(ancestral, method, parent=True))

"""IR-Diffusion through the steer pipelines' keyword arguments, on tiny random pipelines."""

import numpy as np
import pytest
import torch

from attnsteer.pipelines.steer import (FluxSteerPipeline, StableDiffusion3SteerPipeline, StableDiffusionSteerPipeline,
                                      StableDiffusionXLSteerPipeline)
from attnsteer.pipelines.tiny import tiny_pipeline

CLASSES = {"sd": StableDiffusionSteerPipeline, "sdxl": StableDiffusionXLSteerPipeline, "sd3": StableDiffusion3SteerPipeline,
           "flux": FluxSteerPipeline}
SCENE, SUBJECTS = "a red circle and a blue square", ["a red circle", "a blue square"]
_PIPES = {}


def pipe_of(kind):
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind, CLASSES[kind])
    return _PIPES[kind]


def generate(kind, prompt=SCENE, seed=0, **extra):
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    if kind in ("sd3", "flux"):
        kwargs["max_sequence_length"] = 8
    kwargs.update(extra)
    return pipe_of(kind)(prompt, **kwargs, generator=torch.Generator().manual_seed(seed)).images


def model_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def corner_masks():
    """Each reference's subject in its own corner, the target's subjects in the bottom corners."""
    masks = np.zeros((3, 2, 8, 8), np.float32)
    masks[0, 0, :4, :4], masks[1, 1, :4, 4:], masks[2, 0, 4:, :4], masks[2, 1, 4:, 4:] = 1, 1, 1, 1
    return masks


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3"])
def test_references_are_their_prompts_alone_and_the_target_changes(kind):
    story = generate(kind, story_subjects=SUBJECTS, num_inference_steps=3)  # IR acts from the second step
    assert story.shape[0] == 3
    for k, subject in enumerate(SUBJECTS):  # row k has seed + k and reads nothing
        np.testing.assert_allclose(story[k], generate(kind, subject, seed=k, num_inference_steps=3)[0], atol=1e-5)
    alone = generate(kind, seed=2, num_inference_steps=3)[0]
    assert np.abs(story[2] - alone).max() > 1e-4
    np.testing.assert_array_equal(story, generate(kind, story_subjects=SUBJECTS, num_inference_steps=3))


def test_empty_masks_without_reading_are_the_parent_pipeline():
    masks = np.zeros((3, 2, 8, 8), np.float32)
    story = generate("sd", story_subjects=SUBJECTS, story_masks=masks, story_read=False)
    pipe = pipe_of("sd")
    generators = [torch.Generator().manual_seed(k) for k in range(3)]
    parent = super(StableDiffusionSteerPipeline, pipe).__call__(
        SUBJECTS + [SCENE], num_inference_steps=2, height=32, width=32, output_type="np", generator=generators).images
    np.testing.assert_array_equal(story, parent)


def test_each_mechanism_acts_and_composes_with_head_perturbation():
    masks = corner_masks()
    full = generate("sd", story_subjects=SUBJECTS, story_masks=masks)
    without = {}
    for option, off in dict(story_reposition=False, story_isolation=False, story_read=False, story_mutual=0.0).items():
        without[option] = generate("sd", story_subjects=SUBJECTS, story_masks=masks, **{option: off})
        assert np.abs(without[option][2] - full[2]).max() > 1e-5, option
    np.testing.assert_array_equal(  # no reading: no mutual cross-attention either
        without["story_read"], generate("sd", story_subjects=SUBJECTS, story_masks=masks, story_read=False, story_mutual=0.0))
    perturbed = generate("sd", story_subjects=SUBJECTS, story_masks=masks, perturbed_heads="0:*")
    assert perturbed.shape == full.shape and np.abs(perturbed - full).max() > 1e-4


def test_a_segmenter_sees_the_rows_drawn_without_ir_and_its_masks_act_as_given():
    seen, steps = [], []
    segmenter = lambda images, subjects: seen.append((images, subjects)) or corner_masks()  # noqa: E731
    out = generate("sd", story_subjects=SUBJECTS, story_segmenter=segmenter,
                   callback_on_step_end=lambda pipe, i, t, kwargs: steps.append(i) or kwargs)
    np.testing.assert_array_equal(out, generate("sd", story_subjects=SUBJECTS, story_masks=corner_masks()))
    assert len(seen) == 1 and seen[0][1] == SUBJECTS and steps == [0, 1]  # the callback sees the IR pass only
    generators = [torch.Generator().manual_seed(k) for k in range(3)]
    parent = super(StableDiffusionSteerPipeline, pipe_of("sd")).__call__(
        SUBJECTS + [SCENE], num_inference_steps=2, height=32, width=32, output_type="pil", generator=generators).images
    for image, expected in zip(seen[0][0], parent):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


def test_without_a_generator_both_passes_start_from_the_same_noise():
    seen = []
    segmenter = lambda images, subjects: seen.extend(images) or np.zeros((3, 2, 8, 8))  # noqa: E731
    out = pipe_of("sd")(SCENE, story_subjects=SUBJECTS, story_segmenter=segmenter, story_read=False,
                        num_inference_steps=2, height=32, width=32, output_type="pil").images
    for image, first in zip(out, seen):  # empty masks, no reading: the IR pass is the parent pipeline again
        np.testing.assert_array_equal(np.asarray(image), np.asarray(first))


def test_a_segmenter_returning_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"story_segmenter's masks must be \[rows, subjects, H, W\] = \[3, 2, H, W\] "
                                         r"\(references then scenes\), got shape \(3, 8, 8\)"):
        generate("sd", story_subjects=SUBJECTS, story_segmenter=lambda images, subjects: np.zeros((3, 8, 8)))


def test_the_model_is_restored_when_the_call_raises():
    def fail(pipe, step, t, kwargs):
        raise KeyboardInterrupt("stop")

    pipe = pipe_of("sd")
    before = dict(model_of(pipe).attn_processors)
    with pytest.raises(KeyboardInterrupt):
        generate("sd", story_subjects=SUBJECTS, callback_on_step_end=fail)
    assert model_of(pipe).attn_processors == before and "forward" not in model_of(pipe).__dict__
    assert "step" not in pipe.scheduler.__dict__


BAD = [
    (dict(story_subjects=["a red circle", "a green star"]),
     r"story_words: the word 'green star' of subject 1 is not in scene 0 'a red circle and a blue square'"),
    (dict(story_subjects=[]), r"story_subjects must be a non-empty list of subject prompts"),
    (dict(story_subjects=SUBJECTS, story_masks=np.zeros((2, 2, 8, 8))),
     r"story_masks must be \[rows, subjects, H, W\] = \[3, 2, H, W\] \(references then scenes\), got shape \(2, 2, 8, 8\)"),
    (dict(story_subjects=SUBJECTS, story_masks=np.full((3, 2, 8, 8), 2.0)), r"story_masks values must lie in \[0, 1\]"),
    (dict(story_subjects=SUBJECTS, story_segmenter="sam"), r"story_segmenter must be a function segmenter\(images, "
                                                           r"subjects\) -> masks, got 'sam'"),
    (dict(story_subjects=SUBJECTS, story_segmenter=print, story_masks=np.zeros((3, 2, 8, 8))),
     r"give story_masks or story_segmenter, not both"),
    (dict(story_subjects=SUBJECTS, story_read_layers=["up_blocks.9.attn1"]), r"unknown attention layer 'up_blocks.9.attn1'"),
    (dict(story_subjects=SUBJECTS, story_isolate_layers=["mid_block.attentions.0.transformer_blocks.0.attn2"]),
     r"is cross-attention: isolation and reposition act on self-attention"),
    (dict(story_subjects=SUBJECTS, story_words=["circle"]), r"story_words must be one word \(or phrase\) per subject \(2\)"),
    (dict(story_subjects=SUBJECTS, story_dropout=1.0), r"story_dropout 1.0 must be a number in \[0, 1\)"),
    (dict(story_subjects=SUBJECTS, story_mutual=1.5), r"story_mutual 1.5 must be a number in \[0, 1\] \(the mutual "
                                                      r"cross-attention lambda; 0: off\)"),
    (dict(story_subjects=SUBJECTS, story_mutual=True), r"story_mutual True must be a number in \[0, 1\]"),
    (dict(story_subjects=SUBJECTS, story_reposition="yes"), r"story_reposition 'yes' must be True or False"),
    (dict(story_subjects=SUBJECTS, num_images_per_prompt=2), r"with story_subjects, num_images_per_prompt must be 1"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_refused_before_any_denoising(bad, message):
    pipe = pipe_of("sd")
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            generate("sd", **bad)
    finally:
        handle.remove()
    assert calls == []


def test_flux_is_refused_and_generator_lists_must_cover_every_row():
    with pytest.raises(ValueError, match=r"story_subjects: IR-Diffusion runs on the SD, SDXL and SD3 denoisers, not "
                                         r"on FluxSteerPipeline's FluxTransformer2DModel \(its rotary positions"):
        generate("flux", story_subjects=SUBJECTS)
    with pytest.raises(ValueError, match=r"generator must be one generator or a list of 3 \(2 references \+ 1 scenes\), got 2"):
        pipe_of("sd")(SCENE, story_subjects=SUBJECTS, generator=[torch.Generator()] * 2, num_inference_steps=1)


def test_reading_layers_are_the_authors_on_sdxls_layout_and_the_up_blocks_elsewhere():
    from diffusers import UNet2DConditionModel

    from attnsteer.pipelines.story import decoder_layers

    unet = UNet2DConditionModel(  # SDXL's blocks and transformer depths at a tiny width
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16), norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4))
    layer = "{}.attentions.{}.transformer_blocks.{}.attn1".format
    calls = ([layer("down_blocks.1", a, t) for a in range(2) for t in range(2)]
             + [layer("down_blocks.2", a, t) for a in range(2) for t in range(10)]
             + [layer("mid_block", 0, t) for t in range(10)]
             + [layer("up_blocks.0", a, t) for a in range(3) for t in range(10)]
             + [layer("up_blocks.1", a, t) for a in range(3) for t in range(2)])  # SDXL's 70, in call order
    assert len(calls) == 70 and decoder_layers(unet) == calls[36:]  # the authors' start_layer 36: 34 layers
    sd = model_of(pipe_of("sd"))
    assert decoder_layers(sd) == [n for n, m in sd.named_modules() if n.startswith("up_blocks.") and n.endswith("attn1")]

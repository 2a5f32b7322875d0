"""A-STAR through the steer pipelines' keyword arguments, on tiny random pipelines."""

import numpy as np
import pytest
import torch
from diffusers import ChromaPipeline
from transformers import T5Config, T5EncoderModel

from attnsteer.attention_processors import AttentionMapCapture
from attnsteer.guidance.astar import AStarGuidance
from attnsteer.pipelines.steer import (
    FluxSteerPipeline,
    StableDiffusion3SteerPipeline,
    StableDiffusionSteerPipeline,
    StableDiffusionXLSteerPipeline,
    steer_pipeline,
)
from attnsteer.pipelines.tiny import _t5_kwargs, clip_tokenizer, tiny_components, tiny_pipeline
from attnsteer.pipelines.tokens import content_indices, text_length, text_tokens, word_indices

CLASSES = {"sd": StableDiffusionSteerPipeline, "sdxl": StableDiffusionXLSteerPipeline,
           "sd3": StableDiffusion3SteerPipeline, "flux": FluxSteerPipeline, "chroma": steer_pipeline(ChromaPipeline)}
PROMPT = "a red circle and a blue square"
_PIPES = {}


def pipe_of(kind):
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind, CLASSES[kind])
    return _PIPES[kind]


def generate(kind, seed=0, **extra):
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32, output_type="np")
    if kind in ("sd3", "flux", "chroma"):
        kwargs["max_sequence_length"] = 8 if kind == "sd3" else 16  # FLUX's and Chroma's words are in their T5 part
    kwargs.update(extra)
    return pipe_of(kind)(**kwargs, generator=torch.Generator().manual_seed(seed)).images


def model_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def assert_restored(pipe):
    model = model_of(pipe)
    assert "forward" not in model.__dict__ and "cache_context" not in model.__dict__
    assert "step" not in pipe.scheduler.__dict__ and "scale_model_input" not in pipe.scheduler.__dict__
    assert all(not type(p).__name__.startswith("Steered") for p in model.attn_processors.values())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind", CLASSES)
def test_no_tokens_or_zero_scale_is_the_parent_pipeline_and_tokens_act(kind):
    base = generate(kind)
    tokens = ["circle", "square"]
    np.testing.assert_array_equal(generate(kind, astar_tokens=None), base)
    np.testing.assert_array_equal(generate(kind, astar_tokens=tokens, astar_scale=0.0), base)
    np.testing.assert_array_equal(generate(kind, astar_tokens=tokens, astar_weights=(0.0, 0.0)), base)
    np.testing.assert_array_equal(generate(kind, astar_tokens=[]), base)
    guided = generate(kind, astar_tokens=tokens, astar_scale=200.0)
    assert np.abs(guided - base).max() > 1e-3
    np.testing.assert_array_equal(guided, generate(kind, astar_tokens=tokens, astar_scale=200.0))
    assert_restored(pipe_of(kind))


@pytest.fixture
def losses(monkeypatch):
    """The per-image losses of every gradient pass of the calls in a test."""
    seen = []
    gradient = AStarGuidance.gradient

    def recording(self, maps_at, z, rows):
        grad, concepts = gradient(self, maps_at, z, rows)
        seen.append(self.losses[-1])
        return grad, concepts

    monkeypatch.setattr(AStarGuidance, "gradient", recording)
    return seen


@pytest.mark.parametrize("batching", ["batched", "sequential"])
def test_astar_composes_with_head_perturbation(losses, batching):
    heads = dict(perturbed_heads="transformer_blocks.0.attn:1", softpag_u=0.8, perturbation_batching=batching)
    alone = generate("sd3", astar_tokens=["circle", "square"], astar_scale=200.0)
    first_alone = losses[0]
    both = generate("sd3", astar_tokens=["circle", "square"], astar_scale=200.0, **heads)
    perturbed = generate("sd3", **heads)
    torch.testing.assert_close(losses[2], first_alone)  # the gradient pass does not see the perturbation
    assert np.abs(both - alone).max() > 1e-3 and np.abs(both - perturbed).max() > 1e-3
    other = "sequential" if batching == "batched" else "batched"
    np.testing.assert_allclose(both, generate("sd3", astar_tokens=["circle", "square"], astar_scale=200.0,
                                              **{**heads, "perturbation_batching": other}), atol=1e-5, rtol=0)
    assert_restored(pipe_of("sd3"))


def test_prompt_lists_get_their_own_concepts_and_images_per_prompt(losses):
    prompts = [PROMPT, "a green triangle"]
    plain = generate("sd", prompt=prompts, num_images_per_prompt=2)
    guided = generate("sd", prompt=prompts, num_images_per_prompt=2, astar_tokens=[["red circle", "square"], []],
                      astar_scale=200.0)
    assert losses[0].shape == (4,) and (losses[0][2:] == 0).all() and (losses[0][:2] > 0).all()
    np.testing.assert_array_equal(guided[2:], plain[2:])
    assert np.abs(guided[:2] - plain[:2]).max() > 1e-3


def test_layout_masks_and_options_reach_the_guidance(losses):
    left, right = np.zeros((32, 32), np.float32), np.zeros((32, 32), np.float32)
    left[:, :16], right[:, 16:] = 1, 1
    generate("sd", astar_tokens=["circle", "square"], astar_weights=(1.0, 0.0), num_inference_steps=1)
    generate("sd", astar_tokens=["circle", "square"], astar_masks=[left, right], num_inference_steps=1)
    generate("sd", astar_tokens=["circle", "square"], astar_iterations=2, num_inference_steps=1)
    seg, with_masks = losses[0], losses[1]
    assert with_masks > seg and len(losses) == 4


def test_the_model_is_restored_when_the_call_raises():
    def fail(pipe, step, t, kwargs):
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        generate("flux", astar_tokens=["circle", "square"], perturbed_heads="single_transformer_blocks.0.attn:*",
                 callback_on_step_end=fail)
    assert_restored(pipe_of("flux"))


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_gradient_checkpointing_recomputes_the_maps_and_changes_nothing(kind, monkeypatch):
    guided = dict(astar_tokens=["circle", "square"], astar_scale=200.0)
    base = generate(kind, **guided)
    recomputed, maps = [], AttentionMapCapture._maps

    def spy(self, call, *args):
        if self._replay is not None:
            recomputed.append(call.name)
        return maps(self, call, *args)

    monkeypatch.setattr(AttentionMapCapture, "_maps", spy)
    assert np.array_equal(generate(kind, **guided), base) and recomputed == []
    np.testing.assert_array_equal(generate(kind, **guided, astar_checkpointing=True), base)
    assert recomputed, "the backward did not recompute a checkpointed block's maps"
    model, recomputed[:] = model_of(pipe_of(kind)), []
    blocks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    model.enable_gradient_checkpointing()  # the user's own setting is honoured, then restored
    funcs = [m._gradient_checkpointing_func for m in blocks]
    try:
        np.testing.assert_array_equal(generate(kind, **guided), base)
        assert recomputed and all(m.gradient_checkpointing for m in blocks)
        assert [m._gradient_checkpointing_func for m in blocks] == funcs
    finally:
        model.disable_gradient_checkpointing()
    assert not any(m.gradient_checkpointing for m in blocks)


def test_words_map_to_each_encoders_text_keys():
    sd = pipe_of("sd")
    args = dict(prompt=PROMPT)
    assert word_indices(sd, args, "circle") == [3] and word_indices(sd, args, "Red Circle") == [2, 3]
    assert content_indices(sd, args) == [1, 2, 3, 4, 5, 6, 7] and text_length(sd, args) == 77
    assert text_tokens(sd, args)[:4] == [(0, "<|startoftext|>"), (1, "a</w>"), (2, "red</w>"), (3, "circle</w>")]
    flux = pipe_of("flux")  # T5 only (a CLIP tokenizer stands in for T5 in the tiny pipeline)
    assert word_indices(flux, dict(prompt="a dog", prompt_2=PROMPT, max_sequence_length=16), "square") == [7]
    assert text_length(flux, dict(prompt=PROMPT, max_sequence_length=16)) == 16
    chroma = pipe_of("chroma")  # T5 (a CLIP tokenizer stands in), first in the joint sequence
    assert word_indices(chroma, dict(prompt=PROMPT, max_sequence_length=16), "blue square") == [6, 7]
    assert text_length(chroma, dict(prompt=PROMPT, max_sequence_length=16)) == 16
    with pytest.raises(ValueError, match=r"word 'square' is not in the prompt .* within its first 8 tokens"):
        word_indices(flux, dict(prompt=PROMPT, max_sequence_length=8), "square")  # truncated away
    sd3 = pipe_of("sd3")  # no T5: the CLIP part only; the joint text is 77 + max_sequence_length
    args = dict(prompt=PROMPT, max_sequence_length=8)
    assert word_indices(sd3, args, "square") == [7] and text_length(sd3, args) == 85
    components = tiny_components("sd3")
    components.update(text_encoder_3=T5EncoderModel(T5Config(**_t5_kwargs())), tokenizer_3=clip_tokenizer(512))
    with_t5 = StableDiffusion3SteerPipeline(**components)
    args = dict(prompt=PROMPT, max_sequence_length=16)
    assert word_indices(with_t5, args, "square") == [7, 77 + 7]  # found in both parts, summed
    assert word_indices(with_t5, {**args, "max_sequence_length": 8}, "square") == [7]  # truncated in T5
    assert content_indices(with_t5, args)[-3:] == [77 + 5, 77 + 6, 77 + 7] and text_length(with_t5, args) == 93


BAD = [
    (dict(astar_tokens=["circle", "hexagon"]),
     r"astar_tokens: word 'hexagon' is not in the prompt 'a red circle and a blue square' \(as tokenised, within its first 77 tokens\)"),
    (dict(astar_tokens=[2, 85]), r"astar_tokens: token index 85 is past the text sequence of 85 tokens \(0-84\)"),
    (dict(astar_tokens=["circle"]), r"astar_tokens: segregation needs at least two concepts per prompt; prompt 0 has one \(\['circle'\]\)"),
    (dict(astar_tokens=["circle", 2.5]), r"astar_tokens: 2.5 is not a word, a token index or a list of token indices"),
    (dict(astar_tokens="circle"), r"astar_tokens must be a list of words or token indices"),
    (dict(prompt=[PROMPT, PROMPT], astar_tokens=[["circle", "square"]]),
     r"astar_tokens: 2 prompts need 2 token lists, one per prompt"),
    (dict(prompt=[PROMPT, PROMPT], astar_tokens=["circle", "square"]), r"astar_tokens: 2 prompts need 2 token lists"),
    (dict(astar_tokens=["circle", "square"], astar_grid=(3, 3)),
     r"astar_layers / astar_grid: map grid \(3, 3\) is not the grid of any chosen layer; their grids are \[\(8, 8\)\]"),
    (dict(astar_tokens=["circle", "square"], astar_layers=[5]), r"astar_layers / astar_grid: layer index 5 is out of range"),
    (dict(astar_tokens=["circle", "square"], astar_scale=-1.0), r"astar_scale -1.0 must be a finite number >= 0"),
    (dict(astar_tokens=["circle", "square"], astar_steps=(0.5, 0.2)), r"astar_steps \(0.5, 0.2\) must be \(start, stop\) fractions"),
    (dict(astar_tokens=["circle", "square"], astar_schedule="cosine"), r"astar_schedule 'cosine' is not one of \('sqrt', 'constant'\)"),
    (dict(astar_tokens=["circle", "square"], astar_iterations=0), r"astar_iterations 0 must be an integer >= 1"),
    (dict(astar_tokens=["circle", "square"], astar_weights=(1.0,)), r"astar_weights \(1.0,\) must be \(w_seg, w_ret\)"),
    (dict(astar_tokens=["circle", "square"], astar_normalize="l2"), r"astar_normalize 'l2' is not one of \('softmax', 'max'\)"),
    (dict(astar_tokens=["circle", "square"], astar_smoothing=(2, 0.5)), r"astar_smoothing \(2, 0.5\) must be \(size, sigma\)"),
    (dict(astar_tokens=["circle", "square"], astar_checkpointing="yes"), r"astar_checkpointing 'yes' must be True or False"),
    (dict(astar_tokens=["circle", "square"], astar_binarization=1.5), r"astar_binarization 1.5 must be 'otsu' or a threshold in \(0, 1\]"),
    (dict(astar_tokens=["circle", "square"], astar_masks=[np.ones((4, 4))]),
     r"astar_masks: prompt 0 needs 2 2-D masks of one size, one per concept, got shapes \[\(4, 4\)\]"),
    (dict(astar_tokens=["circle", "square"], astar_masks=[np.ones((4, 4)), 2 * np.ones((4, 4))]),
     r"astar_masks: prompt 0's mask values must lie in \[0, 1\]"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_refused_before_any_denoising(bad, message):
    pipe = pipe_of("sd3")
    calls = []
    handles = [pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1)),
               pipe.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))]
    try:
        with pytest.raises(ValueError, match=message):
            generate("sd3", **bad)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
    assert_restored(pipe)


def test_self_attention_layers_and_words_without_a_prompt_are_refused():
    with pytest.raises(ValueError, match=r"astar_layers / astar_grid: layer 'mid_block.attentions.0.transformer_blocks.0.attn1' "
                                         r"is self-attention: it has no text keys to map"):
        generate("sd", astar_tokens=["circle", "square"], astar_layers=["mid_block.attentions.0.transformer_blocks.0.attn1"])
    embeds = torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match=r"astar_tokens: the word 'circle' needs the prompt text; with prompt_embeds give token indices"):
        generate("sd", prompt=None, prompt_embeds=embeds, negative_prompt_embeds=embeds, astar_tokens=["circle", "square"])

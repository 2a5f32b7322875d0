"""Head-level perturbation guidance through the pipeline subclasses, on tiny random pipelines."""

import inspect
import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3PAGPipeline

from attnsteer.attention_processors import CROSS, HeadPerturbation, head_weights, list_layers, steering
from attnsteer.pipelines.steer import (
    FluxSteerPipeline,
    StableDiffusion3SteerPipeline,
    StableDiffusionSteerPipeline,
    StableDiffusionXLSteerPipeline,
    WanSteerPipeline,
)
from attnsteer.pipelines.tiny import tiny_components, tiny_pipeline

CLASSES = {
    "sd": StableDiffusionSteerPipeline,
    "sdxl": StableDiffusionXLSteerPipeline,
    "sd3": StableDiffusion3SteerPipeline,
    "flux": FluxSteerPipeline,
    "wan": WanSteerPipeline,
}
_PIPES = {}


def pipe_of(kind):
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind, CLASSES[kind])
        _PIPES[kind].set_progress_bar_config(disable=True)
    return _PIPES[kind]


def generate(kind, seed=0, **extra):
    kwargs = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np")
    if kind == "wan":
        kwargs.update(num_frames=5, height=16, width=16)
    if kind in ("sd3", "flux", "wan"):
        kwargs["max_sequence_length"] = 8
    kwargs.update(extra)
    out = pipe_of(kind)(**kwargs, generator=torch.Generator().manual_seed(seed))
    return out.frames if kind == "wan" else out.images


def first_layer(kind):
    return next(n for n, info in list_layers(pipe_of(kind).steer_denoisers()[
        "unet" if kind in ("sd", "sdxl") else "transformer"]).items() if info.kind != CROSS)


def assert_restored(pipe):
    for model in pipe.steer_denoisers().values():
        assert "forward" not in model.__dict__ and "cache_context" not in model.__dict__
        for name, processor in model.attn_processors.items():
            assert not type(processor).__name__.startswith("Steered"), name


def assert_refused_before_denoising(kind, message, **call):
    """The call raises ValueError matching ``message`` and no denoiser forward ran."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in pipe_of(kind).steer_denoisers().values()]
    try:
        with pytest.raises(ValueError, match=message):
            generate(kind, **call)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
    assert_restored(pipe_of(kind))


@pytest.mark.parametrize("kind", CLASSES)
def test_no_heads_or_u0_is_the_parent_pipeline(kind):
    base = generate(kind)
    parent = type(pipe_of(kind)).__bases__[-1]
    assert parent.__call__ is not CLASSES[kind].__call__
    np.testing.assert_allclose(generate(kind, perturbed_heads=[]), base, atol=1e-6, rtol=0)
    np.testing.assert_allclose(generate(kind, perturbed_heads=f"{first_layer(kind)}:0", softpag_u=0.0), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", CLASSES)
def test_perturbation_acts_and_batched_equals_sequential(kind):
    heads = f"{first_layer(kind)}:0"
    base = generate(kind)
    batched = generate(kind, perturbed_heads=heads, softpag_u=0.7)
    sequential = generate(kind, perturbed_heads=heads, softpag_u=0.7, perturbation_batching="sequential")
    assert np.abs(batched - base).max() > 1e-3
    np.testing.assert_allclose(batched, sequential, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(batched, generate(kind, perturbed_heads=heads, softpag_u=0.7))
    assert_restored(pipe_of(kind))


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("batching", ["batched", "sequential"])
def test_image_mode_whole_layer_equals_diffusers_pag(guidance_scale, batching):
    components = tiny_components("sd3")
    allowed = inspect.signature(StableDiffusion3PAGPipeline.__init__).parameters
    pag = StableDiffusion3PAGPipeline(**{k: v for k, v in components.items() if k in allowed},
                                      pag_applied_layers=[r"^transformer_blocks\.1\.attn$"])
    pag.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                  max_sequence_length=8, guidance_scale=guidance_scale)
    expected = pag(**kwargs, pag_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    ours = generate("sd3", guidance_scale=guidance_scale, perturbed_heads="transformer_blocks.1.attn:*",
                    perturbation_mode="image", softpag_u=1.0, perturbation_scale=3.0, perturbation_batching=batching)
    assert np.abs(expected - generate("sd3", guidance_scale=guidance_scale)).max() > 1e-3
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_window_outside_all_steps_is_the_parent_pipeline():
    heads = "transformer_blocks.0.attn:1"
    base = generate("sd3", num_inference_steps=4)
    late = generate("sd3", num_inference_steps=4, perturbed_heads=heads, perturbation_window=(0.5, 1.0))
    full = generate("sd3", num_inference_steps=4, perturbed_heads=heads)
    assert np.abs(late - base).max() > 1e-4 and np.abs(late - full).max() > 1e-4


def test_model_is_restored_when_the_call_raises():
    def fail(pipe, step, t, kwargs):
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        generate("flux", perturbed_heads="single_transformer_blocks.0.attn:*", callback_on_step_end=fail)
    assert_restored(pipe_of("flux"))


def test_head_set_file_supplies_defaults(tmp_path):
    from attnsteer.attention_processors import HeadSetFile

    path = tmp_path / "heads.json"
    HeadSetFile(heads=["transformer_blocks.1.attn:2", [0, 3]], model="tiny", mode="image", u=0.5, w=2.0).save(str(path))
    from_file = generate("sd3", perturbed_heads=str(path))
    explicit = generate("sd3", perturbed_heads="1:2 transformer_blocks.0.attn:3", perturbation_mode="image",
                        softpag_u=0.5, perturbation_scale=2.0)
    np.testing.assert_array_equal(from_file, explicit)


def test_head_set_file_model_must_match_the_pipeline(tmp_path):
    from attnsteer.attention_processors import HeadSetFile

    path = str(tmp_path / "heads.json")
    HeadSetFile(heads=["0:1"], model="stabilityai/stable-diffusion-3-medium-diffusers").save(path)
    pipe = pipe_of("sd3")
    try:
        pipe.register_to_config(_name_or_path="/data/stable-diffusion-3-medium-diffusers/")
        assert pipe.perturbation_guidance(perturbed_heads=path).heads == {"transformer_blocks.0.attn": (1,)}
        pipe.register_to_config(_name_or_path="/work/samples/models/shapes-sd3")
        message = (rf"head-set file '{path}' was made for model 'stabilityai/stable-diffusion-3-medium-diffusers', "
                   r"but this pipeline's model is '/work/samples/models/shapes-sd3'; use a head set made for this model, "
                   r"or edit or remove the file's \"model\" field")
        assert_refused_before_denoising("sd3", message, perturbed_heads=path)
    finally:
        pipe.register_to_config(_name_or_path=None)
    pipe.perturbation_guidance(perturbed_heads=path)  # built in code: no name to check against


def test_malformed_head_set_file_is_named(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text('{"heads": ["0:1",]}')
    assert_refused_before_denoising("sd3", rf"head-set file '{path}' is not valid JSON: Expecting value at line 1 column 18",
                                    perturbed_heads=str(path))


def test_numpy_and_tensor_numbers_are_numbers():
    heads = "transformer_blocks.0.attn:1"
    expected = generate("sd3", perturbed_heads=heads, perturbation_scale=2.0, softpag_u=0.5, perturbation_window=(0.0, 0.5))
    given = generate("sd3", perturbed_heads=heads, perturbation_scale=np.float32(2.0), softpag_u=torch.tensor(0.5),
                     perturbation_window=(np.int64(0), np.float64(0.5)), num_inference_steps=np.int64(2))
    np.testing.assert_array_equal(given, expected)


def test_no_step_count_is_left_to_diffusers_with_its_own_sigmas():
    sigmas = [1.0, 0.5]
    np.testing.assert_array_equal(generate("sd3", num_inference_steps=None, sigmas=sigmas, perturbed_heads="0:1"),
                                  generate("sd3", sigmas=sigmas, perturbed_heads="0:1"))


def reference_latents(pipe, latents, num_steps, prediction):
    """The denoising loop by hand on a fresh copy of ``pipe``'s schedule; ``prediction(i, t, latents)`` is eps."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    for i, t in enumerate(scheduler.timesteps):
        latents = scheduler.step(prediction(i, t, latents), t, latents, return_dict=False)[0]
    return latents


def perturbed_call(model, heads, u, call):
    steer = HeadPerturbation(heads)
    steer.set_weights(head_weights(heads, list_layers(model), u))
    with steering(model, [steer]):
        return call()


def test_sd3_skip_layer_guidance_is_computed_from_the_true_conditional_prediction():
    """eps_u + g (eps_c - eps_u) + s (eps_c - eps_skip) + w (eps_c - eps_p) with SD3's skip-layer guidance on
    steps 1 and 2 of 3 (i > 0 * 3 and i < 1 * 3), against the loop by hand."""
    pipe, model = pipe_of("sd3"), pipe_of("sd3").transformer
    g, s, w, u, heads = 4.0, 2.0, 3.0, 0.5, {"transformer_blocks.0.attn": (1,)}
    call = dict(prompt="a red circle", num_inference_steps=3, height=32, width=32, max_sequence_length=8,
                guidance_scale=g, output_type="latent", skip_guidance_layers=[1], skip_layer_guidance_scale=s,
                skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    ours = pipe(**call, perturbed_heads="transformer_blocks.0.attn:1", perturbation_scale=w, softpag_u=u,
                generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt("a red circle", None, None, max_sequence_length=8)
        noise = pipe.prepare_latents(1, model.config.in_channels, 32, 32, cond.dtype, "cpu", torch.Generator().manual_seed(0))

        def prediction(i, t, latents):
            run = lambda text, pool, **kw: model(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=text,
                                                 pooled_projections=pool, return_dict=False, **kw)[0]
            eps_c, eps_u = run(cond, pooled), run(uncond, uncond_pooled)
            eps_p = perturbed_call(model, heads, u, lambda: run(cond, pooled))
            eps = eps_u + g * (eps_c - eps_u) + w * (eps_c - eps_p)
            return eps + s * (eps_c - run(cond, pooled, skip_layers=[1])) if i > 0 else eps

        expected = reference_latents(pipe, noise, 3, prediction)
    assert (ours - pipe(**call, generator=torch.Generator().manual_seed(0)).images).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert_restored(pipe)


def test_wan22_second_stage_with_guidance_scale_2_zero_is_exact():
    """Wan 2.2: transformer on step 0 (t = 1000 >= 0.5 * 1000) with g = 5, transformer_2 on step 1 with g = 0,
    where CFG keeps only eps_u: eps_u + w (eps_c - eps_p), against the loop by hand."""
    components = tiny_components("wan")
    components["transformer_2"] = tiny_components("wan", seed=1)["transformer"]
    pipe = WanSteerPipeline(**components, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    g, w, u, heads = 5.0, 2.0, 0.7, {"blocks.0.attn1": (1,)}
    ours = pipe(prompt="a red circle", num_inference_steps=2, num_frames=5, height=16, width=16, max_sequence_length=8,
                guidance_scale=g, guidance_scale_2=0.0, output_type="latent", perturbed_heads="blocks.0.attn1:1",
                perturbation_scale=w, softpag_u=u, generator=torch.Generator().manual_seed(0)).frames
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a red circle", max_sequence_length=8, device="cpu")
        noise = pipe.prepare_latents(1, 16, 16, 16, 5, torch.float32, "cpu", torch.Generator().manual_seed(0))

        def prediction(i, t, latents):
            model, scale = (pipe.transformer, g) if i == 0 else (pipe.transformer_2, 0.0)
            run = lambda text: model(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=text,
                                     return_dict=False)[0]
            eps_c, eps_u = run(cond), run(uncond)
            eps_p = perturbed_call(model, heads, u, lambda: run(cond))
            return eps_u + scale * (eps_c - eps_u) + w * (eps_c - eps_p)

        expected = reference_latents(pipe, noise, 2, prediction)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert_restored(pipe)


def test_attention_slicing_is_refused_when_steering_is_installed():
    pipe = pipe_of("sd")
    name = first_layer("sd")
    pipe.enable_attention_slicing()
    try:
        assert_refused_before_denoising(
            "sd", rf"layer '{name}' uses processor SlicedAttnProcessor, which bypasses torch's scaled_dot_product_attention; "
                  r"steered layers need one that calls it, e.g. AttnProcessor2_0, .*WanAttnProcessor \(attention slicing: call "
                  r"pipe.disable_attention_slicing\(\)\)", perturbed_heads=f"{name}:0")
    finally:
        pipe.disable_attention_slicing()


def test_classic_attention_processor_is_refused_when_steering_is_installed():
    from diffusers.models.attention_processor import AttnProcessor

    pipe = pipe_of("sd3")
    processors = pipe.transformer.attn_processors
    pipe.transformer.set_attn_processor(AttnProcessor())
    try:
        assert_refused_before_denoising(
            "sd3", r"layer 'transformer_blocks.0.attn' uses processor AttnProcessor, which bypasses torch's "
                   r"scaled_dot_product_attention; steered layers need one that calls it, e.g. AttnProcessor2_0, "
                   r"FusedAttnProcessor2_0, JointAttnProcessor2_0", perturbed_heads="0:0")
    finally:
        pipe.transformer.set_attn_processor(processors)


class Delegating:
    """A processor attnsteer has never seen, computing the layer with the one it is given."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_an_unknown_processor_is_judged_by_what_it_does():
    """Steered when its attention goes through SDPA (the same images as diffusers' own processor);
    refused at its first call when it does not, the model restored."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = pipe_of("sd")
    processors = pipe.unet.attn_processors
    heads = dict(perturbed_heads="mid_block.attentions.0.transformer_blocks.0.attn1:*", perturbation_scale=3.0)
    expected = generate("sd", **heads)
    try:
        pipe.unet.set_attn_processor(Delegating(AttnProcessor2_0()))
        np.testing.assert_allclose(generate("sd", **heads), expected, atol=1e-5)
        pipe.unet.set_attn_processor(Delegating(AttnProcessor()))
        with pytest.raises(RuntimeError, match=r"layer 'mid_block.attentions.0.transformer_blocks.0.attn1': its processor "
                                               r"Delegating did not call torch's scaled_dot_product_attention"):
            generate("sd", **heads)
        assert_restored(pipe)
    finally:
        pipe.unet.set_attn_processor(processors)


def test_a_global_non_sdpa_attention_backend_is_refused_when_steering_is_installed():
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend("flex"):
        assert_refused_before_denoising(
            "wan", r"layer 'blocks.0.attn1' uses attention backend 'flex' \(the active default\), which bypasses torch's "
                   r"scaled_dot_product_attention; steered layers need one of \('native', '_native_cudnn', "
                   r"'_native_efficient', '_native_flash', '_native_math'\)", perturbed_heads="blocks.0.attn1:0")


BAD = [
    (dict(perturbed_heads="transformer_blocks.9.attn:0"), r"unknown layer 'transformer_blocks.9.attn': allowed are the model's 2"),
    (dict(perturbed_heads="transformer_blocks.1.attn:4"), r"head 4 of layer 'transformer_blocks.1.attn' is out of range: it has 4 heads \(0-3\)"),
    (dict(perturbed_heads="5:0"), r"layer index 5 is out of range: the model has 2 self/joint attention layers \(0-1\)"),
    (dict(perturbed_heads="transformer_blocks.1.attn"), r"head spec item 'transformer_blocks.1.attn' is not LAYER:HEADS"),
    (dict(perturbed_heads="0:0", softpag_u=1.5), r"softpag_u 1.5 must be in \[0, 1\]"),
    (dict(perturbed_heads="0:0", softpag_u=-0.1), r"softpag_u -0.1 must be in \[0, 1\]"),
    (dict(perturbed_heads="0:0", perturbation_mode="text"), r"perturbation_mode 'text' is not one of \('joint', 'image'\)"),
    (dict(perturbed_heads="0:0", perturbation_batching="parallel"), r"perturbation_batching 'parallel' is not one of"),
    (dict(perturbed_heads="0:0", perturbation_window=(0.5, 0.2)), r"perturbation_window \(0.5, 0.2\) must be"),
    (dict(perturbed_heads="0:0", perturbation_scale=float("nan")), r"perturbation_scale nan must be a finite number"),
    (dict(perturbed_heads="0:0", perturbation_scale=True),
     r"perturbation_scale True must be a number \(int, float, numpy scalar or 0-d tensor\), not bool"),
    (dict(perturbed_heads="0:0", perturbation_scale=torch.ones(2)),
     r"perturbation_scale tensor\(\[1., 1.\]\) must be a number \(int, float, numpy scalar or 0-d tensor\), not Tensor"),
    (dict(perturbed_heads="0:0", softpag_u="0.5"),
     r"softpag_u '0.5' must be a number \(int, float, numpy scalar or 0-d tensor\), not str"),
    (dict(perturbed_heads="0:0", perturbation_window=(0.0, True)), r"perturbation_window \(0.0, True\) must be"),
    (dict(perturbed_heads="0:0", perturbation_window=0.5), r"perturbation_window 0.5 must be"),
    (dict(num_inference_steps=0), r"num_inference_steps 0 must be a positive integer"),
    (dict(num_inference_steps=-1, perturbed_heads="0:0"), r"num_inference_steps -1 must be a positive integer"),
    (dict(num_inference_steps=2.5), r"num_inference_steps 2.5 must be a positive integer"),
    (dict(num_inference_steps=True), r"num_inference_steps True must be a positive integer"),
    (dict(perturbed_heads="0:3-1"), r"head spec item '0:3-1': range '3-1' is reversed; ranges are a-b with a <= b"),
    (dict(perturbed_heads="0:"), r"head spec item '0:' names no heads: HEADS is a comma list of integers, ranges a-b or '\*'"),
    (dict(perturbed_heads={"transformer_blocks.0.attn": []}), r"head spec item 'transformer_blocks.0.attn:' names no heads"),
    (dict(perturbed_heads="missing-heads.json"), r"head-set file 'missing-heads.json' does not exist"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_refused_before_any_denoising(bad, message):
    assert_refused_before_denoising("sd3", message, **bad)


def test_cross_attention_heads_are_refused():
    with pytest.raises(ValueError, match=r"is cross-attention; only self- or joint-attention layers are allowed"):
        generate("sd", perturbed_heads="mid_block.attentions.0.transformer_blocks.0.attn2:0")


@pytest.mark.parametrize("kind,bad,message", [
    ("sd", dict(perturbed_head="0:*"), r"unknown keyword argument 'perturbed_head'; did you mean 'perturbed_heads'\?"),
    ("sd", dict(astar_token=["circle"]), r"unknown keyword argument 'astar_token'; did you mean 'astar_tokens'\?"),
    ("sd", dict(sparse_poool=(2, 2)), r"unknown keyword argument 'sparse_poool'; did you mean 'sparse_pool'\?"),
    ("sd", dict(story_lambda=0.9), r"unknown keyword argument 'story_lambda'; attnsteer's starting with 'story' are "
                                   r"story_subjects, story_words"),
    ("sd", dict(fifo_partitions=2), r"unknown keyword argument 'fifo_partitions': FIFO and Ouroboros arguments are "
                                    r"WanFIFOPipeline's"),
    ("sd", dict(astar_tokens=["circle", "circle"]), r"astar_tokens: 'circle' names the same tokens as 'circle' "
                                                    r"\(prompt 0\): give each concept once"),
    ("wan", dict(astar_tokens=["circle", "square"]), r"astar_tokens: A-STAR and attention maps run on the image "
                                                     r"pipelines .* WanSteerPipeline is a video pipeline"),
    ("wan", dict(return_attention_maps=["circle"]), r"return_attention_maps: A-STAR and attention maps run on"),
    ("sd", dict(perturbation_scale=3.0), r"perturbation_scale acts only with perturbed_heads \(or "
                                         r"perturbed_heads_per_prompt\), which is not given"),
    ("sd", dict(perturbation_window=(0.0, 0.5)), r"perturbation_window acts only with perturbed_heads"),
    ("sd", dict(astar_scale=5.0), r"astar_scale acts only with astar_tokens, which is not given"),
    ("sd", dict(attention_maps_steps=(0.0, 0.5)), r"attention_maps_steps acts only with return_attention_maps"),
    ("sd", dict(story_dropout=0.0), r"story_dropout acts only with story_subjects"),
    ("wan", dict(sparse_pool=(2, 2)), r"sparse_pool acts only with sparsity \(or sparse_mask 'radial' or 'tile'\)"),
])
def test_misspelt_and_unusable_method_arguments_are_refused_before_any_denoising(kind, bad, message):
    assert_refused_before_denoising(kind, message, **bad)


def test_the_parents_own_keywords_pass_as_before():
    """SD's ``**kwargs`` takes its deprecated ``callback_steps``; ours only refuses names that look like ours."""
    generate("sd", callback_steps=1)


def test_a_bad_call_entry_of_a_model_folder_is_named(tmp_path):
    tiny_pipeline("sd").save_pretrained(tmp_path)
    for call, message in [({"guidance": 3.0}, r"\"call\" names 'guidance', which is not a call argument of "
                                               r"StableDiffusionSteerPipeline; did you mean 'guidance_scale'\?"),
                          (3, r"\"call\" must be an object of StableDiffusionSteerPipeline call arguments, got 3")]:
        (tmp_path / "attnsteer.json").write_text(json.dumps({"call": call}))
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / "attnsteer.json")) + ": " + message):
            StableDiffusionSteerPipeline.from_pretrained(tmp_path)


def test_a_prompt_longer_than_the_tokenizer_is_said_to_be_cut_once():
    """transformers' tokenizer and diffusers both announce it; only diffusers' (which names the cut part) is kept."""
    import logging

    said = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    loggers = [logging.getLogger(name) for name in ("transformers.tokenization_utils_base",
                                                    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")]
    handler = Keep()
    for logger in loggers:
        logger.addHandler(handler)
    try:
        generate("sd", prompt=" ".join(["a red circle"] * 40), num_inference_steps=1)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert len(said) == 1 and "The following part of your input was truncated" in said[0]


def steered_layers(kind):
    model = pipe_of(kind).steer_denoisers()["unet" if kind in ("sd", "sdxl") else "transformer"]
    return [n for n, info in list_layers(model).items() if info.kind != CROSS]


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("batching", ["batched", "sequential"])
def test_prefix_reuse_gives_the_same_images_at_early_middle_and_late_layers(kind, batching):
    """The perturbed branch forked at the first perturbed layer equals it run whole, on every family."""
    layers = steered_layers(kind)
    for layer in (layers[0], layers[len(layers) // 2], layers[-1]):
        call = dict(perturbed_heads=f"{layer}:0", softpag_u=0.8, perturbation_batching=batching)
        whole = generate(kind, **call, perturbation_prefix_reuse=False)
        np.testing.assert_allclose(generate(kind, **call), whole, atol=1e-5, rtol=0, err_msg=layer)
    assert np.abs(whole - generate(kind)).max() > 1e-3
    assert_restored(pipe_of(kind))
    assert not [n for n, m in pipe_of(kind).steer_denoisers()[
        "unet" if kind in ("sd", "sdxl") else "transformer"].named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("batching", ["batched", "sequential"])
def test_prefix_reuse_computes_the_layers_before_the_fork_once(batching):
    """With CFG on SD (2 rows, 1 perturbed copy) the down blocks before a mid-block layer see 2 rows in one
    forward (3 without reuse; sequential: not called by the second forward) and the up blocks 3 (2 and 1)."""
    unet = pipe_of("sd").unet
    seen = {"down": [], "up": []}
    hooks = [unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda m, a: seen["down"].append(a[0].shape[0])),
             unet.up_blocks[-1].resnets[0].register_forward_pre_hook(lambda m, a: seen["up"].append(a[0].shape[0]))]
    try:
        for reuse in (True, False):
            generate("sd", perturbed_heads="mid_block.attentions.0.transformer_blocks.0.attn1:0", num_inference_steps=1,
                     perturbation_batching=batching, perturbation_prefix_reuse=reuse)
    finally:
        for hook in hooks:
            hook.remove()
    if batching == "batched":
        assert seen == {"down": [2, 3], "up": [3, 3]}
    else:
        assert seen == {"down": [2, 2, 1], "up": [2, 1, 2, 1]}


def test_prefix_reuse_must_be_a_bool():
    assert_refused_before_denoising("sd3", r"perturbation_prefix_reuse 'no' must be True or False",
                                    perturbed_heads="0:0", perturbation_prefix_reuse="no")

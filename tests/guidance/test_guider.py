"""HeadPerturbationGuider: the diffusers guider protocol, checked against direct denoiser calls."""

import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance

from attnsteer.attention_processors import HeadPerturbation, head_weights, list_layers, steering
from attnsteer.guidance.guider import HeadPerturbationGuider
from attnsteer.pipelines.tiny import tiny_components

HEADS = ["transformer_blocks.1.attn:0,3", "transformer_blocks.0.attn:2"]


def transformer_inputs(model):
    torch.manual_seed(0)
    c = model.config
    latents = torch.randn(1, c.in_channels, 8, 8)
    embeds = {name: torch.randn(1, 5, c.joint_attention_dim) for name in ("cond", "uncond")}
    pooled = {name: torch.randn(1, c.pooled_projection_dim) for name in ("cond", "uncond")}
    return latents, embeds, pooled


def run_protocol(guider, model):
    """What a modular pipeline's denoise step does with its guider."""
    latents, embeds, pooled = transformer_inputs(model)
    guider.set_state(step=0, num_inference_steps=4, timestep=torch.tensor([500.0]))
    batches = guider.prepare_inputs({"encoder_hidden_states": (embeds["cond"], embeds["uncond"]),
                                     "pooled_projections": (pooled["cond"], pooled["uncond"])})
    for batch in batches:
        guider.prepare_models(model)
        batch.noise_pred = model(latents, encoder_hidden_states=batch.encoder_hidden_states,
                                 pooled_projections=batch.pooled_projections, timestep=torch.tensor([500.0]),
                                 return_dict=False)[0]
        guider.cleanup_models(model)
    return guider(batches).pred


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_guider_equals_the_formula_on_direct_calls(guidance_scale):
    model = tiny_components("sd3")["transformer"]
    latents, embeds, pooled = transformer_inputs(model)
    call = lambda name: model(latents, encoder_hidden_states=embeds[name], pooled_projections=pooled[name],
                              timestep=torch.tensor([500.0]), return_dict=False)[0]
    layers = list_layers(model)
    heads = {"transformer_blocks.0.attn": (2,), "transformer_blocks.1.attn": (0, 3)}
    steer = HeadPerturbation(heads, "image")
    steer.set_weights(head_weights(heads, layers, 0.5))
    with torch.no_grad():
        cond, uncond = call("cond"), call("uncond")
        with steering(model, [steer]):
            perturbed = call("cond")
        guided = run_protocol(HeadPerturbationGuider(heads=HEADS, guidance_scale=guidance_scale, perturbation_scale=3.0,
                                                     softpag_u=0.5, perturbation_mode="image"), model)
    expected = cond if guidance_scale == 1.0 else uncond + guidance_scale * (cond - uncond)
    expected = expected + 3.0 * (cond - perturbed)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=0)
    assert all(not type(p).__name__.startswith("Steered") for p in model.attn_processors.values())


def test_no_heads_is_classifier_free_guidance():
    model = tiny_components("sd3")["transformer"]
    with torch.no_grad():
        ours = run_protocol(HeadPerturbationGuider(heads=[], guidance_scale=4.0), model)
        cfg = run_protocol(ClassifierFreeGuidance(guidance_scale=4.0), model)
    torch.testing.assert_close(ours, cfg, atol=0, rtol=0)


def test_perturbation_window_counts_steps():
    guider = HeadPerturbationGuider(heads=HEADS, guidance_scale=4.0, perturbation_start=0.5)
    guider.set_state(step=1, num_inference_steps=4, timestep=torch.tensor([1.0]))
    assert guider.num_conditions == 2
    guider.set_state(step=2, num_inference_steps=4, timestep=torch.tensor([1.0]))
    assert guider.num_conditions == 3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"softpag_u 1.2 must be in \[0, 1\]"):
        HeadPerturbationGuider(heads=HEADS, softpag_u=1.2)
    with pytest.raises(ValueError, match=r"perturbation_scale True must be a number \(int, float, numpy scalar or 0-d tensor\), not bool"):
        HeadPerturbationGuider(heads=HEADS, perturbation_scale=True)
    with pytest.raises(ValueError, match=r"\(perturbation_start, perturbation_stop\) \(0.5, 0.2\) must be \(start, stop\) fractions"):
        HeadPerturbationGuider(heads=HEADS, perturbation_start=0.5, perturbation_stop=0.2)


def test_numpy_and_tensor_options_are_numbers():
    guider = HeadPerturbationGuider(heads=HEADS, perturbation_scale=np.float32(2.5), softpag_u=torch.tensor(0.5),
                                    perturbation_start=np.int64(0), perturbation_stop=np.float64(0.5))
    assert (guider.perturbation_scale, guider.u, guider.window) == (2.5, 0.5, (0.0, 0.5))
    assert all(type(x) is float for x in (guider.perturbation_scale, guider.u, *guider.window))


def test_modular_sd3_pipeline_runs_with_the_guider():
    from diffusers.modular_pipelines.stable_diffusion_3 import StableDiffusion3AutoBlocks

    components = {k: v for k, v in tiny_components("sd3").items() if v is not None and k in
                  ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}

    def run(guider):
        pipe = StableDiffusion3AutoBlocks().init_pipeline()
        pipe.update_components(**components, guider=guider)
        images = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=8,
                      generator=torch.Generator().manual_seed(0), output="images")
        return np.asarray(images[0], dtype=float)

    base = run(ClassifierFreeGuidance(guidance_scale=4.0))
    steered = run(HeadPerturbationGuider(heads=HEADS, guidance_scale=4.0, perturbation_scale=3.0))
    assert np.abs(base - steered).max() > 0
    np.testing.assert_array_equal(run(HeadPerturbationGuider(heads=HEADS, guidance_scale=4.0, softpag_u=0.0)), base)

"""The guidance's combination rule on separate cond/uncond calls (FLUX, Wan), against direct calls."""

import pytest
import torch

from attnsteer.attention_processors import HeadPerturbation, head_weights, list_layers, steering
from attnsteer.guidance import BranchInfo, HeadPerturbationGuidance
from attnsteer.pipelines import FluxSteerPipeline
from attnsteer.pipelines.tiny import tiny_components, tiny_pipeline

HEADS = {"transformer_blocks.1.attn": (0,), "single_transformer_blocks.0.attn": (0, 1)}


def flux_inputs(model, text):
    torch.manual_seed(0)
    c = model.config
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(2, 16, c.in_channels), timestep=torch.tensor([0.5, 0.5]),
                encoder_hidden_states=text, pooled_projections=torch.randn(2, c.pooled_projection_dim),
                img_ids=ids, txt_ids=torch.zeros(text.shape[1], 3),
                guidance=torch.tensor([3.0, 3.0]) if c.guidance_embeds else None, return_dict=False)


@pytest.mark.parametrize("batching", ["batched", "sequential"])
def test_cond_call_gets_the_perturbed_term_and_uncond_passes_through(batching):
    model = tiny_components("flux")["transformer"]
    torch.manual_seed(1)
    cond_text, uncond_text = torch.randn(2, 6, model.config.joint_attention_dim), torch.randn(2, 6, model.config.joint_attention_dim)
    steer = HeadPerturbation(HEADS, "image")
    steer.set_weights(head_weights(HEADS, list_layers(model), 0.6))
    with torch.no_grad():
        cond = model(**flux_inputs(model, cond_text))[0]
        uncond = model(**flux_inputs(model, uncond_text))[0]
        with steering(model, [steer]):
            perturbed = model(**flux_inputs(model, cond_text))[0]
        guidance = HeadPerturbationGuidance(HEADS, scale=2.0, u=0.6, mode="image", batching=batching)
        with guidance.attached(model, lambda m: BranchInfo(False, 4.0, 10)):
            with model.cache_context("cond"):
                guided_cond = model(**flux_inputs(model, cond_text))[0]
            with model.cache_context("uncond"):
                guided_uncond = model(**flux_inputs(model, uncond_text))[0]
    torch.testing.assert_close(guided_uncond, uncond, atol=0, rtol=0)
    torch.testing.assert_close(guided_cond, cond + (2.0 / 4.0) * (cond - perturbed), atol=1e-5, rtol=0)
    # what the pipeline then computes: eps_u + g (eps_c' - eps_u) = eps_u + g (eps_c - eps_u) + w (eps_c - eps_p)
    torch.testing.assert_close(uncond + 4.0 * (guided_cond - uncond),
                               uncond + 4.0 * (cond - uncond) + 2.0 * (cond - perturbed), atol=1e-4, rtol=0)


def test_flux_true_cfg_scale_reaches_the_guidance():
    pipe = tiny_pipeline("flux", FluxSteerPipeline)
    pipe._num_timesteps = 4
    base = dict(negative_prompt=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, true_cfg_scale=3.0)
    assert pipe.branch_info(pipe.transformer, base).cfg_scale == 1.0
    assert pipe.branch_info(pipe.transformer, {**base, "negative_prompt": "blurry"}).cfg_scale == 3.0
    assert pipe.branch_info(pipe.transformer, {**base, "negative_prompt": "blurry", "true_cfg_scale": 1.0}).cfg_scale == 1.0


@pytest.mark.parametrize("batching", ["batched", "sequential"])
def test_cfg_scale_zero_puts_the_term_on_the_uncond_rows_of_a_batched_call(batching):
    """With g = 0 CFG keeps only eps_u, so eps_u' = eps_u + w (eps_c - eps_p) and eps_c is left as it is."""
    model = tiny_components("sd3")["transformer"]
    heads = {"transformer_blocks.0.attn": (1, 2)}
    torch.manual_seed(0)
    c = model.config
    latents = torch.randn(1, c.in_channels, 8, 8)
    text, pooled = torch.randn(2, 5, c.joint_attention_dim), torch.randn(2, c.pooled_projection_dim)
    inputs = lambda text, pooled: dict(hidden_states=latents.expand(len(text), -1, -1, -1), encoder_hidden_states=text,
                                       timestep=torch.full((len(text),), 500.0), pooled_projections=pooled,
                                       return_dict=False)
    steer = HeadPerturbation(heads)
    steer.set_weights(head_weights(heads, list_layers(model), 0.5))
    with torch.no_grad():
        uncond, cond = model(**inputs(text, pooled))[0]
        with steering(model, [steer]):
            perturbed = model(**inputs(text[1:], pooled[1:]))[0][0]
        guidance = HeadPerturbationGuidance(heads, scale=3.0, u=0.5, batching=batching)
        with guidance.attached(model, lambda m: BranchInfo(True, 0.0, 10)):
            guided_uncond, guided_cond = model(**inputs(text, pooled))[0]
    torch.testing.assert_close(guided_cond, cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(guided_uncond, uncond + 3.0 * (cond - perturbed), atol=1e-5, rtol=0)

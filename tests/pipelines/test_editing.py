"""Steer classes of any supported diffusers pipeline (``steer_pipeline``): editing pipelines against
diffusers' own PAG pipelines, ``from_pipe``, and the refusal of other denoisers."""

import functools
import inspect

import numpy as np
import pytest
import torch
from diffusers import (FluxControlNetPipeline, FluxFillPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline,
                       QwenImageEditPipeline, QwenImageEditPlusPipeline, SanaPipeline,
                       StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPAGInpaintPipeline,
                       StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPAGImg2ImgPipeline,
                       StableDiffusionXLControlNetPAGPipeline, StableDiffusionXLControlNetPipeline, StableDiffusion3ControlNetPipeline,
                       StableDiffusion3Img2ImgPipeline, StableDiffusion3PAGImg2ImgPipeline,
                       StableDiffusionControlNetPAGPipeline, StableDiffusionControlNetPipeline,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPAGImg2ImgPipeline, StableDiffusionPAGInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                       StableDiffusionXLPAGImg2ImgPipeline, StableDiffusionXLPAGInpaintPipeline)
from PIL import Image

import attnsteer.pipelines as pipelines
from attnsteer.pipelines import StableDiffusionSteerPipeline, steer_pipeline
from attnsteer.pipelines.tiny import PIPELINE_CLASSES, editing_parts, tiny_components

SIDE = 32
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
MASK = Image.fromarray(np.pad(np.full((SIDE // 2, SIDE // 2), 255, np.uint8), SIDE // 4))
# kind, the parent, diffusers' PAG pipeline of the same task, its layer spec, ours, the call's image inputs
CASES = {
    "sd-img2img": ("sd", StableDiffusionImg2ImgPipeline, StableDiffusionPAGImg2ImgPipeline, ["mid"],
                   "mid_block.attentions.0.transformer_blocks.0.attn1:*", dict(image=IMAGE, strength=0.75)),
    "sd-inpaint": ("sd", StableDiffusionInpaintPipeline, StableDiffusionPAGInpaintPipeline, ["mid"],
                   "mid_block.attentions.0.transformer_blocks.0.attn1:*",
                   dict(image=IMAGE, mask_image=MASK, height=SIDE, width=SIDE, strength=1.0)),  # the parents differ in the default
    "sdxl-img2img": ("sdxl", StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPAGImg2ImgPipeline, ["mid"],
                     "MID", dict(image=IMAGE, strength=0.75)),
    "sdxl-inpaint": ("sdxl", StableDiffusionXLInpaintPipeline, StableDiffusionXLPAGInpaintPipeline, ["mid"],
                     "MID", dict(image=IMAGE, mask_image=MASK, height=SIDE, width=SIDE, strength=1.0)),
    "sd-controlnet": ("sd", StableDiffusionControlNetPipeline, StableDiffusionControlNetPAGPipeline, ["mid"],
                      "mid_block.attentions.0.transformer_blocks.0.attn1:*", dict(image=IMAGE, height=SIDE, width=SIDE)),
    "sd-controlnet-inpaint": ("sd", StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPAGInpaintPipeline,
                              ["mid"], "mid_block.attentions.0.transformer_blocks.0.attn1:*",
                              dict(image=IMAGE, mask_image=MASK, control_image=IMAGE, height=SIDE, width=SIDE, strength=1.0)),
    "sdxl-controlnet": ("sdxl", StableDiffusionXLControlNetPipeline, StableDiffusionXLControlNetPAGPipeline, ["mid"],
                        "MID", dict(image=IMAGE, height=SIDE, width=SIDE)),
    "sdxl-controlnet-img2img": ("sdxl", StableDiffusionXLControlNetImg2ImgPipeline,
                                StableDiffusionXLControlNetPAGImg2ImgPipeline, ["mid"], "MID",
                                dict(image=IMAGE, control_image=IMAGE, strength=0.75)),
    "sd3-img2img": ("sd3", StableDiffusion3Img2ImgPipeline, StableDiffusion3PAGImg2ImgPipeline,
                    [r"^transformer_blocks\.1\.attn$"], "transformer_blocks.1.attn:*", dict(image=IMAGE, strength=0.75)),
}


@functools.cache
def components_of(kind):
    """One tiny pipeline's components per kind, shared by every pipeline class of a test (each leaves
    the models as it found them)."""
    return tiny_components(kind)


def build(cls, kind, **extra):
    """A tiny ``cls`` on the kind's components and the parts its class adds (``editing_parts``: a
    ControlNet, ...), the same for the same class."""
    components = components_of(kind)
    allowed = inspect.signature(cls.__init__).parameters
    parts = editing_parts(cls, components)
    pipe = cls(**{k: v for k, v in components.items() if k in allowed and k not in parts}, **parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(kind, images, **extra):
    kwargs = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=4.0, output_type="np", **images)
    kwargs.update(extra)
    if kind == "sd3":
        kwargs["max_sequence_length"] = 8
    return kwargs


@pytest.mark.parametrize("case", CASES)
def test_image_mode_whole_layer_equals_diffusers_pag_on_editing_pipelines(case):
    kind, parent, pag_class, pag_layers, heads, images = CASES[case]
    pag = build(pag_class, kind, pag_applied_layers=pag_layers)
    expected = pag(**call(kind, images, pag_scale=3.0), generator=torch.Generator().manual_seed(0)).images
    ours = build(steer_pipeline(parent), kind)
    if heads == "MID":  # every self-attention layer of the mid block, as diffusers' "mid"
        heads = " ".join(f"{name}:*" for name, info in ours.steer_layers().items()
                         if name.startswith("mid_block.") and info.kind == "self")
    steered = ours(**call(kind, images, perturbed_heads=heads, perturbation_mode="image", softpag_u=1.0,
                          perturbation_scale=3.0), generator=torch.Generator().manual_seed(0)).images
    plain = ours(**call(kind, images), generator=torch.Generator().manual_seed(0)).images
    assert np.abs(expected - plain).max() > 1e-3
    np.testing.assert_allclose(steered, expected, atol=1e-4, rtol=0)


def test_steer_classes_by_name_from_pipe_and_refusals():
    assert pipelines.StableDiffusionImg2ImgSteerPipeline is steer_pipeline(StableDiffusionImg2ImgPipeline)
    assert steer_pipeline(StableDiffusionPipeline) is StableDiffusionSteerPipeline
    text = build(StableDiffusionSteerPipeline, "sd")
    text.call_defaults = {"guidance_scale": 3.0}
    edit = steer_pipeline(StableDiffusionImg2ImgPipeline).from_pipe(text)
    assert edit.unet is text.unet and edit.call_defaults == {"guidance_scale": 3.0}  # no weights reloaded
    with pytest.raises(ValueError, match=r"SanaPipeline's denoiser SanaTransformer2DModel is not supported \(it uses "
                                         r"linear attention, .*\); attnsteer steers UNet2DConditionModel, SD3Transformer2DModel"):
        steer_pipeline(SanaPipeline)
    with pytest.raises(ValueError, match="steer_pipeline takes a diffusers pipeline class, got 'sd'"):
        steer_pipeline("sd")


@pytest.mark.parametrize("parent,images", [
    (FluxImg2ImgPipeline, dict(image=IMAGE, strength=0.75)),
    (FluxInpaintPipeline, dict(image=IMAGE, mask_image=MASK, height=SIDE, width=SIDE, strength=1.0)),
    (FluxFillPipeline, dict(image=IMAGE, mask_image=MASK, height=SIDE, width=SIDE)),  # its transformer reads the mask too
    (FluxKontextPipeline, dict(image=IMAGE, height=SIDE, width=SIDE, max_area=SIDE * SIDE,
                               _auto_resize=False)),  # its reference image: tokens after the image's
])
def test_flux_editing_pipelines_take_head_perturbation(parent, images):
    """No PAG pipeline of diffusers' to compare with on FLUX: ``assert_heads_act``. Up to about 10 s
    beside the other worker: the first of these builds the tiny FLUX, then four calls each."""
    pipe = build(steer_pipeline(parent), "flux")
    run = lambda **extra: pipe(**call("flux", images, max_sequence_length=8, num_inference_steps=2, **extra),
                               generator=torch.Generator().manual_seed(0)).images
    assert_heads_act(run, "transformer_blocks.0.attn:*", atol=1e-4)


def assert_heads_act(run, heads: str, atol: float) -> np.ndarray:
    """``run(**extra)`` (a pipeline call at a fixed seed) with ``heads`` perturbed: u = 0 is the parent, the
    heads change the output, and batched equals sequential (the perturbed branch is the same either way).
    Returns the parent's output."""
    plain = run()
    heads = dict(perturbed_heads=heads, perturbation_scale=3.0)
    np.testing.assert_allclose(run(**heads, softpag_u=0.0), plain, atol=1e-6)
    batched = run(**heads)
    assert np.abs(batched - plain).max() > 1e-3
    np.testing.assert_allclose(run(**heads, perturbation_batching="sequential"), batched, atol=atol)
    return plain


@pytest.mark.parametrize("parent", [QwenImageEditPipeline, QwenImageEditPlusPipeline])
def test_qwen_image_edit_pipelines_take_head_perturbation(parent):
    """Qwen-Image Edit reads its reference image twice: through the Qwen2.5-VL encoder beside the prompt, and as
    latent tokens after the output's (32 x 32 of them, the image resized to a megapixel). With true CFG's two
    calls a step: u = 0 is the parent, the heads change the image, batched equals sequential, and another
    reference image changes the edit; A-STAR is refused by reason before compute. About 5 s each."""
    pipe = build(steer_pipeline(parent), "qwenimage")
    run = lambda image=IMAGE, **extra: pipe(image=image, prompt="a red circle", negative_prompt="blurry", true_cfg_scale=4.0,
                                            height=SIDE, width=SIDE, num_inference_steps=1, output_type="np",
                                            generator=torch.Generator().manual_seed(0), **extra).images
    plain = assert_heads_act(run, "transformer_blocks.1.attn:*", atol=1e-5)
    assert np.abs(run(image=Image.new("RGB", (SIDE, SIDE))) - plain).max() > 1e-5  # weak in a random model, not nothing
    with pytest.raises(ValueError, match=f"astar_tokens: {pipe.__class__.__name__} sizes its output inside the call"):
        pipe.check_call(image=IMAGE, prompt="a red circle and a blue square", astar_tokens=["circle", "square"])


@pytest.mark.parametrize("parent,heads", [(StableDiffusion3ControlNetPipeline, "transformer_blocks.1.attn:*"),
                                          (FluxControlNetPipeline, "transformer_blocks.0.attn:*")])
def test_controlnet_pipelines_steer_the_denoiser_and_leave_the_control_branch_alone(parent, heads):
    """SD3's and FLUX's ControlNet pipelines (SD's and SDXL's: equal to diffusers' PAG above): u = 0 is the
    parent, the heads change the picture, and while they do, the ControlNet runs with its own attention
    (nothing installed on it), though its layers bear the same names as the steered ones."""
    pipe = build(steer_pipeline(parent), "sd3" if parent is StableDiffusion3ControlNetPipeline else "flux")
    control = pipe.controlnet
    touched = []
    hook = control.register_forward_pre_hook(lambda module, args: touched.append(
        "forward" in module.__dict__ or any(type(p).__name__.startswith("Steered") for p in module.attn_processors.values())))

    def run(**extra):
        torch.manual_seed(0)  # SD3's ControlNet pipeline samples the control image's latent from the global generator
        return pipe(**call("sd3", dict(control_image=IMAGE, height=SIDE, width=SIDE), num_inference_steps=2,
                           max_sequence_length=8, **extra), generator=torch.Generator().manual_seed(0)).images

    try:
        plain = run(controlnet_conditioning_scale=0.0)
        assert np.abs(run() - plain).max() > 1e-3  # the control branch acts
        plain = run()
        np.testing.assert_allclose(run(perturbed_heads=heads, perturbation_scale=3.0, softpag_u=0.0), plain, atol=1e-6)
        touched.clear()
        assert np.abs(run(perturbed_heads=heads, perturbation_scale=3.0) - plain).max() > 1e-3
    finally:
        hook.remove()
    assert touched and not any(touched)


def test_ir_diffusion_is_refused_on_editing_pipelines_by_reason():
    pipe = build(steer_pipeline(StableDiffusionImg2ImgPipeline), "sd")
    with pytest.raises(ValueError, match=r"story_subjects: IR-Diffusion runs on the text-to-image pipelines, not on "
                                         r"StableDiffusionImg2ImgSteerPipeline \(it draws its references from noise"):
        pipe.check_call(**call("sd", dict(image=IMAGE), prompt="a red circle and a blue square",
                               story_subjects=["a red circle", "a blue square"]))


BIG = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))  # not the default 32 px
# editing pipelines that size their output by an image (SD img2img, ControlNet) or by height and width
MAPPED = {
    "sd-img2img": ("sd", StableDiffusionImg2ImgPipeline, dict(image=BIG, strength=0.75)),
    "sd-inpaint": ("sd", StableDiffusionInpaintPipeline, dict(image=BIG, mask_image=BIG, height=48, width=48, strength=1.0)),
    "sd-controlnet": ("sd", StableDiffusionControlNetPipeline, dict(image=BIG)),
    "sd3-img2img": ("sd3", StableDiffusion3Img2ImgPipeline, dict(image=BIG, height=48, width=48, strength=0.75)),
    "flux-img2img": ("flux", FluxImg2ImgPipeline, dict(image=BIG, height=48, width=48, strength=0.75)),
}


@pytest.mark.parametrize("case", MAPPED)
def test_editing_pipelines_take_attention_maps_and_astar_at_their_images_size(case):
    """The maps of an editing call have the grid of a text-to-image call at the size the edit comes out
    (48 px, from the image where the pipeline takes its size from it); A-STAR changes the edit, and at
    scale 0 it is the plain edit."""
    kind, parent, images = MAPPED[case]
    pipe = build(steer_pipeline(parent), kind)
    text = build(steer_pipeline(PIPELINE_CLASSES[kind]), kind)
    words = dict(max_sequence_length=16) if kind == "flux" else {}
    run = lambda p, **extra: p(**call(kind, images if p is pipe else dict(height=48, width=48),
                                      prompt="a red circle and a blue square", num_inference_steps=2, **words, **extra),
                               generator=torch.Generator().manual_seed(0))
    plain = run(pipe)
    assert plain.images.shape[1:3] == (48, 48)
    maps = run(pipe, return_attention_maps=["circle", "square"]).attention_maps
    assert maps.grid == run(text, return_attention_maps=["circle", "square"]).attention_maps.grid
    assert maps.maps.shape == (1, 2, *maps.grid)
    astar = dict(astar_tokens=["circle", "square"])
    np.testing.assert_array_equal(run(pipe, **astar, astar_scale=0.0).images, plain.images)
    assert np.abs(run(pipe, **astar, astar_scale=200.0).images - plain.images).max() > 1e-3


def test_astar_is_refused_where_the_denoiser_takes_more_than_the_latent():
    from diffusers import UNet2DConditionModel

    components = dict(components_of("sd"))
    components["unet"] = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    pipe = steer_pipeline(StableDiffusionInpaintPipeline)(**{k: v for k, v in components.items() if k != "controlnet"})
    with pytest.raises(ValueError, match="astar_tokens: StableDiffusionInpaintSteerPipeline's UNet2DConditionModel takes 9 "
                                         "input channels, the latent's 4 and the picture's conditioning"):
        pipe.check_call(**call("sd", dict(image=IMAGE, mask_image=MASK), astar_tokens=["circle", "square"],
                               prompt="a red circle and a blue square"))


@pytest.mark.parametrize("encoder", [False, True], ids=["wan2.2-ti2v", "wan2.1-clip"])
def test_wan_image_to_video_takes_head_perturbation(encoder):
    """Wan 2.2 TI2V's image-to-video (``expand_timesteps``: the image's latent is the first latent frame,
    at timestep 0) and Wan 2.1's (a CLIP image encoder, the image's latent as extra channels): u = 0 is the
    parent, the heads change the video, batched equals sequential."""
    pipe, kwargs = wan_image_to_video(encoder)
    run = lambda **extra: pipe(**kwargs, generator=torch.Generator().manual_seed(0), **extra).frames
    plain = run()
    heads = dict(perturbed_heads="blocks.1.attn1:*", perturbation_scale=3.0)
    np.testing.assert_allclose(run(**heads, softpag_u=0.0), plain, atol=1e-6)
    batched = run(**heads)
    assert plain.shape == (1, 5, SIDE, SIDE, 3) and np.abs(batched - plain).max() > 1e-3
    np.testing.assert_allclose(run(**heads, perturbation_batching="sequential"), batched, atol=1e-4)


def test_flux_and_chroma_pipelines_round_the_latent_to_their_2x2_packing():
    """Every pipeline on a packed denoiser rounds its latent to whole 2 x 2 patches (38 px / VAE 2 = 19 ->
    18), as FLUX's own text-to-image pipeline does; an unpacked one does not."""
    from attnsteer.pipelines.astar import latent_size

    size = dict(height=38, width=38)
    assert latent_size(build(steer_pipeline(FluxImg2ImgPipeline), "flux"), size) == (18, 18)
    assert latent_size(build(steer_pipeline(PIPELINE_CLASSES["flux"]), "flux"), size) == (18, 18)
    assert latent_size(build(steer_pipeline(PIPELINE_CLASSES["chroma"]), "chroma"), size) == (18, 18)
    assert latent_size(build(steer_pipeline(StableDiffusionImg2ImgPipeline), "sd"), dict(image=IMAGE)) == (16, 16)


def wan_image_to_video(encoder: bool = False):
    """Wan's image-to-video on the tiny Wan, and a call of it (the prompt as embeddings: the I2V pipeline's
    prompt cleaning needs ftfy): Wan 2.2 TI2V's first-frame conditioning, or with ``encoder`` Wan 2.1's (the
    image's latent and mask beside the noise, 16 + 16 + 4 input channels, and a tiny CLIP vision encoder
    whose image tokens join the text in every cross-attention)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    components = tiny_components("wan")
    embeds, negative = WanPipeline(**components).encode_prompt("a red circle", negative_prompt="", max_sequence_length=16)
    if encoder:
        torch.manual_seed(0)
        config = {k: v for k, v in components["transformer"].config.items() if not k.startswith("_")}
        components["transformer"] = WanTransformer3DModel(**{**config, "in_channels": 36, "image_dim": 16,
                                                             "added_kv_proj_dim": 24}).eval()
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=SIDE, patch_size=8, projection_dim=16)
        parts = dict(image_encoder=CLIPVisionModelWithProjection(vision).eval(),
                     image_processor=CLIPImageProcessor(crop_size=SIDE, size={"shortest_edge": SIDE}))
    else:
        parts = dict(image_encoder=None, image_processor=None, expand_timesteps=True)
    pipe = steer_pipeline(WanImageToVideoPipeline)(**components, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(image=IMAGE, prompt_embeds=embeds, negative_prompt_embeds=negative, height=SIDE, width=SIDE,
                      num_frames=5, num_inference_steps=2, output_type="np")


@pytest.mark.parametrize("case", ["flux-inpaint", "sd3-img2img", "wan-i2v"])
def test_editing_pipelines_take_block_sparse_attention(case):
    """Block-sparse attention follows the denoiser, so an edit takes it as its text-to-X pipeline does: keeping
    every block is the plain edit, skipping 90% of them changes it, the same way every time."""
    if case == "wan-i2v":
        pipe, kwargs = wan_image_to_video()
    else:
        kind, parent, images = {"flux-inpaint": ("flux", FluxInpaintPipeline, dict(image=BIG, mask_image=BIG, strength=1.0)),
                                "sd3-img2img": ("sd3", StableDiffusion3Img2ImgPipeline, dict(image=BIG, strength=0.75))}[case]
        pipe = build(steer_pipeline(parent), kind)
        kwargs = call(kind, dict(images, height=48, width=48), num_inference_steps=2, max_sequence_length=8)
    run = lambda **extra: getattr(pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(0)),
                                  "frames" if case == "wan-i2v" else "images")
    sparse = dict(sparse_pool=(2, 2), sparse_backend="gather", sparse_dense_steps=0)
    plain = run()
    np.testing.assert_allclose(run(sparsity=0.0, **sparse), plain, atol=1e-5)
    skipped = run(sparsity=0.9, **sparse)
    assert np.abs(skipped - plain).max() > 1e-4
    np.testing.assert_array_equal(run(sparsity=0.9, **sparse), skipped)


@pytest.mark.parametrize("method,message", [
    (dict(sparsity=0.5), "appends its reference image's tokens to the output's, which block-sparse attention does not"),
    (dict(return_attention_maps=["circle"]), "sizes its output inside the call"),
    (dict(astar_tokens=["circle", "square"]), "sizes its output inside the call")])
def test_methods_that_read_the_image_grid_are_refused_on_kontext(method, message):
    """FLUX Kontext sizes its output from max_area inside the call and appends its reference image's tokens:
    maps, A-STAR and sparse blocks are refused before compute (maps were shaped wrong, A-STAR failed in the
    first step)."""
    kontext = build(steer_pipeline(FluxKontextPipeline), "flux")
    with pytest.raises(ValueError, match=f"{next(iter(method))}: FluxKontextSteerPipeline {message}"):
        kontext.check_call(**call("flux", dict(image=IMAGE, height=SIDE, width=SIDE), **method,
                                  prompt="a red circle and a blue square", max_sequence_length=8))


@pytest.mark.parametrize("kind", ["flux", "qwenimage"])
def test_a_reference_images_tokens_are_neither_the_outputs_image_nor_text(kind):
    """An editing call's joint sequence [text, output image, reference image] (FLUX Kontext's img_ids with the
    reference at first coordinate 1, as its pipeline makes them; Qwen-Image Edit's img_shapes listing both):
    the layout's image is the output's 3 x 4 tokens alone, with their grid."""
    from attnsteer.attention_processors import LayoutRecorder, list_layers, steering

    model = components_of(kind)["transformer"]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 5, model.config.joint_attention_dim, generator=g)
    hidden = torch.randn(1, 12 + 4, model.config.in_channels, generator=g)
    if kind == "flux":
        grid = lambda t, h, w: torch.stack(torch.meshgrid(torch.tensor([float(t)]), torch.arange(float(h)),
                                                          torch.arange(float(w)), indexing="ij"), -1).reshape(-1, 3)
        inputs = dict(img_ids=torch.cat([grid(0, 3, 4), grid(1, 2, 2)]), txt_ids=torch.zeros(5, 3),
                      pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
                      guidance=torch.tensor([3.5]))
    else:
        inputs = dict(img_shapes=[[(1, 3, 4), (1, 2, 2)]], encoder_hidden_states_mask=torch.ones(1, 5))
    recorder = LayoutRecorder(list_layers(model))
    with torch.no_grad(), steering(model, [recorder]):
        model(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.5]), **inputs)
    for layout, q, _ in recorder.seen.values():
        assert q[2] == 5 + 16 and layout.text == slice(0, 5) and layout.image == slice(5, 17) and layout.grid == (3, 4)


def test_wan_vace_steers_its_main_blocks_and_never_its_control_branch():
    """VACE (a control video and its mask read by VACE blocks, whose hints join after main block 0): its
    layers are the main blocks' alone; u = 0 is the parent, the heads change the video, keeping every
    sparse block is the plain video, and while steered the VACE blocks run with their own attention."""
    from diffusers import WanPipeline, WanVACEPipeline

    from attnsteer.attention_processors import list_layers

    pipe = build(steer_pipeline(WanVACEPipeline), "wan")
    assert list(list_layers(pipe.transformer)) == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    embeds, negative = WanPipeline(**components_of("wan")).encode_prompt("a red circle", negative_prompt="",
                                                                          max_sequence_length=16)
    touched = []
    hooks = [block.register_forward_pre_hook(lambda module, args: touched.append(any(
        type(m.processor).__name__.startswith("Steered") for m in (module.attn1, module.attn2))))
        for block in pipe.transformer.vace_blocks]
    run = lambda **extra: pipe(video=[IMAGE] * 5, mask=[MASK] * 5, prompt_embeds=embeds, negative_prompt_embeds=negative,
                               height=SIDE, width=SIDE, num_frames=5, num_inference_steps=2, output_type="np",
                               generator=torch.Generator().manual_seed(0), **extra).frames
    try:
        plain = run()
        heads = dict(perturbed_heads="blocks.1.attn1:*", perturbation_scale=3.0)
        np.testing.assert_allclose(run(**heads, softpag_u=0.0), plain, atol=1e-6)
        touched.clear()
        steered = run(**heads)
        sparse = dict(sparse_pool=(2, 2), sparse_backend="gather", sparse_dense_steps=0)
        np.testing.assert_allclose(run(sparsity=0.0, **sparse), plain, atol=1e-5)
    finally:
        for hook in hooks:
            hook.remove()
    assert plain.shape == (1, 5, SIDE, SIDE, 3) and np.abs(steered - plain).max() > 1e-3
    assert touched and not any(touched)

"""A-STAR as keyword arguments of the steer pipelines (SD, SDXL, SD3, FLUX), checked before compute.

    pipe("a cat and a dog", astar_tokens=["cat", "dog"])
    pipe(["a cat and a dog", "a red circle and a blue square"], astar_tokens=[["cat", "dog"], ["red circle", "square"]])

Keyword arguments (defaults in ``ASTAR_DEFAULTS``):
    astar_tokens: the concepts of each prompt: words ("circle", "red circle"), text-key indices, or
        lists of indices (see ``pipelines.tokens`` for where each encoder's tokens sit); for a prompt
        list, one such list per prompt ([] for none). None: no A-STAR (the parent pipeline).
    astar_scale: alpha (20, Attend-and-Excite's step size); 0 turns A-STAR off.
    astar_steps: (start, stop) fractions of the steps that get a gradient step; all by default.
    astar_schedule: "sqrt" (alpha_t = alpha sqrt(linspace(1, 0.5, T))_t) or "constant".
    astar_iterations: gradient steps per guided step (1).
    astar_weights: (w_seg, w_ret), (1, 1).
    astar_layers, astar_grid: the map layers (names or indices into the layers with text keys) and
        grid; default: every text layer at the finest grid of at most 16 x 16 tokens (``map_layers``).
    astar_masks: layout masks replacing the retention masks: per prompt a [concepts, H, W] array or
        a list of 2-D arrays / PIL images, one per concept, values in [0, 1] (any resolution).
    astar_normalize: "softmax" (A&E's token softmax, then max) or "max"; astar_smoothing: Gaussian
        (size, sigma), (3, 0.5); astar_binarization: "otsu" or a threshold in (0, 1].
    astar_checkpointing: gradient checkpointing in the gradient pass (less memory, about one more
        forward of the blocks up to the last map layer); also used when the denoiser has diffusers'
        gradient checkpointing enabled.

Formulas, defaults and sources: docs/methods.md, section 2.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import (ChromaTransformer2DModel, Flux2Transformer2DModel, FluxKontextInpaintPipeline, FluxKontextPipeline,
                       FluxTransformer2DModel, QwenImageEditInpaintPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline,
                       QwenImageTransformer2DModel)

from attnsteer.attention_processors import map_layers
from attnsteer.guidance.astar import NORMALIZE, SCHEDULES, AStarGuidance

from .frames import temporal_factor
from .parent import denoiser, parent_call
from .tokens import content_indices, prompts_of, text_length, word_indices

ASTAR_DEFAULTS = dict(
    astar_tokens=None, astar_scale=20.0, astar_steps=(0.0, 1.0), astar_schedule="sqrt", astar_iterations=1,
    astar_weights=(1.0, 1.0), astar_layers=None, astar_grid=None, astar_masks=None, astar_normalize="softmax",
    astar_smoothing=(3, 0.5), astar_binarization="otsu", astar_checkpointing=False,
)

REFERENCE_TOKENS = (FluxKontextPipeline, FluxKontextInpaintPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline,
                    QwenImageEditInpaintPipeline)  # a reference image's tokens after the output's
PACKED = (FluxTransformer2DModel, ChromaTransformer2DModel, Flux2Transformer2DModel, QwenImageTransformer2DModel)  # 2 x 2 latent pixels a token


def check_image_pipeline(pipe, name: str) -> None:
    """ValueError naming ``name`` on a video pipeline (its VAE has a temporal factor), whose maps have
    frames, or on FLUX Kontext and Qwen-Image Edit, which size their output inside the call (not supported yet)."""
    if temporal_factor(pipe) is not None:
        raise ValueError(f"{name}: A-STAR and attention maps run on the image pipelines (SD, SDXL, SD3, FLUX, "
                         f"Chroma, Qwen-Image); {type(pipe).__name__} is a video pipeline, not supported yet")
    if isinstance(pipe, REFERENCE_TOKENS):
        raise ValueError(f"{name}: {type(pipe).__name__} sizes its output inside the call (from its reference "
                         "image's aspect ratio) and appends its reference image's tokens to it, so A-STAR and attention "
                         "maps do not run on it yet")


def check_latent_input(pipe) -> None:
    """ValueError where the denoiser's input is not the latent alone (in channels: the VAE's, or 4x for
    FLUX's 2 x 2 packing), e.g. a 9-channel inpainting UNet or FLUX Fill: A-STAR's update moves the latent."""
    model, config = denoiser(pipe), pipe.vae.config
    latent = config.get("latent_channels") or config["z_dim"]  # the Wan and Qwen-Image VAEs name it z_dim
    if model.config.in_channels not in (latent, 4 * latent):
        raise ValueError(f"astar_tokens: {type(pipe).__name__}'s {type(model).__name__} takes {model.config.in_channels} "
                         f"input channels, the latent's {latent} and the picture's conditioning: A-STAR moves the "
                         "latent alone and does not run on it yet")


def _sizing_image(pipe, arguments: dict):
    """The image an editing pipeline takes its size from when not given height and width: SD and SDXL
    img2img (no height or width at all) and ControlNet pipelines (the control image; the picture to
    inpaint in ControlNet inpainting). None where the size has a default."""
    parameters = parent_call(type(pipe)).parameters
    if "height" in parameters and getattr(pipe, "controlnet", None) is None:
        return None
    name = "control_image" if "control_image" in parameters and "mask_image" not in parameters else "image"
    image = arguments.get(name)
    return image[0] if isinstance(image, list) else image


def latent_size(pipe, arguments: dict) -> tuple[int, int]:
    """Spatial size of the call's VAE latent (FLUX, FLUX.2, Chroma, Qwen-Image: before their 2 x 2 packing), as the pipeline sizes its
    output: height and width, else its image's size (``_sizing_image``), else its default."""
    factor = pipe.vae_scale_factor
    default = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
    height, width = arguments.get("height"), arguments.get("width")
    image = _sizing_image(pipe, arguments)
    if image is not None and (height is None or width is None):
        height, width = pipe.image_processor.get_default_height_width(image, height, width)
    height, width = height or default * factor, width or default * factor
    if isinstance(denoiser(pipe), PACKED):  # any of their pipelines
        return 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    return height // factor, width // factor


def _finite(value, low=0.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} {value!r} must be True or False")


def check_window(name: str, window) -> None:
    if (not isinstance(window, (tuple, list)) or len(window) != 2 or not all(_finite(x) for x in window)
            or not 0.0 <= window[0] < window[1] <= 1.0):
        raise ValueError(f"{name} {window!r} must be (start, stop) fractions of the steps, 0 <= start < stop <= 1")


def check_options(o: dict) -> None:
    """ValueError naming a bad A-STAR option and what is allowed."""
    if not _finite(o["astar_scale"]):
        raise ValueError(f"astar_scale {o['astar_scale']!r} must be a finite number >= 0")
    check_window("astar_steps", o["astar_steps"])
    if o["astar_schedule"] not in SCHEDULES:
        raise ValueError(f"astar_schedule {o['astar_schedule']!r} is not one of {SCHEDULES}")
    if not isinstance(o["astar_iterations"], int) or isinstance(o["astar_iterations"], bool) or o["astar_iterations"] < 1:
        raise ValueError(f"astar_iterations {o['astar_iterations']!r} must be an integer >= 1")
    w = o["astar_weights"]
    if not isinstance(w, (tuple, list)) or len(w) != 2 or not all(_finite(x) for x in w):
        raise ValueError(f"astar_weights {w!r} must be (w_seg, w_ret), two finite numbers >= 0")
    if o["astar_normalize"] not in NORMALIZE:
        raise ValueError(f"astar_normalize {o['astar_normalize']!r} is not one of {NORMALIZE}")
    s = o["astar_smoothing"]
    if (not isinstance(s, (tuple, list)) or len(s) != 2 or not isinstance(s[0], int) or s[0] < 1 or s[0] % 2 == 0
            or not _finite(s[1])):
        raise ValueError(f"astar_smoothing {s!r} must be (size, sigma): an odd size >= 1 and a sigma >= 0")
    check_flag("astar_checkpointing", o["astar_checkpointing"])
    b = o["astar_binarization"]
    if b != "otsu" and not (_finite(b) and 0 < b <= 1):
        raise ValueError(f"astar_binarization {b!r} must be 'otsu' or a threshold in (0, 1]")


def per_prompt(name: str, value, arguments: dict) -> list[list]:
    """``value`` as one list per prompt: a list for one prompt, a list of lists for a prompt list."""
    prompt = arguments.get("prompt")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of words or token indices (for a prompt list, one such list "
                         f"per prompt), got {value!r}")
    if not isinstance(prompt, (list, tuple)):
        return [list(value)]
    if len(value) != len(prompt) or not all(isinstance(v, (list, tuple)) for v in value):
        raise ValueError(f"{name}: {len(prompt)} prompts need {len(prompt)} token lists, one per prompt "
                         f"(e.g. [['cat', 'dog'], ...]), got {value!r}")
    return [list(v) for v in value]


def resolve_concepts(pipe, arguments: dict, tokens, name: str = "astar_tokens") -> tuple[list, list]:
    """(concepts, context) per prompt as text-key indices; ValueError naming a bad word or index."""
    length = text_length(pipe, arguments)
    texts = prompts_of(arguments, "prompt")
    concepts, context = [], []
    for p, row in enumerate(per_prompt(name, tokens, arguments)):
        resolved = []
        for concept in row:
            if isinstance(concept, str):
                if texts is None:
                    raise ValueError(f"{name}: the word {concept!r} needs the prompt text; with prompt_embeds give token indices")
                try:
                    resolved.append(word_indices(pipe, arguments, concept, p))
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None
                continue
            indices = [concept] if isinstance(concept, int) else concept
            if (not isinstance(indices, (list, tuple)) or not indices
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)):
                raise ValueError(f"{name}: {concept!r} is not a word, a token index or a list of token indices")
            for i in indices:
                if not 0 <= i < length:
                    raise ValueError(f"{name}: token index {i} is past the text sequence of {length} tokens (0-{length - 1})")
            resolved.append(list(indices))
        for i, concept in enumerate(resolved):
            if concept in resolved[:i]:
                raise ValueError(f"{name}: {row[i]!r} names the same tokens as {row[resolved.index(concept)]!r} "
                                 f"(prompt {p}): give each concept once")
        concepts.append(resolved)
        context.append(content_indices(pipe, arguments, p) if texts is not None else [])
    return concepts, context


def _mask(item) -> torch.Tensor:
    if hasattr(item, "convert"):  # a PIL image
        return torch.as_tensor(np.asarray(item.convert("L"), dtype=np.float32) / 255.0)
    return torch.as_tensor(np.asarray(item, dtype=np.float32))


def check_masks(masks, concepts: list, arguments: dict) -> list[torch.Tensor] | None:
    """One [concepts, H, W] float tensor per prompt, or ValueError."""
    if masks is None:
        return None
    stacks = [masks] if not isinstance(arguments.get("prompt"), (list, tuple)) else masks
    if not isinstance(stacks, (list, tuple)) or len(stacks) != len(concepts):
        raise ValueError(f"astar_masks: {len(concepts)} prompts need {len(concepts)} mask stacks, one per prompt")
    result = []
    for p, (stack, wanted) in enumerate(zip(stacks, concepts)):
        items = [_mask(m) for m in stack]
        if len(items) != len(wanted) or any(m.dim() != 2 or m.shape != items[0].shape for m in items):
            raise ValueError(f"astar_masks: prompt {p} needs {len(wanted)} 2-D masks of one size, one per concept, "
                             f"got shapes {[tuple(m.shape) for m in items]}")
        stacked = torch.stack(items) if items else torch.zeros(0, 1, 1)
        if stacked.numel() and not 0 <= stacked.min() <= stacked.max() <= 1:
            raise ValueError(f"astar_masks: prompt {p}'s mask values must lie in [0, 1]")
        result.append(stacked)
    return result


def astar_guidance(pipe, arguments: dict, options: dict) -> AStarGuidance | None:
    """The A-STAR of one call from its keyword arguments, or None (off); ValueError before compute."""
    o = {**ASTAR_DEFAULTS, **options}
    check_options(o)
    if o["astar_tokens"] is None:
        return None
    check_image_pipeline(pipe, "astar_tokens")
    check_latent_input(pipe)
    concepts, context = resolve_concepts(pipe, arguments, o["astar_tokens"])
    w_seg, w_ret = o["astar_weights"]
    if w_seg > 0:
        for p, prompt_concepts in enumerate(concepts):
            if len(prompt_concepts) == 1:
                raise ValueError(f"astar_tokens: segregation needs at least two concepts per prompt; prompt {p} has one "
                                 f"({per_prompt('astar_tokens', o['astar_tokens'], arguments)[p]!r})")
    masks = check_masks(o["astar_masks"], concepts, arguments)
    try:
        layers, grid = map_layers(denoiser(pipe), latent_size(pipe, arguments), o["astar_layers"], o["astar_grid"])
    except ValueError as error:
        raise ValueError(f"astar_layers / astar_grid: {error}") from None
    guidance = AStarGuidance(concepts, layers, grid, context, scale=o["astar_scale"], window=o["astar_steps"],
                             schedule=o["astar_schedule"], iterations=o["astar_iterations"], weights=(w_seg, w_ret),
                             normalize=o["astar_normalize"], smoothing=o["astar_smoothing"],
                             binarization=o["astar_binarization"], masks=masks,
                             checkpointing=o["astar_checkpointing"])
    return guidance if guidance.enabled else None


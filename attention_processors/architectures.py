"""Per-architecture naming: which attention modules a model has, their heads, and token layouts.

Every attention module is addressed by its stable module name (``model.named_modules()``), e.g.
``transformer_blocks.3.attn`` (SD3), ``single_transformer_blocks.5.attn`` (FLUX),
``down_blocks.1.attentions.0.transformer_blocks.0.attn1`` (UNet) or ``blocks.0.attn1`` (Wan).
Token layouts are derived from the tensors of the actual model call, never from constants.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

SELF, CROSS, JOINT = "self", "cross", "joint"


@dataclass(frozen=True)
class TokenLayout:
    """Where image and text tokens sit in one attention call's query sequence.

    ``grid`` is the image token grid, (h, w) or (frames, h, w), in raster order, when known. Tokens in
    neither slice condition the call without being the output's image or the text: a reference image's,
    appended after the output's (FLUX Kontext, FLUX.2 and Qwen-Image editing).
    """

    image: slice
    text: slice | None = None
    grid: tuple[int, ...] | None = None

    @property
    def image_first(self) -> bool:
        return self.text is None or self.image.start < self.text.start


@dataclass(frozen=True)
class LayerInfo:
    """One addressable attention module."""

    name: str
    kind: str  # SELF, CROSS or JOINT
    heads: int
    module: torch.nn.Module


class Architecture:
    """How one model class names its attention layers and lays out tokens.

    Subclasses say which modules are attention, of what kind, and derive the token layout of a
    call from ``call_info``: what the model forward was given (recorded by ``model_call_info``).
    """

    model_classes: tuple[str, ...] = ()
    text_first = False
    row_lists: tuple[str, ...] = ()  # forward arguments given as lists of one tensor per row (Z-Image), not batched

    def kind(self, name: str, module: torch.nn.Module) -> str | None:
        raise NotImplementedError

    def layers(self, model: torch.nn.Module) -> dict[str, LayerInfo]:
        found = {}
        for name, module in model.named_modules():
            kind = self.kind(name, module)
            if kind is not None:
                found[name] = LayerInfo(name, kind, int(module.heads), module)
        return found

    def call_info(self, model: torch.nn.Module, bound: inspect.BoundArguments) -> dict:
        return {}

    def image_grid(self, info: dict, image_tokens: int) -> tuple[int, ...] | None:
        return info.get("grid")

    def layer_grids(self, model: torch.nn.Module, latent: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Image grid of each layer's queries for a VAE latent of spatial size ``latent``, known
        before any call (the layouts of a call give the same grids)."""
        grid = self.input_grid(model, latent)
        return {name: grid for name in self.layers(model)}

    def input_grid(self, model: torch.nn.Module, latent: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def layout(self, layer: LayerInfo, info: dict, seq_len: int) -> TokenLayout:
        """Layout of the query sequence of ``layer`` for a call with ``seq_len`` tokens."""
        if layer.kind != JOINT:
            return TokenLayout(slice(0, seq_len), None, self.image_grid(info, seq_len))
        text_len = info.get("text_len")
        if text_len is None or text_len >= seq_len:
            raise RuntimeError(
                f"layer {layer.name!r}: cannot split {seq_len} joint tokens into image and text "
                f"(text length seen at the model call: {text_len})"
            )
        image_len = seq_len - text_len
        if self.text_first:  # the output's image tokens, then any reference image's
            image_len = info.get("image_len") or image_len
            return TokenLayout(slice(text_len, text_len + image_len), slice(0, text_len), self.image_grid(info, image_len))
        return TokenLayout(slice(0, image_len), slice(image_len, seq_len), self.image_grid(info, image_len))


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


class UNetArchitecture(Architecture):
    """UNet2DConditionModel (SD1.5, SDXL): attn1 self-attention, attn2 cross-attention."""

    model_classes = ("UNet2DConditionModel",)

    def kind(self, name, module):
        from diffusers.models.attention_processor import Attention

        if not isinstance(module, Attention):
            return None
        return CROSS if module.is_cross_attention else SELF

    def call_info(self, model, bound):
        return {"sample_shape": _shape(bound.arguments.get("sample"))}

    def image_grid(self, info, image_tokens):
        shape = info.get("sample_shape")
        if shape is None:
            return None
        height, width = shape[-2:]
        factor = 1
        while factor <= max(height, width):
            grid = (math.ceil(height / factor), math.ceil(width / factor))
            if grid[0] * grid[1] == image_tokens:
                return grid
            factor *= 2
        return None

    def layer_grids(self, model, latent):
        """Each down block works at its input size and halves it (stride-2 conv: ceil) if it has a
        downsampler; the mid block at the smallest size; up block j at down block n-1-j's size."""
        sizes, size = [], tuple(latent)
        for block in model.down_blocks:
            sizes.append(size)
            if getattr(block, "downsamplers", None):
                size = tuple(math.ceil(s / 2) for s in size)
        blocks = {f"down_blocks.{i}": g for i, g in enumerate(sizes)}
        blocks.update({f"up_blocks.{j}": sizes[len(sizes) - 1 - j] for j in range(len(model.up_blocks))})
        blocks["mid_block"] = size
        return {name: blocks[name.split(".attentions.")[0]] for name in self.layers(model)}


class SD3Architecture(Architecture):
    """SD3Transformer2DModel: joint attention with [image, text] tokens; SD3.5 adds attn2 (self)."""

    model_classes = ("SD3Transformer2DModel",)

    def kind(self, name, module):
        from diffusers.models.attention_processor import Attention

        if not isinstance(module, Attention):
            return None
        return JOINT if module.added_kv_proj_dim is not None else SELF

    def call_info(self, model, bound):
        sample = bound.arguments.get("hidden_states")
        text = bound.arguments.get("encoder_hidden_states")
        patch = model.config.patch_size
        return {
            "text_len": None if text is None else text.shape[1],
            "grid": None if sample is None else (sample.shape[-2] // patch, sample.shape[-1] // patch),
        }

    def image_grid(self, info, image_tokens):
        grid = info.get("grid")
        return grid if grid is not None and grid[0] * grid[1] == image_tokens else None

    def input_grid(self, model, latent):
        patch = model.config.patch_size
        return tuple(s // patch for s in latent)


class FluxArchitecture(Architecture):
    """FluxTransformer2DModel and Chroma's (FLUX.1-schnell pruned, the same blocks): [text, image] tokens in
    double- and single-stream blocks."""

    model_classes = ("FluxTransformer2DModel", "ChromaTransformer2DModel")
    text_first = True

    def kind(self, name, module):
        from diffusers.models.transformers.transformer_flux import FluxAttention

        return JOINT if isinstance(module, FluxAttention) else None

    def call_info(self, model, bound):
        """The output's image tokens are the leading ``img_ids`` rows that share the first one's first
        coordinate; a reference image's (FLUX Kontext, FLUX.2 editing) follow with another."""
        text = bound.arguments.get("encoder_hidden_states")
        img_ids = bound.arguments.get("img_ids")
        info = {"text_len": None if text is None else text.shape[1], "grid": None}
        if isinstance(img_ids, torch.Tensor):
            ids = img_ids.reshape(-1, img_ids.shape[-1])[: img_ids.shape[-2]]  # one row's, if batched
            other = (ids[:, 0] != ids[0, 0]).nonzero()
            n = int(other[0]) if len(other) else ids.shape[0]
            h, w = int(ids[:n, 1].max()) + 1, int(ids[:n, 2].max()) + 1
            info["grid"] = (h, w) if h * w == n else None
            if n < ids.shape[0]:
                info["image_len"] = n
        return info

    image_grid = SD3Architecture.image_grid

    def input_grid(self, model, latent):
        """FLUX pipelines pack 2x2 latent pixels into one token."""
        return tuple(s // 2 for s in latent)


class WanArchitecture(Architecture):
    """WanTransformer3DModel: attn1 video self-attention (frame-major), attn2 cross-attention. VACE's
    (WanVACETransformer3DModel) control branch, its ``vace_blocks`` that turn the control video into hints
    added after some main blocks, is not listed: never steered, as a ControlNet is not."""

    model_classes = ("WanTransformer3DModel", "WanVACETransformer3DModel")

    def kind(self, name, module):
        from diffusers.models.transformers.transformer_wan import WanAttention

        if not isinstance(module, WanAttention) or name.startswith("vace_blocks."):
            return None
        return CROSS if module.is_cross_attention else SELF

    def call_info(self, model, bound):
        sample = bound.arguments.get("hidden_states")
        if sample is None:
            return {}
        pt, ph, pw = model.config.patch_size
        f, h, w = sample.shape[-3:]
        return {"grid": (f // pt, h // ph, w // pw)}

    def image_grid(self, info, image_tokens):
        grid = info.get("grid")
        return grid if grid is not None and math.prod(grid) == image_tokens else None

    def input_grid(self, model, latent):
        return tuple(s // p for s, p in zip(latent, model.config.patch_size))


class Flux2Architecture(FluxArchitecture):
    """Flux2Transformer2DModel (FLUX.2 and Klein): FLUX's [text, image] tokens and 2x2 packing, in double-stream
    blocks and parallel single-stream ones; img_ids hold (t, h, w, l), a reference image's tokens after the
    output's with another t."""

    model_classes = ("Flux2Transformer2DModel",)

    def kind(self, name, module):
        from diffusers.models.transformers.transformer_flux2 import Flux2Attention, Flux2ParallelSelfAttention

        return JOINT if isinstance(module, (Flux2Attention, Flux2ParallelSelfAttention)) else None


class QwenImageArchitecture(Architecture):
    """QwenImageTransformer2DModel: double-stream blocks whose attention joins [text, image] tokens; the call's
    img_shapes give each image's (frames, rows, columns) of tokens (the Edit pipeline appends its reference
    image's after the output's)."""

    model_classes = ("QwenImageTransformer2DModel",)
    text_first = True

    def kind(self, name, module):
        from diffusers.models.attention_processor import Attention

        return JOINT if isinstance(module, Attention) and name.endswith(".attn") else None

    def call_info(self, model, bound):
        """The output's image tokens come first, grid ``img_shapes``' first entry; a reference image's follow."""
        text, shapes = bound.arguments.get("encoder_hidden_states"), bound.arguments.get("img_shapes")
        info = {"text_len": None if text is None else text.shape[1], "grid": None}
        if shapes:
            first = shapes[0]
            first = first if first and isinstance(first[0], (tuple, list)) else [first]
            if first[0][0] == 1:
                info["grid"] = tuple(int(s) for s in first[0][1:])
                if len(first) > 1:
                    info["image_len"] = math.prod(info["grid"])
        return info

    image_grid = SD3Architecture.image_grid

    def input_grid(self, model, latent):
        """Qwen-Image pipelines pack 2x2 latent pixels into one token."""
        return tuple(s // 2 for s in latent)


class CogVideoXArchitecture(Architecture):
    """CogVideoXTransformer3DModel: one joint attention per block on [text, video] tokens, the video
    frame-major; hidden_states [B, F, C, H, W] in latent frames (CogVideoX 1.5 patches 2 of them)."""

    model_classes = ("CogVideoXTransformer3DModel",)
    text_first = True

    def kind(self, name, module):
        from diffusers.models.attention_processor import Attention

        return JOINT if isinstance(module, Attention) and name.endswith(".attn1") else None

    def call_info(self, model, bound):
        sample, text = bound.arguments.get("hidden_states"), bound.arguments.get("encoder_hidden_states")
        if sample is None:
            return {}
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        f, _, h, w = sample.shape[-4:]
        return {"text_len": None if text is None else text.shape[1], "grid": (math.ceil(f / pt), h // p, w // p)}

    image_grid = WanArchitecture.image_grid

    def input_grid(self, model, latent):
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        return (math.ceil(latent[0] / pt), latent[1] // p, latent[2] // p)


class LTXArchitecture(Architecture):
    """LTXVideoTransformer3DModel: attn1 self-attention on packed video tokens (frame-major), attn2
    cross-attention to the text; the call gives the latent num_frames, height and width."""

    model_classes = ("LTXVideoTransformer3DModel",)

    def kind(self, name, module):
        from diffusers.models.transformers.transformer_ltx import LTXAttention

        if not isinstance(module, LTXAttention):
            return None
        return CROSS if name.endswith(".attn2") else SELF

    def call_info(self, model, bound):
        sizes = [bound.arguments.get(k) for k in ("num_frames", "height", "width")]
        if any(not isinstance(s, int) for s in sizes):
            return {}
        return {"grid": self.input_grid(model, tuple(sizes))}

    image_grid = WanArchitecture.image_grid

    def input_grid(self, model, latent):
        c = model.config
        return (latent[0] // c.patch_size_t, latent[1] // c.patch_size, latent[2] // c.patch_size)


class HunyuanVideo15Architecture(Architecture):
    """HunyuanVideo15Transformer3DModel (HunyuanVideo 1.5): each block's attention joins [video, conditioning]
    tokens, the video frame-major; the conditioning is the SigLIP image tokens (zeros and masked out in
    text-to-video), the ByT5 glyph tokens and the refined Qwen2.5-VL tokens, valid ones first, their joint
    length the sum of the three inputs'. The text refiner's own attention is not listed."""

    model_classes = ("HunyuanVideo15Transformer3DModel",)

    def kind(self, name, module):
        from diffusers.models.attention_processor import Attention

        return JOINT if isinstance(module, Attention) and name.startswith("transformer_blocks.") else None

    def call_info(self, model, bound):
        sample = bound.arguments.get("hidden_states")
        if sample is None:
            return {}
        parts = (bound.arguments.get(name) for name in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds"))
        c, (f, h, w) = model.config, sample.shape[-3:]
        return {"text_len": sum(p.shape[1] for p in parts if p is not None),
                "grid": (f // c.patch_size_t, h // c.patch_size, w // c.patch_size)}

    image_grid = WanArchitecture.image_grid

    def input_grid(self, model, latent):
        c = model.config
        return (latent[0] // c.patch_size_t, latent[1] // c.patch_size, latent[2] // c.patch_size)


class ZImageArchitecture(Architecture):
    """ZImageTransformer2DModel (Z-Image): takes lists, one latent [C, 1, H, W] and one caption [L, D] per row.
    Its main layers' attention joins [image, caption] tokens, each part padded to a multiple of 32 (the pad
    tokens attend and are attended) and the rows to the longest with a key mask. The refiners before them,
    image alone and caption alone, are not listed; nor is the Omni variant's [caption, image, SigLIP] order."""

    model_classes = ("ZImageTransformer2DModel",)
    row_lists = ("x", "cap_feats")
    multiple = 32  # the transformer pads each part of a row to a multiple of this many tokens

    def kind(self, name, module):
        from diffusers.models.attention_processor import Attention

        return JOINT if isinstance(module, Attention) and name.startswith("layers.") else None

    def call_info(self, model, bound):
        x, p = bound.arguments.get("x"), bound.arguments.get("patch_size", 2)
        if not x or not isinstance(x[0], torch.Tensor):  # Omni's nested lists: no layout
            return {}
        _, f, h, w = x[0].shape
        grid = (h // p, w // p)
        return {"grid": grid, "padded_image": -(-math.prod(grid) // self.multiple) * self.multiple} if f == 1 else {}

    image_grid = SD3Architecture.image_grid

    def layout(self, layer, info, seq_len):
        padded = info.get("padded_image")
        if padded is None or padded >= seq_len:
            raise RuntimeError(f"layer {layer.name!r}: cannot lay out {seq_len} tokens of a Z-Image call that is not "
                               "one image a row with its caption (the Omni variant's calls are not described)")
        image = math.prod(info["grid"])
        return TokenLayout(slice(0, image), slice(padded, seq_len), info["grid"])

    def input_grid(self, model, latent):
        """Z-Image pipelines patch 2x2 latent pixels into one token."""
        return tuple(s // 2 for s in latent)


ARCHITECTURES = (UNetArchitecture(), SD3Architecture(), FluxArchitecture(), WanArchitecture(), Flux2Architecture(),
                 QwenImageArchitecture(), CogVideoXArchitecture(), LTXArchitecture(), HunyuanVideo15Architecture(),
                 ZImageArchitecture())
LINEAR = "it uses linear attention, which has no softmax attention map to steer"
UNSUPPORTED = {
    **dict.fromkeys(("SanaTransformer2DModel", "SanaVideoTransformer3DModel"), LINEAR),
    "LTX2VideoTransformer3DModel": "its blocks run a video and an audio stream with attention between them "
                                   "(audio-to-video and video-to-audio), which LTX-Video's entry does not describe "
                                   "(not described yet)",
}
NOT_DESCRIBED = "its attention layout is not described"


def architecture_for(cls: type) -> Architecture | None:
    """The Architecture of a denoiser class (by its name or a base class's), or None."""
    names = [c.__name__ for c in cls.__mro__]
    return next((arch for arch in ARCHITECTURES if any(name in arch.model_classes for name in names)), None)


def unsupported_reason(cls: type) -> str | None:
    """Why attnsteer cannot steer denoiser class ``cls``, or None when it can."""
    return None if architecture_for(cls) is not None else UNSUPPORTED.get(cls.__name__, NOT_DESCRIBED)


def denoiser_classes() -> list[type]:
    """The installed diffusers' denoiser classes (transformers and UNets, by name; no ControlNets or
    autoencoders) whose module mentions attention."""
    import inspect
    import re
    import sys

    import diffusers

    names = sorted(n for n in dir(diffusers) if re.fullmatch(r"\w*(Transformer|UNet|UVit)\w*Model", n) and "ControlNet" not in n)
    classes = [c for c in (getattr(diffusers, n) for n in names) if isinstance(c, type) and issubclass(c, diffusers.ModelMixin)]
    return [c for c in classes if "attention" in inspect.getsource(sys.modules[c.__module__]).lower()]


def architecture_of(model: torch.nn.Module) -> Architecture:
    """The Architecture for ``model``, or a ValueError naming the supported model classes."""
    arch = architecture_for(type(model))
    if arch is not None:
        return arch
    supported = [c for arch in ARCHITECTURES for c in arch.model_classes]
    raise ValueError(f"{type(model).__name__} cannot be steered: {unsupported_reason(type(model))}. "
                     f"Supported: {', '.join(supported)}")


def list_layers(model: torch.nn.Module, kinds: tuple[str, ...] = (SELF, CROSS, JOINT)) -> dict[str, LayerInfo]:
    """Addressable attention layers of ``model`` by stable name, in module order."""
    return {n: info for n, info in architecture_of(model).layers(model).items() if info.kind in kinds}


@lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def model_call_info(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """What the token layouts of one model call depend on, read from the call's tensors, and its
    timestep (the first, as a float; None when the call has none)."""
    bound = _forward_signature(type(model)).bind(model, *args, **kwargs)
    info = architecture_of(model).call_info(model, bound)
    timestep = bound.arguments.get("timestep")
    info["timestep"] = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0])
    return info

"""Block-sparse attention as keyword arguments of every steer pipeline on a Wan, CogVideoX, LTX-Video,
HunyuanVideo 1.5, SD3 or FLUX denoiser (their text-to-X, editing, ControlNet and image-to-video pipelines), checked before compute.

    frames = pipe("a red circle moving left", sparsity=0.75).frames[0]

Keyword arguments (``SPARSE_DEFAULTS``):
    sparsity: DraftAttention: the fraction of image block pairs the draft map skips, in [0, 1);
        None: dense attention (the parent pipeline), unless sparse_mask names a static mask.
    sparse_mask: "draft" (DraftAttention), or a static mask whose density its pattern sets:
        "radial" (Radial Attention) or "tile" (sliding-tile attention, window ``sparse_tile``).
    sparse_pool: (rows, columns) of latent tokens per block in each frame; default about 128 tokens
        that tile the call's frame (``tiling_pool``: the authors' (8, 16) on a 64 x 64 grid, (10, 13) on
        Wan's 480 x 832, where (8, 16) would add 31% empty slots).
    sparse_tile: the tile mask's window of blocks, (frames, rows, columns); default (3, 3, 3).
    sparse_backend: "auto" (compiled flex_attention where it can run, else the gather), "flex",
        "gather" or "dense" (the reference).
    sparse_dense_layers: self/joint attention layers kept dense, by name or index; default the first
        (the authors keep Wan's block 0 dense).
    sparse_dense_steps: the first steps kept dense; default 30% of the steps, rounded up (the authors'
        Wan warm-up: dense while t > 925 of 1000).

Formulas, defaults and sources: docs/methods.md, section 4.
"""

from __future__ import annotations

import math

from diffusers import (CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanVideo15Transformer3DModel,
                       LTXVideoTransformer3DModel, SD3Transformer2DModel, WanTransformer3DModel, WanVACETransformer3DModel)

from attnsteer.attention_processors import JOINT, SELF, list_layers
from attnsteer.attention_processors.heads import layer_name
from attnsteer.attention_processors.sparse import (DraftAttention, DraftMask, RadialMask, TileMask, check_backend,
                                                   check_sparsity, frame_blocks, one_block_a_frame, resolve_backend,
                                                   tiling_pool)

from .astar import REFERENCE_TOKENS, latent_size
from .parent import denoiser

SPARSE_DEFAULTS = dict(sparsity=None, sparse_mask="draft", sparse_pool=None, sparse_tile=(3, 3, 3),
                       sparse_backend="auto", sparse_dense_layers=None, sparse_dense_steps=None)
MASKS = ("draft", "radial", "tile")
WAN = (WanTransformer3DModel, WanVACETransformer3DModel)
VIDEO = (*WAN, CogVideoXTransformer3DModel, LTXVideoTransformer3DModel, HunyuanVideo15Transformer3DModel)
SUPPORTED = (*VIDEO, SD3Transformer2DModel, FluxTransformer2DModel)
WARMUP = 0.3


def token_grid(pipe, arguments: dict) -> tuple[int, int]:
    """(rows, columns) of image tokens per frame of the call."""
    model = denoiser(pipe)
    c = model.config
    if isinstance(model, VIDEO):
        height, width = arguments["height"], arguments["width"]
        if isinstance(model, WAN):
            factor, (ph, pw) = pipe.vae_scale_factor_spatial, c.patch_size[1:]
        elif isinstance(model, CogVideoXTransformer3DModel):
            factor, ph, pw = pipe.vae_scale_factor_spatial, c.patch_size, c.patch_size
            height, width = height or c.sample_height * factor, width or c.sample_width * factor  # its config's default
        elif isinstance(model, HunyuanVideo15Transformer3DModel):
            factor, ph, pw = pipe.vae_scale_factor_spatial, c.patch_size, c.patch_size
            if height is None and width is None:  # the pipeline's default: its aspect ratio at the target size
                height, width = pipe.video_processor.calculate_default_height_width(
                    pipe.default_aspect_ratio[1], pipe.default_aspect_ratio[0], pipe.target_size)
        else:
            factor, ph, pw = pipe.vae_spatial_compression_ratio, c.patch_size, c.patch_size
        return height // factor // ph, width // factor // pw
    h, w = latent_size(pipe, arguments)
    patch = 2 if isinstance(model, FluxTransformer2DModel) else c.patch_size
    return h // patch, w // patch


def sparse_steer(pipe, arguments: dict, options: dict) -> DraftAttention | None:
    """The block-sparse steer of one call, or None (dense); ValueError naming a bad option first."""
    o = {**SPARSE_DEFAULTS, **options}
    kind, sparsity = o["sparse_mask"], o["sparsity"]
    if kind not in MASKS:
        raise ValueError(f"sparse_mask {kind!r} is not one of {MASKS}")
    if sparsity is not None:
        check_sparsity(sparsity)
        if kind != "draft":
            raise ValueError(f"sparsity sets the draft map's density; the {kind!r} mask's density is set by its "
                             "pattern: give sparsity=None with it")
    if sparsity is None and kind == "draft":
        return None
    model = denoiser(pipe)
    if not isinstance(model, SUPPORTED):
        raise ValueError(f"block-sparse attention runs on the Wan, CogVideoX, LTX-Video, HunyuanVideo 1.5, SD3 and FLUX "
                         f"denoisers, not on "
                         f"{type(pipe).__name__}'s {type(model).__name__}")
    if isinstance(pipe, REFERENCE_TOKENS):
        raise ValueError(f"{'sparsity' if sparsity is not None else 'sparse_mask'}: {type(pipe).__name__} appends "
                         "its reference image's tokens to the output's, which block-sparse attention does not lay "
                         "out in blocks yet")
    check_backend(o["sparse_backend"], "sparse_backend")
    layers = list_layers(model)
    names = [n for n, info in layers.items() if info.kind in (SELF, JOINT)]
    dense = o["sparse_dense_layers"]
    dense = [dense] if isinstance(dense, (str, int)) else dense
    dense = names[:1] if dense is None else [layer_name(layer, names, layers) for layer in dense]
    pool, grid = o["sparse_pool"], token_grid(pipe, arguments)
    if pool is None:
        pool = tiling_pool(grid)
    if (not isinstance(pool, (tuple, list)) or len(pool) != 2 or any(not isinstance(p, int) or p < 1 for p in pool)
            or pool[0] > grid[0] or pool[1] > grid[1]):
        raise ValueError(f"sparse_pool {pool!r} must be (rows, columns) of tokens that fit in the call's "
                         f"{grid[0]} x {grid[1]} tokens per frame")
    if not isinstance(model, VIDEO) and frame_blocks(grid, pool) == 1:
        raise ValueError(f"sparse_pool: {one_block_a_frame(grid, pool)}")
    resolve_backend(o["sparse_backend"], model.device, tuple(pool))
    steps = o["sparse_dense_steps"]
    if steps is None:
        steps = math.ceil(WARMUP * (arguments.get("num_inference_steps") or 0))
    source = {"draft": lambda: DraftMask(sparsity), "radial": RadialMask, "tile": lambda: TileMask(tuple(o["sparse_tile"]))}
    try:
        return DraftAttention([n for n in names if n not in dense], pool=tuple(pool), dense_steps=steps,
                              backend=o["sparse_backend"], source=source[kind]())
    except (TypeError, ValueError) as error:
        raise ValueError(f"sparse attention: {error}") from None

"""Attention-map capture: where each chosen text token is attended to in the image, per layer.

``AttentionMapCapture`` is a steer that, when armed, records on each of its layers the head-mean
image->text attention map of chosen token groups at the layer's own grid, ``[rows, groups, h, w]``,
with gradients if the forward runs with them, without changing the layer's output. Shared by every
method that reads maps (A-STAR; later IR-Diffusion subject masks and Ouroboros).

Definition: the map of text key j at image query i is the probability p_ij of the layer's own
softmax. On cross-attention (UNet ``attn2``, Wan ``attn2``) every key is text: p = softmax(q k^T s).
On joint attention (SD3, FLUX) it is the image-query x text-key block of the softmax over ALL keys,
image and text, so an image query's text probabilities sum to its text mass, not to 1. It is
computed without the L x L map, in O(L_image x L_text) memory, as

    p_ij = softmax_{text keys}(q_i k_j s) * m_i,   m_i = sum_{text keys j} p_ij,

where the text mass m comes from one extra SDPA call whose value is 1 on text keys and 0 on image
keys (it runs after the layer's own attention, so it cannot be taken for it by another steer).

With gradient checkpointing (``checkpointing``), a checkpointed block recomputes its forward for the
backward pass; the capture then repeats the maps it recorded in that block, so the recomputation
matches the forward.

A token group is a list of text-key indices; its map is the sum of its tokens' maps (the
probability mass the query puts on the group, e.g. a word of several tokens). Groups may differ per
batch row (one list of groups per row, shorter lists padded with empty groups, whose maps are 0).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .architectures import CROSS, JOINT, SELF, TokenLayout, architecture_of, list_layers
from .core import AttentionCall, Next, patched_attribute
from .perturb import _additive

TokenGroups = Sequence[Sequence[Sequence[int]]]  # per batch row, per group, text-key indices
MAX_DEFAULT_TOKENS = 256  # Attend-and-Excite's 16 x 16 maps on SD 512 px


def token_weights(tokens: TokenGroups, text_len: int) -> torch.Tensor:
    """``[rows, groups, text_len]``: 1 where a group holds a token, 0 elsewhere (and in padding)."""
    weights = torch.zeros(len(tokens), max((len(row) for row in tokens), default=0), text_len)
    for r, row in enumerate(tokens):
        for g, group in enumerate(row):
            for index in group:
                if not 0 <= index < text_len:
                    raise ValueError(f"token index {index} is past the text sequence of {text_len} tokens (0-{text_len - 1})")
                weights[r, g, index] = 1.0
    return weights


def _mask_block(mask, rows: slice, cols: slice | None, dtype) -> torch.Tensor | None:
    """The additive mask restricted to query ``rows`` and key ``cols`` (broadcast dimensions kept)."""
    if mask is None:
        return None
    mask = _additive(mask, dtype)
    if mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    return mask if cols is None else mask[..., cols]


def text_attention(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, scale: float, mask=None) -> torch.Tensor:
    """``[B, H, L_image, L_text]``: the exact probabilities of the image queries on the text keys."""
    img, txt = layout.image, layout.text
    q_img = q[..., img, :]
    if txt is None:  # cross-attention: all keys are text
        scores = (q_img @ k.transpose(-1, -2)) * scale
        block = _mask_block(mask, img, None, q.dtype)
        return torch.softmax(scores if block is None else scores + block, dim=-1)
    scores = (q_img @ k[..., txt, :].transpose(-1, -2)) * scale
    block = _mask_block(mask, img, txt, q.dtype)
    within_text = torch.softmax(scores if block is None else scores + block, dim=-1).nan_to_num(0.0)  # all text masked
    is_text = torch.zeros(k.shape[-2], dtype=q.dtype, device=q.device)
    is_text[txt] = 1.0
    value = is_text[:, None].expand(k.shape[-2], q.shape[-1]).expand(*k.shape[:-2], -1, -1).contiguous()
    mass = F.scaled_dot_product_attention(q_img, k, value, attn_mask=_mask_block(mask, img, None, q.dtype), scale=scale)
    return within_text * mass[..., :1]


def attention_maps(q, k, layout: TokenLayout, scale: float, weights: torch.Tensor, mask=None) -> torch.Tensor:
    """``[B, groups, *grid]``: head-mean maps of the token groups ``weights`` ``[B, groups, L_text]``."""
    probs = text_attention(q, k, layout, scale, mask).mean(1)
    maps = weights.to(probs.device, probs.dtype) @ probs.transpose(-1, -2)
    return maps.reshape(*maps.shape[:2], *layout.grid)


class _Complete(Exception):
    """Ends a forward once a capture has every layer it needs."""


@dataclass
class _Request:
    tokens: TokenGroups
    rows: torch.Tensor | None
    grad: bool
    stop: bool


class AttentionMapCapture:
    """Steer that records attention maps of token groups on its layers (see module docstring).

    Disarmed it only passes the call on. ``arm(tokens, rows)`` makes it record, on each of its layers'
    next call, the maps of batch ``rows`` (all rows when None; ``tokens`` has one list of groups per
    recorded row) into ``maps[layer]``; each layer is recorded once per arming, so further forwards
    of the same arming (a second branch, a perturbed batch) are left alone.
    """

    def __init__(self, layers: Iterable[str]):
        self.layers = frozenset(layers)
        self.maps: dict[str, torch.Tensor] = {}
        self._request: _Request | None = None
        self._replay: _Request | None = None  # the request of the block being recomputed for backward
        self._weights: dict[int, torch.Tensor] = {}

    def arm(self, tokens: TokenGroups, rows: torch.Tensor | None = None, grad: bool = False, stop: bool = False) -> None:
        """Record the next call of each layer. grad: keep the maps' graph (when the forward has one);
        stop: end the forward (by an exception ``collect`` catches) once every layer is recorded."""
        self.maps, self._weights = {}, {}
        self._request = _Request([[list(g) for g in row] for row in tokens], rows, grad, stop)

    def disarm(self) -> None:
        self._request = None

    def collect(self, forward: Callable[[], object], tokens: TokenGroups, rows: torch.Tensor | None = None,
                grad: bool = False, stop: bool = True) -> dict[str, torch.Tensor]:
        """``{layer: maps}`` of one ``forward()``; with ``stop`` the forward ends after the last layer
        this capture needs (its remaining blocks and its output are not computed)."""
        self.arm(tokens, rows, grad, stop)
        try:
            forward()
        except _Complete:
            pass
        finally:
            self.disarm()
        missing = sorted(self.layers - self.maps.keys())
        if missing:
            raise RuntimeError(f"the forward did not run attention layer(s) {missing}, so their maps are missing")
        return self.maps

    @contextmanager
    def checkpointing(self, model: torch.nn.Module, enable: bool = True):
        """For a block: the blocks of ``model`` that support gradient checkpointing (diffusers'
        ``gradient_checkpointing``) checkpoint their activations under grad, when ``enable`` or when
        the model already has checkpointing on, with a non-reentrant checkpoint whose recomputation
        repeats this capture's maps. The modules' own settings are restored afterwards."""
        blocks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        if not any(m.gradient_checkpointing for m in blocks) and not enable:
            yield
            return

        def func(module, *args):
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                     context_fn=lambda: (nullcontext(), self._replaying(self._request)))

        with ExitStack() as stack:
            for m in blocks:
                stack.enter_context(patched_attribute(m, "gradient_checkpointing", True))
                stack.enter_context(patched_attribute(m, "_gradient_checkpointing_func", func))
            yield

    @contextmanager
    def _replaying(self, request: _Request | None):
        old, self._replay = self._replay, request
        try:
            yield
        finally:
            self._replay = old

    def attention(self, call: AttentionCall, q, k, v, mask, next: Next) -> torch.Tensor:
        out = next(q, k, v, mask)
        if self._replay is not None and call.name in self.layers:
            self._maps(call, q, k, mask, self._replay)  # the same ops as the forward, for the recomputation
            return out
        request = self._request
        if request is None or call.name in self.maps:
            return out
        if call.layer.kind == SELF:
            raise ValueError(f"layer {call.name!r} is self-attention: it has no text keys to map")
        if call.layout.grid is None:
            raise RuntimeError(f"layer {call.name!r}: the image grid of this call is unknown, so its maps cannot be shaped")
        self.maps[call.name] = self._maps(call, q, k, mask, request)
        if request.stop and self.maps.keys() >= self.layers:
            raise _Complete
        return out

    def _maps(self, call: AttentionCall, q, k, mask, request: _Request) -> torch.Tensor:
        if request.rows is not None:
            rows = request.rows.to(q.device)
            q, k = q[rows], k[rows]
            if mask is not None and mask.dim() == 4 and mask.shape[0] > 1:
                mask = mask[rows]
        if len(request.tokens) != q.shape[0]:
            raise ValueError(f"{len(request.tokens)} token lists for {q.shape[0]} recorded rows: give one per row")
        text_len = k.shape[-2] if call.layout.text is None else call.layout.text.stop - call.layout.text.start
        if text_len not in self._weights:
            self._weights[text_len] = token_weights(request.tokens, text_len)
        with torch.set_grad_enabled(request.grad and torch.is_grad_enabled()):
            return attention_maps(q, k, call.layout, call.scale(q.shape[-1]), self._weights[text_len], mask)


def map_layers(model: torch.nn.Module, latent: tuple[int, ...], layers=None, grid=None) -> tuple[list[str], tuple[int, ...]]:
    """Check a choice of layers and grid for maps of ``model`` at a VAE latent of size ``latent``.

    layers: names or indices into the model's layers with text keys (cross or joint, module order);
    None: all of them at the grid. grid: the map grid (h, w); None: the grid of the given layers, or
    else the finest grid of a text layer with at most 256 tokens (Attend-and-Excite's 16 x 16 at SD
    512 px), or the coarsest if none is that small. Returns (layer names, grid); ValueError on a bad choice.
    """
    all_layers = list_layers(model)
    grids = architecture_of(model).layer_grids(model, tuple(latent))
    text = [n for n, info in all_layers.items() if info.kind in (CROSS, JOINT)]
    if not text:
        raise ValueError(f"{type(model).__name__} has no attention layer with text keys to map")
    grid = None if grid is None else tuple(int(s) for s in grid)
    if layers is None:
        grid = grid or _default_grid({grids[n] for n in text})
        chosen = [n for n in text if grids[n] == grid]
    else:
        chosen = [_map_layer(layer, text, all_layers) for layer in ([layers] if isinstance(layers, (str, int)) else layers)]
        if not chosen:
            raise ValueError("no layers chosen for maps: give layer names or indices, or None for the default")
        found = sorted({grids[n] for n in chosen})
        if grid is None and len(found) > 1:
            raise ValueError(f"the chosen layers have grids {found}: maps are averaged at one grid; choose "
                             f"layers of one grid or give the grid")
        grid = grid or found[0]
    if not any(grids[n] == grid for n in chosen or text):
        raise ValueError(f"map grid {grid} is not the grid of any chosen layer; their grids are "
                         f"{sorted({grids[n] for n in chosen or text})}")
    off = [n for n in chosen if grids[n] != grid]
    if off:
        raise ValueError(f"layer(s) {off} are not at the map grid {grid}: their grids are {sorted({grids[n] for n in off})}")
    return chosen, grid


def _default_grid(grids: set[tuple[int, ...]]) -> tuple[int, ...]:
    small = [g for g in grids if math.prod(g) <= MAX_DEFAULT_TOKENS]
    return max(small, key=math.prod) if small else min(grids, key=math.prod)


def _map_layer(layer, text: list[str], all_layers: dict) -> str:
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if isinstance(layer, int):
        if not 0 <= layer < len(text):
            raise ValueError(f"layer index {layer} is out of range: the model has {len(text)} layers with text keys (0-{len(text) - 1})")
        return text[layer]
    if layer not in all_layers:
        raise ValueError(f"unknown layer {layer!r}: allowed are the model's {len(text)} cross/joint attention layers "
                         f"by name (e.g. {', '.join(text[:2])}) or by index 0-{len(text) - 1}")
    if all_layers[layer].kind == SELF:
        raise ValueError(f"layer {layer!r} is self-attention: it has no text keys to map")
    return layer

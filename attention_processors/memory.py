"""Frame memory: subject tokens' keys and values kept from one attention call, read by later calls.

``FrameMemory`` is a steer on self-attention layers with two roles, each off unless asked for:
- record: with ``masks`` set ([rows, S, L] bool over the call's image tokens, S subjects), each layer
  keeps the per-subject mean of its values, ``pooled[layer]`` [rows, S, H, D] (with the graph when
  the forward has one; zeros for an empty mask), and with ``keep`` also the keys and values of the
  tokens inside any subject, ``stored[layer] = (k, v, valid)``: [rows, H, M, D] twice and [rows, M]
  bool, M the largest count over the rows (shorter rows padded with invalid slots).
- read: with ``extra[layer] = (k, v, valid)`` of that form, every query of the layer also attends to
  the valid extra keys, in one softmax with its own keys. Keys keep the rotary positions (Wan, FLUX)
  they had in the call that recorded them.

Ouroboros-Diffusion's subject-aware cross-frame attention and self-recurrent guidance are built on
these roles (``attnsteer.guidance.ouroboros``).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .core import AttentionCall, Next
from .perturb import _additive
from .subjects import _combined


def pack(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of ``x`` [rows, H, L, D] where ``keep`` [rows, L] is True, in order, as
    ([rows, H, M, D], valid [rows, M]); M is the largest count of a row, shorter rows padded."""
    counts = keep.sum(1)
    width = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=keep.device)[None] < counts[:, None]
    index = order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return x.gather(2, index), valid


class FrameMemory:
    """Steer that records subject tokens' values and keys and reads stored ones (module docstring)."""

    def __init__(self, layers: Iterable[str]):
        self.layers = frozenset(layers)
        self.masks: torch.Tensor | None = None
        self.keep = False
        self.extra: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pooled: dict[str, torch.Tensor] = {}
        self.stored: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        """Record nothing, read nothing, forget what was recorded."""
        self.masks, self.keep, self.extra, self.pooled, self.stored = None, False, {}, {}, {}

    def attention(self, call: AttentionCall, q, k, v, mask, next: Next) -> torch.Tensor:
        if self.masks is not None:
            self._record(call, k, v)
        extra = self.extra.get(call.name)
        if extra is None:
            return next(q, k, v, mask)
        k_extra, v_extra, valid = extra
        if k_extra.shape[0] != q.shape[0]:
            raise ValueError(f"layer {call.name!r}: extra keys for {k_extra.shape[0]} rows in a batch of {q.shape[0]}")
        keys = torch.cat([torch.ones(q.shape[0], k.shape[-2], dtype=torch.bool, device=q.device), valid.to(q.device)], 1)
        own = None if mask is None else F.pad(_additive(mask, q.dtype), (0, valid.shape[1]))
        return next(q, torch.cat([k, k_extra.to(k)], 2), torch.cat([v, v_extra.to(v)], 2),
                    _combined(own, keys[:, None, None, :], q.dtype))

    def _record(self, call: AttentionCall, k, v) -> None:
        img, masks = call.layout.image, self.masks.to(k.device)
        length = img.stop - img.start
        if masks.shape[0] != k.shape[0] or masks.shape[-1] != length:
            raise ValueError(f"layer {call.name!r}: subject masks of shape {tuple(masks.shape)} for {k.shape[0]} rows "
                             f"of {length} image tokens")
        k, v = k[..., img, :], v[..., img, :]
        weights = masks.to(v.dtype) / masks.sum(-1, keepdim=True).clamp_min(1)
        self.pooled[call.name] = torch.einsum("bsl,bhld->bshd", weights, v)
        if self.keep:
            inside = masks.any(1)
            (k_kept, valid), (v_kept, _) = pack(k.detach(), inside), pack(v.detach(), inside)
            self.stored[call.name] = (k_kept, v_kept, valid)

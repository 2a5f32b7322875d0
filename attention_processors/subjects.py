"""Subject attention: isolation and reposition (IR-Diffusion) as one steer on self-attention layers.

Each batch row may carry subject masks (``Subjects.masks``, [rows, S, h, w] bool at any resolution,
resized to each layer's grid by area, then >= 0.5) and, per subject, a source row to read
(``Subjects.sources``, [rows, S], -1 for none).

- Isolation: in a row, an image query inside subject i does not attend to an image key that lies in
  another subject and not in subject i. Text keys (joint attention) and background stay open.
- Reposition: a row reading subject i from source row r gets an extra canvas of keys and values:
  the source's features inside the bounding box of its subject-i mask, resized (nearest) onto the
  box of this row's subject-i mask, on an otherwise empty canvas of the image grid. Only this row's
  queries inside subject i attend to the canvas, and only to canvas tokens that land inside the
  source's subject-i mask. Rows that read nothing are computed apart, with no extra keys.

The masks are boolean per image ([rows, 1, Lq, Lk], broadcast over heads): no L x L map per head.
Moving projected keys and values equals moving hidden states before the projection only where the
projection acts per token and positions are not rotated into the keys: UNets (SD, SDXL) and SD3
qualify; FLUX and Wan apply RoPE to q and k before attention, so a moved key would keep its old
position's rotation: ``check_reposition`` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .architectures import JOINT, SELF, list_layers
from .core import AttentionCall, Next
from .perturb import _additive

ROTARY_MODELS = ("FluxTransformer2DModel", "WanTransformer3DModel")


@dataclass
class Subjects:
    """Subject masks [rows, S, h, w] (bool or {0, 1}) and the source row each row reads per subject
    [rows, S] (-1: none; None: no reading). When the attention batch holds several stacks of these
    rows (CFG halves, a perturbed branch), each stack reads within itself. ``isolation=False`` leaves
    the subjects open to each other; ``reposition=False`` reads the source's subject tokens where they
    sit in the source (shared attention, as ConsiStory and StoryDiffusion)."""

    masks: torch.Tensor
    sources: torch.Tensor | None = None
    isolation: bool = True
    reposition: bool = True


def resize_masks(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[rows, S, *grid] bool: ``masks`` resized to ``grid`` by area, then >= 0.5."""
    if tuple(masks.shape[-2:]) == tuple(grid):
        return masks.bool()
    return F.interpolate(masks.float(), size=tuple(grid), mode="area") >= 0.5


def isolation(masks: torch.Tensor) -> torch.Tensor:
    """[rows, L, L] bool, query x key allowed: False where the query is in subject i and the key is
    in another subject but not in i. ``masks``: [rows, S, L] bool."""
    shared = torch.zeros(masks.shape[0], masks.shape[-1], masks.shape[-1], dtype=torch.bool, device=masks.device)
    for s in range(masks.shape[1]):
        shared |= masks[:, s, :, None] & masks[:, s, None, :]
    inside = masks.any(1)
    return ~(inside[:, :, None] & inside[:, None, :]) | shared


def _box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), bottom and right exclusive, of a 2-D bool mask; None when empty."""
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    if not len(rows):
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def reposition(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each target-grid token reads from when the source mask's box is resized (nearest) onto
    the target mask's box: (index [h * w] into the source grid, valid [h * w] bool: inside the target
    box and landing inside the source mask). ``source``, ``target``: [h, w] bool."""
    h, w = target.shape
    index = torch.zeros(h * w, dtype=torch.long, device=target.device)
    valid = torch.zeros(h * w, dtype=torch.bool, device=target.device)
    src, dst = _box(source), _box(target)
    if src is None or dst is None:
        return index, valid
    (st, sb, sl, sr), (tt, tb, tl, tr) = src, dst
    ys = st + (torch.arange(tb - tt, device=target.device) * (sb - st)) // (tb - tt)
    xs = sl + (torch.arange(tr - tl, device=target.device) * (sr - sl)) // (tr - tl)
    flat = (ys[:, None] * w + xs[None, :]).reshape(-1)
    at = ((torch.arange(tt, tb, device=target.device)[:, None] * w) + torch.arange(tl, tr, device=target.device)[None, :]).reshape(-1)
    index[at] = flat
    valid[at] = source.reshape(-1)[flat]
    return index, valid


def check_reposition(model: torch.nn.Module) -> None:
    """ValueError when reading repositioned keys would be wrong on ``model`` (rotary positions)."""
    if type(model).__name__ in ROTARY_MODELS:
        raise ValueError(f"{type(model).__name__} rotates positions into its keys (RoPE), so moving a reference's "
                         "keys would keep their old positions: reposition needs a model without RoPE (SD, SDXL, SD3)")


def check_subject_layers(model: torch.nn.Module, isolate, read=()) -> None:
    """ValueError naming a layer of ``isolate`` / ``read`` that ``model`` lacks or that is cross-attention,
    or reading on a model with rotary positions."""
    layers = list_layers(model)
    for name in [*isolate, *read]:
        if name not in layers:
            examples = ", ".join([n for n, i in layers.items() if i.kind != "cross"][:2])
            raise ValueError(f"unknown attention layer {name!r}; the self-attention layers are named e.g. {examples}")
        if layers[name].kind not in (SELF, JOINT):
            raise ValueError(f"layer {name!r} is cross-attention: isolation and reposition act on self-attention")
    if read:
        check_reposition(model)


class SubjectAttention:
    """Steer: isolation on ``isolate`` layers, isolation plus reading repositioned references on
    ``read`` layers (see the module docstring; ``check_subject_layers`` checks them against a model).
    ``subjects`` is set between model calls (None: the layers run untouched). Steers after it in a
    chain see the reading rows apart from the others: put it last."""

    def __init__(self, isolate, read=()):
        self.read, self.layers = frozenset(read), frozenset(isolate) | frozenset(read)
        self.subjects: Subjects | None = None

    def attention(self, call: AttentionCall, q, k, v, mask, next: Next) -> torch.Tensor:
        subjects = self.subjects
        grid = call.layout.grid
        if subjects is None or grid is None:
            return next(q, k, v, mask)
        if len(grid) != 2:
            raise ValueError(f"layer {call.name!r}: subject attention needs a 2-D image grid, not {grid}")
        rows = subjects.masks.shape[0]
        if q.shape[0] % rows:
            raise ValueError(f"subject masks for {rows} rows do not divide the attention batch of {q.shape[0]}")
        stacks = q.shape[0] // rows
        masks = resize_masks(subjects.masks.to(q.device), grid).flatten(2).repeat(stacks, 1, 1)  # [B, S, L_img]
        sources = None
        if subjects.sources is not None and call.name in self.read:
            offsets = (torch.arange(stacks, device=q.device) * rows).repeat_interleave(rows)[:, None]
            src = subjects.sources.to(q.device).repeat(stacks, 1)
            sources = torch.where(src >= 0, src + offsets, src)
        reading = sources is not None and bool((sources >= 0).any())
        isolating = subjects.isolation and bool((masks.any(2).sum(1) > 1).any())  # two subjects in a row
        if not reading and not isolating:
            return next(q, k, v, mask)
        img = call.layout.image
        allowed = torch.ones(q.shape[0], 1, q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        if isolating:
            allowed[:, 0, img, img] = isolation(masks)
        if not reading:
            return next(q, k, v, _combined(mask, allowed, q.dtype))
        readers = (sources >= 0).any(1)
        out = torch.empty_like(q)
        plain = (~readers).nonzero()[:, 0]
        if len(plain):
            out[plain] = next(q[plain], k[plain], v[plain], _combined(_rows(mask, plain, q.shape[0]), allowed[plain], q.dtype))
        rows_r = readers.nonzero()[:, 0]
        k_ext, v_ext, extra = [k[rows_r]], [v[rows_r]], []
        for s in range(masks.shape[1]):
            index = torch.zeros(len(rows_r), masks.shape[-1], dtype=torch.long, device=q.device)
            valid = torch.zeros(len(rows_r), masks.shape[-1], dtype=torch.bool, device=q.device)
            src_rows = sources[rows_r, s].clamp(min=0)
            for j, (row, src) in enumerate(zip(rows_r.tolist(), sources[rows_r, s].tolist())):
                if src >= 0 and subjects.reposition:
                    index[j], valid[j] = reposition(masks[src, s].view(grid), masks[row, s].view(grid))
                elif src >= 0:
                    index[j], valid[j] = torch.arange(masks.shape[-1], device=q.device), masks[src, s]
            gather = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            k_ext.append(k[src_rows][:, :, img].gather(2, gather))
            v_ext.append(v[src_rows][:, :, img].gather(2, gather))
            query_in = torch.zeros(len(rows_r), q.shape[-2], dtype=torch.bool, device=q.device)
            query_in[:, img] = masks[rows_r, s]
            extra.append(query_in[:, None, :, None] & valid[:, None, None, :])
        full = torch.cat([allowed[rows_r], *extra], dim=-1)
        base = _rows(mask, rows_r, q.shape[0])
        if base is not None:  # the layer's own mask covers its own keys; the canvases have none
            base = F.pad(_additive(base, q.dtype).expand(len(rows_r), *base.shape[1:-1], base.shape[-1]),
                         (0, full.shape[-1] - k.shape[-2]))
        out[rows_r] = next(q[rows_r], torch.cat(k_ext, 2), torch.cat(v_ext, 2), _combined(base, full, q.dtype))
        return out


def _rows(mask, rows: torch.Tensor, batch: int):
    """A layer's own mask restricted to batch ``rows`` (None stays None; a broadcast mask stays)."""
    if mask is None or mask.dim() < 4 or mask.shape[0] != batch:
        return mask
    return mask[rows]


def _combined(mask, allowed: torch.Tensor, dtype) -> torch.Tensor:
    """``allowed`` (bool) with a layer's own mask, if any, as an additive mask."""
    if mask is None:
        return allowed
    return torch.where(allowed, _additive(mask, dtype), torch.tensor(float("-inf"), dtype=dtype, device=allowed.device))

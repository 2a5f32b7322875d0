"""Subject attention (IR-Diffusion): isolation and reposition on self-attention layers, mutual
cross-attention on cross-attention layers, as one steer.

Each batch row may carry subject masks (``Subjects.masks``, [rows, S, h, w] bool at any resolution,
resized to each layer's grid by area, then >= 0.5) and, per subject, a source row to read
(``Subjects.sources``, [rows, S], -1 for none).

- Isolation: in a row, an image query inside subject i does not attend to an image key inside any
  other subject j (the authors' rule: with overlapping masks a token inside i and j is barred from
  both, and keys inside i and j are barred to queries of either). Text keys (joint attention) and
  background stay open; a query that would be barred from every image key (only when the subjects
  cover the whole grid) keeps them all, where the authors' additive mask degenerates.
- Reposition: a row reading subject i from source row r gets an extra canvas of keys and values:
  the source's features inside the bounding box of its subject-i mask, resized (nearest) onto the
  box of this row's subject-i mask, on an otherwise empty canvas of the image grid. Only this row's
  queries inside subject i attend to the canvas, and only to canvas tokens that land inside the
  source's subject-i mask. Rows that read nothing are computed apart, with no extra keys.
- Mask dropout (``Subjects.dropout``): at each attention grid each reading query of subject i is
  dropped (does not read canvas i) with that probability, drawn per token of that grid from a
  generator seeded by ``Subjects.seed`` and the grid; the boxes and the isolation keep the whole
  masks. A draw that would drop every query of a subject keeps them all (as the authors).
- Mutual cross-attention (``Subjects.mutual`` = lambda): on a cross-attention layer, a reading row's
  image query inside subject i also attends to source row r's text keys and values (the subject's
  own prompt) instead of its own; inside the subjects the output becomes (1 - lambda) x its own
  plus lambda x the mean of those readings over the subjects holding the query. Outside them it is
  unchanged. So the scene's subject gets the same text features its reference gets.

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

from .architectures import CROSS, JOINT, SELF, list_layers
from .core import AttentionCall, Next
from .perturb import _additive

ROTARY_MODELS = ("FluxTransformer2DModel", "WanTransformer3DModel")


@dataclass
class Subjects:
    """Subject masks [rows, S, h, w] (bool or {0, 1}) and the source row each row reads per subject
    [rows, S] (-1: none; None: no reading). When the attention batch holds several stacks of these
    rows (CFG halves, a perturbed branch), each stack reads within itself. ``isolation=False`` leaves
    the subjects open to each other; ``reposition=False`` reads the source's subject tokens where they
    sit in the source (shared attention, as ConsiStory and StoryDiffusion; the dropout then also drops
    the source's keys, the same draw, as the authors). ``dropout``: probability that a reading query
    is dropped, per grid token; ``seed``: of its draws; ``mutual``: the mutual cross-attention lambda
    (0: off)."""

    masks: torch.Tensor
    sources: torch.Tensor | None = None
    isolation: bool = True
    reposition: bool = True
    dropout: float = 0.0
    seed: int = 0
    mutual: float = 0.0


def resize_masks(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[rows, S, *grid] bool: ``masks`` resized to ``grid`` by area, then >= 0.5."""
    if tuple(masks.shape[-2:]) == tuple(grid):
        return masks.bool()
    return F.interpolate(masks.float(), size=tuple(grid), mode="area") >= 0.5


def isolation(masks: torch.Tensor) -> torch.Tensor:
    """[rows, L, L] bool, query x key allowed: False where the query is in some subject i and the key
    in some subject j != i; a query left with no key keeps them all. ``masks``: [rows, S, L] bool."""
    m = masks.float()
    count = m.sum(1)  # [rows, L]: the subjects holding each token
    pairs = count[:, :, None] * count[:, None, :] - torch.einsum("bsq,bsk->bqk", m, m)  # pairs (i, j != i)
    allowed = pairs == 0
    return allowed | ~allowed.any(-1, keepdim=True)


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


def check_subject_layers(model: torch.nn.Module, isolate, read=(), mutual=()) -> None:
    """ValueError naming a layer of ``isolate`` / ``read`` that ``model`` lacks or that is cross-attention,
    a layer of ``mutual`` that is not cross-attention, or reading on a model with rotary positions."""
    layers = list_layers(model)
    for name in [*isolate, *read, *mutual]:
        if name not in layers:
            examples = ", ".join([n for n, i in layers.items() if i.kind != CROSS][:2])
            raise ValueError(f"unknown attention layer {name!r}; the self-attention layers are named e.g. {examples}")
    for name in [*isolate, *read]:
        if layers[name].kind not in (SELF, JOINT):
            raise ValueError(f"layer {name!r} is cross-attention: isolation and reposition act on self-attention")
    for name in mutual:
        if layers[name].kind != CROSS:
            raise ValueError(f"layer {name!r} is {layers[name].kind}-attention: mutual cross-attention acts on "
                             "cross-attention layers")
    if read:
        check_reposition(model)


READ, ISOLATE, MUTUAL = "read", "isolate", "mutual"


@dataclass
class _Plan:
    """What every layer call of one kind at one grid and batch size needs, made once per ``subjects``."""

    masks: torch.Tensor  # [B, S, L_img] bool, whole
    isolated: torch.Tensor | None  # [B, L_img, L_img] allowed, or None when no row holds two subjects
    two: list[bool]  # per row: it holds two subjects or more (isolation changes something)
    plain: list[int]  # rows that read nothing
    readers: list[int]  # rows that read
    sources: torch.Tensor | None  # [R, S] source row per reader and subject (0 where none)
    has: torch.Tensor | None  # [R, S] bool: the reader reads the subject
    index: torch.Tensor | None  # [R, S, L_img] source token of each canvas token
    canvas: torch.Tensor | None  # [R, S, L_img, L_img] query x canvas token allowed


def _thinned(mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``mask`` & ``keep``, or the whole ``mask`` when that would empty it (or ``keep`` is None)."""
    if keep is None:
        return mask
    kept = mask & keep
    return kept if kept.any() else mask


class SubjectAttention:
    """Steer: isolation on ``isolate`` layers, isolation plus reading repositioned references on
    ``read`` layers, mutual cross-attention on the cross-attention layers ``mutual`` (see the module
    docstring; ``check_subject_layers`` checks them against a model). ``subjects`` is set between
    model calls (None: the layers run untouched); the masks, boxes, dropout draws and indices it
    implies are made once per grid and batch size. Steers after it in a chain see the reading rows
    apart from the others: put it last."""

    def __init__(self, isolate, read=(), mutual=()):
        self.read, self.mutual = frozenset(read), frozenset(mutual)
        self.layers = frozenset(isolate) | self.read | self.mutual
        self.subjects = None

    @property
    def subjects(self) -> Subjects | None:
        return self._subjects

    @subjects.setter
    def subjects(self, value: Subjects | None) -> None:
        self._subjects, self._plans = value, {}

    def _keep(self, grid: tuple[int, int], shape: torch.Size) -> torch.Tensor | None:
        """[rows, S, L] bool: the tokens of ``grid`` that mask dropout keeps (None: no dropout), drawn
        from a generator seeded by ``subjects.seed`` and the grid, so every layer at a grid shares it."""
        subjects = self._subjects
        if not subjects.dropout:
            return None
        seed = (subjects.seed * 1000003 + grid[0] * 10007 + grid[1]) % 2 ** 63
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= subjects.dropout

    def _plan(self, grid: tuple[int, int], batch: int, kind: str, device) -> _Plan:
        key = (tuple(grid), batch, kind, str(device))
        if key in self._plans:
            return self._plans[key]
        subjects, rows = self._subjects, self._subjects.masks.shape[0]
        if batch % rows:
            raise ValueError(f"subject masks for {rows} rows do not divide the attention batch of {batch}")
        stacks = batch // rows
        whole = resize_masks(subjects.masks.to(device), grid).flatten(2)
        masks = whole.repeat(stacks, 1, 1)
        two = ((masks.any(2).sum(1) > 1) & subjects.isolation & (kind != MUTUAL)).tolist()
        plan = _Plan(masks, isolation(masks) if any(two) else None, two, list(range(batch)), [], None, None, None, None)
        if kind != ISOLATE and subjects.sources is not None:
            offsets = torch.arange(stacks).repeat_interleave(rows)[:, None] * rows
            src = subjects.sources.cpu().repeat(stacks, 1)
            src = torch.where(src >= 0, src + offsets, src)
            plan.readers = [r for r in range(batch) if (src[r] >= 0).any()]
            plan.plain = [r for r in range(batch) if r not in plan.readers]
            readers = torch.tensor(plan.readers, dtype=torch.long)
            plan.sources = src[readers].clamp(min=0).to(device)
            plan.has = (src[readers] >= 0).to(device)
        if kind == READ and plan.readers:
            length = masks.shape[-1]
            keep = self._keep(grid, whole.shape)
            keep = None if keep is None else keep.to(device).repeat(stacks, 1, 1)
            index = torch.zeros(len(plan.readers), masks.shape[1], length, dtype=torch.long, device=device)
            valid = torch.zeros(len(plan.readers), masks.shape[1], length, dtype=torch.bool, device=device)
            queries = torch.zeros_like(valid)
            for j, row in enumerate(plan.readers):
                for s, source in enumerate(src[row].tolist()):
                    drawn = None if keep is None else keep[row, s]
                    if source >= 0 and subjects.reposition:
                        index[j, s], valid[j, s] = reposition(masks[source, s].view(grid), masks[row, s].view(grid))
                    elif source >= 0:
                        index[j, s], valid[j, s] = torch.arange(length, device=device), _thinned(masks[source, s], drawn)
                    if source >= 0:
                        queries[j, s] = _thinned(masks[row, s], drawn)
            plan.index = index
            plan.canvas = queries[:, :, :, None] & valid[:, :, None, :]
        self._plans[key] = plan
        return plan

    def attention(self, call: AttentionCall, q, k, v, mask, next: Next) -> torch.Tensor:
        grid = call.layout.grid
        if self._subjects is None or grid is None:
            return next(q, k, v, mask)
        if len(grid) != 2:
            raise ValueError(f"layer {call.name!r}: subject attention needs a 2-D image grid, not {grid}")
        if call.name in self.mutual:
            return self._mutual(call, q, k, v, mask, next)
        plan = self._plan(grid, q.shape[0], READ if call.name in self.read else ISOLATE, q.device)
        if plan.isolated is None and not plan.readers:
            return next(q, k, v, mask)
        img, batch = call.layout.image, q.shape[0]

        def allowed(rows: list[int], extra: int = 0) -> torch.Tensor | None:
            """Query x key allowed for ``rows`` (None: all, with no canvases)."""
            if not extra and not any(plan.two[r] for r in rows):
                return None
            full = torch.ones(len(rows), 1, q.shape[-2], k.shape[-2] + extra, dtype=torch.bool, device=q.device)
            if plan.isolated is not None:
                full[:, 0, img, img] = plan.isolated[rows]
            return full

        if not plan.readers:
            return next(q, k, v, _combined(mask, allowed(plan.plain), q.dtype))
        out = torch.empty_like(q)
        if plan.plain:
            rows = plan.plain
            out[rows] = next(q[rows], k[rows], v[rows], _combined(_rows(mask, rows, batch), allowed(rows), q.dtype))
        rows, subjects = plan.readers, plan.index.shape[1]
        k_ext, v_ext = [k[rows]], [v[rows]]
        for s in range(subjects):
            gather = plan.index[:, s, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            k_ext.append(k[plan.sources[:, s]][:, :, img].gather(2, gather))
            v_ext.append(v[plan.sources[:, s]][:, :, img].gather(2, gather))
        length = plan.masks.shape[-1]
        full = allowed(rows, subjects * length)
        for s in range(subjects):
            columns = slice(k.shape[-2] + s * length, k.shape[-2] + (s + 1) * length)
            full[:, 0, img, columns] = plan.canvas[:, s]
            if img.stop - img.start != q.shape[-2]:  # joint attention: text queries see no canvas
                full[:, 0, :img.start, columns] = False
                full[:, 0, img.stop:, columns] = False
        base = _rows(mask, rows, batch)
        if base is not None:  # the layer's own mask covers its own keys; the canvases have none
            base = F.pad(_additive(base, q.dtype).expand(len(rows), *base.shape[1:-1], base.shape[-1]),
                         (0, full.shape[-1] - k.shape[-2]))
        out[rows] = next(q[rows], torch.cat(k_ext, 2), torch.cat(v_ext, 2), _combined(base, full, q.dtype))
        return out

    def _mutual(self, call: AttentionCall, q, k, v, mask, next: Next) -> torch.Tensor:
        """Mutual cross-attention: the layer's output, with each reading row's image queries inside its
        subjects moved by lambda toward the mean of their attention over their sources' text keys."""
        out = next(q, k, v, mask)
        lam = self._subjects.mutual
        plan = self._plan(call.layout.grid, q.shape[0], MUTUAL, q.device) if lam else None
        if plan is None or not plan.readers:
            return out
        rows, img, batch = plan.readers, call.layout.image, q.shape[0]
        weights = plan.masks[rows] & plan.has[:, :, None]  # [R, S, L_img]: the subjects each query reads
        if not weights.any():
            return out
        total = torch.zeros_like(out[rows][:, :, img])
        for s in range(weights.shape[1]):
            if weights[:, s].any():
                sources = plan.sources[:, s]
                read = next(q[rows], k[sources], v[sources], _rows(mask, sources, batch))
                total += read[:, :, img] * weights[:, s, None, :, None].to(total.dtype)
        count = weights.sum(1)[:, None, :, None]  # [R, 1, L_img, 1]
        own = out[rows][:, :, img]
        mixed = torch.where(count > 0, (1 - lam) * own + lam * total / count.clamp(min=1), own)
        out = out.clone()
        out[rows, :, img] = mixed
        return out


def _rows(mask, rows: torch.Tensor, batch: int):
    """A layer's own mask restricted to batch ``rows`` (None stays None; a broadcast mask stays)."""
    if mask is None or mask.dim() < 4 or mask.shape[0] != batch:
        return mask
    return mask[rows]


def _combined(mask, allowed: torch.Tensor | None, dtype):
    """``allowed`` (bool, or None: all) with a layer's own mask, if any, as an additive mask of ``dtype``."""
    if mask is None or allowed is None:
        return allowed if mask is None else mask
    return torch.where(allowed, _additive(mask, dtype), torch.tensor(float("-inf"), dtype=dtype, device=allowed.device))

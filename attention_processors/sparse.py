"""Block-sparse attention (DraftAttention, Radial and sliding-tile masks) as one steer.

The image tokens of a call (grid (frames, h, w) in frame-major raster; an image grid (h, w) is one
frame) are grouped per frame into pooling windows of ``pool`` = (ph, pw) tokens. Each window is one
block of ph * pw slots, the ragged windows at the bottom and right edges padded with empty slots;
text tokens (joint attention) follow in blocks of the same size. The slot order (block-major) and its
inverse are made once per layout and cached.

A mask source says, per (row, head), which image block pairs to compute:
- ``DraftMask(sparsity)``: DraftAttention's draft map, softmax(q~ k~^T * scale) of the block-mean
  queries and keys; per (row, head) the ceil((1 - sparsity) n^2) largest entries are kept (one
  global threshold, not a top-k per block row).
- ``RadialMask()``: Radial Attention's static pattern (frames at distance <= 1 and the first frame
  dense, a band of blocks that halves each time the frame distance doubles).
- ``TileMask(window)``: sliding-tile attention, a 3-D window of blocks around each query block.
The diagonal is always kept, and every block row and column that touches text.

Backends compute attention over the kept block pairs only:
- ``"flex"``: ``torch.nn.attention.flex_attention``, compiled (torch.compile caches it per shape), on a
  BlockMask built directly from the block booleans with a block-level mask_mod (eager flex without a
  mask_mod silently computes dense attention); on CUDA its Triton kernels need ph * pw to be a multiple
  of 128, so "auto" picks it there only for such pools;
- ``"gather"``: each query block gathers its kept key/value blocks, one SDPA per group of rows with
  the same number of kept blocks; needs no compiler;
- ``"dense"``: SDPA with the block mask expanded to tokens, the reference.

A layer's own boolean attention mask (HunyuanVideo 1.5 masks its padded conditioning tokens) is kept: every
backend computes the kept block pairs with it, token by token.
"""

from __future__ import annotations

import functools
import math
import shutil
import warnings
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F

from .architectures import JOINT, SELF, TokenLayout
from .core import AttentionCall, Next

BACKENDS = ("auto", "flex", "gather", "dense")
_NO_CALL = object()  # the timestep before the first call
CUDA_FLEX_BLOCK = 128  # flex's Triton kernels tile queries and keys by up to 128 and need blocks a multiple of the tile
GATHER_ELEMENTS = 2**25  # gathered key elements per SDPA call of the gather backend (128 MiB in float32)
FLEX_SHAPES = 64  # compiled flex graphs per process (torch's own recompile limit, 8, is soon reached)


@dataclass(frozen=True)
class BlockLayout:
    """Where each token of one call sits in block-major slot order.

    ``slots``: [blocks * size] the token in each slot (``seq_len`` for an empty slot); ``tokens``:
    [seq_len] the slot of each token; ``shape``: image blocks per (frame, row, column); ``coords``:
    [image_blocks, 3] each image block's (frame, row, column)."""

    size: int
    seq_len: int
    shape: tuple[int, int, int]
    blocks: int
    slots: torch.Tensor
    tokens: torch.Tensor
    coords: torch.Tensor
    empty: torch.Tensor  # the empty slots

    @property
    def image_blocks(self) -> int:
        return math.prod(self.shape)

    def on(self, device) -> "BlockLayout":
        return _on_device(self, torch.device(device))

    def valid(self) -> torch.Tensor:
        """[blocks, size] bool: which slots hold a token."""
        return (self.slots < self.seq_len).view(self.blocks, self.size)

    def slot_tokens(self) -> torch.Tensor:
        """[blocks, size] the token of each slot, an empty slot given the last token (``valid`` tells them)."""
        return self.slots.clamp_max(self.seq_len - 1).view(self.blocks, self.size)


def tiling_pool(grid: tuple[int, int], size: int = 128, aspect: float = 0.5) -> tuple[int, int]:
    """A pool (ph, pw) for frames of ``grid`` = (h, w) tokens: of the pools of ``size`` / 2 to 2 ``size``
    tokens whose ph / pw is within 4x of ``aspect``, the one with the fewest padded slots (a pool that
    tiles the frame has none), then the nearest to ``size`` tokens and to ``aspect``, on a log scale
    (the authors' (8, 16) on a 64 x 64 grid; (10, 13) on Wan's 30 x 52 at 480 x 832). The whole frame
    when it is smaller."""
    h, w = grid
    if h * w <= size // 2:
        return h, w

    def cost(pool):
        ph, pw = pool
        padded = -(-h // ph) * -(-w // pw) * ph * pw - h * w
        return padded, abs(math.log(ph * pw / size)) + abs(math.log(ph / pw / aspect))

    pools = [(ph, pw) for ph in range(1, h + 1) for pw in range(1, w + 1)
             if size // 2 <= ph * pw <= 2 * size and aspect / 4 <= ph / pw <= aspect * 4]
    return min(pools, key=cost) if pools else (h, w)


def block_layout(layout: TokenLayout, seq_len: int, pool: tuple[int, int]) -> BlockLayout:
    """The (cached) BlockLayout of a call's ``layout`` with ``seq_len`` tokens and pooling windows ``pool``."""
    if layout.grid is None:
        raise ValueError("block-sparse attention needs the image token grid of the call, which is unknown here")
    text = None if layout.text is None else (layout.text.start, layout.text.stop)
    return _block_layout((layout.image.start, layout.image.stop), text, tuple(layout.grid), seq_len, tuple(pool))


@functools.lru_cache(maxsize=64)
def _block_layout(image, text, grid, seq_len, pool) -> BlockLayout:
    frames, h, w = (1, *grid) if len(grid) == 2 else grid
    ph, pw = pool
    rows, cols = -(-h // ph), -(-w // pw)
    index = torch.arange(frames * h * w).view(frames, h, w) + image[0]
    padded = F.pad(index, (0, cols * pw - w, 0, rows * ph - h), value=seq_len)
    slots = [padded.view(frames, rows, ph, cols, pw).permute(0, 1, 3, 2, 4).reshape(-1)]
    if text is not None:
        n_text = text[1] - text[0]
        slots.append(F.pad(torch.arange(*text), (0, -n_text % (ph * pw)), value=seq_len))
    slots = torch.cat(slots)
    tokens = torch.empty(seq_len, dtype=torch.long)
    filled = slots < seq_len
    tokens[slots[filled]] = filled.nonzero().flatten()
    coords = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    return BlockLayout(ph * pw, seq_len, (frames, rows, cols), len(slots) // (ph * pw), slots, tokens, coords.view(-1, 3),
                       (~filled).nonzero().flatten())


@functools.lru_cache(maxsize=64)
def _on_device(blocks: BlockLayout, device: torch.device) -> BlockLayout:
    move = lambda t: t.to(device)
    return BlockLayout(blocks.size, blocks.seq_len, blocks.shape, blocks.blocks, move(blocks.slots),
                       move(blocks.tokens), move(blocks.coords), move(blocks.empty))


def to_slots(x: torch.Tensor, blocks: BlockLayout) -> torch.Tensor:
    """[..., L, D] tokens -> [..., blocks * size, D] in slot order, empty slots zero."""
    out = x.index_select(-2, blocks.slots.clamp_max(blocks.seq_len - 1))
    if blocks.empty.numel():
        out[..., blocks.empty, :] = 0
    return out


def from_slots(x: torch.Tensor, blocks: BlockLayout) -> torch.Tensor:
    """The inverse of ``to_slots``: [..., blocks * size, D] -> [..., L, D]."""
    return x.index_select(-2, blocks.tokens)


# ----------------------------------------------------------------------------- mask sources

class MaskSource(Protocol):
    """Which image block pairs a call computes: bool [rows or 1, heads or 1, n, n], n image blocks."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, blocks: BlockLayout, scale: float) -> torch.Tensor: ...


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity!r} must be a number in [0, 1): the fraction of block pairs skipped")
    return float(sparsity)


def block_means(x: torch.Tensor, blocks: BlockLayout) -> torch.Tensor:
    """[B, H, n, D]: the mean of each image block's tokens (``x`` in slot order, empty slots zero)."""
    n, size = blocks.image_blocks, blocks.size
    counts = blocks.valid()[:n].sum(-1).to(x.dtype)
    return x[..., : n * size, :].unflatten(-2, (n, size)).sum(-2) / counts[:, None]


class DraftMask:
    """DraftAttention: per (row, head), the ceil((1 - sparsity) n^2) largest entries of the draft map
    softmax(q~ k~^T * scale), q~ and k~ the block-mean queries and keys."""

    def __init__(self, sparsity: float = 0.75):
        self.sparsity = check_sparsity(sparsity)

    def __call__(self, q, k, blocks, scale):
        draft = torch.softmax(block_means(q, blocks) @ block_means(k, blocks).transpose(-1, -2) * scale, dim=-1)
        n = draft.shape[-1]
        keep = math.ceil((1 - self.sparsity) * n * n)
        chosen = draft.flatten(-2).topk(keep, dim=-1).indices
        return torch.zeros_like(draft, dtype=torch.bool).flatten(-2).scatter_(-1, chosen, True).view_as(draft)


class RadialMask:
    """Radial Attention's static pattern on blocks: frames at distance d <= 1 dense, the first frame's
    block rows and columns dense (attention sink); otherwise a block pair is kept when the raster
    distance of their positions in the frame is below n_frame / 2^(floor(log2 d) + 1), a band that
    halves each time d doubles."""

    def __call__(self, q, k, blocks, scale):
        return _radial(blocks.shape, q.device)


@functools.lru_cache(maxsize=16)
def _radial(shape: tuple[int, int, int], device) -> torch.Tensor:
    frames, rows, cols = shape
    per_frame = rows * cols
    frame = torch.arange(frames, device=device).repeat_interleave(per_frame)
    place = torch.arange(per_frame, device=device).repeat(frames)
    d = (frame[:, None] - frame[None, :]).abs()
    band = per_frame / 2.0 ** (torch.log2(d.clamp_min(1).float()).floor() + 1)
    keep = (d <= 1) | (frame[:, None] == 0) | (frame[None, :] == 0)
    return (keep | ((place[:, None] - place[None, :]).abs() < band))[None, None]


class TileMask:
    """Sliding-tile attention: each query block keeps the ``window`` = (frames, rows, columns) blocks
    around it, the window shifted to stay inside the grid (so every block row keeps as many)."""

    def __init__(self, window: tuple[int, int, int] = (3, 3, 3)):
        if len(window) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window):
            raise ValueError(f"tile window {window!r} must be 3 positive integers (frames, rows, columns) of blocks")
        self.window = tuple(window)

    def __call__(self, q, k, blocks, scale):
        return _tiles(blocks.shape, self.window, q.device)


@functools.lru_cache(maxsize=16)
def _tiles(shape, window, device) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(*[torch.arange(m, device=device) for m in shape], indexing="ij"), -1).view(-1, 3)
    keep = None
    for axis, (n, w) in enumerate(zip(shape, window)):
        pos = torch.arange(n, device=device)
        start = (pos - (w - 1) // 2).clamp(0, max(n - w, 0))
        inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + w)
        along = coords[:, axis]
        pairs = inside[along[:, None], along[None, :]]
        keep = pairs if keep is None else keep & pairs
    return keep[None, None]


def block_mask(source: MaskSource, q, k, blocks: BlockLayout, scale: float) -> torch.Tensor:
    """bool [B or 1, H or 1, blocks, blocks]: the source's image block pairs and the diagonal, every
    block row and column that touches text kept."""
    image = source(q, k, blocks, scale)
    n = blocks.image_blocks
    eye = torch.eye(n, dtype=torch.bool, device=image.device)
    image = image | eye
    if blocks.blocks == n:
        return image
    return F.pad(image, (0, blocks.blocks - n, 0, blocks.blocks - n), value=True)


def density(mask: torch.Tensor) -> float:
    """The fraction of block pairs a block mask computes."""
    return mask.float().mean().item()


# ----------------------------------------------------------------------------- backends

def dense_blocks(q, k, v, mask, blocks: BlockLayout, scale: float, own=None) -> torch.Tensor:
    """The reference: SDPA over the slots with the block mask expanded to tokens (empty key slots off) and
    the layer's own boolean mask ``own`` ([B or 1, H or 1, L, L] in token order), if any."""
    size = blocks.size
    tokens = mask.repeat_interleave(size, -2).repeat_interleave(size, -1) & blocks.valid().flatten()
    if own is not None:
        slot = blocks.slot_tokens().flatten()
        tokens = tokens & own.index_select(-2, slot).index_select(-1, slot)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=tokens, scale=scale)


def gather_blocks(q, k, v, mask, blocks: BlockLayout, scale: float, own=None) -> torch.Tensor:
    """Each query block gathers its kept key/value blocks; query blocks that keep equally many key
    blocks share 4-D SDPA calls, each gathering at most GATHER_ELEMENTS keys' elements. ``own``: the
    layer's boolean mask in token order, its part for the gathered blocks read token by token."""
    b, h, _, d = q.shape
    n, size = blocks.blocks, blocks.size
    mask = mask.expand(b, h, n, n).reshape(-1, n)
    queries, key_blocks, value_blocks = (x.reshape(b * h * n, size, d) for x in (q, k, v))
    valid = blocks.valid()
    counts = mask.sum(-1)
    out = q.new_empty(b * h * n, size, d)
    for count in counts.unique().tolist():
        same = (counts == count).nonzero().flatten()
        for rows in same.split(max(1, GATHER_ELEMENTS // (count * size * d))):
            keys = mask[rows].nonzero()[:, 1].view(len(rows), count)
            flat = ((rows // n)[:, None] * n + keys).flatten()
            kk = key_blocks.index_select(0, flat).view(len(rows), 1, count * size, d)
            vv = value_blocks.index_select(0, flat).view(len(rows), 1, count * size, d)
            key_valid = valid[keys].flatten(1)
            attn_mask = None if bool(key_valid.all()) else key_valid[:, None, None, :]
            if own is not None:  # rows are (row, head, query block), in that order
                slot = blocks.slot_tokens()
                at = lambda i, size: (i % size)[:, None, None]
                part = own[at(rows // (h * n), own.shape[0]), at(rows // n % h, own.shape[1]),
                           slot[rows % n][:, :, None], slot[keys].flatten(1)[:, None, :]]
                attn_mask = part[:, None] if attn_mask is None else part[:, None] & attn_mask
            out[rows] = F.scaled_dot_product_attention(queries[rows][:, None], kk, vv, attn_mask=attn_mask,
                                                       scale=scale)[:, 0]
    return out.view(b, h, n * size, d)


def flex_available(device: torch.device, pool: tuple[int, int] | None = None) -> tuple[bool, str]:
    """(whether compiled flex_attention can run on ``device`` with blocks of ``pool``, why not)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return False, "triton is not installed"
        if pool is not None and math.prod(pool) % CUDA_FLEX_BLOCK:
            return False, (f"its CUDA kernels need blocks of a multiple of {CUDA_FLEX_BLOCK} tokens, and pool "
                           f"{tuple(pool)} gives {math.prod(pool)} (e.g. pool (8, 16) or (16, 8) gives 128)")
        return True, ""
    if device.type == "cpu":
        return (True, "") if shutil.which("c++") or shutil.which("g++") else (False, "no C++ compiler on the PATH")
    return False, f"flex_attention is not compiled for {device.type} here"


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)  # dynamic shapes fail to build on the CPU (torch 2.13)


@functools.cache
def _warn_flex_limit(limit: int) -> None:
    warnings.warn(f"flex_attention has compiled {limit} shapes in this process (FLEX_SHAPES); new shapes use the "
                  "gather backend instead of running flex uncompiled, which is many times slower", stacklevel=3)


def flex_blocks(q, k, v, mask, blocks: BlockLayout, scale: float, own=None) -> torch.Tensor:
    """Compiled flex_attention over the kept block pairs; the mask_mod acts at block level (the kept
    pair, the key slot not empty), so partial blocks are only those holding empty key slots; with the
    layer's own mask ``own`` it also reads that mask, token by token, in every kept block."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h, n, size = mask.shape[0], mask.shape[1], blocks.blocks, blocks.size
    valid = blocks.valid()
    full_keys = valid.all(-1) & (own is None)
    partial = mask & ~full_keys
    full = mask & full_keys

    def indices(m):
        counts = m.sum(-1, dtype=torch.int32)
        order = m.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return counts, order

    slot_valid, slot = valid.flatten(), blocks.slot_tokens().flatten()

    def mask_mod(bi, hi, q_idx, kv_idx):
        kept = mask[bi % b, hi % h, q_idx // size, kv_idx // size] & slot_valid[kv_idx]
        if own is None:
            return kept
        return kept & own[bi % own.shape[0], hi % own.shape[1], slot[q_idx], slot[kv_idx]]

    kv_num, kv_index = indices(partial)
    full_num, full_index = indices(full)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_index, full_num, full_index, BLOCK_SIZE=size,
                                          mask_mod=mask_mod, seq_lengths=(n * size, n * size))
    try:  # each shape (dtype, batch, heads, tokens) compiles once; past FLEX_SHAPES, the gather, said once
        with torch._dynamo.config.patch(recompile_limit=FLEX_SHAPES, fail_on_recompile_limit_hit=True):
            return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        _warn_flex_limit(FLEX_SHAPES)
        return gather_blocks(q, k, v, mask, blocks, scale, own)


KERNELS = {"dense": dense_blocks, "gather": gather_blocks, "flex": flex_blocks}


def check_backend(backend, name: str = "sparse attention backend") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{name} {backend!r} is not one of {BACKENDS}")


def resolve_backend(backend: str, device, pool: tuple[int, int] | None = None) -> str:
    """The backend a call on ``device`` with blocks of ``pool`` uses: ``backend`` itself, or for "auto"
    flex where it can run, else gather. ValueError for an unknown backend or one that cannot run here."""
    check_backend(backend)
    if backend not in ("auto", "flex"):
        return backend
    device = torch.device(device)
    ok, why = flex_available(device, pool)
    if backend == "auto":
        return "flex" if ok else "gather"
    if not ok:
        raise ValueError(f"sparse attention backend 'flex' is not available on {device}: {why}; "
                         "use 'gather' (no compiler) or 'dense'")
    return backend


def sparse_attention(q, k, v, layout: TokenLayout, source: MaskSource, pool: tuple[int, int], scale: float,
                     backend: str = "auto", own: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention of one call ([B, H, L, D]) with ``source``'s block mask on ``backend``; ``own``:
    the call's boolean attention mask, broadcastable to [B, H, L, L], kept as it is within the kept blocks."""
    return blocked_attention(q, k, v, layout, source, pool, scale, resolve_backend(backend, q.device, pool), own)


def blocked_attention(q, k, v, layout: TokenLayout, source: MaskSource, pool: tuple[int, int], scale: float,
                      kernel: str, own: torch.Tensor | None = None) -> torch.Tensor:
    """``sparse_attention`` on a resolved backend, one of ``KERNELS``."""
    blocks = block_layout(layout, q.shape[-2], pool).on(q.device)
    qs, ks, vs = (to_slots(x, blocks) for x in (q, k, v))
    mask = block_mask(source, qs, ks, blocks, scale)
    if kernel == "flex" and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        kernel = "gather"  # compiled flex_attention on the CPU is inference-only
    if own is not None:
        length = q.shape[-2]
        own = own.expand(*own.shape[:-2], length, length)
    return from_slots(KERNELS[kernel](qs, ks, vs, mask, blocks, scale, own), blocks)


def frame_blocks(grid: tuple[int, ...], pool: tuple[int, int]) -> int:
    """How many blocks of ``pool`` tokens one frame of ``grid`` ((h, w) or (frames, h, w)) holds."""
    h, w = grid[-2:]
    return -(-h // pool[0]) * -(-w // pool[1])


def one_block_a_frame(grid: tuple[int, ...], pool: tuple[int, int]) -> str:
    """What to tell a user whose frames are one block each at ``pool``."""
    h, w = grid[-2:]
    video = len(grid) == 3 and grid[0] > 1
    what = "blocks can only skip whole frames" if video else "it has nothing to skip"
    return (f"a frame of {h} x {w} tokens is one block at pool {tuple(pool)}, so {what}; a smaller pool, e.g. "
            f"({max(1, h // 2)}, {max(1, w // 2)}), makes several blocks a frame")


class DraftAttention:
    """Steer: block-sparse attention on self- or joint-attention ``layers`` with a mask source (the
    draft map by default).

    ``sparsity``: fraction of image block pairs skipped by the draft map; ``pool``: (ph, pw) tokens
    per block in each frame; ``dense_steps``: the first denoising steps of each ``steering`` block run
    dense (a new step is a new timestep at the model call, so CFG's two calls are one step);
    ``backend``: see the module docstring, resolved once per device. Layers that should stay dense are
    simply not given. A layer call's own boolean attention mask is kept, an additive one refused; frames of
    one block each are warned about once per grid."""

    kinds = (SELF, JOINT)

    def __init__(self, layers: Iterable[str], sparsity: float = 0.75, pool: tuple[int, int] = (8, 16),
                 dense_steps: int = 0, backend: str = "auto", source: MaskSource | None = None):
        if len(pool) != 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in pool):
            raise ValueError(f"pool {pool!r} must be two positive integers (token rows, token columns per block)")
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"dense_steps {dense_steps!r} must be a whole number of steps >= 0")
        check_backend(backend)
        self.layers, self.pool, self.dense_steps, self.backend = frozenset(layers), tuple(pool), dense_steps, backend
        self.source = source if source is not None else DraftMask(sparsity)
        self._resolved: dict[torch.device, str] = {}  # the backend per device, resolved on its first call
        self._grids: set[tuple[int, ...]] = set()  # the grids checked for one block a frame
        self.reset()

    def reset(self) -> None:
        """A new generation: the dense warm-up starts again."""
        self.step, self._timestep = -1, _NO_CALL

    def attention(self, call: AttentionCall, q, k, v, mask, next: Next) -> torch.Tensor:
        if call.timestep != self._timestep:
            self.step, self._timestep = self.step + 1, call.timestep
        if self.step < self.dense_steps:
            return next(q, k, v, mask)
        if mask is not None and mask.dtype != torch.bool:
            raise RuntimeError(f"layer {call.name!r} passes its own additive ({mask.dtype}) attention mask, which "
                               "block-sparse attention does not combine with (a boolean one it keeps); leave this layer dense")
        grid = tuple(call.layout.grid or ())
        if grid and grid not in self._grids:
            self._grids.add(grid)
            if frame_blocks(grid, self.pool) == 1:
                warnings.warn(f"block-sparse attention on {call.name!r}: {one_block_a_frame(grid, self.pool)}",
                              stacklevel=2)
        if q.device not in self._resolved:
            self._resolved[q.device] = resolve_backend(self.backend, q.device, self.pool)
        return blocked_attention(q, k, v, call.layout, self.source, self.pool, call.scale(q.shape[-1]),
                                 self._resolved[q.device], mask)

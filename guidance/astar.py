"""A-STAR: attention segregation and retention losses that move the latent (METHODS.md section 2).

Per concept m (a group of text tokens), A^m is its map at the map grid, averaged over the chosen
layers and heads (``AttentionMapCapture``), then normalised (below). Per image:

    L_seg = sum_{m > n} sum_ij min(A^m, A^n)_ij / sum_ij (A^m + A^n)_ij                 (Eq. 2)
    L_ret = sum_m [1 - sum_ij min(A^m, B^m)_ij / sum_ij (A^m + B^m)_ij]                 (Eq. 3)
    z_t' = z_t - alpha_t grad_z (w_seg L_seg + w_ret L_ret),  then z_t' is denoised to z_{t-1}

B^m is the binarised map of the previous guided step (detached), or a user layout mask.

Choices the paper leaves open, with their defaults:
- normalisation "softmax" (Attend-and-Excite's): the maps of the prompt's content tokens (start,
  end and padding tokens left out) x100, softmax over those tokens, a concept's map the sum of its
  tokens'; then Gaussian smoothing (3 x 3, sigma 0.5, reflect padding; A&E's kernel formula has an
  effective sigma of 0.5 sqrt 2) and division by the map's maximum, so that maps lie in [0, 1] as B
  does. "max" skips the softmax.
- binarisation "otsu" (Otsu's threshold per map), or a number tau: B = A >= tau (A's max is 1).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

NORMALIZE = ("softmax", "max")
EPS = 1e-8


def gaussian_smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Each ``[..., h, w]`` map convolved with a normalised size x size Gaussian (reflect padding)."""
    if size <= 1 or sigma <= 0:
        return maps
    x = torch.arange(size, dtype=maps.dtype, device=maps.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = torch.outer(g, g) / g.sum() ** 2
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    flat = F.pad(flat, [size // 2] * 4, mode="reflect")
    return F.conv2d(flat, kernel[None, None]).reshape(maps.shape)


def concept_maps(token_maps: torch.Tensor, membership: torch.Tensor, token_valid: torch.Tensor | None = None,
                 normalize: str = "softmax", temperature: float = 100.0, smoothing: tuple[int, float] = (3, 0.5)) -> torch.Tensor:
    """``[rows, concepts, h, w]`` in [0, 1] from the maps of each row's tokens ``[rows, tokens, h, w]``.

    membership: ``[rows, concepts, tokens]``, 1 where a token belongs to a concept (all-zero rows are
    padding concepts); token_valid: ``[rows, tokens]``, False for padding tokens, which the softmax
    leaves out.
    """
    if normalize == "softmax":
        logits = token_maps * temperature
        if token_valid is not None:
            logits = logits.masked_fill(~token_valid[:, :, None, None], float("-inf"))
        token_maps = torch.softmax(logits, dim=1)
    maps = torch.einsum("rkc,rchw->rkhw", membership.to(token_maps.dtype), token_maps)
    maps = gaussian_smooth(maps, *smoothing)
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(EPS)


def otsu_threshold(values: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of each row of ``values`` ``[N, P]``: the split maximising between-class variance."""
    v, _ = values.sort(dim=-1)
    n = v.shape[-1]
    count = torch.arange(1, n, device=v.device, dtype=v.dtype)
    below = v.cumsum(-1)[..., :-1]
    mean_below, mean_above = below / count, (v.sum(-1, keepdim=True) - below) / (n - count)
    between = count * (n - count) * (mean_below - mean_above) ** 2
    return v.gather(-1, between.argmax(-1, keepdim=True)).squeeze(-1)


def binarize(maps: torch.Tensor, rule: str | float = "otsu") -> torch.Tensor:
    """0/1 masks of the high-activation regions of ``[..., h, w]`` maps in [0, 1]: above Otsu's
    threshold (``"otsu"``) or at least ``rule`` (a number in (0, 1])."""
    flat = maps.detach().flatten(-2)
    if rule == "otsu":
        mask = flat > otsu_threshold(flat.reshape(-1, flat.shape[-1])).reshape(*flat.shape[:-1], 1)
    else:
        mask = flat >= rule
    return mask.to(maps.dtype).reshape(maps.shape)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum min(a, b) / sum (a + b) over the last two dimensions."""
    return torch.minimum(a, b).sum((-2, -1)) / (a + b).sum((-2, -1)).clamp_min(EPS)


def segregation_loss(maps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[rows]``: Eq. 2 over the pairs of valid concepts of each row; maps ``[rows, K, h, w]``, valid ``[rows, K]``."""
    pairs = _overlap(maps[:, :, None], maps[:, None, :])
    k = maps.shape[1]
    lower = torch.ones(k, k, dtype=torch.bool, device=maps.device).tril(-1)
    keep = lower & valid[:, :, None] & valid[:, None, :]
    return (pairs * keep).sum((1, 2))


def retention_loss(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[rows]``: Eq. 3, each valid concept's map against its mask ``[rows, K, h, w]``."""
    return ((1 - _overlap(maps, masks)) * valid).sum(1)

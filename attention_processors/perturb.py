"""Head-level perturbed attention: PAG identity and SoftPAG on chosen (sample, head) pairs.

SoftPAG interpolates a head's attention map toward identity, A' = (1 - u) A + u I. Since the
output is A' V, this is (1 - u) SDPA(Q, K, V) + u (I V): no L x L map is ever built.

"Identity" has two meanings on joint (text + image) attention, both supported:
- ``"joint"``: identity over the whole joint map (HeadHunter's definition); I V = V.
- ``"image"``: identity on the image-image block only (diffusers' classic PAG): image queries keep
  their text keys but see only themselves among image keys; text queries are unchanged. Computed
  as a softmax over [text keys, own key], O(L_image * L_text), again with no L x L map.
On self-attention (no text tokens) both equal V.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .architectures import TokenLayout
from .core import AttentionCall, Next

MODES = ("joint", "image")


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def image_identity(q, k, v, out, layout: TokenLayout, scale: float, mask=None) -> torch.Tensor:
    """Attention output when each image query sees the text keys and only its own image key.

    ``out`` is the unperturbed output; its text-query rows are returned unchanged.
    """
    img, txt = layout.image, layout.text
    q_img, k_img, v_img = q[..., img, :], k[..., img, :], v[..., img, :]
    text_scores = (q_img @ k[..., txt, :].transpose(-1, -2)) * scale
    self_scores = (q_img * k_img).sum(-1, keepdim=True) * scale
    if mask is not None:
        full = _additive(mask, q.dtype).expand(*mask.shape[:-2], q.shape[-2], k.shape[-2])
        text_scores = text_scores + full[..., img, txt]
        self_scores = self_scores + torch.diagonal(full[..., img, img], dim1=-2, dim2=-1).unsqueeze(-1)
    probs = torch.softmax(torch.cat([text_scores, self_scores], dim=-1), dim=-1)
    n_text = text_scores.shape[-1]
    image_out = probs[..., :n_text] @ v[..., txt, :] + probs[..., n_text:] * v_img
    result = out.clone()
    result[..., img, :] = image_out
    return result


def identity_output(q, k, v, out, layout: TokenLayout, mode: str, scale: float, mask=None, rows=None) -> torch.Tensor:
    """I V for the identity of ``mode`` (see module docstring), for batch ``rows`` (all when None)."""
    take = (lambda t: t) if rows is None else (lambda t: t[rows])
    if mode == "joint" or layout.text is None:
        return take(v)
    if mask is not None and rows is not None and mask.dim() == 4 and mask.shape[0] == q.shape[0] > 1:
        mask = mask[rows]
    return image_identity(take(q), take(k), take(v), take(out), layout, scale, mask)


def head_weights(heads: dict[str, tuple[int, ...]], layers, u: float) -> dict[str, torch.Tensor]:
    """Per layer, a [heads] vector with u on the chosen heads and 0 elsewhere."""
    weights = {}
    for layer, chosen in heads.items():
        weights[layer] = torch.zeros(layers[layer].heads)
        weights[layer][list(chosen)] = u
    return weights


class HeadPerturbation:
    """Steer that applies SoftPAG with a weight u per (sample, head) on its layers.

    ``set_weights({layer: w})`` before a forward chooses what that forward perturbs: w is a
    [heads] vector for every sample alike, or a [batch, heads] tensor per sample (u; 0 leaves a
    head untouched, 1 is PAG identity). ``set_weights(None)`` turns it off. Samples with all-zero
    weights cost nothing extra.
    """

    def __init__(self, layers: Iterable[str], mode: str = "joint"):
        if mode not in MODES:
            raise ValueError(f"perturbation mode {mode!r} is not one of {MODES}")
        self.layers, self.mode = frozenset(layers), mode
        self._weights: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def set_weights(self, weights: dict[str, torch.Tensor] | None) -> None:
        self._weights = {}
        for layer, w in (weights or {}).items():
            if w.dim() == 1:
                self._weights[layer] = (None, w)
                continue
            rows = w.any(dim=1).nonzero().flatten()
            if len(rows):
                self._weights[layer] = (rows, w[rows])

    def attention(self, call: AttentionCall, q, k, v, mask, next: Next) -> torch.Tensor:
        out = next(q, k, v, mask)
        entry = self._weights.get(call.name)
        if entry is None:
            return out
        rows, u = entry
        u = u.to(out.device, out.dtype)[..., None, None]
        rows = None if rows is None else rows.to(out.device)
        target = identity_output(q, k, v, out, call.layout, self.mode, call.scale(q.shape[-1]), mask, rows).to(out.dtype)
        if rows is None:
            return torch.lerp(out, target, u)
        out = out.clone()
        out[rows] = torch.lerp(out[rows], target, u)
        return out

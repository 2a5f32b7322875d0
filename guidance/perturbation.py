"""Perturbed-attention guidance on chosen heads (HeadHunter / SoftPAG, docs/methods.md, section 1).

    eps = eps_u + g (eps_c - eps_u) + w (eps_c - eps_p)        (CFG on)
    eps = eps_c + w (eps_c - eps_p)                            (CFG off)

eps_p is the prediction of the conditional input with the chosen heads perturbed. The guidance
wraps a denoiser's forward for the duration of a pipeline call: on each conditional call it also
computes eps_p, either in the same forward (the conditional rows appended to the batch, with a
perturbation per sample) or in a second forward (less memory), and returns for the conditional rows

    eps_c' = eps_c + (w / g) (eps_c - eps_p)

so that the pipeline's own CFG step, left as it is, yields the formula above. Two cases need more:

- SD3's skip-layer guidance adds s (eps_c' - eps_skip), computed from the conditional prediction it
  received; the skip-layer call's output gets the same shift as eps_c, so the term stays s (eps_c - eps_skip).
- a CFG scale g = 0 (Wan 2.2's ``guidance_scale_2``) drops eps_c, so w (eps_c - eps_p) is added to the
  unconditional prediction instead: eps_u' + 0 (eps_c - eps_u') = eps_u + w (eps_c - eps_p).
"""

from __future__ import annotations

import inspect
import math
import numbers
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from attnsteer.attention_processors import (MODES, HeadPerturbation, HeadSet, SharedPrefix, head_weights, map_rows,
                                            steering, wrapped)

from .auxiliary import in_auxiliary_call

BATCHING = ("batched", "sequential")
# the names pipelines give their conditional and unconditional denoiser calls (``cache_context``): CogVideoX's and
# LTX's batched CFG call is "cond_uncond", diffusers' guiders name theirs "pred_cond" and "pred_uncond"
COND_CALLS, UNCOND_CALLS = ("cond", "cond_uncond", "pred_cond"), ("uncond", "pred_uncond")
UNBATCHED_ARGUMENTS = frozenset({"txt_ids", "img_ids", "control_hidden_states_scale"})  # per call, not per row


@dataclass(frozen=True)
class BranchInfo:
    """What the pipeline does with one denoiser call's prediction.

    cfg_in_batch: the input holds [uncond, cond] halves (one batched CFG call), or [cond, uncond] with
    ``cond_first`` (Z-Image); otherwise the whole batch is conditional and an unconditional call, if any,
    comes separately.
    cfg_scale: the CFG scale g the pipeline applies to it; 1 when CFG is off; with 0 the perturbation
    term goes to the unconditional prediction (the uncond rows, or the next "uncond" call).
    unnamed_calls: what a step's calls are, in order, where the pipeline does not name them with the
    denoiser's ``cache_context`` (Chroma's separate calls: ("cond", "uncond")).
    """

    cfg_in_batch: bool
    cfg_scale: float
    num_steps: int
    unnamed_calls: tuple[str, ...] = ("cond",)
    cond_first: bool = False

    def cond_rows(self, n: int) -> torch.Tensor:
        """The conditional rows of a call on ``n`` rows."""
        if not self.cfg_in_batch:
            return torch.arange(n)
        return torch.arange(n // 2) if self.cond_first else torch.arange(n // 2, n)


def combine(cond: torch.Tensor, perturbed: torch.Tensor, scale: float, cfg_scale: float = 1.0) -> torch.Tensor:
    """eps_c' = eps_c + (w / g)(eps_c - eps_p): after CFG with scale g, adds w (eps_c - eps_p)."""
    return cond + (scale / cfg_scale) * (cond - perturbed)


def _take_rows(obj, rows: torch.Tensor, n: int, lists: tuple[str, ...] = ()):
    """``obj`` with batch rows ``rows`` taken from every tensor whose first dimension is the batch, and from the
    per-row lists of a dict's entries named in ``lists``."""
    taken = map_rows(obj, n, lambda t: t[rows.to(t.device)], UNBATCHED_ARGUMENTS | set(lists))
    if isinstance(obj, dict):
        taken.update({k: [obj[k][i] for i in rows.tolist()] for k in lists if obj.get(k) is not None})
    return taken


def _named(forward, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name: how a model that takes per-row lists (Z-Image) has its rows found."""
    return dict(inspect.signature(forward).bind(*args, **kwargs).arguments)


def _raw_prediction(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _prediction(out) -> torch.Tensor:
    """A call's prediction, its rows stacked where the model returns one tensor per row (Z-Image)."""
    pred = _raw_prediction(out)
    return torch.stack(pred) if isinstance(pred, list) else pred


def _with_prediction(out, pred):
    if isinstance(_raw_prediction(out), list):
        pred = list(pred.unbind(0))
    if isinstance(out, tuple):
        return (pred, *out[1:])
    out.sample = pred
    return out


def _shifted(out, shift: torch.Tensor | None):
    return out if shift is None else _with_prediction(out, _prediction(out) + shift)


class HeadPerturbationGuidance:
    """Head-level perturbed-attention guidance with SoftPAG weight u.

    heads: ``{layer: heads}`` as resolved by ``resolve_heads``, or a list of them, one per prompt (each
    prompt's conditional rows get their own head set: how the head search scores several candidates
    in one forward); scale: w; u: SoftPAG weight in [0, 1];
    mode: "joint" or "image"; window: (start, stop) fractions of the denoising steps where the
    guidance acts (default every step); batching: "batched" (one forward, more memory) or
    "sequential" (a second forward); prefix_reuse: compute the model up to the first perturbed layer
    once for the conditional rows and their perturbed copies (``SharedPrefix``; the same result).
    """

    def __init__(self, heads: HeadSet | list[HeadSet], scale: float, u: float, mode: str = "joint",
                 window: tuple[float, float] = (0.0, 1.0), batching: str = "batched", prefix_reuse: bool = True):
        self.scale, self.u, self.window = check_options(scale, u, mode, window, batching)
        if not isinstance(prefix_reuse, bool):
            raise ValueError(f"perturbation_prefix_reuse {prefix_reuse!r} must be True or False")
        self.prefix_reuse = prefix_reuse
        self.per_prompt = isinstance(heads, list)
        self.heads = [dict(h) for h in heads] if self.per_prompt else dict(heads)
        self.mode, self.batching = mode, batching
        self.step = 0

    @property
    def enabled(self) -> bool:
        used = any(self.heads) if self.per_prompt else bool(self.heads)
        return used and self.u > 0 and self.scale != 0

    def row_weights(self, layers, rows: int) -> dict[str, torch.Tensor]:
        """Per layer, the [rows, heads] SoftPAG weights of the conditional rows."""
        if not self.per_prompt:
            return {layer: w.expand(rows, -1) for layer, w in head_weights(self.heads, layers, self.u).items()}
        if rows % len(self.heads):
            raise ValueError(f"{len(self.heads)} per-prompt head sets do not divide the {rows} conditional rows")
        names = [name for name in layers if any(name in h for h in self.heads)]
        zero = {name: torch.zeros(layers[name].heads) for name in names}
        per_set = [{**zero, **head_weights(h, layers, self.u)} for h in self.heads]
        return {name: torch.stack([w[name] for w in per_set]).repeat_interleave(rows // len(self.heads), 0)
                for name in names}

    def in_window(self, step: int, num_steps: int) -> bool:
        start, stop = self.window
        return start <= step / max(num_steps, 1) < stop

    @contextmanager
    def attached(self, model: torch.nn.Module, branch_info: Callable[[torch.nn.Module], BranchInfo]):
        """Guide ``model`` (a pipeline's denoiser) for a ``with`` block; ``branch_info`` tells how the
        pipeline uses each call's prediction. Several models may share this guidance's step count."""
        layers = set().union(*self.heads) if self.per_prompt else self.heads
        steer = HeadPerturbation(layers, self.mode)
        context = {"name": None}

        def cache_context(original):
            @contextmanager
            def named(name, *args, **kwargs):
                previous, context["name"] = context["name"], name
                try:
                    with original(name, *args, **kwargs):
                        yield
                finally:
                    context["name"] = previous

            return named

        carried = {}  # shifts the step's conditional call leaves for its skip-layer and "uncond" calls
        unnamed = [0]  # calls made outside any cache_context so far

        def guided(forward):
            def run(*args, **kwargs):
                if in_auxiliary_call():
                    return forward(*args, **kwargs)
                if kwargs.get("skip_layers") is not None:
                    return _shifted(forward(*args, **kwargs), carried.pop("skip", None))
                info = branch_info(model)
                name = context["name"]
                if name is None:
                    name = info.unnamed_calls[unnamed[0] % len(info.unnamed_calls)]
                    unnamed[0] += 1
                if name in UNCOND_CALLS:
                    return _shifted(forward(*args, **kwargs), carried.pop("uncond", None))
                if name not in COND_CALLS:
                    return forward(*args, **kwargs)
                carried.clear()
                step, self.step = self.step, self.step + 1
                if not self.in_window(step, info.num_steps):
                    return forward(*args, **kwargs)
                lists = session.architecture.row_lists
                if lists:
                    args, kwargs = (), _named(forward, args, kwargs)
                    n = len(kwargs[lists[0]])
                else:
                    n = (args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))).shape[0]
                cond = info.cond_rows(n)
                try:
                    out, perturbed = self._branches(forward, steer, session.layers, prefix, args, kwargs, n, cond, lists)
                finally:
                    steer.set_weights(None)
                pred = _prediction(out).clone()
                if info.cfg_scale == 0:
                    term = self.scale * (pred[cond] - perturbed)
                    if info.cfg_in_batch:
                        pred[slice(n // 2, n) if info.cond_first else slice(0, n // 2)] += term
                    else:
                        carried["uncond"] = term
                else:
                    guided_cond = combine(pred[cond], perturbed, self.scale, info.cfg_scale)
                    carried["skip"] = guided_cond - pred[cond]
                    pred[cond] = guided_cond
                return _with_prediction(out, pred)

            return run

        with ExitStack() as stack:
            session = stack.enter_context(steering(model, [steer]))
            prefix = None
            if self.prefix_reuse:
                perturbed = {name: session.layers[name].module for name in layers}
                attention = {name: info.module for name, info in session.layers.items()}
                prefix = stack.enter_context(SharedPrefix(model, perturbed, attention).installed())
            if hasattr(model, "cache_context"):
                stack.enter_context(wrapped(model, "cache_context", cache_context))
            stack.enter_context(wrapped(model, "forward", guided))
            yield self

    def _branches(self, forward, steer, layers, prefix, args, kwargs, n, cond, lists=()):
        """(output of the unperturbed call, perturbed prediction of the ``cond`` rows); ``lists``: the call's
        per-row list arguments."""
        per_row = self.row_weights(layers, len(cond))

        def reuse(mode, *arguments):
            return nullcontext() if prefix is None else getattr(prefix, mode)(*arguments)

        if self.batching == "batched":
            rows = torch.cat([torch.arange(n), cond])
            steer.set_weights({layer: torch.cat([torch.zeros(n, w.shape[1]), w]) for layer, w in per_row.items()})
            with reuse("forked", n, cond):
                out = forward(*_take_rows(args, rows, n), **_take_rows(kwargs, rows, n, lists))
            pred = _prediction(out)
            return _with_prediction(out, pred[:n]), pred[n:]
        with reuse("recording", n):
            out = forward(*args, **kwargs)
        steer.set_weights(per_row)
        with reuse("replaying", cond):
            perturbed = _prediction(forward(*_take_rows(args, cond, n), **_take_rows(kwargs, cond, n, lists)))
        return out, perturbed


NUMBERS = "int, float, numpy scalar or 0-d tensor"


def as_number(value) -> float | None:
    """``value`` as a float if it is a real number (Python, numpy or a 0-d tensor), else None. A bool
    is not taken for a number: ``perturbation_scale=True`` is more likely a slip than w = 1."""
    if isinstance(value, torch.Tensor):
        real = value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
        return float(value) if real else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_options(scale, u, mode, window, batching,
                  window_name: str = "perturbation_window") -> tuple[float, float, tuple[float, float]]:
    """(scale, u, window) as floats; ValueError naming a bad option and what is allowed."""
    w, soft = as_number(scale), as_number(u)
    if w is None:
        raise ValueError(f"perturbation_scale {scale!r} must be a number ({NUMBERS}), not {type(scale).__name__}")
    if not math.isfinite(w):
        raise ValueError(f"perturbation_scale {scale!r} must be a finite number")
    if soft is None:
        raise ValueError(f"softpag_u {u!r} must be a number ({NUMBERS}), not {type(u).__name__}")
    if not 0.0 <= soft <= 1.0:
        raise ValueError(f"softpag_u {u!r} must be in [0, 1] (0: no perturbation, 1: PAG identity)")
    if mode not in MODES:
        raise ValueError(f"perturbation_mode {mode!r} is not one of {MODES}")
    bounds = tuple(map(as_number, window)) if isinstance(window, (tuple, list)) else ()
    if len(bounds) != 2 or None in bounds or not 0.0 <= bounds[0] < bounds[1] <= 1.0:
        raise ValueError(f"{window_name} {window!r} must be (start, stop) fractions of the steps, 0 <= start < stop <= 1")
    if batching not in BATCHING:
        raise ValueError(f"perturbation_batching {batching!r} is not one of {BATCHING}")
    return w, soft, bounds

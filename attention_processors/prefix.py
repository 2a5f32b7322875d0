"""Compute once what a batch's rows and their perturbed copies share: the model up to the first perturbed layer.

A perturbed branch is the conditional input run again with some layers changed, so until the first changed
layer it equals the conditional branch. ``SharedPrefix(model, layers)`` wraps the largest submodules that hold
none of ``layers`` (on the paths from the model to them; module lists are looked into) and marks when a call
reaches one of ``layers``. Before that mark, inside

- ``forked(n, rows)``: the model runs on n + len(rows) rows whose last ones copy ``rows``; a wrapped module
  computes the first n rows only and appends copies of its output's ``rows``;
- ``recording()``, then ``replaying(rows)``: the first call (n rows) keeps each wrapped module's output, and
  the second call (the ``rows`` alone) takes their ``rows`` instead of computing.

The model's own code between modules runs on all rows, so skip connections and every per-row input stay
consistent. Rows are told by size: a tensor whose first dimension is the call's row count is per row. A module
holding a layer that another steering session steers is left to compute, so its steers see every row.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from .core import SteeredProcessor, wrapped

CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def map_rows(obj, n: int, fn, skip: frozenset = frozenset()):
    """``obj`` with ``fn`` applied to each tensor whose first dimension is ``n`` (a call's rows), in tuples,
    lists and dicts; dict entries named in ``skip`` are left as they are (per-call, not per-row, inputs)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: v if k in skip else map_rows(v, n, fn, skip) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(map_rows(v, n, fn, skip) for v in obj)
    return obj


def _has_rows(obj, n: int) -> bool:
    found = []
    map_rows(obj, n, found.append)
    return bool(found)


def prefix_modules(model: torch.nn.Module, layers) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the largest submodules of ``model`` that hold none of ``layers``, on the paths to them."""
    holders = {".".join(name.split(".")[:i]) for name in layers for i in range(name.count(".") + 1)}
    found = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for child, sub in module.named_children():
            name = f"{prefix}.{child}" if prefix else child
            if name in layers:
                continue
            if name in holders or isinstance(sub, CONTAINERS):
                visit(name, sub)
            else:
                found.append((name, sub))

    visit("", model)
    return found


class SharedPrefix:
    """The shared-prefix state of one model and its perturbed ``layers`` (``{name: attention module}``);
    ``installed()`` wraps the modules for a ``with`` block, the model restored on exit."""

    def __init__(self, model: torch.nn.Module, layers: dict[str, torch.nn.Module], attention: dict[str, torch.nn.Module]):
        self.layers = layers
        self.units = prefix_modules(model, layers)
        # the attention modules inside each unit: a unit another session steers computes as it is
        self.inner = {name: [m for a, m in attention.items() if a.startswith(name + ".")] for name, _ in self.units}
        self.mode = None  # "forked", "recording", "replaying" or None (pass through)
        self.reached = False
        self.n, self.rows, self.kept, self.at = 0, None, [], 0

    @contextmanager
    def _active(self, mode: str, n: int = 0, rows: torch.Tensor | None = None):
        self.mode, self.n, self.rows, self.reached = mode, n, rows, False
        try:
            yield
        finally:
            if mode == "replaying":
                self.kept = []
            self.mode, self.rows = None, None

    def forked(self, n: int, rows: torch.Tensor):
        """For one call on n + len(rows) rows, the last ones copies of ``rows`` until the first perturbed layer."""
        return self._active("forked", n, rows)

    def recording(self, n: int):
        """For the unperturbed call on n rows whose prefix ``replaying`` reuses."""
        self.kept = []
        return self._active("recording", n)

    def replaying(self, rows: torch.Tensor):
        """For the call on ``rows`` of the recorded call alone: the recorded prefix outputs stand in."""
        self.at = 0
        return self._active("replaying", self.n, rows)

    def _shared(self, name: str) -> bool:
        return not self.reached and not any(isinstance(m.processor, SteeredProcessor) for m in self.inner[name])

    def _unit(self, name: str, module: torch.nn.Module):
        def wrapper(forward):
            def run(*args, **kwargs):
                if self.mode is None or not self._shared(name):
                    return forward(*args, **kwargs)
                if self.mode == "recording":
                    out = forward(*args, **kwargs)
                    self.kept.append((module, out))
                    return out
                if self.mode == "replaying":
                    kept_module, out = self.kept[self.at] if self.at < len(self.kept) else (None, None)
                    if kept_module is not module:
                        raise RuntimeError(f"module {name!r} was not called where the recorded call called it; "
                                           "call with perturbation_prefix_reuse=False for this model")
                    self.at += 1
                    if not _has_rows(out, self.n):  # not per row (Z-Image embeds its rows' tokens concatenated)
                        return forward(*args, **kwargs)
                    return map_rows(out, self.n, lambda t: t[self.rows.to(t.device)])
                n, rows = self.n, self.rows
                total = n + len(rows)
                if not _has_rows((args, kwargs), total):
                    return forward(*args, **kwargs)
                out = forward(*map_rows(args, total, lambda t: t[:n]), **map_rows(kwargs, total, lambda t: t[:n]))
                return map_rows(out, n, lambda t: torch.cat([t, t[rows.to(t.device)]]))

            return run

        return wrapper

    def _layer(self, forward):
        def run(*args, **kwargs):
            self.reached = True
            return forward(*args, **kwargs)

        return run

    @contextmanager
    def installed(self):
        with ExitStack() as stack:
            for name, module in self.units:
                stack.enter_context(wrapped(module, "forward", self._unit(name, module)))
            for module in self.layers.values():
                stack.enter_context(wrapped(module, "forward", self._layer))
            yield self

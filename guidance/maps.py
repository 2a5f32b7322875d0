"""Record the attention maps of chosen tokens over a pipeline call (for inspection and rendering).

The first denoiser call of each recorded step (the conditional one) arms an ``AttentionMapCapture``
on its conditional rows, without gradients; the maps are averaged over the recorded steps and the
layers. Auxiliary calls (A-STAR's gradient passes) are not recorded.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch

from attnsteer.attention_processors import AttentionMapCapture, steering, wrapped

from .astar import _sample
from .auxiliary import in_auxiliary_call
from .perturbation import BranchInfo


def conditional_maps(capture: AttentionMapCapture, layers: list[str], groups: list, info: BranchInfo,
                     forward: Callable, args: tuple, kwargs: dict) -> tuple[object, torch.Tensor]:
    """One denoiser call ``forward(*args, **kwargs)`` with ``capture`` armed on its conditional rows (as
    ``info`` tells them), each prompt's token ``groups`` repeated over its rows. Returns the
    call's output and the maps averaged over ``layers``, ``[conditional rows, groups, h, w]``."""
    n = _sample(args, kwargs).shape[0]
    cond = info.cond_rows(n)
    if len(cond) % len(groups):
        raise RuntimeError(f"{len(groups)} prompts' token groups for {len(cond)} conditional rows: not a multiple")
    repeat = len(cond) // len(groups)
    capture.arm([row for row in groups for _ in range(repeat)], rows=cond)
    try:
        out = forward(*args, **kwargs)
    finally:
        capture.disarm()
    return out, torch.stack([capture.maps[name].float() for name in layers]).mean(0)


class MapRecorder:
    """Mean maps ``[rows, groups, h, w]`` of token groups (per prompt: lists of text-key indices) on
    ``layers`` (all at ``grid``) over the steps in ``window`` ((start, stop) fractions); read ``maps``
    after the call (None if no step was in the window)."""

    def __init__(self, groups: list[list[list[int]]], layers: list[str], grid: tuple[int, ...],
                 window: tuple[float, float] = (0.0, 1.0)):
        self.groups, self.layers, self.grid, self.window = groups, list(layers), tuple(grid), tuple(window)
        self.total, self.steps, self.step = None, [], 0

    @property
    def maps(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / len(self.steps)

    def in_window(self, step: int, num_steps: int) -> bool:
        start, stop = self.window
        return start <= step / max(num_steps, 1) < stop

    @contextmanager
    def attached(self, model: torch.nn.Module, scheduler, branch_info: Callable[[torch.nn.Module], BranchInfo]):
        """Record on ``model`` for a ``with`` block; ``scheduler.step`` marks the end of each step."""
        capture = AttentionMapCapture(self.layers)
        self.total, self.steps, self.step = None, [], 0
        seen = {"step": None}

        def recorded(forward):
            def run(*args, **kwargs):
                info = branch_info(model)
                if in_auxiliary_call() or seen["step"] == self.step or not self.in_window(self.step, info.num_steps):
                    return forward(*args, **kwargs)
                seen["step"] = self.step
                out, mean = conditional_maps(capture, self.layers, self.groups, info, forward, args, kwargs)
                self.total = mean if self.total is None else self.total + mean
                self.steps.append(self.step)
                return out

            return run

        def stepped(original):
            def step(*args, **kwargs):
                self.step += 1
                return original(*args, **kwargs)

            return step

        with ExitStack() as stack:
            stack.enter_context(steering(model, [capture]))
            stack.enter_context(wrapped(model, "forward", recorded))
            stack.enter_context(wrapped(scheduler, "step", stepped))
            yield self

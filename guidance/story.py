"""IR-Diffusion (arXiv 2411.19261) on one pipeline call whose batch is [references..., targets...].

Each reference row draws one subject alone; each target row draws a scene holding every subject.
Per step, on ``SubjectAttention`` (floor 1):
- isolation on every self-attention layer given: a target's subjects do not attend to each other;
- reposition on the reading layers (the decoder by default): a target's subject i also reads
  reference i's subject-i features, moved onto where subject i sits in the target;
- mutual cross-attention on the cross-attention layers given: a target's subject i also attends to
  reference i's prompt, mixed in with weight ``mutual`` (the authors' 0.9).

Subject masks come from the user (per row, fixed) or from the subjects' cross-attention maps: the
first denoiser call of each step records, on the conditional rows, the head-mean map of each
subject's tokens (``AttentionMapCapture``, no gradients), normalised to a maximum of 1 and
binarised by Otsu's threshold; those masks act from the next step on (step 0 runs without IR).
Mask dropout (ConsiStory's, 0.5, as the authors run it): at each attention grid a target's reading
queries are dropped per token with probability ``dropout`` (``Subjects.dropout``), drawn from a
generator seeded by ``seed``, the step and the grid, so that a target does not copy a reference's
whole layout and the same seed gives the same output; the boxes and the isolation keep the whole masks.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch

from attnsteer.attention_processors import AttentionMapCapture, steering, wrapped
from attnsteer.attention_processors.subjects import SubjectAttention, Subjects

from .astar import binarize
from .auxiliary import in_auxiliary_call
from .maps import conditional_maps
from .perturbation import BranchInfo


class SubjectConsistency:
    """IR-Diffusion on one call (see the module docstring).

    groups: per batch row, per subject, the text-key indices of the subject's words in that row's
    prompt ([] where the row does not hold the subject); sources: per row, per subject, the row it
    reads the subject from (-1: none); isolate / read: layer names; map_layers: the
    cross-attention layers the masks come from (all at one grid); masks: None, or per row a [S, H, W]
    tensor of fixed masks (any resolution) replacing the maps; dropout: mask dropout of the reading
    queries; seed: of the dropout; binarization: "otsu" or a threshold in (0, 1]; isolation,
    reposition: the two mechanisms; mutual_layers: cross-attention layer names; mutual: the mutual
    cross-attention lambda (``Subjects``).
    """

    def __init__(self, groups: list[list[list[int]]], sources: list[list[int]], isolate, read, map_layers,
                 masks: torch.Tensor | None = None, dropout: float = 0.5, seed: int = 0,
                 binarization: str | float = "otsu", isolation: bool = True, reposition: bool = True,
                 mutual_layers=(), mutual: float = 0.9):
        self.groups, self.sources = groups, torch.tensor(sources, dtype=torch.long)
        self.present = torch.tensor([[bool(g) for g in row] for row in groups])  # [rows, S]: the row holds the subject
        self.steer = SubjectAttention(isolate, read, mutual_layers)
        self.map_layers = list(map_layers)
        self.dropout, self.seed, self.binarization = float(dropout), int(seed), binarization
        self.fix_masks(masks)
        self.isolation, self.reposition, self.mutual = isolation, reposition, float(mutual)
        self.step, self.masks = 0, None

    def fix_masks(self, masks: torch.Tensor | None) -> None:
        """Use ``masks`` [rows, S, H, W] (any resolution) instead of the maps, emptied where a row lacks the subject."""
        self.fixed = None if masks is None else masks.bool() & self.present[:, :, None, None]

    def subject_masks(self, maps: torch.Tensor) -> torch.Tensor:
        """[rows, S, h, w] bool from captured maps [rows, S, h, w]: normalised, binarised, absent subjects empty."""
        maps = maps.float()
        maps = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
        return binarize(maps, self.binarization).bool() & self.present.to(maps.device)[:, :, None, None]

    def _set_subjects(self) -> None:
        masks = self.fixed if self.fixed is not None else self.masks
        seed = (self.seed * 100003 + self.step) % 2 ** 63  # a new dropout draw each step
        self.steer.subjects = None if masks is None else Subjects(masks.bool(), self.sources, self.isolation,
                                                                  self.reposition, self.dropout, seed, self.mutual)

    @contextmanager
    def attached(self, model: torch.nn.Module, scheduler, branch_info: Callable[[torch.nn.Module], BranchInfo]):
        """IR on ``model`` for a ``with`` block; ``scheduler.step`` ends each step."""
        capture = AttentionMapCapture(self.map_layers) if self.fixed is None else None
        self.step, self.masks = 0, None
        seen = {"step": None}
        self._set_subjects()

        def forward_of(forward):
            def run(*args, **kwargs):
                if capture is None or in_auxiliary_call() or seen["step"] == self.step:
                    return forward(*args, **kwargs)
                seen["step"] = self.step
                out, maps = conditional_maps(capture, self.map_layers, self.groups, branch_info(model),
                                             forward, args, kwargs)
                if maps.shape[0] != len(self.groups):
                    raise RuntimeError(f"IR-Diffusion: {len(self.groups)} rows of subjects for a conditional batch of {maps.shape[0]}")
                self.masks = self.subject_masks(maps)
                return out

            return run

        def stepped(original):
            def step(*args, **kwargs):
                self.step += 1
                self._set_subjects()
                return original(*args, **kwargs)

            return step

        steers = ([capture] if capture is not None else []) + [self.steer]  # the capture sees the whole batch
        try:
            with ExitStack() as stack:
                stack.enter_context(steering(model, steers))
                stack.enter_context(wrapped(model, "forward", forward_of))
                stack.enter_context(wrapped(scheduler, "step", stepped))
                yield self
        finally:
            self.steer.subjects = None

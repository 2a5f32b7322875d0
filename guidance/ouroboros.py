"""Ouroboros-Diffusion's subject parts (arXiv 2501.09019) on a FIFO queue of a Wan model.

Subject masks: each window's conditional call records the head-mean cross-attention maps of each
subject's tokens (``AttentionMapCapture``); per frame, divided by their maximum and binarised (Otsu),
they become the masks of the window's slots, and move along the queue with their frames. A window
uses the masks its slots got in the step before, so the first step runs without the subject parts.

- Subject-aware cross-frame attention (``cross_frame``). Wan's self-attention already spans every
  frame of a window; what a window lacks is the frames of the other windows. So the head window
  (the first of each step, at the queue's start: its cleanest frames, after lookahead's context
  slots, which it reads but does not denoise) stores, on the memory layers, the keys and
  values of its subject tokens (``FrameMemory``), and every later window of the step reads them as
  extra keys and values, each CFG branch its own. The keys keep the rotary positions of their frames
  in the head window: a later window sees them as frames at the same places of its own window.
- Self-recurrent guidance (``guidance`` > 0). A bank, per memory layer and subject, of the mean
  value vector over the subject's tokens in the head window, averaged over the steps with
  ``momentum``. Values, not keys: Wan rotates positions into its keys, so a mean of keys over
  positions mixes their rotations. In every later window the loss is the mean over layers and
  present subjects of 1 - cos(the window's subject mean value, the bank's), summed over the rows;
  its gradient g with respect to the window's latent enters the velocity, per row, as
  v + guidance * rms(v) / rms(g) * g: the Euler step (sigma falling) then moves the latent down the
  loss by ``guidance`` times the velocity's own size.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch

from attnsteer.attention_processors import AttentionMapCapture, steering
from attnsteer.attention_processors.memory import FrameMemory

from .astar import binarize, frozen_parameters

Predict = Callable[[torch.Tensor], torch.Tensor]


def subject_masks(maps: torch.Tensor, rule: str | float = "otsu") -> torch.Tensor:
    """[rows, S, F, h, w] bool from maps of the same shape: each frame's map divided by its maximum,
    then binarised."""
    maps = maps.float()
    return binarize(maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8), rule).bool()


def bank_loss(pooled: dict[str, torch.Tensor], bank: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the mean over layers and present subjects of 1 - cos(pooled, bank); pooled and
    bank [rows, S, H, D] per layer, present [rows, S] bool (the subject has tokens in the window and
    in the bank)."""
    cos = torch.stack([torch.cosine_similarity(pooled[name].flatten(2), bank[name].flatten(2), dim=-1)
                       for name in bank])  # [layers, rows, S]
    weight = present.to(cos.dtype) / present.sum(1, keepdim=True).clamp_min(1)
    return ((1 - cos) * weight).sum() / len(bank)


class Ouroboros:
    """The subject parts on one FIFO run (module docstring).

    groups: per batch row, per subject, its text-key indices; map_layers: cross-attention layers of
    the maps; memory_layers: self-attention layers that store, read and pool; length: queue slots,
    lookahead's context slots included (window starts count them first, as ``guidance.fifo.windows``).
    """

    def __init__(self, groups: list[list[list[int]]], map_layers, memory_layers, length: int,
                 cross_frame: bool = True, guidance: float = 0.0, momentum: float = 0.9,
                 binarization: str | float = "otsu"):
        self.groups, self.map_layers, self.length = groups, list(map_layers), length
        self.capture, self.memory = AttentionMapCapture(map_layers), FrameMemory(memory_layers)
        self.cross_frame, self.guidance, self.momentum, self.binarization = cross_frame, guidance, momentum, binarization
        self.masks = self.next_masks = None  # [rows, S, length, h, w]: the slots' masks, now and for the next step
        self.stored: dict[str, dict] = {}  # per branch, the head window's FrameMemory.stored
        self.bank: dict[str, torch.Tensor] = {}
        self.banked: torch.Tensor | None = None  # [rows, S]: subjects the bank holds

    @contextmanager
    def attached(self, model: torch.nn.Module):
        """The capture and the frame memory on ``model`` for a ``with`` block, state reset."""
        self.masks = self.next_masks = None
        self.stored, self.bank, self.banked = {}, {}, None
        with ExitStack() as stack:
            stack.enter_context(steering(model, [self.capture, self.memory]))
            stack.callback(self.memory.clear)
            stack.callback(self.capture.disarm)
            yield self

    def shift(self) -> None:
        """End of a FIFO step: the head slot left, a fresh tail slot (no mask) came in."""
        if self.next_masks is not None:
            self.masks = torch.cat([self.next_masks[:, :, 1:], torch.zeros_like(self.next_masks[:, :, :1])], 2)
        self.next_masks, self.stored = None, {}

    def velocity(self, x: torch.Tensor, start: int, cond: Predict, uncond: Predict | None, guidance_scale: float,
                 model: torch.nn.Module) -> torch.Tensor:
        """The velocity of the window of slots ``start`` .. ``start + f`` at ``x`` [rows, C, f, h, w]:
        ``cond`` / ``uncond`` run the denoiser's two branches (uncond None: no CFG)."""
        f, head = x.shape[2], start == 0
        masks = None if self.masks is None else self.masks[:, :, start:start + f].flatten(2)  # [rows, S, tokens]
        present = None if masks is None else masks.any(-1)
        guided = bool(self.guidance) and not head and self.banked is not None and masks is not None
        self.memory.masks = masks if head or guided else None
        self.memory.keep = head and self.cross_frame
        self.memory.extra = {} if head else self.stored.get("cond", {})
        self.capture.arm(self.groups)
        try:
            if guided:
                with torch.enable_grad(), frozen_parameters(model):
                    leaf = x.detach().requires_grad_(True)
                    pred = cond(leaf)
                    loss = bank_loss(self.memory.pooled, self.bank, present & self.banked)
                    gradient = torch.autograd.grad(loss, leaf)[0] if loss.requires_grad else torch.zeros_like(leaf)
                pred = pred.detach()
            else:
                pred = cond(x)
        finally:
            self.capture.disarm()
        maps = torch.stack([self.capture.maps[name].float() for name in self.map_layers]).mean(0)
        self._note_masks(subject_masks(maps, self.binarization), start)
        if head and masks is not None:
            self.stored["cond"] = self.memory.stored
            self._update_bank(present)
        if uncond is not None:
            self.memory.masks = masks if head and self.cross_frame else None
            self.memory.extra = {} if head else self.stored.get("uncond", {})
            self.memory.stored, self.memory.pooled = {}, {}
            other = uncond(x)
            if head and masks is not None:
                self.stored["uncond"] = self.memory.stored
            pred = other + guidance_scale * (pred - other)
        self.memory.clear()
        if guided:
            dims = tuple(range(1, pred.dim()))
            rms = lambda t: t.float().pow(2).mean(dims, keepdim=True).sqrt()
            pred = pred + (self.guidance * rms(pred) / rms(gradient).clamp_min(1e-12) * gradient).to(pred.dtype)
        return pred

    def _note_masks(self, masks: torch.Tensor, start: int) -> None:
        if self.next_masks is None:
            self.next_masks = torch.zeros(*masks.shape[:2], self.length, *masks.shape[3:], dtype=torch.bool,
                                          device=masks.device)
        self.next_masks[:, :, start:start + masks.shape[2]] = masks

    def _update_bank(self, present: torch.Tensor) -> None:
        m = self.momentum
        for name, pooled in self.memory.pooled.items():
            pooled = pooled.detach()
            old = self.bank.get(name)
            if old is None:
                self.bank[name] = pooled
            else:
                keep = self.banked[:, :, None, None]
                mixed = torch.where(keep, m * old + (1 - m) * pooled, pooled)
                self.bank[name] = torch.where(present[:, :, None, None], mixed, old)
        self.banked = present if self.banked is None else self.banked | present

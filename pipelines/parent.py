"""What attnsteer reads off a diffusers pipeline: the call signature of the diffusers parent it
extends, and its denoiser (the UNet, else the transformer). A leaf module, so that every part of this
floor can ask without importing the steer classes."""

from __future__ import annotations

import inspect

import torch


def parent_call(cls) -> inspect.Signature:
    """The signature of the diffusers pipeline's ``__call__`` that ``cls`` extends."""
    parent = next(c for c in cls.__mro__ if c.__module__.startswith("diffusers.") and "__call__" in c.__dict__)
    return inspect.signature(parent.__call__)


def denoiser(pipe) -> torch.nn.Module | None:
    """The pipeline's denoiser: its UNet, else its transformer (None where it has neither)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else getattr(pipe, "transformer", None)

"""Frame counts of video pipelines: how many video frames a call makes, and what a clip length asks for.

Wan's ``WanPipeline`` rounds ``num_frames`` to 1 + k * the VAE's temporal factor, which at factor 1 (a
per-frame VAE, as shapes-wan's) always adds a frame; attnsteer's commands count the frames that come out.
"""

from __future__ import annotations

from contextlib import contextmanager

from diffusers.pipelines.wan import pipeline_wan

WAN_TRAINED_FRAMES = 81  # Wan 2.1's clip length, for a model without a recorded one


def trained_frames(call_defaults: dict, factor: int = 4) -> int:
    """The clip length a Wan model was trained on: the video frames WanPipeline makes for its folder's
    call default num_frames with a VAE of temporal ``factor`` (Wan's 4 by default), else Wan 2.1's."""
    return wan_frames(call_defaults.get("num_frames", WAN_TRAINED_FRAMES), factor)


def wan_frames(num_frames: int, factor: int) -> int:
    """The video frames WanPipeline makes for ``num_frames``: it rounds to k * factor + 1 unless
    num_frames % factor == 1, which never holds for factor 1, where it adds a frame."""
    return max(num_frames if num_frames % factor == 1 else num_frames // factor * factor + 1, 1)


def parent_frames(frames: int, factor: int) -> int:
    """The num_frames that makes WanPipeline generate ``frames`` (1 + k * factor) video frames."""
    return frames - 1 if factor == 1 else frames


def check_frames(name: str, frames, factor: int) -> None:
    """Refuses a frame count the VAE cannot make: 1 + k * its temporal ``factor`` (any count at factor 1)."""
    if factor == 1 and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"{name} {frames!r} must be a whole number of frames >= 1")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % factor:
        raise ValueError(f"{name} {frames!r} must be 1 + {factor}k frames (1, {1 + factor}, {1 + 2 * factor}, ...): "
                         f"the VAE packs {factor} frames into each latent frame after the first")


def temporal_factor(pipe) -> int | None:
    """Video frames per latent frame of a video pipeline's VAE (after the first), None for an image pipeline."""
    return getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", None)


@contextmanager
def frame_rounding_quiet():
    """WanPipeline's notice that it rounds num_frames held back: with factor 1 it rounds every call,
    also one whose num_frames is chosen for the rounding (``parent_frames``)."""
    drop = lambda record: not record.getMessage().startswith("`num_frames - 1` has to be divisible by")
    pipeline_wan.logger.addFilter(drop)
    try:
        yield
    finally:
        pipeline_wan.logger.removeFilter(drop)

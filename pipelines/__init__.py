"""Floor 3: diffusers pipeline subclasses with attnsteer's keyword arguments, and the command line."""

from .maps import AttentionMaps, render_attention_maps
from .steer import (
    STEER_PIPELINES,
    FluxSteerPipeline,
    StableDiffusion3SteerPipeline,
    StableDiffusionSteerPipeline,
    StableDiffusionXLSteerPipeline,
    SteerMixin,
    WanSteerPipeline,
)

__all__ = [
    "STEER_PIPELINES", "FluxSteerPipeline", "StableDiffusion3SteerPipeline", "StableDiffusionSteerPipeline",
    "StableDiffusionXLSteerPipeline", "SteerMixin", "WanSteerPipeline",
    "AttentionMaps", "render_attention_maps",
]

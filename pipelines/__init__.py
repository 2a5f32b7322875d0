"""Floor 3: diffusers pipeline subclasses with attnsteer's keyword arguments, and the command line."""

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
]

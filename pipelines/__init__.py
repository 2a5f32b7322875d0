"""Floor 3: diffusers pipeline subclasses with attnsteer's keyword arguments, and the command line.

The pipeline classes are imported on first use, so that the command line starts (and ``--help``
answers) without loading diffusers."""

__all__ = [
    "STEER_PIPELINES", "FluxSteerPipeline", "StableDiffusion3SteerPipeline", "StableDiffusionSteerPipeline",
    "StableDiffusionXLSteerPipeline", "SteerMixin", "WanSteerPipeline",
]


def __getattr__(name: str):
    if name in __all__:
        from . import steer

        return getattr(steer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

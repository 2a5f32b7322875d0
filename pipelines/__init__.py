"""Floor 3: diffusers pipeline subclasses with attnsteer's keyword arguments, and the command line.

The pipeline classes are imported on first use, so that the command line starts (and ``--help``
answers) without loading diffusers."""

import logging


class _NoTorchvisionNotice(logging.Filter):
    """diffusers' pipelines import transformers' image processors, which announce on import that they
    fall back to PIL without torchvision; no image processor takes part in generation here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())


class _OneTruncationNotice(logging.Filter):
    """A prompt longer than the tokenizer holds is announced twice: by transformers' tokenizer, and by
    diffusers, which also names the part cut off. Keep diffusers'."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token indices sequence length is longer than the specified maximum" not in record.getMessage()


logging.getLogger("transformers.tokenization_utils_base").addFilter(_OneTruncationNotice())

__all__ = [
    "STEER_PIPELINES", "FluxSteerPipeline", "StableDiffusion3SteerPipeline", "StableDiffusionSteerPipeline",
    "StableDiffusionXLSteerPipeline", "SteerMixin", "WanSteerPipeline", "steer_pipeline",
    "AttentionMaps", "render_attention_maps", "WanFIFOPipeline",
]


def __getattr__(name: str):
    if name in ("AttentionMaps", "render_attention_maps"):
        from . import maps

        return getattr(maps, name)
    if name == "WanFIFOPipeline":
        from . import fifo

        return fifo.WanFIFOPipeline
    if name in __all__:
        from . import steer

        return getattr(steer, name)
    if name.endswith("SteerPipeline"):  # any diffusers pipeline with a supported denoiser, e.g. StableDiffusionImg2Img
        import diffusers

        from .steer import steer_pipeline

        parent = getattr(diffusers, name.removesuffix("SteerPipeline") + "Pipeline", None)
        if parent is not None:
            return steer_pipeline(parent)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

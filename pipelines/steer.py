"""diffusers pipeline subclasses that take attnsteer's methods as keyword arguments.

Each subclass keeps its parent's ``from_pretrained``, arguments, outputs, ``callback_on_step_end``
and progress bar; the methods are attached to the denoiser for the one call and removed after it,
also when the call raises.

    pipe = StableDiffusion3SteerPipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
    image = pipe("a corgi", perturbed_heads="heads.json", perturbation_scale=3.0, softpag_u=0.5).images[0]

Formulas, defaults and sources: docs/methods.md, section 1.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import logging
import numbers
import os
from contextlib import ExitStack
from pathlib import Path, PurePath

from diffusers import (DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, WanPipeline)

from attnsteer.attention_processors import HeadSetFile, LayoutRecorder, list_layers, resolve_heads, steering
from attnsteer.guidance.perturbation import BranchInfo, HeadPerturbationGuidance

from .frames import frame_rounding_quiet
from .methods import OPTIONS, AttentionMethods, pop_arguments
from .parent import parent_call
from .story import expand_story

DEFAULT_SCALE = 5.0  # HeadHunter paper, SD3-medium
DEFAULT_U = 1.0  # plain head-level PAG; HeadHunter deploys found heads at u ~ 0.5
DEFAULT_MODE = "joint"  # HeadHunter's definition of identity on joint attention
PERTURBATION_ARGUMENTS = ("perturbed_heads", "perturbation_scale", "softpag_u", "perturbation_mode",
                          "perturbation_window", "perturbation_batching", "perturbation_prefix_reuse",
                          "perturbed_heads_per_prompt")
CALL_DEFAULTS = "attnsteer.json"  # in a model folder: {"call": {parent call keyword arguments the model needs}}
OURS = (*PERTURBATION_ARGUMENTS, *OPTIONS)
PREFIXES = ("perturb", "softpag", "astar", "story", "sparse", "fifo", "ouroboros", "attention_maps")


def check_call_defaults(cls, defaults, path) -> dict:
    """A model folder's "call" entry, or a ValueError naming what is wrong in it."""
    parameters = parent_call(cls).parameters
    if not isinstance(defaults, dict):
        raise ValueError(f"{path}: \"call\" must be an object of {cls.__name__} call arguments, got {defaults!r}")
    unknown = [name for name in defaults if name not in parameters or name in ("self", "kwargs")]
    if unknown:
        raise ValueError(f"{path}: \"call\" names {unknown[0]!r}, which is not a call argument of {cls.__name__}"
                         + _nearest(unknown[0], [n for n in parameters if n not in ("self", "kwargs")]))
    return defaults


def _nearest(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keywords(kwargs: dict, signature: inspect.Signature) -> None:
    """ValueError for a keyword that looks like one of attnsteer's but is none: a parent pipeline that
    takes ``**kwargs`` would swallow the misspelt name silently."""
    for name in kwargs:
        if name in signature.parameters:
            continue
        close = difflib.get_close_matches(name, OURS, n=1, cutoff=0.75)
        prefix = next((p for p in PREFIXES if name.startswith(p)), None)
        if close:
            raise ValueError(f"unknown keyword argument {name!r}; did you mean {close[0]!r}?")
        if prefix in ("fifo", "ouroboros"):
            raise ValueError(f"unknown keyword argument {name!r}: FIFO and Ouroboros arguments are WanFIFOPipeline's")
        if prefix is not None:
            raise ValueError(f"unknown keyword argument {name!r}; attnsteer's starting with {prefix!r} are "
                             + ", ".join(n for n in OURS if n.startswith(prefix)))


def check_size(pipe, arguments: dict) -> None:
    """ValueError, in pixels, for a height or width the denoiser cannot take: a UNet's sizes are
    multiples of its whole downsampling, an SD3 transformer's are also at most its position grid."""
    unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
    if unet is not None:
        down = 2 ** (len(unet.config.block_out_channels) - 1)
        step, largest, why = pipe.vae_scale_factor * down, None, f"VAE {pipe.vae_scale_factor}x and UNet {down}x downsampling"
    elif isinstance(pipe, StableDiffusion3Pipeline) and transformer.config.pos_embed_max_size is not None:
        step = pipe.vae_scale_factor * transformer.config.patch_size
        largest = transformer.config.pos_embed_max_size * step
        why = f"VAE {pipe.vae_scale_factor}x, patches of {transformer.config.patch_size}, {transformer.config.pos_embed_max_size} positions"
    else:
        return
    default = (unet or transformer).config.sample_size * pipe.vae_scale_factor
    for name in ("height", "width"):
        size = arguments.get(name)
        if size is None:
            continue
        if size % step or size < step or (largest is not None and size > largest):
            allowed = f"multiples of {step} px" + (f" up to {largest} px" if largest is not None else "")
            raise ValueError(f"{name} {size} px: {type(pipe).__name__} takes {allowed} ({why}); "
                             f"its default is {default} px")


class CallDefaultsMixin:
    """``from_pretrained`` as the parent's, plus ``call_defaults``: a local model folder's attnsteer.json
    "call" entry (parent call arguments the model needs, e.g. shapes-sd3's ``max_sequence_length=8``)."""

    call_defaults: dict = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The parent's; a shipped model's name (``"shapes-sd3"``) loads it from samples/models."""
        from .cli import SHIPPED, model_path

        if pretrained_model_name_or_path in SHIPPED and not Path(pretrained_model_name_or_path).exists():
            pretrained_model_name_or_path = model_path(pretrained_model_name_or_path)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        path = Path(pretrained_model_name_or_path) / CALL_DEFAULTS
        pipe.call_defaults = check_call_defaults(cls, json.loads(path.read_text()).get("call", {}), path) \
            if path.is_file() else {}
        return pipe


    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """The parent's (this class on a loaded pipeline's components, no weights reloaded), keeping the
        loaded pipeline's ``call_defaults``."""
        models = logging.getLogger("diffusers.models.modeling_utils")
        level = models.level
        models.setLevel(logging.ERROR)  # from_pipe casts every model to its dtype, and each says so, with nothing kept
        try:
            pipe = super().from_pipe(pipeline, **{"dtype": pipeline.dtype, **kwargs})
        finally:
            models.setLevel(level)
        pipe.call_defaults = dict(getattr(pipeline, "call_defaults", {}))
        return pipe


class SteerMixin(CallDefaultsMixin):
    """Adds head-level perturbation guidance to a diffusers pipeline's ``__call__``.

    Keyword arguments (all optional):
        perturbed_heads: heads to perturb: a list of (layer, head) or "layer:head", a spec string
            such as ``"transformer_blocks.3.attn:0,5 7:*"``, a ``{layer: heads}`` dict, or the path of
            a head-set JSON file (whose mode, u and w become the defaults). Layers are stable module
            names or indices into ``list_layers``; see ``attnsteer layers``.
        perturbation_scale: w in eps + w (eps_c - eps_perturbed); default 5.0.
        softpag_u: SoftPAG weight u in [0, 1]: A := (1 - u) A + u I; default 1.0 (PAG identity).
        perturbation_mode: "joint" (identity on the whole joint map) or "image" (image-image block).
        perturbation_window: (start, stop) fractions of the steps where it acts; default all steps.
        perturbation_batching: "batched" (one forward) or "sequential" (less memory).
        perturbation_prefix_reuse: compute the layers before the first perturbed one once for the
            conditional rows and their perturbed copies (the same images, less compute); default True.
        perturbed_heads_per_prompt: instead of ``perturbed_heads``, a list with one head spec per
            prompt (``None`` or ``[]`` for none): each prompt's images get their own head set. The
            head search uses it to score several candidate sets in one batched call.
        astar_tokens, astar_scale, ...: A-STAR on SD, SDXL, SD3 and FLUX; see ``pipelines.astar``.
        return_attention_maps, attention_maps_steps, ...: per-token maps of the call (output
            ``attention_maps``); see ``pipelines.maps``.

    The pipeline's own CFG step is left as it is: the conditional prediction it receives is
    eps_c + (w / g)(eps_c - eps_perturbed). With SD/SDXL's ``guidance_rescale`` the rescale therefore
    references that prediction rather than eps_c. SD3's skip-layer guidance still gets its own term
    from eps_c, and with g = 0 (Wan 2.2's ``guidance_scale_2``) the term rides on the unconditional
    prediction (see ``attnsteer.guidance.perturbation``).

    ``call_defaults``: parent call arguments the model asks for (a local folder's ``attnsteer.json``,
    e.g. shapes-sd3's ``max_sequence_length=8``), used where the call does not give them.
    """

    def steer_denoisers(self):
        """The denoising models a pipeline call runs, by component name."""
        names = ("unet", "transformer", "transformer_2")
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    def steer_layers(self):
        """Addressable attention layers of the (first) denoiser."""
        return list_layers(next(iter(self.steer_denoisers().values())))

    def token_layouts(self, **call_kwargs) -> dict:
        """``{layer: (TokenLayout, q shape, k shape)}`` seen in one denoising step of a call."""
        model = next(iter(self.steer_denoisers().values()))
        recorder = LayoutRecorder(list_layers(model))
        with steering(model, [recorder]):
            super().__call__(**{**call_kwargs, "num_inference_steps": 1, "output_type": "latent"})
        return recorder.seen

    def branch_info(self, model, call_arguments: dict) -> BranchInfo:
        """How this pipeline uses ``model``'s prediction: here one batched CFG call per step."""
        cfg = self.do_classifier_free_guidance
        return BranchInfo(cfg, self.guidance_scale if cfg else 1.0, self._num_timesteps)

    def check_head_set_model(self, path: str, model: str | None) -> None:
        """ValueError when a head-set file was made for another model than this pipeline's. Names are
        compared by their last path component, so that a hub id and a local folder of the same name
        match; a file without a model, or a pipeline built in code (no ``name_or_path``), is not checked."""
        ours = self.name_or_path
        if model is None or ours is None or PurePath(str(model)).name == PurePath(str(ours)).name:
            return
        raise ValueError(f"head-set file {path!r} was made for model {model!r}, but this pipeline's model is {ours!r}; "
                         "use a head set made for this model, or edit or remove the file's \"model\" field")

    def perturbation_guidance(self, perturbed_heads=None, perturbation_scale=None, softpag_u=None,
                              perturbation_mode=None, perturbation_window=(0.0, 1.0),
                              perturbation_batching="batched", perturbation_prefix_reuse=True,
                              perturbed_heads_per_prompt=None, prompt=None) -> HeadPerturbationGuidance:
        """Check the perturbation arguments against this pipeline's model; raises ValueError."""
        stored = HeadSetFile(heads=[])
        if isinstance(perturbed_heads, (str, os.PathLike)) and str(perturbed_heads).endswith(".json"):
            stored = HeadSetFile.load(str(perturbed_heads))
            self.check_head_set_model(str(perturbed_heads), stored.model)
            perturbed_heads = stored.heads
        if perturbed_heads_per_prompt is not None:
            if perturbed_heads:
                raise ValueError("give perturbed_heads or perturbed_heads_per_prompt, not both")
            prompts = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else None
            if not isinstance(perturbed_heads_per_prompt, (list, tuple)) or (
                    prompts is not None and len(perturbed_heads_per_prompt) != prompts):
                raise ValueError(f"perturbed_heads_per_prompt must be a list with one head spec per prompt "
                                 f"({prompts} prompts), got {perturbed_heads_per_prompt!r}")
            heads = [resolve_heads(h or [], self.steer_layers()) for h in perturbed_heads_per_prompt]
        else:
            heads = resolve_heads(perturbed_heads or [], self.steer_layers())
        pick = lambda given, saved, default: given if given is not None else saved if saved is not None else default
        return HeadPerturbationGuidance(
            heads,
            scale=pick(perturbation_scale, stored.w, DEFAULT_SCALE),
            u=pick(softpag_u, stored.u, DEFAULT_U),
            mode=pick(perturbation_mode, stored.mode, DEFAULT_MODE),
            window=perturbation_window,
            batching=perturbation_batching,
            prefix_reuse=perturbation_prefix_reuse,
        )

    def _prepare(self, args: tuple, kwargs: dict, perturbation: dict):
        """(parent keyword arguments, positional ones included by name; bound arguments; head
        perturbation; attention methods) of a call, every argument checked; ValueError before any compute."""
        methods = pop_arguments(kwargs)
        signature = inspect.signature(super().__call__)
        check_keywords(kwargs, signature)
        perturbation = {k: v for k, v in perturbation.items() if v is not None}
        if "perturbed_heads" not in perturbation and "perturbed_heads_per_prompt" not in perturbation and perturbation:
            raise ValueError(f"{next(iter(perturbation))} acts only with perturbed_heads (or perturbed_heads_per_prompt), "
                             "which is not given")
        named = signature.bind_partial(*args, **kwargs).arguments
        for name in [n for n in named if signature.parameters[n].kind is inspect.Parameter.VAR_KEYWORD]:
            named.update(named.pop(name))
        kwargs = expand_story(dict(named), methods)
        kwargs = {**{k: v for k, v in self.call_defaults.items() if k not in kwargs}, **kwargs}
        bound = signature.bind(**kwargs)
        bound.apply_defaults()
        check_steps(bound.arguments)
        check_size(self, bound.arguments)
        guidance = self.perturbation_guidance(**perturbation, prompt=bound.arguments.get("prompt"))
        return kwargs, bound, guidance, AttentionMethods(self, bound.arguments, methods)

    def check_call(self, *args, **kwargs) -> None:
        """Check a call's arguments, the parent's and attnsteer's, as the call would, computing nothing
        (ValueError naming a bad one): for front ends that must refuse bad input before other work."""
        perturbation = {k: kwargs.pop(k) for k in list(kwargs) if k in PERTURBATION_ARGUMENTS}
        self._prepare(args, kwargs, perturbation)

    def __call__(self, *args, perturbed_heads=None, perturbation_scale=None, softpag_u=None,
                 perturbation_mode=None, perturbation_window=None, perturbation_batching=None,
                 perturbation_prefix_reuse=None, perturbed_heads_per_prompt=None, **kwargs):
        perturbation = dict(perturbed_heads=perturbed_heads, perturbation_scale=perturbation_scale,
                            softpag_u=softpag_u, perturbation_mode=perturbation_mode,
                            perturbation_window=perturbation_window, perturbation_batching=perturbation_batching,
                            perturbation_prefix_reuse=perturbation_prefix_reuse,
                            perturbed_heads_per_prompt=perturbed_heads_per_prompt)
        kwargs, bound, guidance, attention = self._prepare(args, kwargs, perturbation)
        parent_call = super().__call__
        if not guidance.enabled and not attention.active:
            return parent_call(**kwargs)
        attention.segment(parent_call, kwargs)
        with ExitStack() as stack:
            for model in self.steer_denoisers().values() if guidance.enabled else ():
                stack.enter_context(guidance.attached(model, lambda m: self.branch_info(m, bound.arguments)))
            if attention.active:
                stack.enter_context(attention.attached(lambda m: self.branch_info(m, bound.arguments)))
            return attention.finish(parent_call(**kwargs))


def check_steps(call_arguments: dict) -> None:
    """ValueError unless num_inference_steps is a positive integer (with 0 or a negative number diffusers
    may return the initial noise undenoised); None is left to diffusers when the call gives its own
    timesteps or sigmas."""
    steps = call_arguments.get("num_inference_steps")
    custom = any(call_arguments.get(name) is not None for name in ("timesteps", "sigmas"))
    if steps is None and custom:
        return
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"num_inference_steps {steps!r} must be a positive integer")


class StableDiffusionSteerPipeline(SteerMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline (SD1.5 and kin) with attnsteer's keyword arguments."""


class StableDiffusionXLSteerPipeline(SteerMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline with attnsteer's keyword arguments."""


class StableDiffusion3SteerPipeline(SteerMixin, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline with attnsteer's keyword arguments. T5 is optional: a folder saved
    without it loads as it is (the parent needs ``text_encoder_3=None, tokenizer_3=None``)."""

    _optional_components = [*StableDiffusion3Pipeline._optional_components, "text_encoder_3", "tokenizer_3"]


class FluxSteerMixin(SteerMixin):
    """The FLUX family's branches: guidance distilled into the model, true CFG as a separate call."""

    def branch_info(self, model, call_arguments):
        a = call_arguments
        has_negative = a.get("negative_prompt") is not None or (
            a.get("negative_prompt_embeds") is not None and a.get("negative_pooled_prompt_embeds") is not None)
        true_cfg = a.get("true_cfg_scale", 1.0) > 1 and has_negative
        return BranchInfo(False, a["true_cfg_scale"] if true_cfg else 1.0, self._num_timesteps)


class WanSteerMixin(SteerMixin):
    """The Wan family's branches: CFG as a separate call, Wan 2.2's second expert with its own scale.
    With a per-frame VAE (temporal factor 1) WanPipeline's notice that it adds a frame, given on every
    call, is held back: num_frames 16 making 17 frames is how such a model is called."""

    def __call__(self, *args, **kwargs):
        if self.vae_scale_factor_temporal != 1:
            return super().__call__(*args, **kwargs)
        with frame_rounding_quiet():
            return super().__call__(*args, **kwargs)

    def branch_info(self, model, call_arguments):
        if not self.do_classifier_free_guidance:
            return BranchInfo(False, 1.0, self._num_timesteps)
        second = model is getattr(self, "transformer_2", None)
        return BranchInfo(False, self._guidance_scale_2 if second else self._guidance_scale, self._num_timesteps)


class ChromaSteerMixin(SteerMixin):
    """Chroma's branches: CFG as two calls a step, conditional first, that the pipeline does not name."""

    def branch_info(self, model, call_arguments):
        if not self.do_classifier_free_guidance:
            return BranchInfo(False, 1.0, self._num_timesteps)
        return BranchInfo(False, self.guidance_scale, self._num_timesteps, unnamed_calls=("cond", "uncond"))


class Flux2SteerMixin(SteerMixin):
    """FLUX.2's branches: FLUX.2 [dev] distils guidance into the model (no CFG); Klein base runs CFG as a
    separate "uncond" call."""

    def branch_info(self, model, call_arguments):
        cfg = getattr(self, "do_classifier_free_guidance", False)
        return BranchInfo(False, self.guidance_scale if cfg else 1.0, self._num_timesteps)


class QwenImageSteerMixin(SteerMixin):
    """Qwen-Image's branches: true CFG as a separate "uncond" call when true_cfg_scale > 1 and a negative
    prompt (or its embeddings) is given."""

    def branch_info(self, model, call_arguments):
        a = call_arguments
        negative = a.get("negative_prompt") is not None or a.get("negative_prompt_embeds") is not None
        true_cfg = a.get("true_cfg_scale", 1.0) > 1 and negative
        return BranchInfo(False, a["true_cfg_scale"] if true_cfg else 1.0, self._num_timesteps)


class GuiderSteerMixin(SteerMixin):
    """The branches of a pipeline that guides through a diffusers guider (HunyuanVideo 1.5): its
    classifier-free guidance runs the conditional and unconditional calls apart ("pred_cond", "pred_uncond")
    and combines them with the guider's scale, where the guider has CFG on for the step."""

    def branch_info(self, model, call_arguments):
        guider = self.guider
        on = guider._is_cfg_enabled()
        scale = guider.guidance_scale + guider.use_original_formulation  # cond + s (cond - uncond): g = s + 1
        return BranchInfo(False, scale if on else 1.0, self._num_timesteps)

    def _prepare(self, args, kwargs, perturbation):
        prepared = super()._prepare(args, kwargs, perturbation)
        rescale = getattr(self.guider, "guidance_rescale", 0.0)
        if prepared[2].enabled and (type(self.guider).__name__ != "ClassifierFreeGuidance" or rescale):
            raise ValueError(f"head perturbation adds its term to the conditional prediction before the guider's "
                             f"classifier-free guidance, and {type(self.guider).__name__} (guidance_rescale {rescale}) "
                             "is not that plain combination; use ClassifierFreeGuidance without rescale")
        return prepared


class ZImageSteerMixin(SteerMixin):
    """Z-Image's branches: one batched CFG call, conditional rows first, combined as c + s (c - u), so g = s + 1;
    steps past ``cfg_truncation`` run the conditional rows alone. ``cfg_normalization`` bounds the guided
    prediction's norm by that of the conditional prediction the pipeline receives, eps_c + (w / g)(eps_c - eps_p)."""

    def branch_info(self, model, call_arguments):
        cfg = self.do_classifier_free_guidance
        truncation = self._cfg_truncation
        if cfg and truncation is not None and float(truncation) <= 1:  # the pipeline's rule, at the step being run
            scheduler = self.scheduler
            step = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index or 0
            t = scheduler.timesteps[step]
            cfg = (1000 - float(t)) / 1000 <= truncation
        return BranchInfo(cfg, self.guidance_scale + 1 if cfg else 1.0, self._num_timesteps, cond_first=True)


class CogVideoXSteerMixin(SteerMixin):
    """CogVideoX's branches: one batched CFG call when guidance_scale > 1 (it has no
    ``do_classifier_free_guidance`` property). Its dynamic CFG sets the scale after each model call, where
    the perturbation term needs it before, so the two are not combined."""

    def branch_info(self, model, call_arguments):
        cfg = self.guidance_scale > 1
        return BranchInfo(cfg, self.guidance_scale if cfg else 1.0, self._num_timesteps)

    def _prepare(self, args, kwargs, perturbation):
        prepared = super()._prepare(args, kwargs, perturbation)
        if prepared[2].enabled and prepared[1].arguments.get("use_dynamic_cfg"):
            raise ValueError("use_dynamic_cfg=True sets CogVideoX's CFG scale after each model call, and head "
                             "perturbation needs it before; call with use_dynamic_cfg=False")
        return prepared


class FluxSteerPipeline(FluxSteerMixin, FluxPipeline):
    """FluxPipeline with attnsteer's keyword arguments. True CFG runs as a separate call."""


class WanSteerPipeline(WanSteerMixin, WanPipeline):
    """WanPipeline (text-to-video) with attnsteer's keyword arguments; CFG runs as a separate call."""


STEER_PIPELINES = {
    cls.__bases__[-1].__name__: cls  # the diffusers pipeline it extends
    for cls in (StableDiffusionSteerPipeline, StableDiffusionXLSteerPipeline, StableDiffusion3SteerPipeline,
                FluxSteerPipeline, WanSteerPipeline)
}
# The denoiser class of a pipeline -> the branch rules its steer class takes
FAMILIES = {"UNet2DConditionModel": SteerMixin, "SD3Transformer2DModel": SteerMixin,
            "FluxTransformer2DModel": FluxSteerMixin, "WanTransformer3DModel": WanSteerMixin,
            "WanVACETransformer3DModel": WanSteerMixin,
            "ChromaTransformer2DModel": ChromaSteerMixin, "Flux2Transformer2DModel": Flux2SteerMixin,
            "QwenImageTransformer2DModel": QwenImageSteerMixin, "CogVideoXTransformer3DModel": CogVideoXSteerMixin,
            "LTXVideoTransformer3DModel": SteerMixin, "HunyuanVideo15Transformer3DModel": GuiderSteerMixin,
            "ZImageTransformer2DModel": ZImageSteerMixin}


@functools.cache
def steer_pipeline(parent: type) -> type:
    """The steer class of any diffusers pipeline whose denoiser attnsteer supports (``parent``'s own
    ``unet`` or ``transformer``), e.g. ``steer_pipeline(StableDiffusionImg2ImgPipeline)``: the parent's
    arguments, outputs and loading, plus attnsteer's keyword arguments. ValueError for another denoiser."""
    if not (isinstance(parent, type) and issubclass(parent, DiffusionPipeline)):
        raise ValueError(f"steer_pipeline takes a diffusers pipeline class, got {parent!r}")
    if parent.__name__ in STEER_PIPELINES and STEER_PIPELINES[parent.__name__].__bases__[-1] is parent:
        return STEER_PIPELINES[parent.__name__]
    parameters = inspect.signature(parent.__init__).parameters
    denoiser = parameters.get("unet") or parameters.get("transformer")
    name = getattr(denoiser.annotation, "__name__", str(denoiser.annotation)) if denoiser is not None else None
    if name not in FAMILIES:
        import diffusers

        from attnsteer.attention_processors.architectures import unsupported_reason

        known = getattr(diffusers, name or "", None)
        why = f" ({unsupported_reason(known)})" if isinstance(known, type) else ""
        raise ValueError(f"{parent.__name__}'s denoiser {name or '(none named unet or transformer)'} is not "
                         f"supported{why}; attnsteer steers {', '.join(FAMILIES)}")
    stem = parent.__name__.removesuffix("Pipeline")
    return type(f"{stem}SteerPipeline", (FAMILIES[name], parent),
                {"__module__": __name__, "__doc__": f"{parent.__name__} with attnsteer's keyword arguments."})

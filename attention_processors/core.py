"""The steering core: reach into chosen attention calls of a diffusers model.

A ``Steer`` is a small function of one attention call, in the spirit of flex_attention's
score/mask mods: it receives the call's q, k, v ([B, H, L, D]) and mask and a ``next`` function
that computes the attention of everything after it, and returns the output. Steers compose:
several on one layer form a chain that ends in ``torch.nn.functional.scaled_dot_product_attention``.

``steering(model, steers)`` installs, for the duration of a ``with`` block, a wrapper around the
processor of each layer a steer asks for. The wrapper leaves diffusers' own processor in charge
(norms, RoPE, projections) and only intercepts its scaled-dot-product-attention call, through a
``TorchFunctionMode``; so it works whether the processor calls ``F.scaled_dot_product_attention``
itself (SD, SD3) or through diffusers' native attention dispatch (FLUX, Wan). On exit, also on an
exception, the original processors and the model's forward are restored.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    FusedJointAttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
    JointAttnProcessor2_0,
    SD3IPAdapterJointAttnProcessor2_0,
)
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch.overrides import TorchFunctionMode

from .architectures import LayerInfo, TokenLayout, architecture_of, model_call_info

Next = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# diffusers' processors of the supported models whose first SDPA call is the layer's attention, read
# from their source: those calling torch's SDPA themselves, and those going through diffusers'
# attention dispatch, which calls it only on the native backends.
SDPA_PROCESSORS = (AttnProcessor2_0, FusedAttnProcessor2_0, JointAttnProcessor2_0, FusedJointAttnProcessor2_0,
                   IPAdapterAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0)
DISPATCH_PROCESSORS = (FluxAttnProcessor, FluxIPAdapterAttnProcessor, WanAttnProcessor)
# diffusers' processors known to compute attention without torch's SDPA (by hand, xformers, slicing, NPU or
# XLA kernels, linear attention) or around it (PAG's identity branch): refused before compute. A processor in
# neither list is steered if its first call goes through SDPA, and refused at that call if not.
NON_SDPA_PROCESSORS = tuple(getattr(attention_processor, name) for name in (
    "AttnProcessor", "AttnAddedKVProcessor", "SlicedAttnProcessor", "SlicedAttnAddedKVProcessor", "XFormersAttnProcessor",
    "XFormersAttnAddedKVProcessor", "XFormersJointAttnProcessor", "CustomDiffusionAttnProcessor",
    "CustomDiffusionXFormersAttnProcessor", "IPAdapterAttnProcessor", "IPAdapterXFormersAttnProcessor",
    "AttnProcessorNPU", "FluxAttnProcessor2_0_NPU", "FusedFluxAttnProcessor2_0_NPU", "XLAFlashAttnProcessor2_0",
    "XLAFluxFlashAttnProcessor2_0", "SanaLinearAttnProcessor2_0", "PAGIdentitySelfAttnProcessor2_0",
    "PAGCFGIdentitySelfAttnProcessor2_0", "PAGJointAttnProcessor2_0", "PAGCFGJointAttnProcessor2_0",
    "PAGIdentitySanaLinearAttnProcessor2_0", "PAGCFGSanaLinearAttnProcessor2_0") if hasattr(attention_processor, name))
SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class AttentionCall:
    """One intercepted attention computation: which layer, its token layout, its SDPA options."""

    layer: LayerInfo
    layout: TokenLayout
    sdpa_kwargs: dict = field(default_factory=dict)
    timestep: float | None = None  # the model call's (first) timestep, which marks the denoising step

    @property
    def name(self) -> str:
        return self.layer.name

    def scale(self, head_dim: int) -> float:
        scale = self.sdpa_kwargs.get("scale")
        return head_dim**-0.5 if scale is None else scale


class Steer(Protocol):
    """What a steer provides. ``layers``: the layer names it acts on. Optional: ``kinds``, the layer
    kinds it can act on (a session refuses other layers by name); ``reset()``, called when a session
    installs it, so that per-generation state (a step count) starts anew."""

    layers: frozenset[str]

    def attention(
        self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, next: Next
    ) -> torch.Tensor: ...


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_SDPA_NAMES, args))
    bound.update(kwargs)
    return bound


class _Intercept(TorchFunctionMode):
    """Routes the first SDPA call inside one processor call through the layer's steer chain."""

    def __init__(self, session: "SteeringSession", layer: LayerInfo):
        super().__init__()
        self.session, self.layer, self.seen = session, layer, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.seen:
            return func(*args, **kwargs)
        self.seen = True
        sdpa = _sdpa_arguments(args, kwargs)
        q, k, v, mask = (sdpa.pop(name, None) for name in ("query", "key", "value", "attn_mask"))
        layout = self.session.layout(self.layer, q.shape[-2])
        call = AttentionCall(self.layer, layout, sdpa, self.session.info.get("timestep"))
        return self.session.run_chain(call, q, k, v, mask)


class SteeredProcessor:
    """Wraps a layer's own processor; its ``__call__`` signature is the wrapped one's, so that
    diffusers' Attention.forward (which drops undeclared keyword arguments) passes the same ones."""

    def __init__(self, inner, layer: LayerInfo, session: "SteeringSession"):
        self.inner, self.layer, self.session = inner, layer, session

    def _steered_call(self, attn, *args, **kwargs):
        if not self.session.active(self.layer.name):
            return self.inner(attn, *args, **kwargs)
        mode = _Intercept(self.session, self.layer)
        with mode:
            out = self.inner(attn, *args, **kwargs)
        if not mode.seen:
            backend = getattr(self.inner, "_attention_backend", None)
            raise RuntimeError(
                f"layer {self.layer.name!r}: its processor {type(self.inner).__name__} did not call torch's "
                f"scaled_dot_product_attention (attention backend: {backend or 'the active default'}), so attnsteer "
                "cannot steer it; use a processor that calls it, on diffusers' 'native' attention backend"
            )
        return out


def check_processor(name: str, processor) -> None:
    """ValueError when layer ``name``'s processor is known not to reach torch's SDPA, where steers act:
    one of NON_SDPA_PROCESSORS, or one of DISPATCH_PROCESSORS on a backend other than SDPA (its own,
    else the active default). Any other processor is judged by what it does: the first steered call
    (SteeredProcessor) refuses one that did not call SDPA. A processor already steered (a session
    inside another) is judged by the processor it wraps."""
    while isinstance(processor, SteeredProcessor):
        processor = processor.inner
    kind = type(processor)
    if kind in DISPATCH_PROCESSORS:
        backend = processor._attention_backend
        default = backend is None
        if default:
            backend = _AttentionBackendRegistry.get_active_backend()[0]
        backend = getattr(backend, "value", backend)
        if backend not in SDPA_BACKENDS:
            raise ValueError(
                f"layer {name!r} uses attention backend {backend!r}{' (the active default)' if default else ''}, "
                f"which bypasses torch's scaled_dot_product_attention; steered layers need one of {SDPA_BACKENDS}"
            )
    elif issubclass(kind, NON_SDPA_PROCESSORS):
        allowed = ", ".join(c.__name__ for c in SDPA_PROCESSORS + DISPATCH_PROCESSORS)
        raise ValueError(
            f"layer {name!r} uses processor {kind.__name__}, which bypasses torch's scaled_dot_product_attention; "
            f"steered layers need one that calls it, e.g. {allowed} (attention slicing: call "
            "pipe.disable_attention_slicing())"
        )


@functools.lru_cache(maxsize=None)
def _wrapper_class(inner_cls: type) -> type:
    def __call__(self, attn, *args, **kwargs):
        return self._steered_call(attn, *args, **kwargs)

    __call__.__signature__ = inspect.signature(inner_cls.__call__)
    return type(f"Steered{inner_cls.__name__}", (SteeredProcessor,), {"__call__": __call__})


@contextmanager
def patched_attribute(obj, name: str, value):
    """Set ``obj.name = value`` as an instance attribute for a block; restore it afterwards."""
    had, old = name in obj.__dict__, obj.__dict__.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextmanager
def wrapped(obj, name: str, wrapper: Callable[[Callable], Callable]):
    """Replace the method ``obj.name`` by ``wrapper(original)`` for a block, keeping the original's name and
    signature: diffusers inspects them (``prepare_extra_step_kwargs`` passes ``eta`` and ``generator`` to
    ``scheduler.step`` only when its signature has them)."""
    original = getattr(obj, name)
    with patched_attribute(obj, name, functools.wraps(original)(wrapper(original))):
        yield


class SteeringSession:
    """The state of steering one model: its steers per layer and the current model call's info."""

    def __init__(self, model: torch.nn.Module, steers: Iterable[Steer]):
        self.model, self.steers = model, list(steers)
        self.architecture = architecture_of(model)
        self.layers = self.architecture.layers(model)
        wanted = set().union(*(s.layers for s in self.steers)) if self.steers else set()
        unknown = sorted(wanted - set(self.layers))
        if unknown:
            raise ValueError(f"unknown attention layer(s) {unknown} in {type(model).__name__}; see list_layers(model)")
        self.chains = {name: [s for s in self.steers if name in s.layers] for name in wanted}
        for name, chain in self.chains.items():
            kind = self.layers[name].kind
            for steer in chain:
                kinds = getattr(steer, "kinds", None)
                if kinds is not None and kind not in kinds:
                    raise ValueError(f"layer {name!r} is {kind}-attention; {type(steer).__name__} acts on "
                                     f"{' or '.join(kinds)}-attention layers")
            check_processor(name, self.layers[name].module.processor)
        self.info: dict = {}

    def active(self, layer: str) -> bool:
        return bool(self.chains.get(layer))

    def layout(self, layer: LayerInfo, seq_len: int) -> TokenLayout:
        return self.architecture.layout(layer, self.info, seq_len)

    def run_chain(self, call: AttentionCall, q, k, v, mask) -> torch.Tensor:
        chain = self.chains[call.name]

        def step(i: int, q, k, v, mask):
            if i == len(chain):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **call.sdpa_kwargs)
            return chain[i].attention(call, q, k, v, mask, functools.partial(step, i + 1))

        return step(0, q, k, v, mask)

    def _forward(self, forward):
        @functools.wraps(forward)
        def recording_forward(*args, **kwargs):
            self.info = model_call_info(self.model, args, kwargs)
            return forward(*args, **kwargs)

        return recording_forward

    @contextmanager
    def installed(self):
        originals = {}
        for steer in self.steers:
            if hasattr(steer, "reset"):
                steer.reset()
        try:
            for name in self.chains:
                module = self.layers[name].module
                originals[name] = module.processor
                module.set_processor(_wrapper_class(type(module.processor))(module.processor, self.layers[name], self))
            with wrapped(self.model, "forward", self._forward):
                yield self
        finally:
            for name, processor in originals.items():
                self.layers[name].module.set_processor(processor)


@contextmanager
def steering(model: torch.nn.Module, steers: Iterable[Steer]):
    """Install ``steers`` on ``model`` for a ``with`` block; the model is restored on exit."""
    with SteeringSession(model, steers).installed() as session:
        yield session


class LayoutRecorder:
    """Steer that records each layer's token layout and q/k shapes, changing nothing."""

    def __init__(self, layers: Iterable[str]):
        self.layers, self.seen = frozenset(layers), {}

    def attention(self, call: AttentionCall, q, k, v, mask, next: Next) -> torch.Tensor:
        self.seen[call.name] = (call.layout, tuple(q.shape), tuple(k.shape))
        return next(q, k, v, mask)

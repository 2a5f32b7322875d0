"""Floor 1, the mechanism: what happens inside one attention call, and how layers are named."""

from .architectures import CROSS, JOINT, SELF, LayerInfo, TokenLayout, architecture_of, list_layers
from .core import AttentionCall, LayoutRecorder, Steer, SteeredProcessor, SteeringSession, patched_attribute, steering, wrapped
from .heads import HeadSet, HeadSetFile, resolve_heads
from .maps import AttentionMapCapture, attention_maps, map_layers, text_attention, token_weights
from .prefix import SharedPrefix, map_rows
from .perturb import MODES, HeadPerturbation, head_weights, identity_output, image_identity

__all__ = [
    "CROSS", "JOINT", "SELF", "MODES", "AttentionCall", "HeadPerturbation", "HeadSet", "HeadSetFile",
    "LayerInfo", "LayoutRecorder", "Steer", "SteeredProcessor", "SteeringSession", "TokenLayout", "architecture_of",
    "head_weights", "identity_output", "image_identity", "list_layers", "patched_attribute",
    "resolve_heads", "steering", "wrapped", "SharedPrefix", "map_rows",
    "AttentionMapCapture", "attention_maps", "map_layers", "text_attention", "token_weights",
]

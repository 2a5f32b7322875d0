"""Head addresses: parse the ways users name heads and check them against a model.

A head is ``(layer, head)``; the layer is a stable module name (see ``list_layers``) or an integer
index into the model's perturbable (self/joint) layers in module order. Accepted forms:

- a list of ``(layer, head)`` pairs or ``"layer:head"`` strings;
- a spec string of items separated by whitespace or ``;``, each ``LAYER:HEADS`` with HEADS a
  comma list of integers, ranges ``a-b`` or ``*`` (all heads): ``"transformer_blocks.3.attn:0,5 7:*"``;
- a dict ``{layer: [heads]}``;
- the path of a head-set JSON file (``{"model", "heads", "mode", "u", "w", ...}``), as the head search
  writes it; its ``heads`` use the forms above.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .architectures import JOINT, SELF, LayerInfo

HeadSet = dict[str, tuple[int, ...]]


@dataclass
class HeadSetFile:
    """The contents of a head-set JSON file."""

    heads: list
    model: str | None = None
    revision: str | None = None
    mode: str | None = None
    u: float | None = None
    w: float | None = None
    objective: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> "HeadSetFile":
        """Read ``path``; ValueError naming the file when it is missing or not a head-set JSON object."""
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"head-set file {path!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"head-set file {path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(data, dict) or "heads" not in data:
            raise ValueError(f"head-set file {path!r} must be a JSON object with a 'heads' entry")
        known = {k: data.pop(k) for k in ("heads", "model", "revision", "mode", "u", "w", "objective") if k in data}
        return cls(**known, extra=data)

    def save(self, path: str) -> None:
        data = {k: getattr(self, k) for k in ("model", "revision", "mode", "u", "w", "objective", "heads")}
        with open(path, "w") as f:
            json.dump({**data, **self.extra}, f, indent=1)


def _items(spec) -> list[tuple[object, str]]:
    """(layer, heads-text) pairs from any accepted form, not yet checked."""
    if isinstance(spec, str):
        items = []
        for token in spec.replace(";", " ").split():
            layer, sep, heads = token.rpartition(":")
            if not sep or not layer:
                raise ValueError(f"head spec item {token!r} is not LAYER:HEADS (e.g. 'transformer_blocks.3.attn:0,5')")
            items.append((layer, heads))
        return items
    if isinstance(spec, dict):
        return [(layer, ",".join(map(str, heads)) if not isinstance(heads, str) else heads) for layer, heads in spec.items()]
    items = []
    for entry in spec:
        if isinstance(entry, str):
            items.extend(_items(entry))
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            items.append((entry[0], str(entry[1])))
        else:
            raise ValueError(f"head {entry!r} is neither a (layer, head) pair nor a 'layer:head' string")
    return items


def layer_name(layer, names: list[str], layers: dict[str, LayerInfo]) -> str:
    """The name of a self/joint attention layer given by name or by index into ``names``; ValueError otherwise."""
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if isinstance(layer, int):
        if not 0 <= layer < len(names):
            raise ValueError(f"layer index {layer} is out of range: the model has {len(names)} self/joint attention layers (0-{len(names) - 1})")
        return names[layer]
    if layer not in layers:
        sample = ", ".join(names[:3])
        raise ValueError(
            f"unknown layer {layer!r}: allowed are the model's {len(names)} self/joint attention layers "
            f"by name (e.g. {sample}) or by index 0-{len(names) - 1}"
        )
    if layers[layer].kind not in (SELF, JOINT):
        raise ValueError(f"layer {layer!r} is {layers[layer].kind}-attention; only self- or joint-attention layers are allowed")
    return layer


def _head_numbers(text: str, layer: LayerInfo, item: str) -> list[int]:
    """The heads that ``text`` (the HEADS of spec item ``item``) names on ``layer``."""
    if not text.strip():
        raise ValueError(f"head spec item {item!r} names no heads: HEADS is a comma list of integers, ranges a-b or '*'")
    if text.strip() == "*":
        return list(range(layer.heads))
    heads = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if dash else [int(lo)]
        except ValueError:
            raise ValueError(f"head {part!r} of layer {layer.name!r} is not an integer, a range a-b or '*'") from None
        if not span:
            raise ValueError(f"head spec item {item!r}: range {part.strip()!r} is reversed; ranges are a-b with a <= b")
        heads.extend(span)
    for head in heads:
        if not 0 <= head < layer.heads:
            raise ValueError(f"head {head} of layer {layer.name!r} is out of range: it has {layer.heads} heads (0-{layer.heads - 1})")
    return heads


def resolve_heads(spec, layers: dict[str, LayerInfo]) -> HeadSet:
    """Check ``spec`` against a model's ``layers`` and return ``{layer name: sorted heads}``.

    Raises ValueError naming the bad layer or head and what is allowed.
    """
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".json"):
        spec = HeadSetFile.load(str(spec)).heads
    names = [n for n, info in layers.items() if info.kind in (SELF, JOINT)]
    result: dict[str, set[int]] = {}
    for layer, heads in _items(spec):
        name = layer_name(layer, names, layers)
        result.setdefault(name, set()).update(_head_numbers(heads, layers[name], f"{layer}:{heads}"))
    return {name: tuple(sorted(result[name])) for name in names if name in result}


"""Shapes scenes: a procedural data set, a detector with no learned weights, and
metrics for attention-steering methods (missing objects, colour leakage, subject
fusion, subject consistency)."""

from .detect import Detection, classify_shape, detect
from .metrics import (attribute_match, caption_concepts, parse_caption, rate, score,
                      score_frames, subject, summarize, wilson)
from .prompts import prompt_set
from .scene import (COLOURS, PALETTE, SHAPES, TEXTURES, ObjectSpec, caption, draw,
                    draw_objects, render)

__all__ = [
    "COLOURS", "PALETTE", "SHAPES", "TEXTURES", "Detection", "ObjectSpec",
    "attribute_match", "caption", "caption_concepts", "classify_shape", "detect", "draw", "draw_objects",
    "parse_caption", "prompt_set", "rate", "render", "score", "score_frames", "subject",
    "summarize", "wilson",
]

"""The attention methods of one pipeline call: A-STAR, IR-Diffusion, map recording and block-sparse
attention, from keyword arguments."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from attnsteer.attention_processors import steering

from .astar import ASTAR_DEFAULTS, astar_guidance
from .maps import MAPS_DEFAULTS, AttentionMaps, map_recorder
from .parent import denoiser
from .sparse import SPARSE_DEFAULTS, sparse_steer
from .story import STORY_DEFAULTS, segmented_masks, story_guidance
from .tokens import TEXT_FAMILIES, text_rule

OPTIONS = {**ASTAR_DEFAULTS, **MAPS_DEFAULTS, **STORY_DEFAULTS, **SPARSE_DEFAULTS}


SWITCHES = {"astar_tokens": ASTAR_DEFAULTS, "return_attention_maps": MAPS_DEFAULTS, "story_subjects": STORY_DEFAULTS}


def pop_arguments(kwargs: dict) -> dict:
    """Remove and return the attention-method keyword arguments from a call's ``kwargs``; ValueError for
    an option given without the argument that turns its method on (it would silently do nothing)."""
    methods = {name: kwargs.pop(name) for name in list(kwargs) if name in OPTIONS}
    for switch, group in SWITCHES.items():
        given = [name for name in methods if name in group and name != switch]
        if methods.get(switch) is None and given:
            raise ValueError(f"{given[0]} acts only with {switch}, which is not given")
    sparse = methods.get("sparsity") is not None or methods.get("sparse_mask", "draft") != "draft"
    given = [name for name in methods if name in SPARSE_DEFAULTS and name != "sparsity"]
    if not sparse and given:
        raise ValueError(f"{given[0]} acts only with sparsity (or sparse_mask 'radial' or 'tile'), which is not given")
    return methods


MAP_METHODS = {"astar_tokens": "A-STAR", "return_attention_maps": "return_attention_maps"}  # IR-Diffusion: its own check


def check_text_maps(pipe, options: dict) -> None:
    """ValueError naming the first asked method that reads text-token maps where ``pipe`` has none."""
    asked = [label for switch, label in MAP_METHODS.items() if options.get(switch) is not None]
    if asked and text_rule(pipe) is None:
        raise ValueError(f"{asked[0]} needs the attention maps of text tokens, which attnsteer reads on the "
                         f"{TEXT_FAMILIES} pipelines (text-to-image and editing), not on {type(pipe).__name__}")


class AttentionMethods:
    """A-STAR, IR-Diffusion, map recording and block-sparse attention of one call (checked when built,
    before compute). Attached outside head perturbation, A-STAR outermost, so that A-STAR's gradient
    passes and latent updates see the pipeline's own denoiser calls and the recorder sees the updated
    latents; the sparse steer is installed last, which puts it last in each layer's chain, where it
    replaces the dense attention every other steer ends in."""

    def __init__(self, pipe, arguments: dict, options: dict):
        self.pipe = pipe
        check_text_maps(pipe, options)
        self.story = story_guidance(pipe, arguments, {k: v for k, v in options.items() if k in STORY_DEFAULTS})
        self.astar = astar_guidance(pipe, arguments, {k: v for k, v in options.items() if k in ASTAR_DEFAULTS})
        self.recorder = map_recorder(pipe, arguments, {k: v for k, v in options.items() if k in MAPS_DEFAULTS})
        self.sparse = sparse_steer(pipe, arguments, {k: v for k, v in options.items() if k in SPARSE_DEFAULTS})
        self.segmenter = options.get("story_segmenter") if self.story is not None else None
        self.subjects = options.get("story_subjects")

    def segment(self, parent_call, kwargs: dict) -> None:
        """IR's subject masks from ``story_segmenter`` on a first pass of the parent pipeline, when asked."""
        if self.segmenter is not None:
            self.story.fix_masks(segmented_masks(parent_call, kwargs, self.segmenter, self.subjects))

    @property
    def active(self) -> bool:
        return any(m is not None for m in (self.astar, self.recorder, self.story, self.sparse))

    @contextmanager
    def attached(self, branch_info):
        model, scheduler = denoiser(self.pipe), self.pipe.scheduler
        with ExitStack() as stack:
            if self.story is not None:
                stack.enter_context(self.story.attached(model, scheduler, branch_info))
            if self.recorder is not None:
                stack.enter_context(self.recorder[0].attached(model, scheduler, branch_info))
            if self.astar is not None:
                stack.enter_context(self.astar.attached(model, scheduler, branch_info))
            for sparse_model in self.pipe.steer_denoisers().values() if self.sparse is not None else ():
                stack.enter_context(steering(sparse_model, [self.sparse]))
            yield self

    def finish(self, output):
        """The pipeline's output, with ``attention_maps`` when maps were asked for."""
        if self.recorder is None:
            return output
        recorder, labels = self.recorder
        rows = 0 if recorder.maps is None else recorder.maps.shape[0]
        maps = AttentionMaps(recorder.maps, [row for row in labels for _ in range(rows // len(labels))],
                             recorder.layers, recorder.grid, recorder.steps)
        if isinstance(output, tuple):
            return (*output, maps)
        output.attention_maps = maps
        return output

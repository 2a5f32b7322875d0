"""IR-Diffusion as keyword arguments of the SD, SDXL and SD3 steer pipelines, checked before compute.

    out = pipe("a red circle and a blue square on a beach", story_subjects=["a red circle", "a blue square"],
               generator=torch.Generator().manual_seed(0))
    references, targets = out.images[:2], out.images[2:]

The call draws each subject alone (a reference) and every scene (``prompt``: one or a list) in one
batch, [references..., scenes...]; row k gets the seed of the given generator plus k, so a reference
is the picture its subject prompt gives alone with that seed and a scene the picture its prompt gives
alone with its own (the rows an independent generation is paired with). The authors start every
reference from one noise: pass a list of generators, one per row, to do so. Keyword arguments
(``STORY_DEFAULTS``):
    story_subjects: the subject prompts ("a red circle"); None: no IR (the parent pipeline).
    story_words: per subject, the words naming it in its prompt and in every scene; default: the
        subject prompt without a leading article ("red circle").
    story_masks: fixed subject masks instead of the maps: [rows, subjects, H, W] values in [0, 1],
        rows = references then scenes, any resolution.
    story_segmenter: masks from a segmenter instead of the maps, as the authors' GroundingDINO + SAM:
        ``segmenter(images, subjects)`` gets the PIL images of the rows drawn first without IR (the
        parent pipeline at the same seeds) and returns their ``story_masks``; the IR pass follows,
        so the call costs two. ``attnsteer.guidance.shapes.segment_subjects`` serves the shapes models.
        With the maps' masks, which overlap where a subject's map spreads, the authors' isolation bars
        a token inside two subjects from every key inside either: on the shipped shapes models that
        takes the objects away (BENCHMARKS.md); give a segmenter, or story_isolation=False.
    story_isolation, story_reposition: the two mechanisms (True); story_read: targets read the
        references, on self-attention and by mutual cross-attention (True; False: isolation only).
        story_reposition=False reads the references' tokens where they sit (shared attention, as ConsiStory).
    story_isolate_layers, story_read_layers: self-attention layer names; default: every one for
        isolation, the decoder's for reading (UNet: the up blocks, on SDXL's layout from the authors'
        layer 36 of 70; SD3: the second half of the blocks).
    story_dropout: mask dropout (0.5): each query of a scene's subject is barred from reading its
        reference with this probability, drawn per token of each layer's grid at every step (the
        authors' way; ConsiStory's value); the reference boxes stay whole.
    story_mutual: mutual cross-attention lambda (0.9, the authors'; 0: off): on every cross-attention
        layer, a scene's subject i also attends to reference i's prompt, weighted lambda against its
        own. SD3 has no cross-attention layers (its text joins the self-attention), so it does not act there.

Formulas, defaults and sources: docs/methods.md, section 3.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)

from attnsteer.attention_processors import CROSS, JOINT, SELF, list_layers, map_layers
from attnsteer.attention_processors.subjects import check_subject_layers
from attnsteer.guidance.story import SubjectConsistency

from .astar import check_flag, latent_size
from .parent import denoiser
from .tokens import word_indices

STORY_DEFAULTS = dict(
    story_subjects=None, story_words=None, story_masks=None, story_isolation=True, story_reposition=True,
    story_read=True, story_isolate_layers=None, story_read_layers=None, story_dropout=0.5, story_segmenter=None,
    story_mutual=0.9,
)
ARTICLES = ("a ", "an ", "the ")
SUPPORTED = (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline)


def default_word(subject: str) -> str:
    text = subject.strip()
    for article in ARTICLES:
        if text.lower().startswith(article):
            return text[len(article):].strip()
    return text


def self_layers(model: torch.nn.Module) -> list[str]:
    """The model's self- and joint-attention layers, in module order."""
    return [n for n, info in list_layers(model).items() if info.kind in (SELF, JOINT)]


# The authors read from self-attention layer 36 on, of the 70 of the SDXL UNet they run (call order:
# 24 down, 10 mid, 36 up): the up blocks without their first two layers.
SDXL_LAYOUT, AUTHORS_FIRST_READ = (70, 36), 36  # (self-attention layers, of them in the up blocks); first read


def decoder_layers(model: torch.nn.Module) -> list[str]:
    """Self-attention layers of the decoder half: a UNet's up blocks (on SDXL's layout the authors'
    layers 36-69 in call order), else the second half of the blocks."""
    own = self_layers(model)
    up = [n for n in own if n.startswith("up_blocks.")]
    if not up:
        return own[len(own) // 2:]
    order = [n for n in own if n.startswith("down_blocks.")] + [n for n in own if n.startswith("mid_block.")] + up
    if (len(order), len(up)) == SDXL_LAYOUT:
        return order[AUTHORS_FIRST_READ:]
    return up


def expand_story(kwargs: dict, options: dict) -> dict:
    """The parent call's keyword arguments with the references put before the scenes: prompt, and
    one generator per row (seed + row) from a single generator; ValueError on what cannot be expanded."""
    subjects = options.get("story_subjects")
    if subjects is None:
        return kwargs
    if (not isinstance(subjects, (list, tuple)) or not subjects
            or not all(isinstance(s, str) and s.strip() for s in subjects)):
        raise ValueError(f"story_subjects must be a non-empty list of subject prompts, e.g. ['a red circle', "
                         f"'a blue square'], got {subjects!r}")
    twice = next((s for i, s in enumerate(subjects) if s in subjects[:i]), None)
    if twice is not None:
        raise ValueError(f"story_subjects gives {twice!r} twice; give each subject once")
    scenes = kwargs.get("prompt")
    scenes = [scenes] if isinstance(scenes, str) else scenes
    if not isinstance(scenes, (list, tuple)) or not scenes or not all(isinstance(s, str) for s in scenes):
        raise ValueError(f"story_subjects needs the scene prompt(s) as prompt (a string or a list), got {scenes!r}")
    for name in ("prompt_embeds", "prompt_2", "prompt_3"):
        if kwargs.get(name) is not None:
            raise ValueError(f"story_subjects builds the prompts of the references itself: {name} cannot be given")
    if not isinstance(kwargs.get("negative_prompt") or "", str):
        raise ValueError("with story_subjects, negative_prompt must be one string (it is used for every row)")
    if kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError(f"with story_subjects, num_images_per_prompt must be 1 (give several scenes instead), "
                         f"got {kwargs['num_images_per_prompt']!r}")
    rows = len(subjects) + len(scenes)
    generator = kwargs.get("generator")
    if generator is None and options.get("story_segmenter") is not None and kwargs.get("latents") is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))  # both passes, the same noise
    if isinstance(generator, torch.Generator):
        seed = generator.initial_seed()
        generator = [torch.Generator(generator.device).manual_seed(seed + k) for k in range(rows)]
    elif isinstance(generator, (list, tuple)) and len(generator) != rows:
        raise ValueError(f"with story_subjects, generator must be one generator or a list of {rows} "
                         f"({len(subjects)} references + {len(scenes)} scenes), got {len(generator)}")
    return {**kwargs, "prompt": list(subjects) + list(scenes), "generator": generator}


def story_guidance(pipe, arguments: dict, options: dict) -> SubjectConsistency | None:
    """IR-Diffusion of one call from its (expanded) arguments and keyword options, or None (off)."""
    o = {**STORY_DEFAULTS, **options}
    for name in ("story_isolation", "story_reposition", "story_read"):
        check_flag(name, o[name])
    dropout, mutual = o["story_dropout"], o["story_mutual"]
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"story_dropout {dropout!r} must be a number in [0, 1)")
    if not isinstance(mutual, (int, float)) or isinstance(mutual, bool) or not 0 <= mutual <= 1:
        raise ValueError(f"story_mutual {mutual!r} must be a number in [0, 1] (the mutual cross-attention "
                         "lambda; 0: off)")
    subjects = o["story_subjects"]
    if subjects is None:
        return None
    model = denoiser(pipe)
    if not isinstance(model, (UNet2DConditionModel, SD3Transformer2DModel)):
        raise ValueError(f"story_subjects: IR-Diffusion runs on the SD, SDXL and SD3 denoisers, not on "
                         f"{type(pipe).__name__}'s {type(model).__name__} (its rotary positions would make "
                         "repositioned keys wrong)")
    if not isinstance(pipe, SUPPORTED):
        raise ValueError(f"story_subjects: IR-Diffusion runs on the text-to-image pipelines, not on "
                         f"{type(pipe).__name__} (it draws its references from noise beside the scenes, in one "
                         "batch, where an editing or ControlNet pipeline ties every row to one input picture)")
    prompts = arguments["prompt"]
    count, rows = len(subjects), len(prompts)
    words = o["story_words"] or [default_word(s) for s in subjects]
    if not isinstance(words, (list, tuple)) or len(words) != count or not all(isinstance(w, str) for w in words):
        raise ValueError(f"story_words must be one word (or phrase) per subject ({count}), got {words!r}")
    groups = []
    for row, prompt in enumerate(prompts):
        held = [row] if row < count else range(count)
        found = []
        for s, word in enumerate(words):
            if s not in held:
                found.append([])
                continue
            try:
                found.append(word_indices(pipe, arguments, word, row))
            except ValueError:
                where = f"subject prompt {row}" if row < count else f"scene {row - count}"
                raise ValueError(f"story_words: the word {word!r} of subject {s} is not in {where} {prompt!r}; "
                                 f"name each subject with words its prompt and every scene contain (story_words)") from None
        groups.append(found)
    isolate = o["story_isolate_layers"] or self_layers(model)
    read = (o["story_read_layers"] or decoder_layers(model)) if o["story_read"] else []
    crossed = [n for n, info in list_layers(model).items() if info.kind == CROSS] if o["story_read"] and mutual else []
    check_subject_layers(model, isolate, read, crossed)
    masks, segmenter = o["story_masks"], o["story_segmenter"]
    if segmenter is not None and not callable(segmenter):
        raise ValueError(f"story_segmenter must be a function segmenter(images, subjects) -> masks, got {segmenter!r}")
    if segmenter is not None and masks is not None:
        raise ValueError("give story_masks or story_segmenter, not both")
    masks = None if masks is None else checked_masks(masks, rows, count, "story_masks")
    layers, _ = map_layers(model, latent_size(pipe, arguments))
    sources = [[-1] * count if row < count else list(range(count)) for row in range(rows)]
    seed = arguments["generator"][0].initial_seed() if isinstance(arguments.get("generator"), list) else 0
    return SubjectConsistency(groups, sources, isolate, read, layers, masks=masks, dropout=float(dropout),
                              seed=seed, isolation=o["story_isolation"], reposition=o["story_reposition"],
                              mutual_layers=crossed, mutual=float(mutual))


def checked_masks(masks, rows: int, count: int, name: str) -> torch.Tensor:
    """Subject masks [rows, subjects, H, W] as bool (values >= 0.5); ValueError naming ``name`` otherwise."""
    masks = torch.as_tensor(np.asarray(masks, dtype=np.float32))
    if masks.dim() != 4 or masks.shape[:2] != (rows, count):
        raise ValueError(f"{name} must be [rows, subjects, H, W] = [{rows}, {count}, H, W] "
                         f"(references then scenes), got shape {tuple(masks.shape)}")
    if not 0 <= masks.min() <= masks.max() <= 1:  # NaN fails the comparison too
        raise ValueError(f"{name} values must lie in [0, 1]")
    return masks >= 0.5


def keeping_images(segmenter):
    """``segmenter`` that also keeps the images it is given in its ``images`` list: the rows of the call
    drawn without IR at the call's seeds, which a comparison with independent generation can reuse
    instead of drawing them again."""
    def segment(images, subjects):
        segment.images[:] = images
        return segmenter(images, subjects)

    segment.images = []
    return segment


def segmented_masks(parent_call, kwargs: dict, segmenter, subjects: list[str]) -> torch.Tensor:
    """``story_segmenter``'s masks of the rows of a story call, drawn first by the parent pipeline at the
    call's seeds (the generators are rewound after, so the IR pass starts from the same noise)."""
    generators = kwargs.get("generator")
    generators = [] if generators is None else generators
    states = [g.get_state() for g in generators]
    plain = {k: v for k, v in kwargs.items() if k not in ("callback", "callback_steps")}
    images = parent_call(**{**plain, "output_type": "pil", "return_dict": True, "callback_on_step_end": None}).images
    for generator, state in zip(generators, states):
        generator.set_state(state)
    return checked_masks(segmenter(images, list(subjects)), len(images), len(subjects), "story_segmenter's masks")

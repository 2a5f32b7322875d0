"""The ``attnsteer`` command line: ``generate`` pictures (or a ``video``) with steering, ``edit`` a picture, ``eval`` them on
shapes prompts, ``search-heads`` (HeadHunter), draw a ``story`` (IR-Diffusion), list a model's ``layers``.

Every argument that can be checked without the model is checked before it is loaded; nothing here
imports torch or diffusers until a command runs, so ``attnsteer --help`` is instant."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import sys
import tempfile
from pathlib import Path

TINY_PREFIX = "tiny-"
TINY_KINDS = ("sd", "sdxl", "sd3", "flux", "wan", "chroma", "flux2", "flux2dev", "qwenimage", "zimage", "cogvideox", "ltx", "hunyuanvideo15")  # tiny.KINDS + FAMILY_KINDS, without importing diffusers
TINY_CALL = {"height": 32, "width": 32}  # a size every tiny model draws quickly
TINY_FRAMES = {"wan": 9, "cogvideox": 5, "ltx": 5, "hunyuanvideo15": 5}  # frames of a tiny video model's call
SHIPPED = ("shapes-sd", "shapes-sd3", "shapes-wan")  # small models trained on drawn shapes, in samples/models
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "samples" / "models"
DEFAULT_MODEL, DEFAULT_VIDEO_MODEL = "shapes-sd", "shapes-wan"
GIF_FRAME_MS = 125  # 8 frames per second
STRIP_FRAMES = 6  # frames of a video's strip picture
KNOWN = (*SHIPPED, *(TINY_PREFIX + k for k in TINY_KINDS))
# API keyword -> command-line flag, so that errors raised by the Python API name what the user typed
FLAGS = {"perturbed_heads": "--heads", "perturbation_scale": "--scale", "softpag_u": "--u",
         "perturbation_mode": "--mode", "perturbation_window": "--window", "perturbation_batching": "--batching",
         "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "astar_tokens": "--astar",
         "astar_scale": "--astar-scale", "astar_steps": "--astar-steps", "astar_weights": "--astar-weights",
         "return_attention_maps": "--words", "attention_maps_steps": "--maps-steps",
         "attention_maps_layers": "--maps-layers", "story_subjects": "--subject", "story_words": "--words",
         "sparsity": "--sparsity", "sparse_mask": "--sparse-mask", "sparse_pool": "--sparse-pool",
         "sparse_backend": "--sparse-backend", "sparse_dense_steps": "--sparse-dense-steps",
         "fifo_partitions": "--fifo-partitions", "num_frames": "--frames", "ouroboros_subjects": "--ouroboros-subjects",
         "ouroboros_guidance": "--ouroboros-guidance", "height": "--height", "width": "--width",
         "story_mutual": "--mutual"}


# Options that act only with a method: option -> (the option that turns the method on, how to name it); checked
# on the commands that have that option (search-heads' own --scale and --u need no --heads)
NEEDS = {
    **dict.fromkeys(("scale", "u", "mode", "window", "batching"), ("heads", "--heads")),
    **dict.fromkeys(("astar_scale", "astar_steps", "astar_weights", "astar_checkpointing"), ("astar", "--astar")),
    **dict.fromkeys(("sparse_pool", "sparse_backend", "sparse_dense_steps"),
                    ("sparsity", "--sparsity or --sparse-mask radial|tile")),
    **dict.fromkeys(("ouroboros_guidance", "no_cross_frame"), ("ouroboros_subjects", "--ouroboros-subjects")),
    **dict.fromkeys(("screen_items", "screen_steps"), ("halving_keep", "--halving-keep (successive halving)")),
}
NOT_WITH = {"mutual": ("no_read", "--no-read turns reading off, mutual cross-attention included"),
            "no_reposition": ("no_read", "--no-read turns reading off, repositioned or not")}
FIFO_OPTIONS = ("fifo_partitions", "no_lookahead", "ouroboros_tail", "ouroboros_subjects")  # act only when FIFO runs


class UsageError(ValueError):
    """A command-line argument that cannot work; reported as ``attnsteer COMMAND: message``."""


def model_path(model: str) -> str:
    """The folder or hub id to load ``model`` from. Refuses, without any hub access, a name that is
    neither a local folder, a shipped or tiny model, nor a hub id (org/name) that can be had."""
    if model in SHIPPED:
        folder = SHIPPED_DIR / model
        if not (folder / "model_index.json").is_file():
            raise UsageError(f"shipped model {model!r} not found at {folder}: it lives in the attnsteer repository's "
                             f"samples/models (install from a clone), or pass --model PATH")
        return str(folder)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"--model {model}: the folder has no model_index.json, so it is not a diffusers pipeline")
        return str(path)
    if path.exists():
        raise UsageError(f"--model {model}: is a file; give a diffusers pipeline folder or hub id")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model) or model.startswith((".", "/", "~")):
        close = difflib.get_close_matches(model, KNOWN, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise UsageError(f"--model {model!r} is neither a local folder nor a known name ({', '.join(KNOWN)}), "
                         f"and not a hub id of the form org/name.{hint}")
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    if is_offline_mode() and not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        raise UsageError(f"--model {model!r} is not a local folder nor a known name, and the hub id is not in the "
                         "local Hugging Face cache; HF_HUB_OFFLINE is set, so it cannot be downloaded")
    return model


def load_pipeline(model: str, device: str, dtype: str):
    """(An attnsteer pipeline for a model id, a local diffusers folder, or ``tiny-<kind>`` (random weights),
    whether it makes videos)."""
    import torch
    from diffusers import DiffusionPipeline

    from .steer import steer_pipeline

    if model.startswith(TINY_PREFIX):
        from .tiny import PIPELINE_CLASSES, tiny_pipeline

        kind = model[len(TINY_PREFIX):]
        if kind not in TINY_KINDS:
            raise UsageError(f"unknown tiny model {model!r}; choose one of {', '.join(TINY_PREFIX + k for k in TINY_KINDS)}")
        pipe = tiny_pipeline(kind, steer_pipeline(PIPELINE_CLASSES[kind]))
        pipe.call_defaults = dict(TINY_CALL, **({"num_frames": TINY_FRAMES[kind]} if kind in TINY_FRAMES else {}))
        pipe.set_progress_bar_config(disable=False)
        if dtype != "float32":
            pipe.to(getattr(torch, dtype))
    else:
        import diffusers

        source = model_path(model)
        try:
            class_name = DiffusionPipeline.load_config(source)["_class_name"]
            parent = getattr(diffusers, class_name, None)
            try:
                cls = steer_pipeline(parent)
            except ValueError as error:
                raise UsageError(f"--model {model}: pipeline class {class_name} cannot be steered: {error}") from None
            pipe = cls.from_pretrained(source, dtype=getattr(torch, dtype))
        except OSError as error:
            raise UsageError(f"--model {model}: could not be loaded: {error}") from None
    if device == "cuda":  # under accelerate / torchrun, each process its own GPU
        from attnsteer.guidance.distributed import process_state

        device = process_state().device
    from .frames import temporal_factor

    return pipe.to(device), temporal_factor(pipe) is not None


def _is_wan(pipe) -> bool:
    """Wan's pipeline, whose num_frames gains a frame at temporal factor 1 and which FIFO-Diffusion runs on."""
    from diffusers import WanPipeline

    return isinstance(pipe, WanPipeline)


def _save(result, is_video: bool, out: Path, stem: str) -> list[Path]:
    """Write a pipeline's PIL output as PNGs, one per image or video frame, and each video as an
    animated GIF enlarged to be seen and a strip of evenly spaced frames (seen without a GIF viewer)."""
    from .evaluate import enlarged, frame_strip

    out.mkdir(parents=True, exist_ok=True)
    named = [(_frame(f"{stem}_{v}", f), frame) for v, video in enumerate(result.frames) for f, frame in enumerate(video)] \
        if is_video else [(f"{stem}_{i}", image) for i, image in enumerate(result.images)]
    for name, picture in named:
        picture.save(out / f"{name}.png")
    paths = [out / f"{name}.png" for name, _ in named]
    for v, video in enumerate(result.frames if is_video else []):
        shown = [enlarged(frame) for frame in video]
        shown[0].save(out / f"{stem}_{v}.gif", save_all=True, append_images=shown[1:], duration=GIF_FRAME_MS, loop=0)
        frame_strip(video, STRIP_FRAMES).save(out / f"{stem}_{v}_strip.png")
        paths += [out / f"{stem}_{v}.gif", out / f"{stem}_{v}_strip.png"]
    return paths


def _frame(stem: str, index: int) -> str:
    """A video frame's file stem: one scheme for every video command (FIFO's long videos included)."""
    return f"{stem}_frame{index:04d}"


def _steering(args) -> dict:
    """The head perturbation keyword arguments of the command line."""
    return dict(perturbed_heads=args.heads, perturbation_scale=args.scale, softpag_u=args.u,
                perturbation_mode=args.mode, perturbation_window=tuple(args.window or (0.0, 1.0)),
                perturbation_batching=args.batching or "batched")


def _astar(args):
    """A-STAR's keyword arguments for a list of prompts, from ``--astar`` and its options; None when off.
    ``nouns`` / ``objects`` take each shapes prompt's objects ('circle' / 'red circle'); any other value
    is a comma list of words that every prompt holds."""
    if args.astar is None:
        return None
    options = {name: tuple(value) if isinstance(value, list) else value for name, value in (
        ("astar_scale", args.astar_scale), ("astar_steps", args.astar_steps), ("astar_weights", args.astar_weights),
        ("astar_checkpointing", args.astar_checkpointing or None)) if value is not None}
    if args.astar in ("nouns", "objects"):
        from attnsteer.guidance.shapes import caption_concepts

        def concepts(prompt):
            return caption_concepts(prompt, colour=args.astar == "objects")
    else:
        words = [word.strip() for word in args.astar.split(",") if word.strip()]

        def concepts(prompt):
            return words
    return lambda prompts: {"astar_tokens": [concepts(p) for p in prompts], **options}


def _sparse(args) -> dict:
    """Block-sparse attention's keyword arguments from ``--sparsity`` / ``--sparse-mask``; {} when off."""
    mask = getattr(args, "sparse_mask", "draft")
    if getattr(args, "sparsity", None) is None and mask == "draft":
        return {}
    options = dict(sparsity=args.sparsity, sparse_mask=mask, sparse_backend=args.sparse_backend or "auto")
    if args.sparse_pool is not None:
        options["sparse_pool"] = tuple(args.sparse_pool)
    if args.sparse_dense_steps is not None:
        options["sparse_dense_steps"] = args.sparse_dense_steps
    return options


def _method(args):
    """(name, keyword arguments or a function of the prompts giving them) of the steering asked for, or None."""
    sparse = _sparse(args)
    parts = [name for name, on in (("heads", args.heads), ("astar", args.astar), ("sparse", sparse)) if on]
    if not parts:
        return None
    astar = _astar(args)
    steering = {**(_steering(args) if args.heads else {}), **sparse}
    return "+".join(parts), (lambda prompts: {**steering, **astar(prompts)}) if astar else steering


def _single(kwargs, prompt: str) -> dict:
    """A method's keyword arguments for one prompt given as a string."""
    if not callable(kwargs):
        return kwargs
    one = kwargs([prompt])
    return {**one, "astar_tokens": one["astar_tokens"][0]} if "astar_tokens" in one else one


def _call(args, pipe, default_steps: int) -> dict:
    """Pipeline call arguments: the model's call defaults, then the command line's size, frames, steps and CFG.
    --frames counts the frames that come out; num_frames is WanPipeline's, which adds one at temporal factor 1."""
    from .frames import temporal_factor

    frames = getattr(args, "frames", None)
    if frames is not None and temporal_factor(pipe) is None:
        raise UsageError(f"--frames {frames}: {args.model} is an image model; --frames is for video models")
    call = dict(pipe.call_defaults)
    for name, flag in (("height", "height"), ("width", "width"), ("guidance_scale", "guidance_scale"),
                       ("num_inference_steps", "steps")):
        if getattr(args, flag, None) is not None:
            call[name] = getattr(args, flag)
    if frames is not None:
        from .frames import check_frames, parent_frames

        try:
            check_frames("--frames", frames, temporal_factor(pipe))
        except ValueError as error:
            raise UsageError(str(error)) from None
        call["num_frames"] = parent_frames(frames, pipe.vae_scale_factor_temporal) if _is_wan(pipe) else frames
    call.setdefault("num_inference_steps", default_steps)
    return call


def _label(args) -> str:
    """What a steered picture shows, for its label: the methods and the options given."""
    words = []
    if args.heads:
        words += [f"heads {args.heads}", *(f"{flag} {value:g}" for flag, value in (("w", args.scale), ("u", args.u))
                                           if value is not None), *([args.mode] if args.mode else [])]
    if args.astar:
        words += [f"A-STAR {args.astar}", *([f"alpha {args.astar_scale:g}"] if args.astar_scale is not None else [])]
    sparse = _sparse(args)
    if sparse:
        words.append(f"sparsity {sparse['sparsity']:g}" if sparse["sparse_mask"] == "draft" else f"{sparse['sparse_mask']} mask")
    return " ".join(words) or "output"


def generate(args) -> None:
    import torch

    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    if args.command == "video" and not is_video:
        raise UsageError(f"--model {args.model} is an image model; `attnsteer video` needs a video model, e.g. "
                         f"{DEFAULT_VIDEO_MODEL} (or use `attnsteer generate`)")
    edit = {}
    if args.command == "edit":
        pipe, edit = _editing(args, pipe, is_video)
    if args.command == "video" and args.image is not None:
        edit = _first_frame(args, pipe)
    call = dict(_call(args, pipe, 28), prompt=args.prompt, output_type="pil", **edit)
    call.update(_negative_prompt(args, pipe, call))
    method = _method(args)
    from .frames import WAN_TRAINED_FRAMES, trained_frames, wan_frames

    clip, long = None, False
    if _is_wan(pipe):  # beyond the model's clip FIFO-Diffusion runs, whose num_frames is the frames that come out
        factor = pipe.vae_scale_factor_temporal
        clip = trained_frames(pipe.call_defaults, factor)
        frames = wan_frames(call.get("num_frames", WAN_TRAINED_FRAMES), factor)
        long = frames > clip
        if long:
            call["num_frames"] = frames
    given = [_flag(name) for name in FIFO_OPTIONS if args.command == "video" and _given(args, name)]
    if given and not _is_wan(pipe):
        raise UsageError(f"{given[0]} acts on FIFO-Diffusion, which runs on Wan pipelines, not on "
                         f"{type(pipe).__bases__[-1].__name__}")
    if given and not long:
        raise UsageError(f"{given[0]} acts on FIFO-Diffusion, which runs for --frames longer than the model's clip of "
                         f"{clip}")
    if args.baseline and method is None and not long:
        raise UsageError("--baseline draws the unsteered output beside a steered one: give a method too (--heads, "
                         "--astar, --sparsity or --sparse-mask), or --frames beyond the model's clip (FIFO)")
    if long:
        if method is not None:
            raise UsageError(f"--frames {call['num_frames']} is longer than the model's clip, which runs FIFO-Diffusion; "
                             f"it does not combine with {method[0]} yet")
        return long_video(args, pipe, call)
    if method is None:
        runs = [("output", {}, "output")]
    else:
        runs = [("baseline", {}, "baseline")] if args.baseline else []
        runs.append(("steered", _single(method[1], args.prompt), _label(args)))
    for _, extra, _ in runs:
        pipe.check_call(**call, **extra)
    firsts = []
    for name, extra, _ in runs:
        generator = torch.Generator(args.device).manual_seed(args.seed)
        result = pipe(**call, **extra, generator=generator)
        firsts.append(result.frames[0][0] if is_video else result.images[0])
        for path in _save(result, is_video, Path(args.out), f"seed{args.seed}_{name}"):
            print(path)
    if len(runs) > 1:
        from .evaluate import labelled_grid

        grid = Path(args.out) / f"seed{args.seed}_grid.png"
        labelled_grid(firsts, [label for _, _, label in runs], args.prompt).save(grid)
        print(grid)


def _first_frame(args, pipe) -> dict:
    """Image-to-video's call argument: --image, on a pipeline that takes one (an image-to-video model)."""
    from PIL import Image

    from .parent import parent_call

    if "image" not in parent_call(type(pipe)).parameters:
        raise UsageError(f"--image: --model {args.model} ({type(pipe).__bases__[-1].__name__}) is a text-to-video "
                         "model; image-to-video takes an image-to-video model, e.g. a WanImageToVideoPipeline folder")
    return {"image": Image.open(args.image).convert("RGB")}


def _editing(args, pipe, is_video: bool):
    """(the img2img steer pipeline, or with --mask the inpainting one, with --controlnet their ControlNet
    variant, on the loaded pipeline's components; the call's image arguments)."""
    import diffusers
    from PIL import Image

    from .steer import steer_pipeline

    if is_video:
        raise UsageError(f"--model {args.model} is a video model; `attnsteer edit` edits pictures")
    parent = type(pipe).__bases__[-1]
    task = ("ControlNet" if args.controlnet else "") + ("Inpaint" if args.mask else "Img2Img")
    cls = getattr(diffusers, parent.__name__.removesuffix("Pipeline") + task + "Pipeline", None)
    if cls is None:
        what = {"Img2Img": "img2img", "Inpaint": "inpainting"}[task.removeprefix("ControlNet")]
        raise UsageError(f"--model {args.model} ({parent.__name__}) has no {'ControlNet ' * bool(args.controlnet)}"
                         f"{what} pipeline in diffusers")
    extra = {"controlnet": _controlnet(args, pipe)} if args.controlnet else {}
    editing = steer_pipeline(cls).from_pipe(pipe, **extra)
    editing.set_progress_bar_config(disable=False)
    image = Image.open(args.image).convert("RGB")
    extra = {"image": image, **({"strength": args.strength} if args.strength is not None else {})}
    if args.mask:
        extra.update(mask_image=Image.open(args.mask).convert("L"), height=image.height, width=image.width)
    if args.controlnet:
        extra["control_image"] = Image.open(args.control).convert("RGB").resize(image.size)
    return editing, extra


def _controlnet(args, pipe):
    """The ControlNet of --controlnet (a diffusers ControlNet folder, or a hub id), in the pipeline's dtype
    and device, or a UsageError naming what does not fit."""
    import diffusers

    source = controlnet_path(args.controlnet)
    try:
        name = diffusers.ControlNetModel.load_config(source).get("_class_name", "")  # any model folder's config.json
    except OSError as error:
        raise UsageError(f"--controlnet {args.controlnet}: could not be loaded: {error}") from None
    cls = getattr(diffusers, name, None)
    if cls is None or "ControlNet" not in name:
        raise UsageError(f"--controlnet {args.controlnet} holds a {name or 'model of no class'}, not a diffusers "
                         "ControlNet model")
    return cls.from_pretrained(source).to(pipe.device, pipe.dtype)


def controlnet_path(value: str) -> str:
    """The folder or hub id to load --controlnet from, refused without hub access where it is neither."""
    path = Path(value).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"--controlnet {value}: the folder has no config.json, so it is not a diffusers model")
    if not path.is_dir() and (path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", value) or value.startswith((".", "/", "~"))):
        raise UsageError(f"--controlnet {value!r} is neither a ControlNet folder nor a hub id of the form org/name")
    return str(path) if path.is_dir() else value


def long_video(args, pipe, call: dict) -> None:
    """FIFO-Diffusion: each frame written as a PNG as it leaves the queue, then the animated GIF and the frame
    strip (read back from the PNGs); with --baseline also the model asked for all the frames at once."""
    import numpy as np
    import torch
    from PIL import Image

    from .evaluate import enlarged, frame_strip
    from .fifo import FIFO_PARTITIONS, OUROBOROS_GUIDANCE, fifo_pipeline
    from .frames import parent_frames

    fifo = fifo_pipeline(pipe)
    fifo.set_progress_bar_config(disable=False)
    partitions = args.fifo_partitions or FIFO_PARTITIONS
    options = dict(fifo_partitions=partitions, fifo_lookahead=not args.no_lookahead, ouroboros_tail=args.ouroboros_tail)
    fifo.check_fifo(call["num_frames"], partitions, fifo.trained_frames(), False, None, 0, call["prompt"])
    if args.ouroboros_subjects:
        guidance = OUROBOROS_GUIDANCE if args.ouroboros_guidance is None else args.ouroboros_guidance
        options.update(ouroboros_subjects=args.ouroboros_subjects, ouroboros_guidance=guidance,
                       ouroboros_cross_frame=not args.no_cross_frame)
        fifo.check_ouroboros(args.ouroboros_subjects, guidance, [call["prompt"]], call.get("max_sequence_length"),
                             partitions=partitions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = (["baseline"] if args.baseline else []) + ["fifo"]
    for name in runs:
        stem, paths = f"seed{args.seed}_{name}_0", []
        generator = torch.Generator(args.device).manual_seed(args.seed)

        def write(_, first, frames):
            for k, frame in enumerate(frames[0]):
                paths.append(out / f"{_frame(stem, first + k)}.png")
                Image.fromarray(np.uint8(np.round(frame * 255))).save(paths[-1])
                print(paths[-1])

        if name == "fifo":
            fifo(**{**call, "output_type": "np"}, **options, frame_callback=write, generator=generator)
        else:
            direct = parent_frames(call["num_frames"], pipe.vae_scale_factor_temporal)
            write(None, 0, pipe(**{**call, "num_frames": direct, "output_type": "np"}, generator=generator).frames)
        shown = [enlarged(Image.open(path)) for path in paths]
        shown[0].save(out / f"{stem}.gif", save_all=True, append_images=shown[1:], duration=GIF_FRAME_MS, loop=0)
        frame_strip([Image.open(path) for path in paths], STRIP_FRAMES).save(out / f"{stem}_strip.png")
        print(out / f"{stem}.gif")
        print(out / f"{stem}_strip.png")


def story(args) -> None:
    """References of each --subject and every --scene with IR-Diffusion, in one batch; with --baseline
    also the scenes generated independently at the same seeds (with --masks detector, the segmenter's
    first pass, which drew them)."""
    import torch

    from attnsteer.guidance.shapes import segment_subjects, subject_colours

    from .evaluate import labelled_grid
    from .story import keeping_images

    if args.masks == "detector":
        try:
            subject_colours(args.subject)
        except ValueError as error:
            raise UsageError(f"--masks detector: {error}") from None
    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    if is_video:
        raise UsageError(f"--model {args.model} is a video model; `attnsteer story` draws images (SD, SDXL, SD3)")
    call = dict(_call(args, pipe, 28), prompt=args.scene, output_type="pil")
    call.update(_negative_prompt(args, pipe, call))
    segmenter = keeping_images(segment_subjects) if args.masks == "detector" else None
    options = dict(story_subjects=args.subject, story_isolation=not args.no_isolation,
                   story_reposition=not args.no_reposition, story_read=not args.no_read,
                   **({"story_mutual": args.mutual} if args.mutual is not None else {}),
                   **({"story_words": [w.strip() for w in args.words.split(",")]} if args.words else {}),
                   **({"story_segmenter": segmenter} if segmenter else {}),
                   **(_steering(args) if args.heads else {}))
    pipe.check_call(**call, **options)
    images = pipe(**call, **options, generator=torch.Generator(args.device).manual_seed(args.seed)).images
    count = len(args.subject)
    named = [(f"seed{args.seed}_reference{i}", f"reference: {s}") for i, s in enumerate(args.subject)] + \
            [(f"seed{args.seed}_scene{j}", f"IR: {s}") for j, s in enumerate(args.scene)]
    if args.baseline:
        if segmenter:  # its first pass drew every row without IR at the same seeds
            images += segmenter.images[count:]
        else:
            generators = [torch.Generator(args.device).manual_seed(args.seed + count + j) for j in range(len(args.scene))]
            images += pipe(**call, generator=generators).images
        named += [(f"seed{args.seed}_scene{j}_independent", f"independent: {s}") for j, s in enumerate(args.scene)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image, (stem, _) in zip(images, named):
        image.save(out / f"{stem}.png")
        print(out / f"{stem}.png")
    labelled_grid(images, [label for _, label in named]).save(out / f"seed{args.seed}_story.png")
    print(out / f"seed{args.seed}_story.png")


def evaluate(args) -> None:
    from attnsteer.guidance.distributed import process_state

    from .evaluate import evaluate as run, paired_table, table, write

    from attnsteer.guidance.shapes import VIDEO_METRICS

    prompts = _prompts(args)
    _check_captions(prompts, "eval scores pictures against shapes captions")
    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    if is_video != args.video:
        raise UsageError(f"--model {args.model} is {'a video' if is_video else 'an image'} model: "
                         + ("add --video" if is_video else "--video needs a video model, e.g. shapes-wan"))
    call = dict(_call(args, pipe, 20), output_type="pil")
    methods = {"baseline": {}}
    if _method(args) is not None:
        name, kwargs = _method(args)
        methods[name] = kwargs
        pipe.check_call(prompt=prompts, **call, **(kwargs(prompts) if callable(kwargs) else kwargs))
    result = run(pipe, prompts, list(range(args.seeds)), methods, call, args.batch_size, keep_images=args.keep,
                 video=is_video)
    state = process_state()
    if state.is_main_process:
        metrics = {"metrics": VIDEO_METRICS} if is_video else {}
        print(table(result["summary"], **metrics))
        if result["paired"]:
            print(paired_table(result["paired"], "baseline", **metrics))
        config = {k: v for k, v in vars(args).items() if k != "run"}
        for path in write(result, args.out, {**config, **_used(args, pipe, call), "prompts": len(prompts),
                                             "processes": state.num_processes}):
            print(path)


def _used(args, pipe, call: dict) -> dict:
    """The values a run used where the command line left the default: steps, CFG scale, and the head
    perturbation's w, u and mode (None where no heads were given: nothing used them)."""
    from .parent import parent_call

    used = {"steps": call["num_inference_steps"],
            "guidance_scale": call.get("guidance_scale", parent_call(type(pipe)).parameters["guidance_scale"].default)}
    if args.heads:
        guidance = pipe.perturbation_guidance(**_steering(args))
        used.update(scale=guidance.scale, u=guidance.u, mode=guidance.mode)
    return used


def _prompts(args) -> list[str]:
    from attnsteer.guidance.shapes import prompt_set, video_prompt_set

    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts file {args.prompts!r} holds no prompt")
    else:
        prompts = (video_prompt_set if getattr(args, "video", False) else prompt_set)(args.set, args.split)
    return prompts[:args.limit] if args.limit else prompts


def _check_captions(prompts: list[str], why: str) -> None:
    """UsageError naming the first prompt that names no shapes object (colour and shape)."""
    from attnsteer.guidance.shapes import parse_caption

    bad = next((p for p in prompts if not parse_caption(p)), None)
    if bad is not None:
        raise UsageError(f"prompt {bad!r} names no shapes object (a colour and a shape, e.g. 'a red circle'): {why}")


def _negative_prompt(args, pipe, call: dict) -> dict:
    """The call's negative prompt argument (none for a pipeline that takes none), or a UsageError for one
    the pipeline or the call's guidance would ignore."""
    from .parent import parent_call

    takes = "negative_prompt" in parent_call(type(pipe)).parameters
    if not args.negative_prompt:
        return {"negative_prompt": None} if takes else {}
    if not takes:
        raise UsageError(f"--negative-prompt: {type(pipe).__bases__[-1].__name__} takes no negative prompt")
    from diffusers import FluxPipeline

    if isinstance(pipe, FluxPipeline):
        raise UsageError("--negative-prompt needs true CFG on FLUX (true_cfg_scale > 1, not on the command line); "
                         "FLUX's --guidance-scale is distilled guidance, which reads no negative prompt")
    scale = call.get("guidance_scale", parent_call(type(pipe)).parameters["guidance_scale"].default)
    if scale <= 1:
        raise UsageError(f"--negative-prompt acts through CFG, which is off at --guidance-scale {scale:g}; "
                         "give a scale above 1")
    return {"negative_prompt": args.negative_prompt}


def search(args) -> None:
    from attnsteer.guidance.distributed import process_state
    from attnsteer.guidance.objectives import load_objective

    from .search import read_items, run_search

    prompts = _prompts(args)
    if args.objective.startswith("shapes"):
        _check_captions(prompts, "the shapes objective scores pictures against shapes captions")
    items = read_items(prompts, args.seeds)
    objective = load_objective(args.objective, args.device)
    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    if is_video:
        raise UsageError("video pipelines are not supported yet")
    pipe.set_progress_bar_config(disable=True)
    call = _call(args, pipe, 20)
    steps = call.pop("num_inference_steps")
    pipe.perturbation_guidance(perturbation_scale=args.scale, softpag_u=args.u, perturbation_mode=args.mode)
    summary = run_search(pipe, model=args.model, revision=args.revision, objective=objective,
                         objective_name=args.objective, items=items, out=args.out, rounds=args.rounds,
                         top_k=args.top_k, layers=args.layers.split(",") if args.layers else None, w=args.scale,
                         u=args.u, mode=args.mode, steps=steps, call_kwargs=call, batch_size=args.batch_size,
                         halving_keep=args.halving_keep, screen_items=args.screen_items,
                         screen_steps=args.screen_steps)
    if process_state().is_main_process:
        baseline = summary["baseline_score"]
        print(f"baseline (no heads) score {baseline:.4f}")
        for r in summary["rounds"]:
            gain = r["gain"]
            print(f"round {r['round']}: + {' '.join(r['selected'])}  (best candidate {r['score']:.4f}, "
                  f"{gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}] over no heads, paired)")
            if all(score == baseline for score in r["scores"].values()):
                print(f"warning: in round {r['round']} every candidate scored exactly as no heads ({baseline:.4f}): "
                      "the perturbation changed no score at these settings, so the heads were picked by their order "
                      "alone; try a larger --scale, more --steps, more prompts or seeds, or another --objective")
        print(f"heads: {' '.join(summary['heads'])}")
        cost = summary["search"]
        print(f"{cost['image_steps']} image-steps ({cost['computed_image_steps']} computed now) in {cost['wall_s']} s")
        print(Path(args.out) / "heads.json")


def maps(args) -> None:
    import torch

    from .evaluate import enlarged
    from .maps import render_attention_maps

    words = [word.strip() for word in args.words.split(",") if word.strip()]
    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    if is_video:
        raise UsageError("attention maps of video pipelines are not supported yet")
    method = _method(args)
    call = dict(_call(args, pipe, 28), prompt=args.prompt, output_type="pil", return_attention_maps=words,
                attention_maps_steps=tuple(args.maps_steps), **(_single(method[1], args.prompt) if method else {}))
    if args.maps_layers:
        call["attention_maps_layers"] = [int(x) if x.strip().isdigit() else x.strip() for x in args.maps_layers.split(",")]
    pipe.check_call(**call)
    result = pipe(**call, generator=torch.Generator(args.device).manual_seed(args.seed))
    found = result.attention_maps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out / f"seed{args.seed}_image.png")
    render_attention_maps(enlarged(result.images[0]), found.maps[0], found.labels[0]).save(out / f"seed{args.seed}_maps.png")
    print(f"maps of {', '.join(found.labels[0])} at grid {tuple(found.grid)}, averaged over {len(found.layers)} "
          f"layer(s) and {len(found.steps)} step(s): {', '.join(found.layers)}")
    print(out / f"seed{args.seed}_image.png")
    print(out / f"seed{args.seed}_maps.png")


def layers(args) -> None:
    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    listed = pipe.steer_layers()
    call = {k: v for k, v in _call(args, pipe, 1).items() if k in ("height", "width", "max_sequence_length", "num_frames")}
    seen = pipe.token_layouts(prompt="a photo", **call) if args.layout else {}
    print(f"{'index':>5}  {'layer':<60} {'kind':<6} heads  layout")
    index = 0
    for name, info in listed.items():
        number = "" if info.kind == "cross" else str(index)
        index += info.kind != "cross"
        layout = ""
        if name in seen:
            lay, q, k = seen[name]
            text = "none" if lay.text is None else f"{lay.text.start}:{lay.text.stop}"
            layout = f"image {lay.image.start}:{lay.image.stop} grid {lay.grid} text {text} (q {q[2]}, k {k[2]} tokens)"
        print(f"{number:>5}  {name:<60} {info.kind:<6} {info.heads:>5}  {layout}")


def _number(kind, low=None, high=None, high_open=False, what="", low_open=False):
    """An argparse type: a finite ``kind`` number within the bounds, else a message saying what is allowed."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        above = high is not None and (value >= high if high_open else value > high)
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"{text} is not allowed: {what}")
        return value

    return parse


def _heads(text: str) -> str:
    """An argparse type: a head spec or head-set file, not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty head spec; give 'LAYER:HEADS ...' (see `attnsteer layers`) or a "
                                         "head-set JSON file")
    return text


def _words(text: str) -> str:
    """An argparse type: a comma list of words, none empty and none twice."""
    words = [word.strip() for word in text.split(",")]
    if not all(words):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of words (an empty word), e.g. 'circle,square'")
    twice = next((w for i, w in enumerate(words) if w in words[:i]), None)
    if twice is not None:
        raise argparse.ArgumentTypeError(f"{text!r} gives {twice!r} twice; give each word once")
    return text


POSITIVE = _number(int, 1, what="a whole number >= 1")
NON_NEGATIVE = _number(int, 0, what="a whole number >= 0")
FINITE = _number(float, what="a finite number")
NON_NEGATIVE_FLOAT = _number(float, 0.0, what="a finite number >= 0")
FRACTION = _number(float, 0.0, 1.0, what="a fraction in [0, 1]")
KEEP = _number(float, 0.0, 1.0, high_open=True, what="0 (off) or a fraction in (0, 1)")
SPARSITY = _number(float, 0.0, 1.0, high_open=True, what="a fraction in [0, 1)")
STRENGTH = _number(float, 0.0, 1.0, low_open=True, what="a fraction in (0, 1]")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default where its help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})"


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="attnsteer", description="Steer diffusion models through their attention.",
                                   formatter_class=_HelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)

    def command(name, **kwargs):
        return commands.add_parser(name, formatter_class=_HelpFormatter, **kwargs)

    def steering_options(p):
        p.add_argument("--heads", type=_heads, default=None, help="'LAYER:HEADS ...' spec or head-set JSON (see `attnsteer layers`); "
                                                     "default: none (no perturbation)")
        p.add_argument("--scale", type=FINITE, default=None, help="perturbation scale w (default 5, or the head-set file's)")
        p.add_argument("--u", type=FRACTION, default=None, help="SoftPAG u in [0, 1]: 0 no perturbation, 1 PAG identity "
                                                               "(default 1, or the head-set file's)")
        p.add_argument("--mode", default=None, choices=["joint", "image"],
                       help="identity on the whole joint map or on the image block (default joint, or the head-set file's)")
        p.add_argument("--window", type=FRACTION, nargs=2, default=None, metavar=("START", "STOP"),
                       help="fractions of the steps where the perturbation acts (default 0 1: all)")
        p.add_argument("--batching", default=None, choices=["batched", "sequential"],
                       help="perturbed branch in the same forward (batched, the default) or a second one (less memory)")
        p.add_argument("--guidance-scale", type=FINITE, default=None,
                       help="CFG scale (default: the model folder's, else the pipeline's)")

    def astar_options(p):
        p.add_argument("--astar", type=_words, default=None, metavar="CONCEPTS",
                       help="A-STAR on these concepts: 'nouns' or 'objects' (each shapes prompt's object nouns, or "
                            "colour and noun) or a comma list of words of the prompt, e.g. 'cat,dog' (default: off)")
        p.add_argument("--astar-scale", type=NON_NEGATIVE_FLOAT, default=None,
                       help="A-STAR step size alpha (default 20)")
        p.add_argument("--astar-steps", type=FRACTION, nargs=2, default=None, metavar=("START", "STOP"),
                       help="fractions of the steps that get A-STAR's gradient step (default: all)")
        p.add_argument("--astar-weights", type=NON_NEGATIVE_FLOAT, nargs=2, default=None, metavar=("SEG", "RET"),
                       help="segregation and retention loss weights (default 1 1)")
        p.add_argument("--astar-checkpointing", action="store_true",
                       help="gradient checkpointing in A-STAR's gradient pass: less memory, more time")

    def prompt_options(p, split, seeds, prompts_help):
        p.add_argument("--set", default="two", choices=["one", "two", "three", "one-moving", "two-moving"],
                       help="named shapes prompt set (one-moving and two-moving name motions: --video only)")
        p.add_argument("--split", default=split, choices=["tune", "heldout"], help="prompt split of the set")
        p.add_argument("--prompts", default=None, help=f"{prompts_help} (default: none, --set's prompts)")
        p.add_argument("--limit", type=POSITIVE, default=None, help="use the first N prompts (default: all)")
        p.add_argument("--seeds", type=POSITIVE, default=seeds, help="seeds 0..N-1 per prompt")

    def model_options(p, default=DEFAULT_MODEL, video=True):
        p.add_argument("--model", default=default,
                       help=f"model id, local diffusers folder, a shipped shapes model ({', '.join(SHIPPED)}) or "
                            f"{'|'.join(TINY_PREFIX + k for k in TINY_KINDS)} (random weights)"
                            + ("" if default else f" (default: {DEFAULT_MODEL}, with --video {DEFAULT_VIDEO_MODEL})"))
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, ... (default: cuda if a GPU is visible, else cpu)")
        p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="weights and compute precision (use float32 on a CPU)")
        p.add_argument("--height", type=POSITIVE, default=None, help="pixels (default: the model's)")
        p.add_argument("--width", type=POSITIVE, default=None, help="pixels (default: the model's)")
        if video:
            p.add_argument("--frames", type=POSITIVE, default=None,
                           help="video frames that come out: 1 + 4k for Wan's 4x temporal VAE, any for a per-frame VAE "
                                "such as shapes-wan's (default: the model folder's clip)")

    def sparse_options(p):
        p.add_argument("--sparsity", type=SPARSITY, default=None,
                       help="DraftAttention block-sparse attention (Wan, SD3, FLUX): fraction of image block pairs "
                            "skipped, in [0, 1) (default: dense)")
        p.add_argument("--sparse-mask", default="draft", choices=["draft", "radial", "tile"],
                       help="block mask: the draft map (with --sparsity), or the static radial or sliding-tile mask")
        p.add_argument("--sparse-pool", type=POSITIVE, nargs=2, default=None, metavar=("ROWS", "COLUMNS"),
                       help="latent tokens per block in each frame (default: about 128 that tile the frame, e.g. 10 13 on Wan 480p)")
        p.add_argument("--sparse-backend", default=None, choices=["auto", "flex", "gather", "dense"],
                       help="auto (the default): compiled flex_attention where it can run, else gather")
        p.add_argument("--sparse-dense-steps", type=NON_NEGATIVE, default=None,
                       help="first steps kept dense (default: 30%% of the steps)")

    def generate_options(p, out):
        p.add_argument("--prompt", required=True, help="what to draw")
        p.add_argument("--negative-prompt", default=None, help="what to steer away from with CFG (default: none)")
        steering_options(p)
        astar_options(p)
        sparse_options(p)
        p.add_argument("--steps", type=POSITIVE, default=None, help="denoising steps (default: the model folder's, else 28)")
        p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="random seed; same seed, same picture")
        p.add_argument("--baseline", action="store_true", help="also write the unsteered output of the same seed, "
                                                               "and both side by side")
        p.add_argument("--out", default=out, help="output folder")
        p.set_defaults(run=generate)

    g = command("generate", help="generate pictures, optionally with head perturbation guidance or A-STAR")
    model_options(g)
    generate_options(g, "out")

    ed = command("edit", help="edit a picture (img2img, or inpainting with --mask), optionally steered")
    model_options(ed, video=False)
    ed.add_argument("--image", required=True, help="the picture to edit; it sets the size")
    ed.add_argument("--mask", default=None, help="inpainting: a picture white where to redraw (default: none, img2img)")
    ed.add_argument("--strength", type=STRENGTH, default=None,
                    help="how far the result may move from the picture, in (0, 1] (default: the pipeline's)")
    ed.add_argument("--control", default=None, help="the control picture (pose, depth, edges, ...) for --controlnet, "
                                                   "resized to --image's size (default: none)")
    ed.add_argument("--controlnet", default=None, help="a diffusers ControlNet folder (or hub id) of the model's "
                                                      "family; with --control (default: none)")
    generate_options(ed, "edit")

    v = command("video", help="generate a video (frames as PNG and an animated GIF), optionally steered; --frames "
                              "beyond the model's clip runs FIFO-Diffusion")
    model_options(v, DEFAULT_VIDEO_MODEL)
    generate_options(v, "video")
    v.add_argument("--image", default=None,
                   help="image-to-video: the first frame, on an image-to-video model (e.g. a WanImageToVideoPipeline "
                        "folder) (default: none, text-to-video)")
    v.add_argument("--fifo-partitions", type=POSITIVE, default=None,
                   help="FIFO queue of n windows (--frames beyond the model's clip): each frame passes n x window levels "
                        "(default 4)")
    v.add_argument("--no-lookahead", action="store_true", help="FIFO without overlapping windows (half the model calls)")
    v.add_argument("--ouroboros-tail", action="store_true",
                   help="FIFO with Ouroboros' coherent tail: new tail frames keep the low frequencies of the queue's last")
    v.add_argument("--ouroboros-subjects", nargs="+", default=None, metavar="WORD",
                   help="FIFO with Ouroboros' subject parts for these words of the prompt: later windows read the head "
                        "window's subject keys and values, and self-recurrent guidance (default: none, the parts off)")
    v.add_argument("--ouroboros-guidance", type=NON_NEGATIVE_FLOAT, default=None,
                   help="self-recurrent guidance step relative to the velocity (0: off; with --ouroboros-subjects; "
                        "default 0.1)")
    v.add_argument("--no-cross-frame", action="store_true",
                   help="with --ouroboros-subjects: no subject-aware cross-frame attention")

    e = command("eval", help="measure baseline and steering on a shapes prompt set x seeds")
    model_options(e, None)
    e.add_argument("--video", action="store_true", help="a video model, video prompt sets and video metrics")
    steering_options(e)
    astar_options(e)
    sparse_options(e)
    prompt_options(e, split="heldout", seeds=4, prompts_help="a file of prompts, one per line, instead of --set")
    e.add_argument("--steps", type=POSITIVE, default=None, help="denoising steps (default: the model folder's, else 20)")
    e.add_argument("--batch-size", type=POSITIVE, default=8, help="prompts per pipeline call")
    e.add_argument("--keep", type=NON_NEGATIVE, default=8, help="items shown on the contact sheet")
    e.add_argument("--out", default="eval", help="folder for eval.json and contact_sheet.png")
    e.set_defaults(run=evaluate)

    s = command("search-heads", help="HeadHunter: greedily select the heads whose perturbation best raises an "
                                      "objective; writes heads.json for --heads / perturbed_heads")
    model_options(s, video=False)
    s.add_argument("--revision", default=None, help="model revision, recorded in heads.json (default: none)")
    prompt_options(s, split="tune", seeds=2,
                   prompts_help="a file of prompts, one per line, instead of --set; a 'prompt<TAB>seed' line fixes "
                                "that item's seed")
    s.add_argument("--objective", default="shapes",
                   help="shapes[-binding|-bound|-coverage|-count_right], clip:LOCAL_CLIP_FOLDER or module:function")
    s.add_argument("--rounds", type=POSITIVE, default=1, help="greedy rounds R")
    s.add_argument("--top-k", type=POSITIVE, default=3, help="heads added per round")
    s.add_argument("--layers", default=None, help="comma list of layer names or indices for the pool (default: all)")
    s.add_argument("--scale", type=FINITE, default=3.0, help="perturbation scale w while searching")
    s.add_argument("--u", type=FRACTION, default=1.0, help="SoftPAG u while searching (HeadHunter: search at 1)")
    s.add_argument("--mode", default="joint", choices=["joint", "image"], help="identity of the perturbation")
    s.add_argument("--guidance-scale", type=FINITE, default=1.0, help="CFG scale while searching (1: off, as HeadHunter)")
    s.add_argument("--steps", type=POSITIVE, default=None, help="denoising steps (default: the model folder's, else 20)")
    s.add_argument("--batch-size", type=POSITIVE, default=16, help="prompts per pipeline call; candidates share calls")
    s.add_argument("--halving-keep", type=KEEP, default=0.0,
                   help="successive halving: keep this fraction of each round's candidates after a cheap screen (0: off)")
    s.add_argument("--screen-items", type=POSITIVE, default=None,
                   help="screen on the first N prompt-seed items (default: all)")
    s.add_argument("--screen-steps", type=POSITIVE, default=None, help="screen with this many denoising steps "
                                                                        "(default: --steps)")
    s.add_argument("--out", default="head-search", help="folder for journal.jsonl, heads.json, contact_sheet.png")
    s.set_defaults(run=search)

    m = command("maps", help="the attention map of each chosen word over one generated picture")
    model_options(m, video=False)
    m.add_argument("--prompt", required=True, help="what to draw")
    m.add_argument("--words", type=_words, required=True, help="comma list of words of the prompt to map, e.g. 'red,circle,blue square'")
    steering_options(m)
    astar_options(m)
    m.add_argument("--maps-steps", type=FRACTION, nargs=2, default=(0.0, 1.0), metavar=("START", "STOP"),
                   help="fractions of the steps whose maps are averaged")
    m.add_argument("--maps-layers", default=None,
                   help="comma list of layer names or indices of the text layers (default: every text layer at the map grid)")
    m.add_argument("--steps", type=POSITIVE, default=None, help="denoising steps (default: the model folder's, else 28)")
    m.add_argument("--seed", type=NON_NEGATIVE, default=0, help="random seed")
    m.add_argument("--out", default="maps", help="output folder")
    m.set_defaults(run=maps)

    st = command("story", help="IR-Diffusion: the same subjects in several scenes, drawn alone as references first")
    model_options(st, video=False)
    st.add_argument("--subject", action="append", required=True, help="a subject prompt, e.g. 'a red circle'; repeat "
                                                                        "for each subject")
    st.add_argument("--scene", action="append", required=True, help="a scene holding every subject; repeat for more")
    st.add_argument("--words", type=_words, default=None, help="comma list, one per subject, of the words naming it in its prompt "
                                                  "and every scene (default: each subject without its article)")
    st.add_argument("--masks", default="maps", choices=["maps", "detector"],
                    help="where the subjects are: their cross-attention maps (default), or the shapes detector on the "
                         "images drawn first without IR (shapes models; subjects of distinct colours; twice the time; "
                         "with --baseline that first pass gives the independent scenes)")
    st.add_argument("--no-isolation", action="store_true", help="let the subjects of a scene attend to each other")
    st.add_argument("--no-reposition", action="store_true", help="read the references where they sit (shared attention)")
    st.add_argument("--no-read", action="store_true", help="scenes do not read the references (isolation only)")
    st.add_argument("--mutual", type=FRACTION, default=None,
                    help="mutual cross-attention lambda: inside subject i a scene also reads reference i's prompt "
                         "(default 0.9, the authors'; 0: off)")
    st.add_argument("--negative-prompt", default=None, help="what to steer away from with CFG (default: none)")
    steering_options(st)
    st.add_argument("--steps", type=POSITIVE, default=None, help="denoising steps (default: the model folder's, else 28)")
    st.add_argument("--seed", type=NON_NEGATIVE, default=0, help="random seed of the first reference; row k has seed + k")
    st.add_argument("--baseline", action="store_true", help="also draw each scene independently at its seed")
    st.add_argument("--out", default="story", help="output folder")
    st.set_defaults(run=story)

    ls = command("layers", help="list a model's attention layers, heads and token layouts")
    model_options(ls)
    ls.add_argument("--layout", action="store_true", help="run one denoising step to show each layer's token layout")
    ls.set_defaults(run=layers)
    return main


def check(args) -> None:
    """The checks that need no model, run before it is loaded: device, model name, files, output folder."""
    import torch

    video = getattr(args, "video", False)
    if args.model is None:
        args.model = DEFAULT_VIDEO_MODEL if video else DEFAULT_MODEL
    if getattr(args, "set", None) in ({"three"} if video else {"one-moving", "two-moving"}):
        allowed = "one, two, one-moving, two-moving" if video else "one, two, three"
        raise UsageError(f"--set {args.set} is not a{' video' if video else 'n image'} prompt set; "
                         f"allowed: {allowed}" + ("" if video else " (the moving sets need --video)"))
    for name, (method, named) in NEEDS.items():
        on = _given(args, method) or (method == "sparsity" and getattr(args, "sparse_mask", "draft") != "draft")
        if hasattr(args, method) and _given(args, name) and not on:
            raise UsageError(f"{_flag(name)} acts only with {named}, which is not given")
    for name, (other, why) in NOT_WITH.items():
        if _given(args, name) and _given(args, other):
            raise UsageError(f"{_flag(name)} does nothing with {_flag(other)}: {why}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a torch device: use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is visible to torch here; use --device cpu")
    if not args.model.startswith(TINY_PREFIX):
        model_path(args.model)
    for name in ("image", "mask", "control"):
        if getattr(args, name, None) and not Path(getattr(args, name)).is_file():
            raise UsageError(f"--{name} {getattr(args, name)!r} does not exist")
    if args.command == "edit" and bool(args.control) != bool(args.controlnet):
        raise UsageError("--control and --controlnet go together: the control picture and the ControlNet that reads it")
    if getattr(args, "controlnet", None):
        controlnet_path(args.controlnet)
    if args.command == "edit" and (args.height or args.width):
        raise UsageError("--height and --width: `attnsteer edit` draws at the size of --image")
    if getattr(args, "prompts", None) and not Path(args.prompts).is_file():
        raise UsageError(f"--prompts file {args.prompts!r} does not exist")
    if getattr(args, "heads", None) and args.heads.endswith(".json"):
        from attnsteer.attention_processors import HeadSetFile

        HeadSetFile.load(args.heads)
    if hasattr(args, "out"):
        existing = next(p for p in [Path(args.out), *Path(args.out).absolute().parents] if p.exists())
        if not existing.is_dir():
            raise UsageError(f"--out {args.out}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--out {args.out}: the folder {existing} is not writable")
        try:  # what a user with the rights still cannot create (a read-only or virtual file system)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=args.out).close()
        except OSError as error:
            raise UsageError(f"--out {args.out}: cannot be created or written ({error})") from None


def _given(args, name: str) -> bool:
    """Whether the command line gave option ``name`` (every checked option defaults to None or False)."""
    return getattr(args, name, None) not in (None, False)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_names(message: str) -> str:
    """``message`` with the Python API's keyword names replaced by the command line's flags."""
    return re.sub(r"(?<![\w-])(" + "|".join(FLAGS) + r")\b", lambda m: FLAGS[m.group(1)], message)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        check(args)
        args.run(args)
    except ValueError as error:
        sys.exit(f"attnsteer {args.command}: {_flag_names(str(error))}")


if __name__ == "__main__":
    main()

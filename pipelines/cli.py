"""The ``attnsteer`` command line: ``generate`` pictures with steering, ``eval`` them on shapes prompts,
``search-heads`` (HeadHunter), list a model's ``layers``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attnsteer.guidance.distributed import process_state

TINY_PREFIX = "tiny-"
SHIPPED = ("shapes-sd", "shapes-sd3")  # small models trained on drawn shapes, in the repository's samples/models
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "samples" / "models"
DEFAULT_MODEL = "shapes-sd"
CALL_DEFAULTS = "attnsteer.json"  # in a model folder: {"call": {pipeline keyword arguments it needs}}


def model_path(model: str) -> str:
    """A shipped model's folder for its name; any other model as given."""
    if model not in SHIPPED:
        return model
    folder = SHIPPED_DIR / model
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"shipped model {model!r} not found at {folder}: it lives in the attnsteer repository's "
                         f"samples/models (install from a clone), or pass --model PATH")
    return str(folder)


def call_defaults(model: str) -> dict:
    """Pipeline call arguments a local model folder asks for (e.g. shapes-sd3's max_sequence_length)."""
    path = Path(model_path(model)) / CALL_DEFAULTS
    return json.loads(path.read_text()).get("call", {}) if path.is_file() else {}


def load_pipeline(model: str, device: str, dtype: str):
    """An attnsteer pipeline for a model id, a local diffusers folder, or ``tiny-<kind>`` (random weights)."""
    import torch
    from diffusers import DiffusionPipeline

    from .steer import STEER_PIPELINES, WanSteerPipeline

    if model.startswith(TINY_PREFIX):
        from .tiny import KINDS, PIPELINE_CLASSES, tiny_pipeline

        kind = model[len(TINY_PREFIX):]
        if kind not in KINDS:
            raise SystemExit(f"unknown tiny model {model!r}; choose one of {', '.join(TINY_PREFIX + k for k in KINDS)}")
        pipe = tiny_pipeline(kind, STEER_PIPELINES[PIPELINE_CLASSES[kind].__name__])
        pipe.set_progress_bar_config(disable=False)
        if dtype != "float32":
            pipe.to(getattr(torch, dtype))
    else:
        model = model_path(model)
        class_name = DiffusionPipeline.load_config(model)["_class_name"]
        if class_name not in STEER_PIPELINES:
            raise SystemExit(f"{model}: pipeline class {class_name} is not supported; supported: {', '.join(STEER_PIPELINES)}")
        pipe = STEER_PIPELINES[class_name].from_pretrained(model, dtype=getattr(torch, dtype))
    if device == "cuda":  # under accelerate / torchrun, each process its own GPU
        device = process_state().device
    return pipe.to(device), isinstance(pipe, WanSteerPipeline)


def _save(result, is_video: bool, out: Path, stem: str) -> list[Path]:
    """Write a pipeline's PIL output as PNGs: one per image, one per video frame."""
    out.mkdir(parents=True, exist_ok=True)
    named = [(f"{stem}_{v}_frame{f:03d}", frame) for v, video in enumerate(result.frames) for f, frame in enumerate(video)] \
        if is_video else [(f"{stem}_{i}", image) for i, image in enumerate(result.images)]
    for name, picture in named:
        picture.save(out / f"{name}.png")
    return [out / f"{name}.png" for name, _ in named]


def _steering(args, pipe) -> dict:
    """The steering keyword arguments of the command line, checked against ``pipe`` before any compute."""
    steering = dict(perturbed_heads=args.heads, perturbation_scale=args.scale, softpag_u=args.u,
                    perturbation_mode=args.mode, perturbation_window=tuple(args.window),
                    perturbation_batching=args.batching)
    pipe.perturbation_guidance(**steering)
    return steering


def _call(args, default_steps: int) -> dict:
    """Pipeline call arguments: the model folder's defaults, then the command line's size, steps and CFG."""
    call = {**call_defaults(args.model), "height": args.height, "width": args.width}
    call["num_inference_steps"] = args.steps or call.get("num_inference_steps", default_steps)
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    return call


def generate(args) -> None:
    import torch

    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    steering = _steering(args, pipe)
    call = dict(_call(args, 28), prompt=args.prompt, negative_prompt=args.negative_prompt, output_type="pil")
    if is_video:
        call["num_frames"] = args.frames
    runs = [("baseline", {})] if args.baseline else []
    runs.append(("steered" if args.heads else "output", steering))
    firsts = []
    for name, extra in runs:
        generator = torch.Generator(args.device).manual_seed(args.seed)
        result = pipe(**call, **extra, generator=generator)
        firsts.append(result.frames[0][0] if is_video else result.images[0])
        for path in _save(result, is_video, Path(args.out), f"seed{args.seed}_{name}"):
            print(path)
    if len(runs) > 1:
        from .evaluate import contact_sheet

        grid = Path(args.out) / f"seed{args.seed}_grid.png"
        contact_sheet({"": firsts}, [name for name, _ in runs]).save(grid)
        print(grid)


def evaluate(args) -> None:
    from .evaluate import evaluate as run, paired_table, table, write

    prompts = _prompts(args)
    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    if is_video:
        raise SystemExit("attnsteer eval: video pipelines are not supported yet")
    steering = _steering(args, pipe)
    methods = {"baseline": {}, **({"heads": steering} if args.heads else {})}
    call = dict(_call(args, 20), output_type="pil")
    result = run(pipe, prompts, list(range(args.seeds)), methods, call, args.batch_size, keep_images=args.keep)
    state = process_state()
    if state.is_main_process:
        print(table(result["summary"]))
        if result["paired"]:
            print(paired_table(result["paired"], "baseline"))
        config = {k: v for k, v in vars(args).items() if k != "run"}
        for path in write(result, args.out, {**config, "prompts": len(prompts), "processes": state.num_processes}):
            print(path)


def _prompts(args) -> list[str]:
    from attnsteer.guidance.shapes import prompt_set

    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        prompts = prompt_set(args.set, args.split)
    return prompts[:args.limit] if args.limit else prompts


def search(args) -> None:
    from attnsteer.guidance.objectives import load_objective

    from .search import read_items, run_search

    items = read_items(_prompts(args), args.seeds)
    objective = load_objective(args.objective, args.device)
    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    if is_video:
        raise SystemExit("attnsteer search-heads: video pipelines are not supported yet")
    pipe.set_progress_bar_config(disable=True)
    call = _call(args, 20)
    steps = call.pop("num_inference_steps")
    pipe.perturbation_guidance(perturbation_scale=args.scale, softpag_u=args.u, perturbation_mode=args.mode)
    summary = run_search(pipe, model=args.model, revision=args.revision, objective=objective,
                         objective_name=args.objective, items=items, out=args.out, rounds=args.rounds,
                         top_k=args.top_k, layers=args.layers.split(",") if args.layers else None, w=args.scale,
                         u=args.u, mode=args.mode, steps=steps, call_kwargs=call, batch_size=args.batch_size,
                         halving_keep=args.halving_keep, screen_items=args.screen_items,
                         screen_steps=args.screen_steps)
    if process_state().is_main_process:
        print(f"baseline (no heads) score {summary['baseline_score']:.4f}")
        for r in summary["rounds"]:
            gain = r["gain"]
            print(f"round {r['round']}: + {' '.join(r['selected'])}  (best candidate {r['score']:.4f}, "
                  f"{gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}] over no heads, paired)")
        print(f"heads: {' '.join(summary['heads'])}")
        cost = summary["search"]
        print(f"{cost['image_steps']} image-steps ({cost['computed_image_steps']} computed now) in {cost['wall_s']} s")
        print(Path(args.out) / "heads.json")


def layers(args) -> None:
    pipe, is_video = load_pipeline(args.model, args.device, args.dtype)
    listed = pipe.steer_layers()
    call = dict(prompt="a photo", height=args.height, width=args.width)
    if is_video:
        call["num_frames"] = args.frames
    seen = pipe.token_layouts(**call) if args.layout else {}
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


def parser() -> argparse.ArgumentParser:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    main = argparse.ArgumentParser(prog="attnsteer", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)

    def steering_options(p):
        p.add_argument("--heads", default=None, help="'LAYER:HEADS ...' spec or head-set JSON (see `attnsteer layers`)")
        p.add_argument("--scale", type=float, default=None, help="perturbation scale w (default 5, or the head-set file's)")
        p.add_argument("--u", type=float, default=None, help="SoftPAG u in [0, 1] (default 1, or the head-set file's)")
        p.add_argument("--mode", default=None, help="joint or image")
        p.add_argument("--window", type=float, nargs=2, default=(0.0, 1.0), metavar=("START", "STOP"))
        p.add_argument("--batching", default="batched", help="batched or sequential")
        p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")

    def prompt_options(p, split, seeds):
        p.add_argument("--set", default="two", choices=["one", "two", "three"], help="named shapes prompt set")
        p.add_argument("--split", default=split, choices=["tune", "heldout"])
        p.add_argument("--prompts", default=None,
                       help="a file of prompts, one per line, instead of --set (search-heads: 'prompt<TAB>seed' lines "
                            "fix the seed)")
        p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
        p.add_argument("--seeds", type=int, default=seeds, help="seeds 0..N-1 per prompt")

    def model_options(p):
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model id, local diffusers folder, a shipped shapes model ({', '.join(SHIPPED)}; default "
                            f"{DEFAULT_MODEL}) or tiny-sd|tiny-sdxl|tiny-sd3|tiny-flux|tiny-wan (random weights)")
        p.add_argument("--device", default=device)
        p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        p.add_argument("--height", type=int, default=None)
        p.add_argument("--width", type=int, default=None)
        p.add_argument("--frames", type=int, default=9, help="video frames (Wan)")

    g = commands.add_parser("generate", help="generate pictures, optionally with head perturbation guidance")
    model_options(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    steering_options(g)
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model folder's, else 28)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--baseline", action="store_true", help="also write the unsteered picture of the same seed")
    g.add_argument("--out", default="out")
    g.set_defaults(run=generate)

    e = commands.add_parser("eval", help="measure baseline and steering on a shapes prompt set x seeds")
    model_options(e)
    steering_options(e)
    prompt_options(e, split="heldout", seeds=4)
    e.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model folder's, else 20)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--keep", type=int, default=8, help="items shown on the contact sheet")
    e.add_argument("--out", default="eval")
    e.set_defaults(run=evaluate)

    s = commands.add_parser("search-heads", help="HeadHunter: greedily select the heads whose perturbation "
                            "best raises an objective; writes heads.json for --heads / perturbed_heads")
    model_options(s)
    s.add_argument("--revision", default=None, help="model revision, recorded in heads.json")
    prompt_options(s, split="tune", seeds=2)
    s.add_argument("--objective", default="shapes",
                   help="shapes[-binding|-bound|-coverage|-count_right], clip:LOCAL_CLIP_FOLDER or module:function")
    s.add_argument("--rounds", type=int, default=1, help="greedy rounds R")
    s.add_argument("--top-k", type=int, default=3, help="heads added per round")
    s.add_argument("--layers", default=None, help="comma list of layer names or indices for the pool (default: all)")
    s.add_argument("--scale", type=float, default=3.0, help="perturbation scale w while searching")
    s.add_argument("--u", type=float, default=1.0, help="SoftPAG u while searching (HeadHunter: search at 1)")
    s.add_argument("--mode", default="joint", help="joint or image")
    s.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale while searching (1: off, as HeadHunter)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model folder's, else 20)")
    s.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call; candidates share calls")
    s.add_argument("--halving-keep", type=float, default=0.0,
                   help="successive halving: keep this fraction of each round's candidates after a cheap screen")
    s.add_argument("--screen-items", type=int, default=None, help="screen on the first N prompt-seed items")
    s.add_argument("--screen-steps", type=int, default=None, help="screen with this many denoising steps")
    s.add_argument("--out", default="head-search", help="folder for journal.jsonl, heads.json, contact_sheet.png")
    s.set_defaults(run=search)

    ls = commands.add_parser("layers", help="list a model's attention layers, heads and token layouts")
    model_options(ls)
    ls.add_argument("--layout", action="store_true", help="run one denoising step to show each layer's token layout")
    ls.set_defaults(run=layers)
    return main


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        sys.exit(f"attnsteer {args.command}: {error}")


if __name__ == "__main__":
    main()

"""A-STAR on the shipped shapes models: coverage, bound, binding and count right on two- and
three-object prompts, paired against the baseline on the same prompts and seeds.

Methods: the baseline (always); A-STAR (both losses); segregation alone; retention alone; on shapes-sd also
diffusers' StableDiffusionAttendAndExcitePipeline on the same model, prompts and seeds. Concepts
are each prompt's object nouns ("circle", "square"; --concepts objects: "red circle", "blue square");
Attend-and-Excite gets the nouns' token indices. Attend-and-Excite's step-keyed settings are for a
50-step run and are scaled to --steps: max_iter_to_alter 25/50 of the steps, thresholds at steps
0, 10/50 and 20/50 of the run; its attn_res is the 16x16 grid of shapes-sd's outer cross-attention
layers (the store is checked non-empty). Choose --scale on --split tune; report on --split heldout.

    python benchmarks/bench_astar_quality.py --model shapes-sd --set two --split tune --count 40 --seeds 2 --scale 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = ("astar", "seg", "ret", "ae")  # each paired against the baseline, which always runs
WEIGHTS = {"astar": (1.0, 1.0), "seg": (1.0, 0.0), "ret": (0.0, 1.0)}  # (segregation, retention)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-sd", choices=["shapes-sd", "shapes-sd3"])
    p.add_argument("--set", default="two", choices=["two", "three"])
    p.add_argument("--split", default="tune", choices=["tune", "heldout"])
    p.add_argument("--first", type=int, default=0, help="first prompt of the split")
    p.add_argument("--count", type=int, default=40, help="prompts")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model folder's, else 20)")
    p.add_argument("--scale", type=float, nargs="+", default=[20.0], help="A-STAR alpha; several: one row each")
    p.add_argument("--concepts", default="nouns", choices=["nouns", "objects"])
    p.add_argument("--methods", nargs="+", default=["astar"], choices=METHODS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the records and tables here (JSON)")
    p.add_argument("--pool", nargs="+", default=None, metavar="JSON",
                   help="generate nothing: pool the records of earlier runs' --out files (their baselines must agree)")
    p.add_argument("--reference", default="baseline",
                   help="with --pool: the method the others are paired against; other than 'baseline', the runs' "
                        "baselines are left out (runs in other batches may differ from each other in the last bits)")
    args = p.parse_args()
    if args.count < 1 or args.seeds < 1 or args.first < 0:
        p.error("--count and --seeds must be at least 1, --first at least 0")
    if "ae" in args.methods and args.model != "shapes-sd":
        p.error("--methods ae: Attend-and-Excite is SD1.x only (shapes-sd)")
    if any(s < 0 for s in args.scale):
        p.error(f"--scale {args.scale}: alpha must be >= 0")
    return args


def attend_and_excite(pipe, steps: int):
    """diffusers' Attend-and-Excite on ``pipe``'s components, called like our pipelines by evaluate()."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    from attnsteer.guidance.shapes import caption_concepts

    ae = StableDiffusionAttendAndExcitePipeline(**{k: getattr(pipe, k) for k in (
        "vae", "text_encoder", "tokenizer", "unet", "scheduler")}, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    ae.set_progress_bar_config(disable=True)
    thresholds = {0: 0.05, round(steps * 10 / 50): 0.5, round(steps * 20 / 50): 0.8}

    def indices(prompt):
        ids = ae.tokenizer(prompt).input_ids
        return [ids.index(ae.tokenizer(word, add_special_tokens=False).input_ids[0]) for word in caption_concepts(prompt)]

    def call(prompt, generator, **kwargs):
        out = [ae(prompt=[p], token_indices=indices(p), generator=g, max_iter_to_alter=round(steps * 25 / 50),
                  thresholds=thresholds, attn_res=(16, 16), **kwargs).images[0] for p, g in zip(prompt, generator)]
        assert ae.attention_store.attention_store, "Attend-and-Excite stored no maps at attn_res (16, 16)"
        return type("Output", (), {"images": out})

    call.device = pipe.device
    return call


def pooled(paths: list[str], baselines: bool = True) -> list[dict]:
    """The records of several runs' JSON files, each baseline image once (none without ``baselines``);
    SystemExit if two runs drew a different baseline image for the same prompt and seed."""
    records, baseline = [], {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["records"]:
            if r["method"] != "baseline":
                records.append(r)
            elif baselines and baseline.setdefault((r["prompt"], r["seed"]), r)["pixel_mean"] != r["pixel_mean"]:
                raise SystemExit(f"{path}: its baseline image of {r['prompt']!r} seed {r['seed']} differs from an earlier run's")
    return list(baseline.values()) + records


def report(records: list[dict], heading: str, out: str | None, extra: dict, reference: str = "baseline") -> None:
    """Print each method's rates and its paired difference from ``reference``; write them with the records."""
    from attnsteer.guidance.shapes import summarize
    from attnsteer.pipelines.evaluate import paired, paired_table, table

    names = list(dict.fromkeys(r["method"] for r in records))
    summary = {m: summarize([r for r in records if r["method"] == m]) for m in names}
    differences = paired(records, reference)
    print(heading + "\n\n" + table(summary) + "\n\n" + paired_table(differences, reference))
    if out:
        Path(out).write_text(json.dumps({**extra, "summary": summary, "paired": differences, "records": records}, indent=1))


def main():
    args = parse_args()
    if args.pool:
        records = pooled(args.pool, baselines=args.reference == "baseline")
        items = len({(r["prompt"], r["seed"]) for r in records})
        report(records, f"pooled from {', '.join(args.pool)}: {items} prompt-seed items", args.out,
               {"pooled": args.pool}, args.reference)
        return
    torch.set_num_threads(args.threads)
    from attnsteer.guidance.shapes import caption_concepts, prompt_set
    from attnsteer.pipelines.cli import load_pipeline
    from attnsteer.pipelines.evaluate import evaluate

    pipe, _ = load_pipeline(args.model, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(args.set, args.split)[args.first:args.first + args.count]
    seeds = list(range(args.seeds))
    steps = args.steps or pipe.call_defaults.get("num_inference_steps", 20)
    call = {**pipe.call_defaults, "num_inference_steps": steps, "output_type": "pil"}
    colour = args.concepts == "objects"

    def astar(weights, scale):
        return lambda batch: {"astar_tokens": [caption_concepts(p, colour) for p in batch], "astar_scale": scale,
                              "astar_weights": weights}

    methods = {"baseline": {}}
    for name in ("astar", "seg", "ret"):
        if name in args.methods:
            for scale in args.scale:
                methods[name + (f" a{scale:g}" if len(args.scale) > 1 else "")] = astar(WEIGHTS[name], scale)
    t = time.time()
    records = evaluate(pipe, prompts, seeds, methods, call, args.batch_size)["records"]
    timing = {"ours_s": round(time.time() - t, 1)}
    if "ae" in args.methods:
        t = time.time()
        ae = evaluate(attend_and_excite(pipe, steps), prompts, seeds, {"ae": {}},
                      {k: v for k, v in call.items() if k in ("num_inference_steps", "guidance_scale", "output_type")},
                      args.batch_size)
        records += ae["records"]
        timing["ae_s"] = round(time.time() - t, 1)
    heading = (f"{args.model}, {args.set}-object {args.split} prompts {args.first}..{args.first + len(prompts) - 1} x "
               f"seeds 0..{args.seeds - 1}, {steps} steps, concepts: {args.concepts}; {timing}")
    report(records, heading, args.out, {"args": vars(args), "timing": timing})


if __name__ == "__main__":
    main()

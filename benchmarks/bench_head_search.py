"""Head search on a shipped shapes model: cost of plain Algorithm 1 against batched candidates and
successive halving, overlap of the selected sets, and the found set against no perturbation and
whole layers on held-out prompts the search never saw.

Search: shapes objective on the two-object "tune" prompts, CFG off (as HeadHunter searches). Variants
(each its own journal folder under --out, so a rerun reuses finished work):
- plain: Algorithm 1, one candidate per pipeline call, every candidate scored in full;
- batched: the same evaluations, several candidates per call (a head set per prompt);
- halving: batched, plus a screen of every candidate on fewer items and steps, the best fraction re-scored.
Held-out: the two-object "heldout" prompts, with the search's w and u, at CFG off and at the model's CFG;
every method's rates, and paired differences (same prompts and seeds) against none and against the found set.
Searching with CFG on (--search-cfg) is also possible.

    python benchmarks/bench_head_search.py --model samples/models/shapes-sd3 --out /tmp/bench-search
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="samples/models/shapes-sd3")
    p.add_argument("--out", default="/tmp/bench-search")
    p.add_argument("--objective", default="shapes-bound")
    p.add_argument("--prompts", type=int, default=20, help="tune prompts (two objects) used by the search")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--w", type=float, default=3.0)
    p.add_argument("--u", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=160, help="prompts per call for batched/halving")
    p.add_argument("--halving-keep", type=float, default=0.25)
    p.add_argument("--screen-items", type=int, default=10)
    p.add_argument("--screen-steps", type=int, default=10)
    p.add_argument("--heldout-prompts", type=int, default=150)
    p.add_argument("--heldout-seeds", type=int, default=2)
    p.add_argument("--search-cfg", type=float, default=1.0, help="CFG while searching (1: off, as HeadHunter)")
    p.add_argument("--eval-cfgs", type=float, nargs="+", default=[1.0, 0.0],
                   help="CFG of each held-out table; 0: the model's default")
    p.add_argument("--variants", nargs="+", default=["plain", "batched", "halving"])
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from attnsteer.guidance.objectives import load_objective
    from attnsteer.guidance.shapes import prompt_set
    from attnsteer.pipelines.cli import load_pipeline
    from attnsteer.pipelines.evaluate import evaluate, paired, paired_table, table
    from attnsteer.pipelines.search import read_items, run_search

    pipe, _ = load_pipeline(args.model, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    pipe.perturbation_guidance(perturbation_scale=args.w, softpag_u=args.u)  # refused before any image is made
    defaults = pipe.call_defaults
    items = read_items(prompt_set("two", "tune")[:args.prompts], args.seeds)
    objective = load_objective(args.objective)
    out = Path(args.out)
    search_call = {**defaults, "guidance_scale": args.search_cfg}
    common = dict(model=args.model, revision=None, objective=objective, objective_name=args.objective, items=items,
                  rounds=args.rounds, top_k=args.top_k, w=args.w, u=args.u, steps=args.steps, call_kwargs=search_call,
                  progress=False)
    variants = {
        "plain": dict(batch_size=len(items)),
        "batched": dict(batch_size=args.batch_size),
        "halving": dict(batch_size=args.batch_size, halving_keep=args.halving_keep, screen_items=args.screen_items,
                        screen_steps=args.screen_steps),
    }
    found = {}
    report = {"args": vars(args), "search": {}}
    for name in args.variants:
        t = time.time()
        summary = run_search(pipe, out=out / name, **common, **variants[name])
        found[name] = summary["heads"]
        report["search"][name] = {**summary["search"], "heads": summary["heads"], "baseline": summary["baseline_score"],
                                  "round_best": [r["score"] for r in summary["rounds"]], "wall_s": time.time() - t}
        print(name, json.dumps(report["search"][name]), flush=True)
    first = args.variants[0]
    report["overlap"] = {name: len(set(found[name]) & set(found[first])) for name in found}
    print("overlap with", first, report["overlap"], flush=True)

    heads = found[args.variants[-1]]
    layers = sorted({h.rpartition(":")[0] for h in heads})
    steer = dict(perturbation_scale=args.w, softpag_u=args.u)
    found_name = f"found ({len(heads)} heads)"
    methods = {"none": {}, found_name: {**steer, "perturbed_heads": heads}}
    for layer in layers:
        methods[f"layer {layer}"] = {**steer, "perturbed_heads": f"{layer}:*"}
    if len(layers) > 1:
        methods["all found layers"] = {**steer, "perturbed_heads": " ".join(f"{layer}:*" for layer in layers)}
    prompts = prompt_set("two", "heldout")[:args.heldout_prompts]
    seeds = list(range(args.heldout_seeds))
    for cfg in (c or defaults.get("guidance_scale", 5.0) for c in args.eval_cfgs):
        label = "cfg off" if cfg == 1 else f"cfg {cfg}"
        t = time.time()
        result = evaluate(pipe, prompts, seeds, methods, {**defaults, "guidance_scale": cfg,
                                                          "num_inference_steps": args.steps}, batch_size=50)
        against_found = paired(result["records"], found_name)
        report[f"heldout {label}"] = {"cfg": cfg, "summary": result["summary"], "paired": result["paired"],
                                      "paired_found": against_found, "wall_s": time.time() - t}
        print(f"held-out, {label} (CFG {cfg}), heads {heads}:\n" + table(result["summary"]) + "\n"
              + paired_table(result["paired"], "none") + "\n" + paired_table(against_found, found_name), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

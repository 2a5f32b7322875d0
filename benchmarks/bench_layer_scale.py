"""Which perturbation scale w to search heads at: every whole self/joint layer perturbed at each w, on
shapes prompts of the "tune" split, as paired differences from no perturbation (same prompts and seeds).

A head search at a w where every layer only hurts finds heads that hurt least; this probe, on prompts
the held-out report never uses, shows where perturbing helps at all.

    python benchmarks/bench_layer_scale.py --model shapes-sd3 --first 75 --scales 0.5 1.5
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-sd3")
    p.add_argument("--set", default="two", choices=["one", "two", "three"])
    p.add_argument("--first", type=int, default=0, help="first tune prompt used (earlier ones: left to the search)")
    p.add_argument("--count", type=int, default=75, help="tune prompts used")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.5])
    p.add_argument("--u", type=float, default=1.0)
    p.add_argument("--image-mode-scales", type=float, nargs="*", default=[1.5],
                   help="scales also measured with perturbation_mode='image'")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="write the summary and paired differences here as JSON")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from attnsteer.guidance.shapes import prompt_set

    size = len(prompt_set(args.set, "tune"))
    if not 0 <= args.first < size:
        p.error(f"--first {args.first} is not a tune prompt of set {args.set!r} (0 to {size - 1})")
    for name in ("count", "seeds", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be at least 1")
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from attnsteer.attention_processors import JOINT, SELF
    from attnsteer.guidance.shapes import prompt_set
    from attnsteer.pipelines.cli import load_pipeline
    from attnsteer.pipelines.evaluate import evaluate, paired_table, table

    pipe, _ = load_pipeline(args.model, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    n_layers = sum(info.kind in (SELF, JOINT) for info in pipe.steer_layers().values())
    prompts = prompt_set(args.set, "tune")[args.first:args.first + args.count]
    methods = {"none": {}}
    runs = [(w, "joint") for w in args.scales] + [(w, "image") for w in args.image_mode_scales]
    for w, mode in runs:
        for i in range(n_layers):
            methods[f"layer {i} w {w} {mode}"] = dict(perturbation_scale=w, softpag_u=args.u,
                                                      perturbed_heads=f"{i}:*", perturbation_mode=mode)
    for kwargs in methods.values():
        pipe.perturbation_guidance(**kwargs)  # a bad w or u is refused before any image is made
    t = time.time()
    result = evaluate(pipe, prompts, list(range(args.seeds)), methods,
                      {**pipe.call_defaults, "num_inference_steps": args.steps}, batch_size=50)
    print(table(result["summary"]) + "\n\n" + paired_table(result["paired"], "none"))
    print(f"{len(methods)} methods x {len(prompts) * args.seeds} images in {time.time() - t:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "summary": result["summary"], "paired": result["paired"]}, f, indent=1)


if __name__ == "__main__":
    main()

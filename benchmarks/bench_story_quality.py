"""IR-Diffusion on the shipped shapes models: do the subjects of a scene look like their references?

Each two-object scene ("a red circle and a blue square") has two subjects ("a red circle", "a blue
square"). Seed s gives row k of a story call the seed 10 s + k: the references (rows 0, 1) are the
subjects drawn alone, the same images in every row below, and the target is row 2. Rows:
    independent: the scene drawn alone at seed 10 s + 2 (no IR);
    shared: the scene reads the references where they sit, subjects not isolated (ConsiStory style);
    isolation: isolation only, no reading;
    ir: isolation, repositioned reading and mutual cross-attention (IR-Diffusion as its authors run it).
Per target: consistency, the mean over its subjects of ``attribute_match`` (size, shade, texture)
between the subject in the reference and in the target (0 when either is missing); coverage and
count right of the target. Each row is paired against "independent" on the same scenes and seeds.
Subject masks (--masks): "maps", the subjects' cross-attention maps (the pipeline's default); or
"detector", ``segment_subjects``' masks (the shapes detector's) on the independent row's references and
target: the same seeds, so the same as ``story_segmenter=segment_subjects``, drawn once for every
row. A stand-in for the authors' GroundingDINO + SAM masks, which separates what IR's attention does
from how well the maps find the subjects.

    python benchmarks/bench_story_quality.py --model shapes-sd --split heldout --count 150 --seeds 2 --out story.json
"""

from __future__ import annotations

import argparse
import time

import torch
from measure import paired_report

ROWS = {"independent": None, "shared": dict(story_isolation=False, story_reposition=False, story_mutual=0.0),
        "isolation": dict(story_read=False), "ir": {}}
METRICS = ("consistency", "coverage", "count_right")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-sd", choices=["shapes-sd", "shapes-sd3"])
    p.add_argument("--split", default="tune", choices=["tune", "heldout"])
    p.add_argument("--first", type=int, default=0, help="first scene of the split")
    p.add_argument("--count", type=int, default=40, help="scenes")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per scene")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--read-layers", default="decoder", choices=["decoder", "all"],
                   help="layers where targets read the references: the decoder's (the paper's) or every self-attention layer")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout of the scene's reading queries, per token at each grid (the authors' 0.5)")
    p.add_argument("--masks", default="maps", choices=["maps", "detector"],
                   help="subject masks: the cross-attention maps, or the detector's on the independent images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the records and tables here (JSON)")
    args = p.parse_args()
    if args.count < 1 or args.seeds < 1 or args.first < 0:
        p.error("--count and --seeds must be at least 1, --first at least 0")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout {args.dropout}: must be in [0, 1)")
    if "independent" not in args.rows:
        p.error("--rows: the others are paired against 'independent', which must run")
    return args


def scored(references, target, scene: str) -> dict:
    from attnsteer.guidance.shapes import attribute_match, detect, parse_caption, score, subject

    found = detect(target)
    result = score(found, scene)
    matches = [attribute_match(subject(detect(ref), c, s), subject(found, c, s))
               for ref, (c, s) in zip(references, parse_caption(scene))]
    return {"consistency": sum(matches) / len(matches), "per_subject": matches, "coverage": result["coverage"],
            "count_right": float(result["count_right"])}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from attnsteer.guidance.shapes import parse_caption, prompt_set, segment_subjects
    from attnsteer.pipelines.cli import load_pipeline

    pipe, _ = load_pipeline(args.model, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 20, **pipe.call_defaults, "output_type": "pil"}  # as attnsteer eval
    from attnsteer.pipelines.parent import denoiser
    from attnsteer.pipelines.story import self_layers

    options = {"story_dropout": args.dropout}
    if args.read_layers == "all":
        options["story_read_layers"] = self_layers(denoiser(pipe))
    scenes = prompt_set("two", args.split)[args.first:args.first + args.count]
    records, t = [], time.time()
    for scene in scenes:
        subjects = [f"a {c} {s}" for c, s in parse_caption(scene)]
        for seed in range(args.seeds):
            base = 10 * seed
            references = None
            for row in [r for r in ROWS if r in args.rows]:  # independent first: its references serve all
                if ROWS[row] is None:
                    references = [pipe(s, generator=torch.Generator().manual_seed(base + k), **call).images[0]
                                  for k, s in enumerate(subjects)]
                    target = pipe(scene, generator=torch.Generator().manual_seed(base + len(subjects)), **call).images[0]
                    if args.masks == "detector":
                        options["story_masks"] = segment_subjects(references + [target], subjects)
                else:
                    images = pipe(scene, story_subjects=subjects, generator=torch.Generator().manual_seed(base),
                                  **ROWS[row], **options, **call).images
                    target = images[-1]
                    references = references or images[:-1]
                records.append({"row": row, "prompt": scene, "seed": seed, **scored(references, target, scene)})
    heading = (f"{args.model}, two-object {args.split} scenes {args.first}..{args.first + len(scenes) - 1} x seeds "
               f"0..{args.seeds - 1}, {call.get('num_inference_steps')} steps, read layers {args.read_layers}, "
               f"dropout {args.dropout}, {args.masks} masks; {time.time() - t:.0f} s")
    paired_report(records, args.rows, "independent", METRICS, heading, args.out, args)


if __name__ == "__main__":
    main()

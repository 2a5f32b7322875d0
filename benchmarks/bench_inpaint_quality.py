"""Inpainting an object into a drawn scene on shapes-sd, plain and steered: is the asked object drawn in
the mask, with its colour, and is the rest of the picture left alone?

For each two-object caption ("a red circle and a blue square") and seed s, the scene generator lays out
both objects (``draw_objects``, seeded by s and the caption) and draws the first alone: the picture. The mask is the
second object's box grown by ``--margin`` pixels; the prompt is the whole caption. shapes-sd's
inpainting pipeline (``steer_pipeline(StableDiffusionInpaintPipeline)`` on the shipped weights, strength
1) redraws the mask, at seed s, per row:
    plain: no method;
    heads: head perturbation, all heads of layer 2, w = 3, u = 1 (the setting of shapes-sd's text-to-image
        rows in BENCHMARKS.md);
    astar: A-STAR on the two nouns, alpha 5 (chosen on tune prompts for shapes-sd's text-to-image rows).
Per picture: "drawn", 1 when the detector finds the asked object (its shape and colour) with its centre
inside the mask; "kept", 1 when it finds the first object outside the mask; "outside", the mean absolute
change of the pixels outside the mask (0-255, all channels). Each row is paired against "plain" on the
same captions and seeds (seeds grouped by caption).

    python benchmarks/bench_inpaint_quality.py --split heldout --count 150 --seeds 2 --out inpaint.json
"""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np
import torch
from measure import paired_report

ROWS = {"plain": {}, "heads": dict(perturbed_heads="2:*", perturbation_scale=3.0, softpag_u=1.0),
        "astar": dict(astar_scale=5.0)}
METRICS = ("drawn", "kept", "outside")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="tune", choices=["tune", "heldout"])
    p.add_argument("--first", type=int, default=0, help="first caption of the two-object split")
    p.add_argument("--count", type=int, default=20, help="captions")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per caption")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--margin", type=int, default=4, help="pixels the mask grows beyond the object's box")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the records and tables here (JSON)")
    args = p.parse_args()
    if args.count < 1 or args.seeds < 1 or args.first < 0 or args.margin < 0:
        p.error("--count and --seeds must be at least 1, --first and --margin at least 0")
    if "plain" not in args.rows:
        p.error("--rows: the others are paired against 'plain', which must run")
    return args


def scene(caption: str, seed: int, margin: int):
    """(the picture with the first object alone, the mask [H, W] bool around where the second goes)."""
    from attnsteer.guidance.shapes import parse_caption
    from attnsteer.guidance.shapes.scene import draw_objects, render

    _, _, objects = draw_objects(parse_caption(caption), np.random.default_rng([seed, zlib.crc32(caption.encode())]))
    picture = render(objects[:1])
    x0, y0, x1, y1 = objects[1].box
    mask = np.zeros((picture.height, picture.width), bool)
    mask[max(y0 - margin, 0):y1 + margin, max(x0 - margin, 0):x1 + margin] = True
    return picture, mask


def scored(output, picture, mask, caption: str) -> dict:
    from attnsteer.guidance.shapes import detect, parse_caption

    (c1, s1), (c2, s2) = parse_caption(caption)
    found = detect(output)
    centre = lambda d: mask[(d.box[1] + d.box[3]) // 2, (d.box[0] + d.box[2]) // 2]
    change = np.abs(np.asarray(output, float) - np.asarray(picture, float))[~mask]
    return {"drawn": float(any(d.colour == c2 and d.shape == s2 and centre(d) for d in found)),
            "kept": float(any(d.colour == c1 and d.shape == s1 and not centre(d) for d in found)),
            "outside": float(change.mean())}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from attnsteer.guidance.shapes import parse_caption, prompt_set
    from attnsteer.pipelines.cli import load_pipeline
    from attnsteer.pipelines.steer import steer_pipeline

    pipe = steer_pipeline(StableDiffusionInpaintPipeline).from_pipe(load_pipeline("shapes-sd", "cpu", "float32")[0])
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 20, **pipe.call_defaults, "output_type": "pil", "strength": 1.0}
    captions = prompt_set("two", args.split)[args.first:args.first + args.count]
    records, t = [], time.time()
    for caption in captions:
        nouns = [s for _, s in parse_caption(caption)]
        for seed in range(args.seeds):
            picture, mask = scene(caption, seed, args.margin)
            inputs = dict(image=picture, mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
                          height=picture.height, width=picture.width)
            for row in args.rows:
                extra = dict(ROWS[row], astar_tokens=nouns) if row == "astar" else ROWS[row]
                output = pipe(caption, generator=torch.Generator().manual_seed(seed), **inputs, **extra, **call).images[0]
                records.append({"row": row, "prompt": caption, "seed": seed, **scored(output, picture, mask, caption)})
    heading = (f"shapes-sd inpainting, two-object {args.split} captions {args.first}..{args.first + len(captions) - 1} "
               f"x seeds 0..{args.seeds - 1}, {call['num_inference_steps']} steps, mask margin {args.margin} px; "
               f"{time.time() - t:.0f} s")
    paired_report(records, args.rows, "plain", METRICS, heading, args.out, args)


if __name__ == "__main__":
    main()

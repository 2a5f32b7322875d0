"""IR-Diffusion: the same subjects in several scenes, against each scene drawn on its own.

    python samples/story.py                    # shipped shapes-sd, the first held-out two-object scenes
    python samples/story.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda \\
        --subjects "a corgi" "a red ball" --scenes "a corgi and a red ball on a beach" "a corgi and a red ball in snow"

Each subject is drawn alone first (its reference), then every scene, in one batch: in a scene the
subjects do not attend to each other (isolation), and in the decoder each reads its reference's
features moved onto where it sits (reposition). Row k of the batch has seed --seed + k; the
independent scenes take the same seeds. On held-out scenes of the shapes models IR does not beat
independent generation, with the maps' masks or the detector's (BENCHMARKS.md, "IR-Diffusion (issue
13): the held-out rows"). About 10 seconds on a 2-core CPU.
"""

import torch
from common import call, load, options, save

from attnsteer.guidance.shapes import parse_caption, prompt_set, segment_subjects, subject_colours
from attnsteer.pipelines.story import keeping_images


def main(argv=None):
    p = options(__doc__, "shapes-sd", "samples/out/story")
    p.add_argument("--subjects", nargs="+", default=None,
                   help="one prompt per subject (default: the objects of the first scene, 'a red circle')")
    p.add_argument("--scenes", nargs="+", default=prompt_set("two", "heldout")[:1],
                   help="scene prompts, each naming every subject")
    p.add_argument("--masks", default="maps", choices=["maps", "detector"],
                   help="where the subjects are: their cross-attention maps (default), or the shapes detector on the "
                        "pictures drawn first without IR (shapes models only), which are then the independent scenes")
    args = p.parse_args(argv)
    subjects = args.subjects or [f"a {colour} {shape}" for colour, shape in parse_caption(args.scenes[0])]
    masks, segmenter = {}, None
    if args.masks == "detector":
        subject_colours(subjects)
        segmenter = keeping_images(segment_subjects)
        masks = {"story_segmenter": segmenter}
    pipe = load(args)
    pipe.check_call(prompt=args.scenes, story_subjects=subjects, **masks, **call(args))
    story = pipe(args.scenes, story_subjects=subjects, **masks, **call(args)).images
    references, scenes = story[:len(subjects)], story[len(subjects):]
    if segmenter:  # the first pass drew every row without IR at the same seeds
        independent = segmenter.images[len(subjects):]
    else:
        seeds = [torch.Generator(args.device).manual_seed(args.seed + len(subjects) + j) for j in range(len(scenes))]
        independent = pipe(args.scenes, **{**call(args), "generator": seeds}).images
    grid = save(args.out, f"seed{args.seed}", " | ".join(args.scenes), references + independent + scenes,
                [f"reference: {s}" for s in subjects] + [f"independent: {s}" for s in args.scenes]
                + [f"IR: {s}" for s in args.scenes])
    print(f"{args.model}: {len(subjects)} references and {len(args.scenes)} scenes with IR-Diffusion, and the "
          f"scenes drawn independently at the same seeds, in {args.out}")
    return [grid]


if __name__ == "__main__":
    main()

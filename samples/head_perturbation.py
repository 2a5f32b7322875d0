"""Head perturbation guidance with a found head set: the same prompts and seed without and with it.

    python samples/head_perturbation.py        # shipped shapes-sd3, with the heads the search found for it
    python samples/head_perturbation.py --model stabilityai/stable-diffusion-3-medium-diffusers --device cuda \\
        --heads "transformer_blocks.3.attn:0,5 transformer_blocks.12.attn:*" --scale 3 --u 0.5 --prompts "a corgi"

The default heads (2:3 1:2 3:1 0:1 at w 0.5, u 1, joint identity) are those `attnsteer search-heads`
found on shapes-sd3's tune prompts; on held-out two-object prompts they raise bound by +0.026
[+0.009, +0.044] (BENCHMARKS.md, "Head search"). The prompts are the first held-out two-object prompts.
About 4 minutes on a 2-core CPU (250 s, measured while another job held one core).
"""

from common import call, load, options, save

from attnsteer.guidance.shapes import prompt_set


def main(argv=None):
    p = options(__doc__, "shapes-sd3", "samples/out/head_perturbation")
    p.add_argument("--heads", default="2:3 1:2 3:1 0:1", help="layer:head pairs, by index or module name")
    p.add_argument("--scale", type=float, default=0.5, help="w, the perturbation guidance scale")
    p.add_argument("--u", type=float, default=1.0, help="SoftPAG's u: 1 = the heads' maps become the identity")
    p.add_argument("--mode", default="joint", choices=["joint", "image"])
    p.add_argument("--prompts", nargs="+", default=prompt_set("two", "heldout")[:4])
    args = p.parse_args(argv)
    pipe = load(args)
    steer = dict(perturbed_heads=args.heads, perturbation_scale=args.scale, softpag_u=args.u,
                 perturbation_mode=args.mode)
    for prompt in args.prompts:
        pipe.check_call(prompt=prompt, **steer)
    label = f"heads {args.heads}, w {args.scale:g}, u {args.u:g}"
    grids = []
    for i, prompt in enumerate(args.prompts):
        baseline = pipe(prompt, **call(args)).images[0]
        steered = pipe(prompt, **steer, **call(args)).images[0]
        grids.append(save(args.out, f"prompt{i}", prompt, [baseline, steered], ["baseline", label]))
    print(f"{args.model}: {len(args.prompts)} prompts at seed {args.seed}, without and with head perturbation "
          f"({label}, {args.mode} identity), in {args.out}")
    return grids


if __name__ == "__main__":
    main()

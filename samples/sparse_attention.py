"""Block-sparse attention on a video model: the same prompts and seed with dense attention, DraftAttention
at several sparsities, and the Radial and sliding-tile static masks.

    python samples/sparse_attention.py         # shapes-wan
    python samples/sparse_attention.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --prompts "a cat walking on grass" --frames 81

Writes one GIF per prompt with the videos side by side. The first 30% of the steps stay dense (the
authors' warm-up). Speed on this CPU: BENCHMARKS.md ("Block-sparse attention"). A few minutes on a
2-core CPU.
"""

from common import call, load, options, save_video

from attnsteer.guidance.shapes import video_prompt_set
from attnsteer.pipelines.frames import check_frames, parent_frames

CONFIGS = {"dense": {}, "draft 0.5": dict(sparsity=0.5), "draft 0.75": dict(sparsity=0.75),
           "draft 0.9": dict(sparsity=0.9), "radial": dict(sparse_mask="radial"), "tile": dict(sparse_mask="tile")}


def main(argv=None):
    p = options(__doc__, "shapes-wan", "samples/out/sparse_attention")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--frames", type=int, default=None, help="video frames that come out (default: the model's clip)")
    p.add_argument("--prompts", nargs="+", default=video_prompt_set("one-moving", "heldout")[:2])
    p.add_argument("--pool", type=int, nargs=2, default=None, metavar=("ROWS", "COLUMNS"),
                   help="tokens a block in each frame (default: the pipeline's, about 128 tokens)")
    p.add_argument("--tile", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                   help="the tile mask's window of blocks (default: the pipeline's)")
    args = p.parse_args(argv)
    pipe = load(args)
    pool = {"sparse_pool": tuple(args.pool)} if args.pool else {}
    tile = {"sparse_tile": tuple(args.tile)} if args.tile else {}
    configs = {name: {**config, **pool, **(tile if name == "tile" else {})} if config else {}
               for name, config in CONFIGS.items()}
    frames = {}
    if args.frames is not None:  # WanPipeline's num_frames, which adds a frame at temporal factor 1
        check_frames("--frames", args.frames, pipe.vae_scale_factor_temporal)
        frames = {"num_frames": parent_frames(args.frames, pipe.vae_scale_factor_temporal)}
    for prompt in args.prompts:
        for name in args.configs:
            pipe.check_call(prompt=prompt, **frames, **configs[name])
    gifs = []
    for i, prompt in enumerate(args.prompts):
        videos = [pipe(prompt, **frames, **configs[name], **call(args), output_type="pil").frames[0]
                  for name in args.configs]
        gifs.append(save_video(args.out, f"prompt{i}", prompt, videos, args.configs))
    print(f"{args.model}: {len(args.prompts)} prompts at seed {args.seed} with {', '.join(args.configs)} attention, "
          f"in {args.out}")
    return gifs


if __name__ == "__main__":
    main()

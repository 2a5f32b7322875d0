"""Long video: a video model asked for several times its clip, directly, with FIFO-Diffusion, and with
FIFO plus Ouroboros-Diffusion, at the same seed.

    python samples/long_video.py               # shapes-wan, 8x its 17-frame clip
    python samples/long_video.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --prompt "a cat walking on grass" --subjects cat --frames 321

Writes one GIF with the three videos side by side. FIFO runs with lookahead and --partitions
windows; Ouroboros adds its coherent tail and, with --subjects (default: the shapes prompt's object
nouns), subject-aware cross-frame attention and self-recurrent guidance. Quality on shapes-wan:
BENCHMARKS.md ("FIFO-Diffusion"). Minutes on a 2-core CPU.
"""

from common import call, load, options, save_video

from attnsteer.guidance.shapes import caption_concepts, video_prompt_set
from attnsteer.pipelines.fifo import OUROBOROS_GUIDANCE, fifo_pipeline
from attnsteer.pipelines.frames import parent_frames, trained_frames


def main(argv=None):
    p = options(__doc__, "shapes-wan", "samples/out/long_video")
    p.add_argument("--prompt", default=video_prompt_set("one-moving", "heldout")[0])
    p.add_argument("--frames", type=int, default=None, help="video frames (default: 8x the model's clip)")
    p.add_argument("--partitions", type=int, default=4, help="FIFO's n: windows in the queue")
    p.add_argument("--subjects", nargs="+", default=None, help="Ouroboros' subject words (default: the object nouns)")
    args = p.parse_args(argv)
    pipe = load(args)
    fifo = fifo_pipeline(pipe)
    fifo.set_progress_bar_config(disable=True)
    clip = trained_frames(pipe.call_defaults, pipe.vae_scale_factor_temporal)
    frames = args.frames or 8 * (clip - 1) + 1
    subjects = args.subjects or caption_concepts(args.prompt)
    fifo.check_fifo(frames, args.partitions, clip, False, None, 0, args.prompt)
    fifo.check_ouroboros(subjects, OUROBOROS_GUIDANCE, [args.prompt], pipe.call_defaults.get("max_sequence_length"),
                         partitions=args.partitions)
    direct = parent_frames(frames, pipe.vae_scale_factor_temporal)  # WanPipeline adds a frame at temporal factor 1
    runs = {"direct": lambda: pipe(args.prompt, num_frames=direct, **call(args), output_type="pil"),
            "FIFO": lambda: fifo(args.prompt, num_frames=frames, fifo_partitions=args.partitions, **call(args),
                                 output_type="pil"),
            "FIFO + Ouroboros": lambda: fifo(args.prompt, num_frames=frames, fifo_partitions=args.partitions,
                                             ouroboros_tail=True, ouroboros_subjects=subjects, **call(args),
                                             output_type="pil")}
    videos = [run().frames[0] for run in runs.values()]
    gif = save_video(args.out, f"seed{args.seed}", args.prompt, videos, list(runs))
    print(f"{args.model}: {frames} frames ({frames / clip:.1f}x its {clip}-frame clip) of {args.prompt!r} at seed "
          f"{args.seed}: directly, with FIFO-Diffusion (n = {args.partitions}, lookahead) and with Ouroboros on "
          f"{', '.join(subjects)}, in {gif}")
    return [gif]


if __name__ == "__main__":
    main()

"""Cost of IR-Diffusion per denoising step: a scene with its references against the same batch without IR.

The UNet has the real SDXL shape (or SD1.5's) with random weights (bench_astar.build); latents only.
Both configurations run the batch [reference 1, reference 2, scene] with CFG: "plain" as three
independent prompts, "ir" with story_subjects (isolation on every self-attention layer, repositioned
reading in the decoder, masks from the subjects' maps of the previous step; the first, mask-less step
is the untimed warm-up). Timing and peak memory as in bench_astar.

    python benchmarks/bench_story.py --model sdxl --size 1024 --steps 5 --repeats 3 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench_astar import build  # benchmarks/bench_astar.py, beside this script
from measure import device_options, interleaved, peak_bytes, peak_in_own_process, step_seconds

SCENE, SUBJECTS = "a cat and a dog", ["a cat", "a dog"]
CONFIGS = {"plain": "the same 3 prompts without IR", "ir": "IR-Diffusion: 2 references + 1 scene"}


def timed_call(pipe, config: str, size: int, steps: int, device: str) -> list[float]:
    """Seconds of each denoising step after the first of one call."""
    import torch

    common = dict(height=size, width=size, num_inference_steps=steps + 1, guidance_scale=7.5, output_type="latent",
                  generator=[torch.Generator(device).manual_seed(k) for k in range(3)])
    if config == "ir":
        return step_seconds(lambda stamp: pipe(SCENE, story_subjects=SUBJECTS, callback_on_step_end=stamp, **common), device)
    return step_seconds(lambda stamp: pipe(SUBJECTS + [SCENE], callback_on_step_end=stamp, **common), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", choices=["sd15", "sdxl"], help="UNet shape")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per call (one more runs as warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of both configurations")
    device_options(parser)
    args = parser.parse_args()
    if args.size % 64 or args.size < 64:
        parser.error(f"--size {args.size}: a multiple of 64, at least 64")
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps {args.steps} and --repeats {args.repeats} must be at least 1")

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        pipe = build(args.one, args.model, args.device, args.dtype, tiny=args.tiny)
        print(json.dumps(peak_bytes(lambda: timed_call(pipe, args.one, args.size, 1, args.device), args.device)))
        return
    pipe = build("plain", args.model, args.device, args.dtype, tiny=args.tiny)
    results = interleaved(CONFIGS, lambda c: timed_call(pipe, c, args.size, args.steps, args.device), args.repeats)
    del pipe
    for config in CONFIGS:
        results[config]["peak_bytes"] = peak_in_own_process(__file__, config, args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} UNet shape, {args.size}x{args.size}, batch of 3 with CFG, {args.dtype}, {name}, "
          f"{args.repeats} rounds x {args.steps} timed steps\n")
    print("| configuration | s / step, median | x plain | peak memory beyond the model (MiB) |")
    print("|---|---|---|---|")
    base = statistics.median(results["plain"]["step_s"])
    for config, r in results.items():
        mid = statistics.median(r["step_s"])
        print(f"| {CONFIGS[config]} | {mid:.4f} | {mid / base:.2f} | {r['peak_bytes'] / 2**20:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

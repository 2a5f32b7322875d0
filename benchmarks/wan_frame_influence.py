"""How far a trained shapes-wan transformer looks across latent frames.

Fresh drawn clips are encoded with the model's VAE (posterior mean, normalised as in training) and
noised to one sigma per run. The transformer's x0 prediction is taken twice: as they are, and with latent
frame 0 replaced by another clip's noisy frame 0 (the same noise level). The mean squared change of the
prediction per latent frame says how much each frame's prediction depends on frame 0: the frame itself
(its own input changed) against the frames after it. A model that holds its objects through a clip has to
carry them from frame to frame, so the later frames must depend on the earlier ones.

With --images N it also draws N held-out single-object prompts as one frame each and scores them
(binding: the share drawn right), the image half of what the model must do.

    python benchmarks/wan_frame_influence.py --model OUT --clips 16 --sigmas 0.5 0.8 0.95 [--images 60]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import WanPipeline

from attnsteer.pipelines.frames import wan_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
import train_shapes_wan as wan  # noqa: E402


@torch.no_grad()
def frame_influence(pipe, call: dict, clips: int, sigmas: list[float], seed: int = 77) -> dict[float, list[float]]:
    """{sigma: [mean squared change of the x0 prediction in each latent frame when frame 0 is swapped]}, on
    ``clips`` clips of the trained size (``call``: attnsteer.json's call defaults; the clips have the frames
    WanPipeline makes for its num_frames), encoded with the model's per-frame VAE."""
    vae, transformer = pipe.vae, pipe.transformer
    frames = wan_frames(call["num_frames"], vae.config.scale_factor_temporal)  # as WanPipeline makes them
    size = str(call["height"])
    args = wan.parse_args(["--n-clips", str(clips), "--seed", str(seed), "--frames", str(frames), "--size", size,
                           "--vae-crop", size, "--short-frames", str(frames)])  # the training script's drawing options
    video, captions = wan.draw_clips(args)
    shape = (1, -1, 1, 1, 1)
    mean, std = (torch.tensor(getattr(vae.config, k)).view(shape) for k in ("latents_mean", "latents_std"))
    z0 = (wan.encode_clips(vae, wan.to_video(video))[0] - mean) / std
    text, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                 max_sequence_length=call["max_sequence_length"], device="cpu")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for sigma in sigmas:
        xt = (1 - sigma) * z0 + sigma * torch.randn(z0.shape, generator=generator)
        t = torch.full((len(captions),), sigma * 1000)

        def x0(x):
            return x - sigma * transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

        swapped = xt.clone()
        swapped[:, :, 0] = xt.roll(1, 0)[:, :, 0]  # the next clip's noisy frame 0
        out[sigma] = (x0(swapped) - x0(xt)).square().mean((0, 1, 3, 4)).tolist()
    return out


def clip_count(text: str) -> int:
    """--clips: at least 2, since frame 0 is swapped with another clip's."""
    return wan._number(int, text, lambda v: v >= 2, "a whole number >= 2 (frame 0 comes from another clip)")


def noise_level(text: str) -> float:
    return wan._number(float, text, lambda v: 0 < v <= 1, "a noise level in (0, 1]")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a shapes-wan pipeline folder (train_shapes_wan.py --output)")
    p.add_argument("--clips", type=clip_count, default=16, help="fresh clips (default 16)")
    p.add_argument("--sigmas", type=noise_level, nargs="+", default=[0.5, 0.8, 0.95],
                   help="noise levels (default 0.5 0.8 0.95)")
    p.add_argument("--threads", type=wan.positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--images", type=wan.whole, default=0,
                   help="also held-out single-object prompts drawn as one frame and scored (default 0: none)")
    p.add_argument("--json", default=None, help="also write the results here (default: none)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    call = json.loads((Path(args.model) / "attnsteer.json").read_text())["call"]
    pipe = WanPipeline.from_pretrained(args.model)
    result = frame_influence(pipe, call, args.clips, args.sigmas)
    print("sigma   change of x0 per latent frame when frame 0 is swapped   (frame k / frame 0)")
    for sigma, change in result.items():
        print(f"{sigma:5.2f}   " + " ".join(f"{c:7.4f}" for c in change)
              + "   (" + " ".join(f"{c / change[0]:.3f}" for c in change[1:]) + ")")
    binding = None
    if args.images:
        binding = wan.single_frame_binding(pipe, call, wan.single_prompts(args.images, "heldout"))
        print(f"single-frame binding on {args.images} held-out single-object prompts: {binding:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "clips": args.clips, "result": result,
                                               "single_frame_binding": binding}, indent=1))


if __name__ == "__main__":
    main()

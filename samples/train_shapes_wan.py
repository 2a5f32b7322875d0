"""Train "shapes-wan": a small, real WanPipeline on procedural moving-shapes clips.

The model is Wan 2.1's text-to-video layout, only tiny: a WanTransformer3DModel (self-attention over
all video tokens, cross-attention to the text), an AutoencoderKLWan with Wan's own causal 4x temporal
compression (1 + 4k frames -> 1 + k latent frames) and 4x spatial compression to 16 channels, and a
UMT5EncoderModel trained from scratch, with the real CLIP BPE tokenizer saved as the pipeline's
tokenizer (as attnsteer.pipelines.tiny pairs them). It is trained as text-to-video models are: one
noise level per clip, rectified flow (x_t = (1 - s) x0 + s n, target n - x0, s logit-normal, as
shapes-sd3), 10% caption dropout to "" so that classifier-free guidance works, and an EMA, which is
what gets saved. Text goes through the pipeline's own encode_prompt at the max_sequence_length that
generation uses, so training and inference see the same text tokens.

1. Clips: --n-clips clips of --frames frames at --size px from guidance.shapes.draw_video (1 or 2
   objects moving, bouncing off the border; a motion named in the caption half the time).
2. VAE: trained on random single frames (the spatial path, as Wan's VAE started from an image VAE),
   then random clip crops (--vae-frames frames from any start, --vae-crop px squares), then whole clips
   (a crop-trained VAE degrades in the frames after the crop's length), all in small batches: this VAE
   learns per step far more than per sample. MSE + L1 with the pixels off the background grey weighted
   --vae-object-weight (unweighted, 400 steps drew every object in one brown). latents_mean /
   latents_std are set per channel from the encoded clips.
3. Every clip encoded once (posterior mean and std kept, a latent sampled per step) and cached with its
   caption: a resumed run neither redraws nor re-encodes (--vae-only stops here, to tune the VAE).
4. Text encoder + transformer, jointly from scratch, on videos and images as Wan itself was trained:
   --image-ratio of the steps are image steps, --image-batch single frames (each clip's first frame,
   whose latent is the clip latent's first frame because the VAE is causal; captions without their
   motion words). An image is 64 tokens against a clip's 320 and carries a new scene, so appearance and
   text binding are learned at a fraction of a clip's cost; motion and consistency come from the clips.
5. With --decoder-steps: a decoder (--decoder-dim base channels) trained on whole clips for the frozen
   encoder, so the latent space the transformer learned stays; the VAE check runs again on it.
Then a few tune-prompt videos are generated and scored with the video metrics (and a contact sheet of
them written to --work).

Why 17 frames at 64x64: 64 px is the size the shapes detector is built and tested for (objects 14-26
px; at 32 px it already misreads 9% of clean drawn two-object scenes, at 48 px 1.5%), and 17 frames
(5 latent frames, 5 x 8 x 8 = 320 video tokens with patch 1x2x2) is the shortest clip with several
latent frames after the first, which is what frame-queue and sparse-attention video methods act on, and
long enough for a named motion to travel 16-32 px. A step costs about linearly in tokens here, so twice
the frames or pixels would halve the transformer steps two cores manage in two hours (see below).

Sizing, measured on the idle 2-core AMD EPYC with 2 threads: drawing 1.4 min; the VAE stage 50 min
(5800 steps: 0.19 s on 8 frames, 0.65 s on 2 clip crops, 1.8 s on a whole clip); encoding 5.3 min;
the transformer + text encoder 0.37 s a step at batch 8 clips / 32 images, half and half (1.6-1.7 s at
32 clips, 1.2 s at 128 images). The third run (BENCHMARKS.md, "shapes-wan"), 120 minutes in all; its
videos lose their objects after the first frames, so no shapes-wan is shipped yet:

    HF_HUB_OFFLINE=1 python samples/train_shapes_wan.py --output OUT --work /tmp/shapes-wan-work \
        --threads 2 --batch 8 --image-ratio 0.5 --image-batch 32 --steps 12000 --max-minutes 63

With --device cuda the models train on a GPU (clips are still drawn on the CPU). On one H200 a step costs
about the same at any batch used here (0.025 s for 32 single frames, 0.2 s for 8 whole clips in the VAE,
0.055 s for 64 clips in the transformer): the model is too small to fill it, so a GPU buys batch, not
steps. The fourth run (BENCHMARKS.md), 7.6 H200 minutes with 5x the third run's clips, was no better;
nor were the fifth (--train-shift 3) and the sixth (also --frame-noise 0.5). In all of them a latent
frame is denoised almost from itself (benchmarks/wan_frame_influence.py measures how far the transformer
looks across frames).

A state checkpoint is written under --work every --ckpt-every steps (and the pipeline saved to --output
at the same time); rerunning the same command resumes from it.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from PIL import Image
from transformers import UMT5Config, UMT5EncoderModel

from attnsteer.guidance.shapes import draw_video, score_video, summarize_videos, video_prompt_set
from attnsteer.guidance.shapes.scene import BACKGROUND
from attnsteer.pipelines.tiny import clip_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapes_sd import (  # noqa: E402
    cosine_lr, decayed, encode_dataset, end_step, fit_decoder, n_params, open_log, optimizer_step, positive_int,
    weights_option,
)

VOCAB_SIZE, EOS_ID = 49408, 49407
SPATIAL, TEMPORAL = 4, 4  # the VAE's compression: two downsampling stages, both also temporal
PATCH = (1, 2, 2)
BACKGROUND_TOL = 0.02  # a pixel this far (in [-1, 1]) from the scenes' grey on some channel is off the background
MOTION = re.compile(r" moving \w+")
LOGVAR_INIT = -6.0  # the VAE posterior's initial log-variance: std 0.05


# ----------------------------------------------------------------------------- options

def _number(kind, text, test, what):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not test(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def clip_frames(text):
    """--frames, --vae-frames: 1 + 4k frames, as the VAE's 4x temporal compression needs."""
    return _number(int, text, lambda v: v >= 1 and v % TEMPORAL == 1, "1 + 4k frames (1, 5, 9, 13, 17, ...)")


def frame_side(text):
    """--size: a multiple of 16 pixels, as WanPipeline needs (VAE 4x, patch 2)."""
    return _number(int, text, lambda v: v >= 16 and v % 16 == 0, "a multiple of 16 pixels >= 16")


def crop_side(text):
    """--vae-crop: a multiple of 4 pixels (the VAE's latent grid), at least 8."""
    return _number(int, text, lambda v: v >= 8 and v % SPATIAL == 0, "a multiple of 4 pixels >= 8")


def head_dim(text):
    """--head-dim: even and >= 6, so that Wan's 3-axis rotary embedding gets even parts."""
    return _number(int, text, lambda v: v >= 6 and v % 2 == 0, "an even number >= 6")


def whole(text):
    """A count that may be zero (steps of an optional stage, videos to score)."""
    return _number(int, text, lambda v: v >= 0, "a whole number >= 0")


def torch_device(text):
    """--device: a torch device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device here: cpu{', cuda' if torch.cuda.is_available() else ' (no cuda available)'}")
    return str(device)


def positive_number(text):
    return _number(float, text, lambda v: v > 0, "a number > 0")


def probability(text):
    return _number(float, text, lambda v: 0 <= v <= 1, "a probability in [0, 1]")


def non_negative(text):
    return _number(float, text, lambda v: v >= 0, "a number >= 0")


object_weights = weights_option(2, "1- and 2-object clips", "1,1")  # --object-weights: P(1 object), P(2 objects)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="samples/models/shapes-wan")
    p.add_argument("--work", default="/tmp/shapes-wan-work", help="checkpoints, VAE, cached latents, log")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads, and processes drawing clips")
    p.add_argument("--device", type=torch_device, default="cpu",
                   help="where the models train and generate: cpu (default) or cuda (clips are drawn on the CPU)")
    # data
    p.add_argument("--n-clips", type=positive_int, default=6000, help="drawn training clips")
    p.add_argument("--frames", type=clip_frames, default=17, help="frames per clip: 1 + 4k")
    p.add_argument("--size", type=frame_side, default=64, help="frame side in pixels")
    p.add_argument("--object-weights", type=object_weights, default="1,1", help="P(1, 2 objects) per clip")
    p.add_argument("--named", type=probability, default=0.5, help="chance a caption names an object's motion")
    # VAE
    p.add_argument("--vae-dim", type=positive_int, default=12, help="encoder base channels")
    p.add_argument("--vae-decoder-dim", type=positive_int, default=16, help="decoder base channels")
    p.add_argument("--z-dim", type=positive_int, default=16, help="latent channels")
    p.add_argument("--vae-image-steps", type=whole, default=3000,
                   help="first, steps on single frames (crops of any frame): the spatial path, in many cheap steps")
    p.add_argument("--vae-image-batch", type=positive_int, default=8)
    p.add_argument("--vae-steps", type=positive_int, default=2500, help="then steps on clip crops")
    p.add_argument("--vae-full-steps", type=whole, default=300,
                   help="then steps on whole clips (crop-trained VAEs degrade after the crop's length)")
    p.add_argument("--vae-batch", type=positive_int, default=2,
                   help="clip crops a step (small: this VAE learns per step, not per sample)")
    p.add_argument("--vae-full-batch", type=positive_int, default=1)
    p.add_argument("--vae-frames", type=clip_frames, default=17,
                   help="frames per crop: 1 + 4k (9-frame crops left the last latent chunks' colours drifting)")
    p.add_argument("--vae-crop", type=crop_side, default=32, help="crop side in pixels")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=non_negative, default=0.0,
                   help="0: Adam turns even a 1e-6 KL into full-size steps on the log-variance of latents the "
                        "decoder does not use yet (the posterior std rose from 0.05 to 0.8 in 400 steps)")
    p.add_argument("--vae-object-weight", type=non_negative, default=5.0,
                   help="VAE loss weight of pixels off the background grey (objects and their edges): with 1, "
                        "400 steps drew every object in one brown; with 5 they had their colours")
    p.add_argument("--vae-only", action="store_true", help="stop after the VAE stage and its check (to tune it)")
    p.add_argument("--decoder-steps", type=whole, default=0,
                   help="after the transformer: steps of a decoder trained on whole clips for the frozen encoder, whose "
                        "latent space (the transformer's) stays as it is")
    p.add_argument("--decoder-dim", type=positive_int, default=None,
                   help="that decoder's base channels (default --vae-decoder-dim: it then starts from the trained one)")
    p.add_argument("--decoder-lr", type=non_negative, default=1e-3)
    # transformer + text encoder
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--head-dim", type=head_dim, default=32)
    p.add_argument("--ffn", type=positive_int, default=512, help="feed-forward width")
    p.add_argument("--te-dim", type=positive_int, default=32, help="UMT5 d_model (= the transformer's text_dim)")
    p.add_argument("--te-layers", type=positive_int, default=3)
    p.add_argument("--max-seq", type=positive_int, default=16,
                   help="max_sequence_length in training and generation (the longest caption is 13 tokens)")
    # training
    p.add_argument("--steps", type=positive_int, default=11000)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--image-ratio", type=probability, default=0.0, help="fraction of steps that train on images")
    p.add_argument("--image-batch", type=positive_int, default=128, help="images in an image step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=positive_int, default=100)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay floor, fraction of --lr")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--drop", type=probability, default=0.1, help="caption dropout to the empty prompt")
    p.add_argument("--shift", type=float, default=3.0,
                   help="sampling shift of the saved FlowMatchEulerDiscreteScheduler")
    p.add_argument("--frame-noise", type=probability, default=0.0,
                   help="fraction of clip steps whose latent frames each get their own noise level (as diffusion "
                        "forcing; a frame must then be read from its less noisy neighbours), default 0: one per clip")
    p.add_argument("--train-shift", type=positive_number, default=1.0,
                   help="the sampling shift on the training noise levels (default 1: logit-normal(0, 1) as it is; 3: as "
                        "sampled, more steps at the high noise where a clip's objects are decided)")
    p.add_argument("--default-cfg", type=float, default=5.0, help="guidance_scale written to attnsteer.json")
    p.add_argument("--default-steps", type=positive_int, default=30,
                   help="num_inference_steps written to attnsteer.json")
    p.add_argument("--eval-videos", type=whole, default=16, help="tune-prompt videos generated and scored at the end")
    p.add_argument("--check-clips", type=positive_int, default=24, help="fresh clips the VAE check reconstructs")
    p.add_argument("--ckpt-every", type=positive_int, default=250)
    p.add_argument("--log-every", type=positive_int, default=25)
    p.add_argument("--max-minutes", type=non_negative, default=0,
                   help="if > 0, stop early (saving) once the transformer stage has run this long")
    args = p.parse_args(argv)
    if args.vae_crop > args.size or args.vae_frames > args.frames:
        p.error(f"a VAE crop ({args.vae_frames} frames of {args.vae_crop} px) must fit in a clip "
                f"({args.frames} frames of {args.size} px)")
    return args


# ----------------------------------------------------------------------------- models

def make_vae(args):
    """Wan's VAE with one downsampling stage fewer than Wan 2.1's (4x spatial instead of 8x), both stages
    also temporal; the decoder wider than the encoder (it has the harder job). The posterior starts
    nearly deterministic (std ``exp(LOGVAR_INIT / 2)``): from the default std 1 the decoder sees as much
    noise as signal (after 330 steps it was still 0.89)."""
    z = args.z_dim
    vae = AutoencoderKLWan(
        base_dim=args.vae_dim, decoder_base_dim=args.vae_decoder_dim, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1,
        temperal_downsample=[True, True], scale_factor_spatial=SPATIAL, scale_factor_temporal=TEMPORAL,
        latents_mean=[0.0] * z, latents_std=[1.0] * z,
    )
    with torch.no_grad():
        vae.quant_conv.bias[z:] = LOGVAR_INIT  # quant_conv gives (mean, logvar) channels
    return vae


def make_text_encoder(args):
    """A small UMT5 encoder over the CLIP vocabulary (the tokenizer's ids), no dropout."""
    d = args.te_dim
    return UMT5EncoderModel(UMT5Config(
        vocab_size=VOCAB_SIZE, d_model=d, d_kv=max(4, d // 4), d_ff=4 * d, num_layers=args.te_layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=args.max_seq, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=EOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=0,
    ))


def make_transformer(args):
    """adaLN-zero initialisation (as in DiT): every block's gates and the output start at zero, so the
    model starts as the identity on its residual stream and predicts zero."""
    model = WanTransformer3DModel(
        patch_size=PATCH, num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=args.z_dim,
        out_channels=args.z_dim, text_dim=args.te_dim, freq_dim=256, ffn_dim=args.ffn, num_layers=args.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )
    with torch.no_grad():
        for module in (model.condition_embedder.time_proj, model.proj_out):
            module.weight.zero_()
            module.bias.zero_()
        for block in model.blocks:
            block.scale_shift_table[:, [2, 5]] = 0  # gate_msa, c_gate_msa
    return model


def build_pipeline(vae, text_encoder, transformer, tokenizer, shift):
    """A WanPipeline of these parts and a flow-matching Euler scheduler with sampling ``shift``."""
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))


# ----------------------------------------------------------------------------- data

def _draw_chunk(job):
    """Clips and captions of (seeds, object counts, frames, size, named): one worker's share."""
    seeds, counts, frames, size, named = job
    clips, captions = np.empty((len(seeds), frames, size, size, 3), np.uint8), []
    for i, (seed, n) in enumerate(zip(seeds, counts)):
        images, text, _ = draw_video(int(seed), n_objects=int(n), frames=frames, size=size, named=named)
        clips[i] = np.stack([np.asarray(im) for im in images])
        captions.append(text)
    return clips, captions


def draw_clips(args):
    """--n-clips clips (uint8, clip x frame x H x W x 3) and captions, clip i from seed seed * 10**7 + i, in
    --threads processes."""
    rng = np.random.default_rng(args.seed)
    weights = np.asarray(args.object_weights)
    counts = rng.choice(2, args.n_clips, p=weights / weights.sum()) + 1
    seeds = args.seed * 10**7 + np.arange(args.n_clips)
    if args.threads == 1:
        return _draw_chunk((seeds, counts, args.frames, args.size, args.named))
    bounds = np.linspace(0, args.n_clips, 4 * args.threads + 1).astype(int)
    jobs = [(seeds[a:b], counts[a:b], args.frames, args.size, args.named) for a, b in zip(bounds, bounds[1:]) if b > a]
    with ProcessPoolExecutor(args.threads) as pool:
        parts = list(pool.map(_draw_chunk, jobs))
    return np.concatenate([c for c, _ in parts]), [t for _, texts in parts for t in texts]


def to_video(clips, device="cpu"):
    """uint8 clips (B, F, H, W, 3) as the VAE's input: float (B, 3, F, H, W) in [-1, 1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(clips)).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def to_frames(video):
    """The VAE's output (B, 3, F, H, W) in [-1, 1] as uint8 clips (B, F, H, W, 3)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()


# ----------------------------------------------------------------------------- stages

def reconstruction_loss(rec, x, args):
    """MSE + L1, the pixels off the background grey weighted --vae-object-weight."""
    background = torch.tensor(BACKGROUND, device=x.device).view(1, 3, 1, 1, 1) / 127.5 - 1
    off = (x - background).abs().amax(1, keepdim=True) > BACKGROUND_TOL
    weight = 1 + (args.vae_object_weight - 1) * off
    return ((rec - x).square() + (rec - x).abs()).mul(weight).mean()


def train_decoder(args, vae, log):
    """A decoder (of --decoder-dim base channels) for ``vae``'s frozen encoder, --decoder-steps steps on
    whole training clips (drawn again from their seeds), encoder latents sampled as in training."""
    dim = args.decoder_dim or args.vae_decoder_dim
    new = AutoencoderKLWan.from_config({**vae.config, "decoder_base_dim": dim})
    same = dim == vae.config.decoder_base_dim
    new.load_state_dict({k: v for k, v in vae.state_dict().items()
                         if same or not k.startswith(("decoder.", "post_quant_conv."))}, strict=same)
    new.to(args.device)
    log(f"decoder: base {dim}, {n_params(new.decoder) + n_params(new.post_quant_conv)} params, "
        f"{'from the trained one' if same else 'new'}")
    clips, _ = draw_clips(args)
    rng = np.random.default_rng(args.seed + 5)
    torch.manual_seed(args.seed + 5)
    return fit_decoder(args, new, lambda: to_video(clips[rng.integers(0, len(clips), args.vae_full_batch)], args.device),
                       lambda rec, x: reconstruction_loss(rec, x, args), log)


def train_vae(args, clips, log):
    """Random single frames, then random clip crops (any start frame, which the causal VAE then treats as a
    clip's first), both 4-pixel aligned squares, then --vae-full-steps on whole clips so the cache across
    every chunk is trained. Small batches: in five minutes, 1000 steps of 8 frames and 2 clips gave the
    first frame 24.7 dB where 170 steps of 8 clips gave 19.7 (BENCHMARKS.md)."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    vae = make_vae(args).to(args.device)
    log(f"vae params: encoder {n_params(vae.encoder)}, decoder {n_params(vae.decoder)}")
    opt = torch.optim.AdamW(vae.parameters(), args.vae_lr, weight_decay=0.0)
    images, crops = args.vae_image_steps, args.vae_image_steps + args.vae_steps
    total = crops + args.vae_full_steps
    n, frames, size = clips.shape[:3]
    t0 = time.time()
    for step in range(total):
        if step < crops:
            oy, ox = (int(v) * SPATIAL for v in rng.integers(0, (size - args.vae_crop) // SPATIAL + 1, 2))
            idx = rng.integers(0, n, args.vae_image_batch if step < images else args.vae_batch)
            if step < images:
                part = clips[idx, rng.integers(0, frames, len(idx))][:, None]
            else:
                t = int(rng.integers(0, frames - args.vae_frames + 1))
                part = clips[idx, t:t + args.vae_frames]
            x = to_video(part[:, :, oy:oy + args.vae_crop, ox:ox + args.vae_crop], args.device)
        else:
            x = to_video(clips[rng.integers(0, n, args.vae_full_batch)], args.device)
        for g in opt.param_groups:
            g["lr"] = decayed(args.vae_lr, step, total)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = reconstruction_loss(rec, x, args) + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == total - 1:
            log(f"vae step {step + 1}/{total} mse {mse.item():.5f} psnr {10 * np.log10(4 / mse.item()):.1f} dB  "
                f"{time.time() - t0:.0f}s")
    vae.requires_grad_(False)
    return vae.eval()


def headline(summary):
    """Each metric's mean (or rate) from ``summarize_videos``, rounded: the log's and the record's line."""
    return {m: round(v["mean"] if "mean" in v else v["rate"], 3) for m, v in summary.items() if isinstance(v, dict)}


@torch.no_grad()
def check_vae(args, vae, log):
    """The video metrics on VAE reconstructions of --check-clips fresh clips: the ceiling the transformer can
    reach."""
    n = args.check_clips
    args_fresh = argparse.Namespace(**{**vars(args), "n_clips": n, "seed": args.seed + 1000, "threads": 1})
    clips, captions = draw_clips(args_fresh)
    rec = to_frames(vae.decode(vae.encode(to_video(clips, args.device)).latent_dist.mean).sample)
    line = headline(summarize_videos([score_video(list(r), c) for r, c in zip(rec, captions)]))
    log(f"video metrics on {n} VAE reconstructions: {line}")
    return line


def load_or_train_vae(args, work, log, timings):
    """(vae, means, stds, captions): from --work when there, else drawn, trained and encoded here."""
    cache = work / "latents.pt"
    if (work / "vae" / "config.json").exists() and cache.exists():
        vae = AutoencoderKLWan.from_pretrained(work / "vae").to(args.device).eval()
        data = torch.load(cache)
        expect = {"n_clips": args.n_clips, "frames": args.frames, "size": args.size, "seed": args.seed}
        if data["key"] != expect:
            raise SystemExit(f"{cache} holds clips {data['key']}, not {expect}: use another --work")
        log(f"VAE and {len(data['captions'])} cached latents from {work}")
        for key, seconds in data["timings"].items():
            timings.setdefault(key, seconds)
        return vae, data["means"], data["stds"], data["captions"]
    t = time.time()
    clips, captions = draw_clips(args)
    timings["draw_s"] = time.time() - t
    log(f"drew {len(clips)} clips of {args.frames} frames at {args.size} px in {timings['draw_s']:.0f}s")
    t = time.time()
    vae = train_vae(args, clips, log)
    vae.save_pretrained(work / "vae")
    timings["vae_s"] = time.time() - t
    t = time.time()
    means, stds = encode_dataset(vae, clips, batch=16 if args.device == "cpu" else 256,
                                 convert=lambda c: to_video(c, args.device))
    means, stds = means.cpu(), stds.cpu()
    timings["encode_s"] = time.time() - t
    torch.save({"means": means, "stds": stds, "captions": captions, "timings": dict(timings),
                "key": {"n_clips": args.n_clips, "frames": args.frames, "size": args.size, "seed": args.seed}}, cache)
    log(f"encoded latents {tuple(means.shape)} in {timings['encode_s']:.0f}s")
    return vae, means, stds, captions


def still(caption):
    """A clip's caption for its first frame alone: 'a red circle moving left' -> 'a red circle'."""
    return MOTION.sub("", caption)


def noise_levels(z0, per_frame: bool, generator, shift: float):
    """Training noise levels of latents ``z0`` [n, c, f, h, w]: logit-normal(0, 1), shifted as the scheduler
    shifts its sigmas (s -> shift s / (1 + (shift - 1) s)); one per clip, or with ``per_frame`` one per latent
    frame. Returns (sigma broadcastable to z0, the transformer's timestep: [n], or per token [n, f h w / 4])."""
    n, f, h, w = z0.shape[0], *z0.shape[2:]
    sigma = torch.sigmoid(torch.randn((n, f) if per_frame else (n,), generator=generator, device=z0.device))
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    if not per_frame:
        return sigma.view(n, 1, 1, 1, 1), sigma * 1000
    tokens = (h // PATCH[1]) * (w // PATCH[2])
    return sigma.view(n, 1, f, 1, 1), (sigma * 1000).repeat_interleave(tokens, dim=1)


def set_latent_stats(vae, means, stds):
    """latents_mean / latents_std per channel, which WanPipeline uses to un-normalise before decoding: those
    of the latents training samples (posterior mean plus std times noise)."""
    dims = [0] + list(range(2, means.ndim))
    mean, std = means.mean(dims), (means.var(dims) + stds.square().mean(dims)).sqrt()
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    shape = (1, -1) + (1,) * (means.ndim - 2)
    return mean.view(shape), std.view(shape)


@torch.no_grad()
def evaluate(args, pipe, work, log):
    """--eval-videos tune-prompt videos (one and two objects, with and without named motion, in turn) at
    the attnsteer.json call defaults, scored with the video metrics; a contact sheet to --work."""
    sets = [video_prompt_set(name, "tune") for name in ("one", "one-moving", "two", "two-moving")]
    prompts = [sets[i % 4][i // 4 % len(sets[i % 4])] for i in range(args.eval_videos)]
    videos = []
    for i in range(0, len(prompts), 4):
        part = prompts[i:i + 4]
        out = pipe(part, generator=[torch.Generator().manual_seed(k) for k in range(i, i + len(part))],
                   **call_defaults(args), output_type="np").frames
        videos.extend(out)
    results = [score_video(v, p) for v, p in zip(videos, prompts)]
    line = headline(summarize_videos(results))
    log(f"video metrics on {len(prompts)} generated tune videos: {line}")
    sheet = np.concatenate([np.concatenate(list((v * 255).round().astype(np.uint8)), 1) for v in videos], 0)
    Image.fromarray(sheet).save(work / "samples.png")
    return {"prompts": prompts, "metrics": line, "per_video": [{m: r[m] for m in line} for r in results]}


def call_defaults(args):
    """The call arguments generation needs as trained (WanPipeline's own defaults are 81 frames at 480x832):
    attnsteer.json's "call"."""
    return {"num_frames": args.frames, "height": args.size, "width": args.size,
            "num_inference_steps": args.default_steps, "guidance_scale": args.default_cfg,
            "max_sequence_length": args.max_seq}


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # each stage has fixed shapes
    work, out = Path(args.work), Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    log = open_log(work)
    state_path = work / "state.pt"
    timings = torch.load(state_path, weights_only=False)["timings"] if state_path.exists() else {}
    log(f"args {vars(args)}")

    vae, means, stds, captions = load_or_train_vae(args, work, log, timings)
    vae_check = check_vae(args, vae, log)
    if args.vae_only:
        log("stopping after the VAE stage (--vae-only)")
        return
    lmean, lstd = (t.to(args.device) for t in set_latent_stats(vae, means, stds))
    means, stds = means.to(args.device), stds.to(args.device)
    tokenizer = clip_tokenizer(model_max_length=args.max_seq)
    longest = max(len(tokenizer(c).input_ids) for c in set(captions))
    if longest > args.max_seq:
        raise SystemExit(f"a caption has {longest} tokens, more than --max-seq {args.max_seq}")

    torch.manual_seed(args.seed + 2)
    text_encoder, transformer = make_text_encoder(args).to(args.device), make_transformer(args).to(args.device)
    ema_te, ema_tr = make_text_encoder(args).to(args.device), make_transformer(args).to(args.device)
    for model, ema in ((text_encoder, ema_te), (transformer, ema_tr)):
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False).eval()
    log(f"params: text_encoder {n_params(text_encoder)}, transformer {n_params(transformer)}")
    params = list(text_encoder.parameters()) + list(transformer.parameters())
    ema_params = list(ema_te.parameters()) + list(ema_tr.parameters())
    opt = torch.optim.AdamW(params, args.lr, weight_decay=0.01)
    train_pipe = build_pipeline(vae, text_encoder, transformer, tokenizer, args.shift)  # for its encode_prompt
    rng = np.random.default_rng(args.seed + 3)
    gen = torch.Generator(args.device).manual_seed(args.seed + 4)
    start = 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=False, map_location="cpu")
        for model, key in ((text_encoder, "te"), (transformer, "transformer"), (ema_te, "ema_te"),
                           (ema_tr, "ema_transformer")):
            model.load_state_dict(st[key])
        opt.load_state_dict(st["opt"]); rng.bit_generator.state = st["rng"]; gen.set_state(st["gen"])
        start = st["step"]
        log(f"resumed at step {start}")

    def save(step):
        pipe = build_pipeline(vae, ema_te, ema_tr, tokenizer, args.shift)
        pipe.save_pretrained(out, safe_serialization=True)
        (out / "attnsteer.json").write_text(json.dumps({"call": call_defaults(args)}) + "\n")
        torch.save({"te": text_encoder.state_dict(), "transformer": transformer.state_dict(),
                    "ema_te": ema_te.state_dict(), "ema_transformer": ema_tr.state_dict(), "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state, "gen": gen.get_state(), "step": step, "timings": timings},
                   str(state_path) + ".tmp")
        os.replace(str(state_path) + ".tmp", state_path)
        log(f"saved pipeline to {out} and state at step {step}")
        return pipe

    text_encoder.train(); transformer.train()
    t0, running = time.time(), []
    tr_s0 = timings.get("transformer_s", 0.0)
    trained, pipe = start, None
    for step in range(start, args.steps):
        lr = cosine_lr(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        image = rng.random() < args.image_ratio
        n = args.image_batch if image else args.batch
        idx = torch.from_numpy(rng.integers(0, len(captions), n)).to(args.device)
        mean, std = (means[idx, :, :1], stds[idx, :, :1]) if image else (means[idx], stds[idx])
        z0 = (mean + std * torch.randn(mean.shape, generator=gen, device=args.device) - lmean) / lstd
        drop = rng.random(n) < args.drop
        caps = ["" if d else still(captions[i]) if image else captions[i] for d, i in zip(drop, idx.tolist())]
        text, _ = train_pipe.encode_prompt(caps, do_classifier_free_guidance=False, max_sequence_length=args.max_seq,
                                           device=args.device)
        per_frame = not image and args.frame_noise > 0 and rng.random() < args.frame_noise
        s, timestep = noise_levels(z0, per_frame, gen, args.train_shift)
        noise = torch.randn(z0.shape, generator=gen, device=args.device)
        pred = transformer(hidden_states=(1 - s) * z0 + s * noise, timestep=timestep, encoder_hidden_states=text,
                           return_dict=False)[0]
        loss = F.mse_loss(pred, noise - z0)
        optimizer_step(opt, loss, params, ema_params, args.ema, step)
        running.append(loss.item())
        trained = step + 1
        stop = end_step(args, step, start, t0, running, lr, timings, "transformer_s", tr_s0, log)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps or stop:
            pipe = save(step + 1)
        if stop:
            log(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached")
            break
    if pipe is None:  # nothing left to train: a finished run rerun
        pipe = save(trained)

    # ---- a decoder for the frozen encoder (the transformer's latent space is unchanged)
    if args.decoder_steps > 0:
        dec_path = work / "vae_decoder"
        if (dec_path / "config.json").exists():
            decoded = AutoencoderKLWan.from_pretrained(dec_path).to(args.device).eval()
            log(f"decoder from {dec_path}")
        else:
            t = time.time()
            decoded = train_decoder(args, pipe.vae, log)
            decoded.save_pretrained(dec_path)
            timings["decoder_s"] = time.time() - t
        vae_check = {"before": vae_check, "decoder": check_vae(args, decoded, log)}
        pipe = build_pipeline(decoded, ema_te, ema_tr, tokenizer, args.shift)
        pipe.save_pretrained(out, safe_serialization=True)

    # ---- evaluation and record
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    evaluation = evaluate(args, pipe, work, log) if args.eval_videos > 0 else None
    eval_s = time.time() - t
    write_record(args, out, trained, timings, eval_s, vae_check, evaluation, pipe, log)


def command_line(args):
    """The options that reproduce ``args``: the record's command."""
    parts = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is not False and value is not None:
            parts.append(f"{flag} {','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return " ".join(parts)


def write_record(args, out, trained, timings, eval_s, vae_check, evaluation, pipe, log):
    total = sum(v for k, v in timings.items() if k.endswith("_s"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")
    hardware = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True, capture_output=True,
                         text=True).stdout.strip()
    if args.device.startswith("cuda"):
        hardware = f"{torch.cuda.get_device_name(args.device)} (CPU: {hardware})"
    params = {name: n_params(getattr(pipe, name)) for name in ("vae", "text_encoder", "transformer")}
    record = {
        "seed": args.seed, "args": vars(args), "steps_trained": trained,
        "timings_s": {k: round(v, 1) for k, v in {**timings, "eval_s": eval_s}.items()},
        "wall_time_min": round(total / 60, 1), "torch_threads": args.threads, "hardware": hardware,
        "machine": platform.platform(), "torch": torch.__version__, "weights_bytes": size, "params": params,
        "latents_mean": pipe.vae.config.latents_mean, "latents_std": pipe.vae.config.latents_std,
        "vae_reconstructions": vae_check, "evaluation": evaluation,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    command = command_line(args)
    (out / "TRAINING.md").write_text(
        f"# shapes-wan training record\n\n"
        f"Trained by `samples/train_shapes_wan.py`:\n\n"
        f"    HF_HUB_OFFLINE=1 python samples/train_shapes_wan.py {command}\n\n"
        f"Rerunning the command resumes from the state in --work.\n\n"
        f"- seed: {args.seed}\n"
        f"- clips: {args.n_clips} drawn clips of {args.frames} frames at {args.size}x{args.size} (object weights "
        f"{args.object_weights}, motion named with probability {args.named}); latents "
        f"{1 + (args.frames - 1) // TEMPORAL} x {args.size // SPATIAL} x {args.size // SPATIAL} x {args.z_dim}\n"
        f"- transformer + text encoder steps: {trained} of {args.steps} scheduled, batch {args.batch} clips"
        + (f" ({args.image_ratio:.0%} of the steps: {args.image_batch} first frames as images)" if args.image_ratio else "")
        + f", lr {args.lr} "
        f"(warmup {args.warmup}, cosine to {args.min_lr_frac}x), AdamW wd 0.01, grad clip 1\n"
        f"- objective: rectified flow, one sigma per clip, logit-normal(0, 1), target noise - x0; caption dropout "
        f"{args.drop}; sampling: FlowMatchEulerDiscreteScheduler shift {args.shift}\n"
        f"- text conditioning: the pipeline's own encode_prompt at max_sequence_length {args.max_seq}: generate "
        f"with the same (attnsteer.json holds the call defaults)\n"
        f"- VAE: AutoencoderKLWan, 4x spatial and 4x temporal, {args.z_dim} channels; {args.vae_steps} steps on "
        f"{args.vae_frames}-frame {args.vae_crop} px crops (batch {args.vae_batch}) + {args.vae_full_steps} on whole "
        f"clips (batch {args.vae_full_batch}), lr {args.vae_lr}, MSE + L1 with object pixels weighted "
        f"{args.vae_object_weight}, KL weight {args.kl_weight}; video metrics on its reconstructions of "
        f"{args.check_clips} fresh clips: {vae_check}\n"
        + (f"- decoder: {args.decoder_steps} steps on whole clips (batch {args.vae_full_batch}), base "
           f"{args.decoder_dim or args.vae_decoder_dim} channels, lr {args.decoder_lr}, encoder frozen\n"
           if args.decoder_steps else "")
        + f"- transformer: {args.layers} layers x {args.heads} heads of {args.head_dim}, ffn {args.ffn}, patch "
        f"{'x'.join(map(str, PATCH))}, adaLN-zero initialisation; text encoder: UMT5 d_model {args.te_dim}, "
        f"{args.te_layers} layers, the CLIP BPE tokenizer\n"
        f"- parameters: {', '.join(f'{k} {v}' for k, v in params.items())}; saved EMA weights (decay {args.ema}), "
        f"{size / 2**20:.1f} MiB of weights\n"
        f"- wall time: {total / 60:.1f} min on {hardware}, torch {torch.__version__}, {args.threads} thread(s) (stages: "
        f"{', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())}; evaluation {eval_s / 60:.1f} min more)\n"
        + (f"- video metrics on {len(evaluation['prompts'])} generated tune videos: {evaluation['metrics']}\n"
           if evaluation else "")
        + "- full arguments, timings and per-video scores: training.json\n"
    )
    log(f"done: {total / 60:.1f} min, {size / 2**20:.1f} MiB of weights at {out}")


if __name__ == "__main__":
    main()

"""Train "shapes-wan": a small, real WanPipeline on procedural moving-shapes clips (second design, issue 27).

The model is Wan 2.1's text-to-video layout, only tiny: a WanTransformer3DModel (self-attention over
all video tokens, cross-attention to the text), an AutoencoderKLWan that is exactly a per-frame image
VAE (no temporal compression: one latent frame per frame, 4x spatial to 4 channels), and a
UMT5EncoderModel trained from scratch, with the real CLIP BPE tokenizer saved as the pipeline's
tokenizer (as attnsteer.pipelines.tiny pairs them). The first design (4x causal temporal compression
to 16 channels) failed six runs: its VAE packed four moving frames into a latent frame at 24-25 dB,
and its image steps trained only latent frame 0 (BENCHMARKS.md, "shapes-wan").

1. Clips: --n-clips clips of --frames frames at --size px from guidance.shapes.draw_video (1 or 2
   objects moving, bouncing off the border; a motion named in the caption half the time).
2. VAE: `temperal_downsample` all False and `scale_factor_temporal` 1; every causal past tap of its
   3-D convolutions is set to zero and it trains on single frames only (random crops of any frame, small
   batches: this VAE learns per step, not per sample), so those taps get exactly zero gradient and,
   without weight decay, stay zero: encoding a clip is encoding its frames one by one. Training and
   encoding run on the convolutions cut to their last tap (``frame_convolutions``: the same, at half
   the time). MSE + L1 with
   the pixels off the background grey weighted --vae-object-weight. latents_mean / latents_std are set
   per channel from the encoded clips.
3. Every clip encoded once, frame by frame (posterior mean and std kept, a latent sampled per step) and
   cached with its caption: a resumed run neither redraws nor re-encodes (--vae-only stops here).
4. Text encoder + transformer, jointly from scratch, images first, as Make-A-Video, Wan and Open-Sora:
   an image phase of single frames (any frame of any clip: every frame is an image latent; captions
   without their motion words) that ends when --watch tune single objects drawn with one frame reach
   binding --image-gate (checked at each checkpoint) or after --image-steps; then a joint phase, a
   share --image-ratio of its steps images, the rest clips: the first --short-share of it windows of
   --short-frames latent frames (cheaper, and a window of per-frame latents is the latent of that
   window of frames), then whole clips, so every frame distance is seen. --first-frame: the share of
   clips whose latent frame 0 is given clean, at per-token timestep 0 and out of the loss (Wan 2.2
   TI2V's conditioning), which teaches carrying an object from one frame to the next.
One noise level per sample, rectified flow (x_t = (1 - s) x0 + s n, target n - x0, s logit-normal, as
shapes-sd3), 10% caption dropout to "" so that classifier-free guidance works, and an EMA, which is what
gets saved. Text goes through the pipeline's own encode_prompt at the max_sequence_length that
generation uses. At the end tune-prompt videos are generated and scored with the video metrics (a
contact sheet of them written to --work).

Frame counts: WanPipeline rounds num_frames to k * scale_factor_temporal + 1 frames, which with a
factor of 1 always adds one, so 17-frame clips are generated with num_frames 16 (attnsteer.json's call
default) and a single frame with num_frames 0: `attnsteer.pipelines.frames.parent_frames` gives the
num_frames for a length.

Why 17 frames at 64x64: 64 px is the size the shapes detector is built and tested for, and 17 frames
let a named motion travel 16-32 px. A clip is 17 x 8 x 8 = 1088 tokens (patch 1x2x2), an image 64.

Sizing, measured on the 2-core AMD EPYC while other processes held about one core, with one thread (two
threads on the one core left ran the VAE several times slower): drawing 1.4 min, the VAE 7.6 min (3000
steps, 0.15 s), encoding the 102 000 frames 13.3 min, image steps of 32 frames 0.35-0.6 s, joint steps
(half images, half 4 windows of 9 frames) 0.42-0.47 s. The run of BENCHMARKS.md ("The second design"):

    HF_HUB_OFFLINE=1 python samples/train_shapes_wan.py --work /tmp/wan-work-v2 --output /tmp/wan-out-v2 \
        --checkpoint samples/models/shapes-wan/checkpoint --threads 1 --vae-steps 3000 --steps 24000 \
        --image-steps 10000 --ckpt-every 500 --log-every 100

A state checkpoint is written under --work every --ckpt-every steps (and the pipeline saved to --output
at the same time); rerunning the same command resumes from it. With --checkpoint DIR a compact copy
(the VAE, fp16 weights and EMA, the step and random states, no optimizer moments) is written there too,
and a run whose --work has no state starts from it (the clips drawn and encoded again, the optimizer
fresh and its learning rate warmed up again): that is how a run moves between sessions and machines.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import UMT5Config, UMT5EncoderModel

from attnsteer.guidance.shapes import (detect, draw_video, prompt_set, score, score_video, summarize_videos,
                                       video_prompt_set)
from attnsteer.guidance.shapes.scene import BACKGROUND
from attnsteer.pipelines.frames import parent_frames
from attnsteer.pipelines.tiny import clip_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapes_sd import (  # noqa: E402
    cosine_lr, decayed, end_step, n_params, open_log, optimizer_step, positive_int, weights_option,
)

VOCAB_SIZE, EOS_ID = 49408, 49407
SPATIAL = 4  # the VAE's spatial compression: two downsampling stages, neither temporal
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
    """--frames, --short-frames: at least 2 frames (a clip; one latent frame per frame)."""
    return _number(int, text, lambda v: v >= 2, "a clip of at least 2 frames")


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


def checkpoint_dir(text):
    """--checkpoint: a folder (made if missing), not a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a checkpoint folder")
    return text


object_weights = weights_option(2, "1- and 2-object clips", "1,1")  # --object-weights: P(1 object), P(2 objects)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="samples/models/shapes-wan")
    p.add_argument("--work", default="/tmp/shapes-wan-work", help="checkpoints, VAE, cached latents, log")
    p.add_argument("--checkpoint", type=checkpoint_dir, default=None,
                   help="also write a compact resumable checkpoint here (VAE, fp16 weights, step); a run whose --work "
                        "has no state starts from it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads, and processes drawing clips")
    p.add_argument("--device", type=torch_device, default="cpu",
                   help="where the models train and generate: cpu (default) or cuda (clips are drawn on the CPU)")
    # data
    p.add_argument("--n-clips", type=positive_int, default=6000, help="drawn training clips")
    p.add_argument("--frames", type=clip_frames, default=17, help="frames per clip (one latent frame each)")
    p.add_argument("--size", type=frame_side, default=64, help="frame side in pixels")
    p.add_argument("--object-weights", type=object_weights, default="1,1", help="P(1, 2 objects) per clip")
    p.add_argument("--named", type=probability, default=0.5, help="chance a caption names an object's motion")
    # VAE
    p.add_argument("--vae-dim", type=positive_int, default=16, help="encoder base channels")
    p.add_argument("--vae-decoder-dim", type=positive_int, default=24, help="decoder base channels")
    p.add_argument("--z-dim", type=positive_int, default=4, help="latent channels")
    p.add_argument("--vae-steps", type=whole, default=6000, help="steps on single frames (crops of any frame)")
    p.add_argument("--vae-batch", type=positive_int, default=8, help="frames a step")
    p.add_argument("--vae-crop", type=crop_side, default=32, help="crop side in pixels")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=non_negative, default=0.0,
                   help="0: Adam turns even a 1e-6 KL into full-size steps on the log-variance of latents the "
                        "decoder does not use yet (the posterior std rose from 0.05 to 0.8 in 400 steps)")
    p.add_argument("--vae-object-weight", type=non_negative, default=5.0,
                   help="VAE loss weight of pixels off the background grey (objects and their edges): with 1, "
                        "400 steps drew every object in one brown; with 5 they had their colours")
    p.add_argument("--vae-only", action="store_true", help="stop after the VAE stage and its check (to tune it)")
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
    p.add_argument("--steps", type=positive_int, default=20000, help="all steps, both phases (the cosine schedule's)")
    p.add_argument("--image-steps", type=whole, default=10000,
                   help="the image phase's longest: single frames only (it ends earlier at --image-gate)")
    p.add_argument("--image-gate", type=probability, default=0.85,
                   help="the image phase ends at a checkpoint where the --watch images reach this binding")
    p.add_argument("--watch", type=whole, default=30,
                   help="tune single-object images (num_frames 1) generated and scored at each checkpoint (0: none)")
    p.add_argument("--image-batch", type=positive_int, default=32, help="images in an image step")
    p.add_argument("--batch", type=positive_int, default=4, help="clips in a clip step")
    p.add_argument("--image-ratio", type=probability, default=0.5, help="share of the joint phase's steps on images")
    p.add_argument("--short-frames", type=clip_frames, default=9,
                   help="latent frames of the clip windows the joint phase starts on")
    p.add_argument("--short-share", type=probability, default=0.5,
                   help="share of the joint phase on --short-frames windows, before whole clips")
    p.add_argument("--first-frame", type=probability, default=0.0,
                   help="share of clips whose latent frame 0 is given clean (per-token timestep 0, out of the loss)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=positive_int, default=100, help="steps of warm-up, also after a checkpoint resume")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay floor, fraction of --lr")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--drop", type=probability, default=0.1, help="caption dropout to the empty prompt")
    p.add_argument("--shift", type=float, default=3.0,
                   help="sampling shift of the saved FlowMatchEulerDiscreteScheduler")
    p.add_argument("--train-shift", type=positive_number, default=1.0,
                   help="the sampling shift on the training noise levels (default 1: logit-normal(0, 1) as it is)")
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
    if args.vae_crop > args.size:
        p.error(f"--vae-crop {args.vae_crop} must fit in a frame of --size {args.size}")
    if args.short_frames > args.frames:
        p.error(f"--short-frames {args.short_frames} must fit in a clip of --frames {args.frames}")
    return args


# ----------------------------------------------------------------------------- models

def make_vae(args):
    """Wan's VAE with one downsampling stage fewer than Wan 2.1's (4x spatial instead of 8x) and no temporal
    compression, its causal past taps zero (``zero_past_taps``): a per-frame image VAE in Wan's format. The
    decoder is wider than the encoder (it has the harder job). The posterior starts nearly deterministic
    (std ``exp(LOGVAR_INIT / 2)``): from the default std 1 the decoder sees as much noise as signal."""
    z = args.z_dim
    vae = AutoencoderKLWan(
        base_dim=args.vae_dim, decoder_base_dim=args.vae_decoder_dim, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, False], scale_factor_spatial=SPATIAL, scale_factor_temporal=1,
        latents_mean=[0.0] * z, latents_std=[1.0] * z,
    )
    with torch.no_grad():
        vae.quant_conv.bias[z:] = LOGVAR_INIT  # quant_conv gives (mean, logvar) channels
        for weight in past_taps(vae):
            weight[:, :, :-1] = 0
    return vae


def past_taps(vae):
    """The weights of ``vae``'s 3-D convolutions that see past frames (kernel longer than 1 in time); their
    taps ``[:, :, :-1]`` act on the past frames, the last on the frame itself."""
    return [m.weight for m in vae.modules() if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1]


@contextmanager
def frame_convolutions(vae):
    """Inside, each causal 3-D convolution of ``vae`` is cut to its last temporal tap (the frame itself):
    exact on one-frame inputs, since the past taps are zero, and half the time of a VAE step on this CPU
    (a third of the convolution work). On exit the full kernels are back, holding the trained last taps
    and zero past taps. Parameters made inside (an optimizer's) are the cut ones."""
    convs = [m for m in vae.modules() if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1]
    full = [(m.weight, m._padding) for m in convs]
    for m in convs:
        m.weight = torch.nn.Parameter(m.weight.detach()[:, :, -1:].clone(), requires_grad=m.weight.requires_grad)
        m._padding = m._padding[:4] + (0, 0)
    try:
        yield vae
    finally:
        with torch.no_grad():
            for m, (weight, padding) in zip(convs, full):
                weight[:, :, -1:] = m.weight
                m.weight, m._padding = weight, padding


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


def as_frames(video):
    """(B, C, F, H, W) -> (B * F, C, 1, H, W): each frame a one-frame clip."""
    b, c, f, h, w = video.shape
    return video.transpose(1, 2).reshape(b * f, c, 1, h, w)


def as_clips(frames, count):
    """``as_frames`` undone for ``count`` clips."""
    bf, c, _, h, w = frames.shape
    return frames.reshape(count, bf // count, c, h, w).transpose(1, 2)


def encode_clips(vae, video):
    """Posterior (mean, std) of clips (B, 3, F, H, W): frame by frame, batched, with the per-frame VAE (the
    same as encoding each clip, and ``vae.encode`` keeps only 1 + 4k frames of a clip)."""
    with frame_convolutions(vae):
        post = vae.encode(as_frames(video)).latent_dist
    return as_clips(post.mean, len(video)), as_clips(post.std, len(video))


def decode_clips(vae, latents):
    """Frames (B, 3, F, H, W) of latents (B, C, F, h, w), frame by frame."""
    with frame_convolutions(vae):
        return as_clips(vae.decode(as_frames(latents)).sample, len(latents))


# ----------------------------------------------------------------------------- VAE

def reconstruction_loss(rec, x, args):
    """MSE + L1, the pixels off the background grey weighted --vae-object-weight."""
    background = torch.tensor(BACKGROUND, device=x.device).view(1, 3, 1, 1, 1) / 127.5 - 1
    off = (x - background).abs().amax(1, keepdim=True) > BACKGROUND_TOL
    weight = 1 + (args.vae_object_weight - 1) * off
    return ((rec - x).square() + (rec - x).abs()).mul(weight).mean()


def train_vae(args, clips, log):
    """--vae-steps steps of --vae-batch random single frames (4-pixel aligned --vae-crop squares of any frame
    of any clip), lr decayed, no weight decay: the past taps, zero from the start, get no gradient from
    one-frame inputs and so stay zero. Small batches: this VAE learns per step, not per sample."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    vae = make_vae(args).to(args.device)
    log(f"vae params: encoder {n_params(vae.encoder)}, decoder {n_params(vae.decoder)}")
    with frame_convolutions(vae):
        fit_frames(args, vae, clips, rng, log)
    vae.requires_grad_(False)
    return vae.eval()


def fit_frames(args, vae, clips, rng, log):
    """train_vae's loop, on ``vae`` cut to its frame convolutions."""
    opt = torch.optim.AdamW(vae.parameters(), args.vae_lr, weight_decay=0.0)
    n, frames, size = clips.shape[:3]
    t0 = time.time()
    for step in range(args.vae_steps):
        oy, ox = (int(v) * SPATIAL for v in rng.integers(0, (size - args.vae_crop) // SPATIAL + 1, 2))
        idx = rng.integers(0, n, args.vae_batch)
        part = clips[idx, rng.integers(0, frames, len(idx))][:, None]
        x = to_video(part[:, :, oy:oy + args.vae_crop, ox:ox + args.vae_crop], args.device)
        for g in opt.param_groups:
            g["lr"] = decayed(args.vae_lr, step, args.vae_steps)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = reconstruction_loss(rec, x, args) + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            log(f"vae step {step + 1}/{args.vae_steps} mse {mse.item():.5f} psnr {10 * np.log10(4 / mse.item()):.1f} dB"
                f"  {time.time() - t0:.0f}s")


def headline(summary):
    """Each metric's mean (or rate) from ``summarize_videos``, rounded: the log's and the record's line."""
    return {m: round(v["mean"] if "mean" in v else v["rate"], 3) for m, v in summary.items() if isinstance(v, dict)}


@torch.no_grad()
def check_vae(args, vae, log):
    """On VAE reconstructions of --check-clips fresh clips: the PSNR of each frame index (mean over the
    clips) and of the worst single frame, and the video metrics: the ceiling the transformer can reach."""
    n = args.check_clips
    args_fresh = argparse.Namespace(**{**vars(args), "n_clips": n, "seed": args.seed + 1000, "threads": 1})
    clips, captions = draw_clips(args_fresh)
    x = to_video(clips, args.device)
    rec = decode_clips(vae, encode_clips(vae, x)[0]).clamp(-1, 1)
    psnr = 10 * torch.log10(4 / (rec - x).square().mean((1, 3, 4)))  # (clip, frame)
    line = {"psnr_per_frame": [round(v, 1) for v in psnr.mean(0).tolist()], "psnr_worst_frame": round(psnr.min().item(), 1),
            **headline(summarize_videos([score_video(list(r), c) for r, c in zip(to_frames(rec), captions)]))}
    log(f"VAE reconstructions of {n} fresh clips: {line}")
    return line


def load_or_train_vae(args, work, log, timings):
    """(vae, means, stds, captions): from --work when there, else drawn, trained (or taken from --checkpoint)
    and encoded here."""
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
    saved = Path(args.checkpoint or work) / "vae"
    if not (work / "vae" / "config.json").exists() and (saved / "config.json").exists():
        shutil.copytree(saved, work / "vae", dirs_exist_ok=True)
        log(f"VAE from the checkpoint {saved}")
    if (work / "vae" / "config.json").exists():
        vae = AutoencoderKLWan.from_pretrained(work / "vae").to(args.device).eval()
    else:
        t = time.time()
        vae = train_vae(args, clips, log)
        vae.save_pretrained(work / "vae")
        timings["vae_s"] = time.time() - t
    t = time.time()
    batch = 16 if args.device == "cpu" else 256
    parts = [encode_clips(vae, to_video(clips[i:i + batch], args.device)) for i in range(0, len(clips), batch)]
    means, stds = (torch.cat([p[k] for p in parts]).cpu() for k in (0, 1))
    timings["encode_s"] = time.time() - t
    torch.save({"means": means, "stds": stds, "captions": captions, "timings": dict(timings),
                "key": {"n_clips": args.n_clips, "frames": args.frames, "size": args.size, "seed": args.seed}}, cache)
    log(f"encoded latents {tuple(means.shape)} in {timings['encode_s']:.0f}s")
    return vae, means, stds, captions


def set_latent_stats(vae, means, stds):
    """latents_mean / latents_std per channel, which WanPipeline uses to un-normalise before decoding: those
    of the latents training samples (posterior mean plus std times noise)."""
    dims = [0] + list(range(2, means.ndim))
    mean, std = means.mean(dims), (means.var(dims) + stds.square().mean(dims)).sqrt()
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    shape = (1, -1) + (1,) * (means.ndim - 2)
    return mean.view(shape), std.view(shape)


# ----------------------------------------------------------------------------- transformer steps

def still(caption):
    """A clip's caption for one of its frames alone: 'a red circle moving left' -> 'a red circle'."""
    return MOTION.sub("", caption)


def phase_of(step, args, joint_from):
    """What ``step`` trains: "image" (the image phase), or in the joint phase "short" (windows of
    --short-frames), then "clip" (whole clips)."""
    if joint_from is None:
        return "image"
    joint = max(1, args.steps - joint_from)
    return "short" if step - joint_from < args.short_share * joint else "clip"


def noise_levels(n, generator, shift, device="cpu"):
    """``n`` training noise levels: logit-normal(0, 1), shifted as the scheduler shifts its sigmas
    (s -> shift s / (1 + (shift - 1) s))."""
    sigma = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return shift * sigma / (1 + (shift - 1) * sigma)


def noised(z0, sigma, noise, clean_first):
    """(x_t, the transformer's timestep, the loss weight per latent frame) of latents ``z0`` [n, c, f, h, w]
    at ``sigma`` [n]. A sample with ``clean_first`` keeps latent frame 0 clean, at timestep 0 on its tokens
    (Wan 2.2 TI2V's per-token timestep) and out of the loss; the timestep is per token when any does."""
    n, f, h, w = z0.shape[0], *z0.shape[2:]
    s = sigma.view(n, 1, 1, 1, 1)
    xt = (1 - s) * z0 + s * noise
    weight = torch.ones(n, f, device=z0.device)
    if not clean_first.any():
        return xt, sigma * 1000, weight
    xt[clean_first, :, 0] = z0[clean_first, :, 0]
    weight[clean_first, 0] = 0
    tokens = (h // PATCH[1]) * (w // PATCH[2])
    timestep = (sigma.view(n, 1) * 1000 * weight).repeat_interleave(tokens, dim=1)
    return xt, timestep, weight


def flow_loss(pred, target, weight):
    """Mean squared error over the latent frames with ``weight`` 1 ([n, f])."""
    per_frame = (pred - target).square().mean((1, 3, 4))
    return (per_frame * weight).sum() / weight.sum()


# ----------------------------------------------------------------------------- evaluation

def call_defaults(args):
    """The call arguments generation needs as trained (WanPipeline's own defaults are 81 frames at 480x832):
    attnsteer.json's "call". num_frames is one less than the clip (``parent_frames``)."""
    return {"num_frames": parent_frames(args.frames, 1), "height": args.size, "width": args.size,
            "num_inference_steps": args.default_steps, "guidance_scale": args.default_cfg,
            "max_sequence_length": args.max_seq}


@torch.no_grad()
def single_frame_binding(pipe, call, prompts, steps=20, batch=16):
    """The share of ``prompts`` (single objects) drawn right as one frame, one seed each (the prompt's
    position), ``steps`` steps at ``call``'s size and guidance (attnsteer.json's call defaults)."""
    call = {**call, "num_frames": parent_frames(1, 1), "num_inference_steps": steps}
    pipe.set_progress_bar_config(disable=True)
    right = 0
    for i in range(0, len(prompts), batch):
        part = prompts[i:i + batch]
        frames = pipe(part, generator=[torch.Generator().manual_seed(k) for k in range(i, i + len(part))], **call,
                      output_type="np").frames
        right += sum(score(detect(Image.fromarray((v[0] * 255).round().astype(np.uint8))), p)["binding"]
                     for v, p in zip(frames, part))
    return right / len(prompts)


def single_prompts(count, split="tune"):
    """``count`` single-object prompts of ``split``, its 15 in turn (seeds differ by position)."""
    some = prompt_set("one", split)
    return [some[i % len(some)] for i in range(count)]


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


# ----------------------------------------------------------------------------- checkpoints

MODELS = ("te", "transformer", "ema_te", "ema_transformer")


def unique_state(model):
    """``model``'s state dict without the second name of a tied tensor (UMT5's embedding is both
    ``shared.weight`` and ``encoder.embed_tokens.weight``): loading the first sets both."""
    seen, out = set(), {}
    for name, value in model.state_dict().items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            out[name] = value
    return out


def write_checkpoint(folder, vae, models, progress):
    """The compact checkpoint: the VAE (fp32, as trained), the four models' weights in fp16 (tied tensors
    once) and ``progress`` (step, phase start, random states, timings) as JSON; no optimizer moments."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "vae" / "config.json").exists():
        vae.save_pretrained(folder / "vae")
    weights = {f"{key}.{name}": value.detach().to("cpu", torch.float16).contiguous()
               for key, model in zip(MODELS, models) for name, value in unique_state(model).items()}
    save_file(weights, str(folder / "weights.safetensors.tmp"))
    os.replace(folder / "weights.safetensors.tmp", folder / "weights.safetensors")
    (folder / "progress.json").write_text(json.dumps(progress, indent=1) + "\n")


def read_checkpoint(folder, models):
    """Load a ``write_checkpoint`` folder's weights into ``models`` (as fp32); returns its progress."""
    weights = load_file(str(Path(folder) / "weights.safetensors"))
    for key, model in zip(MODELS, models):
        own = unique_state(model)
        stored = {name.removeprefix(key + "."): value for name, value in weights.items() if name.startswith(key + ".")}
        if stored.keys() != own.keys() or any(stored[n].shape != own[n].shape for n in own):
            raise SystemExit(f"the checkpoint {folder} does not fit this model's {key}: give the options it was made with")
        model.load_state_dict({name: value.to(own[name].dtype) for name, value in stored.items()}, strict=False)
    return json.loads((Path(folder) / "progress.json").read_text())


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
    models = (text_encoder, transformer, ema_te, ema_tr)
    log(f"params: text_encoder {n_params(text_encoder)}, transformer {n_params(transformer)}")
    params = list(text_encoder.parameters()) + list(transformer.parameters())
    ema_params = list(ema_te.parameters()) + list(ema_tr.parameters())
    opt = torch.optim.AdamW(params, args.lr, weight_decay=0.01)
    train_pipe = build_pipeline(vae, text_encoder, transformer, tokenizer, args.shift)  # for its encode_prompt
    rng = np.random.default_rng(args.seed + 3)
    gen = torch.Generator(args.device).manual_seed(args.seed + 4)
    start, joint_from, warm_from, watched = 0, (0 if args.image_steps == 0 else None), 0, []
    if state_path.exists():
        st = torch.load(state_path, weights_only=False, map_location="cpu")
        for model, key in zip(models, MODELS):
            model.load_state_dict(st[key])
        opt.load_state_dict(st["opt"]); rng.bit_generator.state = st["rng"]; gen.set_state(st["gen"])
        start, joint_from, watched = st["step"], st["joint_from"], st["watched"]
        log(f"resumed at step {start}")
    elif args.checkpoint and (Path(args.checkpoint) / "weights.safetensors").exists():
        progress = read_checkpoint(args.checkpoint, models)
        rng.bit_generator.state = progress["rng"]
        gen.set_state(torch.tensor(progress["gen"], dtype=torch.uint8))
        start, joint_from, watched = progress["step"], progress["joint_from"], progress["watched"]
        timings.update(progress["timings"])
        warm_from = start
        log(f"resumed at step {start} from the checkpoint {args.checkpoint} (fp16 weights, a fresh optimizer)")

    def ema_pipe():
        return build_pipeline(vae, ema_te, ema_tr, tokenizer, args.shift)

    def save(step):
        pipe = ema_pipe()
        pipe.save_pretrained(out, safe_serialization=True)
        (out / "attnsteer.json").write_text(json.dumps({"call": call_defaults(args)}) + "\n")
        torch.save({**{key: model.state_dict() for key, model in zip(MODELS, models)}, "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state, "gen": gen.get_state(), "step": step, "joint_from": joint_from,
                    "watched": watched, "timings": timings}, str(state_path) + ".tmp")
        os.replace(str(state_path) + ".tmp", state_path)
        if args.checkpoint:
            write_checkpoint(args.checkpoint, vae, models, {
                "step": step, "joint_from": joint_from, "watched": watched, "rng": rng.bit_generator.state,
                "gen": gen.get_state().tolist(), "timings": timings})
        log(f"saved pipeline to {out} and state at step {step}" + (f" (and {args.checkpoint})" if args.checkpoint else ""))
        return pipe

    text_encoder.train(); transformer.train()
    t0, running = time.time(), []
    tr_s0 = timings.get("transformer_s", 0.0)
    trained, pipe = start, None
    for step in range(start, args.steps):
        if joint_from is None and step >= args.image_steps:
            joint_from = step
            log(f"joint phase from step {step}: --image-steps {args.image_steps} reached")
        lr = cosine_lr(args, step) * (min(1.0, (step - warm_from + 1) / args.warmup) if warm_from else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        phase = phase_of(step, args, joint_from)
        image = phase == "image" or rng.random() < args.image_ratio
        n = args.image_batch if image else args.batch
        idx = rng.integers(0, len(captions), n)
        frames = means.shape[2]
        if image:  # any frame of any clip
            t = torch.from_numpy(rng.integers(0, frames, n)).to(args.device)
            rows = torch.from_numpy(idx).to(args.device)
            mean, std = means[rows, :, t][:, :, None], stds[rows, :, t][:, :, None]
        else:
            length = args.short_frames if phase == "short" else frames
            t = int(rng.integers(0, frames - length + 1))
            rows = torch.from_numpy(idx).to(args.device)
            mean, std = means[rows, :, t:t + length], stds[rows, :, t:t + length]
        z0 = (mean + std * torch.randn(mean.shape, generator=gen, device=args.device) - lmean) / lstd
        drop = rng.random(n) < args.drop
        caps = ["" if d else still(captions[i]) if image else captions[i] for d, i in zip(drop, idx.tolist())]
        text, _ = train_pipe.encode_prompt(caps, do_classifier_free_guidance=False, max_sequence_length=args.max_seq,
                                           device=args.device)
        clean_first = torch.from_numpy(np.zeros(n, bool) if image else rng.random(n) < args.first_frame).to(args.device)
        sigma = noise_levels(n, gen, args.train_shift, args.device)
        noise = torch.randn(z0.shape, generator=gen, device=args.device)
        xt, timestep, weight = noised(z0, sigma, noise, clean_first)
        pred = transformer(hidden_states=xt, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        loss = flow_loss(pred, noise - z0, weight)
        optimizer_step(opt, loss, params, ema_params, args.ema, step)
        running.append(loss.item())
        trained = step + 1
        stop = end_step(args, step, start, t0, running, lr, timings, "transformer_s", tr_s0, log)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps or stop:
            if joint_from is None and args.watch:
                binding = single_frame_binding(ema_pipe(), call_defaults(args), single_prompts(args.watch))
                watched.append([step + 1, binding])
                log(f"single-frame binding on {args.watch} tune images at step {step + 1}: {binding:.3f}")
                if binding >= args.image_gate:
                    joint_from = step + 1
                    log(f"joint phase from step {step + 1}: --image-gate {args.image_gate} reached")
            pipe = save(step + 1)
        if stop:
            log(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached")
            break
    if pipe is None:  # nothing left to train: a finished run rerun
        pipe = save(trained)

    # ---- evaluation and record
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    evaluation = evaluate(args, pipe, work, log) if args.eval_videos > 0 else None
    eval_s = time.time() - t
    write_record(args, out, trained, joint_from, watched, timings, eval_s, vae_check, evaluation, pipe, log)


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


def write_record(args, out, trained, joint_from, watched, timings, eval_s, vae_check, evaluation, pipe, log):
    total = sum(v for k, v in timings.items() if k.endswith("_s"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")
    hardware = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True, capture_output=True,
                              text=True).stdout.strip()
    if args.device.startswith("cuda"):
        hardware = f"{torch.cuda.get_device_name(args.device)} (CPU: {hardware})"
    params = {name: n_params(getattr(pipe, name)) for name in ("vae", "text_encoder", "transformer")}
    record = {
        "seed": args.seed, "args": vars(args), "steps_trained": trained, "joint_from": joint_from,
        "single_frame_binding": watched,
        "timings_s": {k: round(v, 1) for k, v in {**timings, "eval_s": eval_s}.items()},
        "wall_time_min": round(total / 60, 1), "torch_threads": args.threads, "hardware": hardware,
        "machine": platform.platform(), "torch": torch.__version__, "weights_bytes": size, "params": params,
        "latents_mean": pipe.vae.config.latents_mean, "latents_std": pipe.vae.config.latents_std,
        "vae_reconstructions": vae_check, "evaluation": evaluation,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    command = command_line(args)
    latent = args.size // SPATIAL
    (out / "TRAINING.md").write_text(
        f"# shapes-wan training record\n\n"
        f"Trained by `samples/train_shapes_wan.py`:\n\n"
        f"    HF_HUB_OFFLINE=1 python samples/train_shapes_wan.py {command}\n\n"
        f"Rerunning the command resumes from the state in --work.\n\n"
        f"- seed: {args.seed}\n"
        f"- clips: {args.n_clips} drawn clips of {args.frames} frames at {args.size}x{args.size} (object weights "
        f"{args.object_weights}, motion named with probability {args.named}); latents "
        f"{args.frames} x {latent} x {latent} x {args.z_dim} (one latent frame per frame)\n"
        f"- generate with num_frames {parent_frames(args.frames, 1)} for {args.frames} frames (WanPipeline adds one "
        f"with this VAE's temporal factor 1; attnsteer.json holds the call defaults)\n"
        f"- image phase: steps 0-{joint_from if joint_from is not None else trained} of batch {args.image_batch} "
        f"single frames (captions without motion words); single-frame binding of {args.watch} tune images at its "
        f"checkpoints: {watched}\n"
        f"- joint phase: from step {joint_from} to {trained} of {args.steps} scheduled, {args.image_ratio:.0%} image "
        f"steps, clip steps of batch {args.batch}, the first {args.short_share:.0%} on {args.short_frames}-frame "
        f"windows, then whole clips"
        + (f"; in {args.first_frame:.0%} of the clips latent frame 0 given clean (per-token timestep 0, out of the "
           f"loss: Wan 2.2 TI2V's conditioning; generation does not use it)" if args.first_frame else "")
        + f"\n- lr {args.lr} (warmup {args.warmup}, cosine to {args.min_lr_frac}x), AdamW wd 0.01, grad clip 1\n"
        f"- objective: rectified flow, one sigma per sample, logit-normal(0, 1) shifted {args.train_shift}, target "
        f"noise - x0; caption dropout {args.drop}; sampling: FlowMatchEulerDiscreteScheduler shift {args.shift}\n"
        f"- text conditioning: the pipeline's own encode_prompt at max_sequence_length {args.max_seq}\n"
        f"- VAE: AutoencoderKLWan, 4x spatial, no temporal compression, {args.z_dim} channels, its causal past taps "
        f"zero; {args.vae_steps} steps of {args.vae_batch} single {args.vae_crop} px frame crops, lr {args.vae_lr}, "
        f"MSE + L1 with object pixels weighted {args.vae_object_weight}, KL weight {args.kl_weight}; on its "
        f"reconstructions of {args.check_clips} fresh clips: {vae_check}\n"
        f"- transformer: {args.layers} layers x {args.heads} heads of {args.head_dim}, ffn {args.ffn}, patch "
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

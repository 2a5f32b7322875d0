"""Train "shapes-sd": a small, real StableDiffusionPipeline on procedural shapes scenes.

The model is the standard Stable Diffusion 1.x layout (AutoencoderKL, CLIPTextModel with the
real CLIP BPE tokenizer, UNet2DConditionModel with cross-attention, DDIMScheduler), only tiny,
so that attention-steering methods can be measured on a model whose failures (missing objects,
colour leakage, fused subjects) are real rather than simulated. Everything runs on one CPU
thread in about an hour:

1. VAE (64x64 RGB -> 16x16x4 latents), trained briefly on drawn scenes (mostly on 32x32 crops,
   which a fully convolutional autoencoder does not mind, then a few full-size steps).
2. A fixed set of drawn scenes is encoded once (latent mean and std kept, sampled per step).
3. Text encoder (from scratch) + UNet trained jointly with the epsilon objective, min-SNR
   weighting, 10% caption dropout to "" (so classifier-free guidance works) and an EMA,
   which is what gets saved.
4. The VAE decoder alone (encoder frozen, so the UNet's latent space does not move) gets a
   few hundred more full-size steps: sharper edges and truer hues.

Usage (the shipped model; see samples/models/shapes-sd/TRAINING.md for the exact two-part
command that produced it, since that run was cut short and resumed with fewer steps):

    HF_HUB_OFFLINE=1 python samples/train_shapes_sd.py --output samples/models/shapes-sd

A state checkpoint is written under --work every --ckpt-every steps (and the pipeline is saved
to --output at the same time); rerunning the same command resumes from it.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from attnsteer.guidance.shapes import draw
from attnsteer.pipelines.tiny import clip_tokenizer

VOCAB_SIZE, BOS_ID, EOS_ID = 49408, 49406, 49407
MAX_TOKENS = 20  # "a red circle, a blue square and a green triangle" is 14 with BOS/EOS
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="samples/models/shapes-sd")
    p.add_argument("--work", default="/tmp/shapes-sd-work", help="checkpoints and the VAE stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-images", type=int, default=24000, help="drawn training scenes")
    p.add_argument("--object-weights", default="0.4,0.35,0.25", help="P(1, 2, 3 objects) per scene")
    p.add_argument("--sample-weights", type=sample_weights, default="2,1,1",
                   help="relative weight of a 1-, 2- and 3-object scene when drawing a training batch")
    # VAE
    p.add_argument("--vae-steps", type=int, default=1500, help="steps on 32x32 crops")
    p.add_argument("--vae-full-steps", type=int, default=150, help="then steps on full 64x64 images")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--decoder-steps", type=int, default=300, help="decoder-only steps after the UNet")
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    # UNet + text encoder
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prediction", default="v_prediction", choices=("v_prediction", "epsilon"),
                   help="v-prediction weights the high-noise steps, where colour and layout are decided, "
                        "far more than epsilon-prediction does")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay floor, fraction of --lr")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting; 0 for plain MSE")
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout to the empty prompt")
    p.add_argument("--default-cfg", type=float, default=3.0,
                   help="guidance_scale written to attnsteer.json, the call defaults attnsteer's CLI reads")
    p.add_argument("--stop-after", type=int, default=0,
                   help="save and exit after this step (to replay an interrupted run exactly, see TRAINING.md)")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--max-minutes", type=float, default=0,
                   help="if > 0, stop early (saving) once the UNet stage has run this long")
    return p.parse_args()


# ----------------------------------------------------------------------------- models

def make_vae():
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False,
    )


def make_text_encoder():
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=40, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
        projection_dim=40, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    ))


def make_unet():
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=40, attention_head_dim=(2, 4, 4),  # diffusers: = number of heads
        norm_num_groups=16,
    )


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- data

def draw_dataset(n, seed, weights):
    """n scenes drawn with seeds seed*10**7 + i; the object count from ``weights``."""
    rng = np.random.default_rng(seed)
    counts = rng.choice(len(weights), n, p=np.asarray(weights) / sum(weights)) + 1
    images, captions = np.empty((n, 64, 64, 3), np.uint8), []
    for i in range(n):
        image, cap, _ = draw(seed * 10**7 + i, n_objects=int(counts[i]))
        images[i] = np.asarray(image)
        captions.append(cap)
    return images, captions


def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- stages

def train_vae(args, images, log):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    vae = make_vae()
    log(f"vae params {n_params(vae)}")
    opt = torch.optim.AdamW(vae.parameters(), args.vae_lr, weight_decay=0.0)
    total = args.vae_steps + args.vae_full_steps
    t0 = time.time()
    for step in range(total):
        idx = rng.integers(0, len(images), args.vae_batch)
        x = to_tensor(images[idx])
        if step < args.vae_steps:  # random 32x32 crops, aligned to the 4-pixel latent grid
            oy, ox = (int(v) * 4 for v in rng.integers(0, 9, 2))
            x = x[:, :, oy:oy + 32, ox:ox + 32]
        for g in opt.param_groups:
            g["lr"] = decayed(args.vae_lr, step, total)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x) + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == total - 1:
            psnr = 10 * math.log10(4 / mse.item())
            log(f"vae step {step}/{total} mse {mse.item():.5f} psnr {psnr:.1f} dB  {time.time() - t0:.0f}s")
    return vae.eval()


def finetune_decoder(args, vae, images, log):
    """Stage 4: more decoder training on full 64x64 scenes with the encoder frozen, so the
    latent space the UNet learned is unchanged and only the decoding gets sharper and its
    hues truer (the crop-trained decoder turned some reds partly orange and blunted stars)."""
    rng = np.random.default_rng(args.seed + 5)
    torch.manual_seed(args.seed + 5)
    return fit_decoder(args, vae, lambda: to_tensor(images[rng.integers(0, len(images), args.vae_batch)]),
                       lambda rec, x: F.mse_loss(rec, x) + F.l1_loss(rec, x), log)


def fit_decoder(args, vae, batch, loss_of, log):
    """--decoder-steps AdamW steps (--decoder-lr, decayed; gradients clipped to norm 1) on ``vae``'s
    decoder and post-quant conv, the encoder frozen: each step encodes ``batch()`` without gradients,
    samples the latent and decodes it, with loss ``loss_of(reconstruction, batch)``. Returns ``vae`` in
    eval mode, frozen."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, args.decoder_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.decoder_steps):
        for g in opt.param_groups:
            g["lr"] = decayed(args.decoder_lr, step, args.decoder_steps)
        x = batch()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = loss_of(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.decoder_steps - 1:
            mse = F.mse_loss(rec.detach(), x).item()
            log(f"decoder step {step + 1}/{args.decoder_steps} mse {mse:.5f} psnr {10 * math.log10(4 / mse):.1f} dB  "
                f"{time.time() - t0:.0f}s")
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae, images, batch=256, convert=None):
    """Posterior means and stds of uint8 images (or, with ``convert``, any items it makes tensors of)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode((convert or to_tensor)(images[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def check_vae(vae, log, n=60):
    """Detector on VAE reconstructions of fresh single- and two-object scenes: the ceiling the
    diffusion model can reach."""
    from attnsteer.guidance.shapes import detect, score, summarize
    from PIL import Image
    for k in (1, 2):
        scenes = [draw(10**9 + k * 1000 + i, n_objects=k) for i in range(n)]
        x = to_tensor(np.stack([np.asarray(s[0]) for s in scenes]))
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        summary = summarize([score(detect(Image.fromarray(r)), s[1]) for r, s in zip(rec, scenes)])
        log(f"vae reconstructions, {k} object(s): " + ", ".join(
            f"{m} {summary[m]['rate']:.2f}" for m in ("coverage", "bound", "binding", "count_right")))


def build_pipeline(vae, text_encoder, unet, tokenizer, prediction):
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER, prediction_type=prediction), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def open_log(work):
    """A logger to stdout and work/train.log (appended, so a resumed run's log continues)."""
    logfile = open(work / "train.log", "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    return log


def start_run(args):
    """Threads, work folder, a logger to stdout and work/train.log, timings of a resumed run, and
    the drawn scenes: (work, out, state_path, log, timings, images, captions)."""
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.output)
    work.mkdir(parents=True, exist_ok=True)
    log = open_log(work)
    timings = {}
    state_path = work / "state.pt"
    if state_path.exists():
        timings = torch.load(state_path, weights_only=False)["timings"]
    log(f"args {vars(args)}")

    t = time.time()
    weights = [float(w) for w in args.object_weights.split(",")]
    images, captions = draw_dataset(args.n_images, args.seed, weights)
    timings.setdefault("draw_s", time.time() - t)
    log(f"drew {len(images)} scenes in {time.time() - t:.0f}s")
    return work, out, state_path, log, timings, images, captions


def weights_option(count: int, what: str, example: str):
    """An argparse type: ``count`` comma-separated non-negative weights, not all zero, one per ``what``."""
    number, every = {2: ("two", "both"), 3: ("three", "all")}[count]

    def parse(text):
        try:
            weights = tuple(float(w) for w in text.split(","))
        except ValueError:
            weights = ()
        if len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {number} non-negative weights, not {every} zero, for {what} (e.g. {example})")
        return weights

    return parse


sample_weights = weights_option(3, "1-, 2- and 3-object scenes", "2,1,1")  # --sample-weights, per object count


def positive_int(text):
    """An option that counts something (steps): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def scene_sampler(args, captions):
    """Draws training-batch indices, a scene with k objects weighted by --sample-weights[k - 1]."""
    from attnsteer.guidance.shapes import parse_caption
    weights = np.asarray(args.sample_weights)
    p = weights[[len(parse_caption(c)) - 1 for c in captions]]
    p = p / p.sum()
    return lambda rng: torch.from_numpy(rng.choice(len(captions), args.batch, p=p))


def decayed(lr, step, total):
    """``lr`` at ``step`` of a cosine decay to a tenth of it over ``total`` steps (the VAE stages)."""
    return lr * (0.5 * (1 + math.cos(math.pi * step / total)) * 0.9 + 0.1)


def cosine_lr(args, step):
    """Linear warm-up to --lr, then cosine decay to --min-lr-frac of it at --steps."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    progress = max(0.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(opt, loss, params, ema_params, ema, step):
    """Backward, clip to norm 1, step, and move the EMA copy (decay warmed up over the first steps)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(ema, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)


def end_step(args, step, start, t0, running, lr, timings, stage, stage_s0, log):
    """After a training step: the stage's time so far into ``timings[stage]``, a progress line every
    --log-every steps (emptying ``running``), and whether the stage has used up --max-minutes."""
    timings[stage] = stage_s0 + time.time() - t0
    if (step + 1) % args.log_every == 0 or step == start:
        log(progress_line(args, step, start, t0, running, lr))
        running.clear()
    return args.max_minutes > 0 and timings[stage] > 60 * args.max_minutes


def progress_line(args, step, start, t0, running, lr):
    done = step + 1 - start
    eta = (time.time() - t0) / done * (args.steps - step - 1)
    return (f"step {step + 1}/{args.steps} loss {np.mean(running):.4f} lr {lr:.2e} "
            f"{(time.time() - t0) / done:.2f}s/step eta {eta / 60:.1f} min")


def main():
    args = parse_args()
    work, out, state_path, log, timings, images, captions = start_run(args)

    tokenizer = clip_tokenizer(model_max_length=MAX_TOKENS)

    # ---- stage 1: VAE
    vae_path = work / "vae"
    if (vae_path / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(vae_path).eval()
        log("loaded trained VAE from the work folder")
    else:
        t = time.time()
        vae = train_vae(args, images, log)
        timings["vae_s"] = time.time() - t
        vae.save_pretrained(vae_path)
    check_vae(vae, log)

    t = time.time()
    cache = work / "latents.pt"
    if cache.exists():
        means, stds = torch.load(cache)
    else:
        means, stds = encode_dataset(vae, images)
        torch.save((means, stds), cache)
    scale = float(1 / means.std())
    vae.register_to_config(scaling_factor=scale)
    timings.setdefault("encode_s", time.time() - t)
    log(f"encoded latents {tuple(means.shape)} in {time.time() - t:.0f}s, scaling_factor {scale:.4f}")
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids

    # ---- stage 2: text encoder + UNet
    torch.manual_seed(args.seed + 2)
    text_encoder, unet = make_text_encoder(), make_unet()
    log(f"text encoder params {n_params(text_encoder)}, unet params {n_params(unet)}")
    ema_te, ema_unet = make_text_encoder(), make_unet()
    ema_te.load_state_dict(text_encoder.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    for m in (ema_te, ema_unet):
        m.requires_grad_(False).eval()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    ema_params = list(ema_te.parameters()) + list(ema_unet.parameters())
    opt = torch.optim.AdamW(params, args.lr, weight_decay=0.01)
    sched = DDIMScheduler(**SCHEDULER, prediction_type=args.prediction)
    sample = scene_sampler(args, captions)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    rng = np.random.default_rng(args.seed + 3)
    gen = torch.Generator().manual_seed(args.seed + 4)
    start = 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        text_encoder.load_state_dict(st["te"]); unet.load_state_dict(st["unet"])
        ema_te.load_state_dict(st["ema_te"]); ema_unet.load_state_dict(st["ema_unet"])
        opt.load_state_dict(st["opt"]); rng.bit_generator.state = st["rng"]; gen.set_state(st["gen"])
        start = st["step"]
        log(f"resumed at step {start}")

    def save(step):
        pipe = build_pipeline(vae, ema_te, ema_unet, tokenizer, args.prediction)
        pipe.save_pretrained(out, safe_serialization=True)
        (out / "attnsteer.json").write_text(json.dumps({"call": {"guidance_scale": args.default_cfg}}) + "\n")
        torch.save({"te": text_encoder.state_dict(), "unet": unet.state_dict(), "ema_te": ema_te.state_dict(),
                    "ema_unet": ema_unet.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                    "gen": gen.get_state(), "step": step, "timings": timings}, str(state_path) + ".tmp")
        os.replace(str(state_path) + ".tmp", state_path)
        log(f"saved pipeline to {out} and state at step {step}")

    text_encoder.train(); unet.train()
    t0, running = time.time(), []
    unet_s0 = timings.get("unet_s", 0.0)
    trained = start
    for step in range(start, args.steps):
        lr = cosine_lr(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = sample(rng)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        tok = ids[idx].clone()
        tok[torch.from_numpy(rng.random(args.batch) < args.drop)] = empty_ids[0]
        ts = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = sched.add_noise(z0, noise, ts)
        cond = text_encoder(tok).last_hidden_state
        pred = unet(zt, ts, cond).sample
        target = noise if args.prediction == "epsilon" else sched.get_velocity(z0, noise, ts)
        per = F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))
        if args.snr_gamma > 0:  # min-SNR-gamma; for v the loss already carries a factor snr + 1
            per = per * snr[ts].clamp(max=args.snr_gamma) / (snr[ts] + (args.prediction != "epsilon"))
        loss = per.mean()
        optimizer_step(opt, loss, params, ema_params, args.ema, step)
        running.append(loss.item())
        trained = step + 1
        out_of_time = end_step(args, step, start, t0, running, lr, timings, "unet_s", unet_s0, log)
        if (step + 1) % args.ckpt_every == 0 or step + 1 in (args.steps, args.stop_after) or out_of_time:
            save(step + 1)
        if step + 1 == args.stop_after:
            log(f"stopping after step {step + 1} (--stop-after)")
            return
        if out_of_time:
            log(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached")
            break
    if trained == start and not (work / "vae_decoder" / "config.json").exists():
        save(trained)

    # ---- stage 4: decoder fine-tune (encoder frozen: the UNet's latent space is unchanged)
    dec_path = work / "vae_decoder"
    if (dec_path / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(dec_path).eval()
        vae.register_to_config(scaling_factor=scale)
        log("loaded fine-tuned decoder from the work folder")
    elif args.decoder_steps > 0:
        t = time.time()
        finetune_decoder(args, vae, images, log)
        timings["decoder_s"] = time.time() - t
        vae.save_pretrained(dec_path)
        check_vae(vae, log)
    save(trained)

    # ---- record
    total = sum(v for k, v in timings.items() if k.endswith("_s"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    cpu = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True, capture_output=True,
                         text=True).stdout.strip()
    record = {
        "seed": args.seed, "args": vars(args), "steps_trained": trained,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_time_min": round(total / 60, 1), "torch_threads": args.threads, "cpu": cpu,
        "machine": platform.platform(), "torch": torch.__version__, "size_bytes": size,
        "params": {"vae": n_params(vae), "text_encoder": n_params(ema_te), "unet": n_params(ema_unet)},
        "vae_scaling_factor": scale,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "TRAINING.md").write_text(
        f"# shapes-sd training record\n\n"
        f"Trained by `samples/train_shapes_sd.py` "
        f"(`python samples/train_shapes_sd.py --output {args.output} --steps {args.steps} --batch {args.batch} "
        f"--lr {args.lr} --decoder-steps {args.decoder_steps} --seed {args.seed}"
        + (f" --max-minutes {args.max_minutes}" if args.max_minutes else "") + "`).\n\n"
        f"- seed: {args.seed}\n- UNet + text encoder steps: {trained} of {args.steps} scheduled at batch {args.batch}, "
        f"lr {args.lr}, {args.prediction} objective, min-SNR gamma {args.snr_gamma}\n"
        f"- VAE steps: {args.vae_steps} (32x32 crops) + {args.vae_full_steps} (64x64), batch {args.vae_batch}; "
        f"then {args.decoder_steps} decoder-only steps (encoder frozen) after the UNet\n"
        f"- training scenes: {args.n_images} (object weights {args.object_weights}, sampled with weights "
        f"{args.sample_weights} by object count), caption dropout {args.drop}\n"
        f"- wall time: {total / 60:.1f} min on {cpu}, torch {torch.__version__}, {args.threads} thread(s) "
        f"(stages: {', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())})\n"
        f"- parameters: VAE {n_params(vae)}, text encoder {n_params(ema_te)}, UNet {n_params(ema_unet)}; "
        f"saved EMA weights (decay {args.ema}), {size / 2**20:.1f} MiB on disk\n"
        f"- full arguments and timings: training.json\n"
    )
    log(f"done: {total / 60:.1f} min, {size / 2**20:.1f} MiB at {out}")


if __name__ == "__main__":
    main()

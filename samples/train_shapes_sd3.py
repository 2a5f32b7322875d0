"""Train "shapes-sd3": a small, real StableDiffusion3Pipeline on procedural shapes scenes.

The model is the standard SD3 layout, only tiny: an SD3Transformer2DModel (MMDiT, joint attention
between image and text tokens) trained with the rectified-flow objective of FlowMatchEulerDiscreteScheduler,
an AutoencoderKL, and two CLIPTextModelWithProjection text encoders with the real CLIP BPE tokenizer.
There is no T5 (text_encoder_3 / tokenizer_3 are None): the pipeline then appends max_sequence_length
all-zero "T5" tokens to the CLIP tokens, and training conditions through the pipeline's own
``encode_prompt`` so that training and inference see the same text tokens.

1. VAE: reused from the shapes-sd run (``samples/train_shapes_sd.py``, its work folder ``--vae-from``):
   the same 64x64 -> 16x16x4 AutoencoderKL and its cached latents of the same drawn scenes (seed 0).
   If the shapes-sd decoder fine-tune (encoder frozen, so the latent space is the same) is done by the
   time the pipeline is saved, its sharper decoder is the one shipped. Without ``--vae-from`` the VAE
   is trained here with the shapes-sd code. shift_factor / scaling_factor are set from the latents.
2. Text encoders + transformer trained jointly from scratch: flow matching (x_t = (1 - s) x0 + s n,
   target n - x0, s logit-normal), 10% caption dropout to "" (so classifier-free guidance works), EMA.

Generation: ``pipe(prompt, max_sequence_length=8, num_inference_steps=40, guidance_scale=4)``
(max_sequence_length as trained: see TRAINING.md), 64x64 is the default size; the saved attnsteer.json
holds these call defaults for attnsteer's CLI.

Usage (the shipped model):

    HF_HUB_OFFLINE=1 python samples/train_shapes_sd3.py --output samples/models/shapes-sd3

A state checkpoint is written under --work every --ckpt-every steps (and the pipeline is saved to
--output at the same time); rerunning the same command resumes from it.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from attnsteer.pipelines.tiny import clip_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapes_sd import (  # noqa: E402
    cosine_lr, encode_dataset, end_step, n_params, optimizer_step, positive_int, sample_weights, scene_sampler,
    start_run, train_vae,
)

VOCAB_SIZE, BOS_ID, EOS_ID = 49408, 49406, 49407
MAX_TOKENS = 16  # CLIP tokens; the longest three-object caption is 14 with BOS/EOS
SCHEDULER = dict(num_train_timesteps=1000, shift=2.0)  # sampling only: training draws sigma itself


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="samples/models/shapes-sd3")
    p.add_argument("--work", default="/tmp/shapes-sd3-work", help="checkpoints, log")
    p.add_argument("--vae-from", default="/tmp/shapes-sd-work",
                   help="shapes-sd work folder (vae/, latents.pt, vae_decoder/); '' to train a VAE here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-images", type=int, default=24000, help="drawn training scenes")
    p.add_argument("--object-weights", default="0.4,0.35,0.25", help="P(1, 2, 3 objects) per scene")
    p.add_argument("--sample-weights", type=sample_weights, default="2,1,1",
                   help="relative weight of a 1-, 2- and 3-object scene when drawing a training batch")
    # model
    p.add_argument("--patch", type=int, default=2, choices=(1, 2, 4),
                   help="patch size, a divisor of the 16x16 latent side (1 learned far slower: single-object "
                        "tune prompts 0.27 after an hour's 4641 steps)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--te-hidden", default="32,8", help="hidden (= projection) size of text_encoder, text_encoder_2")
    p.add_argument("--te-layers", default="3,2")
    p.add_argument("--max-seq", default="8",
                   help="max_sequence_length(s) (zero T5 tokens) used in training, one drawn per step")
    # training
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay floor, fraction of --lr")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout to the empty prompt")
    p.add_argument("--default-cfg", type=float, default=4.0,
                   help="guidance_scale written to attnsteer.json, the call defaults attnsteer's CLI reads")
    p.add_argument("--default-steps", type=positive_int, default=40, help="num_inference_steps written to attnsteer.json")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--max-minutes", type=float, default=0,
                   help="if > 0, stop early (saving) once the transformer stage has run this long")
    # VAE (only when it is trained here)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-full-steps", type=int, default=150)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    return p.parse_args()


# ----------------------------------------------------------------------------- models

def make_text_encoder(hidden, layers, act):
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 8), max_position_embeddings=MAX_TOKENS, hidden_act=act,
        projection_dim=hidden, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    ))


def make_transformer(args, te_hidden, latent_side):
    """adaLN-zero initialisation (as in DiT): every block starts as the identity and the output as
    zero, which DiT found to train faster than a default init."""
    model = SD3Transformer2DModel(
        sample_size=latent_side, patch_size=args.patch, in_channels=4, out_channels=4, num_layers=args.layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads,
        caption_projection_dim=args.heads * args.head_dim,
        joint_attention_dim=sum(te_hidden),  # the two CLIP hidden states side by side
        pooled_projection_dim=sum(te_hidden),  # the two pooled (projected) CLIP outputs
        pos_embed_max_size=latent_side // args.patch,  # the (saved) sin-cos table stays small
        qk_norm="rms_norm",
    )
    for name, module in model.named_modules():
        if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")) or name == "proj_out":
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return model


def build_pipeline(vae, te1, te2, transformer, tokenizer):
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def load_vae(args, images, log):
    """(vae, means, stds): the shapes-sd VAE and cached latents if there, else trained/encoded here."""
    work = Path(args.work)
    src = Path(args.vae_from) if args.vae_from else None
    if src is not None and (src / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(src / "vae").eval()
        log(f"VAE from {src / 'vae'}")
    elif (work / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(work / "vae").eval()
        log("VAE from the work folder")
    else:
        vae = train_vae(args, images, log)
        vae.save_pretrained(work / "vae")
        src = None
    vae.requires_grad_(False)
    cache = None
    for c in ([src / "latents.pt"] if src is not None else []) + [work / "latents.pt"]:
        if c.exists():
            cache = c
            break
    if cache is not None:
        means, stds = torch.load(cache)
        if len(means) < len(images):
            raise SystemExit(f"{cache} holds {len(means)} latents, fewer than --n-images {len(images)}")
        means, stds = means[:len(images)], stds[:len(images)]  # the draws are prefix-consistent
        # the cached latents must be of these very scenes: check a few
        with torch.no_grad():
            x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
            err = (vae.encode(x).latent_dist.mean - means[:4]).abs().max().item()
        if err > 1e-3:
            raise SystemExit(f"{cache} does not match the drawn scenes (max diff {err:.3g})")
        log(f"latents from {cache}")
    else:
        means, stds = encode_dataset(vae, images)
        torch.save((means, stds), work / "latents.pt")
    return vae, means, stds


def final_vae(args, vae, shift, scale, log):
    """The shapes-sd fine-tuned decoder (same frozen encoder, same latents) if it is ready."""
    dec = Path(args.vae_from) / "vae_decoder" if args.vae_from else None
    weights = dec / "diffusion_pytorch_model.safetensors" if dec is not None else None
    if weights is not None and weights.exists() and time.time() - weights.stat().st_mtime > 10:
        vae = AutoencoderKL.from_pretrained(dec).eval()
        log(f"shipping the fine-tuned decoder from {dec}")
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return vae


# ----------------------------------------------------------------------------- main

def main():
    args = parse_args()
    work, out, state_path, log, timings, images, captions = start_run(args)

    t = time.time()
    vae, means, stds = load_vae(args, images, log)
    shift = float(means.mean())
    scale = float(1 / (means - shift).std())
    timings.setdefault("vae_s", time.time() - t)
    log(f"latents {tuple(means.shape)}, shift_factor {shift:.4f}, scaling_factor {scale:.4f}")
    del images

    tokenizer = clip_tokenizer(model_max_length=MAX_TOKENS)
    longest = max(len(tokenizer(c).input_ids) for c in set(captions))
    if longest > MAX_TOKENS:
        raise SystemExit(f"a caption has {longest} tokens > {MAX_TOKENS}")
    te_hidden = [int(v) for v in args.te_hidden.split(",")]
    te_layers = [int(v) for v in args.te_layers.split(",")]
    max_seqs = [int(v) for v in args.max_seq.split(",")]

    torch.manual_seed(args.seed + 2)

    def make_all():
        return (make_text_encoder(te_hidden[0], te_layers[0], "quick_gelu"),
                make_text_encoder(te_hidden[1], te_layers[1], "gelu"), make_transformer(args, te_hidden, means.shape[-1]))

    te1, te2, transformer = make_all()
    ema = make_all()
    for m, e in zip((te1, te2, transformer), ema):
        e.load_state_dict(m.state_dict())
        e.requires_grad_(False).eval()
    log(f"params: text_encoder {n_params(te1)}, text_encoder_2 {n_params(te2)}, transformer {n_params(transformer)}")
    params = [p for m in (te1, te2, transformer) for p in m.parameters()]
    ema_params = [p for m in ema for p in m.parameters()]
    opt = torch.optim.AdamW(params, args.lr, weight_decay=0.01)
    # the training pipeline: only for its encode_prompt (tokenizers, CLIP penultimate states, zero T5 tokens)
    train_pipe = build_pipeline(vae, te1, te2, transformer, tokenizer)
    rng = np.random.default_rng(args.seed + 3)
    gen = torch.Generator().manual_seed(args.seed + 4)
    sample = scene_sampler(args, captions)
    start = 0
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        for m, k in zip((te1, te2, transformer), ("te1", "te2", "transformer")):
            m.load_state_dict(st[k])
        for m, k in zip(ema, ("ema_te1", "ema_te2", "ema_transformer")):
            m.load_state_dict(st[k])
        opt.load_state_dict(st["opt"]); rng.bit_generator.state = st["rng"]; gen.set_state(st["gen"])
        start = st["step"]
        log(f"resumed at step {start}")

    def save(step):
        pipe = build_pipeline(final_vae(args, vae, shift, scale, log), *ema, tokenizer)
        pipe.save_pretrained(out, safe_serialization=True)
        (out / "attnsteer.json").write_text(json.dumps({"call": {
            "guidance_scale": args.default_cfg, "max_sequence_length": max_seqs[0],
            "num_inference_steps": args.default_steps}}) + "\n")
        torch.save({"te1": te1.state_dict(), "te2": te2.state_dict(), "transformer": transformer.state_dict(),
                    "ema_te1": ema[0].state_dict(), "ema_te2": ema[1].state_dict(),
                    "ema_transformer": ema[2].state_dict(), "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state, "gen": gen.get_state(), "step": step, "timings": timings},
                   str(state_path) + ".tmp")
        os.replace(str(state_path) + ".tmp", state_path)
        log(f"saved pipeline to {out} and state at step {step}")

    for m in (te1, te2, transformer):
        m.train()
    t0, running = time.time(), []
    tr_s0 = timings.get("transformer_s", 0.0)
    step = start
    for step in range(start, args.steps):
        lr = cosine_lr(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = sample(rng)
        z0 = ((means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) - shift) * scale
        drop = rng.random(args.batch) < args.drop
        caps = ["" if d else captions[i] for d, i in zip(drop, idx.tolist())]
        n_seq = int(max_seqs[rng.integers(0, len(max_seqs))])
        prompt_embeds, _, pooled, _ = train_pipe.encode_prompt(
            prompt=caps, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
            do_classifier_free_guidance=False, max_sequence_length=n_seq)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(z0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        zt = (1 - s) * z0 + s * noise
        pred = transformer(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - z0)
        optimizer_step(opt, loss, params, ema_params, args.ema, step)
        running.append(loss.item())
        stop = end_step(args, step, start, t0, running, lr, timings, "transformer_s", tr_s0, log)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps or stop:
            save(step + 1)
        if stop:
            log(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached")
            break
    trained = step + 1 if args.steps > start else start
    if start >= args.steps:
        save(args.steps)

    # ---- record
    total = sum(v for k, v in timings.items() if k.endswith("_s"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.suffix == ".safetensors")
    cpu = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True, capture_output=True,
                         text=True).stdout.strip()
    shipped_vae = AutoencoderKL.from_pretrained(out / "vae")
    dec_note = ("the shapes-sd fine-tuned decoder" if args.vae_from and
                (Path(args.vae_from) / "vae_decoder" / "diffusion_pytorch_model.safetensors").exists()
                else "the shapes-sd stage-1 decoder")
    record = {
        "seed": args.seed, "args": vars(args), "steps_trained": trained,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "wall_time_min": round(total / 60, 1), "torch_threads": args.threads, "cpu": cpu,
        "machine": platform.platform(), "torch": torch.__version__, "weights_bytes": size,
        "params": {"vae": n_params(shipped_vae), "text_encoder": n_params(ema[0]),
                   "text_encoder_2": n_params(ema[1]), "transformer": n_params(ema[2])},
        "vae_scaling_factor": scale, "vae_shift_factor": shift, "vae": dec_note,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "TRAINING.md").write_text(
        f"# shapes-sd3 training record\n\n"
        f"Trained by `samples/train_shapes_sd3.py`:\n\n"
        f"    HF_HUB_OFFLINE=1 python samples/train_shapes_sd3.py --output {args.output} --work {args.work} "
        f"--vae-from {args.vae_from} --steps {args.steps} "
        f"--batch {args.batch} --lr {args.lr} --max-seq {args.max_seq} --patch {args.patch} --threads {args.threads} "
        f"--seed {args.seed}"
        + (f" --max-minutes {args.max_minutes}" if args.max_minutes else "")
        + "\n\nRerunning the command resumes from the state in --work.\n\n"
        f"- seed: {args.seed}\n"
        f"- transformer + text encoder steps: {trained} of {args.steps} scheduled, batch {args.batch}, "
        f"lr {args.lr} (warmup {args.warmup}, cosine to {args.min_lr_frac}x), AdamW wd 0.01, grad clip 1\n"
        f"- objective: rectified flow, sigma logit-normal(0, 1), target noise - x0; caption dropout {args.drop}; "
        f"sampling: FlowMatchEulerDiscreteScheduler shift {SCHEDULER['shift']}\n"
        f"- text conditioning: the pipeline's own encode_prompt, CLIP {MAX_TOKENS} tokens, "
        f"max_sequence_length {args.max_seq} zero T5 tokens: generate with the same max_sequence_length\n"
        f"- training scenes: {args.n_images} (object weights {args.object_weights}, sampled with weights "
        f"{args.sample_weights} by object count); adaLN-zero initialisation\n"
        f"- VAE: from the shapes-sd run ({args.vae_from or 'trained here'}); shipped decoder: {dec_note}; "
        f"shift_factor {shift:.4f}, scaling_factor {scale:.4f}\n"
        f"- wall time: {total / 60:.1f} min on {cpu}, torch {torch.__version__}, {args.threads} thread(s) "
        f"(stages: {', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())}), "
        f"on a 2-core machine\n"
        f"- transformer: {args.layers} joint layers x {args.heads} heads of {args.head_dim}, patch {args.patch}\n"
        f"- parameters: text_encoder {n_params(ema[0])}, text_encoder_2 {n_params(ema[1])}, "
        f"transformer {n_params(ema[2])}, VAE {n_params(shipped_vae)}; saved EMA weights (decay {args.ema}), "
        f"{size / 2**20:.1f} MiB of weights\n"
        f"- full arguments and timings: training.json\n"
    )
    log(f"done: {total / 60:.1f} min, {size / 2**20:.1f} MiB of weights at {out}")


if __name__ == "__main__":
    main()

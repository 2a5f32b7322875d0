"""Long video in constant memory: FIFO-Diffusion on Wan, as a WanPipeline subclass.

    pipe = WanFIFOPipeline.from_pretrained("shapes-wan")
    video = pipe("a red circle moving left", num_frames=129, generator=torch.Generator().manual_seed(0)).frames[0]

The model's own clip (``fifo_window_frames`` video frames, by default the length it was trained on:
the model folder's attnsteer.json, else Wan's 81) is sampled first with the parent pipeline; then a
queue of f x n latent frames (f latent frames a window, n = ``fifo_partitions``) runs as
``attnsteer.guidance.fifo`` describes, with the paper's lookahead by default (f // 2 context slots
before the head, 2n model calls a frame for an even f; n without). Wan 2.2's two experts
(``transformer_2`` with ``boundary_ratio``) each denoise the frames whose timestep is theirs, as
WanPipeline picks one per step; a window whose written frames straddle the boundary runs both. Each
frame leaving the queue is decoded at once through Wan's causal VAE with its cache kept
(``StreamingDecoder``) and handed to ``frame_callback(pipe, first_frame, frames)`` (frames: [batch, F,
H, W, 3] floats in [0, 1]); with a callback the frames are not kept, so memory does not grow with the
length, and the output's ``frames`` is None. ``fifo_prompt_schedule`` [(start, stop, prompt)] gives
frame ranges their own prompts, ``fifo_prompt_blend`` frames of linear change between them. A VAE
without temporal compression (temporal factor 1) gives one video frame a latent frame.

Formulas, defaults and sources: docs/methods.md, section 5.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack

import torch
from diffusers import WanPipeline
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from attnsteer.attention_processors import CROSS, SELF, SteeringSession, list_layers
from attnsteer.guidance.fifo import PromptSchedule, coherent_tail, context_slots, fifo_step, initial_queue
from attnsteer.guidance.ouroboros import Ouroboros

from .astar import check_flag
from .frames import check_frames, frame_rounding_quiet, parent_frames, trained_frames
from .steer import CallDefaultsMixin
from .tokens import word_indices

FIFO_PARTITIONS = 4  # windows in the queue
OUROBOROS_MOMENTUM = 0.9  # of the subject bank's moving average
OUROBOROS_GUIDANCE = 0.1  # self-recurrent guidance step, relative to the velocity (not tuned)
PARENT_DEFAULTS = {name: p.default for name, p in inspect.signature(WanPipeline.__call__).parameters.items()}
OUTPUT_TYPES = ("np", "pil", "pt", "latent")  # WanPipeline's


class StreamingDecoder:
    """Decode latent frames one at a time through Wan's causal VAE, keeping its feature cache between
    them: the same video as ``vae.decode`` of all the frames at once (diffusers decodes frame by frame
    too), in memory that does not grow with the length. A ``with`` block; the VAE's cache is cleared on
    exit, as after a decode."""

    def __init__(self, vae):
        self.vae = vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        self.mean, self.std, self.first = mean, std, True

    def __enter__(self):
        self.vae.clear_cache()
        self.first = True
        return self

    def __exit__(self, *exc):
        self.vae.clear_cache()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """One normalised latent frame [B, C, 1, h, w] -> its video frames [B, 3, F, H, W] in [-1, 1] (F = 1
        for the first, the temporal factor after)."""
        vae = self.vae
        z = latent.to(vae.dtype) * self.std.to(latent.device, vae.dtype) + self.mean.to(latent.device, vae.dtype)
        vae._conv_idx = [0]
        out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=self.first)
        self.first = False
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)



class WanFIFOPipeline(CallDefaultsMixin, WanPipeline):
    """WanPipeline that generates videos of any length with FIFO-Diffusion (see the module docstring).

    Keyword arguments beyond WanPipeline's (``num_frames`` is the output length; ``num_inference_steps``
    the steps of the initial clip):
        fifo_partitions: n >= 1; each frame passes f x n noise levels (default 4).
        fifo_lookahead: the paper's lookahead: f // 2 context slots before the head and windows at
            stride f - f // 2 that write their later part, 2n model calls per frame for an even f
            instead of n (default True).
        fifo_window_frames: video frames of a window (default: the model's trained clip length).
        fifo_beyond_training: allow a window longer than the trained clip (default False).
        fifo_prompt_schedule, fifo_prompt_blend: prompts per frame range, instead of ``prompt``.
        frame_callback: receives each decoded chunk of frames; the frames are then not kept (not with
            output_type "latent", which decodes none).
        ouroboros_tail: Ouroboros' coherent tail sampling: each new tail frame takes the low
            frequencies of the queue's last latent and the high frequencies of fresh noise (default False).
        ouroboros_subjects: words of the prompt (every prompt) naming the subjects, e.g. ["circle"];
            turns on the two parts below (``attnsteer.guidance.ouroboros``), from the second step on. Both
            act on the windows after the head window, so they need fifo_partitions >= 2; not with
            Wan 2.2's two experts.
        ouroboros_cross_frame: the head window's subject keys and values are read by the later windows
            of each step (default True).
        ouroboros_guidance: self-recurrent guidance, the size of the subject-bank loss' gradient step
            relative to the velocity's (default 0.1; 0 turns it off). Not yet tuned on a trained model.
        ouroboros_momentum: of the subject bank's moving average (default 0.9).
        ouroboros_layers: the self-attention layers that store, read and pool (default: all).
        guidance_scale_2: WanPipeline's: the CFG scale of ``transformer_2`` (default: guidance_scale).
    """

    def trained_frames(self) -> int:
        return trained_frames(self.call_defaults, self.vae_scale_factor_temporal)

    def check_fifo(self, num_frames, partitions, window_frames, beyond, schedule, blend, prompt,
                   flags: dict | None = None, frame_callback=None, output_type="np") -> PromptSchedule | None:
        """ValueError naming a bad FIFO option, before any compute (``flags``: name -> a value that must be
        True or False)."""
        for name, value in (flags or {}).items():
            check_flag(name, value)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} must be one of {', '.join(map(repr, OUTPUT_TYPES))}")
        if frame_callback is not None and not callable(frame_callback):
            raise ValueError(f"frame_callback {frame_callback!r} must be a function (pipe, first_frame, frames)")
        if frame_callback is not None and output_type == "latent":
            raise ValueError("frame_callback receives decoded frames, and output_type 'latent' decodes none: "
                             "give one of them")
        factor = self.vae_scale_factor_temporal
        check_frames("num_frames", num_frames, factor)
        check_frames("fifo_window_frames", window_frames, factor)
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"fifo_partitions {partitions!r} must be a whole number n >= 1 (the queue holds n windows)")
        if window_frames > self.trained_frames() and not beyond:
            raise ValueError(f"fifo_window_frames {window_frames} is longer than the {self.trained_frames()} frames the "
                             "model was trained on; give fifo_beyond_training=True to run it anyway")
        if window_frames < 1 + factor:
            raise ValueError(f"fifo_window_frames {window_frames} gives one latent frame; a window needs at least "
                             f"{1 + factor} frames")
        if schedule is None:
            return None
        if prompt is not None:
            raise ValueError("give prompt or fifo_prompt_schedule, not both")
        return PromptSchedule(schedule, num_frames, blend)

    def check_ouroboros(self, subjects, guidance, prompts: list[str], max_sequence_length=None,
                        momentum=OUROBOROS_MOMENTUM, layers=None, partitions=FIFO_PARTITIONS):
        """The subjects' text-key indices per prompt ([prompt][subject]) and the memory layers, or a
        ValueError naming a bad Ouroboros option, before any compute (max_sequence_length None: the
        pipeline's default; ``partitions``: the run's fifo_partitions)."""
        if (not isinstance(subjects, (list, tuple)) or not subjects
                or not all(isinstance(w, str) and w.strip() for w in subjects)):
            raise ValueError(f"ouroboros_subjects {subjects!r} must be a list of words of the prompt, e.g. ['circle']")
        twice = next((w for i, w in enumerate(subjects) if w in subjects[:i]), None)
        if twice is not None:
            raise ValueError(f"ouroboros_subjects {list(subjects)!r} gives {twice!r} twice; give each subject once")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance < float("inf"):
            raise ValueError(f"ouroboros_guidance {guidance!r} must be a number >= 0 (0: off)")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"ouroboros_momentum {momentum!r} must be a number in [0, 1)")
        if self.config.boundary_ratio is not None:
            raise ValueError(f"ouroboros_subjects {list(subjects)!r}: the subject parts run on one transformer, and "
                             "this pipeline has Wan 2.2's two experts (boundary_ratio); give no subjects")
        if partitions < 2:
            raise ValueError(f"ouroboros_subjects needs fifo_partitions >= 2, got {partitions}: its parts act on the "
                             "windows after the head window, and one partition is one window")
        own = [n for n, info in list_layers(self.transformer).items() if info.kind == SELF]
        chosen = own if layers is None else [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in chosen if n not in own]
        if unknown or not chosen:
            raise ValueError(f"ouroboros_layers {unknown or layers!r}: allowed are the transformer's self-attention "
                             f"layers, e.g. {', '.join(own[:2])}")
        if max_sequence_length is None:
            max_sequence_length = {**PARENT_DEFAULTS, **self.call_defaults}["max_sequence_length"]
        arguments = {"prompt": prompts, "max_sequence_length": max_sequence_length}
        groups = [[word_indices(self, arguments, w, i) for w in subjects] for i in range(len(prompts))]
        return groups, chosen

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, height=None, width=None, num_frames=None,
                 num_inference_steps=None, guidance_scale=None, generator=None, output_type="np", return_dict=True,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=None,
                 fifo_partitions=FIFO_PARTITIONS, fifo_lookahead=True, fifo_window_frames=None, fifo_beyond_training=False,
                 fifo_prompt_schedule=None, fifo_prompt_blend=0, frame_callback=None, ouroboros_tail=False,
                 ouroboros_subjects=None, ouroboros_cross_frame=True, ouroboros_guidance=OUROBOROS_GUIDANCE,
                 ouroboros_momentum=OUROBOROS_MOMENTUM,
                 ouroboros_layers=None, guidance_scale_2=None):
        defaults = {**PARENT_DEFAULTS, **self.call_defaults}
        pick = lambda value, name: value if value is not None else defaults[name]
        height, width, num_frames = pick(height, "height"), pick(width, "width"), pick(num_frames, "num_frames")
        steps, guidance_scale = pick(num_inference_steps, "num_inference_steps"), pick(guidance_scale, "guidance_scale")
        max_sequence_length = pick(max_sequence_length, "max_sequence_length")
        guidance_scale_2 = pick(guidance_scale_2, "guidance_scale_2")
        two_experts = self.config.boundary_ratio is not None
        if guidance_scale_2 is not None and not two_experts:
            raise ValueError(f"guidance_scale_2 {guidance_scale_2!r} is the CFG scale of Wan 2.2's second expert, and "
                             "this pipeline has one transformer (no boundary_ratio): leave it out")
        if guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        window_frames = fifo_window_frames if fifo_window_frames is not None else self.trained_frames()
        flags = dict(fifo_lookahead=fifo_lookahead, fifo_beyond_training=fifo_beyond_training, ouroboros_tail=ouroboros_tail,
                     ouroboros_cross_frame=ouroboros_cross_frame)
        schedule = self.check_fifo(num_frames, fifo_partitions, window_frames, fifo_beyond_training,
                                   fifo_prompt_schedule, fifo_prompt_blend, prompt, flags, frame_callback, output_type)
        prompts = schedule.prompts if schedule is not None else [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a list of strings, got {prompt!r}")
        factor, device = self.vae_scale_factor_temporal, self._execution_device
        f = (window_frames - 1) // factor + 1  # latent frames: 1 + k * factor video frames make 1 + k
        length = f * fifo_partitions
        total = (num_frames - 1) // factor + 1
        warmup = length - f
        context = context_slots(f, fifo_lookahead)
        subjects = None
        if ouroboros_subjects is not None:
            groups, memory_layers = self.check_ouroboros(ouroboros_subjects, ouroboros_guidance, prompts,
                                                         max_sequence_length, ouroboros_momentum, ouroboros_layers,
                                                         fifo_partitions)
            if schedule is not None:
                if any(g != groups[0] for g in groups):
                    raise ValueError(f"ouroboros_subjects {list(ouroboros_subjects)} sit at different tokens in the "
                                     "scheduled prompts, whose embeddings are blended: word them alike")
                groups = groups[:1]
            if ouroboros_cross_frame or ouroboros_guidance:
                cross = [n for n, info in list_layers(self.transformer).items() if info.kind == CROSS]
                subjects = Ouroboros(groups, cross, memory_layers, context + length, ouroboros_cross_frame,
                                     float(ouroboros_guidance), float(ouroboros_momentum))
                SteeringSession(self.transformer, [subjects.capture, subjects.memory])  # refuses unsteerable layers
        self.check_inputs(prompts[0], negative_prompt, height, width, None, None, list(callback_on_step_end_tensor_inputs))
        self._guidance_scale, self._attention_kwargs, self._interrupt = guidance_scale, None, False
        cfg = self.do_classifier_free_guidance

        embeds = []
        for text in prompts:
            pos, neg = self.encode_prompt(text if schedule is not None else prompts, negative_prompt, cfg,
                                          max_sequence_length=max_sequence_length, device=device)
            embeds.append((pos, neg))
            if schedule is None:
                break

        def conditioning(frame: float):
            if schedule is None:
                return embeds[0]
            w = schedule.weights(frame).to(device)
            mix = lambda k: (sum(wi * e[k] for wi, e in zip(w, embeds)).to(embeds[0][k].dtype)
                             if embeds[0][k] is not None else None)
            return mix(0), mix(1)

        with frame_rounding_quiet():
            clip = WanPipeline.__call__(
                self, prompt_embeds=embeds[0][0], negative_prompt_embeds=embeds[0][1], height=height, width=width,
                num_frames=parent_frames(window_frames, factor), num_inference_steps=steps,
                guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2 if two_experts else None,
                generator=generator, output_type="latent", max_sequence_length=max_sequence_length).frames
        self.scheduler.set_timesteps(length, device=device)
        sigmas = self.scheduler.sigmas.to(device=device, dtype=torch.float32)
        scale = self.scheduler.config.num_train_timesteps
        shape = (clip.shape[0], clip.shape[1], 1, clip.shape[3], clip.shape[4])
        noise = torch.cat([randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
                           for _ in range(context + length)], dim=2)
        queue = initial_queue(clip.float(), sigmas, noise, context)
        boundary = self.config.boundary_ratio * scale if two_experts else None
        tokens = (clip.shape[3] // self.transformer.config.patch_size[1]) * (clip.shape[4] // self.transformer.config.patch_size[2])
        produced, kept = 0, []

        def video_frame(latent_index: int) -> int:
            return 0 if latent_index <= 0 else 1 + factor * (latent_index - 1)

        def velocity(x, sigma, start, write):
            frame_t = sigma * scale
            t = frame_t.repeat_interleave(tokens).expand(x.shape[0], -1)
            pos, neg = conditioning(video_frame(produced - warmup + start - context + f // 2))

            def branch(model, embeds):
                return lambda z: model(hidden_states=z.to(model.dtype), timestep=t, encoder_hidden_states=embeds,
                                       return_dict=False)[0]

            if subjects is not None:
                return subjects.velocity(x, start, branch(self.transformer, pos),
                                         branch(self.transformer, neg) if cfg else None, guidance_scale,
                                         self.transformer).float()
            high = frame_t >= boundary if two_experts else torch.ones_like(frame_t, dtype=torch.bool)
            pred = None
            for model, scale_g, mine in ((self.transformer, guidance_scale, high),
                                         (self.transformer_2, guidance_scale_2, ~high)):
                if not mine[write - start:].any():  # none of the frames this window writes is this expert's
                    continue
                own = branch(model, pos)(x).float()
                if cfg:
                    uncond = branch(model, neg)(x).float()
                    own = uncond + scale_g * (own - uncond)
                pred = own if pred is None else torch.where(mine.view(1, 1, -1, 1, 1), own, pred)
            return pred

        with ExitStack() as stack:
            decoder = stack.enter_context(StreamingDecoder(self.vae))
            bar = stack.enter_context(self.progress_bar(total=warmup + total))
            if subjects is not None:
                stack.enter_context(subjects.attached(self.transformer))
            for i in range(warmup + total):
                queue = fifo_step(queue, sigmas, f, fifo_lookahead, velocity)
                if subjects is not None:
                    subjects.shift()
                tail = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
                if ouroboros_tail:
                    tail = coherent_tail(queue[:, :, -1:], tail)
                head, queue = queue[:, :, context:context + 1], torch.cat([queue[:, :, 1:], tail], 2)
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, sigmas[0] * scale, {"latents": queue})
                    queue = out.pop("latents", queue)
                produced += 1
                if i >= warmup:
                    if output_type == "latent":
                        kept.append(head)
                    elif frame_callback is not None:
                        frames = self.video_processor.postprocess_video(decoder.decode(head), output_type="np")
                        frame_callback(self, video_frame(i - warmup), frames)
                    else:
                        kept.append(decoder.decode(head))
                bar.update()
        self.maybe_free_model_hooks()
        if frame_callback is not None:
            video = None
        else:
            video = torch.cat(kept, dim=2)
            if output_type != "latent":
                video = self.video_processor.postprocess_video(video, output_type=output_type)
        return WanPipelineOutput(frames=video) if return_dict else (video,)


def fifo_pipeline(pipe: WanPipeline) -> WanFIFOPipeline:
    """A WanFIFOPipeline on a loaded Wan pipeline's components (shared, not copied) and call defaults."""
    fifo = WanFIFOPipeline(**pipe.components)
    fifo.call_defaults = pipe.call_defaults
    return fifo

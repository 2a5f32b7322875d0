"""FIFO-Diffusion on a tiny random Wan: against hand-written queues (lookahead off and on, Wan 2.2's two
experts), model calls per frame, a per-frame VAE, streaming decode, bad input."""

import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from diffusers.models.attention_processor import AttnProcessor

from attnsteer.pipelines import fifo as fifo_module
from attnsteer.pipelines.fifo import StreamingDecoder, WanFIFOPipeline
from attnsteer.pipelines.frames import trained_frames
from attnsteer.pipelines.tiny import tiny_components, tiny_pipeline

_PIPE = []
CALL = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8, fifo_window_frames=5)


def pipe():
    if not _PIPE:
        _PIPE.append(tiny_pipeline("wan", WanFIFOPipeline))
        _PIPE[0].set_progress_bar_config(disable=True)
    return _PIPE[0]


def fifo(seed=0, **extra):
    return pipe()("a red circle", **{**CALL, **extra}, generator=torch.Generator().manual_seed(seed))


def reference_start(p):
    """What a hand-written FIFO of 2 steps starts from, drawn as the pipeline draws it at seed 0: the prompt's
    embeddings, the initial clip (5 frames), the two sigmas, and a function drawing the next noise frame."""
    g = torch.Generator().manual_seed(0)
    embeds, _ = p.encode_prompt("a red circle", None, False, max_sequence_length=8)
    clip = WanPipeline.__call__(p, prompt_embeds=embeds, height=32, width=32, num_frames=5, num_inference_steps=2,
                                guidance_scale=1.0, generator=g, output_type="latent").frames
    p.scheduler.set_timesteps(2)
    return embeds, clip, p.scheduler.sigmas[:2].tolist(), lambda: torch.randn(clip[:, :, :1].shape, generator=g)


def test_a_one_window_queue_is_the_hand_written_fifo_reference():
    """n = 1, no lookahead, 9 frames: the clip of 2 latent frames, then 3 steps of a 2-slot queue."""
    p = pipe()
    out = fifo(num_frames=9, fifo_partitions=1, fifo_lookahead=False, guidance_scale=1.0, output_type="latent").frames
    embeds, clip, (s0, s1), frame = reference_start(p)
    noise = torch.cat([frame(), frame()], 2)
    sig = torch.tensor([s1, s0]).view(1, 1, 2, 1, 1)  # head, tail
    x = (1 - sig) * clip + sig * noise
    expected = []
    for _ in range(3):
        t = torch.tensor([s1, s0]).repeat_interleave(16)[None] * 1000  # 4 x 4 tokens a frame
        with torch.no_grad():
            v = p.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
        x = x + (torch.tensor([0.0, s1]).view(1, 1, 2, 1, 1) - sig) * v
        expected.append(x[:, :, :1])
        x = torch.cat([x[:, :, 1:], frame()], 2)
    torch.testing.assert_close(out, torch.cat(expected, 2), atol=1e-5, rtol=1e-5)


def test_lookahead_with_one_partition_is_the_papers_context_and_half_windows():
    """n = 1, lookahead, 5 frames (f = 2): one context slot before the 2-slot queue, holding the clip's first
    frame at the head's sigma, then each frame that left; each step runs windows k = 0, 1 on slots [k, k + 2)
    and updates only slot k + 1, both windows reading the queue as it was before the step."""
    p = pipe()
    out = fifo(num_frames=5, fifo_partitions=1, guidance_scale=1.0, output_type="latent").frames
    embeds, clip, (s0, s1), frame = reference_start(p)
    levels, nexts = [s1, s1, s0], [None, 0.0, s1]  # context, head, tail
    x = torch.cat([(1 - s) * clip[:, :, [0, 0, 1][j]:[0, 0, 1][j] + 1] + s * frame() for j, s in enumerate(levels)], 2)
    expected = []
    for _ in range(2):
        before = x.clone()
        for k in (1, 0):
            t = torch.tensor(levels[k:k + 2]).repeat_interleave(16)[None] * 1000
            with torch.no_grad():
                v = p.transformer(hidden_states=before[:, :, k:k + 2], timestep=t, encoder_hidden_states=embeds,
                                  return_dict=False)[0]
            x[:, :, k + 1] = before[:, :, k + 1] + (nexts[k + 1] - levels[k + 1]) * v[:, :, 1]
        expected.append(x[:, :, 1:2])
        x = torch.cat([x[:, :, 1:], frame()], 2)  # the frame that left becomes the context
    torch.testing.assert_close(out, torch.cat(expected, 2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, fifo(num_frames=5, fifo_partitions=1, guidance_scale=1.0, fifo_lookahead=False,
                                         output_type="latent").frames)


@pytest.mark.parametrize("partitions,lookahead,per_frame", [(1, True, 2), (2, True, 4), (2, False, 2), (1, False, 1)])
def test_model_calls_per_frame_are_2n_with_lookahead_and_n_without(partitions, lookahead, per_frame, monkeypatch):
    """9 frames, f = 2: the clip's 2 steps, then one FIFO step per frame out, warm-up (L - f) included."""
    p, calls = pipe(), []
    forward = p.transformer.forward
    monkeypatch.setattr(p.transformer, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    fifo(num_frames=9, fifo_partitions=partitions, fifo_lookahead=lookahead, guidance_scale=1.0, output_type="latent")
    steps = 2 * partitions - 2 + 3
    assert len(calls) == 2 + steps * per_frame


def two_experts(boundary_ratio=0.5):
    components = tiny_components("wan")
    components["transformer_2"] = tiny_components("wan", seed=1)["transformer"]
    fifo_pipe = WanFIFOPipeline(**components, boundary_ratio=boundary_ratio)
    fifo_pipe.set_progress_bar_config(disable=True)
    return fifo_pipe


def test_wan22_experts_each_denoise_the_frames_at_their_own_noise_level():
    """n = 1, no lookahead, 1 frame: one FIFO step on the 2-slot queue, head at s_1 (t ~ 9 < 500: the
    low-noise transformer_2 with guidance_scale_2) and tail at s_0 = 1 (t = 1000: transformer with
    guidance_scale), each frame's velocity from its own expert, the CFG of each."""
    p, g1, g2 = two_experts(), 5.0, 2.0
    after = []
    out = p("a red circle", **{**CALL, "num_frames": 1}, fifo_partitions=1, fifo_lookahead=False, guidance_scale=g1,
            guidance_scale_2=g2, output_type="latent", generator=torch.Generator().manual_seed(0),
            callback_on_step_end=lambda pipe, i, t, kw: after.append(kw["latents"]) or {}).frames
    g = torch.Generator().manual_seed(0)
    cond, uncond = p.encode_prompt("a red circle", None, True, max_sequence_length=8)
    clip = WanPipeline.__call__(p, prompt_embeds=cond, negative_prompt_embeds=uncond, height=32, width=32,
                                num_frames=5, num_inference_steps=2, guidance_scale=g1, guidance_scale_2=g2,
                                generator=g, output_type="latent").frames
    p.scheduler.set_timesteps(2)
    s0, s1 = p.scheduler.sigmas[:2].tolist()
    frame = lambda: torch.randn(clip[:, :, :1].shape, generator=g)
    sig = torch.tensor([s1, s0]).view(1, 1, 2, 1, 1)
    x = (1 - sig) * clip + sig * torch.cat([frame(), frame()], 2)
    t = torch.tensor([s1, s0]).repeat_interleave(16)[None] * 1000
    assert t[0, 0] < 500 <= t[0, -1]

    def guided(model, scale):
        with torch.no_grad():
            run = lambda text: model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            c, u = run(cond), run(uncond)
        return u + scale * (c - u)

    v = torch.cat([guided(p.transformer_2, g2)[:, :, :1], guided(p.transformer, g1)[:, :, 1:]], 2)
    x = x + (torch.tensor([0.0, s1]).view(1, 1, 2, 1, 1) - sig) * v
    torch.testing.assert_close(out, x[:, :, :1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[0], torch.cat([x[:, :, 1:], frame()], 2), atol=1e-5, rtol=1e-5)


def test_wan22_a_window_runs_only_the_experts_of_the_frames_it_writes(monkeypatch):
    """Lookahead, n = 1: window 0 writes the head (low noise), window 1 the tail (high noise), though it
    reads the head too: one expert each, once per CFG branch."""
    p, calls = two_experts(), {"transformer": 0, "transformer_2": 0}

    def counted(name):
        forward = getattr(p, name).forward

        def run(*args, **kwargs):
            calls[name] += 1
            return forward(*args, **kwargs)
        return run

    for name in calls:
        monkeypatch.setattr(getattr(p, name), "forward", counted(name))
    p("a red circle", **{**CALL, "num_frames": 1}, fifo_partitions=1, guidance_scale=5.0, output_type="latent")
    assert calls == {"transformer": 2 + 2, "transformer_2": 2 + 2}  # the clip's step, then the FIFO window


def test_wan22_options_are_checked_before_compute(monkeypatch):
    p = two_experts()
    monkeypatch.setattr(p.transformer, "forward", computed)
    with pytest.raises(ValueError, match=r"ouroboros_subjects \['circle'\]: the subject parts run on one transformer"):
        p("a red circle", **CALL, num_frames=9, fifo_partitions=2, ouroboros_subjects=["circle"])


def per_frame_vae_pipeline():
    """The tiny Wan with a VAE of no temporal compression (temporal factor 1), as the shapes video model's."""
    components = tiny_components("wan")
    config = {**components["vae"].config, "temperal_downsample": [False, False], "scale_factor_temporal": 1}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        components["vae"] = AutoencoderKLWan.from_config(config).eval()
    fifo_pipe = WanFIFOPipeline(**components)
    fifo_pipe.set_progress_bar_config(disable=True)
    return fifo_pipe


def test_a_per_frame_vae_gives_exactly_num_frames_and_streams_as_one_decode(monkeypatch):
    p = per_frame_vae_pipeline()
    assert p.vae_scale_factor_temporal == 1
    clips, queue = [], fifo_module.initial_queue
    monkeypatch.setattr(fifo_module, "initial_queue", lambda clip, *a: clips.append(clip.shape[2]) or queue(clip, *a))
    notices = []
    handler = logging.Handler()
    handler.emit = notices.append
    logger = logging.getLogger("diffusers.pipelines.wan.pipeline_wan")
    logger.addHandler(handler)
    try:
        call = dict(CALL, fifo_window_frames=3, num_frames=6, fifo_partitions=2)
        latents = p("a red circle", **call, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
        chunks = []
        p("a red circle", **call, generator=torch.Generator().manual_seed(0),
          frame_callback=lambda pipe, first, frames: chunks.append((first, frames)))
    finally:
        logger.removeHandler(handler)
    assert latents.shape[2] == 6 and clips == [3, 3]  # the window's 3 frames are 3 latent frames
    assert not notices  # WanPipeline's notice that it rounds num_frames, held back for the clip
    assert [first for first, _ in chunks] == list(range(6)) and all(c.shape[1] == 1 for _, c in chunks)
    std = torch.tensor(p.vae.config.latents_std).view(1, -1, 1, 1, 1)
    mean = torch.tensor(p.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        whole = p.video_processor.postprocess_video(p.vae.decode(latents * std + mean).sample, output_type="np")
    assert whole.shape == (1, 6, 32, 32, 3)
    np.testing.assert_allclose(np.concatenate([c for _, c in chunks], 1), whole, atol=1e-5)
    with StreamingDecoder(p.vae) as decoder:
        parts = [decoder.decode(latents[:, :, i:i + 1]) for i in range(6)]
    assert [part.shape[2] for part in parts] == [1] * 6


def test_a_per_frame_vae_counts_frames_one_to_a_latent_frame(monkeypatch):
    p = per_frame_vae_pipeline()
    monkeypatch.setattr(p, "call_defaults", {"num_frames": 4})  # WanPipeline makes 5 frames of it at factor 1
    assert p.trained_frames() == 5 and trained_frames({"num_frames": 4}, 1) == 5
    assert trained_frames({"num_frames": 17}) == 17 and trained_frames({}) == 81
    monkeypatch.setattr(p.transformer, "forward", computed)
    with pytest.raises(ValueError, match="num_frames 0 must be a whole number of frames >= 1"):
        p("a red circle", **{**CALL, "fifo_window_frames": 3}, num_frames=0)
    with pytest.raises(ValueError, match="fifo_window_frames 1 gives one latent frame; a window needs at least 2"):
        p("a red circle", **{**CALL, "fifo_window_frames": 1}, num_frames=6)
    with pytest.raises(ValueError, match="fifo_window_frames 6 is longer than the 5 frames the model was trained on"):
        p("a red circle", **{**CALL, "fifo_window_frames": 6}, num_frames=9)


def test_per_token_timesteps_equal_the_scalar_timestep_when_all_are_equal():
    model = pipe().transformer
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 16, 3, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    with torch.no_grad():
        scalar = model(hidden_states=x, timestep=torch.tensor([700.0, 300.0]), encoder_hidden_states=text, return_dict=False)[0]
        tokens = torch.tensor([700.0, 300.0])[:, None].expand(2, 48)
        per_token = model(hidden_states=x, timestep=tokens, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(per_token, scalar, atol=1e-5, rtol=1e-5)


def test_streaming_decode_equals_decoding_the_whole_video():
    vae = pipe().vae
    latents = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        whole = vae.decode(latents * std + mean).sample
    with StreamingDecoder(vae) as decoder:
        parts = [decoder.decode(latents[:, :, i:i + 1]) for i in range(4)]
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4]
    torch.testing.assert_close(torch.cat(parts, 2), whole, atol=1e-5, rtol=1e-5)


def test_frames_stream_to_the_callback_and_the_same_seed_gives_the_same_video():
    chunks = []
    out = fifo(num_frames=13, frame_callback=lambda p, first, frames: chunks.append((first, frames)))
    assert out.frames is None
    assert [first for first, _ in chunks] == [0, 1, 5, 9] and [c.shape[1] for _, c in chunks] == [1, 4, 4, 4]
    kept = fifo(num_frames=13).frames
    assert kept.shape == (1, 13, 32, 32, 3)
    np.testing.assert_array_equal(kept, np.concatenate([c for _, c in chunks], 1))
    assert not np.array_equal(kept, fifo(num_frames=13, fifo_lookahead=False).frames)


def test_a_prompt_schedule_changes_the_prompt_along_the_video():
    one = fifo(num_frames=13, output_type="latent").frames
    p = pipe()
    scheduled = p(fifo_prompt_schedule=[(0, 5, "a red circle"), (5, 13, "a blue square")], num_frames=13,
                  output_type="latent", generator=torch.Generator().manual_seed(0), **CALL).frames
    torch.testing.assert_close(scheduled[:, :, :1], one[:, :, :1])  # the first frame comes from the first prompt only
    assert not torch.allclose(scheduled[:, :, -1], one[:, :, -1])


def test_the_vae_cache_is_cleared_when_the_call_raises():
    def fail(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fifo(num_frames=9, frame_callback=fail)
    assert all(entry is None for entry in pipe().vae._feat_map)


def computed(*args, **kwargs):
    raise AssertionError("the transformer ran before the input was refused")


@pytest.mark.parametrize("options,message", [
    (dict(num_frames=12), r"num_frames 12 must be 1 \+ 4k frames"),
    (dict(fifo_window_frames=6), r"fifo_window_frames 6 must be 1 \+ 4k frames"),
    (dict(fifo_partitions=0), "fifo_partitions 0 must be a whole number n >= 1"),
    (dict(fifo_window_frames=85), "fifo_window_frames 85 is longer than the 81 frames the model was trained on"),
    (dict(fifo_prompt_schedule=[(0, 8, "a"), (4, 9, "b")]), r"range \(4, 9\) overlaps"),
    (dict(fifo_prompt_schedule=[(0, 4, "a"), (4, 9, "b")], fifo_prompt_blend=-2), "prompt blend -2 must be a whole number"),
    (dict(fifo_lookahead="yes"), "fifo_lookahead 'yes' must be True or False"),
    (dict(fifo_beyond_training=1), "fifo_beyond_training 1 must be True or False"),
    (dict(ouroboros_tail=None), "ouroboros_tail None must be True or False"),
    (dict(frame_callback="frames/"), "frame_callback 'frames/' must be a function"),
    (dict(ouroboros_subjects="circle"), "ouroboros_subjects 'circle' must be a list of words"),
    (dict(ouroboros_subjects=["square"]), "word 'square' is not in the prompt 'a red circle'"),
    (dict(ouroboros_subjects=["circle"], ouroboros_guidance=-1), "ouroboros_guidance -1 must be a number >= 0"),
    (dict(ouroboros_subjects=["circle"], ouroboros_momentum=1.0), r"ouroboros_momentum 1.0 must be a number in \[0, 1\)"),
    (dict(ouroboros_subjects=["circle"], ouroboros_layers=["blocks.0.attn2"]),
     r"ouroboros_layers \['blocks.0.attn2'\]: allowed are the transformer's self-attention layers"),
    (dict(ouroboros_cross_frame="no"), "ouroboros_cross_frame 'no' must be True or False"),
    (dict(fifo_prompt_schedule=[(0, 4, "a red circle"), (4, 9, "a circle")], ouroboros_subjects=["circle"],
          fifo_partitions=2), "sit at different tokens in the scheduled prompts"),
    (dict(ouroboros_subjects=["circle"], fifo_partitions=1), "ouroboros_subjects needs fifo_partitions >= 2, got 1"),
    (dict(output_type="tensor"), "output_type 'tensor' must be one of 'np', 'pil', 'pt', 'latent'"),
    (dict(output_type="latent", frame_callback=print), "frame_callback receives decoded frames, and output_type 'latent'"),
    (dict(guidance_scale_2=3.0), "guidance_scale_2 3.0 is the CFG scale of Wan 2.2's second expert, and this pipeline "
                                 "has one transformer"),
])
def test_bad_input_is_refused_before_compute(options, message, monkeypatch):
    prompt = None if "fifo_prompt_schedule" in options else "a red circle"
    monkeypatch.setattr(pipe().transformer, "forward", computed)
    with pytest.raises(ValueError, match=message):
        pipe()(prompt, **{**CALL, "num_frames": 9, **options})
    with pytest.raises(ValueError, match="give prompt or fifo_prompt_schedule, not both"):
        fifo(num_frames=9, fifo_prompt_schedule=[(0, 9, "a")])


def test_the_coherent_tail_changes_the_video_and_off_is_plain_fifo():
    plain = fifo(num_frames=13, output_type="latent").frames
    torch.testing.assert_close(fifo(num_frames=13, output_type="latent", ouroboros_tail=False).frames, plain)
    assert not torch.allclose(fifo(num_frames=13, output_type="latent", ouroboros_tail=True).frames, plain)


def test_ouroboros_subject_parts_off_are_plain_fifo_and_each_part_changes_the_video():
    run = lambda **extra: fifo(num_frames=13, fifo_partitions=2, output_type="latent", **extra).frames
    plain = run()
    subjects = dict(ouroboros_subjects=["circle"])
    torch.testing.assert_close(run(**subjects, ouroboros_cross_frame=False, ouroboros_guidance=0.0), plain)
    cross_frame, guided = run(**subjects, ouroboros_guidance=0.0), run(**subjects, ouroboros_cross_frame=False)
    assert not torch.allclose(cross_frame, plain) and not torch.allclose(guided, plain)
    assert not torch.allclose(cross_frame, guided)
    torch.testing.assert_close(run(**subjects, ouroboros_cross_frame=False), guided)  # same seed, same video


def test_the_transformer_is_restored_when_a_call_with_subjects_raises():
    processors = {n: type(m.processor) for n, m in pipe().transformer.named_modules() if hasattr(m, "processor")}

    def fail(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fifo(num_frames=13, fifo_partitions=2, ouroboros_subjects=["circle"], frame_callback=fail)
    assert processors == {n: type(m.processor) for n, m in pipe().transformer.named_modules() if hasattr(m, "processor")}
    assert all(p.requires_grad for p in pipe().transformer.parameters())


def test_subjects_on_a_layer_that_cannot_be_steered_are_refused_before_compute(monkeypatch):
    layer = pipe().transformer.blocks[0].attn1
    monkeypatch.setattr(layer, "processor", AttnProcessor())  # a processor of another attention class
    monkeypatch.setattr(pipe().transformer, "forward", computed)
    with pytest.raises(ValueError, match="layer 'blocks.0.attn1' uses processor AttnProcessor"):
        fifo(num_frames=9, fifo_partitions=2, ouroboros_subjects=["circle"])


def test_output_types_are_the_parents():
    frames = fifo(num_frames=9).frames
    pt = fifo(num_frames=9, output_type="pt").frames
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 9, 3, 32, 32)  # WanPipeline's [B, F, C, H, W]
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), frames, atol=1e-6)
    pil = fifo(num_frames=9, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 9 and pil[0][0].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(pil[0][3]), (frames[0, 3] * 255).round().astype(np.uint8))

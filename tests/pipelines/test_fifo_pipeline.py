"""FIFO-Diffusion on a tiny random Wan: against a hand-written queue, streaming decode, bad input."""

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers.models.attention_processor import AttnProcessor

from attnsteer.pipelines.fifo import StreamingDecoder, WanFIFOPipeline
from attnsteer.pipelines.tiny import tiny_pipeline

_PIPE = []
CALL = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8, fifo_window_frames=5)


def pipe():
    if not _PIPE:
        _PIPE.append(tiny_pipeline("wan", WanFIFOPipeline))
        _PIPE[0].set_progress_bar_config(disable=True)
    return _PIPE[0]


def fifo(seed=0, **extra):
    return pipe()("a red circle", **{**CALL, **extra}, generator=torch.Generator().manual_seed(seed))


def test_a_one_window_queue_is_the_hand_written_fifo_reference():
    """n = 1, no lookahead, 9 frames: the clip of 2 latent frames, then 3 steps of a 2-slot queue."""
    p = pipe()
    out = fifo(num_frames=9, fifo_partitions=1, fifo_lookahead=False, guidance_scale=1.0, output_type="latent").frames
    g = torch.Generator().manual_seed(0)
    embeds, _ = p.encode_prompt("a red circle", None, False, max_sequence_length=8)
    clip = WanPipeline.__call__(p, prompt_embeds=embeds, height=32, width=32, num_frames=5, num_inference_steps=2,
                                guidance_scale=1.0, generator=g, output_type="latent").frames
    p.scheduler.set_timesteps(2)
    s0, s1 = p.scheduler.sigmas[:2].tolist()
    frame = lambda: torch.randn(clip[:, :, :1].shape, generator=g)
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

"""samples/train_shapes_wan.py: options refused on parse, the default model within its size budget, and
a whole tiny run (clips, VAE, cached latents, transformer, save, score) that WanPipeline loads offline
and that resumes from its state."""

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
sys.path.insert(0, str(SAMPLES))
import train_shapes_wan as wan  # noqa: E402

TINY = ["--n-clips", "4", "--frames", "5", "--size", "32", "--vae-image-steps", "2", "--vae-image-batch", "3",
        "--vae-steps", "2", "--vae-full-steps", "1",
        "--vae-batch", "2", "--vae-frames", "5", "--vae-crop", "16", "--layers", "2", "--heads", "2",
        "--head-dim", "8", "--ffn", "16", "--te-dim", "8", "--te-layers", "1", "--batch", "2",
        "--eval-videos", "1", "--check-clips", "1", "--default-steps", "2", "--log-every", "1"]


@pytest.mark.parametrize("option,value,message", [
    ("--frames", "16", "argument --frames: '16' is not 1 + 4k frames (1, 5, 9, 13, 17, ...)"),
    ("--vae-frames", "0", "argument --vae-frames: '0' is not 1 + 4k frames"),
    ("--size", "40", "argument --size: '40' is not a multiple of 16 pixels >= 16"),
    ("--vae-crop", "30", "argument --vae-crop: '30' is not a multiple of 4 pixels >= 8"),
    ("--head-dim", "7", "argument --head-dim: '7' is not an even number >= 6"),
    ("--named", "1.5", "argument --named: '1.5' is not a probability in [0, 1]"),
    ("--drop", "half", "argument --drop: 'half' is not a probability in [0, 1]"),
    ("--object-weights", "1,1,1", "argument --object-weights: '1,1,1' is not two non-negative weights"),
    ("--object-weights", "0,0", "argument --object-weights: '0,0' is not two non-negative weights"),
    ("--threads", "0", "argument --threads: '0' is not a whole number >= 1"),
    ("--steps", "many", "argument --steps: 'many' is not a whole number >= 1"),
    ("--eval-videos", "-1", "argument --eval-videos: '-1' is not a whole number >= 0"),
    ("--max-minutes", "-5", "argument --max-minutes: '-5' is not a number >= 0"),
    ("--decoder-steps", "-1", "argument --decoder-steps: '-1' is not a whole number >= 0"),
    ("--decoder-dim", "0", "argument --decoder-dim: '0' is not a whole number >= 1"),
    ("--decoder-lr", "-0.1", "argument --decoder-lr: '-0.1' is not a number >= 0"),
    ("--image-ratio", "2", "argument --image-ratio: '2' is not a probability in [0, 1]"),
    ("--image-batch", "0", "argument --image-batch: '0' is not a whole number >= 1"),
    ("--vae-image-steps", "-1", "argument --vae-image-steps: '-1' is not a whole number >= 0"),
    ("--vae-image-batch", "0", "argument --vae-image-batch: '0' is not a whole number >= 1"),
    ("--device", "gpu", "argument --device: 'gpu' is not a device here: cpu"),
    ("--train-shift", "0", "argument --train-shift: '0' is not a number > 0"),
    ("--frame-noise", "2", "argument --frame-noise: '2' is not a probability in [0, 1]"),
    ("--device", "mps", "argument --device: 'mps' is not a device here: cpu"),
])
def test_bad_options_are_named(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        wan.parse_args([option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_crop_must_fit_in_a_clip(capsys):
    with pytest.raises(SystemExit):
        wan.parse_args(["--size", "32", "--vae-crop", "48"])
    assert "a VAE crop (17 frames of 48 px) must fit in a clip (17 frames of 32 px)" in capsys.readouterr().err


def test_the_run_refuses_before_starting_its_log(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        wan.main(["--frames", "8", "--work", str(tmp_path)])
    assert exit_.value.code == 2 and "'8' is not 1 + 4k frames" in capsys.readouterr().err
    assert not (tmp_path / "train.log").exists()


def test_default_model_fits_its_budget_and_starts_at_zero():
    args = wan.parse_args([])
    vae, text_encoder, transformer = wan.make_vae(args), wan.make_text_encoder(args), wan.make_transformer(args)
    assert 4 * sum(wan.n_params(m) for m in (vae, text_encoder, transformer)) <= 25e6
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 17, 64, 64)).latent_dist.mean
        assert latents.shape == (1, 16, 5, 16, 16)  # 4x temporal (1 + 4k -> 1 + k), 4x spatial
        out = transformer(hidden_states=latents, timestep=torch.tensor([500.0]),
                          encoder_hidden_states=torch.randn(1, 16, args.te_dim), return_dict=False)[0]
    assert out.shape == latents.shape and not out.any()  # adaLN-zero: the untrained model predicts zero


def test_tiny_run_saves_a_wan_pipeline_that_loads_offline_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    argv = TINY + ["--work", str(work), "--output", str(out)]
    wan.main(argv + ["--steps", "2"])
    log = (work / "train.log").read_text()
    assert "drew 4 clips of 5 frames at 32 px" in log and "step 2/2 loss" in log
    assert torch.load(work / "latents.pt")["means"].shape == (4, 16, 2, 8, 8)
    assert json.loads((out / "attnsteer.json").read_text()) == {"call": {
        "num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 5.0,
        "max_sequence_length": 16}}
    record = json.loads((out / "training.json").read_text())
    assert record["steps_trained"] == 2 and len(record["evaluation"]["per_video"]) == 1
    record_md = (out / "TRAINING.md").read_text()
    command = record_md.split("python samples/train_shapes_wan.py ")[1].split("\n")[0]
    assert wan.parse_args(command.split()) == wan.parse_args(argv + ["--steps", "2"])  # the record reproduces the run

    pipe = WanPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer" and type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
    frames = pipe("a red circle moving left", num_frames=9, height=48, width=32, num_inference_steps=2,
                  max_sequence_length=16, output_type="np").frames
    assert frames.shape == (1, 9, 48, 32, 3)

    wan.main(argv + ["--steps", "3"])
    log = (work / "train.log").read_text()
    assert "resumed at step 2" in log and "step 3/3 loss" in log and log.count("drew 4 clips") == 1
    assert json.loads((out / "training.json").read_text())["steps_trained"] == 3


def test_an_image_is_a_clips_first_frame_and_its_latent_the_clips_first_latent_frame():
    assert wan.still("a blue square moving down and a red cross") == "a blue square and a red cross"
    assert wan.still("a purple circle moving right") == "a purple circle" == wan.still("a purple circle")
    torch.manual_seed(0)
    vae = wan.make_vae(wan.parse_args(["--vae-dim", "4", "--vae-decoder-dim", "4", "--z-dim", "4"])).eval()
    clips = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        whole, first = (vae.encode(x).latent_dist.mean for x in (clips, clips[:, :, :1]))
    assert whole.shape[2] == 3 and first.shape[2] == 1
    torch.testing.assert_close(whole[:, :, :1], first, rtol=0, atol=1e-6)  # the VAE is causal in time


def test_image_steps_train_on_single_frames(tmp_path, monkeypatch):
    inputs, make = [], wan.make_transformer

    def recording(args):
        model = make(args)
        model.register_forward_pre_hook(lambda _, a, kw: inputs.append(tuple(kw["hidden_states"].shape)), with_kwargs=True)
        return model

    monkeypatch.setattr(wan, "make_transformer", recording)
    wan.main(TINY + ["--work", str(tmp_path / "work"), "--output", str(tmp_path / "out"), "--steps", "3",
                     "--image-ratio", "1", "--image-batch", "3", "--eval-videos", "0"])
    assert inputs == [(3, 16, 1, 8, 8)] * 3  # 3 images of 32 px: one latent frame each, not the clips' 2
    assert "3 first frames as images" in (tmp_path / "out" / "TRAINING.md").read_text()


def test_the_vae_trains_on_single_frames_then_clip_crops_then_whole_clips():
    args = wan.parse_args(TINY)
    clips = wan.draw_clips(args)[0]
    seen = []
    real = wan.AutoencoderKLWan.encode

    def encode(vae, x):
        seen.append(tuple(x.shape))
        return real(vae, x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wan.AutoencoderKLWan, "encode", encode)
        wan.train_vae(args, clips, lambda line: None)
    assert seen == [(3, 3, 1, 16, 16)] * 2 + [(2, 3, 5, 16, 16)] * 2 + [(1, 3, 5, 32, 32)]


def test_vae_only_stops_before_the_transformer(tmp_path):
    wan.main(TINY + ["--work", str(tmp_path / "work"), "--output", str(tmp_path / "out"), "--vae-only"])
    log = (tmp_path / "work" / "train.log").read_text()
    assert "video metrics on 1 VAE reconstructions" in log and "stopping after the VAE stage" in log
    assert (tmp_path / "work" / "latents.pt").exists() and not (tmp_path / "work" / "state.pt").exists()
    assert not (tmp_path / "out").exists()


def test_a_new_decoder_keeps_the_encoder_and_so_the_transformers_latent_space(tmp_path):
    from diffusers import AutoencoderKLWan

    work, out = tmp_path / "work", tmp_path / "out"
    argv = TINY + ["--work", str(work), "--output", str(out), "--steps", "1", "--decoder-steps", "2", "--decoder-dim", "8"]
    wan.main(argv)
    log = (work / "train.log").read_text()
    assert "decoder: base 8" in log and "new" in log and "decoder step 2/2" in log
    first, decoded = AutoencoderKLWan.from_pretrained(work / "vae"), AutoencoderKLWan.from_pretrained(out / "vae")
    assert decoded.config.decoder_base_dim == 8
    for name, value in first.encoder.state_dict().items():
        assert torch.equal(decoded.encoder.state_dict()[name], value), name
    assert decoded.config.latents_mean == WanPipeline.from_pretrained(out).vae.config.latents_mean != first.config.latents_mean
    wan.main(argv)
    assert f"decoder from {work / 'vae_decoder'}" in (work / "train.log").read_text()


def test_noise_levels_one_per_clip_or_one_per_latent_frame_shifted_as_the_scheduler_shifts():
    z0 = torch.zeros(3, 4, 2, 8, 8)  # 2 latent frames of 4 x 4 tokens
    sigma, timestep = wan.noise_levels(z0, False, torch.Generator().manual_seed(0), 1.0)
    assert sigma.shape == (3, 1, 1, 1, 1) and torch.equal(timestep, sigma.flatten() * 1000)
    shifted, _ = wan.noise_levels(z0, False, torch.Generator().manual_seed(0), 3.0)
    assert torch.allclose(shifted, 3 * sigma / (1 + 2 * sigma)) and (shifted > sigma).all()
    sigma, timestep = wan.noise_levels(z0, True, torch.Generator().manual_seed(0), 1.0)
    assert sigma.shape == (3, 1, 2, 1, 1) and timestep.shape == (3, 2 * 16)
    assert torch.equal(timestep.view(3, 2, 16), sigma.view(3, 2, 1).expand(3, 2, 16) * 1000)  # a level per frame


def test_a_run_with_per_frame_noise_levels_trains(tmp_path):
    wan.main(TINY + ["--work", str(tmp_path / "work"), "--output", str(tmp_path / "out"), "--steps", "2",
                     "--frame-noise", "1", "--eval-videos", "0"])
    assert (tmp_path / "out" / "transformer" / "config.json").is_file()

"""samples/train_shapes_wan.py: options refused on parse, the default model within its size budget, the
per-frame VAE (a clip encodes as its frames one by one, and stays so through training), the phases a run
trains (images, short windows, whole clips), and a whole tiny run that WanPipeline loads offline and that
resumes from its state or from its compact checkpoint."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
sys.path.insert(0, str(SAMPLES))
import train_shapes_wan as wan  # noqa: E402

TINY = ["--n-clips", "4", "--frames", "5", "--size", "32", "--vae-steps", "2", "--vae-batch", "3", "--vae-crop", "16",
        "--vae-dim", "4", "--vae-decoder-dim", "4", "--layers", "2", "--heads", "2", "--head-dim", "8", "--ffn", "16",
        "--te-dim", "8", "--te-layers", "1", "--batch", "2", "--image-batch", "3", "--short-frames", "3",
        "--eval-videos", "1", "--check-clips", "1", "--default-steps", "2", "--log-every", "1", "--watch", "0"]


@pytest.mark.parametrize("option,value,message", [
    ("--frames", "1", "argument --frames: '1' is not a clip of at least 2 frames"),
    ("--short-frames", "x", "argument --short-frames: 'x' is not a clip of at least 2 frames"),
    ("--size", "40", "argument --size: '40' is not a multiple of 16 pixels >= 16"),
    ("--vae-crop", "30", "argument --vae-crop: '30' is not a multiple of 4 pixels >= 8"),
    ("--vae-steps", "-1", "argument --vae-steps: '-1' is not a whole number >= 0"),
    ("--vae-batch", "0", "argument --vae-batch: '0' is not a whole number >= 1"),
    ("--head-dim", "7", "argument --head-dim: '7' is not an even number >= 6"),
    ("--named", "1.5", "argument --named: '1.5' is not a probability in [0, 1]"),
    ("--drop", "half", "argument --drop: 'half' is not a probability in [0, 1]"),
    ("--object-weights", "1,1,1", "argument --object-weights: '1,1,1' is not two non-negative weights"),
    ("--object-weights", "0,0", "argument --object-weights: '0,0' is not two non-negative weights"),
    ("--threads", "0", "argument --threads: '0' is not a whole number >= 1"),
    ("--steps", "many", "argument --steps: 'many' is not a whole number >= 1"),
    ("--image-steps", "-1", "argument --image-steps: '-1' is not a whole number >= 0"),
    ("--image-gate", "2", "argument --image-gate: '2' is not a probability in [0, 1]"),
    ("--watch", "-1", "argument --watch: '-1' is not a whole number >= 0"),
    ("--image-ratio", "2", "argument --image-ratio: '2' is not a probability in [0, 1]"),
    ("--image-batch", "0", "argument --image-batch: '0' is not a whole number >= 1"),
    ("--short-share", "1.5", "argument --short-share: '1.5' is not a probability in [0, 1]"),
    ("--first-frame", "-0.1", "argument --first-frame: '-0.1' is not a probability in [0, 1]"),
    ("--eval-videos", "-1", "argument --eval-videos: '-1' is not a whole number >= 0"),
    ("--max-minutes", "-5", "argument --max-minutes: '-5' is not a number >= 0"),
    ("--device", "gpu", "argument --device: 'gpu' is not a device here: cpu"),
    ("--device", "mps", "argument --device: 'mps' is not a device here: cpu"),
    ("--train-shift", "0", "argument --train-shift: '0' is not a number > 0"),
])
def test_bad_options_are_named(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        wan.parse_args([option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_checkpoint_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        wan.parse_args(["--checkpoint", str(tmp_path / "file")])
    assert "is a file, not a checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--size", "32", "--vae-crop", "48"], "--vae-crop 48 must fit in a frame of --size 32"),
    (["--frames", "5", "--short-frames", "9"], "--short-frames 9 must fit in a clip of --frames 5"),
])
def test_a_crop_or_window_must_fit(argv, message, capsys):
    with pytest.raises(SystemExit):
        wan.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_run_refuses_before_starting_its_log(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        wan.main(["--frames", "1", "--work", str(tmp_path)])
    assert exit_.value.code == 2 and "'1' is not a clip of at least 2 frames" in capsys.readouterr().err
    assert not (tmp_path / "train.log").exists()


def test_default_model_fits_its_budget_and_starts_at_zero():
    args = wan.parse_args([])
    vae, text_encoder, transformer = wan.make_vae(args), wan.make_text_encoder(args), wan.make_transformer(args)
    assert 4 * sum(wan.n_params(m) for m in (vae, text_encoder, transformer)) <= 25e6
    assert len(wan.past_taps(vae)) == 30 and not any(w[:, :, :-1].any() for w in wan.past_taps(vae))
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 17, 64, 64)).latent_dist.mean
        assert latents.shape == (1, 4, 17, 16, 16)  # a latent frame per frame, 4x spatial, 4 channels
        out = transformer(hidden_states=latents, timestep=torch.tensor([500.0]),
                          encoder_hidden_states=torch.randn(1, 16, args.te_dim), return_dict=False)[0]
    assert out.shape == latents.shape and not out.any()  # adaLN-zero: the untrained model predicts zero


def tiny_vae():
    torch.manual_seed(0)
    vae = wan.make_vae(wan.parse_args(["--vae-dim", "4", "--vae-decoder-dim", "4"]))
    with torch.no_grad():  # off the zero-ish start of the current taps, so every layer matters
        for weight in wan.past_taps(vae):
            weight[:, :, -1:].normal_(0, 0.3)
    return vae.eval()


def test_encoding_a_clip_is_encoding_its_frames_one_by_one():
    vae = tiny_vae()
    clips = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(clips).latent_dist.mean
        alone = torch.cat([vae.encode(clips[:, :, i:i + 1]).latent_dist.mean for i in range(9)], dim=2)
        batched, _ = wan.encode_clips(vae, clips)
        torch.testing.assert_close(whole, alone, rtol=0, atol=1e-4)
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-4)
        decoded = vae.decode(whole).sample
        torch.testing.assert_close(decoded, wan.decode_clips(vae, whole), rtol=0, atol=1e-4)
    assert whole.shape == (2, 4, 9, 4, 4) and decoded.shape == clips.shape


def test_frame_convolutions_are_the_same_vae_on_frames_at_a_third_of_the_kernel():
    vae = tiny_vae()
    frames = torch.rand(3, 3, 1, 16, 16) * 2 - 1
    weights = [id(w) for w in wan.past_taps(vae)]
    with torch.no_grad():
        full = vae.encode(frames).latent_dist.mean
        with wan.frame_convolutions(vae):
            assert all(w.shape[2] == 1 for w in wan.past_taps(vae))
            torch.testing.assert_close(vae.encode(frames).latent_dist.mean, full, rtol=0, atol=1e-5)
            for w in wan.past_taps(vae):
                w.add_(1)  # as training would change them
    assert [id(w) for w in wan.past_taps(vae)] == weights  # the full kernels are back, with the new last taps
    assert all(w.shape[2] == 3 and not w[:, :, :-1].any() for w in wan.past_taps(vae))
    with torch.no_grad():
        assert not torch.allclose(vae.encode(frames).latent_dist.mean, full)


def test_the_vae_trains_on_single_frames_and_its_past_taps_stay_zero():
    args = wan.parse_args(TINY + ["--vae-steps", "3"])
    clips = wan.draw_clips(args)[0]
    seen = []
    real = wan.AutoencoderKLWan.encode

    def encode(vae, x):
        seen.append(tuple(x.shape))
        return real(vae, x)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wan.AutoencoderKLWan, "encode", encode)
        vae = wan.train_vae(args, clips, lambda line: None)
    assert seen == [(3, 3, 1, 16, 16)] * 3
    taps = wan.past_taps(vae)
    assert not any(w[:, :, :-1].any() for w in taps) and all(w[:, :, -1].any() for w in taps)  # trained, past zero


def test_wanpipeline_frame_counts_and_the_call_default():
    from attnsteer.pipelines.frames import parent_frames, wan_frames

    for frames in range(1, 20):
        assert wan_frames(parent_frames(frames, 1), 1) == frames
    assert [wan_frames(n, 4) for n in (17, 16, 13)] == [17, 17, 13]  # Wan 2.1's VAE: 1 + 4k
    assert wan.call_defaults(wan.parse_args([]))["num_frames"] == 16  # 17 frames come out


def test_clean_first_frames_are_given_at_timestep_zero_and_left_out_of_the_loss():
    z0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    sigma = torch.tensor([0.5, 0.8])
    xt, timestep, weight = wan.noised(z0, sigma, noise, torch.tensor([False, False]))
    assert torch.equal(timestep, sigma * 1000) and weight.eq(1).all()
    xt, timestep, weight = wan.noised(z0, sigma, noise, torch.tensor([True, False]))
    assert torch.equal(xt[0, :, 0], z0[0, :, 0]) and torch.allclose(xt[0, :, 1], 0.5 * z0[0, :, 1] + 0.5 * noise[0, :, 1])
    assert timestep.shape == (2, 3 * 4) and timestep[0, :4].eq(0).all() and timestep[0, 4:].eq(500).all()
    assert timestep[1].eq(800).all() and weight.tolist() == [[0, 1, 1], [1, 1, 1]]
    pred = noise - z0
    pred[0, :, 0] += 10  # an error on the clean frame costs nothing
    assert wan.flow_loss(pred, noise - z0, weight) == 0


def test_noise_levels_are_shifted_as_the_scheduler_shifts():
    sigma = wan.noise_levels(5, torch.Generator().manual_seed(0), 1.0)
    shifted = wan.noise_levels(5, torch.Generator().manual_seed(0), 3.0)
    assert sigma.shape == (5,) and torch.allclose(shifted, 3 * sigma / (1 + 2 * sigma)) and (shifted > sigma).all()
    assert wan.still("a blue square moving down and a red cross") == "a blue square and a red cross"


def test_a_run_trains_images_then_short_windows_then_whole_clips(tmp_path, monkeypatch):
    inputs, make = [], wan.make_transformer

    def recording(args):
        model = make(args)
        model.register_forward_pre_hook(lambda _, a, kw: inputs.append(
            (tuple(kw["hidden_states"].shape), kw["timestep"].ndim)), with_kwargs=True)
        return model

    monkeypatch.setattr(wan, "make_transformer", recording)
    wan.main(TINY + ["--work", str(tmp_path / "work"), "--output", str(tmp_path / "out"), "--steps", "6",
                     "--image-steps", "2", "--image-ratio", "0", "--first-frame", "1", "--eval-videos", "0"])
    assert inputs == [((3, 4, 1, 8, 8), 1)] * 2 + [((2, 4, 3, 8, 8), 2)] * 2 + [((2, 4, 5, 8, 8), 2)] * 2
    record = (tmp_path / "out" / "TRAINING.md").read_text()
    assert "joint phase: from step 2 to 6" in record and "latent frame 0 given clean" in record


def test_the_image_phase_ends_at_its_gate(tmp_path):
    wan.main(TINY + ["--work", str(tmp_path / "work"), "--output", str(tmp_path / "out"), "--steps", "3",
                     "--image-steps", "100", "--ckpt-every", "2", "--watch", "2", "--image-gate", "0",
                     "--eval-videos", "0"])
    log = (tmp_path / "work" / "train.log").read_text()
    assert "single-frame binding on 2 tune images at step 2: 0.000" in log
    assert "joint phase from step 2: --image-gate 0.0 reached" in log
    assert json.loads((tmp_path / "out" / "training.json").read_text())["joint_from"] == 2


def test_a_checkpoint_holds_each_tensor_once_in_fp16_and_loads_back(tmp_path):
    args = wan.parse_args(TINY)
    torch.manual_seed(0)
    models = [wan.make_text_encoder(args), wan.make_transformer(args), wan.make_text_encoder(args),
              wan.make_transformer(args)]
    wan.write_checkpoint(tmp_path, wan.make_vae(args), models, {"step": 7})
    saved = wan.load_file(str(tmp_path / "weights.safetensors"))
    assert "te.shared.weight" in saved and "te.encoder.embed_tokens.weight" not in saved  # tied: stored once
    assert {v.dtype for v in saved.values()} == {torch.float16}
    torch.manual_seed(1)
    fresh = [wan.make_text_encoder(args), wan.make_transformer(args), wan.make_text_encoder(args),
             wan.make_transformer(args)]
    assert wan.read_checkpoint(tmp_path, fresh) == {"step": 7}
    for old, new in zip(models, fresh):
        for (name, a), b in zip(old.state_dict().items(), new.state_dict().values()):
            assert torch.equal(a.half().float(), b), name
    with pytest.raises(SystemExit, match="does not fit this model's te"):
        wan.read_checkpoint(tmp_path, [wan.make_text_encoder(wan.parse_args(TINY + ["--te-layers", "2"]))] + fresh[1:])


def test_tiny_run_saves_a_wan_pipeline_that_loads_offline_and_resumes(tmp_path):
    work, out, ckpt = tmp_path / "work", tmp_path / "out", tmp_path / "ckpt"
    argv = TINY + ["--work", str(work), "--output", str(out), "--checkpoint", str(ckpt), "--image-steps", "1"]
    wan.main(argv + ["--steps", "2"])
    log = (work / "train.log").read_text()
    assert "drew 4 clips of 5 frames at 32 px" in log and "step 2/2 loss" in log
    assert torch.load(work / "latents.pt")["means"].shape == (4, 4, 5, 8, 8)
    call = json.loads((out / "attnsteer.json").read_text())["call"]
    assert call == {"num_frames": 4, "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 5.0,
                    "max_sequence_length": 16}
    record = json.loads((out / "training.json").read_text())
    assert record["steps_trained"] == 2 and len(record["evaluation"]["per_video"]) == 1
    command = (out / "TRAINING.md").read_text().split("python samples/train_shapes_wan.py ")[1].split("\n")[0]
    assert wan.parse_args(command.split()) == wan.parse_args(argv + ["--steps", "2"])  # the record reproduces the run

    pipe = WanPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer" and type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
    frames = pipe("a red circle moving left", **call, output_type="np").frames
    assert frames.shape == (1, 5, 32, 32, 3)  # the call default gives the trained clip length

    wan.main(argv + ["--steps", "3"])
    log = (work / "train.log").read_text()
    assert "resumed at step 2" in log and "step 3/3 loss" in log and log.count("drew 4 clips") == 1

    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["step"] == 3 and (ckpt / "vae" / "config.json").is_file() and not (ckpt / "model_index.json").exists()
    fresh = tmp_path / "fresh"  # another machine: only the checkpoint
    wan.main(argv[:argv.index("--work")] + ["--work", str(fresh), "--output", str(tmp_path / "out2"), "--checkpoint",
                                            str(ckpt), "--image-steps", "1", "--steps", "4"])
    log = (fresh / "train.log").read_text()
    assert f"VAE from the checkpoint {ckpt / 'vae'}" in log and "vae step" not in log
    assert f"resumed at step 3 from the checkpoint {ckpt}" in log and "step 4/4 loss" in log
    shutil.rmtree(fresh)

"""wan_frame_influence: the swap of latent frame 0 moves the other frames only through the transformer; the
command prints that reach and, with --images, held-out single-frame binding."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from wan_frame_influence import frame_influence, parse_args, wan  # noqa: E402

from attnsteer.pipelines.tiny import clip_tokenizer  # noqa: E402

CALL = {"num_frames": 4, "height": 32, "max_sequence_length": 16}  # 5 frames


def tiny_pipe():
    args = wan.parse_args(["--vae-dim", "4", "--vae-decoder-dim", "4", "--layers", "1", "--heads", "2",
                           "--head-dim", "8", "--ffn", "16", "--te-dim", "8", "--te-layers", "1"])
    torch.manual_seed(0)
    transformer = wan.make_transformer(args)
    with torch.no_grad():  # off its zero start, so that it predicts something
        for module in (transformer.condition_embedder.time_proj, transformer.proj_out):
            module.weight.normal_(0, 0.1)
        for block in transformer.blocks:
            block.scale_shift_table.normal_(0, 0.5)
    return wan.build_pipeline(wan.make_vae(args).eval(), wan.make_text_encoder(args).eval(), transformer.eval(),
                              clip_tokenizer(16), 3.0)


def test_later_frames_move_only_when_the_transformer_reads_across_frames(monkeypatch):
    pipe = tiny_pipe()
    change = frame_influence(pipe, CALL, clips=2, sigmas=[0.8])[0.8]
    assert len(change) == 5 and min(change) > 0  # 5 frames, a latent frame each; attention spans all of them

    forward = pipe.transformer.forward

    def frame_by_frame(hidden_states, **kwargs):
        frames = hidden_states.split(1, dim=2)
        return (torch.cat([forward(hidden_states=f, **kwargs)[0] for f in frames], dim=2),)

    monkeypatch.setattr(pipe.transformer, "forward", frame_by_frame)
    change = frame_influence(pipe, CALL, clips=2, sigmas=[0.8])[0.8]
    assert change[0] > 0 and change[1:] == [0.0] * 4


@pytest.mark.parametrize("option,value,message", [
    ("--clips", "1", "argument --clips: '1' is not a whole number >= 2 (frame 0 comes from another clip)"),
    ("--sigmas", "0", "argument --sigmas: '0' is not a noise level in (0, 1]"),
    ("--sigmas", "1.5", "argument --sigmas: '1.5' is not a noise level in (0, 1]"),
    ("--threads", "0", "argument --threads: '0' is not a whole number >= 1"),
    ("--images", "-1", "argument --images: '-1' is not a whole number >= 0"),
])
def test_bad_options_are_named(option, value, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", option, value])
    assert message in capsys.readouterr().err


def test_the_command_reports_the_reach_and_single_frame_binding(tmp_path, capsys):
    import json

    from wan_frame_influence import main

    tiny_pipe().save_pretrained(tmp_path)
    (tmp_path / "attnsteer.json").write_text(json.dumps({"call": {**CALL, "width": 32, "guidance_scale": 5.0}}))
    main(["--model", str(tmp_path), "--clips", "2", "--sigmas", "0.8", "--images", "2", "--threads", "1",
          "--json", str(tmp_path / "out.json")])
    assert "single-frame binding on 2 held-out single-object prompts: 0.000" in capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())
    assert len(result["result"]["0.8"]) == 5 and result["single_frame_binding"] == 0

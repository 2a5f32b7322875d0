import functools
import hashlib
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from attnsteer.pipelines import tiny
from attnsteer.pipelines.tiny import KINDS, PIPELINE_CLASSES, clip_tokenizer, tiny_components, tiny_pipeline

PROMPT = "a red circle and a blue square"
# What CLIP's own SimpleTokenizer gives for PROMPT with this BPE file ("square</w>" is 3999).
PROMPT_IDS = [49406, 320, 736, 7117, 537, 320, 1746, 3999, 49407]

EXPECTED_SHAPE = {kind: (1, 32, 32, 3) for kind in KINDS} | {"wan": (1, 5, 32, 32, 3)}


def generate(pipe, kind, seed=0):
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    if kind == "wan":
        kwargs["num_frames"] = 5
    output = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return output.frames if kind == "wan" else output.images


@functools.cache
def reference(kind):
    """One pipeline of each kind and its output, shared by the tests below."""
    pipe = tiny_pipeline(kind)
    return pipe, generate(pipe, kind)


def attention_modules(model):
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (Attention, AttentionModuleMixin)) and hasattr(module, "heads")
    }


def test_clip_tokenizer_gives_real_clip_ids():
    tokenizer = clip_tokenizer()
    assert tokenizer(PROMPT).input_ids == PROMPT_IDS
    assert len(tokenizer) == 49408
    assert tokenizer.convert_ids_to_tokens([49406, 3999, 49407]) == ["<|startoftext|>", "square</w>", "<|endoftext|>"]
    assert tokenizer.decode(PROMPT_IDS, skip_special_tokens=True) == PROMPT
    padded = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77 and padded[len(PROMPT_IDS) :] == [49407] * (77 - len(PROMPT_IDS))
    assert clip_tokenizer(model_max_length=512).model_max_length == 512


def test_clip_vocab_folder_is_written_once_and_reused(tmp_path, monkeypatch):
    """Every process that builds the tokenizer shares one folder (cache_clear stands for a new process);
    a folder half-written by a killed process is never the one used."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    name = "attnsteer-clip-bpe-" + hashlib.sha256(tiny.BPE_PATH.read_bytes()).hexdigest()[:16]
    (tmp_path / f"{name}.killed").mkdir()
    try:
        tiny._clip_vocab_dir.cache_clear()
        first = tiny._clip_vocab_dir()
        tiny._clip_vocab_dir.cache_clear()
        assert tiny._clip_vocab_dir() == first
        assert Path(first).name == name
        assert sorted(p.name for p in tmp_path.iterdir()) == [name, f"{name}.killed"]
        assert sorted(p.name for p in Path(first).iterdir()) == ["merges.txt", "vocab.json"]
        assert clip_tokenizer()(PROMPT).input_ids == PROMPT_IDS
    finally:
        tiny._clip_vocab_dir.cache_clear()


@pytest.mark.parametrize("kind", KINDS)
def test_generates_finite_output_of_expected_shape(kind):
    pipe, output = reference(kind)
    assert type(pipe) is PIPELINE_CLASSES[kind]
    assert output.shape == EXPECTED_SHAPE[kind]
    assert np.isfinite(output).all()
    assert output.std() > 0.01  # not a constant image


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_output(kind):
    _, output = reference(kind)
    np.testing.assert_array_equal(generate(tiny_pipeline(kind, seed=0), kind), output)


@pytest.mark.parametrize("kind", KINDS)
def test_other_seed_gives_other_weights(kind):
    name = "unet" if kind in ("sd", "sdxl") else "transformer"
    a = tiny_components(kind, seed=0)[name].state_dict()
    b = tiny_components(kind, seed=1)[name].state_dict()
    assert any(not torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_offline_reproduces_output(kind, tmp_path):
    pipe, output = reference(kind)
    pipe.save_pretrained(tmp_path)
    # diffusers saves text_encoder_3=None but from_pretrained then wants it passed again
    extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    loaded = PIPELINE_CLASSES[kind].from_pretrained(tmp_path, **extra)
    loaded.set_progress_bar_config(disable=True)
    # not bit-exact: weights read from safetensors sit at other memory offsets, so CPU matmuls round differently
    np.testing.assert_allclose(generate(loaded, kind), output, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sizes_fit_head_level_steering(kind):
    components = tiny_components(kind)
    denoiser = components["unet"] if kind in ("sd", "sdxl") else components["transformer"]
    attentions = attention_modules(denoiser)
    assert attentions and all(module.heads >= 2 for module in attentions.values())
    if kind in ("sd", "sdxl"):
        for part in ("down_blocks.", "mid_block.", "up_blocks."):
            assert any(name.startswith(part) for name in attentions), part
    elif kind == "flux":
        assert len(denoiser.transformer_blocks) >= 2 and len(denoiser.single_transformer_blocks) >= 2
    elif kind == "sd3":
        assert len(denoiser.transformer_blocks) >= 2
    elif kind == "wan":
        assert len(denoiser.blocks) >= 2
    encoders = [value for key, value in components.items() if key.startswith("text_encoder") and value is not None]
    assert encoders and all(encoder.config.vocab_size == 49408 for encoder in encoders)
    tokenizers = [value for key, value in components.items() if key.startswith("tokenizer") and value is not None]
    assert tokenizers and all(tokenizer(PROMPT).input_ids == PROMPT_IDS for tokenizer in tokenizers)


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_class_may_be_a_subclass(kind):
    subclass = type(f"My{PIPELINE_CLASSES[kind].__name__}", (PIPELINE_CLASSES[kind],), {})
    assert type(tiny_pipeline(kind, pipeline_class=subclass)) is subclass


@pytest.mark.parametrize("build", [tiny_components, tiny_pipeline])
def test_bad_kind_raises_value_error(build):
    with pytest.raises(ValueError, match=r"'sd4'.*sd, sdxl, sd3, flux, wan"):
        build("sd4")


def test_network_access_fails():
    with pytest.raises(RuntimeError, match="network access in tests"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with pytest.raises(RuntimeError, match="network access in tests"):
        socket.getaddrinfo("huggingface.co", 443)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(RuntimeError, match="network access in tests"):
            sock.connect(("127.0.0.1", 9))


def test_unix_sockets_still_work(tmp_path):
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            connection, _ = server.accept()
            with connection:
                client.sendall(b"ok")
                assert connection.recv(2) == b"ok"

"""Block-sparse attention through the steer pipelines' keyword arguments, on tiny random pipelines."""

import numpy as np
import pytest
import torch

from attnsteer.pipelines.steer import (FluxSteerPipeline, StableDiffusion3SteerPipeline, StableDiffusionSteerPipeline,
                                      WanSteerPipeline)
from attnsteer.pipelines.tiny import tiny_pipeline

CLASSES = {"sd3": StableDiffusion3SteerPipeline, "flux": FluxSteerPipeline, "wan": WanSteerPipeline,
           "sd": StableDiffusionSteerPipeline}
_PIPES = {}


def pipe_of(kind):
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind, CLASSES[kind])
        _PIPES[kind].set_progress_bar_config(disable=True)
    return _PIPES[kind]


def call_of(kind, **extra):
    """Token grids: Wan 2 frames of 4 x 4, SD3 and FLUX 8 x 8 (pool 2 x 2: 8 and 16 blocks)."""
    kwargs = dict(prompt="a red circle", num_inference_steps=2, output_type="np")
    if "sparsity" in extra or "sparse_mask" in extra:  # the sparse options act only with a mask
        kwargs.update(sparse_pool=(2, 2), sparse_backend="gather")  # compiled flex is tested once, in test_sparse
    kwargs.update(dict(num_frames=5, height=32, width=32) if kind == "wan" else dict(height=64, width=64))
    if kind != "sd":
        kwargs["max_sequence_length"] = 8
    kwargs.update(extra)
    return kwargs


def generate(kind, seed=0, **extra):
    out = pipe_of(kind)(**call_of(kind, **extra), generator=torch.Generator().manual_seed(seed))
    return out.frames if kind == "wan" else out.images


def parent(kind, seed=0):
    kwargs = {k: v for k, v in call_of(kind).items() if not k.startswith("sparse")}
    out = super(CLASSES[kind], pipe_of(kind)).__call__(**kwargs, generator=torch.Generator().manual_seed(seed))
    return out.frames if kind == "wan" else out.images


def assert_restored(pipe):
    for model in pipe.steer_denoisers().values():
        assert "forward" not in model.__dict__
        assert not any(type(p).__name__.startswith("Steered") for p in model.attn_processors.values())


@pytest.mark.parametrize("kind", ["wan", "sd3", "flux"])
def test_keep_all_is_the_parent_and_sparsity_changes_the_output(kind):
    kept = generate(kind, sparsity=0.0, sparse_dense_steps=0)
    np.testing.assert_allclose(kept, parent(kind), atol=1e-5)
    sparse = generate(kind, sparsity=0.9, sparse_dense_steps=0)
    assert np.abs(sparse - kept).max() > 1e-4
    np.testing.assert_array_equal(sparse, generate(kind, sparsity=0.9, sparse_dense_steps=0))
    assert_restored(pipe_of(kind))


def test_dense_steps_and_layers_and_the_static_masks():
    dense = generate("wan", sparsity=0.9, sparse_dense_steps=2)  # both steps dense
    np.testing.assert_array_equal(dense, parent("wan"))
    all_dense = generate("wan", sparsity=0.9, sparse_dense_steps=0, sparse_dense_layers=["blocks.0.attn1", 1])
    np.testing.assert_array_equal(all_dense, parent("wan"))
    default = generate("wan", sparsity=0.9)  # the first of 2 steps dense, block 0 dense
    first_only = generate("wan", sparsity=0.9, sparse_dense_steps=1, sparse_dense_layers=[0])
    np.testing.assert_array_equal(default, first_only)
    assert not np.array_equal(default, parent("wan"))  # one sparse layer in the last step: a small change
    for mask in ("radial", "tile"):  # 4 latent frames: the radial mask leaves frames 1 and 3 apart
        out = generate("wan", sparse_mask=mask, sparse_dense_steps=0, sparse_tile=(1, 1, 1), num_frames=13)
        assert not np.array_equal(out, generate("wan", sparsity=0.0, sparse_dense_steps=0, num_frames=13))


def test_composes_with_head_perturbation():
    heads = dict(perturbed_heads="blocks.1.attn1:0", perturbation_scale=3.0)
    both = generate("wan", sparsity=0.9, sparse_dense_steps=0, **heads)
    assert np.abs(both - generate("wan", **heads)).max() > 1e-4
    assert np.abs(both - generate("wan", sparsity=0.9, sparse_dense_steps=0)).max() > 1e-4
    kept = generate("wan", sparsity=0.0, sparse_dense_steps=0, **heads)
    np.testing.assert_allclose(kept, generate("wan", **heads), atol=1e-5)


def test_the_model_is_restored_when_the_call_raises():
    pipe = pipe_of("wan")

    def fail(*args, **kwargs):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe(**call_of("wan", sparsity=0.5), callback_on_step_end=fail)
    assert_restored(pipe)


@pytest.mark.parametrize("options, message", [
    (dict(sparsity=1.0), r"sparsity 1.0 must be a number in \[0, 1\)"),
    (dict(sparsity=0.5, sparse_mask="radial"), "sparsity sets the draft map's density"),
    (dict(sparse_mask="window"), r"sparse_mask 'window' is not one of \('draft', 'radial', 'tile'\)"),
    (dict(sparsity=0.5, sparse_pool=(8, 16)), r"sparse_pool \(8, 16\) .* fit in the call's 4 x 4 tokens per frame"),
    (dict(sparsity=0.5, sparse_pool=(2, 0)), r"sparse_pool \(2, 0\) must be \(rows, columns\)"),
    (dict(sparsity=0.5, sparse_backend="cuda"), r"sparse_backend 'cuda' is not one of"),
    (dict(sparsity=0.5, sparse_dense_layers=["blocks.7.attn1"]), "unknown layer 'blocks.7.attn1'"),
    (dict(sparsity=0.5, sparse_dense_layers=["blocks.0.attn2"]), "is cross-attention"),
    (dict(sparsity=0.5, sparse_dense_steps=-1), "dense_steps -1 must be a whole number"),
    (dict(sparse_mask="tile", sparse_tile=(2, 2)), "tile window"),
])
def test_bad_options_are_refused_before_compute(options, message):
    pipe = pipe_of("wan")
    with pytest.raises(ValueError, match=message):
        pipe.check_call(**call_of("wan", **options))


def test_an_image_of_one_block_is_refused_before_compute():
    with pytest.raises(ValueError, match=r"sparse_pool: a frame of 16 x 16 tokens is one block at pool \(16, 16\), so "
                                         r"it has nothing to skip; a smaller pool, e.g. \(8, 8\)"):
        pipe_of("sd3").check_call(**call_of("sd3", sparsity=0.5, sparse_pool=(16, 16)))


def test_other_pipelines_are_refused():
    with pytest.raises(ValueError, match="runs on the Wan, CogVideoX, LTX-Video, HunyuanVideo 1.5, SD3 and FLUX denoisers, not on "
                                         "StableDiffusionSteerPipeline's UNet2DConditionModel"):
        pipe_of("sd").check_call(**call_of("sd", sparsity=0.5, height=32, width=32))

"""Block-sparse attention: layouts, mask sources and backends against explicit masked softmax."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from attnsteer.attention_processors import SELF, AttentionCall, LayerInfo, TokenLayout, list_layers, steering
from attnsteer.attention_processors import sparse
from attnsteer.attention_processors.sparse import (DraftAttention, DraftMask, RadialMask, TileMask, block_layout,
                                                   block_mask, from_slots, sparse_attention, tiling_pool, to_slots)
from attnsteer.pipelines.tiny import tiny_components

VIDEO = (3, 5, 7)  # ragged in both directions for pool (2, 3)
POOL = (2, 3)
CPU_BACKENDS = ("dense", "gather")


def layouts():
    """Self-attention on a video grid, and joint attention with text after and before the image."""
    n = math.prod(VIDEO)
    return {
        "self": (TokenLayout(slice(0, n), None, VIDEO), n),
        "text after": (TokenLayout(slice(0, 35), slice(35, 40), (5, 7)), 40),
        "text first": (TokenLayout(slice(6, 41), slice(0, 6), (5, 7)), 41),
    }


def qkv(seq_len, batch=2, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, dim, generator=g) for _ in range(3)]


def token_blocks(layout, seq_len):
    """The block of each token, counted as the slot layout does (image windows per frame, then text)."""
    blocks = block_layout(layout, seq_len, POOL)
    return blocks.tokens // blocks.size


def reference(q, k, v, pairs, layout, seq_len, own=None):
    """Explicit masked softmax in token order: token i sees token j when their blocks' pair is kept (and
    ``own``, a layer's boolean mask, lets it)."""
    blk = token_blocks(layout, seq_len)
    allowed = pairs[..., blk[:, None], blk[None, :]]
    allowed = allowed if own is None else allowed & own
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


class Fixed:
    """A mask source giving a fixed block pattern."""

    def __init__(self, pattern):
        self.pattern = pattern

    def __call__(self, q, k, blocks, scale):
        return self.pattern


@pytest.mark.parametrize("name", list(layouts()))
def test_slot_order_is_block_major_and_round_trips(name):
    layout, seq_len = layouts()[name]
    blocks = block_layout(layout, seq_len, POOL)
    x = torch.randn(2, seq_len, 4)
    assert torch.equal(from_slots(to_slots(x, blocks), blocks), x)
    grid = layout.grid if len(layout.grid) == 3 else (1, *layout.grid)
    valid = blocks.valid()
    for b in range(blocks.image_blocks):
        tokens = blocks.slots.view(blocks.blocks, blocks.size)[b][valid[b]] - layout.image.start
        f, y, x_ = tokens // (grid[1] * grid[2]), tokens // grid[2] % grid[1], tokens % grid[2]
        frame, row, col = blocks.coords[b].tolist()
        assert (f == frame).all() and (y // POOL[0] == row).all() and (x_ // POOL[1] == col).all()
        assert len(tokens) == len(set((y * 100 + x_).tolist()))
    text = blocks.slots[blocks.image_blocks * blocks.size:]
    expected = [] if layout.text is None else list(range(layout.text.start, layout.text.stop))
    assert text[text < seq_len].tolist() == expected
    assert block_layout(layout, seq_len, POOL) is blocks  # cached


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(layouts()))
def test_keeping_every_block_equals_dense_sdpa(name, backend):
    layout, seq_len = layouts()[name]
    q, k, v = qkv(seq_len)
    out = sparse_attention(q, k, v, layout, DraftMask(0.0), POOL, q.shape[-1] ** -0.5, backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(layouts()))
def test_a_hand_made_block_pattern_equals_explicit_masked_softmax(name, backend):
    layout, seq_len = layouts()[name]
    q, k, v = qkv(seq_len, seed=1)
    blocks = block_layout(layout, seq_len, POOL)
    n = blocks.image_blocks
    pattern = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(2)) < 0.3
    out = sparse_attention(q, k, v, layout, Fixed(pattern), POOL, q.shape[-1] ** -0.5, backend)
    full = block_mask(Fixed(pattern), None, None, blocks, 1.0)
    torch.testing.assert_close(out, reference(q, k, v, full, layout, seq_len), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["text after", "text first"])
def test_text_rows_and_columns_stay_dense_and_the_diagonal_is_kept(name):
    layout, seq_len = layouts()[name]
    blocks = block_layout(layout, seq_len, POOL)
    n = blocks.image_blocks
    full = block_mask(Fixed(torch.zeros(1, 1, n, n, dtype=torch.bool)), None, None, blocks, 1.0)[0, 0]
    assert full[n:].all() and full[:, n:].all()
    assert torch.equal(full[:n, :n], torch.eye(n, dtype=torch.bool))


def test_the_draft_keeps_the_largest_entries_under_one_threshold_per_head():
    layout, seq_len = layouts()["self"]
    q, k, _ = qkv(seq_len, seed=3)
    blocks = block_layout(layout, seq_len, POOL)
    qs, ks = to_slots(q, blocks), to_slots(k, blocks)
    mask = DraftMask(0.7)(qs, ks, blocks, 0.5)
    n = blocks.image_blocks
    assert (mask.flatten(-2).sum(-1) == math.ceil(0.3 * n * n)).all()
    # the draft map by hand: block means of the tokens, softmax over key blocks
    blk = token_blocks(layout, seq_len)
    one_hot = F.one_hot(blk, n).float()
    means = lambda x: (one_hot.T @ x) / one_hot.sum(0)[:, None]
    draft = torch.softmax(means(q) @ means(k).transpose(-1, -2) * 0.5, -1)
    for b in range(2):
        for h in range(3):
            kept, dropped = draft[b, h][mask[b, h]], draft[b, h][~mask[b, h]]
            assert kept.min() >= dropped.max()
    rows_kept = mask.sum(-1)
    assert rows_kept.max() > rows_kept.min()  # a global threshold, not a fixed count per row


def test_radial_mask_is_dense_near_and_on_the_first_frame_and_narrows_with_distance():
    blocks = block_layout(TokenLayout(slice(0, 9 * 4 * 16), None, (9, 4, 16)), 9 * 4 * 16, (2, 2))
    mask = block_mask(RadialMask(), torch.zeros(1), None, blocks, 1.0)[0, 0]
    per = 2 * 8
    frame = lambda f: slice(f * per, (f + 1) * per)
    assert mask[frame(4), frame(5)].all() and mask[frame(4), frame(4)].all() and mask[frame(8), frame(0)].all()
    assert mask[frame(0), frame(8)].all()
    widths = [mask[frame(1), frame(1 + d)].sum().item() for d in (2, 4)]
    assert widths[0] > widths[1] > 0
    assert torch.equal(mask, mask.T)


def test_tile_mask_keeps_one_shifted_window_per_query_block():
    shape = (4, 5, 6)
    blocks = block_layout(TokenLayout(slice(0, 120), None, shape), 120, (1, 1))
    mask = TileMask((3, 2, 3))(torch.zeros(1), None, blocks, 1.0)[0, 0]
    assert (mask.sum(-1) == 3 * 2 * 3).all()
    coords = blocks.coords
    for i in (0, 37, 119):
        kept = coords[mask[i]]
        spans = (kept.max(0).values - kept.min(0).values + 1).tolist()
        assert spans == [3, 2, 3]
        assert all((kept.min(0).values <= coords[i]) & (coords[i] <= kept.max(0).values))


def test_bad_arguments_are_refused_naming_the_value():
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"sparsity .* \[0, 1\)"):
            DraftMask(bad)
    with pytest.raises(ValueError, match="pool"):
        DraftAttention(["a"], pool=(0, 4))
    with pytest.raises(ValueError, match="dense_steps"):
        DraftAttention(["a"], dense_steps=-1)
    with pytest.raises(ValueError, match="backend 'triton' is not one of"):
        DraftAttention(["a"], backend="triton")
    with pytest.raises(ValueError, match="tile window"):
        TileMask((3, 3))


def test_flex_unavailable_is_named_with_the_alternatives(monkeypatch):
    monkeypatch.setattr(sparse.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="'flex' is not available on cpu: no C\\+\\+ compiler.*'gather'"):
        sparse.resolve_backend("flex", "cpu")
    assert sparse.resolve_backend("auto", "cpu") == "gather"


def test_flex_on_cuda_needs_blocks_of_a_multiple_of_128(monkeypatch):
    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert sparse.resolve_backend("auto", "cuda", (8, 16)) == "flex"
    assert sparse.resolve_backend("auto", "cuda", (10, 13)) == "gather"
    with pytest.raises(ValueError, match=r"'flex' is not available on cuda: .* multiple of 128 tokens, and pool "
                                         r"\(10, 13\) gives 130 .*'gather'"):
        sparse.resolve_backend("flex", "cuda", (10, 13))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        sparse.resolve_backend("flex", "cuda", (8, 16))


def test_a_grid_is_required():
    with pytest.raises(ValueError, match="image token grid"):
        block_layout(TokenLayout(slice(0, 10), None, None), 10, POOL)


def wan_transformer():
    return tiny_components("wan")["transformer"].eval()


def wan_inputs(timestep):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                timestep=torch.tensor([timestep]), return_dict=False)


def test_on_wan_keep_all_is_the_model_and_dense_steps_count_timesteps():
    model = wan_transformer()
    layers = list(list_layers(model, (SELF,)))
    with torch.no_grad():
        plain = [model(**wan_inputs(t))[0] for t in (900, 800)]
        with steering(model, [DraftAttention(layers, sparsity=0.0, pool=(2, 2), backend="gather")]):
            kept = [model(**wan_inputs(t))[0] for t in (900, 800)]
        steer = DraftAttention(layers, sparsity=0.8, pool=(2, 2), backend="gather", dense_steps=1)
        with steering(model, [steer]):
            first = [model(**wan_inputs(900))[0] for _ in range(2)]  # one step (same timestep) twice
            second = model(**wan_inputs(800))[0]
    for a, b in zip(plain, kept):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(f, plain[0]) for f in first) and steer.step == 1
    assert (second - plain[1]).abs().max() > 1e-4


def test_a_second_steering_block_runs_the_dense_warm_up_again():
    model = wan_transformer()
    layers = list(list_layers(model, (SELF,)))
    steer = DraftAttention(layers, sparsity=0.8, pool=(2, 2), backend="gather", dense_steps=1)
    with torch.no_grad():
        plain = model(**wan_inputs(900))[0]
        for _ in range(2):  # two generations with the same steer
            with steering(model, [steer]):
                first = model(**wan_inputs(900))[0]
                assert (model(**wan_inputs(800))[0] - first).abs().max() > 0
            assert torch.equal(first, plain)


def test_cross_attention_layers_are_refused_by_name():
    model = wan_transformer()
    with pytest.raises(ValueError, match="layer 'blocks.0.attn2' is cross-attention; DraftAttention acts on "
                                         "self or joint-attention layers"):
        with steering(model, [DraftAttention(["blocks.0.attn1", "blocks.0.attn2"], pool=(2, 2))]):
            pass
    assert not any(type(p).__name__.startswith("Steered") for p in model.attn_processors.values())


def test_frames_of_one_block_are_warned_about_once():
    model = wan_transformer()
    layers = list(list_layers(model, (SELF,)))
    with torch.no_grad(), steering(model, [DraftAttention(layers, sparsity=0.5, backend="gather")]):
        with pytest.warns(UserWarning, match=r"a frame of 4 x 4 tokens is one block at pool \(8, 16\), so blocks "
                                             r"can only skip whole frames; a smaller pool, e.g. \(2, 2\)") as seen:
            model(**wan_inputs(900))
    assert len(seen) == 1  # one grid, several layers


def own_mask(seq_len, seed=3):
    """A layer's own boolean mask [2, 1, L, L]: random, each token seeing itself (no row left empty)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 1, seq_len, seq_len, generator=g) < 0.6) | torch.eye(seq_len, dtype=torch.bool)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["self", "text after"])
def test_a_layers_own_boolean_mask_is_kept_inside_the_kept_blocks(name, backend):
    layout, seq_len = layouts()[name]
    q, k, v = qkv(seq_len, seed=7)
    blocks = block_layout(layout, seq_len, POOL)
    n, own = blocks.image_blocks, own_mask(seq_len)
    pattern = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(8)) < 0.3
    out = sparse_attention(q, k, v, layout, Fixed(pattern), POOL, q.shape[-1] ** -0.5, backend, own)
    full = block_mask(Fixed(pattern), None, None, blocks, 1.0)
    torch.testing.assert_close(out, reference(q, k, v, full, layout, seq_len, own), atol=1e-5, rtol=1e-5)
    everything = sparse_attention(q, k, v, layout, DraftMask(0.0), POOL, q.shape[-1] ** -0.5, backend, own)
    torch.testing.assert_close(everything, F.scaled_dot_product_attention(q, k, v, attn_mask=own), atol=1e-5, rtol=1e-5)


def test_flex_keeps_a_layers_own_boolean_mask():
    """flex with a layer's own boolean mask equals the masked reference. About 11 s alone (36 s in the suite
    beside the other worker): flex compiles its kernel for the mask function that reads the layer's mask."""
    layout, seq_len = layouts()["text after"]
    q, k, v = qkv(seq_len, seed=9)
    blocks = block_layout(layout, seq_len, POOL)
    n, own = blocks.image_blocks, own_mask(seq_len, seed=10)
    pattern = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(11)) < 0.3
    out = sparse_attention(q, k, v, layout, Fixed(pattern), POOL, q.shape[-1] ** -0.5, "flex", own)
    full = block_mask(Fixed(pattern), None, None, blocks, 1.0)
    torch.testing.assert_close(out, reference(q, k, v, full, layout, seq_len, own), atol=1e-5, rtol=1e-5)


def test_an_additive_layer_mask_is_refused():
    layout, seq_len = layouts()["self"]
    call = AttentionCall(LayerInfo("blocks.0.attn1", SELF, 3, None), layout)
    q, k, v = qkv(seq_len)
    with pytest.raises(RuntimeError, match=r"blocks.0.attn1.*own additive \(torch.float32\) attention mask"):
        DraftAttention(["blocks.0.attn1"], pool=POOL).attention(call, q, k, v, torch.zeros(seq_len, seq_len), None)


def test_compiled_flex_matches_the_reference_compiles_once_per_shape_and_past_its_limit_says_so(monkeypatch):
    """The one compiled backend; two compiles of about 5 s each on this CPU, the least that shows both
    a second shape past torch's own recompile limit and our limit's loud fallback. A hand-made pattern
    on the joint layout, a second pattern of the same shape without recompiling; with torch's limit
    at 1 and FLEX_SHAPES at 2, a second shape compiles and a third runs the gather, with a warning
    (past torch's limit flex would run uncompiled: 80x slower, silently)."""
    import torch._dynamo

    layout, seq_len = layouts()["text after"]
    q, k, v = qkv(seq_len, seed=4)
    blocks = block_layout(layout, seq_len, POOL)
    n = blocks.image_blocks
    torch._dynamo.reset()
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    before = graphs()
    for seed in (5, 6):
        pattern = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(seed)) < 0.3
        out = sparse_attention(q, k, v, layout, Fixed(pattern), POOL, q.shape[-1] ** -0.5, "flex")
        full = block_mask(Fixed(pattern), None, None, blocks, 1.0)
        torch.testing.assert_close(out, reference(q, k, v, full, layout, seq_len), atol=1e-5, rtol=1e-5)
    assert graphs() - before == 1
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(sparse, "FLEX_SHAPES", 2)
    sparse._warn_flex_limit.cache_clear()
    for heads, compiled in ((1, True), (4, False)):
        q, k, v = qkv(seq_len, heads=heads, seed=heads)
        source = DraftMask(0.5)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            out = sparse_attention(q, k, v, layout, source, POOL, 0.3, "flex")
        torch.testing.assert_close(out, sparse_attention(q, k, v, layout, source, POOL, 0.3, "dense"), atol=1e-5, rtol=1e-5)
        limit = [w for w in said if "flex_attention has compiled 2 shapes in this process" in str(w.message)]
        assert (graphs() - before, len(limit)) == ((2, 0) if compiled else (2, 1))


def test_gather_split_into_many_calls_gives_the_same_output(monkeypatch):
    layout, seq_len = layouts()["text first"]
    q, k, v = qkv(seq_len, seed=7)
    source = DraftMask(0.6)
    whole = sparse_attention(q, k, v, layout, source, POOL, 0.3, "gather")
    monkeypatch.setattr(sparse, "GATHER_ELEMENTS", 1)  # one query block per SDPA call
    torch.testing.assert_close(sparse_attention(q, k, v, layout, source, POOL, 0.3, "gather"), whole)
    torch.testing.assert_close(whole, sparse_attention(q, k, v, layout, source, POOL, 0.3, "dense"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid,pool", [((64, 64), (8, 16)), ((30, 52), (10, 13)), ((45, 80), (9, 16)), ((8, 8), (8, 8)),
                                       ((4, 4), (4, 4)), ((31, 53), (8, 18))])
def test_the_default_pool_tiles_the_frame_with_about_128_tokens_when_it_can(grid, pool):
    """Wan 480p (30 x 52) and 720p (45 x 80) frames get pools without empty slots; a prime-sized frame the
    least padding among pools of 64-256 tokens; a frame smaller than that is one block."""
    assert tiling_pool(grid) == pool
    layout = TokenLayout(slice(0, grid[0] * grid[1]), None, grid)
    empty = len(block_layout(layout, grid[0] * grid[1], pool).empty)
    assert empty == (0 if grid != (31, 53) else 32 * 54 - 31 * 53)

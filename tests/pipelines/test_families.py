"""The newer families (Chroma, FLUX.2 Klein and [dev], Qwen-Image, Z-Image, CogVideoX, LTX-Video, HunyuanVideo 1.5): addresses, token layouts, head perturbation
against a masked-attention reference, their branch rules, block-sparse attention, and what is refused on them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnsteer.attention_processors import (CROSS, JOINT, SELF, HeadPerturbation, LayoutRecorder, head_weights,
                                            list_layers, steering)
from attnsteer.pipelines.steer import steer_pipeline
from attnsteer.pipelines.tiny import FAMILY_KINDS, PIPELINE_CLASSES, tiny_pipeline
from attnsteer.pipelines.tokens import content_indices, text_length, word_indices

TEXT = 6  # text tokens of the direct model calls below
VIDEO_KINDS = ("cogvideox", "ltx", "hunyuanvideo15")
TEXT_LAST = ("hunyuanvideo15", "zimage")  # joint layers with the text after the image
JOINT_TEXT = {"zimage": 32}  # text tokens in the joint layers, where not TEXT: Z-Image pads a caption to a multiple of 32
_PIPES = {}


def pipe_of(kind):
    if kind not in _PIPES:
        _PIPES[kind] = tiny_pipeline(kind, steer_pipeline(PIPELINE_CLASSES[kind]))
    return _PIPES[kind]


def prompt(kind, **extra) -> dict:
    """A call's text (Qwen-Image runs CFG only with a negative prompt: given one, as the other families run it)."""
    return dict(prompt="a red circle", **({"max_sequence_length": 16} if kind != "hunyuanvideo15" else {}),
                **({"negative_prompt": "blurry"} if kind == "qwenimage" else {}), **extra)


def generate(kind, seed=0, **extra):
    call = dict(num_inference_steps=2, height=32, width=32, output_type="latent",
                **prompt(kind, **{k: extra.pop(k) for k in ["negative_prompt"] if k in extra}))
    call.update(extra)
    if kind in VIDEO_KINDS:
        call.setdefault("num_frames", 5)
    out = pipe_of(kind)(**call, generator=torch.Generator().manual_seed(seed))
    return (out.frames if kind in VIDEO_KINDS else out.images).numpy()


def model_call(kind):
    """Inputs of one direct transformer call with TEXT text tokens, and the (frames, rows, columns) of image
    tokens it makes, from the inputs' sizes and the patch sizes (not from attnsteer)."""
    model = pipe_of(kind).transformer
    c, g = model.config, torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    if kind == "zimage":  # one latent [C, 1, H, W] and one caption [L, D] per row; 2 x 2 patches
        h, w = 4, 8
        return dict(x=[randn(c.in_channels, 1, 2 * h, 2 * w)], t=torch.tensor([0.5]),
                    cap_feats=[randn(TEXT, c.cap_feat_dim)]), (h, w)
    if kind == "qwenimage":
        h, w = 3, 4
        return dict(hidden_states=randn(1, h * w, c.in_channels), encoder_hidden_states=randn(1, TEXT, c.joint_attention_dim),
                    encoder_hidden_states_mask=torch.ones(1, TEXT), timestep=torch.tensor([0.5]),
                    img_shapes=[[(1, h, w)]]), (h, w)
    if kind in ("chroma", "flux2", "flux2dev"):  # FLUX.2's ids add a fourth axis, [dev]'s guidance is an input
        h, w = 3, 4
        axes = [torch.zeros(1), torch.arange(float(h)), torch.arange(float(w))] + [torch.zeros(1)] * (kind != "chroma")
        ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(h * w, -1)
        return dict(hidden_states=randn(1, h * w, c.in_channels), encoder_hidden_states=randn(1, TEXT, c.joint_attention_dim),
                    timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(TEXT, ids.shape[1]),
                    **({"guidance": torch.tensor([4.0])} if kind == "flux2dev" else {})), (h, w)
    if kind == "hunyuanvideo15":  # text: 2 image-encoder tokens, 2 glyph tokens and TEXT - 4 prompt tokens
        f, h, w = 2, 4, 6
        return dict(hidden_states=randn(1, c.in_channels, f, h, w), timestep=torch.tensor([500.0]),
                    encoder_hidden_states=randn(1, TEXT - 4, c.text_embed_dim), encoder_attention_mask=torch.ones(1, TEXT - 4),
                    encoder_hidden_states_2=randn(1, 2, c.text_embed_2_dim), encoder_attention_mask_2=torch.ones(1, 2),
                    image_embeds=randn(1, 2, c.image_embed_dim)), (f, h, w)
    if kind == "cogvideox":
        f, h, w = 2, 8, 12
        return dict(hidden_states=randn(1, f, c.in_channels, h, w), encoder_hidden_states=randn(1, TEXT, c.text_embed_dim),
                    timestep=torch.tensor([500])), (f, h // c.patch_size, w // c.patch_size)
    f, h, w = 3, 2, 4
    return dict(hidden_states=randn(1, f * h * w, c.in_channels), encoder_hidden_states=randn(1, TEXT, c.caption_channels),
                timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, TEXT), num_frames=f, height=h,
                width=w), (f, h, w)


def predict(model, call) -> torch.Tensor:
    """A direct call's prediction, Z-Image's list of rows stacked."""
    out = model(**call)[0]
    return torch.stack(out) if isinstance(out, list) else out


def test_layer_names_and_kinds():
    kinds = {kind: {n: info.kind for n, info in list_layers(pipe_of(kind).transformer).items()} for kind in FAMILY_KINDS}
    assert kinds["qwenimage"] == dict.fromkeys(["transformer_blocks.0.attn", "transformer_blocks.1.attn"], JOINT)
    assert kinds["zimage"] == dict.fromkeys(["layers.0.attention", "layers.1.attention"], JOINT)  # not its refiners
    assert kinds["chroma"] == kinds["flux2"] == kinds["flux2dev"] == dict.fromkeys(
        ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn",
         "single_transformer_blocks.1.attn"], JOINT)
    assert kinds["cogvideox"] == dict.fromkeys(["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], JOINT)
    assert kinds["ltx"] == {"transformer_blocks.0.attn1": SELF, "transformer_blocks.0.attn2": CROSS,
                            "transformer_blocks.1.attn1": SELF, "transformer_blocks.1.attn2": CROSS}


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_token_layouts_come_from_the_call(kind):
    model = pipe_of(kind).transformer
    call, grid = model_call(kind)
    recorder = LayoutRecorder(list_layers(model))
    with torch.no_grad(), steering(model, [recorder]):
        model(**call)
    assert set(recorder.seen) == set(list_layers(model))
    text = JOINT_TEXT.get(kind, TEXT)
    for name, (layout, q, _) in recorder.seen.items():
        kind_of = list_layers(model)[name].kind
        assert layout.grid == grid and layout.image.stop - layout.image.start == np.prod(grid), name
        if kind_of == JOINT and kind in TEXT_LAST:
            assert layout.image == slice(0, q[2] - text) and layout.text == slice(q[2] - text, q[2]), name
        elif kind_of == JOINT:
            assert layout.text == slice(0, TEXT) and layout.image == slice(TEXT, q[2]), name
        else:
            assert layout.text is None and q[2] == np.prod(grid), name


class PAGIdentity(TorchFunctionMode):
    """PAG's image identity as a mask on the layer's own attention call: image queries see the text keys and
    their own image key; text queries see everything. ``text`` tokens come first, or with ``last`` last."""

    def __init__(self, text, last=False):
        super().__init__()
        self.text, self.last = text, last

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            length = (args[0] if args else kwargs["query"]).shape[-2]
            allowed = torch.eye(length, dtype=torch.bool)
            text = slice(length - self.text, length) if self.last else slice(0, self.text)
            allowed[:, text] = True
            allowed[text] = True
            given = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            assert given is None or bool(given.all()), "the reference takes calls that mask nothing"
            args = args[:3]
            kwargs["attn_mask"] = allowed
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_whole_layer_image_identity_equals_the_masked_reference(kind):
    model = pipe_of(kind).transformer
    call, _ = model_call(kind)
    layers = [n for n, info in list_layers(model).items() if info.kind != CROSS]
    for name in (layers[0], layers[-1]):
        layer = list_layers(model)[name]
        text = JOINT_TEXT.get(kind, TEXT) if layer.kind == JOINT else 0
        mode = PAGIdentity(text, kind in TEXT_LAST)
        def enter(*_):
            mode.__enter__()

        def leave(*_):
            mode.__exit__(None, None, None)

        hooks = [layer.module.register_forward_pre_hook(enter), layer.module.register_forward_hook(leave)]
        try:
            with torch.no_grad():
                expected = predict(model, call)
        finally:
            for hook in hooks:
                hook.remove()
        heads = {name: tuple(range(layer.heads))}
        steer = HeadPerturbation(heads, "image")
        steer.set_weights(head_weights(heads, list_layers(model), 1.0))
        with torch.no_grad(), steering(model, [steer]):
            ours = predict(model, call)
        with torch.no_grad():
            assert (ours - predict(model, call)).abs().max() > 1e-3, name
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_heads_act_batched_equals_sequential_and_prefix_reuse_is_exact(kind):
    heads = dict(perturbed_heads="0:0", softpag_u=0.7)
    base = generate(kind)
    np.testing.assert_array_equal(generate(kind), base)
    batched = generate(kind, **heads)
    assert np.isfinite(batched).all() and np.abs(batched - base).max() > 1e-3
    np.testing.assert_allclose(generate(kind, **heads, perturbation_batching="sequential"), batched, atol=1e-5, rtol=0)
    np.testing.assert_allclose(generate(kind, **heads, perturbation_prefix_reuse=False), batched, atol=1e-5, rtol=0)
    model = pipe_of(kind).transformer
    assert "forward" not in model.__dict__
    assert not any(type(info.module.processor).__name__.startswith("Steered") for info in list_layers(model).values())


@pytest.mark.parametrize("kind,rows", [("chroma", [2, 1, 2, 1]), ("flux2", [2, 1, 2, 1]), ("flux2dev", [2, 2]),
                                       ("qwenimage", [2, 1, 2, 1]),
                                       ("zimage", [3, 3]), ("cogvideox", [3, 3]), ("ltx", [3, 3]),
                                       ("hunyuanvideo15", [2, 1, 2, 1])])
def test_the_perturbed_rows_ride_on_the_conditional_call(kind, rows):
    """Chroma runs CFG as two unnamed calls a step, conditional first, FLUX.2 Klein and Qwen-Image as "cond" and
    "uncond" calls, FLUX.2 [dev] one conditional call (guidance distilled in), HunyuanVideo 1.5's guider as "pred_cond" and "pred_uncond": only the conditional one gets the
    perturbed copy; CogVideoX and LTX-Video run one batched call ("cond_uncond"): [uncond, cond] plus the copy,
    Z-Image one unnamed call [cond, uncond] plus the copy."""
    seen = []
    model = pipe_of(kind).transformer
    last = next(iter(model.all_final_layer.values())) if kind == "zimage" else model.proj_out
    hook = last.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        generate(kind, perturbed_heads="0:0", **({"guidance_scale": 4.0} if kind != "hunyuanvideo15" else {}),
                 **({"negative_prompt": "blurry"} if kind == "chroma" else {}))
    finally:
        hook.remove()
    assert seen == rows


def test_hunyuanvideo15_guidance_follows_its_guider():
    """The perturbation term is added to the conditional prediction before the guider's CFG, so the scale it
    divides by is the guider's: g = s, or s + 1 with the original formulation (cond + s (cond - uncond)), 1 where
    the guider's CFG is off for the step; a rescaling guider is no plain combination and is refused."""
    from diffusers import ClassifierFreeGuidance

    pipe = pipe_of("hunyuanvideo15")
    guider = pipe.guider
    try:
        for options, scale in ((dict(guidance_scale=4.0), 4.0), (dict(guidance_scale=4.0, use_original_formulation=True), 5.0),
                               (dict(guidance_scale=4.0, start=0.5), 1.0), (dict(guidance_scale=1.0), 1.0)):
            pipe.guider = ClassifierFreeGuidance(**options)
            pipe.guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
            pipe._num_timesteps = 2
            assert pipe.branch_info(pipe.transformer, {}).cfg_scale == scale, options
        pipe.guider = ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.7)
        with pytest.raises(ValueError, match=r"ClassifierFreeGuidance \(guidance_rescale 0.7\) is not that plain combination"):
            pipe.check_call(prompt="a", num_frames=5, height=32, width=32, perturbed_heads="0:0")
    finally:
        pipe.guider = guider


def test_zimage_guidance_is_the_papers_on_its_conditional_first_cfg():
    """Z-Image combines its batched [cond, uncond] rows as c + s (c - u). With layer 0's heads perturbed (PAG's
    identity map, w) the pipeline must combine what the transformer returns into c + s (c - u) + w (c - p),
    p the conditional rows' prediction with layer 0's attention masked to the identity; a step past
    cfg_truncation runs the conditional rows alone and must get c + w (c - p)."""
    pipe, s, w = pipe_of("zimage"), 3.0, 2.0
    model = pipe.transformer
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(
        ([x.clone() for x in args[0]], args[1].clone(), [c.clone() for c in args[2]], torch.stack(out[0]))))
    try:
        generate("zimage", perturbed_heads="0:*", perturbation_scale=w, guidance_scale=s, cfg_truncation=0.2,
                 negative_prompt="blurry")
    finally:
        hook.remove()
    assert [len(x) for x, *_ in calls] == [2, 1]  # CFG in the first step, the conditional rows alone in the second
    mode, layer = PAGIdentity(0), list_layers(model)["layers.0.attention"].module

    def enter(*_):
        mode.__enter__()

    def leave(*_):
        mode.__exit__(None, None, None)

    for x, t, caps, guided in calls:
        with torch.no_grad():
            plain = torch.stack(model(x, t, caps, return_dict=False)[0])
            hooks = [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
            try:
                p = torch.stack(model(x[:1], t[:1], caps[:1], return_dict=False)[0])
            finally:
                for h in hooks:
                    h.remove()
        c = plain[:1]
        if len(x) == 2:
            u = plain[1:]
            torch.testing.assert_close(guided[:1] + s * (guided[:1] - guided[1:]), c + s * (c - u) + w * (c - p),
                                       atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(guided, c + w * (c - p), atol=1e-4, rtol=1e-4)


def test_cogvideox_dynamic_cfg_with_heads_is_refused_before_compute():
    with pytest.raises(ValueError, match="use_dynamic_cfg=True sets CogVideoX's CFG scale after each model call"):
        pipe_of("cogvideox").check_call(prompt="a", num_frames=5, height=32, width=32, max_sequence_length=16,
                                        perturbed_heads="0:0", use_dynamic_cfg=True)


@pytest.mark.parametrize("kind", ["cogvideox", "ltx", "hunyuanvideo15"])
def test_block_sparse_keep_all_is_dense_and_sparsity_acts(kind):
    call = dict(sparse_pool=(4, 4), sparse_dense_steps=0, sparse_backend="gather")  # flex: the Wan tests
    dense = generate(kind)
    np.testing.assert_allclose(generate(kind, **call, sparsity=0.0), dense, atol=1e-5, rtol=0)
    assert np.abs(generate(kind, **call, sparsity=0.9) - dense).max() > 1e-3


def test_qwen_image_words_are_the_text_keys_its_pipeline_gives_the_transformer():
    """Qwen-Image's text keys are the Qwen2.5-VL states of the templated prompt after the template's first 34
    tokens: the keys at a word's indices are the encoder's states at that word's tokens in the whole
    templated sequence, found here by the tokens' text, and the prompt's own tokens come before the closing
    ones."""
    pipe = pipe_of("qwenimage")
    prompt = "a red circle and a blue square"
    arguments = dict(prompt=prompt, max_sequence_length=512)
    embeds, _ = pipe.encode_prompt(prompt, max_sequence_length=512)
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt), return_tensors="pt").input_ids
    states = pipe.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens[:2] == ["<|im_start|>", "system"] and tokens[32:34] == ["user", "Ċ"]  # the real template's 34
    for word, pieces in (("circle", ["Ġcircle"]), ("blue square", ["Ġblue", "Ġsquare"]), ("a", ["a"])):
        at = next(i for i in range(len(tokens)) if tokens[i:i + len(pieces)] == pieces)
        indices = word_indices(pipe, arguments, word)
        assert indices == list(range(at - 34, at - 34 + len(pieces)))
        torch.testing.assert_close(embeds[0, indices], states[0, at:at + len(pieces)])
    assert content_indices(pipe, arguments) == list(range(7)) and text_length(pipe, arguments) == embeds.shape[1] == 12


def test_flux2_klein_words_are_the_text_keys_of_its_chat_templated_prompt():
    """FLUX.2 Klein's text keys are Qwen3's states (layers 9, 18, 27 side by side) of the prompt as the chat
    template gives it, padded to max_sequence_length: the keys at a word's indices are those states at that
    word's tokens, found here by the tokens' text; the template's opening tokens come before the prompt's."""
    pipe = pipe_of("flux2")
    prompt = "a red circle and a blue square"
    arguments = dict(prompt=prompt, max_sequence_length=32)
    embeds, _ = pipe.encode_prompt(prompt, max_sequence_length=32)
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    ids = pipe.tokenizer(text, return_tensors="pt", padding="max_length", max_length=32)
    states = pipe.text_encoder(**ids, output_hidden_states=True).hidden_states
    read = torch.cat([states[k] for k in (9, 18, 27)], -1)
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids.input_ids[0])
    assert tokens[:4] == ["<|im_start|>", "user", "Ċ", "a"]
    for word, pieces in (("circle", ["Ġcircle"]), ("blue square", ["Ġblue", "Ġsquare"])):
        at = next(i for i in range(len(tokens)) if tokens[i:i + len(pieces)] == pieces)
        indices = word_indices(pipe, arguments, word)
        assert indices == list(range(at, at + len(pieces)))
        torch.testing.assert_close(embeds[0, indices], read[0, at:at + len(pieces)])
    assert content_indices(pipe, arguments) == list(range(3, 10)) and text_length(pipe, arguments) == embeds.shape[1] == 32


def test_flux2_dev_words_are_the_text_keys_of_its_chat_templated_prompt():
    """FLUX.2 [dev]'s text keys are Mistral 3's states (layers 10, 20, 30 side by side) of its system message and
    the prompt as the chat template lays them out, tokenized as apply_chat_template does (the template holds
    the start token): the keys at a word's indices are those states at that word's tokens, found here by
    the tokens' text, after the system message's."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    pipe = pipe_of("flux2dev")
    prompt = "a red circle and a blue square"
    arguments = dict(prompt=prompt, max_sequence_length=256)
    embeds, _ = pipe.encode_prompt(prompt, max_sequence_length=256)
    ids = pipe.tokenizer.apply_chat_template(format_input([prompt], pipe.system_message), tokenize=True,
                                             return_dict=True, return_tensors="pt", padding="max_length",
                                             max_length=256)
    states = pipe.text_encoder(**ids, output_hidden_states=True).hidden_states
    read = torch.cat([states[k] for k in (10, 20, 30)], -1)
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids.input_ids[0])
    assert tokens[:2] == ["<s>", "[SYSTEM_PROMPT]"] and tokens.count("<s>") == 1
    start = tokens.index("[INST]") + 1
    for word, pieces in (("circle", ["Ġcircle"]), ("blue square", ["Ġblue", "Ġsquare"])):
        at = next(i for i in range(len(tokens)) if tokens[i:i + len(pieces)] == pieces)
        indices = word_indices(pipe, arguments, word)
        assert at > start and indices == list(range(at, at + len(pieces)))
        torch.testing.assert_close(embeds[0, indices], read[0, at:at + len(pieces)])
    assert content_indices(pipe, arguments) == list(range(start, tokens.index("[/INST]")))
    assert text_length(pipe, arguments) == embeds.shape[1] == 256


@pytest.mark.parametrize("kind", ["qwenimage", "flux2", "flux2dev"])
def test_qwen_image_and_flux2_klein_take_attention_maps_and_astar(kind):
    pipe = pipe_of(kind)
    run = lambda **extra: pipe(prompt="a red circle and a blue square", num_inference_steps=2, height=32, width=32,
                               output_type="np", generator=torch.Generator().manual_seed(0), **extra)
    plain = run().images
    maps = run(return_attention_maps=["circle", "square"]).attention_maps
    assert maps.grid == (8, 8) and maps.maps.shape == (1, 2, 8, 8)  # 32 px / VAE 2 / 2 x 2 packing
    astar = dict(astar_tokens=["circle", "square"])
    np.testing.assert_array_equal(run(**astar, astar_scale=0.0).images, plain)
    assert np.abs(run(**astar, astar_scale=200.0).images - plain).max() > 1e-3


REFUSED = [  # Chroma's, FLUX.2's and Qwen-Image's words are mapped, Z-Image's not yet (here, test_attention_maps.py, ...)
    (dict(astar_tokens=["circle"]), "A-STAR needs the attention maps of text tokens"),
    (dict(return_attention_maps=["circle"]), "return_attention_maps needs the attention maps of text tokens"),
    (dict(story_subjects=["a circle", "a square"]), "IR-Diffusion runs on the SD, SDXL and SD3 denoisers"),
]


@pytest.mark.parametrize("kind,method,message", [(kind, method, message) for kind in FAMILY_KINDS
                                                  for method, message in REFUSED
                                                  if kind in (*VIDEO_KINDS, "zimage") or "story_subjects" in method])
def test_methods_that_do_not_apply_are_refused_by_name(kind, method, message):
    call = dict(prompt="a red circle", height=32, width=32, **method)
    with pytest.raises(ValueError, match=message):
        pipe_of(kind).check_call(**call, **({"num_frames": 5} if kind in VIDEO_KINDS else {}))




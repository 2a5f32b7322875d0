"""Tiny random pipelines of the real diffusers classes, built in code.

Tests and examples need every supported model family (SD 1.x, SDXL, SD3, FLUX, Wan) without weights or network:
these builders make deterministic, randomly initialised components as small as diffusers' own fast tests, with
the real CLIP BPE tokenizer (from the bundled ``data/bpe_simple_vocab_16e6.txt.gz``) in every tokenizer slot, and
attention layers with several heads so that per-head steering can be exercised.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLFlux2,
    AutoencoderKLLTXVideo,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    AutoencoderKLHunyuanVideo15,
    FluxControlNetModel,
    FluxPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = ["FAMILY_KINDS", "KINDS", "PIPELINE_CLASSES", "clip_tokenizer", "editing_parts", "tiny_components",
           "tiny_pipeline"]

KINDS = ("sd", "sdxl", "sd3", "flux", "wan")  # the families the shapes models, the CLI and the method tests cover
FAMILY_KINDS = ("chroma", "flux2", "flux2dev", "qwenimage", "zimage", "cogvideox", "ltx", "hunyuanvideo15")  # newer families: head perturbation and block-sparse attention

PIPELINE_CLASSES = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "wan": WanPipeline,
    "chroma": ChromaPipeline,
    "flux2": Flux2KleinPipeline,
    "flux2dev": Flux2Pipeline,
    "qwenimage": QwenImagePipeline,
    "zimage": ZImagePipeline,
    "cogvideox": CogVideoXPipeline,
    "ltx": LTXPipeline,
    "hunyuanvideo15": HunyuanVideo15Pipeline,
}

BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408  # 256 bytes + 256 end-of-word bytes + 48894 merges + 2 special tokens
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=None)
def _clip_vocab_dir() -> str:
    """CLIP's vocab.json and merges.txt, built as CLIP's SimpleTokenizer builds them, in one folder per BPE
    file that all processes share. It is written elsewhere and renamed into place, so a killed writer
    never leaves a half-written folder behind."""
    digest = hashlib.sha256(BPE_PATH.read_bytes()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"attnsteer-clip-bpe-{digest}"
    if folder.is_dir():
        return str(folder)
    lines = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    with open(partial / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(partial / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    try:
        partial.rename(folder)
    except OSError:  # another process renamed its own copy first
        shutil.rmtree(partial, ignore_errors=True)
    return str(folder)


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49408 tokens), e.g. "a red circle" -> [49406, 320, 736, 7117, 49407]."""
    # transformers 5 builds the BPE backend from vocab.json/merges.txt only in from_pretrained (the constructor
    # takes in-memory vocab/merges); from_pretrained on a local folder works the same on transformers 4.
    return CLIPTokenizer.from_pretrained(
        _clip_vocab_dir(),
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )


def _clip_text_config(hidden_act: str = "quick_gelu", projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")  # Qwen2's pre-tokenizer split
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")  # what Qwen-Image Edit's template adds
QWEN_CHAT_TEMPLATE = (  # Qwen3's chat template, the parts FLUX.2 Klein uses (messages, generation prompt, no thinking)
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
QWEN_CORPUS = (  # the text the tiny byte-level BPE learns its merges from: Qwen-Image's system prompt and test words
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background:\nsystem\nuser\nassistant\n\n"
    "a photo of a cat on a beach, a red circle and a blue square, an orange star with stripes in a green house, a "
    "yellow triangle moving left, a purple cross moving right, a black dog moving up, a white car moving down, a "
    "small tree and a large plain circle with dots"
)


MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
MISTRAL_CHAT_TEMPLATE = (  # Mistral Small 3.1's layout of a system and a user message, as FLUX.2 [dev] sends them
    "{{ bos_token }}{%- for message in messages %}{%- set text = message['content'] if message['content'] is string "
    "else message['content'][0]['text'] %}{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + "
    "'[/SYSTEM_PROMPT]' }}{%- elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}{%- endif %}"
    "{%- endfor %}"
)


@functools.cache
def _bpe_json(special: tuple[str, ...]) -> str:
    """A byte-level BPE with Qwen2's split and ``special`` tokens first, its merges learnt from ``QWEN_CORPUS``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([QWEN_CORPUS] * 8, trainer)
    return tokenizer.to_str()


def qwen_tokenizer(vision: bool = False):
    """A Qwen2Tokenizer of the real class and pre-tokenizer (Qwen2's split, byte-level BPE, its chat special
    tokens and Qwen3's chat template) whose merges are learnt in code from ``QWEN_CORPUS`` (Qwen's own
    vocabulary cannot be had offline): Qwen-Image's system prompt comes out as its 34 tokens, as with the
    real one. ``vision``: with the image tokens of ``QWEN_VISION`` too (Qwen-Image Edit)."""
    from tokenizers import Tokenizer
    from transformers import Qwen2Tokenizer

    special = QWEN_SPECIAL + QWEN_VISION * vision
    return Qwen2Tokenizer(tokenizer_object=Tokenizer.from_str(_bpe_json(special)), unk_token=None,
                          eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                          additional_special_tokens=list(special[1:]), chat_template=QWEN_CHAT_TEMPLATE)


def qwen_vl_processor(tokenizer):
    """A Qwen2VLProcessor on ``tokenizer`` (``qwen_tokenizer(vision=True)``) and the PIL image processor, without
    the video processor the class also asks for (it needs torchvision): what Qwen-Image Edit's prompt encoding
    calls, the image at 56 x 56 pixels (4 patches of 14, merged into one image token)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class ImageQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id, self.video_token_id = tokenizer.convert_tokens_to_ids(self.image_token), None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    side = 56 * 56
    return ImageQwen2VLProcessor(Qwen2VLImageProcessorPil(min_pixels=side, max_pixels=side), tokenizer)


def mistral_tokenizer():
    """Stands in for FLUX.2 [dev]'s Pixtral processor (which needs torchvision): a byte-level BPE learnt in code
    with Mistral's special tokens, a start token added when asked for special tokens, and Mistral Small 3.1's
    chat layout; the pipeline calls its ``apply_chat_template`` as it calls the processor's."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_str(_bpe_json(MISTRAL_SPECIAL))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=list(MISTRAL_SPECIAL[4:]),
                                   chat_template=MISTRAL_CHAT_TEMPLATE)


def _mistral3_text_encoder():
    """A tiny Mistral 3 (a one-block Pixtral vision tower rides along) with the 31 layers FLUX.2 [dev] reads
    (the states of layers 10, 20 and 30 side by side), over ``mistral_tokenizer``'s ids."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=31,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=32, patch_size=8)
    return Mistral3ForConditionalGeneration(Mistral3Config(vision_config=vision, text_config=text,
                                                           image_token_index=MISTRAL_SPECIAL.index("<unk>")))


def _qwen_text_kwargs(layers: int) -> dict:
    """A tiny Qwen2.5-VL text model's configuration, width 32, over ``qwen_tokenizer``'s ids."""
    special = {t: i for i, t in enumerate(QWEN_SPECIAL)}  # BpeTrainer puts the special tokens first
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=1024, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}, bos_token_id=special["<|endoftext|>"],
                eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"])


def _qwen_text_encoder(vision: bool = False):
    """A tiny Qwen2.5-VL (the text model is what Qwen-Image reads; a one-block vision tower rides along, and
    with ``vision`` reads Qwen-Image Edit's image through ``qwen_tokenizer(vision=True)``'s image tokens)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    special = {t: i for i, t in enumerate(QWEN_SPECIAL + QWEN_VISION)}
    images = dict(image_token_id=special["<|image_pad|>"], vision_start_token_id=special["<|vision_start|>"],
                  vision_end_token_id=special["<|vision_end|>"]) if vision else {}
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_kwargs(2),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
        **images)
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen3_text_encoder():
    """A tiny Qwen3 with the 27 layers FLUX.2 Klein reads (the states of layers 9, 18 and 27 side by side)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pad = QWEN_SPECIAL.index("<|endoftext|>")
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=27,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        max_position_embeddings=1024, pad_token_id=pad, bos_token_id=pad,
                                        eos_token_id=QWEN_SPECIAL.index("<|im_end|>")))


def _t5_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=EOS_ID,
        eos_token_id=EOS_ID,
    )


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def _sd_vae(seed: int) -> AutoencoderKL:
    # two blocks: vae_scale_factor 2, so a 32x32 image has a 16x16x4 latent
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            sample_size=32,
        ),
    )


def _flow_vae(seed: int) -> AutoencoderKL:
    # SD3/FLUX style: no quant convs, shift and scaling factors; vae_scale_factor 2
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
    )


def _sd(seed: int) -> dict:
    # attention at 16x16 latent (down 0 and up 1: 2 heads x 16) and at 8x8 (mid: 4 heads x 16)
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),  # diffusers' legacy name: the number of heads per block
            cross_attention_dim=32,
        ),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _sd_vae(seed),
        "text_encoder": _seeded(seed, lambda: CLIPTextModel(_clip_text_config())),
        "tokenizer": clip_tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _sdxl(seed: int) -> dict:
    # as SDXL: no attention at the highest resolution; attention at 8x8 latent with 4 heads x 16, 2 layers
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled text_encoder_2 output
            cross_attention_dim=64,  # 32 + 32: both text encoders' hidden states side by side
        ),
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": _sd_vae(seed),
        "text_encoder": _seeded(seed, lambda: CLIPTextModel(_clip_text_config())),
        "text_encoder_2": _seeded(seed, lambda: CLIPTextModelWithProjection(_clip_text_config("gelu"))),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
        "add_watermarker": False,
    }


def _sd3(seed: int) -> dict:
    transformer = _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,  # = heads x head dim
            joint_attention_dim=64,  # the two CLIP hidden states (32 + 32) side by side
            pooled_projection_dim=64,  # the two pooled CLIP outputs (32 + 32)
        ),
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _flow_vae(seed),
        "text_encoder": _seeded(seed, lambda: CLIPTextModelWithProjection(_clip_text_config())),
        "text_encoder_2": _seeded(seed, lambda: CLIPTextModelWithProjection(_clip_text_config("gelu"))),
        "text_encoder_3": None,
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(),
        "tokenizer_3": None,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _flux(seed: int) -> dict:
    transformer = _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            pooled_projection_dim=32,  # CLIP pooled output
            guidance_embeds=True,  # as FLUX.1-dev
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "scheduler": scheduler,
        "vae": _flow_vae(seed),
        "text_encoder": _seeded(seed, lambda: CLIPTextModel(_clip_text_config())),
        "text_encoder_2": _seeded(seed, lambda: T5EncoderModel(T5Config(**_t5_kwargs()))),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(512),  # stands in for FLUX's T5 tokenizer
        "image_encoder": None,
        "feature_extractor": None,
    }


def _wan(seed: int) -> dict:
    # Wan's VAE with one stage fewer than Wan 2.1's (and diffusers' tests'): spatial factor 4 instead of 8, temporal
    # factor 4 as Wan's own (1 + 4k frames -> 1 + k latent frames), so 5 frames at 32x32 give 2x8x8 latents and
    # 2x4x4 = 32 video tokens instead of 2x2x2.
    vae = _seeded(
        seed,
        lambda: AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[True, True],
            scale_factor_spatial=4,
            scale_factor_temporal=4,
        ),
    )
    transformer = _seeded(
        seed,
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,  # UMT5 d_model
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ),
    )
    return {
        "transformer": transformer,
        "transformer_2": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae,
        "text_encoder": _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(**_t5_kwargs()))),
        "tokenizer": clip_tokenizer(512),  # stands in for Wan's UMT5 tokenizer
    }


def _chroma(seed: int) -> dict:
    transformer = _seeded(
        seed,
        lambda: ChromaTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            axes_dims_rope=(4, 6, 6),
            approximator_num_channels=8,
            approximator_hidden_dim=32,
            approximator_layers=1,
        ),
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _flow_vae(seed),
        "text_encoder": _seeded(seed, lambda: T5EncoderModel(T5Config(**_t5_kwargs()))),
        "tokenizer": clip_tokenizer(512),  # stands in for Chroma's T5 tokenizer
        "image_encoder": None,
        "feature_extractor": None,
    }


def _flux2(seed: int) -> dict:
    """FLUX.2 Klein's pipeline with a tiny Qwen3 (prompt embeddings of width 3 x 16) and ``qwen_tokenizer``."""
    vae = _seeded(
        seed,
        lambda: AutoencoderKLFlux2(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=32,
        ),
    )
    transformer = _seeded(
        seed,
        lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=48,  # Qwen3's three read layers of width 16 side by side
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),  # (t, h, w, l), summing to attention_head_dim
            guidance_embeds=False,  # Klein base
        ),
    )
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": vae,
            "text_encoder": _seeded(seed, _qwen3_text_encoder), "tokenizer": qwen_tokenizer()}


def _flux2dev(seed: int) -> dict:
    """FLUX.2 [dev]'s pipeline: Klein's tiny VAE and transformer with guidance distilled in, a tiny Mistral 3 and
    ``mistral_tokenizer``."""
    parts = _flux2(seed)
    config = {k: v for k, v in parts["transformer"].config.items() if not k.startswith("_")}
    return {**parts, "transformer": _seeded(seed, lambda: Flux2Transformer2DModel(**{**config, "guidance_embeds": True})),
            "text_encoder": _seeded(seed, _mistral3_text_encoder), "tokenizer": mistral_tokenizer()}


def _qwenimage(seed: int) -> dict:
    """Qwen-Image's pipeline with a tiny Qwen2.5-VL and ``qwen_tokenizer`` (its prompt template and the 34
    tokens it drops as the real one's)."""
    vae = _seeded(
        seed,
        lambda: AutoencoderKLQwenImage(
            base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        ),
    )
    transformer = _seeded(
        seed,
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,  # 4 latent channels packed 2x2
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
    )
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": vae,
            "text_encoder": _seeded(seed, _qwen_text_encoder), "tokenizer": qwen_tokenizer()}


def _zimage(seed: int) -> dict:
    """Z-Image's pipeline with a tiny Qwen3 (it reads the second-last layer's states) and ``qwen_tokenizer``."""
    from transformers import Qwen3Config, Qwen3Model

    pad = QWEN_SPECIAL.index("<|endoftext|>")
    text = Qwen3Config(vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=pad)
    transformer = _seeded(seed, lambda: ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
        axes_dims=[4, 6, 6], axes_lens=[512, 64, 64]))
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": _flow_vae(seed),
            "text_encoder": _seeded(seed, lambda: Qwen3Model(text)), "tokenizer": qwen_tokenizer()}


def _cogvideox(seed: int) -> dict:
    # VAE: spatial factor 2, temporal factor 4 (1 + 4k frames -> 1 + k latent frames); 5 frames at 32x32 give
    # 2 latent frames of 16x16, patches of 2: 2 x 8 x 8 video tokens after 16 text tokens
    vae = _seeded(
        seed,
        lambda: AutoencoderKLCogVideoX(
            block_out_channels=(8, 8),
            down_block_types=("CogVideoXDownBlock3D",) * 2,
            up_block_types=("CogVideoXUpBlock3D",) * 2,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ),
    )
    transformer = _seeded(
        seed,
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,  # its 3-D RoPE takes 1/4, 3/8 and 3/8 of a head, each even
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=32,  # T5 d_model
            num_layers=2,
            sample_width=16,
            sample_height=16,
            sample_frames=5,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=16,
            use_rotary_positional_embeddings=True,  # as CogVideoX-5b
        ),
    )
    return {
        "transformer": transformer,
        "scheduler": CogVideoXDDIMScheduler(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                            prediction_type="v_prediction"),  # as CogVideoX's
        "vae": vae,
        "text_encoder": _seeded(seed, lambda: T5EncoderModel(T5Config(**_t5_kwargs()))),
        "tokenizer": clip_tokenizer(226),  # stands in for CogVideoX's T5 tokenizer
    }


def _ltx(seed: int) -> dict:
    # VAE: spatial factor 4 (patch 2, one 2x stage), temporal factor 2 (1 + 2k frames -> 1 + k latent frames)
    vae = _seeded(
        seed,
        lambda: AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1),
            spatio_temporal_scaling=(True, False),
            decoder_spatio_temporal_scaling=(True, False),
            decoder_inject_noise=(False, False, False),
            downsample_type=("conv", "conv"),
            upsample_residual=(False, False),
            upsample_factor=(1, 1),
            patch_size=2,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        ),
    )
    transformer = _seeded(
        seed,
        lambda: LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=32,  # T5 d_model
        ),
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": _seeded(seed, lambda: T5EncoderModel(T5Config(**_t5_kwargs()))),
        "tokenizer": clip_tokenizer(128),  # stands in for LTX's T5 tokenizer
    }


def _hunyuanvideo15(seed: int) -> dict:
    """HunyuanVideo 1.5's text-to-video pipeline: VAE factors 4 (spatial) and 4 (temporal), so 5 frames at 32 px
    give 2 x 8 x 8 latents; a tiny Qwen2.5-VL text model and ``qwen_tokenizer`` (its 108-token system prompt
    is longer here), a tiny T5 with ByT5's byte tokenizer for the glyph text, CFG through the guider."""
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    vae = _seeded(seed, lambda: AutoencoderKLHunyuanVideo15(
        latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1, spatial_compression_ratio=4,
        temporal_compression_ratio=4))
    transformer = _seeded(seed, lambda: HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1,  # the latent, the conditioning frames' latent and their mask
        out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_refiner_layers=1,
        text_embed_dim=32, text_embed_2_dim=32, image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=32,
        task_type="t2v"))
    text = Qwen2_5_VLTextConfig(**_qwen_text_kwargs(3))
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae,
        "text_encoder": _seeded(seed, lambda: Qwen2_5_VLTextModel(text)),
        "tokenizer": qwen_tokenizer(),
        "text_encoder_2": _seeded(seed, lambda: T5EncoderModel(T5Config(**{**_t5_kwargs(), "vocab_size": 384}))),
        "tokenizer_2": ByT5Tokenizer(),
        "guider": ClassifierFreeGuidance(guidance_scale=4.0),
    }


_BUILDERS = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "wan": _wan, "chroma": _chroma, "flux2": _flux2, "flux2dev": _flux2dev,
             "qwenimage": _qwenimage, "zimage": _zimage, "cogvideox": _cogvideox, "ltx": _ltx, "hunyuanvideo15": _hunyuanvideo15}


def _check_kind(kind: str) -> None:
    if kind not in KINDS + FAMILY_KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {', '.join(KINDS + FAMILY_KINDS)}")


def tiny_components(kind: str, seed: int = 0) -> dict:
    """The components of a tiny random pipeline of `kind` (one of KINDS), the same for the same seed."""
    _check_kind(kind)
    components = _BUILDERS[kind](seed)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them
    return components


def tiny_pipeline(kind: str, pipeline_class=None, seed: int = 0):
    """A tiny random pipeline of `kind`: `pipeline_class` (default: the diffusers class) built from tiny_components."""
    _check_kind(kind)
    cls = PIPELINE_CLASSES[kind] if pipeline_class is None else pipeline_class
    pipe = cls(**tiny_components(kind, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _live(controlnet: torch.nn.Module) -> torch.nn.Module:
    """``controlnet`` with the parameters diffusers starts at zero (its zero convolutions and projections)
    drawn small and random, so that the control branch changes the picture as a trained one does."""
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.05)
    return controlnet.eval()


def editing_parts(parent, components: dict, seed: int = 0) -> dict:
    """What the diffusers pipeline class ``parent`` (an editing, ControlNet or image-to-video pipeline of
    a kind) takes beyond the kind's tiny ``components``, built from them: a ControlNet copied from the
    denoiser as diffusers' ``from_unet`` / ``from_transformer`` do (one block; SD3's inpainting one with
    the mask's extra channel), FLUX Fill's transformer that also reads the masked picture's latent and the
    mask, Wan's image-to-video without a CLIP image encoder (Wan 2.2 TI2V's first-frame conditioning), and
    Qwen-Image Edit's vision-language encoder, its processor and a VAE that keeps its megapixel reference small."""
    allowed = inspect.signature(parent.__init__).parameters
    name, parts = parent.__name__, {}
    model = components.get("unet") or components.get("transformer")
    if "controlnet" in allowed and isinstance(model, UNet2DConditionModel):
        parts["controlnet"] = _seeded(seed, lambda: _live(ControlNetModel.from_unet(
            model, conditioning_embedding_out_channels=(8, 16))))
    elif "controlnet" in allowed and isinstance(model, SD3Transformer2DModel):
        extra = int("Inpaint" in name)  # the control mask rides along the control image's latent
        parts["controlnet"] = _seeded(seed, lambda: _live(SD3ControlNetModel.from_transformer(
            model, num_layers=1, num_extra_conditioning_channels=extra)))
    elif "controlnet" in allowed and isinstance(model, FluxTransformer2DModel):
        c = model.config
        parts["controlnet"] = _seeded(seed, lambda: _live(FluxControlNetModel.from_transformer(
            model, num_layers=1, num_single_layers=1, attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.num_attention_heads)))
    if name.startswith("FluxFill"):  # packed latent + packed masked-picture latent + the mask, 8 x 8 -> 2 x 2 packed
        latent, factor = components["vae"].config.latent_channels, 2 ** (len(components["vae"].config.block_out_channels) - 1)
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        config.update(in_channels=8 * latent + 4 * factor**2, out_channels=4 * latent)
        parts["transformer"] = _seeded(seed, lambda: FluxTransformer2DModel(**config)).eval()
    if name.startswith("WanVACE"):  # one VACE block, its hints added after block 0; it reads the control video's
        # inactive and reactive latents and the mask folded to the latent grid (spatial factor^2 channels)
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        vae = components["vae"].config
        factor = 2 ** len(vae.temperal_downsample)
        config.update(vace_layers=[0], vace_in_channels=2 * vae.z_dim + factor**2)
        parts["transformer"] = _seeded(seed, lambda: WanVACETransformer3DModel(**config)).eval()
    if name.startswith("QwenImageEdit"):  # a VL encoder that reads the reference image; the pipeline resizes it to
        # a megapixel, which a VAE of factor 16 (its lightest, no residual blocks) makes 32 x 32 tokens
        tokenizer = qwen_tokenizer(vision=True)
        parts.update(tokenizer=tokenizer, processor=qwen_vl_processor(tokenizer),
                     text_encoder=_seeded(seed, lambda: _qwen_text_encoder(vision=True)).eval(),
                     vae=_seeded(seed, lambda: AutoencoderKLQwenImage(
                         base_dim=4, z_dim=4, dim_mult=[1] * 5, num_res_blocks=0, temperal_downsample=[False] * 4,
                         latents_mean=[0.0] * 4, latents_std=[1.0] * 4)))
    if "image_encoder" in allowed and "expand_timesteps" in allowed:
        parts.update(image_encoder=None, image_processor=None, expand_timesteps=True)
    return parts

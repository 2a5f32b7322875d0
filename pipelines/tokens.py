"""Which text tokens a pipeline's denoiser sees as keys, and where: words to text-key indices.

The text keys of the denoiser are the pipeline's ``prompt_embeds`` sequence:
- SD, SDXL: the CLIP tokens of ``prompt`` (``tokenizer``; SDXL puts CLIP-L and CLIP-G side by side
  in the features, so one position is one token of both), 77 with start, end and padding.
- SD3: [CLIP tokens (77, CLIP-L and -G side by side) ; T5 tokens of ``prompt_3`` (or ``prompt``),
  ``max_sequence_length`` of them] along the sequence. Without T5 (``text_encoder_3`` None) the T5
  part is ``max_sequence_length`` zero embeddings and carries no words.
- FLUX: the T5 tokens of ``prompt_2`` (or ``prompt``) only, ``max_sequence_length`` of them.
- Wan: the UMT5 tokens of ``prompt``, ``max_sequence_length`` of them (cross-attention keys).
- Chroma: the T5 tokens of ``prompt``, ``max_sequence_length`` of them (joint attention, text first).
- Qwen-Image: the Qwen2.5-VL tokens of ``prompt`` inside the pipeline's chat template, the template's
  first ``prompt_template_encode_start_idx`` tokens (its system prompt) dropped, the rest (the prompt and
  the template's closing tokens) up to ``max_sequence_length``; a batch is padded to its longest.
- FLUX.2 Klein (its Qwen3 text encoder): the tokens of the prompt as the tokenizer's chat template
  gives it (a user message and the generation prompt, thinking off), ``max_sequence_length`` of them;
  the template's opening tokens come first.
- FLUX.2 [dev] (its Mistral 3 text encoder): the tokens of its system message and the prompt as the
  processor's chat template gives them (tokenized without further special tokens, as
  ``apply_chat_template`` does), ``max_sequence_length`` of them.

The rules follow the denoiser, so a family's editing pipelines (img2img, inpainting, ControlNet) read
their words as its text-to-image pipeline does. A word (or several, "red circle") is found as its token
ids, tokenised alone (with a leading space too, as a byte-level BPE such as Qwen's sees a word inside a
sentence), inside the prompt's ids: the first occurrence, in every text part that carries words (SD3 with
T5: both parts); a concept's map is the sum of its tokens' maps. This needs the tokenizers, hence floor 3.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from diffusers import (
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)

from .parent import denoiser

# the denoisers whose text keys are mapped to words, and how: any pipeline on them (text-to-image or editing)
TEXT_DENOISERS = {UNet2DConditionModel: "clip", SD3Transformer2DModel: "sd3", FluxTransformer2DModel: "flux",
                  WanTransformer3DModel: "t5", ChromaTransformer2DModel: "t5", QwenImageTransformer2DModel: "qwen"}
TEXT_FAMILIES = "SD, SDXL, SD3, FLUX, FLUX.2, Wan, Chroma and Qwen-Image"
PLACE = "\x00prompt\x00"  # stands for the prompt while a chat template is rendered


@dataclass(frozen=True)
class TextPart:
    """One encoder's tokens in the text-key sequence: positions offset .. offset + length."""

    tokenizer: object
    prompt_argument: str  # the call argument holding this part's prompt ("prompt", "prompt_2", ...)
    offset: int
    length: int
    template: str = "{}"  # what the tokenizer is given, the prompt in place of {}
    drop: int = 0  # the template's leading tokens the pipeline drops
    special: bool = True  # whether the tokenizer adds its special tokens (not where the template holds them)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.special).input_ids

    def ids(self, text: str) -> list[int]:
        """The token ids this part gives the denoiser for prompt ``text``."""
        if self.template == "{}":
            return _ids(self.tokenizer, text, self.length)
        return self._encode(self.template.format(text))[self.drop:][: self.length]

    def prompt_range(self, text: str) -> range:
        """Which of ``ids(text)`` are the prompt's own: after the template's opening, before its closing."""
        opening = self.template.split("{}")[0]
        start = len(self._encode(opening)) - self.drop
        return range(max(start, 0), min(len(self._encode(opening + text)) - self.drop, self.length))


def as_template(rendered: str) -> str:
    """A chat rendered with ``PLACE`` for the prompt as a format string: "{}" where the prompt goes."""
    return rendered.replace("{", "{{").replace("}", "}}").replace(PLACE, "{}")


def chat_template(tokenizer) -> str:
    """The text FLUX.2 Klein tokenizes for a prompt, "{}" where the prompt goes (other braces doubled)."""
    messages = [{"role": "user", "content": PLACE}]
    return as_template(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                     enable_thinking=False))


def mistral_part(pipe, length: int) -> TextPart:
    """FLUX.2 [dev]'s text part: its system message and the prompt in the processor's chat template."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    rendered = pipe.tokenizer.apply_chat_template(format_input([PLACE], pipe.system_message)[0], tokenize=False,
                                                  add_generation_prompt=False)
    tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)  # a processor's, or the tokenizer itself
    return TextPart(tokenizer, "prompt", 0, length, as_template(rendered), special=False)


def text_rule(pipe) -> str | None:
    """How ``pipe``'s denoiser sees text ("clip", "sd3", "flux", "t5", "qwen", "chat", "mistral"), None where
    words are not mapped."""
    model = denoiser(pipe)
    if isinstance(model, Flux2Transformer2DModel):  # FLUX.2's words follow its pipeline's text encoder
        encoder = inspect.signature(type(pipe).__init__).parameters.get("text_encoder")
        name = getattr(getattr(encoder, "annotation", None), "__name__", "")
        return {"Qwen3ForCausalLM": "chat", "Mistral3ForConditionalGeneration": "mistral"}.get(name)
    return next((rule for cls, rule in TEXT_DENOISERS.items() if isinstance(model, cls)), None)


def text_parts(pipe, arguments: dict) -> list[TextPart]:
    """The parts of ``pipe``'s text-key sequence that carry words, for a call's (bound) arguments."""
    msl, rule = arguments.get("max_sequence_length"), text_rule(pipe)
    if rule == "sd3":
        parts = [TextPart(pipe.tokenizer, "prompt", 0, pipe.tokenizer_max_length)]
        if pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None:
            parts.append(TextPart(pipe.tokenizer_3, "prompt_3", pipe.tokenizer_max_length, msl))
        return parts
    if rule == "flux":
        return [TextPart(pipe.tokenizer_2, "prompt_2", 0, msl)]
    if rule == "t5":
        return [TextPart(pipe.tokenizer, "prompt", 0, msl)]
    if rule == "chat":
        return [TextPart(pipe.tokenizer, "prompt", 0, msl, chat_template(pipe.tokenizer))]
    if rule == "mistral":
        return [mistral_part(pipe, msl)]
    if rule == "qwen":
        return [TextPart(pipe.tokenizer, "prompt", 0, msl, pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)]
    if rule == "clip":
        return [TextPart(pipe.tokenizer, "prompt", 0, pipe.tokenizer.model_max_length)]
    raise ValueError(f"{type(pipe).__name__}: text-token maps are available on the {TEXT_FAMILIES} pipelines")


def text_length(pipe, arguments: dict) -> int:
    """Number of text keys the denoiser sees (from ``prompt_embeds`` when given)."""
    embeds = arguments.get("prompt_embeds")
    if embeds is not None:
        return embeds.shape[1]
    if text_rule(pipe) == "sd3":
        return pipe.tokenizer_max_length + arguments["max_sequence_length"]
    if text_rule(pipe) in ("flux", "t5", "chat", "mistral"):
        return arguments["max_sequence_length"]
    part = text_parts(pipe, arguments)[0]
    if text_rule(pipe) == "qwen":  # the batch's prompts padded to the longest
        return max(len(part.ids(p)) for p in prompts_of(arguments, part.prompt_argument))
    return part.length


def prompts_of(arguments: dict, name: str) -> list[str] | None:
    """The call's prompts for one text part (``prompt_2``/``prompt_3`` fall back to ``prompt``)."""
    prompt = arguments.get(name) or arguments.get("prompt")
    return [prompt] if isinstance(prompt, str) else None if prompt is None else list(prompt)


def _ids(tokenizer, text: str, length: int, special: bool = True) -> list[int]:
    return tokenizer(text, truncation=special, max_length=length if special else None,
                     add_special_tokens=special).input_ids


def text_tokens(pipe, arguments: dict, index: int = 0) -> list[tuple[int, str]]:
    """(text-key index, token) of prompt ``index``'s tokens in every part: what token indices mean."""
    tokens = []
    for part in text_parts(pipe, arguments):
        ids = part.ids(prompts_of(arguments, part.prompt_argument)[index])
        tokens += [(part.offset + i, t) for i, t in enumerate(part.tokenizer.convert_ids_to_tokens(ids))]
    return tokens


def word_indices(pipe, arguments: dict, word: str, index: int = 0) -> list[int]:
    """Text-key indices of the first occurrence of ``word`` in prompt ``index``, in every part."""
    found = []
    for part in text_parts(pipe, arguments):
        ids = part.ids(prompts_of(arguments, part.prompt_argument)[index])
        targets = [t for t in (_ids(part.tokenizer, text, part.length, special=False) for text in (word, " " + word)) if t]
        hits = [(s, len(t)) for t in targets for s in range(len(ids) - len(t) + 1) if ids[s : s + len(t)] == t]
        if hits:
            start, size = min(hits)
            found += [part.offset + s for s in range(start, start + size)]
    if not found:
        prompt = prompts_of(arguments, text_parts(pipe, arguments)[0].prompt_argument)[index]
        raise ValueError(f"word {word!r} is not in the prompt {prompt!r} (as tokenised, within its first "
                         f"{text_parts(pipe, arguments)[0].length} tokens)")
    return found


def content_indices(pipe, arguments: dict, index: int = 0) -> list[int]:
    """Text-key indices of prompt ``index``'s word tokens (no start, end or padding token)."""
    found = []
    for part in text_parts(pipe, arguments):
        prompt = prompts_of(arguments, part.prompt_argument)[index]
        if part.template != "{}":
            found += [part.offset + i for i in part.prompt_range(prompt)]
            continue
        special = set(part.tokenizer.all_special_ids)
        found += [part.offset + i for i, t in enumerate(part.ids(prompt)) if t not in special]
    return found

"""Which method runs on which pipeline, read from the code itself: each method's own checks
(``check_call``, which computes nothing) on a tiny pipeline of each kind.

    python -m attnsteer.pipelines.support      # the README's tables: pipelines x methods, denoiser classes
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PROMPT = "a red circle and a blue square"
METHODS = {  # the column, and the least keyword arguments that turn the method on
    "head perturbation": dict(perturbed_heads="0:*"),
    "A-STAR": dict(astar_tokens=["circle", "square"]),
    "attention maps": dict(return_attention_maps=["circle"]),
    "IR-Diffusion": dict(story_subjects=["a red circle", "a blue square"]),
    "block-sparse attention": dict(sparsity=0.5, sparse_pool=(2, 2)),
}
EDITING = {  # per kind, the editing, ControlNet and image-to-video pipelines the table lists (the tests build them too)
    "sd": ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionControlNetPipeline",
           "StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline"),
    "sdxl": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetPipeline",
             "StableDiffusionXLControlNetImg2ImgPipeline", "StableDiffusionXLControlNetInpaintPipeline"),
    "sd3": ("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline", "StableDiffusion3ControlNetPipeline",
            "StableDiffusion3ControlNetInpaintingPipeline"),
    "flux": ("FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline", "FluxKontextPipeline",
             "FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"),
    "wan": ("WanImageToVideoPipeline", "WanVideoToVideoPipeline", "WanVACEPipeline"),
    "qwenimage": ("QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
}


def method_support(pipe, call: dict) -> dict[str, str]:
    """``{method: "yes" or "no: why"}`` for ``pipe`` called with ``call``."""
    out = {}
    for name, kwargs in METHODS.items():
        try:
            pipe.check_call(**call, **kwargs)
            out[name] = "yes"
        except ValueError as error:
            why = str(error).split(": ", 1)[-1] if str(error).startswith(tuple(kwargs)) else str(error)
            out[name] = "no: " + why.split("; ")[0]
    return out


def support_table() -> str:
    """The markdown table of every steer pipeline kind attnsteer tests (tiny random pipelines) x method: each
    family's text-to-X pipeline and its ``EDITING`` ones; the newer families in their text-to-X pipeline only
    (Qwen-Image in its Edit ones too)."""
    import inspect

    import diffusers

    from .parent import denoiser, parent_call
    from .steer import steer_pipeline
    from .tiny import FAMILY_KINDS, KINDS, PIPELINE_CLASSES, editing_parts, tiny_components

    side = 64
    image = Image.fromarray(np.full((side, side, 3), 128, np.uint8))
    mask = Image.fromarray(np.full((side, side), 255, np.uint8))
    inputs = {"image": image, "control_image": image, "mask_image": mask, "control_mask": mask, "video": [image] * 5,
              "strength": 0.75}
    lines, reasons = ["| pipeline | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"], []
    for kind in KINDS + FAMILY_KINDS:
        components = tiny_components(kind)
        for parent in (PIPELINE_CLASSES[kind], *(getattr(diffusers, name) for name in EDITING.get(kind, ()))):
            allowed = inspect.signature(parent.__init__).parameters
            pipe = steer_pipeline(parent)(**{**{k: v for k, v in components.items() if k in allowed},
                                             **editing_parts(parent, components)})
            parameters = parent_call(type(pipe)).parameters
            call = dict(prompt=PROMPT, num_inference_steps=2, **{k: v for k, v in inputs.items() if k in parameters})
            if "num_frames" in parameters:
                call.update(num_frames=5, height=side // 2, width=side // 2)
            elif "height" in parameters:
                call.update(height=side, width=side)
            cells = []
            for cell in method_support(pipe, call).values():
                why = cell.removeprefix("no: ").replace(f"{type(pipe).__name__}'s {type(denoiser(pipe)).__name__}",
                                                        "this pipeline's denoiser").replace(type(pipe).__name__, "this pipeline")
                if cell != "yes" and why not in reasons:
                    reasons.append(why)
                cells.append("yes" if cell == "yes" else f"no ({reasons.index(why) + 1})")
            lines.append(f"| {parent.__name__} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"({i}) {why}." for i, why in enumerate(reasons, 1)])


def denoiser_table() -> str:
    """The markdown table of the installed diffusers' denoiser classes: steered, or why not."""
    from attnsteer.attention_processors.architectures import denoiser_classes, unsupported_reason

    groups: dict[str, list[str]] = {}
    for cls in denoiser_classes():
        reason = unsupported_reason(cls)
        groups.setdefault("steered" if reason is None else f"not steered: {reason}", []).append(cls.__name__)
    lines = ["| attnsteer | diffusers denoiser classes |", "|---|---|"]
    order = sorted(groups, key=lambda status: status != "steered")
    return "\n".join(lines + [f"| {status} | {', '.join(groups[status])} |" for status in order])


if __name__ == "__main__":
    print(support_table())
    print()
    print(denoiser_table())

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
TASKS = {"": {}, "Img2Img": {"strength": 0.75}, "Inpaint": {"strength": 1.0}}  # task -> its call's extra arguments


def method_support(pipe, call: dict) -> dict[str, str]:
    """``{method: "yes" or "no: why"}`` for ``pipe`` called with ``call``."""
    out = {}
    for name, kwargs in METHODS.items():
        try:
            pipe.check_call(**call, **kwargs)
            out[name] = "yes"
        except ValueError as error:
            why = str(error).split(": ", 1)[-1] if str(error).startswith(tuple(kwargs)) else str(error)
            out[name] = "no: " + why.split(" (")[0].split("; ")[0]
    return out


def support_table() -> str:
    """The markdown table of every steer pipeline kind attnsteer tests (tiny random pipelines) x method; the
    newer families (Chroma, CogVideoX, LTX-Video) in their text-to-image or text-to-video pipeline only."""
    import diffusers

    from .steer import steer_pipeline
    from .tiny import FAMILY_KINDS, KINDS, PIPELINE_CLASSES, tiny_pipeline

    side = 64
    image = Image.fromarray(np.full((side, side, 3), 128, np.uint8))
    mask = Image.fromarray(np.full((side, side), 255, np.uint8))
    lines, reasons = ["| pipeline | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"], []
    for kind in KINDS + FAMILY_KINDS:
        base = tiny_pipeline(kind, steer_pipeline(PIPELINE_CLASSES[kind]))
        for task, extra in TASKS.items() if kind in KINDS else [("", {})]:  # newer families: text-to-X only
            parent = getattr(diffusers, PIPELINE_CLASSES[kind].__name__.removesuffix("Pipeline") + task + "Pipeline", None)
            if parent is None:
                continue
            pipe = steer_pipeline(parent).from_pipe(base) if task else base
            call = dict(prompt=PROMPT, num_inference_steps=2, **extra)
            if kind in ("wan", "cogvideox", "ltx"):
                call.update(num_frames=5, height=side // 2, width=side // 2)
            elif task == "Img2Img":  # the image sets the size
                call.update(image=image)
            else:
                call.update(height=side, width=side, **({"image": image, "mask_image": mask} if task else {}))
            cells = []
            for cell in method_support(pipe, call).values():
                why = cell.removeprefix("no: ").replace(type(pipe).__name__, "this pipeline")
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

"""Run the HeadHunter head search on a pipeline: the ``attnsteer search-heads`` command's engine.

Candidates are scored with classifier-free guidance off by default (as HeadHunter searches): each
image is eps_c + w (eps_c - eps_perturbed) with its candidate's heads perturbed at SoftPAG weight u.
Several candidates share one batched pipeline call (``perturbed_heads_per_prompt``), and every
candidate sees the same prompts and seeds, so their scores differ only by the heads.

Formulas, defaults and sources: docs/methods.md, section 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnsteer.attention_processors import JOINT, SELF, HeadSetFile, resolve_heads
from attnsteer.guidance.distributed import process_state
from attnsteer.guidance.head_search import Fidelity, Journal, head_key, search_heads
from attnsteer.guidance.objectives import objective_scores

from .evaluate import contact_sheet


def head_pool(pipe, layers=None) -> list[tuple[str, int]]:
    """Every (layer, head) of the model's self/joint layers, or of ``layers`` (names or indices)."""
    infos = pipe.steer_layers()
    names = [n for n, info in infos.items() if info.kind in (SELF, JOINT)]
    if layers:
        names = list(resolve_heads([f"{layer}:*" for layer in layers], infos))
    return [(name, h) for name in names for h in range(infos[name].heads)]


def pipeline_evaluator(pipe, objective, w: float, u: float, mode: str, call_kwargs: dict, batch_size: int,
                       objective_name: str = "objective"):
    """``evaluate(candidates, items, steps)`` for ``search_heads``: generate every (candidate, item)
    image in calls of at most ``batch_size`` prompts and score them with ``objective``."""

    def generate(candidates, items, steps):
        rows = [(c, prompt, seed) for c in candidates for prompt, seed in items]
        images = []
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            images += pipe(prompt=[p for _, p, _ in part],
                           generator=[torch.Generator(pipe.device).manual_seed(s) for _, _, s in part],
                           perturbed_heads_per_prompt=[[head_key(h) for h in c] for c, _, _ in part],
                           perturbation_scale=w, softpag_u=u, perturbation_mode=mode,
                           num_inference_steps=steps, output_type="pil", **call_kwargs).images
        return rows, images

    def evaluate(candidates, items, steps):
        rows, images = generate(candidates, items, steps)
        scores = objective_scores(objective, objective_name, images, [p for _, p, _ in rows])
        return [scores[i * len(items):(i + 1) * len(items)] for i in range(len(candidates))]

    evaluate.generate = generate
    return evaluate


def run_search(pipe, *, model: str, revision: str | None, objective, objective_name: str, items, out,
               rounds: int = 1, top_k: int = 3, layers=None, w: float = 3.0, u: float = 1.0, mode: str = "joint",
               steps: int = 20, call_kwargs: dict | None = None, batch_size: int = 16,
               halving_keep: float = 0.0, screen_items: int | None = None, screen_steps: int | None = None,
               sheet_items: int = 6, progress: bool = True) -> dict:
    """Search, then write ``heads.json`` (a head-set file the pipelines take as it is) and
    ``contact_sheet.png`` under ``out`` (main process). Returns the head-set file's contents."""
    state = process_state()
    # steps come from ``steps``; unset options (None) are the pipeline's defaults and stay out of the journal
    call_kwargs = {k: v for k, v in (call_kwargs or {}).items() if k != "num_inference_steps" and v is not None}
    pool = head_pool(pipe, layers)
    full = Fidelity("full", tuple(items), steps)
    screen = None
    if halving_keep:
        screen = Fidelity("screen", tuple(items[:screen_items or len(items)]), screen_steps or steps)
        if screen.cost(1) >= full.cost(1):
            raise ValueError("successive halving needs a cheaper screen: set screen items below the "
                             f"{len(items)} items or screen steps below {steps}")
    settings = dict(model=model, revision=revision, dtype=str(pipe.dtype).removeprefix("torch."),
                    device=pipe.device.type, objective=objective_name, w=w, u=u, mode=mode,
                    rounds=rounds, top_k=top_k, pool=[head_key(h) for h in pool], items=[list(i) for i in items],
                    steps=steps, call=call_kwargs, halving_keep=halving_keep,
                    screen=None if screen is None else [len(screen.items), screen.steps])
    out = Path(out)
    with state.main_process_first():
        journal = Journal(out / "journal.jsonl", settings, writer=state.is_main_process)
    evaluate = pipeline_evaluator(pipe, objective, w, u, mode, call_kwargs, batch_size, objective_name)
    chunk = max(1, batch_size // len(items))
    result = search_heads(evaluate, pool, rounds, top_k, full, journal, chunk, screen, halving_keep or 0.25,
                          progress)
    record = HeadSetFile(
        heads=[head_key(h) for h in result.heads], model=model, revision=revision, mode=mode, u=u, w=w,
        objective=objective_name,
        extra={"baseline_score": result.baseline, "rounds": result.rounds,
               "search": {**{k: v for k, v in settings.items() if k not in ("pool", "items")},
                          "pool_size": len(pool), "items": len(items), "chunk": chunk,
                          "image_steps": result.image_steps, "computed_image_steps": result.computed_image_steps,
                          "processes": state.num_processes, "wall_s": round(journal.seconds, 1)}})
    if state.is_main_process:
        record.save(str(out / "heads.json"))
        shown = list(items[:sheet_items])
        rows = {"none": ()}
        rows.update({head_key(h): (h,) for h in result.heads[:6]})
        rows[f"all {len(result.heads)}"] = tuple(sorted(result.heads))
        images = {}
        for name, candidate in rows.items():
            images[name] = evaluate.generate([candidate], shown, steps)[1]
        contact_sheet(images, [p for p, _ in shown]).save(out / "contact_sheet.png")
    return {"heads": record.heads, **record.extra}


def read_items(prompts: list[str], seeds: int) -> list[tuple[str, int]]:
    """(prompt, seed) items, prompt-major: a line "prompt<TAB>seed" is one item as it is, any other
    prompt is taken with seeds 0..seeds-1."""
    items = []
    for line in prompts:
        prompt, tab, seed = line.rpartition("\t")
        if tab and seed.strip().isdigit():
            items.append((prompt.strip(), int(seed)))
        else:
            items.extend((line, s) for s in range(seeds))
    return items

"""HeadHunter head selection (docs/methods.md, section 1; the paper's Algorithm 1): greedy rounds over a pool of heads.

Round r scores every candidate S + {h}, h in the pool and not yet in S, on the same prompt-seed
items, and adds the k best heads to S; each round also records its best candidate's gain over no
heads on those items, paired by item with a 95% interval (a gain inside it is selection noise).
What it adds to the authors' procedure:

- cost: candidates are scored in chunks (one batched pipeline call, a head set per prompt);
  heads already in S are never scored again; an optional successive-halving stage screens every
  candidate cheaply (fewer items and/or steps), keeps the best fraction and scores only those in full;
- resumable: each finished chunk is appended to a journal (JSON lines, fsynced); rerunning the same
  search skips what is there, and the chunks are the same whatever was done before, so the result is
  identical; a journal written with other settings is refused;
- distributed: under ``accelerate launch`` the chunks of a stage are shared out across processes and
  gathered, so every process holds every score; only the main process writes the journal.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .stats import paired_difference

Head = tuple[str, int]
Candidate = tuple[Head, ...]
Item = tuple[str, int]  # (prompt, seed)
# (candidates, items, steps) -> per candidate, the objective's score of each item's image
Evaluate = Callable[[list[Candidate], list[Item], int], list[list[float]]]


def head_key(head: Head) -> str:
    return f"{head[0]}:{head[1]}"


def candidate_key(candidate: Candidate) -> str:
    return " ".join(head_key(h) for h in candidate)


@dataclass(frozen=True)
class Fidelity:
    """How a candidate is scored: on which items and with how many denoising steps."""

    name: str
    items: tuple[Item, ...]
    steps: int

    def key(self, candidate: Candidate) -> str:
        """The journal's key for the candidate's per-item scores at this fidelity."""
        return f"{self.name}|{candidate_key(candidate)}"

    def cost(self, candidates: int) -> int:
        """Image-steps: denoising steps of one image (with its perturbed branch), the unit of cost."""
        return candidates * len(self.items) * self.steps


class Journal:
    """Append-only record of finished chunks: a header line with the settings, then one line per
    chunk ``{"scores": {key: [per-item scores]}, "seconds": s}`` (``seconds``: time since the run's
    previous record, so that their sum is the search's time over all its runs). A last line cut
    short by a kill is dropped; a damaged line elsewhere is skipped with a warning (its chunk is
    computed again) and the lines after it are kept."""

    def __init__(self, path: str | Path, settings: dict, writer: bool = True):
        self.path, self.writer = Path(path), writer
        self.scores: dict[str, list[float]] = {}
        self.seconds = 0.0
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        good = []
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                if number > 1 and not isinstance(entry.get("scores"), dict):
                    raise ValueError("no scores")
            except (json.JSONDecodeError, ValueError, AttributeError):
                if number == 1:
                    raise ValueError(f"journal {self.path}: its first line is not the settings header; "
                                     "use another output folder, or delete the journal to start over") from None
                if number < len(lines):
                    warnings.warn(f"journal {self.path}: line {number} is damaged and skipped "
                                  "(its chunk will be computed again)", stacklevel=2)
                continue
            good.append(entry)
        if good:
            saved = good[0].get("settings", {})
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if changed:
                detail = "; ".join(f"{k}: journal {saved.get(k)!r}, now {settings.get(k)!r}" for k in changed[:4])
                raise ValueError(f"journal {self.path} was written with other settings ({detail}); "
                                 f"use another output folder, or delete the journal to start over")
            for entry in good[1:]:
                self.scores.update(entry["scores"])
                self.seconds += entry.get("seconds", 0.0)
        self._last = time.monotonic()
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if len(good) != len(lines) or not good:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(e) + "\n" for e in (good or [{"settings": settings}])))
                os.replace(tmp, self.path)

    def record(self, scores: dict[str, list[float]]) -> None:
        now = time.monotonic()
        seconds, self._last = round(now - self._last, 3), now
        self.scores.update(scores)
        self.seconds += seconds
        if self.writer:
            with open(self.path, "a") as f:
                f.write(json.dumps({"scores": scores, "seconds": seconds}) + "\n")
                f.flush()
                os.fsync(f.fileno())


@dataclass
class SearchResult:
    heads: list[Head]
    baseline: float
    rounds: list[dict] = field(default_factory=list)
    image_steps: int = 0  # cost of every evaluation the search needed (journaled or not)
    computed_image_steps: int = 0  # of those, computed in this run


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def search_heads(evaluate: Evaluate, pool: list[Head], rounds: int, top_k: int, full: Fidelity,
                 journal: Journal, chunk: int = 1, screen: Fidelity | None = None, keep: float = 0.25,
                 progress: bool = True) -> SearchResult:
    """Greedy head selection: ``rounds`` rounds adding ``top_k`` heads each from ``pool``.

    ``evaluate`` scores a list of candidates (at most ``chunk``) on items; with ``screen``, each round
    first scores all candidates at that fidelity and keeps the best ``keep`` fraction (at least
    ``top_k``) for the ``full`` scoring that ranks them. Ties go to the head earlier in ``pool``.
    """
    if rounds < 1 or top_k < 1:
        raise ValueError(f"rounds ({rounds}) and top_k ({top_k}) must be at least 1")
    if rounds * top_k > len(pool):
        raise ValueError(f"{rounds} rounds x top-k {top_k} = {rounds * top_k} heads, more than the pool's {len(pool)}")
    if screen is not None and not 0 < keep < 1:
        raise ValueError(f"keep {keep!r} must be a fraction in (0, 1)")
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from .distributed import process_state

    state = process_state()

    def kept(n):
        return min(n, max(top_k, math.ceil(keep * n)))

    total = full.cost(1)
    for r in range(rounds):
        n = len(pool) - r * top_k
        total += screen.cost(n) + full.cost(kept(n)) if screen else full.cost(n)
    bar = tqdm(total=total, unit="image-step", disable=not (progress and state.is_main_process),
               desc="head search", smoothing=0.1)
    result = SearchResult(heads=[], baseline=0.0)

    def scored(candidates: list[Candidate], fidelity: Fidelity) -> list[float]:
        keys = [fidelity.key(c) for c in candidates]
        chunks = [list(range(i, min(i + chunk, len(candidates)))) for i in range(0, len(candidates), chunk)]
        todo = [c for c in chunks if not all(keys[i] in journal.scores for i in c)]
        bar.update(fidelity.cost(len(candidates) - sum(len(c) for c in todo)))
        result.image_steps += fidelity.cost(len(candidates))
        for wave in range(0, len(todo), state.num_processes):
            mine = todo[wave:wave + state.num_processes]
            found = {}
            if state.process_index < len(mine):
                part = mine[state.process_index]
                scores = evaluate([candidates[i] for i in part], list(fidelity.items), fidelity.steps)
                found = {keys[i]: s for i, s in zip(part, scores)}
            if state.num_processes > 1:
                found = {k: v for d in gather_object([found]) for k, v in d.items()}
            journal.record(found)
            done = fidelity.cost(sum(len(c) for c in mine))
            result.computed_image_steps += done
            bar.update(done)
        return [_mean(journal.scores[k]) for k in keys]

    result.baseline = scored([()], full)[0]
    selected: list[Head] = []
    for r in range(rounds):
        heads = [h for h in pool if h not in selected]
        candidates = [tuple(sorted(selected + [h])) for h in heads]
        record = {"round": r}
        if screen is not None:
            cheap = scored(candidates, screen)
            record["screen_scores"] = {head_key(h): s for h, s in zip(heads, cheap)}
            order = sorted(range(len(heads)), key=lambda i: -cheap[i])[:kept(len(heads))]
            heads, candidates = [heads[i] for i in sorted(order)], [candidates[i] for i in sorted(order)]
        scores = scored(candidates, full)
        best = sorted(range(len(heads)), key=lambda i: -scores[i])[:top_k]
        selected += [heads[i] for i in best]
        record.update(selected=[head_key(heads[i]) for i in best], score=scores[best[0]],
                      gain=paired_difference(journal.scores[full.key(())], journal.scores[full.key(candidates[best[0]])],
                                             [prompt for prompt, _ in full.items]),
                      scores={head_key(h): s for h, s in zip(heads, scores)})
        result.rounds.append(record)
    bar.close()
    result.heads = selected
    return result

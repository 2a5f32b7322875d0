"""The greedy head search against a direct implementation of Algorithm 1, its cost rules and its journal."""

import json
import math
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from attnsteer.guidance.head_search import Fidelity, Journal, candidate_key, search_heads

POOL = [(layer, h) for layer in ("a", "b", "c") for h in range(3)]
ITEMS = tuple((f"prompt {i}", i) for i in range(4))


class Objective:
    """A made-up score of a head set: per-head values, pair bonuses (heads weak alone that complement
    others), and a per-item offset; records every evaluation it is asked for."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.value = {h: float(v) for h, v in zip(POOL, rng.normal(size=len(POOL)))}
        self.bonus = {frozenset(rng.choice(len(POOL), 2, replace=False)): 1.5 for _ in range(3)}
        self.calls = []

    def set_score(self, candidate):
        s = sum(self.value[h] for h in candidate)
        idx = {POOL.index(h) for h in candidate}
        return s + sum(b for pair, b in self.bonus.items() if pair <= idx)

    def __call__(self, candidates, items, steps):
        self.calls.append((list(candidates), len(items), steps))
        return [[self.set_score(c) + 0.01 * seed for _, seed in items] for c in candidates]


def reference_greedy(objective, rounds, top_k):
    """Algorithm 1 as written: score S + {h} for every h in the pool, add the top k, repeat."""
    selected = []
    for _ in range(rounds):
        pool = [h for h in POOL if h not in selected]
        scores = [objective.set_score(tuple(sorted(selected + [h]))) for h in pool]
        best = sorted(range(len(pool)), key=lambda i: -scores[i])[:top_k]
        selected += [pool[i] for i in best]
    return selected


def journal(tmp_path, name="j.jsonl", **settings):
    return Journal(tmp_path / name, {"test": 1, **settings})


@pytest.mark.parametrize("seed,rounds,top_k,chunk", [(0, 3, 1, 1), (1, 2, 2, 3), (2, 4, 2, 4), (3, 1, 3, 2)])
def test_greedy_equals_algorithm_1(tmp_path, seed, rounds, top_k, chunk):
    objective = Objective(seed)
    result = search_heads(objective, POOL, rounds, top_k, Fidelity("full", ITEMS, 5), journal(tmp_path), chunk,
                          progress=False)
    assert result.heads == reference_greedy(objective, rounds, top_k)
    assert [r["selected"] for r in result.rounds] == [
        [f"{h[0]}:{h[1]}" for h in result.heads[r * top_k:(r + 1) * top_k]] for r in range(rounds)]
    evaluated = [candidate_key(c) for cands, _, _ in objective.calls for c in cands]
    assert len(evaluated) == len(set(evaluated)), "a candidate was scored twice"
    assert len(evaluated) == 1 + sum(len(POOL) - r * top_k for r in range(rounds))  # + the empty baseline
    assert all(len(cands) <= chunk for cands, _, _ in objective.calls)
    # round r scores only S + {h} with h new: selected heads are never scored again on their own
    sizes = sorted({len(c) for cands, _, _ in objective.calls for c in cands})
    assert sizes == [0] + [r * top_k + 1 for r in range(rounds)]
    assert result.image_steps == result.computed_image_steps == len(evaluated) * len(ITEMS) * 5
    # the best candidate's gain, paired by item: every item moves by the same amount, so no spread
    for record in result.rounds:
        gain = record["gain"]
        assert gain["diff"] == pytest.approx(record["score"] - result.baseline)
        assert gain["low"] == pytest.approx(gain["diff"]) and gain["high"] == pytest.approx(gain["diff"])
        assert (gain["n"], gain["groups"]) == (len(ITEMS), len(ITEMS))


def test_a_head_weak_alone_wins_a_later_round(tmp_path):
    objective = Objective(0)
    objective.value = {h: 0.0 for h in POOL}
    objective.value[("a", 0)], objective.value[("c", 2)] = 1.0, -0.5
    objective.bonus = {frozenset({POOL.index(("a", 0)), POOL.index(("c", 2))}): 2.0}
    result = search_heads(objective, POOL, 2, 1, Fidelity("full", ITEMS, 1), journal(tmp_path), progress=False)
    assert result.heads == [("a", 0), ("c", 2)]
    assert result.rounds[0]["scores"]["c:2"] < result.rounds[0]["scores"]["b:0"]


def test_successive_halving_screens_all_and_rescores_the_best_fraction(tmp_path):
    objective = Objective(4)
    full, screen = Fidelity("full", ITEMS, 8), Fidelity("screen", ITEMS[:2], 2)
    result = search_heads(objective, POOL, 2, 2, full, journal(tmp_path), chunk=3, screen=screen, keep=0.25,
                          progress=False)
    # the screen ranks like the full score here, so the selection is plain Algorithm 1's
    assert result.heads == reference_greedy(objective, 2, 2)
    by_fidelity = {}
    for cands, n_items, steps in objective.calls:
        by_fidelity.setdefault((n_items, steps), []).extend(cands)
    assert len(by_fidelity[(2, 2)]) == 9 + 7  # every candidate of both rounds screened
    assert len(by_fidelity[(4, 8)]) == 1 + math.ceil(0.25 * 9) + 2  # baseline + kept: ceil(9/4)=3, max(2, ceil(7/4))=2
    assert set(result.rounds[0]["scores"]) < set(result.rounds[0]["screen_scores"])
    plain = (1 + 9 + 7) * 4 * 8
    assert result.image_steps == (9 + 7) * 2 * 2 + (1 + 3 + 2) * 4 * 8 < plain


def test_bad_settings_are_refused_before_any_evaluation(tmp_path):
    objective = Objective()
    with pytest.raises(ValueError, match=r"4 rounds x top-k 3 = 12 heads, more than the pool's 9"):
        search_heads(objective, POOL, 4, 3, Fidelity("full", ITEMS, 1), journal(tmp_path), progress=False)
    with pytest.raises(ValueError, match="keep 1.5 must be a fraction"):
        search_heads(objective, POOL, 1, 1, Fidelity("full", ITEMS, 2), journal(tmp_path), screen=Fidelity("screen", ITEMS, 1),
                     keep=1.5, progress=False)
    assert objective.calls == []


def test_interrupted_search_resumes_without_redoing_work(tmp_path):
    objective = Objective(5)
    full = Fidelity("full", ITEMS, 3)
    clean = search_heads(objective, POOL, 3, 1, full, journal(tmp_path, "clean.jsonl"), chunk=2, progress=False)

    class Killed(Exception):
        pass

    calls = []

    def dies_after_four(candidates, items, steps):
        if len(calls) == 4:
            raise Killed
        calls.append(candidates)
        return objective(candidates, items, steps)

    with pytest.raises(Killed):
        search_heads(dies_after_four, POOL, 3, 1, full, journal(tmp_path), chunk=2, progress=False)
    resumed_calls = []

    def counting(candidates, items, steps):
        resumed_calls.append(candidates)
        return objective(candidates, items, steps)

    resumed = search_heads(counting, POOL, 3, 1, full, journal(tmp_path), chunk=2, progress=False)
    assert resumed.heads == clean.heads and resumed.rounds == clean.rounds
    done = {candidate_key(c) for cands in calls for c in cands}
    assert not done & {candidate_key(c) for cands in resumed_calls for c in cands}
    assert resumed.computed_image_steps == clean.image_steps - len(done) * len(ITEMS) * 3


def test_journal_drops_a_cut_line_and_refuses_other_settings(tmp_path):
    j = Journal(tmp_path / "j.jsonl", {"w": 3.0, "steps": 20})
    j.record({"full|a:0": [1.0, 2.0]})
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"scores": {"full|a:1": [0.5')  # killed mid-write
    again = Journal(tmp_path / "j.jsonl", {"w": 3.0, "steps": 20})
    assert again.scores == {"full|a:0": [1.0, 2.0]}
    again.record({"full|a:1": [0.0]})
    lines = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert lines[0] == {"settings": {"w": 3.0, "steps": 20}} and len(lines) == 3
    with pytest.raises(ValueError, match=r"other settings \(w: journal 3.0, now 5.0\)"):
        Journal(tmp_path / "j.jsonl", {"w": 5.0, "steps": 20})


def test_journal_skips_a_damaged_middle_line_and_keeps_the_lines_after_it(tmp_path):
    j = Journal(tmp_path / "j.jsonl", {"w": 3.0})
    j.record({"full|a:0": [1.0]})
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"scores": {"full|a:1": [0.5\n')  # damaged, e.g. by a disk error
    j.record({"full|a:2": [2.0]})
    with pytest.warns(UserWarning, match=r"j.jsonl: line 3 is damaged and skipped \(its chunk will be computed again\)"):
        again = Journal(tmp_path / "j.jsonl", {"w": 3.0})
    assert again.scores == {"full|a:0": [1.0], "full|a:2": [2.0]}
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 3  # rewritten without the damaged line
    assert again.seconds == pytest.approx(sum(json.loads(line).get("seconds", 0) for line in
                                              (tmp_path / "j.jsonl").read_text().splitlines()))
    (tmp_path / "k.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"k.jsonl: its first line is not the settings header"):
        Journal(tmp_path / "k.jsonl", {"w": 3.0})


def slow_search(path):
    """The search of the kill test: slow enough per chunk to be killed between journal lines."""
    objective = Objective(7)

    def slow(candidates, items, steps):
        time.sleep(0.02)
        return objective(candidates, items, steps)

    return search_heads(slow, POOL, 3, 2, Fidelity("full", ITEMS, 3), Journal(path, {"s": 1}), chunk=1,
                        screen=Fidelity("screen", ITEMS[:1], 3), keep=0.5, progress=False)


def test_sigkill_at_any_point_then_rerun_gives_the_same_heads(tmp_path):
    """Killed in forked processes (no torch import each: the search itself is plain Python), the clean
    and resumed runs in this one."""
    clean = slow_search(tmp_path / "clean.jsonl")
    killed = tmp_path / "killed.jsonl"
    for lines_before_kill in (3, 11, 17):
        proc = multiprocessing.get_context("fork").Process(target=slow_search, args=(killed,))
        proc.start()
        while not killed.exists() or len(killed.read_text().splitlines()) < lines_before_kill:
            assert proc.is_alive(), "the search ended before it could be killed"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    resumed = slow_search(killed)
    assert resumed.heads == clean.heads
    assert 0 < resumed.computed_image_steps < clean.computed_image_steps

"""Tasks with known answers, for the two measurements a self-play run cannot make on its own labels:

- the reference-reward control (`loop.mode: reference`, RLVR): the executor trains against true answers,
  so "does the learner learn on this setup?" has an answer before (or beside) a self-play run;
- pseudo-label accuracy (`verifier.probes`): known-answer probes go through solve-and-vote like proposed
  tasks, and the verifier's majority label is checked against the truth ("how good are the pseudo-labels?";
  R-Zero, arXiv:2508.05004, measures the same thing with an external grader).

The tasks come from the generator on a training split (`reference.seed`, never the evaluation seed 0) or
from a dataset read with `selfplay eval`'s field mapping; questions that are evaluation items are removed,
and a stable share of the rest is set aside as probes, so no probe is ever trained on. Pure functions.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from selfplay.config import ReferenceConfig, RunConfig
from selfplay.evaluation.benchmarks import (GENERATED, GENERATED_SIZE, BenchmarkError, BenchmarkItem, generate_benchmark,
                                            items_from_rows, load_benchmark)
from selfplay.evaluation.stats import wilson_interval


def _norm(question: str) -> str:
    return " ".join(question.lower().split())


@dataclass
class KnownTasks:
    """Known-answer tasks split in two disjoint parts; `excluded` counts tasks dropped as evaluation items."""

    train: list[BenchmarkItem]
    probes: list[BenchmarkItem]
    source: str
    excluded: int = 0
    duplicates: int = 0


def is_probe(question: str, share: float) -> bool:
    """Stable assignment of a question to the probe side (a hash, so it does not depend on order or size)."""
    h = int.from_bytes(hashlib.sha1(_norm(question).encode()).digest()[:8], "big")
    return h / 2**64 < share


def split_known(items: Iterable[BenchmarkItem], exclude: Iterable[str], probe_share: float,
                source: str = "") -> KnownTasks:
    """Drop evaluation questions and repeats, then split into training tasks and probes."""
    banned = {_norm(q) for q in exclude}
    seen: set[str] = set()
    out = KnownTasks([], [], source)
    for it in items:
        key = _norm(it.question)
        if key in banned:
            out.excluded += 1
            continue
        if key in seen:
            out.duplicates += 1
            continue
        seen.add(key)
        (out.probes if is_probe(it.question, probe_share) else out.train).append(it)
    return out


def reference_items(ref: ReferenceConfig) -> list[BenchmarkItem]:
    """The configured source's items (generated: `ref.size` items of seed `ref.seed`)."""
    if ref.source == GENERATED:
        rows = generate_benchmark(ref.size, seed=ref.seed, kinds=ref.kinds or None, levels=ref.levels or None)
        return items_from_rows(rows, {"id": "id", "question": "question", "answer": "answer"}, f"{GENERATED}(train)")
    bench = load_benchmark(ref.source, fields=ref.fields, split=ref.split)
    if bench.check != "math":
        raise BenchmarkError(f"reference.source {ref.source}: reference tasks need answers (a math set), "
                             f"not {bench.check} items")
    return bench.items


def evaluation_questions(cfg: RunConfig) -> list[str]:
    """Questions a run evaluates on: the default generated benchmark, and `eval.benchmark` in reference mode
    (only training must avoid them: a self-play run's probes are never trained on, so it does not load a
    possibly remote benchmark just for them)."""
    questions = [r["question"] for r in generate_benchmark(GENERATED_SIZE, seed=0)]
    if cfg.eval.benchmark and cfg.loop.mode == "reference":
        bench = load_benchmark(cfg.eval.benchmark, fields=cfg.eval.fields, limit=cfg.eval.limit)
        questions += [it.question for it in bench.items]
    return questions


def known_tasks(cfg: RunConfig) -> KnownTasks:
    """The run's known-answer tasks: training side (reference mode) and probe side (verifier.probes)."""
    ref = cfg.reference
    held_out = evaluation_questions(cfg)  # first: a missing evaluation set fails before any generation
    known = split_known(reference_items(ref), held_out, ref.probe_share, ref.source)
    if cfg.loop.mode == "reference" and not known.train:
        raise BenchmarkError(f"reference.source {ref.source}: no training task left after removing "
                             f"{known.excluded} evaluation items and {len(known.probes)} probes")
    if cfg.verifier.probes and not known.probes:
        raise BenchmarkError(f"reference.source {ref.source}: no probe task (verifier.probes={cfg.verifier.probes}); "
                             "raise reference.probe_share or reference.size, or set verifier.probes=0")
    return known


def pick(items: Sequence[BenchmarkItem], n: int, seed: int) -> list[BenchmarkItem]:
    """n items drawn without replacement (all of them when there are fewer), seeded."""
    return random.Random(seed).sample(list(items), min(n, len(items)))


# ------------------------------------------------------------------------------- pseudo-label accuracy

@dataclass(frozen=True)
class ProbeOutcome:
    """One probe after solve-and-vote: the vote's p_hat, whether its majority label equals the truth, and
    how many of its k samples were right against the truth."""

    p_hat: float
    label_correct: bool
    samples_correct: int
    samples: int


def label_correct(agrees: Sequence[bool], correct: Sequence[bool | None]) -> bool:
    """The majority label is right when a sample of the majority class matched the truth (members of one
    class are equivalent answers). No majority (no sample answered) counts as wrong."""
    return any(a and bool(c) for a, c in zip(agrees, correct))


def bucket_edges(band_low: float, band_high: float) -> list[tuple[float, float]]:
    """p_hat buckets for label accuracy: below the acceptance band, inside it, above it."""
    edges = [(0.0, band_low), (band_low, band_high), (band_high, 1.0)]
    return [(lo, hi) for lo, hi in edges if hi > lo or (lo, hi) == (band_low, band_high)]


def bucket_name(lo: float, hi: float) -> str:
    return f"p_hat_{lo:g}-{hi:g}"


def in_bucket(p_hat: float, lo: float, hi: float, band: tuple[float, float]) -> bool:
    """Band bucket inclusive at both ends (as admission is); outer buckets exclusive at the band's side."""
    if (lo, hi) == band:
        return lo <= p_hat <= hi
    return lo <= p_hat < hi if hi == band[0] else lo < p_hat <= hi


def probe_metrics(outcomes: Sequence[ProbeOutcome], band_low: float, band_high: float) -> dict[str, float]:
    """`verifier/label_accuracy` (+ Wilson `_ci95_lo/_hi`), the same per p_hat bucket (only buckets with
    probes), `verifier/probes`, `verifier/probe_executor_accuracy` (samples right against the truth)."""
    n = len(outcomes)
    out = {"verifier/probes": float(n)}
    if not n:
        return out
    right = sum(o.label_correct for o in outcomes)
    out["verifier/label_accuracy"] = right / n
    out["verifier/label_accuracy_ci95_lo"], out["verifier/label_accuracy_ci95_hi"] = wilson_interval(right, n)
    samples = sum(o.samples for o in outcomes)
    out["verifier/probe_executor_accuracy"] = sum(o.samples_correct for o in outcomes) / samples if samples else 0.0
    band = (band_low, band_high)
    for lo, hi in bucket_edges(band_low, band_high):
        inside = [o for o in outcomes if in_bucket(o.p_hat, lo, hi, band)]
        if inside:
            out[f"verifier/label_accuracy/{bucket_name(lo, hi)}"] = sum(o.label_correct for o in inside) / len(inside)
    return out

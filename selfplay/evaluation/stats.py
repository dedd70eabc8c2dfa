"""Intervals for the rates evaluation reports, and the paired comparison of two evaluations (pure functions).

- A rate gets a Wilson score interval (Wilson 1927, "Probable inference, the law of succession, and
  statistical inference", JASA 22): unlike the normal ("Wald") interval it stays inside [0, 1] and keeps
  close to its nominal coverage at the small counts and extreme rates small models produce (Brown, Cai &
  DasGupta 2001, "Interval estimation for a binomial proportion", Statistical Science 16).
- Two evaluations of the same items are compared item by item (paired): the difference of the per-item
  scores with a paired bootstrap percentile interval over items (Efron & Tibshirani 1993, "An Introduction to
  the Bootstrap", ch. 13), and, when every item has one sample, McNemar's exact test on the discordant items
  (McNemar 1947, Psychometrika 12; the exact form is a two-sided binomial test with p = 1/2).
Pairing matters: two models answering the same 200 items are strongly correlated, and an unpaired interval
would hide a real difference of a few items behind the spread of item difficulty.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate `successes / n`. `successes` may be fractional (a mean of
    per-item scores times the item count); n = 0 gives the uninformative (0, 1)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes} n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # the exact ends at 0 and n (rounding would leave 1e-17 / 0.9999999999999999)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (items only A got right, only B got right):
    a binomial test of min(a_only, b_only) against Binomial(a_only + b_only, 1/2), doubled, capped at 1."""
    if a_only < 0 or b_only < 0:
        raise ValueError("discordant counts must be >= 0")
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """B minus A on the items both evaluated."""

    n_items: int
    a_mean: float
    b_mean: float
    diff: float  # b_mean - a_mean
    ci95_lo: float
    ci95_hi: float
    b_better: int  # items where B scored higher than A
    a_better: int
    mcnemar_p: float | None  # only when both score every item 0 or 1 (one sample per item)
    only_in_a: int  # items present in one file only (not compared)
    only_in_b: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci95_lo > 0 or self.ci95_hi < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_bootstrap_interval(diffs: Sequence[float], resamples: int = 10_000, seed: int = 0,
                              level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of per-item differences, resampling items with replacement."""
    n = len(diffs)
    if n == 0:
        raise ValueError("no paired items to compare")
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    alpha = (1 - level) / 2
    lo = means[int(math.floor(alpha * (resamples - 1)))]
    hi = means[int(math.ceil((1 - alpha) * (resamples - 1)))]
    return lo, hi


def compare_paired(a: Mapping[str, float], b: Mapping[str, float], resamples: int = 10_000,
                   seed: int = 0) -> PairedComparison:
    """Compare per-item scores (question id -> share of correct samples) of two evaluations on their
    common items: difference B - A, its paired bootstrap 95% interval, wins each way, and McNemar's exact
    p-value when every score is 0 or 1."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two evaluations share no item (different benchmarks, or different --limit?)")
    diffs = [float(b[q]) - float(a[q]) for q in common]
    lo, hi = paired_bootstrap_interval(diffs, resamples=resamples, seed=seed)
    binary = all(float(x[q]) in (0.0, 1.0) for x in (a, b) for q in common)
    b_better = sum(d > 0 for d in diffs)
    a_better = sum(d < 0 for d in diffs)
    n = len(common)
    return PairedComparison(
        n_items=n, a_mean=sum(float(a[q]) for q in common) / n, b_mean=sum(float(b[q]) for q in common) / n,
        diff=sum(diffs) / n, ci95_lo=lo, ci95_hi=hi, b_better=b_better, a_better=a_better,
        mcnemar_p=mcnemar_exact_p(a_better, b_better) if binary else None,
        only_in_a=len(set(a) - set(b)), only_in_b=len(set(b) - set(a)))


def per_item_scores(records: Sequence[Mapping]) -> dict[str, float]:
    """question id -> share of its samples that were correct (the per-item pass@1)."""
    totals: dict[str, list[int]] = {}
    for r in records:
        t = totals.setdefault(str(r["question_id"]), [0, 0])
        t[0] += bool(r["correct"])
        t[1] += 1
    return {q: c / n for q, (c, n) in totals.items()}

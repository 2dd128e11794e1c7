"""The paper's claims as paired comparisons of two sweep variants: difference in SumR by seed,
a bootstrap 95% confidence interval over seeds, and a verdict.

Pure functions of the per-seed scores, so the statistics are tested on hand-made numbers.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

HOLDS, REVERSED, NOT_SEPARABLE = "holds", "reversed", "not separable at this power"


@dataclass(frozen=True)
class ClaimResult:
    name: str
    better: str
    worse: str
    seeds: tuple[str, ...]          # the seeds both variants have, in order
    diffs: tuple[float, ...]        # better - worse, per seed
    mean: float
    low: float                      # bootstrap 95% CI of the mean difference
    high: float
    verdict: str
    series: str = ""


def paired_diffs(better: dict[str, float], worse: dict[str, float]
                 ) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Per-seed differences over the seeds both sides ran (seed -> score)."""
    seeds = tuple(sorted(set(better) & set(worse), key=lambda s: (len(s), s)))
    return seeds, tuple(better[s] - worse[s] for s in seeds)


def bootstrap_ci(diffs: tuple[float, ...] | list[float], draws: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: resample the seeds with replacement ``draws`` times."""
    if not diffs:
        raise ValueError("a bootstrap needs at least one paired difference")
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(draws))
    tail = (1.0 - level) / 2
    return means[int(tail * (draws - 1))], means[int(round((1 - tail) * (draws - 1)))]


def verdict(low: float, high: float) -> str:
    """Holds when the whole CI is above 0, reversed when below, else not separable."""
    if low > 0:
        return HOLDS
    if high < 0:
        return REVERSED
    return NOT_SEPARABLE


def evaluate_claim(name: str, better: str, worse: str, scores: dict[str, dict[str, float]],
               series: str = "") -> ClaimResult | None:
    """The claim "``better`` beats ``worse``" on ``scores`` (variant -> seed -> SumR); None
    when the two variants share no seed."""
    seeds, diffs = paired_diffs(scores.get(better, {}), scores.get(worse, {}))
    if not diffs:
        return None
    low, high = bootstrap_ci(diffs)
    return ClaimResult(name, better, worse, seeds, diffs, statistics.fmean(diffs), low, high,
                       verdict(low, high), series)

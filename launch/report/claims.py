"""The paper's claims as paired comparisons of two sweep variants: difference in SumR by seed,
its 95% confidence interval over seeds, a verdict, and the seeds a sharper answer needs.

The interval is Student's t on the paired differences (mean +- t * sd / sqrt(n)): with 5 to 20
seeds a percentile bootstrap is too narrow (it resamples a handful of values), and the t
interval's half-width is what the power planner solves for. Pure functions of the per-seed
scores, so the statistics are tested on hand-made numbers.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

HOLDS, REVERSED = "holds", "reversed"
LEVEL = 0.95
# The difference a claim's interval should resolve (SumR points), unless the report is told.
RESOLVE_SUMR = 2.0
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class ClaimResult:
    name: str
    better: str
    worse: str
    seeds: tuple[str, ...]          # the seeds both variants have, in order
    diffs: tuple[float, ...]        # better - worse, per seed
    mean: float
    low: float                      # t 95% CI of the mean difference (NaN for one seed)
    high: float
    verdict: str
    series: str = ""

    @property
    def sd(self) -> float:
        """Sample standard deviation of the paired differences (NaN for one seed)."""
        return statistics.stdev(self.diffs) if len(self.diffs) > 1 else math.nan

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def seeds_needed(self, resolve: float = RESOLVE_SUMR) -> int | None:
        """Paired seeds for a 95% CI half-width of at most ``resolve``, at this spread."""
        return seeds_needed(self.sd, resolve)


def paired_diffs(better: dict[str, float], worse: dict[str, float]
                 ) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Per-seed differences over the seeds both sides ran (seed -> score)."""
    seeds = tuple(sorted(set(better) & set(worse), key=lambda s: (len(s), s)))
    return seeds, tuple(better[s] - worse[s] for s in seeds)


def t_quantile(n: int, level: float = LEVEL) -> float:
    """Two-sided Student t quantile for the mean of ``n`` paired differences (n - 1 dof)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1))


def t_interval(diffs: tuple[float, ...] | list[float], level: float = LEVEL
               ) -> tuple[float, float]:
    """Student t CI of the mean difference; NaN bounds for one difference (no spread)."""
    if not diffs:
        raise ValueError("a confidence interval needs at least one paired difference")
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return math.nan, math.nan
    half = t_quantile(len(diffs), level) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean - half, mean + half


def seeds_needed(sd: float, resolve: float = RESOLVE_SUMR, level: float = LEVEL) -> int | None:
    """The fewest paired seeds n >= 2 with t(n - 1) * sd / sqrt(n) <= ``resolve``: the run
    count whose CI half-width is ``resolve`` if the paired spread stays ``sd``. None when the
    spread is unknown (one seed) or more than MAX_SEEDS would be needed."""
    if not resolve > 0:
        raise ValueError(f"the difference to resolve must be > 0, got {resolve}")
    if not math.isfinite(sd):
        return None
    n = max(2, math.ceil((1.96 * sd / resolve) ** 2))   # the normal answer is a lower bound
    while n <= MAX_SEEDS:
        if t_quantile(n, level) * sd / math.sqrt(n) <= resolve:
            return n
        n += 1
    return None


def verdict(low: float, high: float) -> str:
    """Holds when the whole CI is above 0, reversed when below; otherwise the data rule out
    only a difference larger than the CI's farther end."""
    if low > 0:
        return HOLDS
    if high < 0:
        return REVERSED
    if not (math.isfinite(low) and math.isfinite(high)):
        return "one seed: no interval"
    return f"no difference larger than {math.ceil(max(-low, high) * 10) / 10:.1f}"


def evaluate_claim(name: str, better: str, worse: str, scores: dict[str, dict[str, float]],
                   series: str = "") -> ClaimResult | None:
    """The claim "``better`` beats ``worse``" on ``scores`` (variant -> seed -> SumR); None
    when the two variants share no seed."""
    seeds, diffs = paired_diffs(scores.get(better, {}), scores.get(worse, {}))
    if not diffs:
        return None
    low, high = t_interval(diffs)
    return ClaimResult(name, better, worse, seeds, diffs, statistics.fmean(diffs), low, high,
                       verdict(low, high), series)

"""Paired claims: per-seed differences, bootstrap CI and verdicts on hand-made runs."""
import statistics

import pytest

from launch.report.claims import (HOLDS, NOT_SEPARABLE, REVERSED, bootstrap_ci, evaluate_claim,
                           paired_diffs)


def scores(**variants):
    return {v: {str(seed): x for seed, x in enumerate(xs, 1)} for v, xs in variants.items()}


def test_pairs_by_seed_over_common_seeds_only():
    seeds, diffs = paired_diffs({"1": 10.0, "2": 12.0, "3": 9.0}, {"2": 11.0, "3": 10.0, "4": 0.0})
    assert seeds == ("2", "3") and diffs == (1.0, -1.0)


def test_constant_difference_has_a_point_interval_and_holds():
    res = evaluate_claim("dual", "a", "b", scores(a=[10, 20, 30, 40, 50], b=[7, 17, 27, 37, 47]))
    assert res.diffs == (3.0,) * 5 and (res.mean, res.low, res.high) == (3.0, 3.0, 3.0)
    assert res.verdict == HOLDS


def test_reversed_and_not_separable():
    rev = evaluate_claim("x", "a", "b", scores(a=[1, 2, 3, 4, 5], b=[4, 6, 8, 6, 7]))
    assert rev.diffs == (-3.0, -4.0, -5.0, -2.0, -2.0) and rev.verdict == REVERSED
    assert rev.high < 0
    mixed = evaluate_claim("y", "a", "b", scores(a=[1, 0, 2, 0, 0], b=[0, 1, 0, 2, 0]))
    assert mixed.diffs == (1.0, -1.0, 2.0, -2.0, 0.0) and mixed.verdict == NOT_SEPARABLE
    assert mixed.low < 0 < mixed.high


def test_bootstrap_ci_matches_the_exact_distribution_of_two_seeds():
    """Two seeds with diffs 0 and 10: a resampled mean is 0, 5 or 10 with probability
    1/4, 1/2, 1/4, so the 95% percentile interval is [0, 10], and [5, 5] at 40%."""
    assert bootstrap_ci([0.0, 10.0]) == (0.0, 10.0)
    assert bootstrap_ci([0.0, 10.0], level=0.4) == (5.0, 5.0)
    low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 10.0])
    assert 1.0 <= low < statistics.fmean([1, 2, 3, 4, 10]) < high <= 10.0


def test_no_common_seed_is_no_result_and_empty_is_an_error():
    assert evaluate_claim("z", "a", "b", {"a": {"1": 1.0}, "b": {"2": 1.0}}) is None
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])

"""Paired claims: per-seed differences, the t interval, verdicts and the power planner, on
hand-made runs whose answers are known in closed form."""
import math

import pytest

from launch.report.claims import (HOLDS, REVERSED, evaluate_claim, paired_diffs, seeds_needed,
                                  t_interval, t_quantile)


def scores(**variants):
    return {v: {str(seed): x for seed, x in enumerate(xs, 1)} for v, xs in variants.items()}


def test_pairs_by_seed_over_common_seeds_only():
    seeds, diffs = paired_diffs({"1": 10.0, "2": 12.0, "3": 9.0}, {"2": 11.0, "3": 10.0, "4": 0.0})
    assert seeds == ("2", "3") and diffs == (1.0, -1.0)


def test_constant_difference_has_a_point_interval_and_holds():
    res = evaluate_claim("dual", "a", "b", scores(a=[10, 20, 30, 40, 50], b=[7, 17, 27, 37, 47]))
    assert res.diffs == (3.0,) * 5 and (res.mean, res.low, res.high) == (3.0, 3.0, 3.0)
    assert res.verdict == HOLDS and res.sd == 0 and res.seeds_needed(2.0) == 2


def test_t_quantiles_are_the_table_values():
    # Student t, two-sided 95%: 12.706 (1 dof), 2.776 (4), 2.093 (19)
    assert t_quantile(2) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(5) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(20) == pytest.approx(2.0930, abs=1e-4)


def test_the_interval_is_mean_plus_minus_t_sd_over_root_n():
    """Diffs 1..5: mean 3, sd sqrt(2.5), half-width 2.7764 * sqrt(2.5) / sqrt(5) = 1.9632."""
    low, high = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (low, high) == pytest.approx((3 - 1.96324, 3 + 1.96324), abs=1e-4)
    res = evaluate_claim("x", "a", "b", scores(a=[1, 2, 3, 4, 5], b=[0] * 5))
    assert res.half_width == pytest.approx(1.96324, abs=1e-4) and res.verdict == HOLDS


def test_reversed_and_no_difference_larger_than_the_far_end():
    rev = evaluate_claim("x", "a", "b", scores(a=[1, 2, 3, 4, 5], b=[4, 6, 8, 6, 7]))
    assert rev.diffs == (-3.0, -4.0, -5.0, -2.0, -2.0) and rev.verdict == REVERSED
    assert rev.high < 0
    # diffs 1, -1, 2, -2, 0: mean 0, sd sqrt(2.5), CI [-1.963, +1.963] -> rounded up to 2.0
    mixed = evaluate_claim("y", "a", "b", scores(a=[1, 0, 2, 0, 0], b=[0, 1, 0, 2, 0]))
    assert mixed.diffs == (1.0, -1.0, 2.0, -2.0, 0.0)
    assert mixed.verdict == "no difference larger than 2.0"
    assert evaluate_claim("z", "a", "b", scores(a=[1.0], b=[0.0])).verdict == \
        "one seed: no interval"


def test_seeds_needed_solves_the_half_width_for_n():
    """sd 4, resolve 2: t(n-1) * 4 / sqrt(n) <= 2 first at n = 18 (t(16) = 2.1199 gives 2.0564
    at 17; t(17) = 2.1098 gives 1.9892 at 18). sd 2 reaches 2 at n = 7 (t(6) * 2 / sqrt(7) =
    1.8497; n = 6 gives 2.0989)."""
    assert seeds_needed(4.0, 2.0) == 18
    assert seeds_needed(2.0, 2.0) == 7
    for sd, resolve in ((4.0, 2.0), (2.0, 2.0), (7.3, 1.5), (0.5, 2.0)):
        n = seeds_needed(sd, resolve)
        assert t_quantile(n) * sd / math.sqrt(n) <= resolve
        assert n == 2 or t_quantile(n - 1) * sd / math.sqrt(n - 1) > resolve
    assert seeds_needed(float("nan")) is None and seeds_needed(1e6, 0.1) is None
    with pytest.raises(ValueError, match="must be > 0"):
        seeds_needed(1.0, 0.0)


def test_a_claim_plans_from_its_own_spread():
    """Five paired seeds with sd 4 (diffs 3 +- (4, 0, -4, ...)): the report asks for 18 seeds to
    resolve 2 SumR and for 5 to resolve its own half-width."""
    diffs = [3 + 4 * x for x in (-1.0, 0.0, 1.0, 0.5, -0.5)]
    res = evaluate_claim("c", "a", "b", scores(a=diffs, b=[0.0] * 5))
    assert res.sd == pytest.approx(4 * math.sqrt(0.625))
    assert res.seeds_needed(2.0) == seeds_needed(res.sd, 2.0)
    assert res.seeds_needed(res.half_width + 1e-9) <= 5


def test_no_common_seed_is_no_result_and_empty_is_an_error():
    assert evaluate_claim("z", "a", "b", {"a": {"1": 1.0}, "b": {"2": 1.0}}) is None
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])

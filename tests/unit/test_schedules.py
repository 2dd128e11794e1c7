"""SPEC 6 schedules: check values and the named KD weights."""
import math

import pytest

from trainer.schedules import KD_SCHEDULES, kd_weight, soft_alpha, soft_beta


@pytest.mark.parametrize("epoch, alpha, beta", [
    (0, 0.799, 0.799), (40, 0.675, 0.675), (50, 0.486, 0.500), (80, 0.028, 0.500)])
def test_soft_target_check_values(epoch, alpha, beta):
    assert round(soft_alpha(epoch), 3) == alpha
    assert round(soft_beta(epoch), 3) == beta


def test_kd_weights_by_name():
    assert kd_weight(0) == pytest.approx(0.1)
    assert kd_weight(10, "exp_down") == pytest.approx(0.1 * 0.95 ** 10)
    assert kd_weight(30, "linear") == pytest.approx(0.7)
    assert kd_weight(200, "linear") == pytest.approx(0.05)
    assert kd_weight(8, "sigmoid") == pytest.approx(800 / (800 + math.exp(1.0)))
    assert kd_weight(0, "exp_up") == pytest.approx(0.001)
    assert kd_weight(1000, "exp_up") == pytest.approx(0.1)
    assert set(KD_SCHEDULES) == {"exp_down", "linear", "sigmoid", "exp_up"}


def test_beta_never_below_half_and_alpha_decreasing():
    alphas = [soft_alpha(e) for e in range(120)]
    assert all(a > b for a, b in zip(alphas, alphas[1:]))
    assert min(soft_beta(e) for e in range(120)) == 0.5


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="exp_down"):
        kd_weight(0, "cosine")

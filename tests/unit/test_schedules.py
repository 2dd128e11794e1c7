"""The schedules: check values, the 0.1 weight on every shape, constants from config, horizon."""
import math

import pytest

from trainer.config import LossConfig, load_config
from trainer.method.schedules import (KD_SHAPES, LossWeights, kd_weight, loss_weights, schedule_epoch,
                               soft_alpha, soft_beta)

PAPER = LossConfig()


def with_(**kw) -> LossConfig:
    return PAPER.model_copy(update=kw)


@pytest.mark.parametrize("epoch, alpha, beta", [
    (0, 0.799, 0.799), (40, 0.675, 0.675), (50, 0.486, 0.500), (80, 0.028, 0.500)])
def test_soft_target_check_values(epoch, alpha, beta):
    assert round(soft_alpha(epoch, PAPER), 3) == alpha
    assert round(soft_beta(epoch, PAPER), 3) == beta


def test_every_kd_shape_is_weighted_by_w():
    """lambda(e) = 0.1 * shape(e) for every named shape, as the reference's kl_intra_weight."""
    assert kd_weight(0, PAPER) == pytest.approx(0.1)
    assert kd_weight(10, with_(kd_schedule="exp_down")) == pytest.approx(0.1 * 0.95 ** 10)
    assert kd_weight(30, with_(kd_schedule="linear")) == pytest.approx(0.1 * 0.7)
    assert kd_weight(200, with_(kd_schedule="linear")) == pytest.approx(0.1 * 0.05)
    assert kd_weight(8, with_(kd_schedule="sigmoid")) == pytest.approx(
        0.1 * 800 / (800 + math.exp(1.0)))
    assert kd_weight(0, with_(kd_schedule="exp_up")) == pytest.approx(0.1 * 0.1 * 0.01)
    assert kd_weight(1000, with_(kd_schedule="exp_up")) == pytest.approx(0.1 * 0.1)
    assert kd_weight(10 ** 6, with_(kd_schedule="sigmoid")) == 0.0  # no overflow
    assert set(KD_SHAPES) == {"exp_down", "linear", "sigmoid", "exp_up"}


@pytest.mark.parametrize("epoch, expected", [
    (0, 1e-4), (1, 5e-4), (20, 0.01 * (1 - 0.95 ** 20)), (60, 0.01 * (1 - 0.95 ** 60)),
    (120, 0.01 * (1 - 0.95 ** 120))])
def test_exp_up_is_the_reference_decay_way_8(epoch, expected):
    """The reference's increasing schedule: lambda(e) = 0.01 clip(1 - 0.95^e, 0.01, 1), i.e.
    1e-4 at e=0, 6.4e-3 at e=20 and 1e-2 by e=120 (SPEC.md §6), not 10x that."""
    lam = kd_weight(epoch, with_(kd_schedule="exp_up"))
    assert lam == pytest.approx(expected, rel=1e-9)
    assert lam == pytest.approx(0.01 * min(max(1 - 0.95 ** epoch, 0.01), 1.0), rel=1e-9)


def test_exp_up_check_values():
    lam = {e: kd_weight(e, with_(kd_schedule="exp_up")) for e in (0, 20, 120)}
    assert lam[0] == pytest.approx(1e-4)
    assert round(lam[20], 4) == 0.0064 and lam[20] == pytest.approx(0.00642, abs=5e-6)
    assert 0.0099 < lam[120] <= 0.01


def test_constants_from_config_change_the_weights_as_the_formulas_say():
    assert kd_weight(4, with_(kd_weight=0.3, kd_exp_base=0.5)) == pytest.approx(0.3 * 0.5 ** 4)
    assert kd_weight(10, with_(kd_schedule="linear", kd_linear_slope=0.05)) == pytest.approx(0.05)
    assert kd_weight(10, with_(kd_schedule="linear", kd_linear_slope=0.2,
                               kd_linear_floor=0.3)) == pytest.approx(0.03)
    assert kd_weight(5, with_(kd_schedule="sigmoid", kd_sigmoid_k=100)) == pytest.approx(
        0.1 * 100 / (100 + math.exp(5.0)))
    assert kd_weight(0, with_(kd_schedule="exp_up", kd_exp_up_min=0.2)) == pytest.approx(0.002)
    c = with_(soft_sigma_k=10.0, soft_sigma_tau=2.0, soft_scale=0.6, soft_beta_floor=0.4)
    sigma = 10.0 / (10.0 + math.exp(6 / 2.0))
    assert soft_alpha(6, c) == pytest.approx(0.6 * sigma)
    assert soft_beta(6, c) == pytest.approx(max(0.6 * sigma, 0.4))
    # and from a YAML-style override to the weights the loss receives
    cfg = load_config(overrides=["loss.kd_weight=0.5", "loss.soft_scale=0.5"])
    w = loss_weights(cfg.loss, 0)
    assert w.kd == pytest.approx(0.5) and w.alpha == pytest.approx(0.5 * 800 / 801)


def test_beta_never_below_half_and_alpha_decreasing():
    alphas = [soft_alpha(e, PAPER) for e in range(120)]
    assert all(a > b for a, b in zip(alphas, alphas[1:]))
    assert min(soft_beta(e, PAPER) for e in range(120)) == 0.5


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="exp_down"):
        kd_weight(0, with_(kd_schedule="cosine"))


def test_loss_weights_switches():
    assert loss_weights(with_(kd="off"), 3) == LossWeights(
        kd=0.0, alpha=soft_alpha(3, PAPER), beta=soft_beta(3, PAPER), epoch=3.0)
    assert loss_weights(with_(kd="static", kd_static_weight=0.3), 3).kd == 0.3
    hard = loss_weights(with_(targets="hard"), 50)
    assert (hard.alpha, hard.beta) == (1.0, 1.0)
    assert loss_weights(PAPER, 3, inheritance=False).kd == 0.0  # exploration-only: no KD
    assert not loss_weights(with_(hard_negative_start_epoch=2), 1).hard_negatives
    assert loss_weights(with_(hard_negative_start_epoch=2), 2).hard_negatives
    assert loss_weights(PAPER, 0).as_dict() == {"lambda": 0.1, "alpha": soft_alpha(0, PAPER),
                                                "beta": soft_beta(0, PAPER),
                                                "hard_negatives": 1.0, "epoch": 0.0}


def test_horizon_maps_progress_onto_the_paper_schedule():
    # unset: the run's own epoch, whatever the step
    assert schedule_epoch(3, 999, 1000, PAPER) == 3.0
    # H = 120 over a 6-epoch run of 60 steps: step 30 (half way) is schedule epoch 60
    h = with_(schedule_epochs=120)
    assert schedule_epoch(3, 30, 60, h) == 60.0
    assert schedule_epoch(0, 0, 60, h) == 0.0
    assert schedule_epoch(5, 59, 60, h) == pytest.approx(118.0)
    # so a short run reaches the late-schedule values of a 120-epoch one
    late = loss_weights(h, 5, schedule_epoch(5, 59, 60, h))
    assert late.alpha == pytest.approx(soft_alpha(118, PAPER)) and late.beta == 0.5
    assert late.kd == pytest.approx(0.1 * 0.95 ** 118)

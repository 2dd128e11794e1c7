"""Epoch schedules of the method (docs/method.md): the KD weight lambda(e), the soft-target
alpha(e) and beta(e), and when hard negatives start.

Pure functions of the schedule epoch and the loss config. :func:`loss_weights` is the one place a
step's coefficients are chosen; the loss receives its result and logging and checkpoints record it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from trainer.config import LossConfig


def _exp_down(e: float, c: LossConfig) -> float:
    return c.kd_exp_base ** e


def _linear(e: float, c: LossConfig) -> float:
    return max(1.0 - c.kd_linear_slope * e, c.kd_linear_floor)


def _sigmoid(e: float, c: LossConfig) -> float:
    k = c.kd_sigmoid_k
    x = 100.0 * e / k
    return k / (k + math.exp(x)) if x < 700 else 0.0  # exp overflows past ~709


# The reference's increasing shape (DL-DKD decay_way 8) is clip(0.1 (1 - base^e), 0.001, 0.1):
# 0.1 * clip(1 - base^e, 0.01, 1), so its lambda(e) is kd_weight * 0.1 * clip(...) (SPEC.md §6).
EXP_UP_SCALE = 0.1


def _exp_up(e: float, c: LossConfig) -> float:
    return EXP_UP_SCALE * min(max(1.0 - c.kd_exp_base ** e, c.kd_exp_up_min), 1.0)


# lambda(e) = loss.kd_weight * shape(e), for every shape.
KD_SHAPES: dict[str, Callable[[float, "LossConfig"], float]] = {
    "exp_down": _exp_down,
    "linear": _linear,
    "sigmoid": _sigmoid,
    "exp_up": _exp_up,
}


def kd_weight(epoch: float, cfg: LossConfig) -> float:
    """lambda(e) = w * shape(e) of ``cfg.kd_schedule``."""
    try:
        shape = KD_SHAPES[cfg.kd_schedule]
    except KeyError:
        raise ValueError(f"unknown KD schedule {cfg.kd_schedule!r}; choose one of "
                         f"{sorted(KD_SHAPES)}") from None
    return cfg.kd_weight * shape(epoch, cfg)


def _sigma(epoch: float, cfg: LossConfig) -> float:
    x = epoch / cfg.soft_sigma_tau
    return cfg.soft_sigma_k / (cfg.soft_sigma_k + math.exp(x)) if x < 700 else 0.0


def soft_alpha(epoch: float, cfg: LossConfig) -> float:
    """alpha(e) = 0.8 sigma(e): the fraction of the batch that keeps hard targets."""
    return cfg.soft_scale * _sigma(epoch, cfg)


def soft_beta(epoch: float, cfg: LossConfig) -> float:
    """beta(e) = max(0.8 sigma(e), 0.5): the weight of the one-hot part of a soft target."""
    return max(cfg.soft_scale * _sigma(epoch, cfg), cfg.soft_beta_floor)


def schedule_epoch(epoch: int, step: int, total_steps: int, cfg: LossConfig) -> float:
    """The epoch the schedules are evaluated at.

    Without a horizon (``loss.schedule_epochs == 0``) it is the run's epoch, as in the paper;
    with a horizon H it is ``H * step / total_steps``, so the run's progress traverses the first
    H epochs of the paper's schedules whatever its own length.
    """
    if cfg.schedule_epochs <= 0:
        return float(epoch)
    return cfg.schedule_epochs * step / max(total_steps, 1)


@dataclass(frozen=True)
class LossWeights:
    """The coefficients of one step's loss: lambda, alpha, beta, and whether negatives are hard."""

    kd: float = 0.0
    alpha: float = 1.0        # 1 = every row keeps its hard target (plain InfoNCE)
    beta: float = 1.0
    hard_negatives: bool = True
    epoch: float = 0.0        # the schedule epoch they were evaluated at

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["lambda"] = out.pop("kd")
        out["hard_negatives"] = float(self.hard_negatives)
        return out


def loss_weights(cfg: LossConfig, epoch: int, schedule_at: float | None = None,
                 inheritance: bool = True) -> LossWeights:
    """The weights at training epoch ``epoch`` (schedules at ``schedule_at``, default ``epoch``).

    lambda is 0 when KD is off or there is no inheritance branch to distil into; alpha = beta = 1
    with hard targets. Hard negatives start at the real epoch ``hard_negative_start_epoch``.
    """
    e = float(epoch) if schedule_at is None else schedule_at
    lam = 0.0
    if inheritance and cfg.kd == "dynamic":
        lam = kd_weight(e, cfg)
    elif inheritance and cfg.kd == "static":
        lam = cfg.kd_static_weight
    alpha, beta = (soft_alpha(e, cfg), soft_beta(e, cfg)) if cfg.targets == "soft" else (1.0, 1.0)
    return LossWeights(kd=lam, alpha=alpha, beta=beta,
                       hard_negatives=epoch >= cfg.hard_negative_start_epoch, epoch=e)

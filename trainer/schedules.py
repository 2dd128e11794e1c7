"""Epoch schedules of SPEC 6, by name: the KD weight lambda(e) and the soft-target alpha(e), beta(e).

Pure functions of the epoch index; the trainer evaluates them once at the start of each (virtual)
epoch.
"""
from __future__ import annotations

import math
from typing import Callable


def _exp_down(e: int) -> float:
    return 0.1 * 0.95 ** e


def _linear(e: int) -> float:
    return max(1.0 - 0.01 * e, 0.05)


def _sigmoid(e: int, k: float = 800.0) -> float:
    return k / (k + math.exp(100.0 * e / k))


def _exp_up(e: int) -> float:
    return min(max(0.1 * (1.0 - 0.95 ** e), 0.001), 0.1)


KD_SCHEDULES: dict[str, Callable[[int], float]] = {
    "exp_down": _exp_down,
    "linear": _linear,
    "sigmoid": _sigmoid,
    "exp_up": _exp_up,
}


def kd_weight(epoch: int, name: str = "exp_down") -> float:
    """lambda(e): the weight of the KD term at epoch ``epoch``."""
    try:
        return KD_SCHEDULES[name](epoch)
    except KeyError:
        raise ValueError(f"unknown KD schedule {name!r}; choose one of {sorted(KD_SCHEDULES)}") from None


def _sigma(epoch: int) -> float:
    return 800.0 / (800.0 + math.exp(epoch / 8.0))


def soft_alpha(epoch: int) -> float:
    """alpha(e) = 0.8 sigma(e): the fraction of the batch that keeps hard targets."""
    return 0.8 * _sigma(epoch)


def soft_beta(epoch: int) -> float:
    """beta(e) = max(0.8 sigma(e), 0.5): the weight of the one-hot part of a soft target."""
    return max(0.8 * _sigma(epoch), 0.5)

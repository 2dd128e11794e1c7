"""The cheap checks of ``dldkd validate`` that ``train`` and ``sweep`` run before any work.

A run that would fail later for a reason validate already knows (no manifest, a batch larger
than the split, storage it cannot write, a tracking server that does not answer, teacher weights
that are not there) fails here, with validate's message, before the teacher, Ray or DeepSpeed
start. Shard hashes and sample decoding are left to ``dldkd validate`` and the reader (they read
the data). Every rank runs it under torchrun: each probe is cheap (a manifest read, a small file
written and deleted, one HTTP request), and no rank then waits in a collective on one that failed.
"""
from __future__ import annotations

from launch.validate.checks import check_steps
from launch.validate.data import (SPLITS, check_data_mode, check_readers, check_split,
                                  check_split_size, check_teacher_inputs)
from launch.validate.result import FAIL, Check
from launch.validate.stores import check_storage, check_tracking
from launch.validate.teacher import check_teacher_weights
from trainer.config import Config


class PreflightError(ValueError):
    """A check ``dldkd validate`` would fail; the message is validate's, naming the key."""


def preflight_checks(cfg: Config) -> list[Check]:
    """The checks, in validate's order, stopping at the first failure."""
    checks: list[Check] = []

    def failed(check: Check) -> bool:
        checks.append(check)
        return check.status == FAIL

    manifests = {}
    for split in SPLITS:
        check, manifests[split] = check_split(cfg, split)
        if failed(check):
            return checks
    train = manifests["train"]
    if train is not None:
        for check in (check_split_size, check_data_mode, check_readers, check_teacher_inputs):
            if failed(check(cfg, train)):
                return checks
    for run in (lambda: check_steps(cfg, train), lambda: check_storage(cfg),
                lambda: check_tracking(cfg), lambda: check_teacher_weights(cfg, offline=False)):
        if failed(run()):
            return checks
    return checks


def preflight(cfg: Config) -> None:
    """Raise :class:`PreflightError` with validate's message when a cheap check fails."""
    failed = [c for c in preflight_checks(cfg) if c.status == FAIL]
    if failed:
        c = failed[0]
        raise PreflightError(f"{c.message} (`dldkd validate` check {c.name!r}; nothing was "
                             "started)")

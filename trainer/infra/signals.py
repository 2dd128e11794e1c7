"""Stopping on SIGTERM/SIGINT with a checkpoint (preemption on Kubernetes and Ray)."""
from __future__ import annotations

import logging
import os
import signal
import threading

import torch

from trainer import dist

log = logging.getLogger("dldkd")


class Stopped(Exception):
    """The run stopped on SIGTERM/SIGINT after saving a checkpoint; the message says how to
    resume."""

    def __init__(self, signum: int, step: int, run_name: str):
        self.signum = int(signum)
        super().__init__(f"run {run_name} stopped by {signal.Signals(self.signum).name} at step "
                         f"{step} with a checkpoint saved; relaunch the same command (run.name="
                         f"{run_name}) to resume")


class StopOnSignals:
    """SIGTERM (what Kubernetes and Ray send on preemption) and SIGINT ask the loop to stop at
    its next log, evaluation or checkpoint step, where the ranks agree and save a checkpoint. A
    second signal, or ``grace_s`` seconds without reaching that point, ends the process at once.
    Handlers are installed only in the main thread (Ray Train workers run in another thread;
    Ray handles their preemption)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: saving a checkpoint at the next log step (within %.0f s; "
                    "signal again to stop now)", signal.Signals(signum).name, self.grace_s)
        self._timer = threading.Timer(self.grace_s, os._exit, (128 + signum,))
        self._timer.daemon = True
        self._timer.start()

    def agreed(self) -> bool:
        """Whether any rank was signalled (a collective: every rank calls it at the same step)."""
        flag = torch.tensor([1 if self.signum else 0])
        return bool(dist.all_reduce_sum(flag).item())

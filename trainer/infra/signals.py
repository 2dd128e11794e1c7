"""Stopping on SIGTERM/SIGINT with a checkpoint (preemption on Kubernetes and Ray).

Without Ray the process that gets the signal runs the loop (``StopOnSignals`` installs the
handlers). Under Ray the signal goes to the driver, which forwards it (``launch.jobs.stop``);
each worker's reporter then answers ``stop_requested()`` with the signal number, polled at the
same steps.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable

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
    second signal, or ``grace_s`` seconds without reaching that point, ends the process at once,
    after ``on_abort`` (which marks the MLflow run KILLED). Handlers are installed only in the
    main thread; ``poll`` (the reporter's ``stop_requested``) brings a signal that reached
    another process (the Ray driver)."""

    def __init__(self, grace_s: float, poll: Callable[[], int] | None = None,
                 on_abort: Callable[[], None] | None = None):
        self.grace_s = grace_s
        self.poll = poll
        self.on_abort = on_abort
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
            self._abort(signum, "a second signal")
        self.signum = signum
        log.warning("%s received: saving a checkpoint at the next log step (within %.0f s; "
                    "signal again to stop now)", signal.Signals(signum).name, self.grace_s)
        self._timer = threading.Timer(self.grace_s, self._abort,
                                      (signum, f"no log step within {self.grace_s:.0f} s"))
        self._timer.daemon = True
        self._timer.start()

    def _abort(self, signum: int, why: str) -> None:
        """Stop now, without a checkpoint: the run is marked KILLED and resumes from its last
        complete checkpoint."""
        if self.on_abort is not None:
            try:
                self.on_abort()
            except Exception as err:  # noqa: BLE001 - exiting regardless
                log.warning("could not mark the run KILLED: %s", err)
        print(f"stopped at once by {signal.Signals(signum).name} ({why}) without a checkpoint; "
              "relaunch the same command to resume from the last complete checkpoint",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def agreed(self) -> bool:
        """Whether any rank was signalled, or the driver forwarded a signal (a collective: every
        rank calls it at the same step); ``signum`` is then set on every rank."""
        if self.signum is None and self.poll is not None:
            self.signum = self.poll() or None
        flags = torch.tensor([self.signum == signal.SIGTERM, self.signum == signal.SIGINT],
                             dtype=torch.int64)
        term, interrupt = dist.all_reduce_sum(flags).tolist()
        if not (term or interrupt):
            return False
        self.signum = self.signum or (signal.SIGTERM if term else signal.SIGINT)
        return True

"""SIGTERM and SIGINT to a Ray driver (``dldkd train``, ``python -m launch.train`` under ``ray
job submit``, ``dldkd sweep``) reach every worker.

Ray's own driver handlers end the process at once (SIGTERM: exit with a native stack dump;
SIGINT: Ray Train aborts the run), so no worker saves and the MLflow run stays RUNNING. Here the
driver runs the work in a thread and keeps the main thread for its own handlers: the first
signal sets a flag in a small actor that every worker polls at its log steps
(``RayReporter.stop_requested``), where the ranks agree, save a checkpoint, close their MLflow
run as KILLED and return. The driver then prints one line with the resume command and exits
128 + the signal (143 for SIGTERM, 130 for SIGINT). A second signal, or ``train.stop_grace_s``
seconds without a worker reaching a log step, stops at once: the driver marks the run(s)
KILLED itself, and a relaunch resumes from the last complete checkpoint in storage.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

log = logging.getLogger("dldkd")


class _Flag:
    """The signal the driver received (0: none); read by every worker."""

    def __init__(self):
        self.signum = 0

    def set(self, signum: int) -> None:
        self.signum = self.signum or int(signum)

    def get(self) -> int:
        return self.signum


def new_flag():
    """The stop flag actor (an actor handle to pass to ``build_trainer(stop=...)``)."""
    import ray

    return ray.remote(num_cpus=0)(_Flag).remote()


def poll(flag) -> int:
    """A worker's view of the driver's flag: the signal number, or 0 (also when the driver is
    gone: Ray then ends the workers anyway)."""
    import ray

    try:
        return int(ray.get(flag.get.remote(), timeout=30))
    except Exception:  # noqa: BLE001 - an unreachable flag is no stop request
        return 0


class DriverStop:
    """``with DriverStop(grace_s, on_abort, hint) as stop: <ray.init>; stop.arm();
    stop.run(work)``: the handlers are ours from before ``ray.init`` (which installs its own).

    ``flag`` (an actor handle) goes to the workers; ``on_abort()`` marks the runs KILLED when
    the driver stops at once; ``hint(signum, how)`` is the line printed on the way out."""

    def __init__(self, grace_s: float, on_abort: Callable[[], None],
                 hint: Callable[[int, str], str]):
        self.grace_s, self.on_abort, self.hint = grace_s, on_abort, hint
        self.flag = None
        self.signum: int | None = None
        self.deadline = float("inf")
        self._old: dict[int, Any] = {}
        self._aborting = threading.Lock()

    def __enter__(self) -> "DriverStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def arm(self) -> None:
        """After ``ray.init``: our handlers again, and the flag the workers poll. A signal
        that came while Ray started stops at once (nothing has trained)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)
        self.flag = new_flag()
        if self.signum is not None:
            self.abort(self.signum, "before training started")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            self.abort(signum, "a second signal")
        self.signum = signum
        self.deadline = time.monotonic() + self.grace_s
        if self.flag is not None:
            self.flag.set.remote(signum)
        log.warning("%s received: every worker saves a checkpoint at its next log step (within "
                    "%.0f s; signal again to stop now)", signal.Signals(signum).name, self.grace_s)

    def run(self, work: Callable[[], Any]) -> Any:
        """``work()`` in a thread, the main thread waiting on it and on the signals; after a
        signal, its result is ignored and the process exits 128 + the signal."""
        out: dict[str, Any] = {}

        def target():
            try:
                out["result"] = work()
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                out["error"] = err

        thread = threading.Thread(target=target, name="dldkd-driver", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            if self.signum is not None and time.monotonic() > self.deadline:
                self.abort(self.signum, f"no worker reached a log step within "
                                        f"{self.grace_s:.0f} s")
        if self.signum is not None:
            if "error" in out:
                log.warning("after %s: %s", signal.Signals(self.signum).name, out["error"])
            print(self.hint(self.signum, "with a checkpoint saved"), file=sys.stderr, flush=True)
            raise SystemExit(128 + self.signum)
        if "error" in out:
            raise out["error"]
        return out["result"]

    def abort(self, signum: int, why: str) -> None:
        """Stop now: mark the runs KILLED, print the resume line, exit 128 + ``signum``."""
        if not self._aborting.acquire(blocking=False):
            return
        try:
            self.on_abort()
        except Exception as err:  # noqa: BLE001 - exiting regardless
            log.warning("could not mark the run KILLED: %s", err)
        print(self.hint(signum, f"at once ({why}), without a new checkpoint"), file=sys.stderr,
              flush=True)
        os._exit(128 + signum)

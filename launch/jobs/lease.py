"""One launch per run: a lease file in the run's storage, taken before Ray starts.

``<run.storage>/<run.name>/lease.json`` names its holder (host, pid, when it started) and when
it last renewed the lease. The launch renews it every ``ttl_s / 4`` seconds and deletes it at the
end; a lease not renewed for ``ttl_s`` seconds (its driver crashed or its node was lost) may be
taken over. Taking, renewing and taking over are each one atomic compare-and-set:

- local (or shared) file system: the lease is written under a temporary name and hard-linked to
  ``lease.json``, which fails if that name exists (an exclusive create, whole content at once);
  a takeover first renames the stale lease aside, so of two launches only one can move it; the
  holder renews by renaming a new version over its own;
- S3: a conditional put, ``If-None-Match: *`` to take it, ``If-Match: <ETag>`` of the version
  read to renew or take it over. A store that rejects conditional puts (HTTP 501) gets plain
  puts, each read back: two launches in the same instant can then both pass.

Staleness is judged with the holder's clock against the reader's: clocks must agree to well
within ``ttl_s``. A lease that cannot be a live holder's is stale whatever it says: one renewed
more than ``MAX_CLOCK_SKEW_S`` in the future, or with a ``ttl_s`` that is not a number in
(0, ``MAX_TTL_S``]. It is taken over with a warning, so a damaged or forged lease file never
blocks a run for longer than ``MAX_TTL_S``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from sharding.files import write_atomic
from trainer.infra import storage

TTL_S = 120.0
MAX_TTL_S = 3600.0         # the longest lease honoured; dldkd writes TTL_S
MAX_CLOCK_SKEW_S = 30.0    # a renewal further in the future is no live holder's
log = logging.getLogger("dldkd")


class LeaseHeld(ValueError):
    """Another launch holds the run; the message names the holder and what to do."""


class _LocalFile:
    """Compare-and-set on a file, the version being the lease's token."""

    def __init__(self, path: str):
        self.path = Path(path)

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, _token(data)

    def create(self, data: bytes) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def replace(self, data: bytes, version: str) -> bool:
        """Take over the lease ``version``: move it aside (one mover wins), check it is the one
        read, create ours (a launch that creates in between wins instead)."""
        aside = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.old")
        try:
            self.path.rename(aside)
        except FileNotFoundError:
            return False
        moved = aside.read_bytes()
        aside.unlink()
        if _token(moved) != version:   # a newer lease: put it back
            self.create(moved)
            return False
        return self.create(data)

    def renew(self, data: bytes, version: str) -> bool:
        """Overwrite in place (a rename over it): the holder's own lease never goes missing."""
        write_atomic(self.path, data)
        return True

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class _S3Object:
    """Compare-and-set on an object through conditional puts, the version being its ETag."""

    def __init__(self, location: str):
        self.fs, self.path = storage._fs(location)
        self.conditional = True

    def read(self) -> tuple[bytes, str] | None:
        self.fs.invalidate_cache(self.path)
        try:
            with self.fs.open(self.path, "rb") as f:   # content and ETag of one version
                return f.read(), f.details["ETag"]
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bool:
        return self._put(data, {"mode": "create"})

    def replace(self, data: bytes, version: str) -> bool:
        return self._put(data, {"IfMatch": version})

    renew = replace

    def delete(self) -> None:
        self.fs.rm_file(self.path)

    def _put(self, data: bytes, condition: dict) -> bool:
        if self.conditional:
            try:
                self.fs.pipe_file(self.path, data, **condition)
                return True
            except OSError as err:
                # The condition failed: another version is there (412), or none any more.
                if isinstance(err, (FileExistsError, FileNotFoundError)) \
                        or err.errno == errno.EINVAL:
                    return False
                if err.errno != errno.ENOSYS:
                    raise
                log.warning("%s: the store rejects conditional puts; the lease is written and "
                            "read back instead, which two launches at once can both pass",
                            self.path)
                self.conditional = False
        self.fs.pipe_file(self.path, data)
        back = self.read()
        return back is not None and _token(back[0]) == _token(data)


def _token(data: bytes) -> str:
    try:
        return str(json.loads(data).get("token", ""))
    except ValueError:
        return ""


class Lease:
    """The lease of one run; ``with Lease(...)`` takes it, renews it in a thread and releases
    it. ``LeaseHeld`` when another launch holds it."""

    def __init__(self, location: str, run: str, ttl_s: float = TTL_S, kind: str = "run"):
        self.location, self.run, self.ttl_s, self.kind = location, run, ttl_s, kind
        self.store = _S3Object(location) if storage.is_remote(location) else _LocalFile(location)
        self.holder = {"run": run, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "token": uuid.uuid4().hex, "ttl_s": ttl_s}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "renewed": time.time()}, indent=1).encode()

    def acquire(self) -> None:
        """Take the lease, or a stale one over; ``LeaseHeld`` naming the live holder."""
        for _ in range(3):   # the other holder may release or renew between our calls
            if self.store.create(self._body()):
                return
            found = self.store.read()
            if found is None:
                continue
            data, version = found
            try:
                other = json.loads(data)
            except ValueError:
                other = {}
            age, why = _staleness(other, self.ttl_s)
            if why is None:
                raise LeaseHeld(_held_message(self.run, self.location, other, age, self.kind))
            if self.store.replace(self._body(), version):
                log.warning("took over the lease of run %s from %s (pid %s): %s", self.run,
                            other.get("host", "?"), other.get("pid", "?"), why)
                return
        raise LeaseHeld(f"run {self.run!r}: the lease {self.location} changed hands while this "
                        "launch tried to take it; another launch of the same run is starting")

    def renew(self) -> bool:
        """Write a fresh renewal time; False when the lease is no longer this launch's."""
        found = self.store.read()
        if found is None or _token(found[0]) != self.holder["token"]:
            return False
        return self.store.renew(self._body(), found[1])

    def release(self) -> None:
        found = self.store.read()
        if found is not None and _token(found[0]) == self.holder["token"]:
            self.store.delete()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    log.error("run %s: the lease %s was taken by another launch; two launches "
                              "now train the same run", self.run, self.location)
                    return
            except OSError as err:   # storage unreachable: try again at the next beat
                log.warning("run %s: could not renew the lease %s: %s", self.run,
                            self.location, err)

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="dldkd-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()


def _staleness(other: dict, default_ttl: float) -> tuple[float, str | None]:
    """(age in seconds, why the lease is stale, or None while a live holder may hold it)."""
    try:
        age = time.time() - float(other.get("renewed", 0.0))
        ttl = float(other.get("ttl_s", default_ttl))
    except (TypeError, ValueError):
        return 0.0, f"its renewal time or ttl_s is not a number ({other!r:.200})"
    if not 0 < ttl <= MAX_TTL_S:   # also NaN
        return age, f"its ttl_s={ttl:g} is outside (0, {MAX_TTL_S:g}] s"
    if not age >= -MAX_CLOCK_SKEW_S:   # also NaN
        return age, f"it claims a renewal {-age:.0f} s in the future"
    if age > ttl:
        return age, f"not renewed for {age:.0f} s (ttl {ttl:g} s)"
    return age, None


def _held_message(run: str, location: str, other: dict, age: float, kind: str = "run") -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(other.get("started", 0))))
    ttl = float(other.get("ttl_s", TTL_S))
    doing = "trained" if kind == "run" else "run"
    return (f"{kind} {run!r} is already being launched or {doing} by {other.get('host', '?')} "
            f"(pid {other.get('pid', '?')}, started {started}, lease renewed {age:.0f} s ago): "
            f"{location}. Stop that launch first, or give this config another {kind}.name; if "
            f"that launch is dead, its lease expires {max(ttl - age, 0):.0f} s from now (or "
            "delete the file)")


def run_lease(run_storage: str, name: str, ttl_s: float = TTL_S, kind: str = "run") -> Lease:
    """The lease of run (or, ``kind="sweep"``, sweep) ``name`` in ``run_storage``
    (``run.storage``): ``<run.storage>/<name>/lease.json``, so two launches never drive the same
    run or the same sweep's trials."""
    return Lease(storage.join(storage.run_location(run_storage, name), "lease.json"), name,
                 ttl_s, kind)

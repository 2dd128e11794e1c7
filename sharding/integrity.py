"""What counts as damaged data, how much of it a run tolerates, and shard hashes checked as read.

- :data:`DAMAGE`: the errors damaged data raises while a shard is read and a sample decoded.
- The damage budget (``data.max_bad_fraction``): a run stops once its bad count exceeds the
  budget times the samples the epoch (or split) holds, a total known from the manifest before
  reading starts (:func:`over_budget`). A fraction below the budget therefore never stops a
  run, however early its bad samples come; one above it stops as soon as the count alone
  proves it, without waiting for the end of the epoch.
- :class:`HashedFile`: a file wrapper that hashes a shard's bytes as the reader reads them (no
  second pass); :meth:`HashedFile.verify` reads the rest at the shard's end and compares with
  the manifest's sha256, raising :class:`ShardHashError` (damage, named with the shard). The
  hashing runs in a thread of its own (hashlib releases the GIL), beside the decoding: sha256
  costs about a third of the reader's CPU time per byte, which a free core then hides.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import tarfile
import threading
import zlib
from dataclasses import dataclass, field

from sharding.schema import ShardError

_RECENT_ERRORS = 5
_CHUNK = 1 << 20
_QUEUED = 64   # chunks read ahead of the hash at most (bounds the memory they hold)
log = logging.getLogger("sharding.reader")

# What damaged data raises while a shard is read and a sample decoded: I/O and tar errors, cut
# streams, bad compression, and ValueError (ShardError, numpy's and json's decode errors).
DAMAGE = (OSError, EOFError, tarfile.TarError, zlib.error, ValueError)


class BadDataError(RuntimeError):
    """More of the data was damaged than ``max_bad_fraction`` allows."""


class ShardHashError(ShardError):
    """A shard's bytes differ from the manifest's sha256: replaced or corrupted."""


def over_budget(bad: float, total: float, budget: float) -> bool:
    """The damage rule: more bad samples than ``budget`` x the samples of the whole epoch/split."""
    return bad > budget * total + 1e-9


@dataclass
class ReadStats:
    """Counts of one worker (or, summed, of a whole reader)."""

    samples: int = 0        # decoded and batched
    bad_samples: int = 0    # skipped: damaged samples plus the samples lost with damaged shards
    bad_shards: int = 0     # shards that failed to open, broke off midway or failed their hash
    shards: int = 0         # shards opened
    errors: list[str] = field(default_factory=list)   # the most recent messages

    def note(self, message: str) -> None:
        log.warning("skipped damaged data: %s", message)
        self.errors = (self.errors + [message])[-_RECENT_ERRORS:]

    @property
    def bad_fraction(self) -> float:
        seen = self.samples + self.bad_samples
        return self.bad_samples / seen if seen else 0.0

    def add(self, other: "ReadStats") -> None:
        self.samples += other.samples
        self.bad_samples += other.bad_samples
        self.bad_shards += other.bad_shards
        self.shards += other.shards
        self.errors = (self.errors + other.errors)[-_RECENT_ERRORS:]


class HashedFile:
    """A binary file (seekable or a stream) whose bytes are hashed in order as they are read.

    Reads below the hashed prefix (tarfile peeks back a byte) are not hashed twice; a seek past it
    reads the gap through the hash, so a tar read header by header still hashes every byte once.
    """

    def __init__(self, raw, url: str, sha256: str):
        self.raw, self.url, self.want = raw, url, sha256
        self.pos = self.done = 0   # where the next read starts; bytes handed to the hash from 0
        self.hash = hashlib.sha256()
        self._chunks: queue.Queue = queue.Queue(_QUEUED)
        self._thread = threading.Thread(target=self._hash, name="dldkd-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self.hash.update(chunk)

    def _update(self, chunk) -> None:
        if len(chunk):
            self._chunks.put(chunk)

    def read(self, n: int = -1) -> bytes:
        if self.pos > self.done:
            self._skip_to(self.pos)
        data = self.raw.read(n)
        end = self.pos + len(data)
        if end > self.done:
            self._update(memoryview(data)[self.done - self.pos:])
            self.done = end
        self.pos = end
        return data

    def _skip_to(self, target: int) -> None:
        self.raw.seek(self.done)
        while self.done < target:
            data = self.raw.read(min(_CHUNK, target - self.done))
            if not data:
                break
            self._update(data)
            self.done += len(data)
        self.raw.seek(self.pos)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset == self.pos:
            return offset
        self.pos = self.raw.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def verify(self) -> None:
        """Hash the rest of the shard (its end-of-archive blocks) and compare with the manifest."""
        if hasattr(self.raw, "seek") and self.pos != self.done:
            self.raw.seek(self.done)
        while True:
            data = self.raw.read(_CHUNK)
            if not data:
                break
            self._update(data)
        self._stop()
        got = self.hash.hexdigest()
        if got != self.want:
            raise ShardHashError(f"shard {self.url}: sha256 {got[:12]}.. differs from the "
                                 f"manifest's {self.want[:12]}..: the shard was replaced or "
                                 "corrupted; rewrite it with `dldkd shard` or restore it")

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()

    def close(self) -> None:
        self._stop()
        self.raw.close()

    def __getattr__(self, name):   # name, mode, ... as the wrapped file has them
        return getattr(self.raw, name)

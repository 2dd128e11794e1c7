"""The teacher's frame-embedding cache: each frame is encoded once and reused across epochs.

Keys are (video id, teacher frame index) inside a namespace named by the teacher's identity
(architecture + weights hash + preprocessing): a different teacher has a different namespace, so
it can never read another teacher's embeddings. Memory holds whole videos in LRU order, bounded
in bytes; a video pushed out of memory is spilled to ``<cache_dir>/<identity>/<sha1(id)>.npz``
(written atomically, read back with ``allow_pickle=False``) when a cache dir is set, and dropped
otherwise.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sharding.files import atomic_path


@dataclass
class _Entry:
    """The cached frames of one video: sorted frame indices and their embeddings."""

    index: np.ndarray   # (n,) int64, sorted, unique
    emb: np.ndarray     # (n, D) float32
    on_disk: bool = False   # an identical copy is spilled already

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.emb.nbytes


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    spilled: int = 0      # videos written to disk
    loaded: int = 0       # videos read back from disk


class FrameEmbeddingCache:
    """LRU by bytes over videos, with an optional on-disk spill under ``spill_root/identity``."""

    def __init__(self, identity: str, max_bytes: int, spill_root: str | Path | None = None):
        if not identity or "/" in identity or identity.startswith("."):
            raise ValueError(f"cache identity {identity!r} must be a plain, non-empty name")
        self.identity = identity
        self.max_bytes = int(max_bytes)
        self.spill_dir = Path(spill_root) / identity if spill_root else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self.stats = CacheStats()

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory: what ``max_bytes`` bounds, observable beside it."""
        return self._bytes

    def lookup(self, keys: Sequence[tuple[str, int]], dim: int) -> tuple[Tensor, Tensor]:
        """(n, dim) float32 embeddings and an (n,) bool mask of the keys found (zeros elsewhere)."""
        out = np.zeros((len(keys), dim), np.float32)
        found = np.zeros(len(keys), bool)
        for video, (pos, frames) in _group(keys).items():
            entry = self._get(video)
            if entry is None:
                continue
            if entry.emb.shape[1] != dim:
                raise ValueError(f"cache {self.identity}: video {video!r} has embeddings of dim "
                                 f"{entry.emb.shape[1]}, expected {dim}; delete "
                                 f"{self.spill_dir} (written by another teacher version)")
            at = np.searchsorted(entry.index, frames)
            hit = (at < len(entry.index)) & (entry.index[np.minimum(at, len(entry.index) - 1)]
                                             == frames)
            out[pos[hit]] = entry.emb[at[hit]]
            found[pos[hit]] = True
        self.stats.hits += int(found.sum())
        self.stats.misses += int((~found).sum())
        return torch.from_numpy(out), torch.from_numpy(found)

    def put(self, keys: Sequence[tuple[str, int]], emb: Tensor) -> None:
        """Store embeddings (n, D) for keys; existing frames of a video are kept."""
        if emb.dim() != 2 or emb.shape[0] != len(keys):
            raise ValueError(f"cache put: {len(keys)} keys but embeddings of shape "
                             f"{tuple(emb.shape)}")
        values = emb.detach().to("cpu", torch.float32).numpy()
        for video, (pos, frames) in _group(keys).items():
            old = self._get(video)
            index, emb_v = frames, values[pos]
            if old is not None:
                index = np.concatenate([old.index, index])
                emb_v = np.concatenate([old.emb, emb_v])
            index, first = np.unique(index[::-1], return_index=True)  # newest value wins
            entry = _Entry(index.astype(np.int64), np.ascontiguousarray(emb_v[::-1][first]))
            self._insert(video, entry)
        self._evict()

    def _get(self, video: str) -> _Entry | None:
        entry = self._mem.get(video)
        if entry is not None:
            self._mem.move_to_end(video)
            return entry
        path = self._path(video)
        if path is None or not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            entry = _Entry(z["index"], z["emb"], on_disk=True)
        self.stats.loaded += 1
        self._insert(video, entry)
        self._evict(keep=video)
        return entry

    def _insert(self, video: str, entry: _Entry) -> None:
        old = self._mem.pop(video, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._mem[video] = entry
        self._bytes += entry.nbytes

    def _evict(self, keep: str | None = None) -> None:
        while self._bytes > self.max_bytes and self._mem:
            video = next(iter(self._mem))
            if video == keep:
                if len(self._mem) == 1:
                    return
                self._mem.move_to_end(video)
                continue
            entry = self._mem.pop(video)
            self._bytes -= entry.nbytes
            if not entry.on_disk:
                self._spill(video, entry)

    def _spill(self, video: str, entry: _Entry) -> None:
        path = self._path(video)
        if path is None:
            return
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, index=entry.index, emb=entry.emb)
        self.stats.spilled += 1

    def _path(self, video: str) -> Path | None:
        if self.spill_dir is None:
            return None
        return self.spill_dir / (hashlib.sha1(video.encode()).hexdigest() + ".npz")


def _group(keys: Sequence[tuple[str, int]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """video -> (positions in keys, frame indices)."""
    groups: dict[str, list[int]] = {}
    for i, (video, _) in enumerate(keys):
        groups.setdefault(video, []).append(i)
    return {v: (np.asarray(p, np.int64), np.asarray([keys[i][1] for i in p], np.int64))
            for v, p in groups.items()}

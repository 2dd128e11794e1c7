"""True epochs over a finite split: every video once per epoch, in a fresh order across shards.

The reader indexes each shard's tar headers once (where every sample's members lie), draws one
permutation of all videos per epoch (the same on every rank), pads it so every rank gets the same
number, and reads each video by offset: one seek and one read per video, whichever shard it is in.
"""
from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

_OPEN_SHARDS = 8   # per DataLoader worker


class SampleRef(NamedTuple):
    """Where one sample lies: shard URL, key, (member suffix, data offset, size) in tar order."""

    url: str
    key: str
    members: tuple[tuple[str, int, int], ...]


def open_seekable(url: str, local_path: str | None):
    """A binary file that can seek: a local shard, or an fsspec URL (s3://, http:// ranges)."""
    if local_path is not None:
        return open(local_path, "rb")
    if url.startswith("pipe:"):
        raise ValueError(f"shard {url}: data.true_epochs reads videos by offset and a pipe: "
                         "source cannot seek; use a path or URL, or data.true_epochs=false")
    import fsspec

    return fsspec.open(url, "rb").open()


def index_shard(url: str, local_path: str | None, sha256: str | None = None) -> list[SampleRef]:
    """Every whole sample of one shard, from its tar headers alone (no member data is read);
    with ``sha256`` the whole shard is read once, in order, through its hash (ShardHashError).

    A shard cut short keeps the samples before the cut; the caller compares the count with the
    manifest's.
    """
    from sharding.integrity import HashedFile
    from sharding.sources import check_member_path

    out: list[SampleRef] = []
    key, members = None, []
    with open_seekable(url, local_path) as raw:
        size = raw.seek(0, os.SEEK_END)
        raw.seek(0)
        f = HashedFile(raw, url, sha256) if sha256 else raw
        try:
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for info in tar:
                        if not info.isreg():
                            continue
                        check_member_path(info.name, url)
                        k, _, suffix = os.path.basename(info.name).partition(".")
                        if k != key and members:
                            out.append(SampleRef(url, key, tuple(members)))
                            members = []
                        key = k
                        members.append((suffix.lower(), info.offset_data, info.size))
                    if size - tar.offset < 2 * tarfile.BLOCKSIZE:
                        members = []   # no end-of-archive blocks: the last sample may be cut
            except (tarfile.TarError, OSError):
                if sha256:
                    f.verify()   # a replaced shard is named as such, not by its tar error
                if not out:
                    raise
                members = []   # the sample the error cut is not whole
            if sha256:
                f.verify()
        finally:
            f.close()   # a HashedFile's hashing thread ends with it
    if members:
        out.append(SampleRef(url, key, tuple(members)))
    return [r for r in out if r.members[-1][1] + r.members[-1][2] <= size]


def rank_batches(n: int, seed: int, rank: int, world_size: int, batch: int) -> list[np.ndarray]:
    """This rank's batches (indices into the split's samples) for the epoch seeded by ``seed``.

    One permutation of the n videos, extended by its first videos to a multiple of world_size
    (every video at least once, at most world_size - 1 twice), dealt round-robin to the ranks and
    cut into batches: ceil(ceil(n / world_size) / batch) steps on every rank, the last one
    shorter; a last batch of a single video joins the one before (a batch needs negatives).
    """
    perm = np.random.default_rng(seed).permutation(n)
    per_rank = -(-n // world_size)
    mine = np.concatenate([perm, perm[:per_rank * world_size - n]])[rank::world_size]
    batches = [mine[i:i + batch] for i in range(0, len(mine), batch)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


def epoch_steps(videos: int | None, batch_videos: int, world_size: int, *, true_epochs: bool,
                resampled: bool, requested: int = 0) -> int | None:
    """The steps of one (virtual) epoch on every rank: the one rule the reader and ``dldkd
    validate`` share. ``requested`` is ``data.steps_per_epoch`` (0: derived).

    - true epochs: ``requested`` or the whole epoch (:func:`steps_for`); more than the whole
      epoch is refused (ValueError naming the key);
    - resampled: ``requested`` or about one pass by all ranks, max(1, videos // global batch);
    - exact reading: ``requested`` (0: each worker reads its shards once, no fixed count).

    None where the answer needs the split's size and ``videos`` is None (no manifest read).
    """
    if true_epochs:
        if videos is None:
            return requested or None
        full = steps_for(videos, world_size, batch_videos)
        if requested > full:
            raise ValueError(
                f"data.steps_per_epoch={requested} but a true epoch of {videos} videos over "
                f"{world_size} ranks in batches of {batch_videos} has {full} steps per rank: set "
                f"data.steps_per_epoch <= {full}, or 0 for whole epochs")
        return requested or full
    if requested or not resampled:
        return requested
    return None if videos is None else max(1, videos // (batch_videos * world_size))


def steps_for(n: int, world_size: int, batch: int) -> int:
    """Steps per true epoch on every rank (what :func:`rank_batches` yields)."""
    per_rank = -(-n // world_size)
    steps = -(-per_rank // batch)
    return steps - 1 if steps > 1 and per_rank % batch == 1 else steps


class SampleFiles:
    """Open shards of one DataLoader worker (a few at a time) and whole-sample reads."""

    def __init__(self, local_path):
        self.local_path = local_path
        self.files: OrderedDict = OrderedDict()

    def read(self, ref: SampleRef) -> dict:
        """The sample's members as the streaming reader groups them (suffix -> bytes)."""
        f = self.files.pop(ref.url, None) or open_seekable(ref.url, self.local_path(ref.url))
        self.files[ref.url] = f
        if len(self.files) > _OPEN_SHARDS:
            self.files.popitem(last=False)[1].close()
        start = ref.members[0][1]
        end = ref.members[-1][1] + ref.members[-1][2]
        f.seek(start)
        blob = f.read(end - start)
        if len(blob) != end - start:
            raise OSError(f"shard {ref.url} ends inside sample {ref.key!r}")
        sample = {"__key__": ref.key, "__url__": ref.url}
        for name, offset, size in ref.members:
            sample[name] = blob[offset - start:offset - start + size]
        return sample

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

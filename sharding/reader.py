"""The streaming reader that feeds one training worker (design.md data flow 2).

shard URLs -> split by node (rank) -> split by DataLoader worker -> shuffle -> decode (schema only,
never webdataset's pickle-capable decoders) -> method.md §5 batches (``sharding.batch.collate``).

Three modes:
- true epochs (training on a finite split, ``sharding.epochs``): every video once per epoch in a
  fresh permutation across shards, read by offset; the same number of steps on every rank.
- resampled (training, streaming): every DataLoader worker draws shards with replacement from all shards,
  seeded by (seed, epoch, rank, worker), and the rank yields exactly ``steps_per_epoch`` batches per
  virtual epoch, so every rank takes the same number of steps whatever the shard count.
  Batch k of a rank comes from logical worker k mod W; ``epoch(e, start_step=s)`` resumes exactly
  by rotating which physical worker plays which logical one and skipping the raw (undecoded)
  samples of the first s batches.
- exact (evaluation): shards are split round-robin by rank, then by worker; every sample is read
  exactly once across all ranks and workers, the last batch of a worker may be short.

Resident (``resident=True``, true epochs only): the split is decoded once into this process's
memory and every epoch's batches are formed by indexing it, with exactly the batches that true
epochs read from disk (same permutation, same composition, same resume). For splits that fit in
memory it removes the per-epoch reading and decoding (:func:`resident_plan` decides).

Batches are collated into reused memory (``sharding.batch.Buffers``) with the features in their
stored float16; a DataLoader worker collates into shared memory, which crosses into this process
without a copy. Features are cast to float32 in one place, as each batch arrives here, into this
process's buffers: whatever ``loader_workers``, the reader yields the same float32 batches.

A damaged sample or shard (an error in ``sharding.integrity.DAMAGE``, a shard whose bytes fail
the manifest's sha256 included) is skipped, logged and counted; the counts travel in
``batch.extras["read"]`` and add up in ``ShardReader.stats`` (the recipe logs them to MLflow).
More than ``max_bad_fraction`` of the epoch's samples bad raises ``BadDataError``
(``sharding.integrity.over_budget``). Any other exception (a TypeError or KeyError in this code)
is a bug, not damage, and is raised at once; so is a pickled member (``UnsafeMemberError``),
which is a hazard, not damage.

Over 400 lines as one concern: the three modes share one plan, one worker loop, one resume rule
and one damage count (sources and integrity live in ``sharding.sources`` and
``sharding.integrity``).
"""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from sharding.batch import Batch, Buffers, VideoSample, collate
from sharding.epochs import SampleFiles, SampleRef, epoch_steps, index_shard, rank_batches
from sharding.integrity import DAMAGE, BadDataError, ReadStats, over_budget
from sharding.schema import ShardError, UnsafeMemberError, decode_sample
from sharding.sources import (check_manifest, local_path, raw_samples, resolve_source,
                              shard_hashes)
from sharding.writer import Manifest

__all__ = ["BadDataError", "ReadStats", "ShardReader", "check_manifest", "read_all",
           "resident_plan", "resolve_source"]


def _groups(samples: Iterator[dict], n: int) -> Iterator[list[dict]]:
    while True:
        group = list(itertools.islice(samples, n))
        if not group:
            return
        yield group


@dataclass
class _Plan:
    """What one reader iteration does (copied into every DataLoader worker)."""

    urls: list[str]
    expected: dict[str, int]
    rank: int
    world_size: int
    batch_videos: int
    resampled: bool
    steps: int
    seed: int
    shuffle_buffer: int
    max_words: int
    teacher_frames: bool = True
    epoch: int = 0
    start_step: int = 0
    true_epochs: bool = False
    index: list[SampleRef] = field(default_factory=list)   # true epochs: every sample
    videos: list | None = None   # resident: the index's samples decoded (str: why damaged)
    hashes: dict[str, str] = field(default_factory=dict)   # url -> manifest sha256
    verified: set[str] = field(default_factory=set)        # urls whose hash matched once


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class _EpochDataset(torch.utils.data.IterableDataset):
    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[Batch]:
        p = self.plan
        info = torch.utils.data.get_worker_info()
        physical, n_workers = (info.id, info.num_workers) if info else (0, 1)
        buffers = Buffers(shared=info is not None)
        if p.true_epochs:
            yield from _true_epoch(p, physical, n_workers, buffers)
            return
        stats = ReadStats()
        if p.resampled:
            worker = (p.start_step + physical) % n_workers
            rng = random.Random(_seed(p.seed, p.epoch, p.rank, worker))
            skip = max(0, -(-(p.start_step - worker) // n_workers))
            total = p.steps // n_workers + (worker < p.steps % n_workers) - skip
            urls = (rng.choice(p.urls) for _ in itertools.count())
            give_up = max(10, 2 * len(p.urls))
        else:
            worker, rng, skip, total = physical, None, 0, None
            urls = p.urls[p.rank::p.world_size][physical::n_workers]
            give_up = None
        verified = set(p.verified)
        raw = raw_samples(urls, stats, p.expected, give_up, p.hashes, verified)
        if rng is not None and p.shuffle_buffer > 1:
            raw = wds.shuffle(p.shuffle_buffer, initial=p.shuffle_buffer, rng=rng)(raw)
        produced = 0
        for group in itertools.islice(_groups(raw, p.batch_videos), skip, None):
            if total is not None and produced >= total:
                break
            videos = [v for v in (_decode_counted(m, stats, p.teacher_frames) for m in group)
                      if v is not None]
            if not videos:   # resampled: the next group stands in, so the step count holds
                stats.note(f"a whole batch of {len(group)} samples was damaged")
                continue
            produced += 1
            stats.samples += len(videos)
            batch = collate(videos, p.max_words, buffers)
            batch.extras["read"] = {"worker": worker, **asdict(stats)}
            yield batch
        # Counts after the last batch (a shard that broke at the end) still reach the caller,
        # with the shards whose hash matched: later epochs read them without hashing.
        yield _WorkerDone({"worker": worker, **asdict(stats)}, verified)


def _true_epoch(p: _Plan, physical: int, n_workers: int, buffers: Buffers) -> Iterator:
    """This worker's batches of one true epoch: batch k of the rank comes from logical worker
    k mod W, and after a resume at step s physical worker i plays logical (s + i) mod W."""
    worker = (p.start_step + physical) % n_workers
    stats = ReadStats()
    batches = rank_batches(len(p.index), _seed(p.seed, p.epoch), p.rank, p.world_size,
                           p.batch_videos)[:p.steps]
    files = SampleFiles(local_path)
    try:
        for k in range(p.start_step + physical, len(batches), n_workers):
            videos = []
            for i in batches[k]:
                if p.videos is not None:   # resident: decoded once; damage counted as read
                    if isinstance(p.videos[i], str):
                        stats.bad_samples += 1
                        stats.note(p.videos[i])
                    else:
                        videos.append(p.videos[i])
                    continue
                ref = p.index[i]
                try:
                    members = files.read(ref)
                except DAMAGE as e:  # I/O of one sample: count it, go on
                    stats.bad_samples += 1
                    stats.note(f"shard {ref.url}: sample {ref.key!r}: {type(e).__name__}: {e}")
                    continue
                video = _decode_counted(members, stats, p.teacher_frames)
                if video is not None:
                    videos.append(video)
            if not videos:   # every rank must take this step: nothing can stand in for it
                raise BadDataError(f"every video of step {k} was damaged; recent errors: "
                                   f"{stats.errors}")
            stats.samples += len(videos)
            batch = collate(videos, p.max_words, buffers)
            batch.extras["read"] = {"worker": worker, **asdict(stats)}
            yield batch
    finally:
        files.close()
    yield _WorkerDone({"worker": worker, **asdict(stats)})


@dataclass
class _WorkerDone:
    read: dict
    verified: set[str] = field(default_factory=set)


def _decode_counted(members: dict, stats: ReadStats, teacher_frames: bool = True
                    ) -> VideoSample | None:
    """Decode one sample; a damaged one is counted and skipped, a pickled one is fatal."""
    url = members.get("__url__", "?")
    try:
        return decode_sample(members, url, teacher_frames=teacher_frames)
    except UnsafeMemberError:
        raise
    except DAMAGE as e:
        stats.bad_samples += 1
        stats.note(str(e) if isinstance(e, ShardError) else
                   f"shard {url}: sample {members.get('__key__', '?')!r}: {type(e).__name__}: {e}")
        return None


def _identity(x):
    return x


# Decoded size over tar size: features are stored as they are used; JPEG frames grow ~5-15x.
_DECODED_OVER_TAR = {False: 1.2, True: 12.0}


def resident_plan(manifest: Manifest | None, *, mode: str, max_mb: float, true_epochs: bool,
                  teacher_frames: bool) -> tuple[bool, str]:
    """Whether a training split is held in memory (``data.resident``), and why, in words.

    ``auto`` holds it when true epochs are on and the manifest's size, scaled to decoded bytes,
    is under ``max_mb`` (``data.resident_max_mb``); ``on`` insists, ``off`` always streams.
    """
    if mode == "off":
        return False, "data.resident=off: streamed from the shards every epoch"
    if not true_epochs:
        if mode == "on":
            raise ValueError("data.resident=on needs data.true_epochs=true (a resident split is "
                             "indexed by true epochs); set data.true_epochs=true or "
                             "data.resident=auto")
        return False, "streamed: data.true_epochs=false (resident mode needs true epochs)"
    if manifest is None:
        if mode == "on":
            return True, "data.resident=on (no manifest to size the split)"
        return False, "streamed: the split has no manifest to size it (data.resident=on forces)"
    mb = manifest.totals["bytes"] * _DECODED_OVER_TAR[teacher_frames] / 2**20
    if mode == "on":
        return True, f"data.resident=on: about {mb:,.0f} MB decoded in each worker's memory"
    if mb <= max_mb:
        return True, (f"resident: about {mb:,.0f} MB decoded per worker, within "
                      f"data.resident_max_mb={max_mb:,.0f}")
    return False, (f"streamed: about {mb:,.0f} MB decoded per worker exceeds "
                   f"data.resident_max_mb={max_mb:,.0f}")


class ShardReader:
    """Batches for one rank, epoch by epoch, through a DataLoader with ``loader_workers``."""

    def __init__(self, source, *, rank: int = 0, world_size: int = 1, batch_videos: int = 128,
                 loader_workers: int = 2, resampled: bool = True, steps_per_epoch: int = 0,
                 seed: int = 0, shuffle_buffer: int = 256, max_bad_fraction: float = 0.01,
                 max_words: int = 30, video_dim: int | None = None, query_dim: int | None = None,
                 teacher_dim: int | None = None, teacher_frames: bool = True,
                 true_epochs: bool = False, resident: bool = False):
        """``teacher_frames=False`` skips decoding the JPEG frames (no online image tower).
        ``true_epochs``: every video once per epoch (``sharding.epochs``); ``steps_per_epoch``
        > 0 then cuts each epoch short, and ``resampled`` is not used. ``resident``: decode the
        split once and batch from memory (true epochs only; ``loader_workers`` is not used)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_videos < 1 or loader_workers < 0:
            raise ValueError(f"batch_videos must be >= 1 and loader_workers >= 0, got "
                             f"{batch_videos}, {loader_workers}")
        self.urls, self.manifest = resolve_source(source)
        if self.manifest is not None:
            check_manifest(self.manifest, video_dim, query_dim, teacher_dim)
        workers = max(loader_workers, 1)
        index: list[SampleRef] = []
        self.index_stats = ReadStats()    # samples lost before the first epoch (true epochs)
        if resident and not true_epochs:
            raise ValueError("a resident split needs true_epochs=True")
        hashes = shard_hashes(self.urls, self.manifest)
        if true_epochs:
            index = self._index(max_bad_fraction, hashes)
        videos = len(index) if true_epochs else \
            self.manifest.totals["videos"] if self.manifest is not None else None
        steps_per_epoch = epoch_steps(videos, batch_videos, world_size, true_epochs=true_epochs,
                                      resampled=resampled, requested=steps_per_epoch)
        if steps_per_epoch is None:
            raise ValueError("resampled reading needs steps_per_epoch > 0 when the shards "
                             "have no manifest (data.steps_per_epoch)")
        if not true_epochs and not resampled and len(self.urls) < world_size * workers:
            raise ValueError(
                f"exact-epoch reading of {source!r} needs at least world_size x loader_workers = "
                f"{world_size} x {workers} = {world_size * workers} shards, found {len(self.urls)}: "
                "write smaller shards (videos_per_shard) or use fewer loader workers")
        expected = {}
        if self.manifest is not None:
            expected = {u: s.videos for u, s in zip(self.urls, self.manifest.shards)}
        self.plan = _Plan(self.urls, expected, rank, world_size, batch_videos, resampled,
                          steps_per_epoch, seed, shuffle_buffer, max_words, teacher_frames,
                          true_epochs=true_epochs, index=index, hashes=hashes)
        self.epoch_total = self._epoch_total()
        if resident:
            self.plan.videos = self._decode_all(teacher_frames)
        self.loader_workers = 0 if resident else loader_workers
        self.max_bad_fraction = max_bad_fraction
        self.stats = ReadStats()          # all finished epochs
        self.epoch_stats = ReadStats()    # the current epoch, while one runs

    def _epoch_total(self) -> float | None:
        """The samples one epoch of this rank reads (the damage budget's base), or None where
        only the end of the epoch tells (exact reading without a manifest)."""
        p = self.plan
        if p.true_epochs:
            batches = rank_batches(len(p.index), 0, p.rank, p.world_size, p.batch_videos)
            return sum(len(b) for b in batches[:p.steps])
        if p.resampled:
            return p.steps * p.batch_videos
        mine = p.urls[p.rank::p.world_size]
        return sum(p.expected[u] for u in mine) if p.expected else None

    def _index(self, max_bad_fraction: float, hashes: dict[str, str]) -> list[SampleRef]:
        """Every sample of the split by offset, each shard checked against its manifest sha256
        as it is read; a shard that cannot be indexed, ends early or fails its hash loses its
        samples to ``index_stats``, within ``max_bad_fraction`` of the split."""
        expected = {u: s.videos for u, s in zip(self.urls, self.manifest.shards)} \
            if self.manifest is not None else {}
        index: list[SampleRef] = []
        s = self.index_stats
        for url in self.urls:
            s.shards += 1
            try:
                refs = index_shard(url, local_path(url), hashes.get(url))
            except DAMAGE as e:  # the shard is lost
                refs = []
                s.bad_shards += 1
                s.note(str(e) if isinstance(e, ShardError) and str(e).startswith("shard ") else
                       f"shard {url}: {type(e).__name__}: {e}")
            lost = expected.get(url, len(refs)) - len(refs)
            if lost > 0 and refs:
                s.bad_shards += 1
                s.note(f"shard {url}: {len(refs)} of the manifest's {expected[url]} samples")
            s.bad_samples += max(lost, 0 if refs else 1)
            index += refs
        if not index or over_budget(s.bad_samples, s.bad_samples + len(index), max_bad_fraction):
            raise BadDataError(f"{s.bad_samples} samples of {self.urls[0]}.. could not be indexed "
                               f"(data.max_bad_fraction={max_bad_fraction}): {s.errors}")
        return index

    def _decode_all(self, teacher_frames: bool) -> list:
        """The resident split: every indexed sample decoded once. A damaged one is kept as its
        error message and counted when its batch comes up, every epoch, as when streaming."""
        files, videos, lost = SampleFiles(local_path), [], ReadStats()
        try:
            for ref in self.plan.index:
                try:
                    members = files.read(ref)
                except DAMAGE as e:
                    videos.append(f"shard {ref.url}: sample {ref.key!r}: {type(e).__name__}: {e}")
                    continue
                video = _decode_counted(members, lost, teacher_frames)
                videos.append(video if video is not None else lost.errors[-1])
        finally:
            files.close()
        if all(isinstance(v, str) for v in videos):
            raise BadDataError(f"no sample of {self.urls[0]}.. could be decoded: {lost.errors}")
        return videos

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps

    def counts(self) -> list[int]:
        """[samples, damaged samples, damaged shards] read by this process so far, the current
        epoch included (samples lost to indexing count once per epoch: every epoch lacks them)."""
        done, now = self.stats, self.epoch_stats
        return [done.samples + now.samples, done.bad_samples + now.bad_samples,
                done.bad_shards + now.bad_shards]

    def epoch(self, epoch: int = 0, start_step: int = 0) -> Iterator[Batch]:
        """The batches of epoch ``epoch`` from step ``start_step`` on (resampled, true epochs)."""
        if start_step and not (self.plan.resampled or self.plan.true_epochs):
            raise ValueError("start_step is only meaningful in resampled mode and true epochs")
        if start_step < 0 or (start_step and start_step >= self.plan.steps):
            raise ValueError(f"start_step {start_step} is outside 0..{self.plan.steps - 1}")
        self.plan.epoch, self.plan.start_step = epoch, start_step
        # An own generator: a DataLoader otherwise draws its base seed from the global torch RNG,
        # which would shift the training step's dropout masks after an exact resume.
        loader = torch.utils.data.DataLoader(
            _EpochDataset(self.plan), batch_size=None, num_workers=self.loader_workers,
            collate_fn=_identity, persistent_workers=False,
            generator=torch.Generator().manual_seed(_seed(self.plan.seed, epoch, self.plan.rank)))
        # Samples lost while indexing count against every epoch's bad fraction.
        per_worker: dict[int, dict] = {-1: asdict(self.index_stats)} if self.plan.true_epochs \
            else {}
        self.epoch_stats = ReadStats()
        buffers = Buffers()   # the float32 features this epoch hands out
        try:
            for item in loader:
                if isinstance(item, _WorkerDone):
                    per_worker[item.read["worker"]] = item.read
                    self.plan.verified |= item.verified
                    continue
                per_worker[item.extras["read"]["worker"]] = item.extras["read"]
                self._update(per_worker, final=False)
                yield buffers.float32(item)
            self._update(per_worker, final=True)
        finally:  # also when the caller closes the epoch after its last step
            self.stats.add(self.epoch_stats)
            self.epoch_stats = ReadStats()

    def _update(self, per_worker: dict[int, dict], final: bool) -> None:
        """The damage budget (``sharding.integrity``): stop once the bad count exceeds the
        budget of this rank's whole epoch; samples lost to indexing count by this rank's share."""
        s = ReadStats()
        for read in per_worker.values():
            s.add(ReadStats(**{k: v for k, v in read.items() if k != "worker"}))
        self.epoch_stats = s
        lost = self.index_stats.bad_samples if self.plan.true_epochs else 0
        share = lost / self.plan.world_size
        bad = s.bad_samples - lost + share
        total = self.epoch_total
        if total is None:   # known only at the end: what was read is the whole epoch
            if not final:
                return
            total = s.samples + s.bad_samples - lost
        if over_budget(bad, total + share, self.max_bad_fraction):
            raise BadDataError(
                f"{bad:g} of this rank's {total + share:g} samples per epoch were damaged, more "
                f"than data.max_bad_fraction={self.max_bad_fraction} allows "
                f"({self.max_bad_fraction * (total + share):g}); recent errors: {s.errors}")

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)


def read_all(source, max_bad_fraction: float = 0.0, teacher_frames: bool = True
             ) -> list[VideoSample]:
    """Every video of a split in shard order, in this process (evaluation galleries)."""
    urls, manifest = resolve_source(source)
    expected = {u: s.videos for u, s in zip(urls, manifest.shards)} if manifest else {}
    stats = ReadStats()
    out = []
    for members in raw_samples(urls, stats, expected, None, shard_hashes(urls, manifest)):
        video = _decode_counted(members, stats, teacher_frames)
        if video is not None:
            out.append(video)
    stats.samples = len(out)
    total = manifest.totals["videos"] if manifest else stats.samples + stats.bad_samples
    if over_budget(stats.bad_samples, max(total, 1), max_bad_fraction):
        raise BadDataError(f"{stats.bad_samples} of {stats.samples + stats.bad_samples} samples in "
                           f"{source!r} were damaged; recent errors: {stats.errors}")
    return out

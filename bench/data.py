"""Data loading: the shard reader vs the reference's BigFile + HDF5 reads, at TVR dims, one run.

Both sides start from the same generated MS-SL release layout (BigFile ``feature.bin`` with
``video2frames.txt``, RoBERTa token HDF5), which is also converted to shards here; every file of
both is read once before timing, so both read a warm page cache. The baseline reads the way the
reference dataset does: per frame, open ``feature.bin``, seek, read into an ``array('f')`` and
turn it into a Python list, stack, uniform-sample, L2; per caption an h5py lookup by key. Both
sides collate with ``sharding.batch.collate``.

``ours_videos_s`` is the reader in-process (loader_workers=0, resampled reading, one torch
thread: per core, as the baseline's single thread), up to float32 batches as a CPU training step
takes them (through the trainer's ``_to_device``), as the baseline's are. It is timed
interleaved with the baseline: each baseline batch is read in ``--passes`` parts with one of the
reader's batches after each, so both sides meet the same moments of a busy machine; it is the
per-core comparison behind ``speedup``. ``_workers1``/``_workers2``: the same through 1 and 2
DataLoader workers, timed alone. Rates are steady, from the first batch on (``first_batch_s``:
the start-up, once per epoch). ``main_cpu_ms_per_batch``: CPU time of this, the training,
process per batch (with workers: receiving the batch and its float32 cast).
Floor: reading the shard bytes once from the warm page cache (``floor_videos_s``, measured
here); the reader reads them, decodes them and writes the batch. The consumer: the student's
training step (``bench.step``'s) at the same batch and all threads, timed here after the reader;
``feed_over_step`` is videos/s read over videos/s the step consumes (goal >= 5).
Integrity: the reader hashes each shard's bytes as it reads them and checks the manifest's
sha256 at the shard's end, in a thread beside the decoding. ``hash_cpu_ms_per_shard``: hashing
one shard's bytes; ``hash_cpu_share_of_reader``: that CPU time per video over the in-process
reader's; ``hash_wall_share_of_reader``: the reader's time per video with the check over
without it, minus 1 (goal < 0.05; best of ``--hash-runs`` each, interleaved).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import array
import ast
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from bench.step import make_batch, make_teacher, ours_step
from sharding.batch import VideoSample, collate
from sharding.preprocess import l2_normalise, prepare_frames, prepare_tokens, uniform_sample
from sharding.reader import ShardReader
from sharding.writer import write_split
from trainer.config import LossConfig, ModelConfig, OptimConfig
from trainer.method.optim import build_optimizer
from trainer.recipe import _to_device
from trainer.method.student import DualStudent

DV, DQ = 3072, 768   # TVR i3d_resnet, RoBERTa (method.md §2)
CPU = torch.device("cpu")


def make_release(root: Path, n_videos: int, seed: int = 0) -> list[str]:
    """A tiny TVR-like release: BigFile features and a RoBERTa token HDF5 (5 captions a video)."""
    rng = np.random.default_rng(seed)
    feat = root / "FeatureData" / "i3d_resnet"
    feat.mkdir(parents=True)
    (root / "TextData").mkdir()
    vids = [f"s01e{i:02d}_seg02_clip_{i:02d}" for i in range(n_videos)]
    lengths = rng.integers(40, 200, n_videos)     # some longer than 128: uniform sampling runs
    v2f, frame_ids = {}, []
    with open(feat / "feature.bin", "wb") as f:
        for vid, n in zip(vids, lengths):
            ids = [f"{vid}_{k}" for k in range(n)]
            v2f[vid] = ids
            frame_ids += ids
            rng.standard_normal((n, DV), dtype=np.float32).tofile(f)
    (feat / "id.txt").write_text(" ".join(frame_ids))
    (feat / "shape.txt").write_text(f"{len(frame_ids)} {DV}")
    (feat / "video2frames.txt").write_text(repr(v2f))
    lines = []
    with h5py.File(root / "TextData" / "roberta_tvr_query_feat.hdf5", "w") as h:
        for vid in vids:
            for k in range(5):
                cid = f"{vid}#enc#{k}"
                h[cid] = rng.standard_normal((int(rng.integers(8, 25)), DQ), dtype=np.float32)
                lines.append(f"{cid} a query about moment {k} of {vid}")
    (root / "TextData" / "tvrtrain.caption.txt").write_text("\n".join(lines) + "\n")
    return vids


class _Release:
    """Shared index of the generated release (id -> row, video -> frames, video -> captions)."""

    def __init__(self, root: Path):
        feat = root / "FeatureData" / "i3d_resnet"
        self.bin = feat / "feature.bin"
        self.row = {name: i for i, name in enumerate((feat / "id.txt").read_text().split())}
        self.v2f = ast.literal_eval((feat / "video2frames.txt").read_text())
        self.caps: dict[str, list[tuple[str, str]]] = {}
        for line in (root / "TextData" / "tvrtrain.caption.txt").read_text().splitlines():
            cid, text = line.split(" ", 1)
            self.caps.setdefault(cid.split("#", 1)[0], []).append((cid, text))
        self.h5 = h5py.File(root / "TextData" / "roberta_tvr_query_feat.hdf5", "r")


def reference_video(rel: _Release, vid: str) -> VideoSample:
    """One video read the way the reference dataset reads it (see the module docstring)."""
    vecs = []
    for name in rel.v2f[vid]:
        with open(rel.bin, "rb") as f:
            f.seek(rel.row[name] * DV * 4)
            row = array.array("f")
            row.fromfile(f, DV)
        vecs.append(row.tolist())
    frames = l2_normalise(uniform_sample(np.array(vecs, dtype=np.float32)))
    caps = rel.caps[vid]
    tokens = [l2_normalise(rel.h5[cid][...])[:30] for cid, _ in caps]
    return VideoSample(vid, frames, tokens, [c for c, _ in caps], [t for _, t in caps],
                       n_frames_orig=len(vecs))


def write_shards(rel: _Release, vids: list[str], out: Path, per_shard: int) -> None:
    feats = np.memmap(rel.bin, dtype=np.float32, mode="r").reshape(-1, DV)

    def load(vid):
        rows = [rel.row[n] for n in rel.v2f[vid]]
        caps = rel.caps[vid]
        return VideoSample(vid, prepare_frames(feats[rows]),
                           [prepare_tokens(rel.h5[cid][...]) for cid, _ in caps],
                           [c for c, _ in caps], [t for _, t in caps], n_frames_orig=len(rows))

    write_split(out, "train", vids, load, videos_per_shard=per_shard,
                dims={"video_dim": DV, "query_dim": DQ}, progress=False)


def _first_batch(shards: Path, batch: int, steps: int, workers: int):
    """An epoch of the reader past its first batch, and the seconds that batch took (start-up:
    the DataLoader's workers, once per epoch)."""
    reader = ShardReader(shards, batch_videos=batch, loader_workers=workers, steps_per_epoch=steps,
                         seed=0, shuffle_buffer=batch, video_dim=DV, query_dim=DQ)
    t0 = time.perf_counter()
    batches = reader.epoch(0)
    next(batches)
    return batches, time.perf_counter() - t0


def _ready(batches) -> int:
    """The next batch as a CPU training step takes it (the trainer's ``_to_device``: a float32
    batch, as the baseline's); its video count."""
    return _to_device(next(batches), CPU, torch.float32).num_videos


class _Clock:
    """Wall and this process's CPU seconds, summed over the intervals timed."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._t = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]


def time_side_by_side(rel: _Release, vids: list[str], shards: Path, batch: int, per_round: int):
    """(baseline clock, ours clock, ours videos, ours start-up s) with the reader in-process,
    interleaved: each baseline batch is read in ``per_round`` parts with one of the reader's
    batches after each, so both sides meet the same moments of a busy machine."""
    groups = [vids[i:i + batch] for i in range(0, len(vids), batch)]
    ours, first = _first_batch(shards, batch, len(groups) * per_round + 1, 0)
    base, mine, n = _Clock(), _Clock(), 0
    for group in groups:
        videos, part = [], -(-len(group) // per_round)
        for i in range(0, len(group), part):
            with base:
                videos += [reference_video(rel, v) for v in group[i:i + part]]
            with mine:
                n += _ready(ours)
        with base:
            collate(videos)
    ours.close()
    return base, mine, n, first


def time_reader(shards: Path, batches: int, batch: int, workers: int):
    """(clock, videos, start-up s) of ``batches`` batches from the first on."""
    rest, first = _first_batch(shards, batch, batches + 1, workers)
    clock, n = _Clock(), 0
    with clock:
        for _ in range(batches):
            n += _ready(rest)
    rest.close()
    return clock, n, first


def time_hash(shards_dir: Path, batch: int, batches: int, runs: int) -> dict:
    """What the streaming sha256 check costs: ``cpu_ms_per_shard``, hashing one shard's bytes
    (hashlib, in this thread); ``wall_share``, the in-process reader's seconds per video with the
    check over without it, minus 1 (best of ``runs`` each, interleaved; the hash runs in a thread
    of its own beside the decoding); ``cpu_share``, the hash's CPU time over the reader's."""
    import hashlib

    shards = sorted(shards_dir.glob("*.tar"))
    cpu = []
    for _ in range(runs):
        t0 = time.process_time()
        for path in shards:
            hashlib.sha256(path.read_bytes()).hexdigest()
        cpu.append((time.process_time() - t0) / len(shards))
    wall = {True: [], False: []}
    reader_cpu = []
    for _ in range(runs):
        for hashed in (True, False):
            reader = ShardReader(shards_dir, batch_videos=batch, loader_workers=0,
                                 steps_per_epoch=batches, seed=0, shuffle_buffer=batch,
                                 video_dim=DV, query_dim=DQ, true_epochs=False)
            if not hashed:
                reader.plan.hashes = {}
            n, t0, c0 = 0, time.perf_counter(), time.process_time()
            for b in reader.epoch(0):
                n += _to_device(b, CPU, torch.float32).num_videos
            wall[hashed].append((time.perf_counter() - t0) / n)
            if not hashed:
                reader_cpu.append((time.process_time() - c0) / n)
    per_video = min(cpu) * len(shards) / _videos(shards_dir)
    return {"cpu_ms_per_shard": min(cpu) * 1e3,
            "wall_share": min(wall[True]) / min(wall[False]) - 1,
            "cpu_share": per_video / min(reader_cpu)}


def _videos(shards_dir: Path) -> int:
    from sharding.writer import load_manifest

    return load_manifest(str(shards_dir)).totals["videos"]


def read_files(paths: list[Path]) -> float:
    """Seconds to read every byte of ``paths`` into one reused buffer (the floor; the first
    call also warms the page cache)."""
    view = memoryview(bytearray(max(p.stat().st_size for p in paths)))
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


def time_step(videos: int, runs: int) -> float:
    """Median seconds of the student's training step (``bench.step``'s) at TVR dims."""
    cfg = LossConfig()
    torch.manual_seed(0)
    model = DualStudent(ModelConfig(video_dim=DV, query_dim=DQ, hidden=384),
                        check_inputs=False).train()
    opt = build_optimizer(model, OptimConfig())
    batch = make_batch(videos, 5, 128, DV, DQ, seed=1)
    teacher = make_teacher(batch, seed=2)
    times = []
    for k in range(runs + 1):   # the first is a warm-up
        t0 = time.perf_counter()
        ours_step(model, opt, batch, teacher, cfg, torch.Generator().manual_seed(k))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32, help="videos per batch (TVR: 32)")
    parser.add_argument("--passes", type=int, default=4,
                        help="ours: batches per baseline batch (passes over the videos)")
    parser.add_argument("--per-shard", type=int, default=10)
    parser.add_argument("--step-runs", type=int, default=3, help="timed training steps")
    parser.add_argument("--hash-runs", type=int, default=5,
                        help="passes over the shards timing the sha256 check (best taken)")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # reading is compared per core; the step gets them all back
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tvr"
        vids = make_release(root, args.videos)
        rel = _Release(root)
        shards_dir = Path(tmp) / "shards"
        write_shards(rel, vids, shards_dir, args.per_shard)
        shards = sorted(shards_dir.glob("*.tar"))
        read_files([p for p in root.rglob("*") if p.is_file()] + shards)   # both caches warm
        floor = min(read_files(shards) for _ in range(3))
        mb_per_video = sum(p.stat().st_size for p in shards) / args.videos / 1e6
        rounds = -(-args.videos // args.batch)
        base, clock, n, start = time_side_by_side(rel, vids, shards_dir, args.batch, args.passes)
        ours = {0: (clock, n, start)}
        for w in (1, 2):
            ours[w] = time_reader(shards_dir, rounds * args.passes, args.batch, w)
        hashing = time_hash(shards_dir, args.batch, rounds * args.passes, args.hash_runs)
        rel.h5.close()
    torch.set_num_threads(threads)
    step_s = time_step(args.batch, args.step_runs)
    step_videos_s = args.batch / step_s
    floor_videos_s = args.videos / floor
    base_rate = args.videos / base.wall
    rate = {w: n / clock.wall for w, (clock, n, _) in ours.items()}
    sfx = {0: "", 1: "_workers1", 2: "_workers2"}
    result = {
        "dims": {"video_dim": DV, "query_dim": DQ}, "videos": args.videos, "batch": args.batch,
        "cpu_count": os.cpu_count(), "threads_read": 1, "threads_step": threads,
        "baseline_videos_s": round(base_rate, 1),
        **{f"ours_videos_s{sfx[w]}": round(rate[w], 1) for w in rate},
        "speedup": round(rate[0] / base_rate, 1),
        "floor_videos_s": round(floor_videos_s, 1),
        "ours_over_floor": round(floor_videos_s / rate[0], 1),
        "shard_mb_per_video": round(mb_per_video, 3),
        "ours_mb_s": round(rate[0] * mb_per_video, 1),
        "main_cpu_ms_per_batch": {str(w): round(clock.cpu * args.batch / n * 1e3, 1)
                                  for w, (clock, n, _) in ours.items()},
        "first_batch_s": {str(w): round(start, 2) for w, (_, _, start) in ours.items()},
        "hash_cpu_ms_per_shard": round(hashing["cpu_ms_per_shard"], 2),
        "hash_wall_share_of_reader": round(hashing["wall_share"], 3),
        "hash_cpu_share_of_reader": round(hashing["cpu_share"], 3),
        "step_s": round(step_s, 3),
        "step_videos_s": round(step_videos_s, 1),
        **{f"feed_over_step{sfx[w]}": round(rate[w] / step_videos_s, 1) for w in rate},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

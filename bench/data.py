"""Data loading: the shard reader vs the reference's BigFile + HDF5 reads, at TVR dims, one run.

Both sides start from the same generated MS-SL release layout (BigFile ``feature.bin`` with
``video2frames.txt``, RoBERTa token HDF5), which is also converted to shards here. The baseline
reads the way the reference dataset does: per frame, open ``feature.bin``, seek, read into an
``array('f')`` and turn it into a Python list, stack, uniform-sample, L2; per caption an h5py
lookup by key. Both sides collate with ``sharding.batch.collate``. Prints one JSON line:
``ours_videos_s`` is the reader in-process (one core, loader_workers=0), the fair per-core
comparison; the 1- and 2-worker DataLoader figures are reported beside it.
"""
from __future__ import annotations

import argparse
import array
import ast
import json
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from sharding.batch import VideoSample, collate
from sharding.preprocess import l2_normalise, prepare_frames, prepare_tokens, uniform_sample
from sharding.reader import ShardReader
from sharding.writer import write_split

DV, DQ = 3072, 768   # TVR i3d_resnet, RoBERTa (method.md §2)


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


def time_baseline(rel: _Release, vids: list[str], batch: int, passes: int) -> float:
    t0 = time.perf_counter()
    for _ in range(passes):
        for i in range(0, len(vids), batch):
            collate([reference_video(rel, v) for v in vids[i:i + batch]])
    return passes * len(vids) / (time.perf_counter() - t0)


def time_reader(shards: Path, n_videos: int, batch: int, passes: int, workers: int) -> float:
    steps = passes * n_videos // batch
    reader = ShardReader(shards, batch_videos=batch, loader_workers=workers, steps_per_epoch=steps,
                         seed=0, shuffle_buffer=batch, video_dim=DV, query_dim=DQ)
    t0 = time.perf_counter()
    n = sum(b.num_videos for b in reader.epoch(0))
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16, help="videos per batch while timing")
    parser.add_argument("--passes", type=int, default=3, help="passes over the videos (ours)")
    parser.add_argument("--per-shard", type=int, default=10)
    parser.add_argument("--train-batch", type=int, default=128, help="batch the trainer uses")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tvr"
        vids = make_release(root, args.videos)
        rel = _Release(root)
        write_shards(rel, vids, Path(tmp) / "shards", args.per_shard)
        shard_bytes = sum(p.stat().st_size for p in (Path(tmp) / "shards").glob("*.tar"))
        mb_per_video = shard_bytes / args.videos / 1e6
        base = time_baseline(rel, vids, args.batch, 1)
        ours = {w: time_reader(Path(tmp) / "shards", args.videos, args.batch, args.passes, w)
                for w in (0, 1, 2)}
    result = {
        "dims": {"video_dim": DV, "query_dim": DQ}, "videos": args.videos, "batch": args.batch,
        "cpu_count": os.cpu_count(),
        "baseline_videos_s": round(base, 1),
        "ours_videos_s": round(ours[0], 1),
        "ours_videos_s_workers1": round(ours[1], 1),
        "ours_videos_s_workers2": round(ours[2], 1),
        "ours_mb_s": round(ours[0] * mb_per_video, 1),
        "ours_mb_s_workers2": round(ours[2] * mb_per_video, 1),
        "shard_mb_per_video": round(mb_per_video, 3),
        "speedup": round(ours[0] / base, 1),
        "feeds_steps_s_at_train_batch": round(ours[0] / args.train_batch, 2),
        "feeds_steps_s_at_train_batch_workers2": round(ours[2] / args.train_batch, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Resident vs streaming training data on the same split: batches per second, and the cost of
holding the split.

The split is a synthetic world's training split with teacher frames (JPEG), as the online
teacher reads it: the case where decoding dominates reading. Both sides are true epochs
(``data.true_epochs``) over the same permutation, in this process (0 loader workers), and yield
the same batches (tests/integration/test_true_epochs.py checks it). Streaming reads and decodes
every epoch; resident decodes once (``load_s``) and then only collates. Floor: collating
already decoded videos, which is what a resident epoch does, so ``resident_over_floor`` ~ 1.

Run: ``python -m bench.resident [--videos 300] [--epochs 3]``; prints one JSON object on its
last line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sharding.reader import ShardReader
from sharding.synthetic import build_world


def _epoch_s(reader: ShardReader, epoch: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    steps = sum(1 for _ in reader.epoch(epoch))
    return time.perf_counter() - t0, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dldkd-resident-"))
    build_world(root, videos=args.videos, eval_videos=1, pretrain_pairs=0, progress=False)
    split = str(root / "train")
    common = dict(batch_videos=args.batch, loader_workers=0, seed=0, true_epochs=True)
    streaming = ShardReader(split, **common)
    t0 = time.perf_counter()
    resident = ShardReader(split, resident=True, **common)
    load_s = time.perf_counter() - t0
    _epoch_s(streaming, 0)   # warm: page cache, allocator
    times: dict[str, list[float]] = {"streaming": [], "resident": []}
    for epoch in range(1, args.epochs + 1):   # interleaved: machine noise hits both sides
        for side, reader in (("streaming", streaming), ("resident", resident)):
            seconds, steps = _epoch_s(reader, epoch)
            times[side].append(steps / seconds)
    from sharding.batch import collate

    videos = [v for v in resident.plan.videos if not isinstance(v, str)]
    t0 = time.perf_counter()
    for i in range(0, len(videos), args.batch):
        collate(videos[i:i + args.batch])
    floor = -(-len(videos) // args.batch) / (time.perf_counter() - t0)
    stream, res = statistics.median(times["streaming"]), statistics.median(times["resident"])
    shutil.rmtree(root)
    print(json.dumps({"videos": args.videos, "batch": args.batch,
                      "steps_per_epoch": streaming.steps_per_epoch,
                      "streaming_steps_s": round(stream, 1), "resident_steps_s": round(res, 1),
                      "speedup": round(res / stream, 1), "load_s": round(load_s, 2),
                      "floor_steps_s": round(floor, 1),
                      "resident_over_floor": round(floor / res, 2)}))


if __name__ == "__main__":
    main()

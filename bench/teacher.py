"""Time spent on teacher targets per training step, next to the student's own step.

One realistic batch of the synthetic world (the demo's dims: 128-d frames, 64-d tokens, 32x32
teacher frames, 2-6 captions per video) with the tiny open_clip teacher, timed for placement
``replicated`` (cache off), ``zero3`` (2 CPU ranks, cache off; each rank its own batch) and
``cached`` (replicated, after one pass over the batch: only the text tower and the cache
lookup run), and the student's step (DualStudent forward, DL-DKD++ total_loss, backward,
BERT-Adam) at the same batch in the same process. Parameter memory per rank per placement is
reported in MB. Run: ``python -m bench.teacher [--videos 32] [--steps 5]``; prints one JSON
object on its last line.
"""
from __future__ import annotations

import trainer.teacher  # noqa: F401  (before open_clip)

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dldkd_configs import preset
from sharding.batch import Batch, collate
from sharding.synthetic import World, WorldConfig
from trainer.config import LossConfig, ModelConfig, OptimConfig, TeacherConfig
from trainer.method.losses import total_loss
from trainer.method.schedules import loss_weights
from trainer.method.optim import build_optimizer
from trainer.method.student import DualStudent
from trainer.teacher.model import Teacher, build_teacher
from trainer.teacher.placement import param_fraction

TINY = preset("teacher-tiny.json")
EPOCH = 40


def make_batch(videos: int, rank: int = 0) -> Batch:
    world = World(0, WorldConfig())
    return collate([world.sample("train", rank * videos + i) for i in range(videos)])


def teacher_cfg(**kw) -> TeacherConfig:
    return TeacherConfig(arch="teacher-tiny", model_config=TINY, image_batch=256, cache=False,
                         **kw)


def median_ms(fn, steps: int) -> float:
    fn()  # warm-up (and, for the cached teacher, the first epoch)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def param_mb(teacher: Teacher) -> float:
    full = sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
               for p in teacher.clip.parameters())
    return full * param_fraction(teacher.clip) / 2**20


def student_ms(batch: Batch, steps: int, teacher: Teacher) -> float:
    torch.manual_seed(0)
    model = DualStudent(ModelConfig(video_dim=batch.video_feats.shape[-1],
                                    query_dim=batch.query_feats.shape[-1]))
    opt = build_optimizer(model, OptimConfig())
    targets = teacher.targets(batch)
    loss_cfg = LossConfig()

    def step():
        opt.zero_grad()
        loss, _ = total_loss(model(batch), batch.labels, batch.video_mask, targets, loss_cfg,
                             loss_weights(loss_cfg, EPOCH), check=False)
        loss.backward()
        opt.step()
    return median_ms(step, steps)


def _zero3_worker(rank: int, port: int, videos: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    from trainer import dist

    dist.init(use_gpu=False)
    torch.manual_seed(0)
    teacher = build_teacher(teacher_cfg(placement="zero3"))
    batch = make_batch(videos, rank)
    ms = median_ms(lambda: teacher.targets(batch), steps)
    Path(out, f"zero3-{rank}.json").write_text(json.dumps(
        {"ms": ms, "fraction": param_fraction(teacher.clip), "param_mb": param_mb(teacher)}))


def zero3(videos: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.start_processes(_zero3_worker, args=(port, videos, steps, out), nprocs=2,
                           start_method="spawn")
        ranks = [json.loads(Path(out, f"zero3-{r}.json").read_text()) for r in range(2)]
    return {"zero3_ms": max(r["ms"] for r in ranks),
            "zero3_param_fraction": max(r["fraction"] for r in ranks),
            "param_mb_zero3": max(r["param_mb"] for r in ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=32, help="videos per batch (per rank)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    ap.add_argument("--no-zero3", action="store_true", help="skip the 2-rank measurement")
    args = ap.parse_args()
    batch = make_batch(args.videos)
    torch.manual_seed(0)
    replicated = build_teacher(teacher_cfg())
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = build_teacher(teacher_cfg().model_copy(update={"cache": True,
                                                          "cache_dir": cache_dir}))
        res = {"videos": batch.num_videos, "queries": batch.num_queries,
               "frames": int(batch.video_mask.sum()),
               "distinct_teacher_frames": int(((batch.teacher_index >= 0)
                                               & (batch.video_mask > 0)).sum()),
               "replicated_ms": median_ms(lambda: replicated.targets(batch), args.steps),
               "cached_ms": median_ms(lambda: cached.targets(batch), args.steps),
               "student_ms": student_ms(batch, args.steps, replicated)}
    res["cached_over_student"] = res["cached_ms"] / res["student_ms"]
    res["replicated_over_student"] = res["replicated_ms"] / res["student_ms"]
    res["param_mb_replicated"] = res["param_mb_cached"] = param_mb(replicated)
    if not args.no_zero3:
        res.update(zero3(args.videos, args.steps))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()

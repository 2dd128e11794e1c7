"""The ZeRO-3 teacher on two CPU ranks (gloo): the same targets as a replicated copy, about half
the parameters per rank, no hang when one rank has a short last batch or a fully cached one, and
a bad checkpoint fails on every rank instead of hanging the others.

One spawn runs every check (starting two DeepSpeed processes costs most of the time); DeepSpeed's
shared-memory comm op is not JIT-compiled (trainer.dist.init skips it on CPU).
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "teacher-tiny.json")
WORLD = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, n_videos: int, seed: int):
    import numpy as np

    from sharding.batch import VideoSample, collate

    rng = np.random.default_rng([seed, rank])
    samples = [VideoSample(
        video_id=f"s{seed}r{rank}v{i}", frames=rng.standard_normal((10, 8)).astype(np.float32),
        tokens=[rng.standard_normal((4, 6)).astype(np.float32) for _ in range(2)],
        cap_ids=[f"r{rank}v{i}#{c}" for c in range(2)],
        captions=[f"a striped red square {i} {c}" for c in range(2)],
        teacher_frames=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
        for i in range(n_videos)]
    return collate(samples)


def _worker(rank: int, port: int, ckpt: str, bad_ckpt: str, cache_dir: str, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    result: dict = {}
    try:
        from trainer import dist
        from trainer.config import TeacherConfig
        from trainer.teacher.model import build_teacher
        from trainer.teacher.placement import param_fraction
        from trainer.teacher.weights import TeacherError

        dist.init(use_gpu=False)
        cfg = TeacherConfig(arch="teacher-tiny", model_config=TINY, pretrained=ckpt,
                            image_batch=4, cache=False)
        replicated = build_teacher(cfg)
        zero3 = build_teacher(cfg.model_copy(update={"placement": "zero3"}))
        result["fraction"] = param_fraction(zero3.clip)
        result["same_identity"] = zero3.identity == replicated.identity
        # A short last batch: rank 1 has one video (2 captions, 6 frames), rank 0 three.
        batch = _batch(rank, 3 if rank == 0 else 1, seed=0)
        a, b = zero3.targets(batch), replicated.targets(batch)
        result["tau_err"] = (a.tau - b.tau).abs().max().item()
        result["T_err"] = (a.T - b.T).abs().max().item()
        # Cached frames: rank 1 sees its batch again (no image to encode), rank 0 a new one.
        cached = build_teacher(cfg.model_copy(update={"placement": "zero3", "cache": True,
                                                     "cache_dir": cache_dir}))
        cached.targets(batch)
        again = batch if rank == 1 else _batch(rank, 2, seed=1)
        c, d = cached.targets(again), replicated.targets(again)
        result["cached_err"] = max((c.tau - d.tau).abs().max().item(),
                                   (c.T - d.T).abs().max().item())
        result["cached_hits"] = cached.cache.stats.hits
        result["calls"] = [zero3.calls, cached.calls]
        try:
            build_teacher(cfg.model_copy(update={"placement": "zero3", "pretrained": bad_ckpt}))
            result["bad"] = "no error"
        except TeacherError as err:
            result["bad"] = str(err)
    except Exception:  # noqa: BLE001  (reported to the test process)
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_zero3_teacher_on_two_cpu_ranks(tmp_path):
    import trainer.teacher  # noqa: F401

    import open_clip

    open_clip.add_model_config(TINY)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("teacher-tiny").state_dict(), ckpt)
    bad = tmp_path / "bad.pt"
    sd = open_clip.create_model("teacher-tiny").state_dict()
    sd["extra.weight"] = torch.zeros(2)
    del sd["ln_final.bias"]
    torch.save(sd, bad)
    ctx = mp.start_processes(_worker, args=(_free_port(), str(ckpt), str(bad), str(tmp_path / "c"),
                                            str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ZeRO-3 teacher ranks did not finish in {TIMEOUT_S} s (a hang)")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        assert abs(res["fraction"] - 1 / WORLD) < 0.01  # partitioned numel / full numel
        assert res["same_identity"]
        assert res["tau_err"] < 1e-5 and res["T_err"] < 1e-4
        assert res["cached_err"] < 1e-4
        assert "does not fit the architecture" in res["bad"] and "ln_final.bias" in res["bad"]
    assert results[1]["cached_hits"] == 6  # its second batch came from the cache alone
    assert results[0]["calls"] == results[1]["calls"]  # the same forwards on both ranks

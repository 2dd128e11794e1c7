"""One training step (forward, backward, optimiser) of the full DL-DKD++ loss at TVR dims.

Ours (trainer.losses.total_loss, vectorised) against the reference-style baseline
(bench.reference_losses: Python loops, deep copy, anomaly mode) in the same process, on the same
batch, weights and negative draws: both must give the same loss value (checked with dropout off,
then timed in training mode with the TVR preset's dropout 0.2).
Run: ``python -m bench.step [--steps N]``; prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

from bench import reference_losses
from sharding.batch import Batch, VideoSample, collate
from trainer.config import LossConfig, ModelConfig, OptimConfig
from trainer.losses import PAD_SCORE, TeacherTargets, total_loss
from trainer.optim import build_optimizer
from trainer.schedules import loss_weights
from trainer.student import DualStudent

EPOCH = 40  # alpha = 0.675: both the hard and the soft parts of soft_nce are live


def make_batch(B: int, captions: int, L: int, Dv: int, Dq: int, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    samples = []
    for j in range(B):
        n = L if j == 0 else int(rng.integers(L // 2, L + 1))
        tokens = [rng.standard_normal((int(rng.integers(8, 31)), Dq)).astype(np.float32)
                  for _ in range(captions)]
        samples.append(VideoSample(
            video_id=f"v{j}", frames=rng.standard_normal((n, Dv)).astype(np.float32),
            tokens=tokens, cap_ids=[f"v{j}#enc#{k}" for k in range(captions)],
            captions=[""] * captions))
    return collate(samples, max_words=30)


def make_teacher(batch: Batch, seed: int) -> TeacherTargets:
    g = torch.Generator().manual_seed(seed)
    Q, B, L = batch.num_queries, batch.num_videos, batch.video_feats.shape[1]
    tau = (torch.rand(Q, B, L, generator=g) * 2 - 1).masked_fill(batch.video_mask[None] == 0,
                                                                  PAD_SCORE)
    T = torch.randn(Q, B, generator=g) * 5
    return TeacherTargets(tau=tau, T=T)


def ours_step(model, optimizer, batch, teacher, cfg, generator) -> float:
    optimizer.zero_grad()
    loss, _ = total_loss(model(batch), batch.labels, batch.video_mask, teacher, cfg,
                         loss_weights(cfg, EPOCH), generator, check=False)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--frames", type=int, default=128)
    args = parser.parse_args()

    mcfg = ModelConfig(video_dim=3072, query_dim=768, hidden=384)  # TVR dims, dropout 0.2
    lcfg = LossConfig()                                               # hard_pool 20, soft, dynamic
    torch.manual_seed(0)
    ours_model = DualStudent(mcfg, check_inputs=False).train()  # as in training
    base_model = copy.deepcopy(ours_model)
    ours_opt = build_optimizer(ours_model, OptimConfig())
    base_opt = build_optimizer(base_model, OptimConfig())
    batch = make_batch(args.videos, args.captions, args.frames, 3072, 768, seed=1)
    teacher = make_teacher(batch, seed=2)

    def run(side: str, k: int) -> float:
        torch.manual_seed(100 + k)
        gen = torch.Generator().manual_seed(200 + k)
        t0 = time.perf_counter()
        if side == "ours":
            ours_step(ours_model, ours_opt, batch, teacher, lcfg, gen)
        else:
            reference_losses.step(base_model, base_opt, batch, teacher, lcfg, EPOCH, gen)
        return (time.perf_counter() - t0) * 1e3

    # Same weights, inputs and draws; dropout off (its masks are drawn in a different order on
    # the two sides, packed vs padded): the loss values must agree.
    ours_model.eval()
    base_model.eval()
    with torch.no_grad():
        ours_loss, _ = total_loss(ours_model(batch), batch.labels, batch.video_mask, teacher,
                                  lcfg, loss_weights(lcfg, EPOCH), torch.Generator().manual_seed(7))
        base_loss = reference_losses.total_loss(base_model, batch, teacher, lcfg, EPOCH,
                                                torch.Generator().manual_seed(7))
    diff = abs(ours_loss.item() - base_loss.item())
    assert diff <= 1e-5 * max(1.0, abs(base_loss.item())), (ours_loss.item(), base_loss.item())
    ours_model.train()
    base_model.train()
    run("ours", 0)  # warm-up
    run("base", 0)
    ours_ms, base_ms = [], []
    for k in range(1, args.steps + 1):  # interleaved so machine noise hits both sides alike
        ours_ms.append(run("ours", k))
        base_ms.append(run("base", k))
    ours, base = statistics.median(ours_ms), statistics.median(base_ms)
    print(json.dumps({"ours_ms": round(ours, 1), "baseline_ms": round(base, 1),
                      "speedup": round(base / ours, 2), "loss_abs_diff": diff,
                      "loss": ours_loss.item(), "queries": batch.num_queries,
                      "videos": batch.num_videos, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()

"""One training step (forward, backward, optimiser) of the full DL-DKD++ loss at TVR dims.

Ours (trainer.method.losses.total_loss, vectorised) against the reference-style baseline
(bench.reference_losses: Python loops, deep copy, anomaly mode) in the same process, on the same
batch, weights and negative draws: both must give the same loss value (checked with dropout off,
then timed in training mode with the TVR preset's dropout 0.2).
Floor: the step's own matrix products, replayed bare. One step of ours is profiled with its
shapes recorded; every ``mm``/``addmm``/``bmm`` it ran (forward and backward: the projections,
the attention and the score products) is then timed alone on random tensors of the same shapes,
in the same process. ``ours_over_floor`` is our step time over that sum: what the rest of the
step (element-wise ops, the optimizer, Python) costs on top of the unavoidable products.

Options, each its own row: ``--bf16`` times ours under CPU bf16 autocast (as
``dist.precision=bf16`` runs without DeepSpeed; ``bf16_ms``, and its loss in ``bf16_loss``);
``--compile`` times ours with the input and attention blocks under ``torch.compile``
(``compiled_ms``, and ``compile_s``: the first call, compilation included).

Run: ``python -m bench.step [--steps N] [--bf16] [--compile]``; prints one JSON object on its
last line.
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
from trainer.method.losses import PAD_SCORE, TeacherTargets, total_loss
from trainer.method.optim import build_optimizer
from trainer.method.schedules import loss_weights
from trainer.method.student import DualStudent, _InputLayer, _SelfAttention

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


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_shapes(step) -> list[tuple[str, list]]:
    """The (op, input shapes) of every matrix product one call of ``step`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return [(e.name, e.input_shapes) for e in prof.events() if e.name in MATMULS]


def floor_ms(shapes: list[tuple[str, list]], reps: int = 3) -> float:
    """Median over ``reps`` of the summed time of the products, each run bare."""
    calls = []
    for name, shp in shapes:
        if name == "aten::addmm":
            args = (torch.randn(shp[0]), torch.randn(shp[1]), torch.randn(shp[2]))
            calls.append((torch.addmm, args))
        else:
            op = torch.mm if name == "aten::mm" else torch.bmm
            calls.append((op, (torch.randn(shp[0]), torch.randn(shp[1]))))
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for op, args in calls:
            op(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--bf16", action="store_true", help="add the bf16-autocast row")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row")
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

    extra = {}   # side -> (model, optimizer, autocast dtype or None)
    if args.bf16:
        bf16_model = copy.deepcopy(ours_model)
        extra["bf16"] = (bf16_model, build_optimizer(bf16_model, OptimConfig()), torch.bfloat16)
    if args.compile:
        compiled = copy.deepcopy(ours_model)
        for module in compiled.modules():
            if isinstance(module, (_InputLayer, _SelfAttention)):
                module.compile()   # in place: the state dict keeps its keys
        extra["compiled"] = (compiled, build_optimizer(compiled, OptimConfig()), None)

    def run(side: str, k: int) -> float:
        torch.manual_seed(100 + k)
        gen = torch.Generator().manual_seed(200 + k)
        t0 = time.perf_counter()
        if side == "ours":
            ours_step(ours_model, ours_opt, batch, teacher, lcfg, gen)
        elif side == "base":
            reference_losses.step(base_model, base_opt, batch, teacher, lcfg, EPOCH, gen)
        else:
            model, opt, dtype = extra[side]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                losses[side] = ours_step(model, opt, batch, teacher, lcfg, gen)
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
    losses: dict[str, float] = {}
    run("ours", 0)  # warm-up
    run("base", 0)
    rows = {side: round(run(side, 0) / 1e3, 1) for side in extra}   # compilation included
    ours_ms, base_ms = [], []
    extra_ms: dict[str, list[float]] = {side: [] for side in extra}
    for k in range(1, args.steps + 1):  # interleaved so machine noise hits every side alike
        ours_ms.append(run("ours", k))
        base_ms.append(run("base", k))
        for side in extra:
            extra_ms[side].append(run(side, k))
    ours, base = statistics.median(ours_ms), statistics.median(base_ms)
    optional = {}
    if args.bf16:
        optional.update(bf16_ms=round(statistics.median(extra_ms["bf16"]), 1),
                        bf16_over_ours=round(statistics.median(extra_ms["bf16"]) / ours, 2),
                        bf16_loss=losses["bf16"])
    if args.compile:
        optional.update(compiled_ms=round(statistics.median(extra_ms["compiled"]), 1),
                        compiled_over_ours=round(statistics.median(extra_ms["compiled"]) / ours, 2),
                        compile_s=rows["compiled"])
    shapes = matmul_shapes(lambda: ours_step(ours_model, ours_opt, batch, teacher, lcfg,
                                             torch.Generator().manual_seed(0)))
    floor = floor_ms(shapes)
    gflop = sum(2 * _prod(s[-2]) * s[-1][-1] if n != "aten::addmm" else 2 * _prod(s[1]) * s[2][-1]
                for n, s in shapes) / 1e9
    print(json.dumps({"ours_ms": round(ours, 1), "baseline_ms": round(base, 1),
                      "speedup": round(base / ours, 2), "floor_ms": round(floor, 1),
                      "ours_over_floor": round(ours / floor, 2), "floor_matmuls": len(shapes),
                      "floor_gflop": round(gflop, 1), "loss_abs_diff": diff,
                      "loss": ours_loss.item(), "queries": batch.num_queries,
                      "videos": batch.num_videos, "threads": torch.get_num_threads(),
                      **optional}))


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


if __name__ == "__main__":
    main()

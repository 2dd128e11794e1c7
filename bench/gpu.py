"""The training step on one GPU at the TVR preset's dims, as the recipe runs it.

DeepSpeed bf16 + ZeRO-2 student (3072 / 768 -> 384, B = 128 videos with 5 captions each, up to
128 steps), online ViT-B-32 teacher (random weights, replicated, bf16, cache off so every frame
is encoded), NCCL world of one. Each phase is timed between ``torch.cuda.synchronize`` calls:
data (collate + host-to-device), teacher, student (forward, loss, backward, optimizer step).

Floor: MFU compares the student's FLOPs (counted with ``torch.utils.flop_counter`` over one
forward + loss + backward) per second of its phase with the device's dense bf16 peak, read from
a small table by device name. The reference-style step (``bench.reference_losses``) is timed on
the same device at B = 32 in fp32, beside ours, as ``bench.step`` does on the CPU.

Run: ``python -m bench.gpu [--steps N]``; prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from dldkd_configs import preset

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; first match wins.
BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
             ("A10", 125e12)]


def bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK if key in name), None)


def _timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1e3


def recipe_step(steps: int, videos: int) -> dict:
    from bench.gpu_world import tvr_sample
    from sharding.batch import collate
    from trainer import dist
    from trainer.config import load_config
    from trainer.engine import build_engine
    from trainer.method.losses import total_loss
    from trainer.recipe import _to_device
    from trainer.method.schedules import loss_weights
    from trainer.method.student import DualStudent
    from trainer.teacher.model import build_teacher

    cfg = load_config(preset("tvr.yaml"), [
        "teacher.placement=replicated", "teacher.arch=ViT-B-32", "teacher.pretrained=",
        "teacher.cache=false", "dist.num_workers=1", "dist.use_gpu=true",
        "dist.precision=bf16", "dist.zero_stage=2", f"data.batch_videos={videos}"])
    info = dist.init(use_gpu=True)
    device = info.device
    torch.manual_seed(0)
    student = DualStudent(cfg.model, check_inputs=False)
    engine = build_engine(cfg, student, total_steps=1000, world_size=1)
    teacher = build_teacher(cfg.teacher, device)
    samples = [tvr_sample(i) for i in range(2 * videos)]
    weights = loss_weights(cfg.loss, 40)
    gen = torch.Generator(device=device).manual_seed(0)

    def student_step(batch, targets):
        scores = engine(batch)
        loss, _ = total_loss(scores, batch.labels, batch.video_mask, targets, cfg.loss, weights,
                             gen, check=False)
        engine.backward(loss)
        engine.step()

    phases = {"data": [], "teacher": [], "student": []}
    torch.cuda.reset_peak_memory_stats()
    for k in range(steps + 2):   # two warm-up steps
        first = (k % 2) * videos
        batch, data_ms = _timed(lambda: _to_device(collate(samples[first:first + videos]),
                                                   device, torch.bfloat16))
        targets, teacher_ms = _timed(lambda: teacher.targets(batch))
        _, student_ms = _timed(lambda: student_step(batch, targets))
        if k >= 2:
            for name, ms in (("data", data_ms), ("teacher", teacher_ms), ("student", student_ms)):
                phases[name].append(ms)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        scores = engine(batch)
        loss, _ = total_loss(scores, batch.labels, batch.video_mask, targets, cfg.loss, weights,
                             gen, check=False)
        engine.backward(loss)
    engine.optimizer.zero_grad()
    flops = counter.get_total_flops()
    med = {name: statistics.median(v) for name, v in phases.items()}
    peak = bf16_peak(torch.cuda.get_device_name())
    return {"videos": videos, "queries": batch.num_queries,
            "samples_s": round(1e3 * videos / sum(med.values()), 1),
            "step_ms": round(sum(med.values()), 1),
            "data_ms": round(med["data"], 1), "teacher_ms": round(med["teacher"], 1),
            "student_ms": round(med["student"], 1),
            "student_gflop": round(flops / 1e9, 1),
            "mfu": round(flops / (med["student"] / 1e3) / peak, 4) if peak else None,
            "bf16_peak_tflops": peak / 1e12 if peak else None,
            "peak_gpu_mb": round(peak_mb, 1)}


def reference_speedup(steps: int) -> dict:
    """Ours vs the reference-style step at B = 32, fp32, on the GPU (same batch and weights)."""
    from bench import reference_losses
    from bench.step import EPOCH, make_batch, make_teacher, ours_step
    from trainer.config import LossConfig, ModelConfig, OptimConfig
    from trainer.method.optim import build_optimizer
    from trainer.recipe import _to_device
    from trainer.method.student import DualStudent

    dev = torch.device("cuda")
    torch.manual_seed(0)
    ours = DualStudent(ModelConfig(), check_inputs=False).to(dev).train()
    base = copy.deepcopy(ours)
    ours_opt, base_opt = build_optimizer(ours, OptimConfig()), build_optimizer(base, OptimConfig())
    batch = _to_device(make_batch(32, 5, 128, 3072, 768, seed=1), dev, torch.float32)
    teacher = make_teacher(batch, seed=2)
    teacher = type(teacher)(*(t.to(dev) for t in teacher))
    lcfg = LossConfig()
    times = {"ours": [], "base": []}
    for k in range(steps + 1):
        gen = torch.Generator(device=dev).manual_seed(k)
        _, o = _timed(lambda: ours_step(ours, ours_opt, batch, teacher, lcfg, gen))
        _, b = _timed(lambda: reference_losses.step(base, base_opt, batch, teacher, lcfg, EPOCH,
                                                    torch.Generator(device=dev).manual_seed(k)))
        if k:
            times["ours"].append(o)
            times["base"].append(b)
    o, b = statistics.median(times["ours"]), statistics.median(times["base"])
    return {"ref_step_ours_ms": round(o, 1), "ref_step_baseline_ms": round(b, 1),
            "ref_step_speedup": round(b / o, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--videos", type=int, default=128)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device (torch.cuda.is_available() is False)")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out.update(recipe_step(a.steps, a.videos))
    out.update(reference_speedup(max(a.steps // 2, 2)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""The GPU path at the TVR preset's dims: NCCL (world 1), bf16, ZeRO-2, an online ViT-B-32
teacher (random weights, replicated), 100 steps with one evaluation, checkpoints and a resume,
with every train step run under ``torch.cuda.set_sync_debug_mode("error")``.

Run with ``make test-gpu`` (also runs ``python -m bench.gpu``); skipped without CUDA.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.gpu_world import QUERY_DIM, VIDEO_DIM, tvr_sample
from sharding.writer import write_split
from trainer.checkpoint import latest
from trainer.config import load_config
from trainer.recipe import Recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]


class _Interrupt(Exception):
    pass


def write_tvr_split(out: Path, split: str, videos: int, seed: int = 0) -> Path:
    """``videos`` random TVR-dim videos as shards with raw teacher frames; returns the folder."""
    write_split(out / split, split, [str(i) for i in range(videos)],
                lambda i: tvr_sample(int(i), seed), videos_per_shard=64,
                dims={"video_dim": VIDEO_DIM, "query_dim": QUERY_DIM, "image_size": 224},
                notes={"world": "random TVR-dim features for the GPU suite"}, progress=False)
    return out / split


def _config(shards, storage):
    return load_config("configs/tvr.yaml", [
        f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", "data.test=",
        "data.batch_videos=128", "data.steps_per_epoch=50", "data.loader_workers=2",
        "train.epochs=2", "train.eval_every=100", "train.ckpt_every=50", "train.log_every=25",
        "teacher.placement=replicated", "teacher.arch=ViT-B-32", "teacher.pretrained=",
        "teacher.cache=false", "dist.num_workers=1", "dist.use_gpu=true", "dist.precision=bf16",
        "dist.zero_stage=2",
        f"run.storage={storage}", "run.name=gpu", "tracking.system_metrics=false"])


def _strict(recipe: Recipe, stop_at: int | None, steps: list[int]) -> None:
    """Run each train step with host syncs as errors. DeepSpeed's backward and optimizer step
    (its gradient hooks and ZeRO bookkeeping, not our code) run with the check relaxed to a
    warning."""
    inner = recipe.train_step

    def relaxed(call):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return call(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return run

    def step(batch, weights, timer):
        if recipe.state.step + 1 == stop_at:
            raise _Interrupt
        torch.cuda.set_sync_debug_mode("error")
        try:
            terms = inner(batch, weights, timer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        steps.append(recipe.state.step + 1)
        return terms

    recipe.engine.backward = relaxed(recipe.engine.backward)
    recipe.engine.step = relaxed(recipe.engine.step)
    recipe.train_step = step


def test_tvr_dims_bf16_zero2_online_teacher_resume(tmp_path):
    shards = tmp_path / "shards"
    write_tvr_split(shards, "train", 256)
    write_tvr_split(shards, "val", 64, seed=1)
    first = Recipe(_config(shards, tmp_path / "runs"))
    first.setup()
    assert first.dist.device.type == "cuda" and torch.distributed.get_backend() == "nccl"
    done: list[int] = []
    _strict(first, 56, done)
    with pytest.raises(_Interrupt):
        first.train()
    first.cleanup("KILLED")
    assert done == list(range(1, 56))
    assert latest(tmp_path / "runs" / "gpu" / "checkpoints").name == "step-00000050"

    second = Recipe(_config(shards, tmp_path / "runs"))
    second.setup()
    assert second.state.step == 50
    resumed: list[int] = []
    _strict(second, None, resumed)
    state = second.train()
    second.cleanup()
    assert resumed == list(range(51, 101)) and state.step == 100
    assert len(state.history) == 1 and state.history[0]["step"] == 100
    assert 0 <= state.best_sumr <= 400

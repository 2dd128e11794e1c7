"""The single-process trainer on a planted-signal problem held in memory (no shards, no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sharding.batch import VideoSample, collate
from trainer.config import load_config
from trainer.evaluate import load_student
from trainer.method.metrics import build_gallery, evaluate
from trainer.recipe import Recipe

DV, DQ = 24, 16


def planted_world(n: int, seed: int) -> list[VideoSample]:
    """Each video hides its own concept in a few frames; its captions name the concept."""
    rng = np.random.default_rng(seed)
    proj = np.random.default_rng(99).normal(size=(DV, DQ))   # shared across splits
    out = []
    for j in range(n):
        concept = rng.normal(size=DV)
        frames = rng.normal(size=(int(rng.integers(8, 20)), DV))
        start = int(rng.integers(0, len(frames) - 3))
        frames[start:start + 3] += 3 * concept                     # the moment
        caps = int(rng.integers(1, 4))
        tokens = [concept @ proj + rng.normal(size=(int(rng.integers(3, 8)), DQ))
                  for _ in range(caps)]
        norm = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
        out.append(VideoSample(f"v{seed}-{j}", norm(frames), [norm(t) for t in tokens],
                               [f"v{seed}-{j}#{k}" for k in range(caps)], ["x"] * caps))
    return out


class MemoryReader:
    """The reader interface over a fixed list of batches."""

    def __init__(self, batches):
        self.batches = batches
        self.steps_per_epoch = len(batches)

    def epoch(self, epoch: int, start_step: int = 0):
        yield from self.batches[start_step:]


def _recipe(tmp_path, overrides, train, val):
    cfg = load_config("configs/tiny.yaml", [
        f"model.video_dim={DV}", f"model.query_dim={DQ}", "model.hidden=64", "loss.kd=off",
        "loss.targets=hard", "loss.hard_pool=3", f"run.storage={tmp_path}", "run.name=mem",
        "tracking.system_metrics=false", "train.log_every=5", "optim.lr=2e-3", *overrides])
    batches = [collate(train[i:i + 16]) for i in range(0, len(train), 16)]
    recipe = Recipe(cfg, use_deepspeed=False, reader=MemoryReader(batches),
                    gallery=build_gallery(val))
    recipe.setup()
    return recipe


def test_planted_signal_ends_far_above_chance(tmp_path):
    train, val = planted_world(160, 0), planted_world(50, 1)
    recipe = _recipe(tmp_path, ["train.epochs=8", "train.early_stop=0"], train, val)
    state = recipe.train()
    recipe.cleanup()
    # Chance on 50 videos: R@1 2, R@5 10, R@10 20, R@100 100 -> SumR 132.
    assert state.best_sumr > 132 + 100, state.history
    assert state.step == 8 * 10
    # best/ holds the best weights: reloaded, they score the best SumR again.
    student, _ = load_student(tmp_path / "mem" / "best")
    assert evaluate(student, build_gallery(val))["SumR"] == pytest.approx(state.best_sumr)
    saved = json.loads((tmp_path / "mem" / "best" / "metrics.json").read_text())
    assert saved["step"] == state.best_step


def test_early_stopping_on_sumr(tmp_path):
    train, val = planted_world(64, 0), planted_world(20, 1)
    # lr 0: nothing improves after the first evaluation, so 2 evaluations later it stops.
    recipe = _recipe(tmp_path, ["train.epochs=10", "train.early_stop=2", "optim.lr=1e-12"],
                     train, val)
    state = recipe.train()
    recipe.cleanup()
    assert state.stopped_early and len(state.history) == 3 and state.step == 3 * 4
    assert state.best_step == 4


def test_empty_batch_and_dim_mismatch_are_clear(tmp_path):
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    train, val = planted_world(16, 0), planted_world(8, 1)
    recipe = _recipe(tmp_path, ["model.video_dim=25", "train.epochs=1"], train, val)
    with pytest.raises(ValueError, match="model.video_dim=25"):
        recipe.train()


def test_a_non_finite_loss_stops_at_the_next_logged_step_before_anything_is_saved(
        tmp_path, monkeypatch):
    """The loss is checked on the device and read only where the loop reads values anyway
    (log, evaluation, checkpoint): NaN at step 3 stops the run at the step-4 checkpoint,
    naming step 3, before that checkpoint is written."""
    import trainer.recipe as recipe_module
    from trainer.checkpoint import latest

    train, val = planted_world(160, 0), planted_world(20, 1)
    recipe = _recipe(tmp_path, ["train.epochs=2", "train.eval_every=10",
                                "train.ckpt_every=2"], train, val)
    real, calls = recipe_module.total_loss, []

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            loss = loss * float("nan")
            terms = {**terms, "loss": loss.detach()}
        return loss, terms

    monkeypatch.setattr(recipe_module, "total_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite at step 3 \(noticed at step 4"):
        recipe.train()
    recipe.cleanup("FAILED")
    # step 4 is a checkpoint step (ckpt_every=2): the check runs before the save
    assert latest(tmp_path / "mem" / "checkpoints").name == "step-00000002"


def test_bf16_autocast_without_deepspeed_tracks_fp32(tmp_path):
    """dist.precision=bf16 without DeepSpeed: autocast over float32 weights. Over 100 steps of
    the tiny recipe its loss stays close to fp32's: the scores and the loss are float32 (autocast
    is off there) and only the encoders' products run in bf16 (8 mantissa bits, ~0.4% each)."""
    import torch

    from trainer.infra.progress import PhaseTimer

    train = planted_world(160, 0)
    curves = {}
    for precision in ("fp32", "bf16"):
        # hard negatives from epoch 3, as this comparison was measured (tiny.yaml now says 2)
        recipe = _recipe(tmp_path / precision, [f"dist.precision={precision}", "train.epochs=10",
                                                "loss.hard_negative_start_epoch=3"],
                         train, planted_world(20, 1))
        assert recipe.dtype == torch.float32                      # inputs stay float32
        assert (recipe.engine.autocast is not None) == (precision == "bf16")
        recipe.engine.train()
        recipe.first_bad_step = torch.full((), -1)       # what Recipe.train sets up
        losses = []
        for step in range(100):
            batch = recipe.reader.batches[step % recipe.steps_per_epoch]
            recipe.state.step, recipe.state.epoch = step, step // recipe.steps_per_epoch
            losses.append(recipe.train_step(batch, recipe.weights(), PhaseTimer())["loss"].item())
        recipe.cleanup()
        assert next(recipe.student.parameters()).dtype == torch.float32
        curves[precision] = np.array(losses)
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-10:].mean() < 0.5 * fp32[:10].mean()            # fp32 learns
    # Per-step losses scatter by ~15% around their trend (batches differ, and dropout masks
    # part ways once the weights do), so the means of the last 20 steps are compared; bf16
    # products in the scores (autocast left on there) gave 70% here.
    rel = abs(bf16[-20:].mean() - fp32[-20:].mean()) / fp32[-20:].mean()
    assert rel < 0.1, (fp32[-20:], bf16[-20:])

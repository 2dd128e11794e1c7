"""Exact resume: a run interrupted at step k and resumed equals a run never interrupted."""
from __future__ import annotations

import pytest

from tests.conftest import tiny_overrides
from trainer.checkpoint import latest
from trainer.config import load_config
from trainer.recipe import Recipe

pytestmark = pytest.mark.slow


class _Interrupt(Exception):
    pass


def _run(cfg, stop_at: int | None = None) -> dict[int, float]:
    """Train; record the loss of every step; raise out of the loop before step ``stop_at``."""
    recipe = Recipe(cfg)
    recipe.setup()
    losses: dict[int, float] = {}
    inner = recipe.train_step

    def step(batch, weights, timer):
        if stop_at is not None and recipe.state.step + 1 == stop_at:
            raise _Interrupt
        terms = inner(batch, weights, timer)
        losses[recipe.state.step + 1] = float(terms["loss"])
        return terms

    recipe.train_step = step
    try:
        recipe.train()
        recipe.cleanup()
    except _Interrupt:
        recipe.cleanup("KILLED")
    return losses


@pytest.mark.parametrize("variant", [
    ["loss.kd=off", "loss.targets=hard"],                        # DL-DKD without a teacher
    ["loss.targets=soft", "loss.kd=dynamic", "teacher.cache=false"],  # DL-DKD++ (online teacher)
    # The GPU presets' precision path on CPU: DeepSpeed bf16 + ZeRO-2 (params in bf16, the
    # evaluation runs the student in bf16, scores and the loss in float32).
    ["loss.kd=off", "loss.targets=hard", "dist.precision=bf16", "dist.zero_stage=2"],
], ids=["hard", "dldkdpp", "bf16-zero2"])
def test_resume_equals_uninterrupted(world, tmp_path, variant):
    over = tiny_overrides(
        world, tmp_path, **{"train.ckpt_every": 2, "train.deterministic": True}) + variant
    full = _run(load_config("configs/tiny.yaml", over + ["run.name=full"]))
    assert sorted(full) == [1, 2, 3, 4, 5, 6]

    first = _run(load_config("configs/tiny.yaml", over + ["run.name=cut"]), stop_at=6)
    assert sorted(first) == [1, 2, 3, 4, 5]
    assert latest(tmp_path / "cut" / "checkpoints").name == "step-00000004"
    resumed = _run(load_config("configs/tiny.yaml", over + ["run.name=cut"]))
    assert sorted(resumed) == [5, 6], "the resumed run must start after the checkpoint (step 4)"
    for step in (5, 6):
        assert resumed[step] == full[step], f"step {step}: {resumed[step]} != {full[step]}"
    for step in (1, 2, 3, 4):
        assert first[step] == full[step]


def test_a_zero3_checkpoint_of_another_worker_count_is_refused(world, tmp_path):
    import json

    from trainer.checkpoint import CheckpointError

    over = tiny_overrides(world, tmp_path, **{"train.epochs": 1}) + [
        "loss.kd=off", "loss.targets=hard", "run.name=ws", "dist.zero_stage=3"]
    _run(load_config("configs/tiny.yaml", over))
    client = latest(tmp_path / "ws" / "checkpoints") / "client.json"
    payload = json.loads(client.read_text())
    assert payload["world_size"] == 1
    client.write_text(json.dumps({**payload, "world_size": 2}))   # as 2 workers would write it
    with pytest.raises(CheckpointError, match="written by 2 workers, this run has 1: a ZeRO-3 "
                                              ".*dist.num_workers=2"):
        Recipe(load_config("configs/tiny.yaml", over)).setup()


def test_resume_refuses_a_checkpoint_missing_this_ranks_state(world, tmp_path):
    over = tiny_overrides(world, tmp_path, **{"train.epochs": 1}) + [
        "loss.kd=off", "loss.targets=hard", "run.name=w"]
    _run(load_config("configs/tiny.yaml", over))
    folder = latest(tmp_path / "w" / "checkpoints")
    client = folder / "client.json"
    assert client.is_file()
    (folder / "rng-rank0.pt").rename(folder / "rng-rank1.pt")
    recipe = Recipe(load_config("configs/tiny.yaml", over))
    with pytest.raises(FileNotFoundError, match="rng-rank0.pt is missing: .* incomplete"):
        recipe.setup()


class _Payload:
    """What an attacker plants: unpickling it would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


@pytest.mark.parametrize("engine_file", ["mp_rank_00_model_states.pt", "rng-rank0.pt"])
def test_resume_refuses_a_planted_pickle_payload(world, tmp_path, engine_file):
    import torch

    from trainer.checkpoint import CheckpointError

    over = tiny_overrides(world, tmp_path, **{"train.epochs": 1}) + [
        "loss.kd=off", "loss.targets=hard", "run.name=p", "dist.zero_stage=2"]
    _run(load_config("configs/tiny.yaml", over))
    folder = latest(tmp_path / "p" / "checkpoints")
    target = next(folder.rglob(engine_file))
    marker = tmp_path / "payload-ran"
    torch.save({"module": _Payload(marker)}, target)
    recipe = Recipe(load_config("configs/tiny.yaml", over))
    with pytest.raises(CheckpointError, match=f"refused to load checkpoint file .*{engine_file}"):
        recipe.setup()
    assert not marker.exists()


def test_relaunch_with_another_config_is_refused_and_allowed_changes_are_recorded(world, tmp_path):
    from mlflow.tracking import MlflowClient

    from trainer.config import ConfigError

    over = tiny_overrides(world, tmp_path, **{"train.epochs": 1}) + [
        "loss.kd=off", "loss.targets=hard", "run.name=r"]
    _run(load_config("configs/tiny.yaml", over))
    changed = Recipe(load_config("configs/tiny.yaml", over + ["optim.lr=0.01", "model.hidden=64"]))
    with pytest.raises(ConfigError, match=r"model.hidden: 128 -> 64; optim.lr: 0.001 -> 0.01.*"
                                          r"new run.name"):
        changed.setup()
    # extending the run is allowed: it resumes, and MLflow records what changed
    longer = _run(load_config("configs/tiny.yaml", over + ["train.epochs=2"]))
    assert sorted(longer) == [4, 5, 6]
    client = MlflowClient(f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["dldkd.resume_changed.train.epochs"] == "1 -> 2"

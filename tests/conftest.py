"""Shared fixtures: one small synthetic world per test session, tiny run configs."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic PRVR world (train/val/test/pretrain) shared by the integration tests."""
    from sharding.synthetic import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, videos=96, eval_videos=32, pretrain_pairs=256, videos_per_shard=24,
                progress=False)
    return out


def tiny_overrides(world, storage, name: str = "t", **extra) -> list[str]:
    """configs/tiny.yaml on the session world, a few short epochs."""
    base = {
        "data.train": str(world / "train"), "data.val": str(world / "val"),
        "run.storage": str(storage), "run.name": name, "train.epochs": 2,
        "data.steps_per_epoch": 3, "train.log_every": 1, "tracking.system_metrics": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_teacher(world, tmp_path_factory) -> str:
    """A tiny open_clip teacher pretrained briefly on the world's image-text split."""
    from trainer.teacher_pretrain import pretrain

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    pretrain(str(world / "pretrain"), str(path), steps=20, batch_size=32, seed=0)
    return str(path)

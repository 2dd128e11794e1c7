"""A run as Ray Train + DeepSpeed workers on a local Ray cluster, tracked in MLflow.

Real Ray, real DeepSpeed engines over gloo, a real MLflow SQLite store, real tar shards.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from bench.servers import train_worker_pids

from tests.conftest import tiny_overrides
from trainer.config import load_config

pytestmark = pytest.mark.slow


def chance_sumr(videos: int) -> float:
    return sum(100.0 * min(k, videos) / videos for k in (1, 5, 10, 100))


@pytest.fixture(scope="module")
def ray_local():
    """The session's shared local cluster (tests/conftest.py ``ray_session``), started here if
    no test of this worker started it yet; left up for the next module."""
    import ray

    if not ray.is_initialized():
        from launch.jobs import ray_setup

        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 runtime_env=ray_setup.runtime_env())   # as dldkd's own launches do
    yield ray


def _mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dldkd")
    runs = client.search_runs([exp.experiment_id], f"tags.`dldkd.run_key` = '{name}'")
    return client, runs


def _fit(cfg):
    from launch.jobs.train import build_trainer

    return build_trainer(cfg).fit()


def test_two_workers_zero2_dldkdpp(ray_local, world, tmp_path, tiny_teacher):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("configs/tiny.yaml", tiny_overrides(
        world, tmp_path, "z2", **{"train.epochs": 4, "data.steps_per_epoch": 8,
                                  "dist.num_workers": 2, "dist.zero_stage": 2,
                                  "teacher.pretrained": tiny_teacher, "tracking.uri": uri,
                                  "loss.hard_negative_start_epoch": 2}))
    result = _fit(cfg)
    assert result.error is None
    client, runs = _mlflow_run(uri, "z2")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["dist.zero_stage"] == "2" and run.data.params["model.hidden"] == "128"
    assert run.data.tags["dldkd.world_size"] == "2"
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                    key=lambda m: m.step)]
    assert len(loss) == 32
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4, f"loss did not go down: {loss}"
    sumr = client.get_metric_history(run.info.run_id, "val/SumR")
    assert len(sumr) == 4
    best = max(m.value for m in sumr)
    assert best > chance_sumr(32) + 30, f"best SumR {best} vs chance {chance_sumr(32):.1f}"
    for key in ("train/inh_kd", "train/lambda", "train/alpha", "train/beta", "perf/teacher_ms"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "best" in artifacts


def test_zero3_student_with_zero3_teacher(ray_local, world, tmp_path, tiny_teacher):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("configs/tiny.yaml", tiny_overrides(
        world, tmp_path, "z3", **{"train.epochs": 2, "data.steps_per_epoch": 4,
                                  "dist.num_workers": 2, "dist.zero_stage": 3,
                                  "teacher.placement": "zero3", "teacher.pretrained": tiny_teacher,
                                  "tracking.uri": uri}))
    result = _fit(cfg)
    assert result.error is None
    client, runs = _mlflow_run(uri, "z3")
    loss = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert len(loss) == 8 and all(m.value == m.value for m in loss)
    assert client.get_metric_history(runs[0].info.run_id, "val/SumR")


def test_sigkilled_worker_restarts_from_checkpoint(ray_local, world, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("configs/tiny.yaml", tiny_overrides(
        world, tmp_path, "kill", **{"train.epochs": 3, "data.steps_per_epoch": 4,
                                    "train.ckpt_every": 2, "dist.num_workers": 2,
                                    "dist.max_failures": 2, "tracking.uri": uri,
                                    "loss.kd": "off", "loss.targets": "hard"}))
    killed = []

    def killer():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            if list((tmp_path / "kill").glob("step-00000004")):
                workers = train_worker_pids()
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(workers[-1])
                    return
            time.sleep(0.5)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = _fit(cfg)
    thread.join(timeout=5)
    assert killed, "the test never found a worker to kill"
    assert result.error is None
    assert result.metrics["step"] == 12.0
    client, runs = _mlflow_run(uri, "kill")
    assert len(runs) == 1, "a restarted run must append to its own MLflow run"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert steps == set(range(1, 13))

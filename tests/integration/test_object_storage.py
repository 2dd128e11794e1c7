"""Runs that live on object storage: shards, checkpoints, best weights and MLflow artifacts on a
real S3 API (moto's server on 127.0.0.1, reached through the standard AWS/MLflow variables)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from bench.servers import train_worker_pids

from tests.conftest import tiny_overrides
from trainer.infra import storage
from trainer.checkpoint import latest
from trainer.config import load_config
from trainer.recipe import Recipe
from trainer.infra.reporting import LocalReporter


@pytest.fixture(scope="module")
def s3_world(world, s3_server):
    """The session's synthetic world, copied once into a bucket of the module's S3 server."""
    from tests.conftest import S3Store

    store = S3Store(s3_server, "world")
    for split in ("train", "val", "test"):
        store.upload(world / split, split)
    return store


def _mlflow_store(tmp_path, s3) -> str:
    """A SQLite store whose experiment keeps artifacts in the bucket (as ``mlflow server
    --artifacts-destination s3://...`` would)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("dldkd", artifact_location=s3.url("mlflow"))
    return uri


def _one_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dldkd")
    runs = client.search_runs([exp.experiment_id], f"tags.`dldkd.run_key` = '{name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for {name}: a restart must append to its own"
    return client, runs[0]


def test_reader_streams_s3_shards_like_local_ones(world, s3_world):
    from sharding.reader import ShardReader, read_all

    remote = read_all(s3_world.url("val"))
    local = read_all(str(world / "val"))
    assert [v.video_id for v in remote] == [v.video_id for v in local]
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(remote, local))
    kwargs = dict(batch_videos=8, loader_workers=2, resampled=True, steps_per_epoch=3, seed=1)
    s3_batches = list(ShardReader(s3_world.url("train"), **kwargs).epoch(0))
    local_batches = list(ShardReader(str(world / "train"), **kwargs).epoch(0))
    assert [b.video_ids for b in s3_batches] == [b.video_ids for b in local_batches]


class _Stop(Exception):
    pass


def test_best_weights_come_back_from_storage_after_the_node_is_lost(world, s3_world, s3,
                                                                    tmp_path):
    """Attempt 1 stops at step 5 (checkpoint and best weights at step 3); its node's scratch is
    wiped; attempt 2 resumes from the checkpoint, and test() evaluates the best weights that only
    run storage has (its own node cache is wiped too before the test)."""
    uri = _mlflow_store(tmp_path, s3)
    name = f"lost-{os.getpid()}-{s3.bucket[-8:]}"
    cfg = load_config("configs/tiny.yaml", tiny_overrides(world, s3.url("runs"), name, **{
        "data.train": s3_world.url("train"), "data.val": s3_world.url("val"),
        "data.test": s3_world.url("test"), "tracking.uri": uri, "loss.kd": "off",
        "loss.targets": "hard", "train.early_stop": 0}))
    scratch = storage.local_run_dir(cfg.run.storage, name)
    checkpoints = tmp_path / "checkpoints"   # stands in for Ray's copy in run storage

    def attempt(stop_at: int | None, lose_cache: bool = False) -> Recipe:
        recipe = Recipe(cfg, LocalReporter(checkpoints, True), use_deepspeed=False)
        recipe.setup()
        inner = recipe.train_step

        def step(*args):
            if recipe.state.step + 1 == stop_at:
                raise _Stop
            return inner(*args)

        recipe.train_step = step
        try:
            recipe.train()
            if lose_cache:   # even a best written by this attempt: test() reads run storage
                shutil.rmtree(scratch / "best")
            recipe.test_metrics = recipe.test()
            recipe.cleanup()
        except _Stop:
            recipe.cleanup("KILLED")
        return recipe

    first = attempt(stop_at=5)
    assert latest(checkpoints).name == "step-00000003"
    assert first.state.best_step == 3
    assert s3.exists("runs", name, "best", "student.pt")
    shutil.rmtree(scratch)   # the rank-0 node is gone

    second = attempt(stop_at=None, lose_cache=True)
    assert second.state.step == 6 and second.state.best_step in (3, 6)
    assert second.test_metrics and second.test_metrics["SumR"] > 0
    report = json.loads(storage.read_bytes(s3.url("runs", name, "best", "test_report.json")))
    assert report["metrics"] == second.test_metrics
    assert report["checkpoint"] == s3.url("runs", name, "best")
    saved = json.loads(storage.read_bytes(s3.url("runs", name, "best", "metrics.json")))
    assert saved["step"] == second.state.best_step

    client, run = _one_run(uri, name)
    assert run.data.tags["dldkd.best_checkpoint"] == s3.url("runs", name, "best")
    assert run.data.metrics["test/SumR"] == pytest.approx(second.test_metrics["SumR"])
    assert run.info.artifact_uri.startswith(s3.url("mlflow"))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "best")} >= {
        "best/student.pt", "best/test_report.json", "best/metrics.json"}
    assert s3.fs.find(s3.url("mlflow")), "MLflow wrote no artifact to the bucket"


# ------------------------------------------------------------------------------ the whole run


@pytest.mark.slow
def test_two_workers_on_object_storage_survive_a_killed_worker(world, s3_world, s3, tmp_path):
    """2 Ray Train + DeepSpeed workers read s3:// shards, checkpoint to s3:// run storage and log
    MLflow artifacts to s3://. A worker is SIGKILLed after the step-4 checkpoint and the rank-0
    node's scratch is wiped; Ray restarts the workers from the checkpoint, the run finishes,
    evaluates its best weights on test from storage, and keeps one MLflow run."""
    import ray

    from launch.jobs.train import build_trainer

    uri = _mlflow_store(tmp_path, s3)
    name = f"s3kill-{os.getpid()}"
    cfg = load_config("configs/tiny.yaml", tiny_overrides(world, s3.url("runs"), name, **{
        "data.train": s3_world.url("train"), "data.val": s3_world.url("val"),
        "data.test": s3_world.url("test"), "tracking.uri": uri, "train.epochs": 4,
        "data.steps_per_epoch": 4, "train.eval_every": 2, "train.ckpt_every": 4,
        "train.early_stop": 0, "dist.num_workers": 2, "dist.max_failures": 2,
        "loss.kd": "off", "loss.targets": "hard"}))
    scratch = storage.local_run_dir(cfg.run.storage, name)
    killed = []

    def killer():
        deadline = time.time() + 150
        while time.time() < deadline:
            if s3.exists("runs", name, "step-00000004"):
                workers = train_worker_pids()
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(workers[-1])
                    shutil.rmtree(scratch, ignore_errors=True)
                    return
            time.sleep(0.3)

    # Started here, after the S3 variables are set: a local cluster's workers inherit them.
    # address="local": a cluster of its own even when `ray start` runs one on this machine.
    ray.shutdown()   # the session's shared cluster (ray_session), if a test left it up
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    try:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        result = build_trainer(cfg).fit()
        thread.join(timeout=5)
    finally:
        ray.shutdown()
    assert killed, "the test never found a worker to kill"
    assert result.error is None
    assert result.metrics["step"] == 16.0

    client, run = _one_run(uri, name)
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 17))
    assert run.data.metrics["test/SumR"] > 0
    report = json.loads(storage.read_bytes(s3.url("runs", name, "best", "test_report.json")))
    assert report["metrics"]["SumR"] == pytest.approx(run.data.metrics["test/SumR"])
    assert run.data.tags["dldkd.best_checkpoint"] == s3.url("runs", name, "best")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "best")} >= {
        "best/student.pt", "best/test_report.json"}
    assert run.info.artifact_uri.startswith(s3.url("mlflow"))
    # Ray's checkpoints are in the bucket, not on a node's disk.
    assert s3.exists("runs", name, "step-00000016")

"""A run resumed on another worker count: ZeRO optimizer state re-partitioned exactly, the data
position mapped to the new count, one MLflow run; and one launch per run at a time."""
from __future__ import annotations

import argparse
import math
import os
import socket
import threading
import time

import pytest
import torch

from tests.conftest import tiny_overrides
from trainer.checkpoint import resized_position

pytestmark = pytest.mark.slow

ROWS = 6   # one global batch, split over any of 1, 2, 3 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero2_worker(rank: int, world: int, port: int, folder: str, phase: str) -> None:
    """Train a small model under DeepSpeed ZeRO-2 on ``world`` gloo ranks: ``save`` takes three
    steps and checkpoints, ``load`` resumes a checkpoint of two ranks; both then take two more
    steps and rank 0 saves the full fp32 weights."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from trainer import dist

    dist.init(use_gpu=False)
    from deepspeed.utils import safe_get_full_fp32_param

    from trainer.checkpoint import ENGINE_TAG, load_repartitioned
    from trainer.config import load_config
    from trainer.engine import build_engine

    cfg = load_config("configs/tiny.yaml", ["dist.zero_stage=2", "data.batch_videos=2",
                                            "optim.warmup=0.3"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5),
                                torch.nn.Linear(5, 3))
    engine = build_engine(cfg, model, 10, world)

    def step(i: int) -> None:
        x = torch.randn(ROWS, 7, generator=torch.Generator().manual_seed(i))
        mine = x[rank * ROWS // world:(rank + 1) * ROWS // world]
        # Ranks' gradients are averaged: scaled so that every count sees the same global mean.
        engine.backward(engine(mine).pow(2).sum() * world / ROWS)
        engine.step()

    if phase == "save":
        for i in range(3):
            step(i)
        engine.save_checkpoint(folder, ENGINE_TAG, client_state={"at": 3})
    else:
        assert load_repartitioned(engine, folder, 2)["at"] == 3
    for i in range(3, 5):
        step(i)
    full = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"weights": full, "lr": engine.get_lr()}, f"{folder}-{phase}-{world}.pt")
    torch.distributed.destroy_process_group()


def test_zero2_state_of_two_ranks_resumes_exactly_on_one_and_on_three(tmp_path):
    import torch.multiprocessing as mp

    folder = str(tmp_path / "ckpt")
    mp.spawn(_zero2_worker, (2, _free_port(), folder, "save"), nprocs=2)
    uninterrupted = torch.load(f"{folder}-save-2.pt")
    for world in (1, 3):
        mp.spawn(_zero2_worker, (world, _free_port(), folder, "load"), nprocs=world)
        resumed = torch.load(f"{folder}-load-{world}.pt")
        assert resumed["lr"] == uninterrupted["lr"]
        for name, value in uninterrupted["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], value, rtol=0, atol=1e-6,
                                       msg=f"{name} after resuming on {world} ranks")


@pytest.mark.parametrize("old,new", [(2, 3), (2, 1), (3, 2), (1, 3)])
def test_an_epoch_goes_on_after_the_samples_it_consumed(world, old, new):
    """True epochs: whatever step the old count stopped at, the new count reads the rest of the
    epoch, none skipped and fewer than one of its global batches twice."""
    from sharding.reader import ShardReader

    def readers(count):
        return [ShardReader(str(world / "train"), rank=r, world_size=count, batch_videos=16,
                            loader_workers=0, true_epochs=True, teacher_frames=False)
                for r in range(count)]

    before, after = readers(old), readers(new)
    batches = [[b.video_ids for b in r.epoch(0)] for r in before]
    every = {v for rank in batches for ids in rank for v in ids}
    for k in range(before[0].steps_per_epoch + 1):
        seen = [v for rank in batches for ids in rank[:k] for v in ids]
        epoch, step = resized_position(0, k, old, new, after[0].steps_per_epoch)
        if epoch == 0:
            seen += [v for r in after for b in r.epoch(0, step) for v in b.video_ids]
        assert set(seen) == every, f"step {k} of {old} -> {step} of {new}: videos skipped"
        assert len(seen) - len(every) < 16 * new, f"step {k} of {old}: read twice too often"


def _launch(cfg_overrides: list[str]) -> argparse.Namespace:
    return argparse.Namespace(config="configs/tiny.yaml", overrides=cfg_overrides, address=None)


def test_two_workers_resume_on_one_in_one_mlflow_run(world, tmp_path, ray_session):
    """A relaunch of a 2-worker run (ZeRO-2) on 1 worker continues its step count and loss in
    one MLflow run; a second launch while the first runs is refused by the run's lease. (More
    workers on resume: the growth test below through Ray, and 2 -> 3 exactly at the engine level
    above.)"""
    from mlflow.tracking import MlflowClient

    from launch.jobs.lease import LeaseHeld
    from launch.jobs.train import run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = tiny_overrides(world, tmp_path, "elastic", **{
        "data.true_epochs": True, "data.steps_per_epoch": 0, "dist.zero_stage": 2,
        "loss.kd": "off", "loss.targets": "hard", "tracking.uri": uri,
        # hard negatives from epoch 3, after this run: their larger triplet loss in epoch 2
        # would hide whether the resumed runs go on from the trained weights (the check below)
        "loss.hard_negative_start_epoch": 3})
    # 96 videos in batches of 16 per worker: 3 steps per epoch on 2 workers, 6 on 1.
    # The session's shared local cluster (4 CPUs): `run` joins it.
    failed = []

    def first_launch():
        try:
            run(_launch(base + ["train.epochs=1", "dist.num_workers=2"]))
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            failed.append(err)

    first = threading.Thread(target=first_launch)
    first.start()
    lease = tmp_path / "elastic" / "lease.json"
    deadline = time.time() + 120
    while not lease.exists() and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(LeaseHeld, match=r"run 'elastic' is already .* \(pid \d+"):
        run(_launch(base + ["train.epochs=1", "dist.num_workers=2"]))
    first.join()
    assert not failed and not lease.exists(), f"the first launch: {failed}"
    run(_launch(base + ["train.epochs=2", "dist.num_workers=1"]))

    client = MlflowClient(uri)
    (mlflow_run,) = client.search_runs(
        [client.get_experiment_by_name("dldkd").experiment_id], "tags.`dldkd.run_key` = 'elastic'")
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, 10)), f"steps 1-3 on 2 workers, 4-9 on 1: {steps}"
    loss = {m.step: m.value for m in history}
    assert all(math.isfinite(v) for v in loss.values())
    assert max(loss[s] for s in range(4, 10)) < loss[1], \
        f"the resumed run starts over instead of going on: {loss}"
    assert mlflow_run.data.tags["dldkd.world_size"] == "1"
    assert mlflow_run.data.tags["dldkd.resume_changed.dist.num_workers"] == "2 -> 1"


def test_elastic_run_grows_to_two_workers_when_a_node_joins(world, tmp_path):
    """dist.min_workers=1 dist.num_workers=2 on a node with room for one worker: Ray 2.60
    starts it on 1; a node joins mid-run and, at its next resize check, Ray restarts the group
    on 2 from the latest checkpoint (re-partitioned), in the same MLflow run."""
    import signal
    from pathlib import Path

    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from trainer.infra import storage
    from trainer.infra.reporting import complete_step

    from launch.jobs.stop import new_flag
    from launch.jobs.train import build_trainer
    from trainer.checkpoint import read_client_json
    from trainer.config import load_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("configs/tiny.yaml", tiny_overrides(world, tmp_path, "grow", **{
        "data.steps_per_epoch": 3, "train.eval_every": 36, "train.early_stop": 0,
        "loss.kd": "off", "loss.targets": "hard",
        "train.epochs": 200, "train.ckpt_every": 3, "train.log_every": 1,
        "dist.min_workers": 1, "dist.num_workers": 2, "dist.resize_check_s": 2,
        "dist.zero_stage": 2, "tracking.uri": uri}))
    location = storage.run_location(str(tmp_path), "grow")

    def written_by() -> int:
        step = complete_step(location)
        return 0 if step is None else read_client_json(
            Path(location) / f"step-{step:08d}")["world_size"]

    ray.shutdown()   # a cluster of its own: nodes are added to it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        ray.init(address=cluster.address, configure_logging=False)
        flag, out = new_flag(), {}
        fit = threading.Thread(target=lambda: out.update(result=build_trainer(cfg, stop=flag).fit()))
        fit.start()
        deadline = time.time() + 400
        while written_by() != 1 and fit.is_alive() and time.time() < deadline:
            time.sleep(0.3)
        assert written_by() == 1, "the run did not start on the one worker there is room for"
        cluster.add_node(num_cpus=1)
        while written_by() != 2 and fit.is_alive() and time.time() < deadline:
            time.sleep(0.3)
        grown = written_by()
        flag.set.remote(signal.SIGTERM)   # stop it as the driver would, with a checkpoint
        fit.join(timeout=300)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert grown == 2, "Ray did not grow the run when a node with room for a worker joined"
    assert out["result"].error is None
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dldkd").experiment_id],
                                "tags.`dldkd.run_key` = 'grow'")
    assert run.data.tags["dldkd.world_size"] == "2" and run.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps.count(1) == 1 and max(steps) > 3, steps

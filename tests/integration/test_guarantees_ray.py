"""The guarantee table's Ray rows: ``dldkd train`` through Ray (``python -m launch.train``, what
``ray job submit`` runs, is the same entry: ``launch.cli.main(["train", ...])``), on a local
folder and on an S3 API (moto).

The driver under test is a subprocess ``python -m launch.cli train`` on a local Ray cluster of
its own. A signal to it reaches the worker: a checkpoint at the next log step, complete in
storage, its step logged, the MLflow run KILLED, one line with the resume command, exit 143/130;
a second signal stops at once and still marks the run KILLED. The relaunch resumes from the
newest complete checkpoint in storage even when Ray's own snapshot is gone and a newer partial
one is there, never from step 1, and its losses equal an uninterrupted run's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from trainer.infra import storage
from trainer.infra.reporting import COMPLETE, complete_step

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 15   # 5 epochs of 3 steps, a log step at the end: long enough to be signalled mid-run
RUN = {"train.epochs": 5, "data.steps_per_epoch": 3, "train.log_every": 5,
       "train.ckpt_every": 4, "train.eval_every": STEPS, "train.early_stop": 0,
       "loss.kd": "off", "loss.targets": "hard"}
_reference: dict[int, float] = {}


def _losses(uri: str, name: str) -> tuple[list, list[tuple[int, float]]]:
    """(the MLflow runs of ``name``, its train/loss history as (step, value) in log order)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dldkd")
    runs = client.search_runs([exp.experiment_id], f"tags.`dldkd.run_key` = '{name}'")
    history = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
    return runs, [(m.step, m.value) for m in sorted(history, key=lambda m: m.timestamp)]


def reference(world, tmp_path_factory, ray_session) -> dict[int, float]:
    """train/loss by step of the same run uninterrupted (in-process, on the session's Ray)."""
    if not _reference:
        from launch.jobs.train import build_trainer
        from trainer.config import load_config

        folder = tmp_path_factory.mktemp("ref")
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        cfg = load_config("configs/tiny.yaml", tiny_overrides(
            world, folder, "ref", **RUN, **{"tracking.uri": uri}))
        assert build_trainer(cfg).fit().error is None
        _reference.update(_losses(uri, "ref")[1])
    return _reference


def _driver(world, run_storage: str, uri: str, log: Path) -> subprocess.Popen:
    over = tiny_overrides(world, run_storage, "g", **RUN, **{"tracking.uri": uri})
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", "--config", "configs/tiny.yaml", *over],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
        # address=local: a Ray cluster of its own even where others run one on this machine
        env={**os.environ, "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"})


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.3)


def _break_storage(location: str, k: int) -> None:
    """What a hard stop can leave: Ray's snapshot lost (it never recorded the newest
    checkpoint) and a newer checkpoint whose upload was cut (no marker, a file missing)."""
    partial = storage.join(location, f"step-{k + 4:08d}")
    for name in ("client.json", "state/mp_rank_00_model_states.pt"):
        data = storage.read_bytes(storage.join(location, f"step-{k:08d}", name))
        storage.write_bytes(storage.join(partial, name), data)
    storage.remove(storage.join(location, "checkpoint_manager_snapshot.json"))


# The folder case with one SIGTERM is e2e/test_job_submit.py's `ray job stop` of a training job
# (the same driver, `python -m launch.train`, on a real head): snapshot lost, partial newer
# checkpoint, resumed from the newest complete one.
@pytest.mark.parametrize("where,sig,double", [("s3", signal.SIGINT, True)],
                         ids=["s3-sigint-twice"])
def test_driver_signal_reaches_workers_and_relaunch_resumes_exactly(
        world, tmp_path, tmp_path_factory, ray_session, request, where, sig, double):
    run_storage = str(tmp_path / "runs") if where == "local" \
        else request.getfixturevalue("s3").url("runs")
    ref = reference(world, tmp_path_factory, ray_session)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    location = storage.run_location(run_storage, "g")
    log = tmp_path / "driver.log"
    proc = _driver(world, run_storage, uri, log)
    _wait_for(lambda: storage.exists(storage.join(location, "step-00000004", "client.json")),
              proc, log)
    proc.send_signal(sig)
    if double:
        time.sleep(0.5)
        proc.send_signal(sig)
    assert proc.wait(timeout=300) == 128 + sig, log.read_text()[-4000:]
    text = log.read_text()
    hints = [line for line in text.splitlines() if "to resume: dldkd train" in line]
    assert len(hints) == 1, text[-4000:]
    assert f"stopped by {sig.name} " + ("at once" if double else "with a checkpoint saved") \
        in hints[0]
    k = complete_step(location)
    assert k is not None and 4 <= k < STEPS
    runs, losses = _losses(uri, "g")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not storage.exists(storage.join(location, "lease.json")), "the lease outlived the run"
    if not double:   # saved at the next log step after the signal, and that step is logged
        assert k > 4 and f"step {k}" in hints[0] and k in dict(losses), (k, losses)
        names = set(storage.listdir(storage.join(location, f"step-{k:08d}")))
        assert {"client.json", "rng-rank0.pt", "state", COMPLETE} <= names

    _break_storage(location, k)
    proc = _driver(world, run_storage, uri, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert f" at step {k} (epoch" in text and "resumed from" in text, text[-4000:]
    if where == "local":   # Ray's snapshot is gone: the step came from storage alone
        assert f"step-{k:08d}, the newest complete checkpoint" in text, text[-4000:]
    runs, losses = _losses(uri, "g")
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = [s for s, _ in losses]
    assert steps.count(1) == 1, f"the relaunch restarted from step 1: {steps}"
    assert max(steps) == STEPS
    after = {s: v for s, v in losses if s > k}
    assert after and all(after[s] == ref[s] for s in after if s in ref), (k, after, ref)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_ray_launch_is_refused_before_ray_starts(world, tmp_path, request, capsys,
                                                          where):
    from launch.cli import main
    from launch.jobs.lease import run_lease

    run_storage = str(tmp_path / "runs") if where == "local" \
        else request.getfixturevalue("s3").url("runs")
    with run_lease(run_storage, "g"):
        status = main(["train", "--config", "configs/tiny.yaml", *tiny_overrides(
            world, run_storage, "g", **{"tracking.uri": f"sqlite:///{tmp_path / 'm.db'}"})])
    assert status == 2
    assert "run 'g' is already being launched or trained" in capsys.readouterr().err


def test_a_second_sweep_launch_is_refused_before_ray_starts(world, tmp_path, capsys):
    from launch.cli import main
    from launch.jobs.lease import run_lease

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP_YAML.replace("STORAGE", str(tmp_path / "runs")).replace(
        "URI", f"sqlite:///{tmp_path / 'm.db'}").replace("TRAIN", str(world / "train")).replace(
        "VAL", str(world / "val")))
    with run_lease(str(tmp_path / "runs"), "stop-it", kind="sweep"):
        assert main(["sweep", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sweep 'stop-it' is already being launched or run" in err and "sweep.name" in err
    assert not (tmp_path / "runs" / "stop-it" / "trials").exists()


SWEEP_YAML = """
model: {video_dim: 128, query_dim: 64, hidden: 32, heads: 4, input_drop: 0.1, drop: 0.1}
loss: {hard_pool: 5, kd: "off", targets: hard}
data: {train: TRAIN, val: VAL, batch_videos: 16, steps_per_epoch: 3, loader_workers: 0}
train: {epochs: 4, log_every: 1, ckpt_every: 3, eval_every: 12, early_stop: 0}
dist: {num_workers: 1, zero_stage: 0}
tracking: {system_metrics: false, uri: URI}
run: {name: it, storage: STORAGE}
sweep: {name: stop-it, search_alg: grid, trial_cpus: 0.5, space: {optim.lr: {grid: [1.0e-3]}}}
"""


# On S3 only: the folder case runs the same driver and trial code, and a sweep's folder
# storage, resume and extension are tests/integration/test_sweep.py's.
@pytest.mark.parametrize("where", ["s3"])
def test_a_sweep_trial_stops_on_the_drivers_signal_and_the_rerun_resumes_it(
        world, tmp_path, request, where):
    """SIGTERM to a ``dldkd sweep`` driver (its own Ray cluster) reaches the trial's worker: a
    checkpoint at its next log step, complete in run storage (a folder or the bucket), the
    trial's run and the sweep's parent run KILLED, exit 143 and one resume line. The rerun
    resumes the trial from that checkpoint, not from step 1, and finishes it."""
    from mlflow.tracking import MlflowClient

    run_storage = str(tmp_path / "runs") if where == "local" \
        else request.getfixturevalue("s3").url("runs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP_YAML.replace("STORAGE", run_storage).replace("URI", uri).replace(
        "TRAIN", str(world / "train")).replace("VAL", str(world / "val")))
    trials = storage.join(run_storage, "stop-it", "trials")
    log = tmp_path / "sweep.log"

    def launch() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "sweep", "--config", str(config)], cwd=ROOT,
            stdout=log.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"})

    def first_checkpoint() -> bool:
        names = storage.listdir(trials) if storage.exists(trials) else []
        return any(complete_step(storage.join(trials, n)) for n in names)

    proc = launch()
    _wait_for(first_checkpoint, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-4000:]
    text = log.read_text()
    hints = [line for line in text.splitlines() if "to resume: dldkd sweep" in line]
    assert len(hints) == 1 and "stopped by SIGTERM" in hints[0], text[-4000:]
    # the trial's folder (Ray Train also leaves a storage-check marker beside it)
    (trial,) = [n for n in storage.listdir(trials) if complete_step(storage.join(trials, n))]
    k = complete_step(storage.join(trials, trial))
    assert k is not None and 3 <= k < 12
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dldkd")
    (parent,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'stop-it'")
    assert parent.info.status == "KILLED"
    (child,) = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.info.status == "KILLED"

    proc = launch()
    assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    assert f" at step {k} (epoch" in log.read_text()
    child = client.get_run(child.info.run_id)
    assert child.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
    assert steps.count(1) == 1 and max(steps) == 12, steps

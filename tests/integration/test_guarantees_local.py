"""The guarantee table's rows for the launch modes without Ray, on local and S3 run storage.

``dldkd train --no-ray`` runs through the CLI's own entry (``launch.cli.main``) in this process
(a real SIGTERM to this process at step 2); ``torchrun`` runs 2 gloo processes. Each checks what
docs/training.md promises: checkpoints, ``best/`` and the test report in run storage; a relaunch
resumes from the newest *complete* checkpoint there (a partial one is skipped, the node's scratch
is wiped first) with the losses of an uninterrupted run and no restart from step 1; a second
launch of a live run is refused by the lease (rank 0's under torchrun); SIGTERM saves to run
storage and marks the one MLflow run KILLED.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from trainer.infra import storage

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 8   # 2 epochs of 4 steps; checkpoints at 4 and 8 (and at a signal)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (its schema is created once, not per run)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _overrides(world, run_storage: str, name: str, uri: str) -> list[str]:
    return tiny_overrides(world, run_storage, name, **{
        "data.steps_per_epoch": 4, "data.test": str(world / "test"), "tracking.uri": uri,
        "train.ckpt_every": 4, "train.early_stop": 0, "train.deterministic": True,
        "loss.kd": "off", "loss.targets": "hard"})


def _run_storage(kind: str, tmp_path: Path, request) -> str:
    if kind == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3").url("runs")


def _mlflow_run(uri: str, name: str):
    """The one MLflow run of ``name`` and its train/loss history as {step: [values]}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`dldkd.run_key` = '{name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for {name}"
    losses: dict[int, list[float]] = {}
    for m in client.get_metric_history(runs[0].info.run_id, "train/loss"):
        losses.setdefault(m.step, []).append(m.value)
    return runs[0], losses


def _checkpoints(run_storage: str, name: str) -> dict[int, bool]:
    """{step: complete} of the checkpoints in run storage."""
    from trainer.infra.reporting import stored_steps

    root = storage.join(storage.run_location(run_storage, name), "checkpoints")
    if storage.is_remote(root):
        return stored_steps(root)
    folder = Path(root)
    return {int(p.name[5:13]): not p.name.endswith(".tmp") and (p / "client.json").is_file()
            for p in folder.glob("step-*")}


def _in_storage(run_storage: str, name: str, *parts: str) -> bool:
    return storage.exists(storage.join(storage.run_location(run_storage, name), *parts))


def _make_newest_partial(run_storage: str, name: str, step: int) -> None:
    """As if the launch died while its last checkpoint was being written: files without the
    completion marker in an object store, the unrenamed ``.tmp`` folder on a file system."""
    root = storage.join(storage.run_location(run_storage, name), "checkpoints")
    folder = f"step-{step:08d}"
    if storage.is_remote(root):
        storage.remove(storage.join(root, folder, "complete.json"))
    else:
        Path(root, folder).rename(Path(root, folder + ".tmp"))


class _SigtermAt(logging.Handler):
    """Sends this process SIGTERM when the run logs step ``k`` (a real signal, mid-run)."""

    def __init__(self, k: int):
        super().__init__()
        self.needle, self.sent = f"step {k}/", False

    def emit(self, record):
        if not self.sent and record.getMessage().startswith(self.needle):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def _cli(args: list[str]) -> int:
    from launch.cli import main

    return main(["train", "--config", "configs/tiny.yaml", "--no-ray", *args])


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory, mlflow_uri) -> dict[int, float]:
    """train/loss of every step of an uninterrupted --no-ray run."""
    runs = tmp_path_factory.mktemp("reference")
    assert _cli(_overrides(world, str(runs), "reference", mlflow_uri)) == 0
    _, losses = _mlflow_run(mlflow_uri, "reference")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {step: values[0] for step, values in losses.items()}


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_no_ray(kind, world, tmp_path, request, mlflow_uri, reference, capsys, caplog,
                monkeypatch):
    """dldkd train --no-ray: concurrent launch refused; SIGTERM at step 2 saves step 3 to run
    storage (KILLED, one resume line); the relaunch, its node scratch wiped, resumes there and
    finishes with the uninterrupted run's losses; the same name on other storage starts anew."""
    from launch.jobs.lease import run_lease

    monkeypatch.chdir(ROOT)
    run_storage = _run_storage(kind, tmp_path, request)
    name = f"noray-{kind}"
    over = _overrides(world, run_storage, name, mlflow_uri)

    with run_lease(run_storage, name):   # another launch of this run is live
        assert _cli(over) == 2
    err = capsys.readouterr().err
    assert f"run {name!r} is already being launched" in err
    assert not _checkpoints(run_storage, name)

    caplog.set_level(logging.INFO, logger="dldkd")
    stopper = _SigtermAt(2)
    logging.getLogger("dldkd").addHandler(stopper)
    try:
        with pytest.raises(SystemExit) as stopped:
            _cli(over)
    finally:
        logging.getLogger("dldkd").removeHandler(stopper)
    assert stopped.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"run {name} stopped by SIGTERM at step 3" in err and "to resume" in err
    assert _checkpoints(run_storage, name) == {3: True}
    run, losses = _mlflow_run(mlflow_uri, name)
    assert run.info.status == "KILLED"
    assert sorted(losses) == [1, 2, 3]

    scratch = storage.local_run_dir(run_storage, name)
    if kind == "s3":   # the node is lost: storage alone holds the run
        assert not list(scratch.rglob("client.json")), "checkpoints stayed on the node"
        shutil.rmtree(scratch)
    caplog.clear()
    assert _cli(over) == 0
    assert "resumed from" in caplog.text and "at step 3 (epoch 0)" in caplog.text
    run, losses = _mlflow_run(mlflow_uri, name)
    assert run.info.status == "FINISHED"
    assert {s: len(v) for s, v in losses.items()} == {s: 1 for s in range(1, STEPS + 1)}, \
        "every step is trained once: no restart from step 1"
    assert {s: v[0] for s, v in losses.items()} == reference
    assert _checkpoints(run_storage, name) == {4: True, 8: True}
    for part in ("student.pt", "metrics.json", "test_report.json"):
        assert _in_storage(run_storage, name, "best", part), part
    assert run.data.tags["dldkd.best_checkpoint"] == storage.join(
        storage.run_location(run_storage, name), "best")

    if kind == "s3":   # the same name on other storage: this node's scratch is not its past
        elsewhere = request.getfixturevalue("s3").url("elsewhere")
        assert _cli(_overrides(world, elsewhere, name, mlflow_uri) + ["run.resume=must"]) == 2
        assert "run.resume=must but no complete checkpoint" in capsys.readouterr().err


def _torchrun(over: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "launch.cli", "train", "--config", "configs/tiny.yaml", "--no-ray", *over],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()


TORCHRUN_STEPS = 16   # 4 epochs of 4 steps: room for a signal after the first checkpoint


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_torchrun(kind, world, tmp_path, request, mlflow_uri, capsys, monkeypatch):
    """torchrun, 2 gloo processes: while it runs, rank 0 holds the lease and a second launch is
    refused (locally also: a torchrun launch whose rank 0 is refused ends, rank 1 with it).
    SIGTERM to torchrun reaches both ranks (torchrun forwards it): they agree on the next step,
    save it to run storage (complete), log it, mark the one MLflow run KILLED and print one
    resume line. That checkpoint made partial and the node scratch wiped, the relaunch resumes
    from the newest complete one before it, retrains the steps after it with the same losses,
    and finishes with its checkpoints, best/ and test report in run storage."""
    import time

    from launch.jobs.lease import run_lease

    monkeypatch.chdir(ROOT)
    run_storage = _run_storage(kind, tmp_path, request)
    name = f"torchrun-{kind}"
    over = _overrides(world, run_storage, name, mlflow_uri) + ["train.epochs=4"]
    log = tmp_path / "torchrun.log"

    if kind == "local":
        with run_lease(run_storage, name):
            assert _finish(_torchrun(over, log), log) != 0
        assert f"run {name!r} is already being launched" in log.read_text()
        assert not _checkpoints(run_storage, name)

    log = tmp_path / "signalled.log"
    proc = _torchrun(over, log)
    deadline = time.time() + 300
    while not _in_storage(run_storage, name, "lease.json") and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    assert _cli(over) == 2   # a second launch while rank 0 holds the lease
    assert f"run {name!r} is already being launched" in capsys.readouterr().err
    while not _checkpoints(run_storage, name).get(4) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    code = _finish(proc, log)
    text = log.read_text()
    assert code != 0, text[-3000:]   # torchrun itself ends on its SignalException
    hints = [line for line in text.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(hints) == 1 and "relaunch the same command" in hints[0], text[-3000:]
    k = int(hints[0].split("at step ")[1].split()[0])
    assert 4 < k < TORCHRUN_STEPS, text[-3000:]
    assert _checkpoints(run_storage, name).get(k), (k, _checkpoints(run_storage, name))
    run, first = _mlflow_run(mlflow_uri, name)
    assert run.info.status == "KILLED" and sorted(first) == list(range(1, k + 1))
    assert not _in_storage(run_storage, name, "lease.json")

    log = tmp_path / "relaunch.log"
    _make_newest_partial(run_storage, name, k)
    j = max(s for s, done in _checkpoints(run_storage, name).items() if done)
    assert j < k
    if kind == "s3":
        scratch = storage.local_run_dir(run_storage, name)
        assert not list(scratch.rglob("client.json")), "checkpoints stayed on the node"
        shutil.rmtree(scratch)
    assert _finish(_torchrun(over, log), log) == 0, log.read_text()[-3000:]
    assert f"at step {j} (epoch" in log.read_text()
    run, losses = _mlflow_run(mlflow_uri, name)
    assert run.info.status == "FINISHED"
    assert {s: len(v) for s, v in losses.items()} == {
        s: 2 if j < s <= k else 1 for s in range(1, TORCHRUN_STEPS + 1)}, (j, k)
    assert all(v[0] == v[1] for s, v in losses.items() if len(v) == 2), losses
    assert {s for s, done in _checkpoints(run_storage, name).items() if done} == {12, 16}  # keep 2
    for part in ("student.pt", "metrics.json", "test_report.json"):
        assert _in_storage(run_storage, name, "best", part), part

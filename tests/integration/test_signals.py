"""SIGTERM (preemption) and SIGINT: a checkpoint within the grace period, the MLflow run marked
KILLED, one line saying how to resume, and a relaunch that continues from that checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from trainer.checkpoint import latest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _launch(world, storage: Path, log: Path) -> subprocess.Popen:
    over = tiny_overrides(world, storage, name="sig", **{
        "train.epochs": 40, "train.log_every": 2, "train.ckpt_every": 1000,
        "loss.kd": "off", "loss.targets": "hard"})
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--config",
                             "configs/tiny.yaml", "--no-ray", *over], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_saves_a_checkpoint_and_marks_the_run_killed(world, tmp_path, sig):
    from mlflow.tracking import MlflowClient

    log = tmp_path / "train.log"
    proc = _launch(world, tmp_path, log)
    deadline = time.time() + 240
    while "step 4/" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(sig)
    assert proc.wait(timeout=240) == 128 + sig
    text = log.read_text()
    assert f"run sig stopped by {sig.name} at step" in text and "to resume" in text
    saved = latest(tmp_path / "sig" / "checkpoints")
    assert saved is not None and int(saved.name.split("-")[1]) >= 4
    client = MlflowClient(f"sqlite:///{tmp_path / 'sig' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]

    # the relaunch resumes after the saved step (and is stopped again, by SIGTERM)
    proc = _launch(world, tmp_path, log)
    deadline = time.time() + 240
    while "resumed from" not in log.read_text() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=240)
    assert f"resumed from {saved}" in log.read_text()

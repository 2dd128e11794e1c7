"""An MLflow server that goes away mid-run: training goes on, nothing logged is lost."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import tiny_overrides
from trainer.config import load_config
from trainer.recipe import Recipe

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root, port: int):
        self.root, self.port, self.proc = root, port, None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


def test_run_survives_tracking_outage(world, tmp_path):
    server = MlflowServer(tmp_path, _free_port())
    server.start()
    try:
        cfg = load_config("configs/tiny.yaml", tiny_overrides(
            world, tmp_path, "outage", **{"tracking.uri": server.uri, "train.epochs": 3}) + [
            "loss.kd=off", "loss.targets=hard"])
        recipe = Recipe(cfg)
        recipe.setup()
        inner, spooled = recipe.train_step, []

        def step(batch, epoch, timer):
            n = recipe.state.step + 1
            if n == 2:
                server.stop()
            if n == 8:
                spooled.append(recipe.tracker.pending)
                server.start()
            return inner(batch, epoch, timer)

        recipe.train_step = step
        recipe.train()
        recipe.cleanup()
        assert spooled and spooled[0] > 0, "metrics logged during the outage must be spooled"
        assert recipe.tracker.pending == 0

        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("dldkd")
        (run,) = client.search_runs([exp.experiment_id], "tags.`dldkd.run_key` = 'outage'")
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(1, 10))
        assert len(client.get_metric_history(run.info.run_id, "val/SumR")) == 3
        assert run.info.status == "FINISHED"
    finally:
        server.stop()

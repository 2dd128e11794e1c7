"""An MLflow server that goes away mid-run: training goes on, nothing logged is lost."""
from __future__ import annotations

import pytest

from tests.conftest import MlflowServer, free_port, tiny_overrides
from trainer.config import load_config
from trainer.recipe import Recipe

pytestmark = pytest.mark.slow


def test_run_survives_tracking_outage(world, tmp_path):
    server = MlflowServer(tmp_path, free_port())
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

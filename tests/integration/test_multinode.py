"""Two Ray nodes on one machine: workers spread across nodes, data split by rank, merged
checkpoints, and a node lost mid-run."""
from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_overrides
from trainer.config import load_config
from trainer.infra.reporting import COMPLETE

pytestmark = pytest.mark.slow


def test_losing_a_node_mid_run_finishes_on_the_remaining_one(world, tmp_path):
    """Two raylets with their own loopback addresses (Ray Train ranks nodes by IP, so this is
    what two hosts look like to it): the workers spread over both nodes (node ranks 0 and 1,
    one checkpoint folder holding both ranks' files, written on two nodes). Then one node's
    raylet and workers are killed mid-run: Ray Train restarts the worker group on the node that
    is left (dist.max_failures), the run resumes from its last checkpoint and ends; MLflow holds
    one run and every step's loss (steps redone after the checkpoint are logged again, none is
    missing)."""
    import threading
    import time

    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from launch.jobs.train import build_trainer

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 3, "node_ip_address": "127.0.0.1"})
    doomed = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
    steps, epochs = 6, 3
    try:
        ray.shutdown()   # the session's shared cluster (ray_session), if a test left it up
        ray.init(address=cluster.address)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        cfg = load_config("configs/tiny.yaml", tiny_overrides(
            world, tmp_path, "lost", **{"train.epochs": epochs, "data.steps_per_epoch": steps,
                                        "dist.num_workers": 2, "dist.cpus_per_worker": 1,
                                        "dist.placement_strategy": "SPREAD",
                                        "dist.max_failures": 2, "tracking.uri": uri,
                                        "loss.kd": "off", "loss.targets": "hard"}))
        outcome = {}
        fit = threading.Thread(target=lambda: outcome.update(result=build_trainer(cfg).fit()))
        fit.start()
        client, killed_at = MlflowClient(uri), None
        deadline = time.monotonic() + 300
        while fit.is_alive() and time.monotonic() < deadline and killed_at is None:
            time.sleep(0.2)
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                "tags.`dldkd.run_key` = 'lost'") if client.search_experiments() else []
            logged = [m.step for r in runs
                      for m in client.get_metric_history(r.info.run_id, "train/loss")]
            folder = tmp_path / "lost" / f"step-{steps:08d}"
            if logged and max(logged) > steps and (folder / COMPLETE).is_file():
                # past the first epoch's checkpoint, complete in storage
                spread = json.loads(runs[0].data.tags["dldkd.node_ranks"])
                first = {p.name for p in folder.iterdir()}
                cluster.remove_node(doomed, allow_graceful=False)
                killed_at = max(logged)
        fit.join(timeout=600)
        assert killed_at is not None and killed_at < steps * epochs, "the node died too late"
        assert sorted(spread) == [0, 1], spread   # one worker on each node before the loss
        assert {"rng-rank0.pt", "rng-rank1.pt", "client.json", "state"} <= first
        result = outcome["result"]
        assert result.error is None
        assert len(ray.nodes()) == 2 and sum(n["Alive"] for n in ray.nodes()) == 1
        exp = client.get_experiment_by_name("dldkd")
        (run,) = client.search_runs([exp.experiment_id], "tags.`dldkd.run_key` = 'lost'")
        logged = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
        assert logged == set(range(1, steps * epochs + 1))
        assert run.info.status == "FINISHED"
    finally:
        ray.shutdown()
        cluster.shutdown()

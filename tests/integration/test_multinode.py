"""Two Ray nodes on one machine: workers spread across nodes, data split by rank, merged checkpoints."""
from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_overrides
from trainer.config import load_config

pytestmark = pytest.mark.slow


def test_two_node_cluster(world, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from launch.train import build_trainer

    # Two raylets with their own loopback addresses: Ray Train ranks nodes by IP, so this is
    # what two hosts look like to it (node rank, MASTER_ADDR, merged checkpoint uploads).
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.2")
    try:
        ray.init(address=cluster.address)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        cfg = load_config("configs/tiny.yaml", tiny_overrides(
            world, tmp_path, "nodes", **{"train.epochs": 1, "data.steps_per_epoch": 4,
                                         "dist.num_workers": 2, "dist.cpus_per_worker": 2,
                                         "dist.placement_strategy": "STRICT_SPREAD",
                                         "dist.zero_stage": 1, "tracking.uri": uri,
                                         "loss.kd": "off", "loss.targets": "hard"}))
        result = build_trainer(cfg).fit()
        assert result.error is None
        # One checkpoint folder holds the files of both ranks, written on two nodes.
        folder = result.checkpoint.path
        names = {p.name for p in __import__("pathlib").Path(folder).iterdir()}
        assert {"rng-rank0.pt", "rng-rank1.pt", "client.json", "state"} <= names
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("dldkd")
        (run,) = client.search_runs([exp.experiment_id], "tags.`dldkd.run_key` = 'nodes'")
        assert json.loads(run.data.tags["dldkd.node_ranks"]) == [0, 1]
    finally:
        ray.shutdown()
        cluster.shutdown()

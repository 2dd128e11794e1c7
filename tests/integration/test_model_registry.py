"""The best student as an MLflow model on a real `mlflow server` (SQLite, local artifact store):
one tiny run logs it, registers a version and aliases it after its test report; `dldkd eval`
reads it back through models:/ and runs:/ URIs with the checkpoint folder's metrics; the pyfunc
loads from code and encodes features as the student does; a sweep's registration of its best
trial goes through ``register_run``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import MlflowServer, free_port, tiny_overrides

pytestmark = pytest.mark.slow

NAME = "dldkd-tiny"


def test_run_registers_its_model_and_eval_reads_it_back(world, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from launch.cli import main
    from trainer.config import load_config
    from trainer.evaluate import evaluate_checkpoint, load_student
    from trainer.infra import mlflow_model, storage
    from trainer.infra.tags import REGISTERED_MODEL_TAG
    from trainer.run import train

    server = MlflowServer(tmp_path / "mlflow", free_port())
    (tmp_path / "mlflow").mkdir()
    server.start()
    try:
        cfg = load_config("configs/tiny.yaml", tiny_overrides(world, tmp_path / "runs", "reg", **{
            "data.test": str(world / "test"), "tracking.uri": server.uri, "loss.kd": "off",
            "loss.targets": "hard", "train.epochs": 1, "tracking.registered_model": NAME}))
        train(cfg, use_deepspeed=False)
        client = MlflowClient(server.uri, registry_uri=server.uri)

        # registered, aliased (the run had a test report), and the run names its version
        version = client.get_model_version_by_alias(NAME, "candidate")
        assert version.version == "1"
        run = client.get_run(version.run_id)
        assert run.info.run_name == "reg"
        assert run.data.tags[REGISTERED_MODEL_TAG] == f"models:/{NAME}/1"
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert model.source_run_id == run.info.run_id and model.name == "model"
        # MLflow links the run's test metrics (logged at the run's last step) to the model
        assert {m.key for m in model.metrics} >= {"test/SumR", "test/R1"}

        # the model: signature, config, test metrics, pinned requirements, no pickle
        with mlflow_model.checkpoint_folder(f"models:/{NAME}/1", server.uri) as folder:
            local = tmp_path / "model"
            shutil.copytree(Path(folder).parents[1], local)
        mlmodel = (local / "MLmodel").read_text()
        assert "signature:" in mlmodel and "video_feats" in mlmodel and "query_inh" in mlmodel
        assert not list(local.rglob("*.pkl")), "the model must not be pickled"
        reqs = (local / "requirements.txt").read_text().split()
        assert "mlflow==3.17.2" in reqs and any(r.startswith("dldkd==") for r in reqs)
        ckpt = local / "artifacts" / "checkpoint"
        report = json.loads((ckpt / "test_report.json").read_text())
        assert report["metrics"]["SumR"] == pytest.approx(run.data.metrics["test/SumR"])
        meta = mlflow.models.Model.load(str(local)).metadata["dldkd"]
        assert meta["test"] == report["metrics"]
        assert load_config(ckpt / "config.yaml").model == cfg.model

        # `dldkd eval` through models:/ (alias and version) and runs:/ = the folder's metrics
        best = storage.join(storage.run_location(cfg.run.storage, cfg.run.name), "best")
        expected = evaluate_checkpoint(best, str(world / "test"))["metrics"]
        uris = [f"models:/{NAME}@candidate", f"models:/{NAME}/1",
                f"runs:/{run.info.run_id}/model", f"runs:/{run.info.run_id}/best"]
        for i, uri in enumerate(uris):
            out = tmp_path / f"eval-{i}.json"
            assert main(["eval", "--checkpoint", uri, "--split", str(world / "test"),
                         "--tracking-uri", server.uri, "--out", str(out)]) == 0
            got = json.loads(out.read_text())
            assert got["checkpoint"] == uri and got["metrics"] == expected, uri
        assert main(["eval", "--checkpoint", f"models:/{NAME}@champion", "--split",
                     str(world / "test"), "--tracking-uri", server.uri]) == 2

        # the pyfunc loads from code and gives the student's own embeddings
        pyfunc = mlflow.pyfunc.load_model(str(local))
        student, _ = load_student(best)
        gen = torch.Generator().manual_seed(0)
        feats = {"video_feats": torch.randn(3, 10, cfg.model.video_dim, generator=gen),
                 "video_mask": torch.ones(3, 10), "query_feats": torch.randn(
                     4, 6, cfg.model.query_dim, generator=gen), "query_mask": torch.ones(4, 6)}
        feats["video_mask"][0, 7:] = 0
        got = pyfunc.predict({k: v.numpy() for k, v in feats.items()})
        with torch.no_grad():
            videos = student.encode_videos(feats["video_feats"], feats["video_mask"])
            queries = student.encode_queries(feats["query_feats"], feats["query_mask"])
        for branch in student.branch_names:
            np.testing.assert_allclose(got[f"video_{branch}"], videos[branch][:3].numpy(),
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[f"query_{branch}"], queries[branch].numpy(),
                                       rtol=1e-5, atol=1e-6)

        # a sweep registers its best trial through register_run: a second version, aliased
        # because the run has test metrics; a run without test metrics gets no alias
        assert mlflow_model.register_run(server.uri, "dldkd", "reg", NAME, "best") == \
            f"models:/{NAME}/2"
        assert client.get_model_version_by_alias(NAME, "best").version == "2"
        client.create_run(run.info.experiment_id, tags={"dldkd.run_key": "bare"})
        with pytest.raises(FileNotFoundError, match="logged no model"):
            mlflow_model.register_run(server.uri, "dldkd", "bare", NAME, "best")
        with pytest.raises(FileNotFoundError, match="no MLflow run 'nope'"):
            mlflow_model.register_run(server.uri, "dldkd", "nope", NAME, "best")
    finally:
        server.stop()

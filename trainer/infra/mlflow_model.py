"""A run's best student as an MLflow model: logged, registered, aliased, and read back.

At the end of a finished run rank 0 logs the ``best/`` weights as a pyfunc model of the run
(``student_pyfunc.py``, logged as code: nothing is pickled), with a tensor signature, the config
and test report beside the weights, the validation and test metrics, and the dldkd package and its
requirements pinned as installed. With ``tracking.registered_model`` it becomes a new version of
that registered model, which gets ``tracking.model_alias`` once its test report exists. A sweep's
trials log models but register nothing; the sweep registers its best trial's (``register_run``).
``checkpoint_folder`` turns ``models:/`` and ``runs:/`` URIs back into a ``best/`` folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

from trainer.infra.tags import REGISTERED_MODEL_TAG, RUN_KEY_TAG

log = logging.getLogger("dldkd")

MODEL_NAME = "model"   # the logged model's name in its run
CHECKPOINT = "checkpoint"   # the model's artifact folder: a best/ folder's files
CODE = Path(__file__).with_name("student_pyfunc.py")
FILES = ("student.pt", "config.yaml", "metrics.json", "test_report.json")
URI_SCHEMES = ("models:/", "runs:/")
# The tracker keeps MLflow's HTTP calls short while training (a slow server must not stall the
# steps: failures are spooled); publishing happens once, after the run, and may wait.
PATIENT = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "120", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5"}


@contextlib.contextmanager
def patient_http() -> Iterator[None]:
    """MLflow's HTTP timeout and retries at their patient values, for this block only."""
    saved = {k: os.environ.get(k) for k in PATIENT}
    os.environ.update(PATIENT)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def requirements() -> list[str]:
    """dldkd and each of its install requirements, pinned to the version installed here."""
    from packaging.requirements import Requirement

    pins = {"dldkd": metadata.version("dldkd")}
    for line in metadata.requires("dldkd") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            pins[req.name] = metadata.version(req.name)
    return [f"{name}=={version}" for name, version in pins.items()]


def signature(cfg):
    """Precomputed features in, each branch's per-frame video and query embeddings out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from trainer.method.student import BRANCHES

    f32 = np.dtype("float32")
    m = cfg.model
    inputs = [TensorSpec(f32, (-1, -1, m.video_dim), "video_feats"),
              TensorSpec(f32, (-1, -1), "video_mask"),
              TensorSpec(f32, (-1, -1, m.query_dim), "query_feats"),
              TensorSpec(f32, (-1, -1), "query_mask")]
    outputs = [spec for b in BRANCHES[m.branches] for spec in (
        TensorSpec(f32, (-1, -1, m.hidden), f"video_{b}"), TensorSpec(f32, (-1, m.hidden),
                                                                      f"query_{b}"))]
    return ModelSignature(Schema(inputs), Schema(outputs))


def tested(uri: str, run_id: str, step: int) -> bool:
    """The run's test evaluation of these weights ran: ``test/*`` at ``step``, the run's last
    (a report left in ``best/`` by an earlier launch of the run is not one)."""
    from mlflow import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, "test/SumR")
    return any(m.step == step for m in history)


def log_model(uri: str, run_id: str, folder: Path, step: int, with_test: bool) -> str:
    """Log ``folder`` (a ``best/``) as the run's MLflow model, with its test report when
    ``with_test``; returns the model id. MLflow links the run's metrics at ``step`` (the test
    metrics) to the model."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from trainer.config import from_dict, load_yaml

    folder = Path(folder)
    cfg = from_dict(load_yaml(folder / "config.yaml"))
    info = {"val": json.loads((folder / "metrics.json").read_text())}
    if with_test:
        info["test"] = json.loads((folder / "test_report.json").read_text())["metrics"]
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / CHECKPOINT
        staged.mkdir()
        for name in FILES:
            if (folder / name).is_file() and (name != "test_report.json" or "test" in info):
                shutil.copy2(folder / name, staged / name)
        # log_model reads the process's tracking URI, and puts the model in the active run's
        # experiment: the finished run is resumed for the call (and finishes again after it).
        with _use_tracking_uri(uri), mlflow.start_run(run_id=run_id):
            logged = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(CODE), artifacts={CHECKPOINT: str(staged)},
                signature=signature(cfg), pip_requirements=requirements(),
                metadata={"dldkd": info}, step=step)
    return logged.model_id


def register(uri: str, model_id: str, run_id: str, name: str, alias: str, aliased: bool) -> str:
    """A new version of registered model ``name`` for the logged model; ``alias`` on it when
    ``aliased`` (its test report exists). Tags the run with the version; returns its URI."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    client = MlflowClient(uri, registry_uri=uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    with _use_tracking_uri(uri):   # the registry resolves models:/<id> through the process's URI
        version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id,
                                              model_id=model_id, await_creation_for=60).version
    if aliased:
        client.set_registered_model_alias(name, alias, version)
    where = f"models:/{name}/{version}"
    client.set_tag(run_id, REGISTERED_MODEL_TAG, where)
    log.info("registered %s%s", where, f" (alias {alias})" if aliased else
             " without an alias: no test report (set data.test)")
    return where


def publish(tracker, folder: Path, tracking_cfg, step: int) -> None:
    """End of a finished run (rank 0): log the best weights as the run's model and register it
    when asked. Tracking never fails a run: an MLflow error is reported and the run goes on."""
    if tracker.run_id is None:
        log.warning("no MLflow run to log the model to (MLflow was unreachable)")
        return
    try:
        with patient_http():
            with_test = tested(tracker.uri, tracker.run_id, step)
            model_id = log_model(tracker.uri, tracker.run_id, folder, step, with_test)
            log.info("logged the best weights as MLflow model %s of run %s", model_id,
                     tracker.run_id)
            if tracking_cfg.registered_model:
                register(tracker.uri, model_id, tracker.run_id, tracking_cfg.registered_model,
                         tracking_cfg.model_alias, with_test)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail training
        log.warning("could not log or register the MLflow model of %s: %s: %s", folder,
                    type(exc).__name__, str(exc)[:500])


@patient_http()
def register_run(uri: str, experiment: str, run_key: str, name: str, alias: str) -> str:
    """Register the newest model that the run named ``run_key`` logged (a sweep's best trial);
    the alias follows when the run has test metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                              max_results=1) if exp else []
    if not runs:
        raise FileNotFoundError(f"no MLflow run {run_key!r} in experiment {experiment!r} at {uri}")
    run = runs[0]
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'",
        max_results=1, order_by=[{"field_name": "creation_time", "ascending": False}])
    if not found:
        raise FileNotFoundError(f"run {run_key} ({run.info.run_id}) logged no model: it did not "
                                "finish, or MLflow was unreachable when it did")
    has_test = any(k.startswith("test/") for k in run.data.metrics)
    return register(uri, found[0].model_id, run.info.run_id, name, alias, has_test)


@contextlib.contextmanager
def checkpoint_folder(checkpoint: str, tracking_uri: str | None = None) -> Iterator[str]:
    """A ``best/`` folder for ``checkpoint``: a folder or storage URI as given, or the model of
    ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH`` downloaded from
    MLflow (``tracking_uri``, else $MLFLOW_TRACKING_URI) into a temporary folder."""
    if not checkpoint.startswith(URI_SCHEMES):
        yield checkpoint
        return
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = tracking_uri or mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="dldkd-eval-") as tmp:
        try:
            with _use_tracking_uri(uri):   # models:/ resolves through the process's URI
                local = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=checkpoint, dst_path=tmp, tracking_uri=uri, registry_uri=uri))
        except MlflowException as exc:
            raise FileNotFoundError(
                f"{checkpoint}: MLflow at {uri} has no such "
                f"model or artifact ({exc.message[:300]}); pass --tracking-uri or set "
                "MLFLOW_TRACKING_URI to the store the run logged to") from None
        found = sorted(p.parent for p in local.rglob("student.pt"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{checkpoint} holds {len(found)} student.pt files, not one: name a run's "
                "model (runs:/RUN_ID/model), its best/ artifacts (runs:/RUN_ID/best) or a "
                "registered version")
        yield str(found[0])

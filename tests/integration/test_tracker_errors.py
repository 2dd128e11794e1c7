"""The tracker's error policy against a real MLflow server: transient failures are spooled and
replayed, permanent rejections are dead-lettered with the reason and never block later records."""
from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import MlflowServer, free_port
from trainer.infra.tracking import Tracker, is_transient


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"), free_port())
    srv.start()
    yield srv
    srv.stop()


def _run(uri: str, run_key: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("errors")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`dldkd.run_key` = '{run_key}'")
    return client, run


def _steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.slow
def test_permanent_rejections_are_dead_lettered(server, tmp_path):
    spool = tmp_path / "mlflow-spool.jsonl"
    tracker = Tracker(server.uri, "errors", "permanent", spool, retry_every_s=0)
    tracker.start({"lr": 0.1, "k" * 300: 1})               # key over MLflow's 250 characters
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.set_tags({"../note": "x"})                      # a tag key MLflow refuses
    tracker.log_metrics({"../escape": 1.0}, 2)              # a name MLflow refuses
    tracker.log_metrics({"loss": 0.5}, 2)
    assert tracker.dead_letters == 3 and tracker.pending == 0
    assert tracker.finish()

    client, run = _run(server.uri, "permanent")
    assert _steps(client, run, "loss") == [1, 2], "records after a rejection must still go out"
    assert run.info.status == "FINISHED"
    assert not spool.exists()
    dead = [json.loads(line) for line in tracker.dead_letter.read_text().splitlines()]
    assert tracker.dead_letter.parent == spool.parent
    assert [d["record"]["kind"] for d in dead] == ["params", "tags", "metrics"]
    assert all(d["error_code"] == "INVALID_PARAMETER_VALUE" and d["reason"] for d in dead)


@pytest.mark.slow
def test_transient_failures_are_spooled_and_replayed(server, tmp_path, monkeypatch):
    spool = tmp_path / "mlflow-spool.jsonl"
    tracker = Tracker(server.uri, "errors", "transient", spool, retry_every_s=3600)
    tracker.start({"lr": 0.1})
    tracker.log_metrics({"loss": 1.0}, 1)
    server.stop()
    try:
        for step in (2, 3, 4):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.log_metrics({"../escape": 1.0}, 4)          # rejected once the server is back
        tracker.log_metrics({"loss": 0.2}, 5)
        assert tracker.pending == 5 and tracker.dead_letters == 0
        assert len(spool.read_text().splitlines()) == 5, "the spool holds what is unsent"
        monkeypatch.setattr(tracker, "_read_spool", None)   # appended to, never re-read
        tracker.log_metrics({"loss": 0.1}, 6)
        assert len(spool.read_text().splitlines()) == 6
    finally:
        server.start()
    assert tracker.finish(wait_s=60)                        # the run's end replays the spool
    assert tracker.pending == 0 and tracker.dead_letters == 1 and not spool.exists()
    client, run = _run(server.uri, "transient")
    assert _steps(client, run, "loss") == [1, 2, 3, 4, 5, 6]
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_leftover_spool_is_replayed_by_the_next_tracker(server, tmp_path):
    spool = tmp_path / "mlflow-spool.jsonl"
    rec = {"kind": "metrics", "metrics": {"loss": 3.0}, "step": 7, "ts": 0}
    spool.write_text(json.dumps(rec) + "\n")
    tracker = Tracker(server.uri, "errors", "leftover", spool)
    assert tracker.pending == 1
    tracker.start({"lr": 0.1})
    assert tracker.pending == 0 and not spool.exists()
    tracker.finish()
    client, run = _run(server.uri, "leftover")
    assert _steps(client, run, "loss") == [7]


@pytest.mark.slow
def test_timeout_is_transient(tmp_path, monkeypatch):
    """A server that accepts connections and never answers."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(16)
        uri = f"http://127.0.0.1:{sink.getsockname()[1]}"
        tracker = Tracker(uri, "errors", "timeout", tmp_path / "mlflow-spool.jsonl")
        tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.pending == 1 and tracker.dead_letters == 0


def test_error_classes():
    from mlflow.exceptions import MlflowException, RestException

    def rest(code: str) -> RestException:
        return RestException({"error_code": code, "message": "m"})

    for exc in (rest("INTERNAL_ERROR"), rest("TEMPORARILY_UNAVAILABLE"), rest("502"),
                rest("REQUEST_LIMIT_EXCEEDED"), MlflowException("API request failed with timeout"),
                ConnectionError("refused"), TimeoutError()):
        assert is_transient(exc), exc
    for exc in (rest("INVALID_PARAMETER_VALUE"), rest("RESOURCE_DOES_NOT_EXIST"),
                rest("PERMISSION_DENIED"), MlflowException.invalid_parameter_value("too long"),
                TypeError("bad record")):
        assert not is_transient(exc), exc

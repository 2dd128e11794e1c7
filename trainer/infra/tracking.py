"""MLflow tracking from rank 0 that never stops training.

One MLflow run per dldkd run name: the run is found again by its ``dldkd.run_key`` tag, so a
restarted or resumed run appends to its own run.

Errors are sorted by :func:`is_transient`. A transient failure (server down, timeout, HTTP 5xx,
408/429) keeps the record, and every later one, in memory and appended to ``mlflow-spool.jsonl`` in
the run folder; they are replayed, in order, at the next try (every ``retry_every_s``) and at
:meth:`Tracker.finish`, so no metric is lost. A permanent rejection (other 4xx, a value MLflow
refuses) would fail the same way forever: that record goes to ``<spool>.dead-letter.jsonl`` with
the reason, is counted in :attr:`Tracker.dead_letters`, and the records after it are still sent.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from sharding.files import write_atomic
from trainer.infra.tags import RUN_KEY_TAG

log = logging.getLogger(__name__)

PARAM_LIMIT = 6000  # MLflow's param value limit
RETRY_STATUS = (408, 429)  # 4xx statuses that mean "try again later"


def is_transient(exc: BaseException) -> bool:
    """True when retrying may succeed: no connection, timeouts, HTTP 5xx, 408, 429.

    MLflow raises connection errors and timeouts as ``MlflowException`` with INTERNAL_ERROR (500),
    a server's error reply as ``RestException`` with its ``error_code``, and values it refuses
    (INVALID_PARAMETER_VALUE, 400) before or after sending. Anything that is neither an MLflow nor
    an OS/network error (a TypeError building the record) would fail again on every retry.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in RETRY_STATUS
    return isinstance(exc, OSError)  # ConnectionError, TimeoutError, requests' errors


def resolve_uri(configured: str, folder: Path) -> str:
    """The MLflow store of a run or a sweep: ``tracking.uri`` (which ``load_config`` filled from
    $MLFLOW_TRACKING_URI where the config was loaded), else a SQLite file in ``folder``; never this
    process's environment, which a worker may lack."""
    if configured:
        return configured
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside its database (MLflow's default is
    ``./mlruns`` of whatever folder the process started in); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return None


class Tracker:
    """Rank-0 MLflow logger with a disk spool; a disabled tracker (other ranks) does nothing."""

    def __init__(self, uri: str, experiment: str, run_key: str, spool: Path, *,
                 enabled: bool = True, parent_run_id: str = "", system_metrics: bool = False,
                 retry_every_s: float = 5.0):
        self.uri, self.experiment, self.run_key = uri, experiment, run_key
        self.spool = Path(spool)
        self.enabled = enabled
        self.parent_run_id = parent_run_id
        self.system_metrics = system_metrics
        self.retry_every_s = retry_every_s
        self.run_id: str | None = None
        self.dead_letter = self.spool.with_name(self.spool.stem + ".dead-letter.jsonl")
        self.dead_letters = 0  # records MLflow rejected permanently, in this process
        # Unsent records, oldest first; while any wait, the spool file holds exactly these (a
        # previous process's leftovers are replayed first).
        self._queue: deque[dict] = deque(self._read_spool() if enabled else ())
        self._spooled = bool(self._queue)
        self._last_try = 0.0
        self._client = None
        self._active = False
        if enabled:
            # Fail fast instead of MLflow's minutes of backoff: the spool keeps what fails.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

    # -- public API -------------------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, str] | None = None) -> None:
        if not self.enabled:
            return
        self._record({"kind": "params", "params": {k: _param(v) for k, v in params.items()},
                      "tags": dict(tags or {})})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        clean = {k: float(v) for k, v in metrics.items() if _finite(v)}
        self._record({"kind": "metrics", "metrics": clean, "step": int(step),
                      "ts": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._record({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._record({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def finish(self, status: str = "FINISHED", wait_s: float = 30.0) -> bool:
        """Flush the spool (retrying up to ``wait_s``) and close the run; True if nothing is left."""
        if not self.enabled:
            return True
        deadline = time.time() + wait_s
        while True:
            self._last_try = 0.0
            if self._flush():
                break
            if time.time() > deadline:
                log.warning("MLflow at %s unreachable; %s keeps the unsent records "
                            "(replayed by the next run with this name)", self.uri, self.spool)
                return False
            time.sleep(1.0)
        try:
            self._ensure_client().set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail training
            log.warning("could not close MLflow run %s: %s", self.run_id, exc)
        self._stop_system_metrics()
        return True

    def mark_killed(self) -> None:
        """Close the run as KILLED at once, without flushing (a process about to exit: the
        spool keeps what was not sent, for the next run with this name)."""
        if self.enabled:
            mark_killed(self.uri, self.experiment, self.run_key)

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- internals --------------------------------------------------------------------------
    def _record(self, rec: dict) -> None:
        self._queue.append(rec)
        if self._spooled:  # an outage is on: the file keeps the order the queue has
            with open(self.spool, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self._flush()

    def _flush(self) -> bool:
        """Send queued records in order until the first transient failure; permanent rejections
        are dead-lettered on the way. True when nothing is left."""
        if not self._queue:
            return True
        if time.time() - self._last_try < self.retry_every_s and self._last_try:
            return False
        self._last_try = time.time()
        sent = 0
        try:
            self._ensure_run()
            while self._queue:
                try:
                    self._send(self._queue[0])
                except Exception as exc:  # noqa: BLE001 - sorted below, never fails training
                    if is_transient(exc):
                        raise
                    self._reject(self._queue[0], exc)
                self._queue.popleft()
                sent += 1
        except Exception as exc:  # noqa: BLE001 - tracking must never fail training
            log.warning("MLflow unavailable (%s: %s); %d record(s) spooled to %s",
                        type(exc).__name__, _short(exc, 200), len(self._queue), self.spool)
            if sent or not self._spooled:
                self._rewrite_spool(list(self._queue))
                self._spooled = True
            return False
        self._last_try = 0.0
        if self._spooled:
            self.spool.unlink(missing_ok=True)
            self._spooled = False
        return True

    def _reject(self, rec: dict, exc: Exception) -> None:
        """Keep a record MLflow will never accept, with the reason, and go on with the next."""
        self.dead_letters += 1
        reason = f"{type(exc).__name__}: {_short(exc, 2000)}"
        entry = {"reason": reason, "error_code": getattr(exc, "error_code", None),
                 "run_id": self.run_id, "time": int(time.time()), "record": rec}
        self.dead_letter.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dead_letter, "a") as f:
            f.write(json.dumps(entry) + "\n")
        log.error("MLflow rejected a %s record for good (%s); kept in %s (%d so far). Fix the "
                  "key or value, then log it again from that file", rec.get("kind"),
                  _short(exc, 300), self.dead_letter, self.dead_letters)

    def _send(self, rec: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._ensure_client()
        kind = rec["kind"]
        if kind == "metrics":
            metrics = [Metric(k, v, rec["ts"], rec["step"]) for k, v in rec["metrics"].items()]
            for i in range(0, len(metrics), 900):
                client.log_batch(self.run_id, metrics=metrics[i:i + 900], synchronous=True)
        elif kind == "params":
            existing = client.get_run(self.run_id).data.params
            params = [Param(k, v) for k, v in rec["params"].items() if k not in existing]
            for i in range(0, len(params), 90):
                client.log_batch(self.run_id, params=params[i:i + 90], synchronous=True)
            if rec["tags"]:
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        elif kind == "artifact":
            if Path(rec["path"]).exists():
                client.log_artifact(self.run_id, rec["path"], rec["artifact_path"])

    def _ensure_client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        client = self._ensure_client()
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            self.experiment, artifact_location=artifact_location(self.uri))
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_KEY_TAG: self.run_key}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            self.run_id = client.create_run(exp_id, run_name=self.run_key, tags=tags).info.run_id
        self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        if not self.system_metrics or self._active:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=10, resume_logging=True, tracking_uri=self.uri)
            self._monitor.start()
            self._active = True
        except Exception as exc:  # noqa: BLE001 - optional feature
            log.info("system metrics off: %s", exc)

    def _stop_system_metrics(self) -> None:
        if self._active:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
            self._active = False

    def _read_spool(self) -> list[dict]:
        if not self.spool.exists():
            return []
        out = []
        for line in self.spool.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("dropping a torn line in %s", self.spool)
        return out

    def _rewrite_spool(self, records: list[dict]) -> None:
        write_atomic(self.spool, "".join(json.dumps(r) + "\n" for r in records))


def mark_killed(uri: str, experiment: str, run_key: str) -> bool:
    """Set the MLflow run of ``run_key`` to KILLED (a run stopped at once, by a second signal or
    after its grace period); False when there is none or MLflow is unreachable."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        found = exp and client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
            max_results=1)
        if not found:
            return False
        client.set_terminated(found[0].info.run_id, status="KILLED")
        return True
    except Exception as exc:  # noqa: BLE001 - the process exits regardless
        log.warning("could not mark MLflow run %s KILLED: %s", run_key, _short(exc, 200))
        return False


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:PARAM_LIMIT]


def _short(exc: BaseException, limit: int) -> str:
    """MLflow's messages can quote the whole rejected value."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))

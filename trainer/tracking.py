"""MLflow tracking from rank 0 that never stops training.

One MLflow run per dldkd run name: the run is found again by its ``dldkd.run_key`` tag, so a
restarted or resumed run appends to its own run. Any failed call (server down, network) spools the
record to ``mlflow-spool.jsonl`` in the run folder; the spool is replayed, in order, as soon as the
server answers again and at :meth:`Tracker.finish`, so no metric is lost.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_KEY_TAG = "dldkd.run_key"
PARAM_LIMIT = 6000  # MLflow's param value limit


def resolve_uri(configured: str, run_dir: Path) -> str:
    """Config value (which ``load_config`` filled from $MLFLOW_TRACKING_URI on the driver), else
    a SQLite file in the run folder; never this process's environment, which a worker may lack."""
    if configured:
        return configured
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


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

    @property
    def pending(self) -> int:
        return len(self._read_spool())

    # -- internals --------------------------------------------------------------------------
    def _record(self, rec: dict) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self._flush()

    def _flush(self) -> bool:
        """Send spooled records in order; stop at the first failure. True when the spool is empty."""
        records = self._read_spool()
        if not records:
            return True
        if time.time() - self._last_try < self.retry_every_s and self._last_try:
            return False
        self._last_try = time.time()
        sent = 0
        try:
            self._ensure_run()
            for rec in records:
                self._send(rec)
                sent += 1
        except Exception as exc:  # noqa: BLE001 - tracking must never fail training
            log.warning("MLflow unavailable (%s); spooled %d record(s) to %s",
                        type(exc).__name__, len(records) - sent, self.spool)
            self._rewrite_spool(records[sent:])
            return False
        self._last_try = 0.0
        self._rewrite_spool([])
        return True

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
        exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
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
        tmp = self.spool.with_name(self.spool.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.spool)


def _param(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:PARAM_LIMIT]


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))

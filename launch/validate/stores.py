"""``dldkd validate``: run storage can be written (with its credentials) and MLflow answers."""
from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from launch.validate.result import FAIL, OK, WARN, Check
from trainer.config import Config
from trainer.infra.storage import is_remote

HEALTH_TIMEOUT_S = 3.0
PROBE_PREFIX = ".dldkd-validate-"


def _probe_local(folder: Path) -> str | None:
    """Create and delete a file in ``folder`` or, if it does not exist yet, in its nearest existing
    parent (where the run would create it); None when that works, else the error."""
    target = folder
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        return f"{target} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=PROBE_PREFIX):
            pass
    except OSError as err:
        return f"cannot write in {target}: {err}"
    return None


def _probe_remote(url: str) -> str | None:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        kwargs = ({"config_kwargs": {"connect_timeout": 5, "read_timeout": 5,
                                     "retries": {"max_attempts": 1}}}
                  if protocol in ("s3", "s3a") else {})
        fs = fsspec.filesystem(protocol, **kwargs)
    except ImportError as err:
        extra = "pip install s3fs (a dldkd dependency)" if protocol in ("s3", "s3a") else \
            f"install the fsspec backend for {protocol}://"
        return f"no filesystem for {protocol}:// ({err}): {extra}"
    except ValueError as err:
        return f"unknown storage protocol {protocol!r}: {err}"
    probe = f"{url.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as err:  # noqa: BLE001  (credentials, network, permissions alike)
        return f"cannot write {probe}: {type(err).__name__}: {err} (check credentials/endpoint)"
    return None


def check_storage(cfg: Config) -> Check:
    storage = cfg.run.storage
    error = _probe_remote(storage) if is_remote(storage) else _probe_local(Path(storage))
    if error:
        return Check("storage", FAIL, f"run.storage={storage!r}: {error}")
    return Check("storage", OK, f"run.storage={storage!r} is writable")


def check_tracking(cfg: Config) -> Check:
    """The MLflow store answers or can be written. ``load_config`` has filled an empty
    ``tracking.uri`` from $MLFLOW_TRACKING_URI; still empty, it is the run folder's SQLite file,
    which the config check refuses for a remote ``run.storage``."""
    uri = cfg.tracking.uri
    if not uri:
        return Check("tracking", OK, f"SQLite file {Path(cfg.run.storage) / cfg.run.name}/"
                     "mlflow.db (storage check covers it)")
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_S) as resp:
                status = resp.status
        except (urllib.error.URLError, OSError) as err:
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {health} did not answer within "
                         f"{HEALTH_TIMEOUT_S:g} s ({err}); start the server or fix the address")
        if status != 200:
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {health} answered {status}")
        return Check("tracking", OK, f"tracking.uri={uri!r} answers /health")
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.exists() and not os.access(path, os.W_OK):
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {path} is not writable")
        error = _probe_local(path.parent)
        if error:
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {error}")
        return Check("tracking", OK, f"tracking.uri={uri!r}: SQLite file writable")
    if uri.startswith("file:") or "://" not in uri:
        error = _probe_local(Path(uri[len("file://"):] if uri.startswith("file://") else uri))
        if error:
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {error}")
        return Check("tracking", WARN, f"tracking.uri={uri!r} is MLflow's legacy file store; "
                     "prefer sqlite:///path/mlflow.db or a server")
    return Check("tracking", WARN, f"tracking.uri={uri!r}: this kind of store is not checked here")

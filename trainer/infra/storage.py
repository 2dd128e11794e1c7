"""Where a run's files live: a local folder or an object-store URI (``s3://...``), one API for both.

``run.storage`` is either. A run's durable files (Ray checkpoints, ``best/``, the test report) go
to ``<run.storage>/<run.name>``; its scratch files (MLflow spool, a cached copy of ``best/``) go to
a local folder, the run folder itself when storage is local. Object stores are reached through
fsspec (s3fs for ``s3://``), which takes its endpoint, region and keys from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``...).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sharding.files import write_atomic

# Standard, non-secret variables that point S3 clients (s3fs, boto3, pyarrow, MLflow) at a store.
# Keys stay with each node (Secret, instance role): runtime envs are visible in Ray's dashboard.
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "MLFLOW_S3_ENDPOINT_URL")


def is_remote(location: str) -> bool:
    """True for a URI with a scheme other than ``file://`` (s3://, gs://, ...)."""
    return "://" in location and not location.startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a folder or a URI (URIs always join with '/')."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def absolute(location: str) -> str:
    """A URI unchanged, a local path made absolute (what Ray's ``storage_path`` needs)."""
    return location if is_remote(location) else str(Path(location).resolve())


def run_location(storage: str, name: str) -> str:
    """``<storage>/<name>``: where a run's durable files go."""
    return join(absolute(storage), name)


def local_run_dir(storage: str, name: str) -> Path:
    """The run folder when storage is local, else a scratch folder on this node."""
    if is_remote(storage):
        return Path(tempfile.gettempdir()) / "dldkd" / name
    return Path(storage) / name


def endpoint_env(environ: dict | None = None) -> dict[str, str]:
    """The set standard endpoint/region variables, to hand to processes on other nodes."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in ENDPOINT_VARS if environ.get(k)}


def _fs(location: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(location)
    except ImportError as err:
        raise ImportError(f"no filesystem for {location}: {err}; install s3fs "
                          "(pip install s3fs) or the fsspec backend for its scheme") from err


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file so readers see the old or the new content, never a part.

    Locally: a temporary name, fsync, rename. On an object store: one put (objects appear whole).
    """
    if is_remote(location):
        fs, path = _fs(location)
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)
        return
    write_atomic(location, data)


def read_bytes(location: str) -> bytes:
    if is_remote(location):
        fs, path = _fs(location)
        fs.invalidate_cache(path)
        return fs.cat_file(path)
    return Path(location).read_bytes()

"""Where a run's files live: a local folder or an object-store URI (``s3://...``), one API for both.

``run.storage`` is either. A run's durable files (checkpoints, ``best/``, the test report) go
to ``<run.storage>/<run.name>``; its scratch files (MLflow spool, a cached copy of ``best/``) go to
a local folder, the run folder itself when storage is local. For remote storage that folder is
only a cache keyed by the storage URI and the run name, never read in place of storage. Shard
writers reach a remote ``--out`` through ``mirrored``. Object stores are reached through fsspec
(s3fs for ``s3://``), which takes its endpoint, region and keys from the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``...).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
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
    """The run folder when storage is local, else a scratch folder on this node keyed by the
    storage URI and the run name (a run of the same name on other storage has its own)."""
    if is_remote(storage):
        return cache_dir("runs", run_location(storage, name), name)
    return Path(storage) / name


def cache_dir(kind: str, location: str, label: str = "") -> Path:
    """``<tmp>/dldkd/<kind>/<label>-<hash of location>``: this node's cache of ``location``."""
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]
    return Path(tempfile.gettempdir()) / "dldkd" / kind / f"{label}-{digest}".lstrip("-")


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


def exists(location: str) -> bool:
    if is_remote(location):
        fs, path = _fs(location)
        fs.invalidate_cache(path)
        return fs.exists(path)
    return Path(location).exists()


def listdir(location: str) -> list[str]:
    """Names of the entries directly under ``location`` (empty when there is none)."""
    if not is_remote(location):
        folder = Path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    fs, path = _fs(location)
    fs.invalidate_cache(path)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def remove(location: str) -> None:
    """Delete a file or folder (everything under a prefix); nothing when absent."""
    if not is_remote(location):
        target = Path(location)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        return
    fs, path = _fs(location)
    fs.invalidate_cache(path)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def files(location: str) -> dict[str, dict]:
    """{relative path: info} of every file under ``location`` (remote), recursively."""
    fs, path = _fs(location)
    fs.invalidate_cache(path)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    root = path.rstrip("/") + "/"
    # Folder marker objects ("<prefix>/", which pyarrow's S3 client writes, as Ray does) are
    # no files.
    return {p[len(root):]: info for p, info in found.items()
            if p.startswith(root) and not p.endswith("/") and len(p) > len(root)
            and info.get("type") != "directory"}


def upload(folder: Path, location: str, names: list[str] | None = None) -> None:
    """Each file under ``folder`` (or only ``names``, relative paths, in that order) to the same
    relative path under remote ``location``, each as one put: an object appears whole."""
    fs, path = _fs(location)
    folder = Path(folder)
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    for name in names:
        fs.put_file(str(folder / name), f"{path.rstrip('/')}/{name}")
    fs.invalidate_cache(path)


def download(location: str, folder: Path) -> Path:
    """Every file under remote ``location`` into ``folder`` (emptied first); returns it."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    fs, path = _fs(location)
    for name in files(location):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{path.rstrip('/')}/{name}", str(target))
    return folder


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same(local: Path, info: dict | None) -> bool:
    """Whether a remote object (its listing ``info``) holds the bytes of ``local``: same size
    and, where the store gives a single-put ETag (an MD5), the same MD5."""
    if info is None or int(info.get("size", -1)) != local.stat().st_size:
        return False
    etag = str(info.get("ETag", info.get("etag", ""))).strip('"')
    return "-" in etag or not etag or etag == _md5(local)


@contextlib.contextmanager
def mirrored(location: str, last: tuple[str, ...] = ("manifest.json",), under: str = ""):
    """A local folder standing for ``location``: itself when local; for a remote one a cache
    folder on this node, filled from the store first (so a writer's resume sees what the store
    holds), whose changed files are uploaded after the writer succeeds, each as one put, files
    named ``last`` after all others, then files the writer removed are deleted from the store.
    ``under`` limits all that to one subfolder (the split a writer writes). A writer that fails
    uploads nothing; its rerun resumes from the cache and the store."""
    if not is_remote(location):
        yield Path(location)
        return
    location = location.rstrip("/")
    cache = cache_dir("out", location, location.rsplit("/", 1)[-1])
    prefix = f"{under.strip('/')}/" if under else ""
    remote = {prefix + k: v for k, v in files(join(location, under) if under else location).items()}
    fs, path = _fs(location)
    for name, info in remote.items():
        target = cache / name
        if not (target.is_file() and _same(target, info)):
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{path}/{name}", str(target))
    yield cache
    local = sorted(str(p.relative_to(cache)) for p in (cache / prefix).rglob("*") if p.is_file())
    ends = [n for n in local if n.rsplit("/", 1)[-1] in last]
    changed = [n for n in local if n not in ends and not _same(cache / n, remote.get(n))]
    upload(cache, location, changed + ends)
    for name in sorted(set(remote) - set(local)):
        fs.rm_file(f"{path}/{name}")
    fs.invalidate_cache(path)

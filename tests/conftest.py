"""Shared fixtures: one small synthetic world per test session, tiny run configs."""
from __future__ import annotations

import os

import pytest

from bench.servers import MlflowServer, free_port  # noqa: F401  (fixtures and tests use them)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic PRVR world (train/val/test/pretrain) shared by the integration tests."""
    from sharding.synthetic import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, videos=96, eval_videos=32, pretrain_pairs=256, videos_per_shard=24,
                progress=False)
    return out


def tiny_overrides(world, storage, name: str = "t", **extra) -> list[str]:
    """configs/tiny.yaml on the session world, a few short epochs."""
    base = {
        "data.train": str(world / "train"), "data.val": str(world / "val"),
        "run.storage": str(storage), "run.name": name, "train.epochs": 2,
        "data.steps_per_epoch": 3, "train.log_every": 1, "tracking.system_metrics": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def rehash(folder) -> None:
    """Record a split's shards as they now are (sha256 and size) in its manifest: damage that
    the manifest does not betray, as if the shards had been written that way."""
    import json
    from pathlib import Path

    from sharding.writer import sha256_file

    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    for shard in manifest["shards"]:
        tar = Path(folder) / shard["name"]
        shard["sha256"], shard["bytes"] = sha256_file(tar), tar.stat().st_size
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))


@pytest.fixture(scope="session")
def tiny_teacher(world, tmp_path_factory) -> str:
    """A tiny open_clip teacher pretrained briefly on the world's image-text split."""
    from trainer.teacher.pretrain import pretrain

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    pretrain(str(world / "pretrain"), str(path), steps=20, batch_size=32, seed=0)
    return str(path)


class S3Store:
    """A bucket on the local S3 API server; ``url(...)`` names objects in it."""

    def __init__(self, endpoint: str, bucket: str):
        import s3fs

        self.endpoint, self.bucket = endpoint, bucket
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True)   # reads AWS_ENDPOINT_URL
        self.fs.mkdir(bucket)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def upload(self, folder, *parts: str) -> str:
        """Copy a local folder's files under ``url(*parts)``; returns that URL."""
        from pathlib import Path

        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                self.fs.pipe_file(self.url(*parts, *path.relative_to(folder).parts),
                                  path.read_bytes())
        return self.url(*parts)

    def exists(self, *parts: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.url(*parts))


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 API on 127.0.0.1, found by every client through the standard variables
    (``AWS_ENDPOINT_URL``, ``MLFLOW_S3_ENDPOINT_URL``) with dummy keys; stopped after the module."""
    import logging

    from moto.server import ThreadedMotoServer

    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                           "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        # fsspec caches filesystems (with the endpoint they read): none may outlive a server.
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def s3(s3_server, request) -> S3Store:
    """A fresh bucket per test on the module's S3 server."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return S3Store(s3_server, f"{name}-{uuid.uuid4().hex[:8]}")




@pytest.fixture
def ray_session():
    """One local Ray cluster shared by the session's Ray tests (each start costs seconds and a
    GB): started on first use, restarted if a test shut it down (tests that need a cluster of
    their own, such as the multi-node ones, call ``ray.shutdown()`` first), stopped at exit."""
    import ray

    if not ray.is_initialized():
        # address="local": a cluster of our own even when `ray start` runs one on this machine.
        from launch.jobs import ray_setup

        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 runtime_env=ray_setup.runtime_env())   # as dldkd's own launches do
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_exit():
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()

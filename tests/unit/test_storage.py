"""Where a run's files live (trainer/infra/storage.py) and its best weights
(trainer/infra/best.py), on a local folder and on a real S3 API (moto's server on 127.0.0.1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.infra import best, storage
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_locations_local_and_remote(tmp_path):
    assert storage.is_remote("s3://b/runs") and not storage.is_remote("runs")
    assert not storage.is_remote("file:///x")
    assert storage.join("s3://b/runs/", "r", "best") == "s3://b/runs/r/best"
    assert storage.run_location("s3://b/runs", "r") == "s3://b/runs/r"
    assert storage.run_location(str(tmp_path), "r") == str(tmp_path.resolve() / "r")
    assert storage.local_run_dir(str(tmp_path), "r") == tmp_path / "r"
    # remote storage: scratch on this node, never the URI
    assert not storage.is_remote(str(storage.local_run_dir("s3://b/runs", "r")))
    env = {"AWS_ENDPOINT_URL": "http://s3:9000", "AWS_SECRET_ACCESS_KEY": "k", "AWS_REGION": ""}
    assert storage.endpoint_env(env) == {"AWS_ENDPOINT_URL": "http://s3:9000"}  # no keys


def test_local_write_is_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "f.bin"
    storage.write_bytes(str(target), b"one")
    storage.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two" and storage.read_bytes(str(target)) == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_remote_write_and_read(s3):
    url = s3.url("x", "f.json")
    storage.write_bytes(url, b"{}")
    storage.write_bytes(url, b"[]")
    assert storage.read_bytes(url) == b"[]" and s3.exists("x", "f.json")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(s3.url("x", "missing"))


def _save(location: str, cache: Path, step: int, value: float) -> dict:
    weights = {"w": torch.full((3,), value)}
    best.save(location, cache, weights, {"run": {"name": "r"}}, {"step": step, "SumR": value})
    return weights


def test_best_weights_survive_the_loss_of_the_node_cache(s3, tmp_path):
    location = s3.url("runs", "r", "best")
    cache = tmp_path / "node-a" / "best"
    _save(location, cache, 4, 1.0)
    _save(location, cache, 6, 2.0)
    assert best.saved_step(cache) == 6
    assert {Path(p).name for p in s3.fs.ls(location)} == set(best.FILES)
    # another node: an empty cache is filled from storage
    other = tmp_path / "node-b" / "best"
    assert best.local_copy(location, other, 6) == other
    assert torch.load(other / "student.pt", weights_only=True)["w"].tolist() == [2.0] * 3
    assert json.loads((other / "metrics.json").read_text())["SumR"] == 2.0
    # a stale cache (an older best) is replaced
    stale = tmp_path / "node-c" / "best"
    _save(str(stale), stale, 4, 1.0)
    best.local_copy(location, stale, 6)
    assert best.saved_step(stale) == 6


def test_missing_best_weights_are_named(s3, tmp_path):
    with pytest.raises(FileNotFoundError, match="student.pt is missing"):
        best.local_copy(s3.url("runs", "none", "best"), tmp_path / "c", 3)
    with pytest.raises(FileNotFoundError, match="no best weights"):
        best.local_copy(str(tmp_path / "local"), tmp_path / "local", 3)


def test_driver_config_is_valid_in_a_worker_without_the_variable(monkeypatch, tmp_path):
    """The tracking URI is resolved into the config where it is loaded; a worker process whose
    environment lacks $MLFLOW_TRACKING_URI rebuilds the same, valid config."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["run.storage=s3://b/runs"])
    assert cfg.tracking.uri == "http://mlflow:5000"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    code = ("import json, os, sys; from trainer.config import from_dict; "
            "assert 'MLFLOW_TRACKING_URI' not in os.environ; "
            f"c = from_dict(json.load(open({str(tmp_path / 'cfg.json')!r}))); "
            "print(c.tracking.uri, c.run.storage)")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["http://mlflow:5000", "s3://b/runs"]
    # An explicit tracking.uri wins over the variable.
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["tracking.uri=sqlite:///x.db"])
    assert cfg.tracking.uri == "sqlite:///x.db"


def test_node_scratch_is_keyed_by_storage_and_name():
    """A run of the same name on other storage never shares this node's scratch."""
    a = storage.local_run_dir("s3://a/runs", "r")
    assert a != storage.local_run_dir("s3://b/runs", "r")
    assert a != storage.local_run_dir("s3://a/runs", "q")
    assert a == storage.local_run_dir("s3://a/runs/", "r")


def test_object_store_checkpoints_count_only_once_complete(s3, tmp_path):
    """Without Ray on S3: a checkpoint's files are uploaded, then its marker; a folder without
    the marker (an upload cut short) is never resumed from, and a resume reads the store, not
    what this node's cache holds."""
    from trainer.infra.reporting import COMPLETE, LocalReporter, complete_step

    root = s3.url("runs", "r", "checkpoints")
    rep = LocalReporter(root, True, cache=tmp_path / "cache")
    for step in (2, 4):
        staged = rep.staging_dir(step)
        staged.mkdir(parents=True)
        (staged / "client.json").write_text(str(step))
        (staged / "state").mkdir()
        (staged / "state" / "model.pt").write_bytes(b"w" * step)
        rep.report({}, staged, step)
        assert not staged.exists()
    assert complete_step(root) == 4 and s3.exists("runs", "r", "checkpoints", "step-00000004",
                                                  "state", "model.pt")
    s3.fs.rm_file(f"{root}/step-00000004/{COMPLETE}")   # as if cut short before its marker
    (tmp_path / "cache" / "restored" / "step-00000002").mkdir(parents=True)
    (tmp_path / "cache" / "restored" / "step-00000002" / "client.json").write_text("stale")
    found = LocalReporter(root, True, cache=tmp_path / "cache").restore_dir()
    assert found.name == "step-00000002" and (found / "client.json").read_text() == "2"
    assert (found / "state" / "model.pt").read_bytes() == b"ww"
    assert LocalReporter(s3.url("other", "r", "checkpoints"), True,
                         cache=tmp_path / "cache").restore_dir() is None

"""The reader's error policy: damaged data is skipped, logged, counted and reaches MLflow;
a bug in our own code is raised, never counted as damage."""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile

import pytest

from sharding import reader as reader_mod
from sharding.reader import ShardReader
from tests.conftest import tiny_overrides
from trainer.config import load_config
from trainer.recipe import Recipe

GARBAGE = b"\x93NUMPY this is not an array"


def _damage_first_sample(shard, member: str = "frames.npy", data: bytes = GARBAGE) -> str:
    """Rewrite ``shard`` with ``member`` of its first sample replaced; returns that sample's key."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isreg()]
    key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as tar:
        for info, body in members:
            if info.name == f"{key}.{member}":
                body = data
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return key


@pytest.fixture
def damaged(world, tmp_path):
    """A copy of the world's train split whose first shard has one garbage ``.npy`` member."""
    out = tmp_path / "train"
    shutil.copytree(world / "train", out)
    shard = sorted(out.glob("*.tar"))[0]
    return out, shard, _damage_first_sample(shard)


def _reader(source, **kw) -> ShardReader:
    return ShardReader(source, batch_videos=16, loader_workers=0, resampled=False,
                       max_bad_fraction=0.1, **kw)


def test_garbage_npy_is_logged_and_counted(damaged, caplog):
    folder, shard, key = damaged
    r = _reader(folder, true_epochs=True)
    with caplog.at_level(logging.WARNING, logger="sharding.reader"):
        n = sum(b.num_videos for b in r.epoch(0))
    assert r.counts() == [n, 1, 0]
    (line,) = [rec.getMessage() for rec in caplog.records if key in rec.getMessage()]
    assert shard.name in line and "frames.npy" in line


def test_meta_of_the_wrong_type_is_damage(world, tmp_path):
    """A schema error that would raise TypeError inside decoding is still data damage."""
    out = tmp_path / "train"
    shutil.copytree(world / "train", out)
    shard = sorted(out.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        meta = next(tar.extractfile(i).read() for i in tar if i.name.endswith(".meta.json"))
    _damage_first_sample(shard, "meta.json", json.dumps({**json.loads(meta), "cap_ids": 5})
                         .encode())
    r = _reader(out, true_epochs=True)
    list(r.epoch(0))
    assert r.counts()[1:] == [1, 0]


@pytest.mark.parametrize("true_epochs", [False, True])
def test_bug_in_decode_is_raised_not_counted(world, monkeypatch, true_epochs):
    def broken(*args, **kwargs):
        raise TypeError("a bug in decode")

    monkeypatch.setattr(reader_mod, "decode_sample", broken)
    r = _reader(world / "train", true_epochs=true_epochs)
    with pytest.raises(TypeError, match="a bug in decode"):
        list(r.epoch(0))
    assert r.counts()[1:] == [0, 0]


def test_bug_while_reading_a_shard_is_raised_not_counted(world, monkeypatch):
    def broken(url):
        raise KeyError("a bug in the tar reader")
        yield

    monkeypatch.setattr(reader_mod, "_tar_members", broken)
    r = _reader(world / "train")
    with pytest.raises(KeyError, match="a bug in the tar reader"):
        list(r.epoch(0))
    assert r.counts()[1:] == [0, 0]


@pytest.mark.slow
def test_training_goes_on_and_mlflow_sees_the_damage(world, damaged, tmp_path, caplog):
    folder, shard, key = damaged
    cfg = load_config("configs/tiny.yaml", tiny_overrides(
        world, tmp_path, "damaged", **{"data.train": str(folder), "data.true_epochs": True,
                                       "data.steps_per_epoch": 0,
                                       "data.max_bad_fraction": 0.05}))
    recipe = Recipe(cfg)
    recipe.setup()
    with caplog.at_level(logging.WARNING, logger="sharding.reader"):
        recipe.train()
    recipe.cleanup()
    assert recipe.state.step == 2 * recipe.steps_per_epoch
    assert any(key in r.getMessage() and shard.name in r.getMessage() for r in caplog.records)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(recipe.tracker.uri)
    history = {name: {m.step: m.value for m in client.get_metric_history(recipe.tracker.run_id,
                                                                         name)}
               for name in ("data/bad_samples", "data/bad_shards", "teacher/cache_hit_rate")}
    last = recipe.state.step
    assert history["data/bad_samples"][last] == 2     # the damaged sample, once per epoch
    assert history["data/bad_shards"][last] == 0
    assert sorted(history["data/bad_samples"]) == list(range(1, last + 1))
    assert 0 < history["teacher/cache_hit_rate"][last] < 1   # the 2nd epoch reads the cache

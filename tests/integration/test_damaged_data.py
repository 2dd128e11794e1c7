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
from sharding import sources as sources_mod
from sharding.integrity import BadDataError, over_budget
from sharding.reader import ShardReader, read_all
from tests.conftest import rehash, tiny_overrides
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
    key = _damage_first_sample(shard)
    rehash(out)   # garbage behind a matching sha256: the decoder, not the hash, finds it
    return out, shard, key


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
    rehash(out)
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
    def broken(url, sha256=None):
        raise KeyError("a bug in the tar reader")
        yield

    monkeypatch.setattr(sources_mod, "tar_members", broken)
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


# -- the shard hash, checked while streaming ------------------------------------------------------
@pytest.fixture
def replaced(world, tmp_path):
    """A copy of the train split whose first shard was replaced by a valid shard of other bytes
    (the second one's): same sample count, readable, another sha256 than the manifest's."""
    out = tmp_path / "train"
    shutil.copytree(world / "train", out)
    shards = sorted(out.glob("*.tar"))
    shards[0].write_bytes(shards[1].read_bytes())
    return out, shards[0]


@pytest.mark.parametrize("mode", ["true epochs", "exact"])
def test_a_replaced_shard_is_damage_named_with_the_shard(replaced, mode):
    folder, shard = replaced
    kw = {"true_epochs": True} if mode == "true epochs" else {"resampled": False}
    r = ShardReader(folder, batch_videos=16, loader_workers=0, max_bad_fraction=0.5, **kw)
    list(r.epoch(0))
    done = r.stats if mode != "true epochs" else r.index_stats
    assert done.bad_shards >= 1 and done.bad_samples >= 23, r.counts()
    assert any(shard.name in e and "sha256" in e for e in done.errors), done.errors
    if mode == "exact":   # the shards that matched are not hashed again in later epochs
        assert len(r.plan.verified) == 3 and str(shard) not in r.plan.verified
    with pytest.raises(BadDataError, match="sha256"):   # true epochs: before the first epoch
        list(ShardReader(folder, batch_videos=16, loader_workers=0, max_bad_fraction=0.01,
                         **kw).epoch(0))


def test_read_all_refuses_a_replaced_shard(replaced):
    folder, shard = replaced
    with pytest.raises(BadDataError, match=f"{shard.name}: sha256"):
        read_all(folder)


# -- the damage budget: a stated rule, both sides ----------------------------------------------
def test_the_rule_judges_the_whole_epoch():
    assert not any(over_budget(1, 300, 0.01) for _ in range(300))   # 0.33% under 1%: never
    assert not over_budget(3, 300, 0.01) and over_budget(4, 300, 0.01)


def _damaged_at(world, tmp_path, samples: list[tuple[int, int]]):
    out = tmp_path / "train"
    shutil.copytree(world / "train", out)
    shards = sorted(out.glob("*.tar"))
    for shard, which in samples:
        _damage_nth_sample(shards[shard], which)
    rehash(out)
    return out


def _damage_nth_sample(shard, which: int) -> None:
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isreg()]
    keys = sorted({info.name.split(".", 1)[0] for info, _ in members})
    with tarfile.open(shard, "w") as tar:
        for info, body in members:
            if info.name == f"{keys[which]}.frames.npy":
                body = GARBAGE
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


@pytest.mark.parametrize("true_epochs", [False, True])
def test_a_fraction_under_the_budget_never_stops(world, tmp_path, true_epochs):
    """1 bad sample in 96 (1.04%) under a 1.1% budget, met in the first batch: the epoch runs."""
    folder = _damaged_at(world, tmp_path, [(0, 0)])
    r = _reader(folder, true_epochs=true_epochs) if true_epochs else \
        ShardReader(folder, batch_videos=16, loader_workers=0, resampled=False,
                    max_bad_fraction=0.011)
    r.max_bad_fraction = 0.011
    n = sum(b.num_videos for b in r.epoch(0))
    assert n == 95 and r.counts()[1] == 1


def test_a_fraction_over_the_budget_stops_when_the_count_exceeds_the_epoch_allowance(world,
                                                                                    tmp_path):
    """3 bad in 96 with a 2% budget (1.92 samples): reading stops at the second bad sample (in
    the second shard, the second batch), not at the first and not at the epoch's end."""
    folder = _damaged_at(world, tmp_path, [(0, 0), (1, 0), (3, 0)])
    r = ShardReader(folder, batch_videos=16, loader_workers=0, resampled=False,
                    max_bad_fraction=0.02)
    got = []
    with pytest.raises(BadDataError, match="2 of this rank's 96 samples"):
        for batch in r.epoch(0):
            got.append(batch.num_videos)
    assert len(got) == 1 and r.counts()[1] == 2

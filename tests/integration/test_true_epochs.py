"""True epochs: every video once per epoch, shuffled across shards, equal steps on every rank."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from sharding.batch import VideoSample
from sharding.epochs import rank_batches, steps_for
from sharding.preprocess import prepare_frames, prepare_tokens
from sharding.reader import BadDataError, ShardReader
from sharding.writer import write_split

DIMS = {"video_dim": 8, "query_dim": 6}


def _video(vid: str) -> VideoSample:
    rng = np.random.default_rng(int(vid[1:]))
    caps = int(rng.integers(1, 4))
    return VideoSample(vid, prepare_frames(rng.normal(size=(int(rng.integers(3, 40)), 8))),
                       [prepare_tokens(rng.normal(size=(4, 6))) for _ in range(caps)],
                       [f"{vid}#{k}" for k in range(caps)], ["a caption"] * caps)


def _split(folder, n: int, per_shard: int = 4):
    write_split(folder, "train", [f"v{i}" for i in range(n)], _video, videos_per_shard=per_shard,
                dims=DIMS, progress=False)
    return folder


def _reader(src, rank=0, world_size=1, **kw):
    kw = {"batch_videos": 5, "loader_workers": 2, "seed": 3, **kw}
    return ShardReader(src, rank=rank, world_size=world_size, true_epochs=True, **kw)


def _epoch(reader, epoch=0, start_step=0):
    return [b.video_ids for b in reader.epoch(epoch, start_step)]


def test_every_video_once_per_epoch_in_a_fresh_order_across_shards(tmp_path):
    src = _split(tmp_path, 24)                      # 6 shards of 4
    r = _reader(src)
    assert r.steps_per_epoch == 5                   # ceil(24 / 5)
    first, second = _epoch(r, 0), _epoch(r, 1)
    for batches in (first, second):
        videos = [v for b in batches for v in b]
        assert sorted(videos) == sorted(f"v{i}" for i in range(24))
        assert [len(b) for b in batches] == [5, 5, 5, 5, 4]
    assert first != second and _epoch(_reader(src), 0) == first
    shard_of = {f"v{i}": i // 4 for i in range(24)}
    assert max(len({shard_of[v] for v in b}) for b in first) >= 3   # batches mix shards


@pytest.mark.parametrize("n", [24, 25, 11])
def test_ranks_take_equal_steps_and_cover_every_video(tmp_path, n):
    src = _split(tmp_path, n)
    per_rank = [_epoch(_reader(src, rank=k, world_size=2, loader_workers=k), 2) for k in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == steps_for(n, 2, 5)
    counts = collections.Counter(v for batches in per_rank for b in batches for v in b)
    assert set(counts) == {f"v{i}" for i in range(n)}
    assert sum(counts.values()) == n + n % 2     # an odd split repeats one video
    for batches in per_rank:
        assert all(len(set(b)) == len(b) >= 2 for b in batches)


def test_a_last_batch_of_one_video_joins_the_one_before():
    batches = rank_batches(11, seed=0, rank=0, world_size=1, batch=5)
    assert [len(b) for b in batches] == [5, 6] and steps_for(11, 1, 5) == 2
    assert sorted(np.concatenate(batches).tolist()) == list(range(11))


def test_resume_mid_epoch_gives_the_same_batches(tmp_path):
    src = _split(tmp_path, 30, per_shard=7)
    full = _epoch(_reader(src, loader_workers=3), 4)
    for start in (1, 2, 5):
        assert _epoch(_reader(src, loader_workers=3), 4, start) == full[start:]


def test_steps_per_epoch_cuts_an_epoch_short_but_never_stretches_it(tmp_path):
    src = _split(tmp_path, 24)
    r = _reader(src, steps_per_epoch=2)
    assert r.steps_per_epoch == 2 and _epoch(r, 0) == _epoch(_reader(src), 0)[:2]
    with pytest.raises(ValueError, match="data.steps_per_epoch=6 .* has 5 steps"):
        _reader(src, steps_per_epoch=6)


def test_a_cut_shard_loses_only_its_tail_and_is_counted(tmp_path):
    src = _split(tmp_path, 24)
    shard = tmp_path / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:6000])
    r = _reader(src, max_bad_fraction=0.5)
    videos = [v for b in _epoch(r, 0) for v in b]
    lost = r.index_stats.bad_samples
    assert 0 < lost <= 4 and r.index_stats.bad_shards == 1
    assert len(videos) == len(set(videos)) == 24 - lost
    assert set(videos) >= {f"v{i}" for i in range(24) if not 8 <= i < 12}
    with pytest.raises(BadDataError, match="could not be indexed"):
        _reader(src, max_bad_fraction=0.01)


def _tiny(src, tmp_path, *extra):
    return ["model.video_dim=8", "model.query_dim=6", "model.hidden=16", "loss.kd=off",
            "loss.targets=hard", "loss.hard_pool=2", f"data.train={src}", "data.val=''",
            "data.batch_videos=4", "data.true_epochs=true", f"run.storage={tmp_path / 'runs'}",
            "tracking.system_metrics=false", "train.epochs=2", *extra]


def test_a_run_with_true_epochs_takes_whole_epochs(tmp_path):
    from trainer.config import load_config
    from trainer.run import train

    src = _split(tmp_path / "train", 10)
    state = train(load_config("configs/tiny.yaml", _tiny(src, tmp_path)), use_deepspeed=False)
    assert state.step == 2 * steps_for(10, 1, 4) == 6


def test_validate_states_the_steps_of_a_true_epoch(tmp_path):
    from launch.validate.checks import validate_run
    from launch.validate.result import FAIL, OK

    src = _split(tmp_path / "train", 10)
    report = validate_run("configs/tiny.yaml", _tiny(src, tmp_path, "dist.num_workers=2"))
    checks = {c.name: c for c in report.checks}
    assert checks["steps"].status == OK and "true epochs" in checks["steps"].message
    assert "= 2 steps" in checks["steps"].message          # ceil(ceil(10 / 2) / 4)
    assert checks["readers"].status == OK
    assert checks["data mode"].status == OK and checks["data mode"].message.startswith(
        "train split resident")
    report = validate_run("configs/tiny.yaml", _tiny(src, tmp_path, "data.steps_per_epoch=5"))
    checks = {c.name: c for c in report.checks}
    assert checks["steps"].status == FAIL and "data.steps_per_epoch <= 3" in \
        checks["steps"].message


def test_true_epochs_read_s3_shards_by_offset(tmp_path, s3_server):
    from tests.conftest import S3Store

    store = S3Store(s3_server, "epochs")
    url = store.upload(_split(tmp_path / "train", 13), "train")
    remote = _epoch(_reader(url, loader_workers=1), 1)
    assert remote == _epoch(_reader(tmp_path / "train", loader_workers=1), 1)
    assert sorted(v for b in remote for v in b) == sorted(f"v{i}" for i in range(13))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resident_split_gives_the_streamed_batches(tmp_path, world_size):
    """Resident mode forms exactly the batches true epochs read from disk, resume included."""
    src = _split(tmp_path, 23)
    for rank in range(world_size):
        streamed = _reader(src, rank=rank, world_size=world_size)
        resident = _reader(src, rank=rank, world_size=world_size, resident=True)
        assert resident.loader_workers == 0
        for epoch in (0, 1):
            batches = list(resident.epoch(epoch))
            assert [b.video_ids for b in batches] == _epoch(streamed, epoch)
            again = next(iter(streamed.epoch(epoch)))
            torch.testing.assert_close(batches[0].video_feats, again.video_feats, rtol=0, atol=0)
            torch.testing.assert_close(batches[0].query_feats, again.query_feats, rtol=0, atol=0)
        assert _epoch(resident, 1, start_step=2) == _epoch(streamed, 1, start_step=2)
    assert resident.counts()[0] > 0


def test_resident_split_counts_damage_against_every_epoch(tmp_path):
    src = _split(tmp_path, 24)
    shard = tmp_path / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:6000])
    import tarfile

    shard = tmp_path / "train-000004.tar"      # one member's bytes garbled: decoding fails
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data:member.offset_data + 6] = b"garbag"
    shard.write_bytes(bytes(data))
    from tests.conftest import rehash

    rehash(tmp_path)   # damage behind matching hashes: indexing and decoding find it
    r, streamed = _reader(src, resident=True, max_bad_fraction=0.5), \
        _reader(src, max_bad_fraction=0.5)
    for epoch in (0, 1):
        assert _epoch(r, epoch) == _epoch(streamed, epoch)
        assert r.counts() == streamed.counts()
    assert r.index_stats.bad_samples > 0 and r.counts()[1] > 2 * r.index_stats.bad_samples
    with pytest.raises(ValueError, match="true_epochs"):
        ShardReader(src, resident=True, true_epochs=False, steps_per_epoch=2)


def test_resident_plan_decides_from_the_manifest(tmp_path):
    from sharding.reader import resident_plan
    from sharding.writer import load_manifest

    m = load_manifest(str(_split(tmp_path, 8)))
    plan = dict(manifest=m, true_epochs=True, teacher_frames=False)
    assert resident_plan(mode="auto", max_mb=1, **plan)[0]
    fits, why = resident_plan(mode="auto", max_mb=1e-6, **plan)
    assert not fits and "data.resident_max_mb" in why
    assert resident_plan(mode="on", max_mb=1e-6, **plan)[0]
    assert not resident_plan(mode="off", max_mb=1, **plan)[0]
    assert not resident_plan(mode="auto", max_mb=1, **{**plan, "true_epochs": False})[0]
    with pytest.raises(ValueError, match="data.resident=on needs data.true_epochs"):
        resident_plan(mode="on", max_mb=1, **{**plan, "true_epochs": False})

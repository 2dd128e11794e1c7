"""Shard writer (resume, manifest, checksums) and the streaming reader, on tiny real shards."""
import collections
import functools
import http.server
import io
import json
import tarfile
import threading

import numpy as np
import pytest
import torch

from sharding.batch import VideoSample, collate
from sharding.preprocess import prepare_frames, prepare_tokens
from sharding.reader import BadDataError, ShardReader, read_all
from sharding.schema import UnsafeMemberError, encode_sample
from sharding.writer import ManifestError, SkipVideo, load_manifest, write_split
from tests.shard_check import verify_shards

DIMS = {"video_dim": 8, "query_dim": 6}


def _video(vid: str) -> VideoSample:
    """A deterministic tiny video: id -> 1..3 captions, 3..200 frames."""
    rng = np.random.default_rng(int(vid[1:]))
    n, n_caps = int(rng.integers(3, 200)), int(rng.integers(1, 4))
    return VideoSample(
        video_id=vid, frames=prepare_frames(rng.normal(size=(n, 8))),
        tokens=[prepare_tokens(rng.normal(size=(int(rng.integers(2, 9)), 6)))
                for _ in range(n_caps)],
        cap_ids=[f"{vid}#enc#{k}" for k in range(n_caps)],
        captions=[f"{vid} caption {k}" for k in range(n_caps)], n_frames_orig=n)


def _ids(n):
    return [f"v{i}" for i in range(n)]


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """24 videos in 6 shards of 4."""
    out = tmp_path_factory.mktemp("shards") / "train"
    write_split(out, "train", _ids(24), _video, videos_per_shard=4, dims=DIMS, progress=False)
    return out


# ---------------------------------------------------------------- writer

def test_manifest_counts_and_skips(tmp_path):
    def load(vid):
        if vid in ("v3", "v9"):
            raise SkipVideo(f"{vid} has no frames")
        return _video(vid)

    m = write_split(tmp_path, "val", _ids(10), load, videos_per_shard=3, dims=DIMS,
                    notes={"fps": 3}, progress=False)
    videos = [_video(v) for v in _ids(10) if v not in ("v3", "v9")]
    assert [s.videos for s in m.shards] == [3, 3, 2]
    assert m.totals["videos"] == 8 and m.totals["captions"] == sum(len(v.cap_ids) for v in videos)
    assert m.skipped == {"count": 2, "ids": {"v3": "v3 has no frames", "v9": "v9 has no frames"}}
    on_disk = load_manifest(tmp_path)
    assert on_disk.to_json() == m.to_json() and on_disk.notes == {"fps": 3}
    got = read_all(tmp_path)
    assert [v.video_id for v in got] == [v.video_id for v in videos]
    np.testing.assert_allclose(got[5].frames, videos[5].frames, atol=1e-3)
    assert verify_shards(tmp_path) == {}


def test_resume_skips_complete_shards_and_rewrites_a_truncated_one(tmp_path):
    calls = collections.Counter()

    def load(vid):
        calls[vid] += 1
        return _video(vid)

    first = write_split(tmp_path, "train", _ids(10), load, videos_per_shard=3, dims=DIMS,
                        progress=False)
    assert sum(calls.values()) == 10
    calls.clear()
    again = write_split(tmp_path, "train", _ids(10), load, videos_per_shard=3, dims=DIMS,
                        progress=False)
    assert sum(calls.values()) == 0 and again.to_json() == first.to_json()

    shard = tmp_path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])        # a crash or a bad copy
    problems = verify_shards(tmp_path)
    assert list(problems) == ["train-000001.tar"] and "truncated" in problems["train-000001.tar"]
    again = write_split(tmp_path, "train", _ids(10), load, videos_per_shard=3, dims=DIMS,
                        progress=False)
    # shard 0 is kept; shard 1 and everything after it is rebuilt
    assert sorted(calls) == [f"v{i}" for i in range(3, 10)]
    assert again.to_json() == first.to_json() and verify_shards(tmp_path) == {}


def test_resume_after_a_crash_midway(tmp_path):
    def crashing(vid):
        if vid == "v7":
            raise KeyboardInterrupt
        return _video(vid)

    with pytest.raises(KeyboardInterrupt):
        write_split(tmp_path, "train", _ids(10), crashing, videos_per_shard=3, dims=DIMS,
                    progress=False)
    assert not (tmp_path / "manifest.json").exists()
    calls = []
    m = write_split(tmp_path, "train", _ids(10), lambda v: calls.append(v) or _video(v),
                    videos_per_shard=3, dims=DIMS, progress=False)
    assert calls == [f"v{i}" for i in range(6, 10)] and m.totals["videos"] == 10


def test_writer_checks(tmp_path):
    with pytest.raises(ValueError, match="video_dim is 8 but the split declares"):
        write_split(tmp_path, "t", _ids(2), _video, dims={"video_dim": 9, "query_dim": 6},
                    progress=False)
    write_split(tmp_path / "a", "train", _ids(2), _video, dims=DIMS, progress=False)
    with pytest.raises(ValueError, match="own directory"):
        write_split(tmp_path / "a", "val", _ids(2), _video, dims=DIMS, progress=False)


def test_max_shard_bytes(tmp_path):
    m = write_split(tmp_path, "train", _ids(12), _video, videos_per_shard=100,
                    max_shard_bytes=8000, dims=DIMS, progress=False)
    assert len(m.shards) > 1 and m.totals["videos"] == 12


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="no shard manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version 99"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------- reader

def _epoch_ids(reader, epoch=0, start_step=0):
    return [b.video_ids for b in reader.epoch(epoch, start_step)]


def test_exact_mode_two_ranks_two_workers_reads_every_sample_once(split_dir):
    seen = []
    for rank in range(2):
        r = ShardReader(split_dir, rank=rank, world_size=2, batch_videos=3, loader_workers=2,
                        resampled=False, video_dim=8, query_dim=6)
        for b in r.epoch(0):
            seen += b.video_ids
            assert b.video_feats.shape[2] == 8 and b.labels.max() < b.num_videos
    assert sorted(seen) == sorted(_ids(24))


def test_exact_mode_needs_enough_shards(split_dir):
    with pytest.raises(ValueError, match="2 x 4 = 8 shards, found 6"):
        ShardReader(split_dir, rank=0, world_size=2, loader_workers=4, resampled=False)


def test_manifest_dims_checked(split_dir):
    with pytest.raises(ManifestError, match="video_dim=8 but the model expects 3072"):
        ShardReader(split_dir, video_dim=3072, query_dim=6)


def test_resampled_equal_steps_with_fewer_shards_than_workers(tmp_path):
    write_split(tmp_path, "train", _ids(5), _video, videos_per_shard=5, dims=DIMS, progress=False)
    counts = []
    for rank in range(2):
        r = ShardReader(tmp_path, rank=rank, world_size=2, batch_videos=2, loader_workers=2,
                        steps_per_epoch=7, seed=1)
        batches = list(r.epoch(0))
        counts.append(len(batches))
        assert all(b.num_videos == 2 for b in batches)
    assert counts == [7, 7]


def test_resampled_is_deterministic_and_resumes_exactly(split_dir):
    def reader(rank=0, seed=5):
        return ShardReader(split_dir, rank=rank, world_size=2, batch_videos=3, loader_workers=2,
                           steps_per_epoch=9, seed=seed, shuffle_buffer=8)

    full = _epoch_ids(reader(), epoch=2)
    assert len(full) == 9
    assert _epoch_ids(reader(), epoch=2) == full
    assert _epoch_ids(reader(), epoch=3) != full
    assert _epoch_ids(reader(rank=1), epoch=2) != full
    for start in (1, 4, 8):
        assert _epoch_ids(reader(), epoch=2, start_step=start) == full[start:]


@pytest.mark.parametrize("true_epochs", [True, False])
def test_batches_are_fresh_collates_whatever_the_loader_workers(split_dir, true_epochs):
    """Workers collate float16 features into shared memory, the reader alone into reused
    buffers, and the reader casts them to float32. Every batch of an epoch, all held at once,
    equals a fresh collate, and true epochs give the same batches with any worker count."""
    by_id = {s.video_id: s for s in read_all(split_dir)}
    ids = []
    for workers in (0, 1, 2):
        batches = list(ShardReader(split_dir, batch_videos=5, loader_workers=workers,
                                   steps_per_epoch=4, seed=3, true_epochs=true_epochs).epoch(1))
        ids.append([b.video_ids for b in batches])
        for b in batches:
            assert b.video_feats.dtype == b.query_feats.dtype == torch.float32
            fresh = collate([by_id[v] for v in b.video_ids])
            for name in ("video_feats", "query_feats", "video_mask", "query_mask", "labels",
                         "video_rows", "query_rows", "teacher_index"):
                x, y = getattr(b, name), getattr(fresh, name)
                assert x.dtype == y.dtype and torch.equal(x, y), (workers, name)
    assert not true_epochs or ids[0] == ids[1] == ids[2]


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for name, data in s.items():
                if name == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupted_member_is_skipped_and_counted(tmp_path):
    samples = [encode_sample(_video(v)) for v in _ids(8)]
    samples[5]["frames.npy"] = b"\x93NUMPY garbage"
    _tar(tmp_path / "a.tar", samples[:4])
    _tar(tmp_path / "b.tar", samples[4:])
    src = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    r = ShardReader(src, batch_videos=4, loader_workers=2, resampled=False, max_bad_fraction=0.2)
    ids = [v for b in r.epoch(0) for v in b.video_ids]
    assert sorted(ids) == sorted(set(_ids(8)) - {"v5"})
    assert r.stats.bad_samples == 1 and r.stats.samples == 7
    assert "v5" in r.stats.errors[0] and "b.tar" in r.stats.errors[0]
    strict = ShardReader(src, batch_videos=4, loader_workers=0, resampled=False,
                         max_bad_fraction=0.1)
    with pytest.raises(BadDataError, match="1 of this rank's 8 samples"):
        list(strict.epoch(0))


def test_truncated_shard_counted_with_lost_samples(tmp_path):
    write_split(tmp_path, "train", _ids(12), _video, videos_per_shard=4, dims=DIMS, progress=False)
    shard = tmp_path / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    r = ShardReader(tmp_path, batch_videos=4, loader_workers=0, resampled=False,
                    max_bad_fraction=0.5)
    ids = [v for b in r.epoch(0) for v in b.video_ids]
    assert set(ids) <= set(_ids(12)) and set(_ids(8)) <= set(ids)
    assert r.stats.bad_shards == 1 and r.stats.bad_samples == 12 - len(ids)
    with pytest.raises(BadDataError):
        list(ShardReader(tmp_path, batch_videos=4, loader_workers=0, resampled=False).epoch(0))


def test_pickled_member_refused_by_the_reader(tmp_path):
    samples = [encode_sample(_video(v)) for v in _ids(3)]
    samples[1]["extra.pyd"] = b"\x80\x04N."
    _tar(tmp_path / "a.tar", samples)
    r = ShardReader([str(tmp_path / "a.tar")], batch_videos=2, loader_workers=1,
                    resampled=False, max_bad_fraction=1.0)
    with pytest.raises(UnsafeMemberError, match="extra.pyd"):
        list(r.epoch(0))


@pytest.fixture
def http_url(split_dir):
    handler = functools.partial(_QuietHandler, directory=str(split_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_shards_stream_through_the_same_reader(http_url, split_dir):
    local = [v.video_id for v in read_all(split_dir)]
    assert [v.video_id for v in read_all(http_url)] == local
    r = ShardReader(http_url, rank=0, world_size=1, batch_videos=5, loader_workers=2,
                    resampled=False, video_dim=8, query_dim=6)
    assert sorted(v for b in r.epoch(0) for v in b.video_ids) == sorted(local)
    assert r.stats.bad_samples == 0
    pattern = http_url + "train-{000000..000001}.tar"
    assert len(read_all(pattern)) == 8

"""The MS-SL release converter on release-layout fixtures: values, counts, resume, checksums."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sharding import msssl
from sharding.msssl import ReleaseError, convert
from sharding.reader import read_all
from tests.release_fixture import make_release
from tests.shard_check import verify_shards


def _ufs(x: np.ndarray, m: int) -> np.ndarray:
    """MS-SL's uniform_feature_sampling as loops (round half to even, clipped to n - 1)."""
    n = len(x)
    if n <= m:
        return x
    idx = [min(int(np.round(k / m * n)), n - 1) for k in range(m + 1)]
    return np.stack([x[idx[k]:idx[k + 1]].astype(np.float64).mean(0) if idx[k] < idx[k + 1]
                     else x[idx[k]].astype(np.float64) for k in range(m)])


def _l2(x: np.ndarray) -> np.ndarray:
    return np.stack([r / (np.sqrt(float(np.sum(np.square(r, dtype=np.float64)))) + 1e-5)
                     for r in x])


def _spec_frames(raw: np.ndarray) -> np.ndarray:
    """method.md §2 as the reference: averaged over MS-SL's chunks to <= 128, then L2 rows."""
    return _l2(_ufs(raw, 128))


def _reference_pair(raw: np.ndarray, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DL-DKD's Dataset4DLDKD: the student to the teacher's length when the teacher is shorter,
    then both to <= 128 (a longer teacher to the student's length first: method.md §2)."""
    if len(raw) > len(clip):
        raw = _ufs(raw, len(clip))
    if len(clip) > len(raw):
        clip = _ufs(clip, len(raw))
    return _l2(_ufs(raw, 128)), _ufs(clip, 128)


def _spec_tokens(raw: np.ndarray) -> np.ndarray:
    return np.stack([r / (np.linalg.norm(r.astype(np.float64)) + 1e-5) for r in raw[:30]])


@pytest.mark.parametrize("collection, clip_key_enc", [("tvr", False), ("tvr", True),
                                                      ("charades", False)])
def test_shards_hold_the_spec_preprocessed_release(tmp_path, collection, clip_key_enc):
    rel = make_release(tmp_path / "release", collection, {"train": 6}, clip_key_enc=clip_key_enc)
    m = convert(rel.root, collection, "train", tmp_path / "out", videos_per_shard=2, progress=False)
    got = {s.video_id: s for s in read_all(str(tmp_path / "out" / "train"))}

    kept_videos = [v for v in dict.fromkeys(c.split("#")[0] for c, _ in rel.captions["train"])
                   if v not in rel.frameless_videos]
    assert list(got) == kept_videos
    for vid, s in got.items():
        raw = rel.frames[vid]
        assert s.n_frames_orig == raw.shape[0]
        want_frames, want_teacher = _reference_pair(raw, rel.clip_video[vid])
        assert s.frames.shape[0] == s.teacher_frame_emb.shape[0] == len(want_frames)
        np.testing.assert_allclose(s.frames, want_frames, atol=1e-3)
        np.testing.assert_allclose(s.teacher_frame_emb, want_teacher, rtol=1e-3, atol=1e-3)
        assert s.step_rows[0, 0] == 0 and s.step_rows[-1, 1] <= raw.shape[0]
        want_caps = [(c, t) for c, t in rel.captions["train"]
                     if c.split("#")[0] == vid and c not in rel.missing_captions]
        assert s.cap_ids == [c for c, _ in want_caps] and s.captions == [t for _, t in want_caps]
        for cap_id, tok in zip(s.cap_ids, s.tokens):
            np.testing.assert_allclose(tok, _spec_tokens(rel.tokens[cap_id]), atol=1e-3)
        np.testing.assert_allclose(s.teacher_text_emb,
                                   np.stack([rel.clip_text[c] for c in s.cap_ids]),
                                   rtol=1e-3, atol=1e-3)
    assert max(s.n_frames_orig for s in got.values()) == 300     # the long video was capped

    sep = "#" if collection == "charades" else "#enc#"
    assert all(sep in c for s in got.values() for c in s.cap_ids)
    manifest = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert manifest["totals"]["videos"] == len(kept_videos) == m.totals["videos"]
    assert manifest["totals"]["captions"] == sum(len(s.cap_ids) for s in got.values())
    assert [sh["videos"] for sh in manifest["shards"]] == [2, 2, 1]
    assert manifest["skipped"]["count"] == 1
    assert "no frames" in manifest["skipped"]["ids"][rel.frameless_videos[0]]
    dropped = manifest["notes"]["dropped_captions"]
    assert dropped["count"] == 1 and list(dropped["ids"]) == rel.missing_captions
    coll = msssl.COLLECTIONS[collection]
    assert manifest["dims"] == {"video_dim": coll.video_dim, "query_dim": coll.query_dim,
                                "teacher_dim": 512}


@pytest.mark.parametrize("long_frames, clip", [(129, False), (255, False), (1000, False),
                                              (1000, True), (255, True)])
def test_long_videos_are_preprocessed_as_the_reference(tmp_path, long_frames, clip):
    """129, 255 and 1,000 feature steps, with and without CLIP features (1,000 student steps
    with 333 CLIP frames: both streams averaged on one grid, so rows align one to one)."""
    from sharding.batch import collate

    rel = make_release(tmp_path / "release", "charades", {"train": 3},
                       long_video_frames=long_frames, clip=clip)
    convert(rel.root, "charades", "train", tmp_path / "out", progress=False)
    got = {s.video_id: s for s in read_all(str(tmp_path / "out" / "train"))}
    long = next(s for s in got.values() if s.n_frames_orig == long_frames)
    raw = rel.frames[long.video_id]
    if clip:
        want, want_teacher = _reference_pair(raw, rel.clip_video[long.video_id])
        np.testing.assert_allclose(long.teacher_frame_emb, want_teacher, rtol=1e-3, atol=1e-3)
        batch = collate([long])
        np.testing.assert_array_equal(batch.teacher_index[0], np.arange(len(want)))
    else:
        want = _spec_frames(raw)
        starts = [min(int(np.round(k / 128 * long_frames)), long_frames - 1) for k in range(128)]
        np.testing.assert_array_equal(long.step_rows[:, 0], starts)
    assert long.frames.shape == (min(128, len(want)), raw.shape[1])
    np.testing.assert_allclose(long.frames, want, atol=1e-3)


def test_a_second_run_resumes_without_rewriting_or_reloading(tmp_path, monkeypatch):
    rel = make_release(tmp_path / "release", "tvr", {"test": 5}, clip=False)
    out = tmp_path / "out"
    convert(rel.root, "tvr", "test", out, videos_per_shard=2, progress=False)
    shards = sorted((out / "test").glob("*.tar"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    manifest = (out / "test" / "manifest.json").read_bytes()

    calls = []
    original = msssl._Source.load
    monkeypatch.setattr(msssl._Source, "load",
                        lambda self, vid: calls.append(vid) or original(self, vid))
    convert(rel.root, "tvr", "test", out, videos_per_shard=2, progress=False)
    assert calls == []
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "test").glob("*.tar")}
    assert after == before and len(before) == 3
    assert (out / "test" / "manifest.json").read_bytes() == manifest


def test_a_truncated_shard_is_detected_by_checksum_and_rewritten(tmp_path):
    rel = make_release(tmp_path / "release", "tvr", {"train": 6}, clip=False)
    out = tmp_path / "out"
    convert(rel.root, "tvr", "train", out, videos_per_shard=2, progress=False)
    first = {s.video_id: s.frames for s in read_all(str(out / "train"))}
    shard = out / "train" / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert list(verify_shards(out / "train")) == ["train-000001.tar"]

    convert(rel.root, "tvr", "train", out, videos_per_shard=2, progress=False)
    assert verify_shards(out / "train") == {}
    assert shard.read_bytes() == data
    again = {s.video_id: s.frames for s in read_all(str(out / "train"))}
    assert list(again) == list(first)


def test_shards_close_at_the_byte_limit(tmp_path):
    rel = make_release(tmp_path / "release", "charades", {"train": 6}, clip=False)
    m = convert(rel.root, "charades", "train", tmp_path / "out", videos_per_shard=100,
                max_shard_bytes=1, progress=False)
    assert [s.videos for s in m.shards] == [1] * 5


def test_clip_files_are_optional_or_required_on_request(tmp_path):
    rel = make_release(tmp_path / "release", "tvr", {"train": 4}, clip=False)
    m = convert(rel.root, "tvr", "train", tmp_path / "out", progress=False)
    assert "teacher_dim" not in m.dims
    assert all(s.teacher_frame_emb is None for s in read_all(str(tmp_path / "out" / "train")))
    with pytest.raises(ReleaseError, match="new_clip_vit_32_tvr_vid_features.hdf5"):
        convert(rel.root, "tvr", "train", tmp_path / "out2", clip=True, progress=False)


def test_video2frames_is_parsed_as_a_literal_never_evaluated(tmp_path):
    rel = make_release(tmp_path / "release", "tvr", {"train": 3}, clip=False)
    path = rel.root / "tvr" / "FeatureData" / "i3d_resnet" / "video2frames.txt"
    marker = tmp_path / "pwned"
    path.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    with pytest.raises(ReleaseError, match="video2frames.txt is not a Python dict literal"):
        convert(rel.root, "tvr", "train", tmp_path / "out", progress=False)
    assert not marker.exists()


def test_release_layout_errors_name_the_file(tmp_path):
    rel = make_release(tmp_path / "release", "tvr", {"train": 3}, clip=False)
    with pytest.raises(ReleaseError, match="tvrval.caption.txt is missing"):
        convert(rel.root, "tvr", "val", tmp_path / "out", progress=False)
    with pytest.raises(ReleaseError, match="i3d_other lacks feature.bin"):
        convert(rel.root, "tvr", "train", tmp_path / "out", visual_feature="i3d_other",
                progress=False)
    feature = rel.root / "tvr" / "FeatureData" / "i3d_resnet" / "feature.bin"
    feature.write_bytes(feature.read_bytes()[:-4])
    with pytest.raises(ReleaseError, match="feature.bin has .* bytes"):
        convert(rel.root, "tvr", "train", tmp_path / "out", progress=False)


def test_wrong_dims_for_the_collection_are_refused(tmp_path):
    rel = make_release(tmp_path / "release", "activitynet", {"train": 3}, clip=False, dims=(64, 32))
    with pytest.raises(ReleaseError, match="video dim 1024"):
        convert(rel.root, "activitynet", "train", tmp_path / "out", progress=False)


def test_big_file_is_memory_mapped(tmp_path):
    rel = make_release(tmp_path / "release", "tvr", {"train": 3}, clip=False)
    big = msssl.BigFile(rel.root / "tvr" / "FeatureData" / "i3d_resnet")
    assert isinstance(big.data, np.memmap)
    vid = next(iter(rel.frames))
    np.testing.assert_array_equal(big.read([f"{vid}_{k}" for k in range(3)]), rel.frames[vid][:3])

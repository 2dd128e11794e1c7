"""Shard schema v1 and SPEC 2 preprocessing."""
import io

import numpy as np
import pytest

from sharding.batch import VideoSample
from sharding.preprocess import l2_normalise, prepare_frames, prepare_tokens, uniform_sample
from sharding.schema import (SCHEMA_VERSION, ShardError, UnsafeMemberError, decode_sample,
                             encode_sample, sample_key)


def _loop_uniform(frames, m):
    """Plain-loop reading of SPEC 2 step 2: m contiguous chunks whose sizes differ by at most 1."""
    n = len(frames)
    out, start = [], 0
    for k in range(m):
        end = int(np.floor((k + 1) * n / m + 0.5)) if k < m - 1 else n
        out.append(sum(frames[i] for i in range(start, end)) / (end - start))
        start = end
    return np.array(out)


@pytest.mark.parametrize("n", [1, 77, 128, 129, 255, 300, 1000])
def test_uniform_sample_matches_loop(n):
    x = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
    got = uniform_sample(x, 128)
    if n <= 128:
        assert np.array_equal(got, x)
        return
    want = _loop_uniform(x.astype(np.float64), 128)
    assert got.shape == (128, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_uniform_sample_uses_every_frame_in_nearly_equal_chunks():
    n = 1000
    x = np.arange(n, dtype=np.float32)[:, None]   # frame index as its feature
    got = uniform_sample(x, 128)[:, 0]
    # chunk means of consecutive indices: chunk sizes are 7 or 8 and the last frame is included
    sizes = np.diff(np.floor(np.arange(129) * n / 128 + 0.5))
    assert set(sizes) <= {7.0, 8.0}
    assert got[-1] == pytest.approx(np.mean(np.arange(n - int(sizes[-1]), n)))
    assert np.all(np.diff(got) > 0)


def test_l2_normalise_and_tokens():
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    want = np.array([row / (np.sqrt(sum(v * v for v in row)) + 1e-5) for row in x])
    np.testing.assert_allclose(l2_normalise(x), want, rtol=1e-6)
    tok = np.random.default_rng(1).normal(size=(1, 40, 6))
    got = prepare_tokens(tok, 30)
    assert got.shape == (30, 6)
    np.testing.assert_allclose(got, l2_normalise(tok[0])[:30], rtol=1e-6)
    with pytest.raises(ValueError, match="token array"):
        prepare_tokens(np.zeros((0, 6)))


def test_sample_key_is_tar_safe_and_unique():
    assert sample_key("v_abc-12") == "v_abc-12"
    ids = ["a.b/c", "a_b_c", "a/b.c", "x.mp4", "s01e02_seg02_clip_00"]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    for k in keys:
        assert "." not in k and "/" not in k


def _sample(rng, vid="s01.e02/clip_7", n=300, n_caps=3, teacher=True):
    frames = prepare_frames(rng.normal(size=(n, 12)))
    tokens = [prepare_tokens(rng.normal(size=(1, int(rng.integers(3, 40)), 8)))
              for _ in range(n_caps)]
    return VideoSample(
        video_id=vid, frames=frames, tokens=tokens,
        cap_ids=[f"{vid}#enc#{k}" for k in range(n_caps)],
        captions=[f"caption {k} with ünïcode" for k in range(n_caps)], n_frames_orig=n,
        moments=[[1.0 * k, 2.5 + k] for k in range(n_caps)],
        teacher_frames=(np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None, None],
                                (4, 1, 16, 3)) if teacher else None),
        teacher_frame_emb=rng.normal(size=(4, 10)).astype(np.float32) if teacher else None,
        teacher_text_emb=rng.normal(size=(n_caps, 10)).astype(np.float32) if teacher else None)


def test_round_trip():
    s = _sample(np.random.default_rng(0))
    enc = encode_sample(s)
    assert all(isinstance(v, bytes) for k, v in enc.items() if k != "__key__")
    assert {k.rsplit(".", 1)[-1] for k in enc if k != "__key__"} <= {"npy", "json", "jpg"}
    d = decode_sample(enc, "train-000000.tar")
    assert d.video_id == s.video_id and d.cap_ids == s.cap_ids and d.captions == s.captions
    assert d.n_frames_orig == 300 and d.moments == s.moments
    assert d.frames.dtype == np.float16 and d.frames.shape == (128, 12)
    np.testing.assert_allclose(d.frames, s.frames, atol=1e-3)
    assert [t.shape for t in d.tokens] == [t.shape for t in s.tokens]
    for a, b in zip(d.tokens, s.tokens):
        np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(d.teacher_frame_emb, s.teacher_frame_emb, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(d.teacher_text_emb, s.teacher_text_emb, rtol=1e-3, atol=1e-3)
    assert d.teacher_frames.shape == s.teacher_frames.shape and d.teacher_frames.dtype == np.uint8
    assert np.abs(d.teacher_frames.astype(int) - s.teacher_frames).mean() < 3


def test_teacher_frames_can_be_left_undecoded():
    """Runs without an online image tower skip the JPEG decode (the costliest part of a sample)."""
    enc = encode_sample(_sample(np.random.default_rng(0)))
    d = decode_sample(enc, "train-000000.tar", teacher_frames=False)
    assert d.teacher_frames is None and d.teacher_frame_emb is not None
    assert d.frames.shape == (128, 12)


def test_round_trip_without_optional_members():
    s = _sample(np.random.default_rng(1), vid="plain", n=5, n_caps=1, teacher=False)
    s.moments = None
    d = decode_sample(encode_sample(s), "x.tar")
    assert d.teacher_frames is None and d.teacher_frame_emb is None and d.teacher_text_emb is None
    assert d.moments is None and d.frames.shape == (5, 12)


@pytest.mark.parametrize("member", ["evil.pyd", "evil.pickle", "evil.pkl", "x.pth"])
def test_pickle_member_refused(member):
    enc = encode_sample(_sample(np.random.default_rng(2), teacher=False))
    enc[member] = b"\x80\x04N."
    with pytest.raises(UnsafeMemberError, match=rf"shard val-000003.tar: member '{member}'"):
        decode_sample(enc, "val-000003.tar")


def test_pickled_npy_and_unknown_member_refused():
    enc = encode_sample(_sample(np.random.default_rng(3), teacher=False))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = dict(enc, **{"frames.npy": buf.getvalue()})
    with pytest.raises(ShardError, match="frames.npy"):
        decode_sample(bad, "s.tar")
    with pytest.raises(ShardError, match="frames.npy"):
        decode_sample(dict(enc, **{"frames.npy": enc["frames.npy"][:-10]}), "s.tar")
    fortran = io.BytesIO()
    frames = np.asfortranarray(np.arange(24, dtype=np.float16).reshape(4, 6))
    np.save(fortran, frames)
    got = decode_sample(dict(enc, **{"frames.npy": fortran.getvalue()}), "s.tar").frames
    assert np.array_equal(got, frames)
    with pytest.raises(ShardError, match="not part of shard schema"):
        decode_sample(dict(enc, **{"extra.npy": enc["frames.npy"]}), "s.tar")


def test_damaged_samples_are_shard_errors():
    enc = encode_sample(_sample(np.random.default_rng(4), teacher=True))
    with pytest.raises(ShardError, match="frames.npy"):
        decode_sample(dict(enc, **{"frames.npy": b"garbage"}), "s.tar")
    with pytest.raises(ShardError, match="offsets"):
        decode_sample(dict(enc, **{"offsets.npy": encode_sample(_sample(
            np.random.default_rng(5), n_caps=2, teacher=False))["offsets.npy"]}), "s.tar")
    with pytest.raises(ShardError, match="f001.jpg"):
        decode_sample(dict(enc, **{"f001.jpg": b"\xff\xd8junk"}), "s.tar")
    missing = {k: v for k, v in enc.items() if k != "tokens.npy"}
    with pytest.raises(ShardError, match="lacks member 'tokens.npy'"):
        decode_sample(missing, "s.tar")
    import json
    meta = json.loads(enc["meta.json"])
    meta["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ShardError, match="schema version"):
        decode_sample(dict(enc, **{"meta.json": json.dumps(meta).encode()}), "s.tar")


def test_encode_refuses_unprepared_input():
    rng = np.random.default_rng(6)
    s = _sample(rng, teacher=False)
    s.frames = rng.normal(size=(200, 12))
    with pytest.raises(ValueError, match="prepare_frames"):
        encode_sample(s)
    s = _sample(rng, teacher=False)
    s.tokens[0] = rng.normal(size=(31, 8))
    with pytest.raises(ValueError, match="prepare_tokens"):
        encode_sample(s)

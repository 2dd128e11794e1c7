"""Shard schema v1 and method.md §2 preprocessing."""
import io

import numpy as np
import pytest

from sharding.batch import VideoSample, align_index
from sharding.preprocess import (chunk_bounds, l2_normalise, prepare_frames, prepare_tokens,
                                 resample_pair, step_rows, uniform_sample)
from sharding.schema import (SCHEMA_VERSION, ShardError, UnsafeMemberError, decode_sample,
                             encode_sample, sample_key)


def _loop_uniform(frames, m):
    """MS-SL's ``uniform_feature_sampling`` as loops: boundaries round(k / m * n) (half to even),
    clipped to n - 1; a chunk is the mean of rows [s, e), or row s alone when s == e."""
    n = len(frames)
    if n <= m:
        return np.asarray(frames)
    idx = [min(int(np.round(k / m * n)), n - 1) for k in range(m + 1)]
    out = []
    for k in range(m):
        s, e = idx[k], idx[k + 1]
        out.append(sum(frames[i] for i in range(s, e)) / (e - s) if s < e else frames[s])
    return np.array(out)


@pytest.mark.parametrize("n", [1, 77, 128, 129, 255, 256, 300, 1000])
def test_uniform_sample_matches_the_reference_loop(n):
    x = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
    got = uniform_sample(x, 128)
    if n <= 128:
        assert np.array_equal(got, x)
        return
    want = _loop_uniform(x.astype(np.float64), 128)
    assert got.shape == (128, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reference_chunks_round_half_to_even_and_drop_the_last_row():
    x = np.arange(1000, dtype=np.float32)[:, None]   # row index as its feature
    got = uniform_sample(x, 128)[:, 0]
    # 1000 / 128 = 7.8125: boundary 4 is 31.25 -> 31; boundary 128 is 1000, clipped to 999.
    assert got[0] == pytest.approx(np.mean(np.arange(0, 8)))
    assert got[-1] == pytest.approx(np.mean(np.arange(992, 999)))   # row 999 is not used
    # 129 rows: k/128*129 = k + k/128; k = 64 gives 64.5, which rounds to 64 (half to even).
    x = np.arange(129, dtype=np.float32)[:, None]
    starts, ends = chunk_bounds(129, 128)
    assert (starts[63], ends[63], starts[64], ends[64]) == (63, 64, 64, 66)
    assert uniform_sample(x, 128)[64, 0] == pytest.approx(64.5)
    # 255 rows: chunk 127 is [253, 254): boundary 128 = 255 clipped to 254.
    assert (chunk_bounds(255, 128)[0][-1], chunk_bounds(255, 128)[1][-1]) == (253, 254)


def test_equal_boundaries_keep_that_row():
    # 3 rows into 2 chunks: round([0, 1.5, 3]) = [0, 2, 3] -> clipped [0, 2, 2]: chunk 1 is
    # boundaries (2, 2), the reference keeps row 2 alone.
    x = np.array([[1.0], [3.0], [10.0]], np.float32)
    np.testing.assert_allclose(uniform_sample(x, 2), [[2.0], [10.0]])
    np.testing.assert_allclose(_loop_uniform(x, 2), [[2.0], [10.0]])


def _loop_pair(student, teacher, m=128):
    """DL-DKD's Dataset4DLDKD as loops (student to the teacher's length when longer, then both
    to m), and a longer teacher to the student's length (method.md §2)."""
    if len(student) > len(teacher):
        student = _loop_uniform(student, len(teacher))
    if len(teacher) > len(student):
        teacher = _loop_uniform(teacher, len(student))
    return _loop_uniform(student, m), _loop_uniform(teacher, m)


@pytest.mark.parametrize("n_s, n_t", [(1000, 129), (129, 1000), (255, 255), (300, 40),
                                      (60, 255), (40, 40), (1000, 1000)])
def test_resample_pair_matches_the_reference_loop(n_s, n_t):
    rng = np.random.default_rng(n_s * 7 + n_t)
    s = rng.normal(size=(n_s, 6)).astype(np.float32)
    t = rng.normal(size=(n_t, 4)).astype(np.float32)
    got_s, got_t, rows = resample_pair(s, t)
    want_s, want_t = _loop_pair(s.astype(np.float64), t.astype(np.float64))
    assert got_s.shape[0] == got_t.shape[0] == rows.shape[0] == min(n_s, n_t, 128)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_t, want_t, rtol=1e-5, atol=1e-6)
    # step rows: the source student rows behind each kept row, in order and inside [0, n_s].
    assert rows[0, 0] == 0 and np.all(rows[:, 0] < rows[:, 1]) and rows[-1, 1] <= n_s
    assert np.all(np.diff(rows[:, 0]) >= 0)
    if n_s <= n_t:   # no first stage: the student's own chunks
        np.testing.assert_array_equal(rows, step_rows(n_s))


def test_step_rows_and_align_index_follow_the_chunks():
    np.testing.assert_array_equal(step_rows(3), [[0, 1], [1, 2], [2, 3]])
    starts, ends = chunk_bounds(1000, 128)
    np.testing.assert_array_equal(step_rows(1000), np.stack([starts, ends], axis=1))
    # A teacher frame per source step: the frame at each chunk's centre.
    np.testing.assert_array_equal(align_index(1000, 128), (starts + ends) // 2)
    np.testing.assert_array_equal(align_index(40, 40), np.arange(40))
    np.testing.assert_array_equal(align_index(2, 4), [0, 0, 1, 1])


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
    s.step_rows = step_rows(300)
    enc = encode_sample(s)
    assert all(isinstance(v, bytes) for k, v in enc.items() if k != "__key__")
    assert {k.rsplit(".", 1)[-1] for k in enc if k != "__key__"} <= {"npy", "json", "jpg"}
    d = decode_sample(enc, "train-000000.tar")
    assert d.video_id == s.video_id and d.cap_ids == s.cap_ids and d.captions == s.captions
    assert d.n_frames_orig == 300 and d.moments == s.moments
    np.testing.assert_array_equal(d.step_rows, step_rows(300))
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
    rows = io.BytesIO()
    np.save(rows, step_rows(300)[:-1])
    with pytest.raises(ShardError, match="steps.npy has shape"):
        decode_sample(dict(enc, **{"steps.npy": rows.getvalue()}), "s.tar")


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
    s = _sample(rng, teacher=False)
    s.step_rows = step_rows(10)
    with pytest.raises(ValueError, match="step_rows"):
        encode_sample(s)

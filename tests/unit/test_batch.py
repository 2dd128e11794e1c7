"""collate into reused buffers: the same batches as fresh allocation, and no batch overwritten
while it is still held."""
import numpy as np
import pytest
import torch

from sharding.batch import Buffers, VideoSample, collate

FIELDS = ("video_feats", "video_mask", "query_feats", "query_mask", "labels", "teacher_index",
          "teacher_frames", "teacher_frame_emb", "teacher_text_emb", "video_rows", "query_rows")


def _videos(seed: int, count: int, teacher: bool = True) -> list[VideoSample]:
    """float16 features as decoded from shards; lengths vary so padding moves between batches."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(count):
        n, n_caps, n_t = int(rng.integers(2, 9)), int(rng.integers(1, 4)), int(rng.integers(1, 12))
        v = VideoSample(
            f"s{seed}v{j}", rng.standard_normal((n, 6)).astype(np.float16),
            [rng.standard_normal((int(rng.integers(1, 7)), 5)).astype(np.float16)
             for _ in range(n_caps)],
            [f"s{seed}v{j}#{c}" for c in range(n_caps)], [""] * n_caps)
        if teacher:
            v.teacher_frames = rng.integers(0, 255, (n_t, 3, 2, 3), dtype=np.uint8)
            v.teacher_frame_emb = rng.standard_normal((n_t, 4)).astype(np.float16)
            v.teacher_text_emb = rng.standard_normal((n_caps, 4)).astype(np.float16)
        out.append(v)
    return out


def _assert_same(got, want):
    """``got`` from Buffers (features float16 before the cast), ``want`` from collate alone."""
    assert got.video_ids == want.video_ids and got.cap_ids == want.cap_ids
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype in (b.dtype, torch.float16), name
        assert torch.equal(a.to(b.dtype), b), name


@pytest.mark.parametrize("teacher", [True, False])
def test_reused_buffers_give_the_fresh_batches_while_earlier_ones_are_held(teacher):
    """As the reader uses them: collate into one pool (float16), cast into another."""
    collating, casting = Buffers(), Buffers()
    for buffers, floats in ((collating, torch.float16), (casting, torch.float32)):
        new = buffers.take()   # a dirty slot: every element handed out must be overwritten
        for name, dtype in (("video_feats", floats), ("query_feats", floats),
                            ("teacher_frames", torch.uint8), ("teacher_frame_emb", floats),
                            ("teacher_text_emb", floats)):
            new(name, (4096,), dtype).fill_(255 if dtype == torch.uint8 else float("nan"))
    batches = [_videos(k, 6 - k % 3, teacher) for k in range(9)]   # 6, 5, 4, 6, ... videos
    held = {}
    for k, videos in enumerate(batches):
        batch = collate(videos, max_words=4, buffers=collating)
        assert batch.video_feats.dtype == batch.query_feats.dtype == torch.float16
        batch = casting.float32(batch)
        assert batch.video_feats.dtype == batch.query_feats.dtype == torch.float32
        if k % 3 == 0:   # kept while later batches are collated; the others are let go
            held[k] = batch
        for i, b in {**held, k: batch}.items():
            _assert_same(b, collate(batches[i], max_words=4))


def test_a_batch_let_go_is_reused_and_a_held_one_is_not():
    buffers = Buffers(slots=2)
    a, b, c = _videos(0, 4), _videos(1, 4), _videos(2, 4)
    first = collate(a, buffers=buffers)
    ptr = first.video_feats.data_ptr()
    second = collate(b, buffers=buffers)
    view = first.video_feats[1:]   # a view holds the memory as much as the batch
    del first
    third = collate(c, buffers=buffers)   # both slots held: fresh memory
    assert len({ptr, second.video_feats.data_ptr(), third.video_feats.data_ptr()}) == 3
    del view
    fourth = collate(a, buffers=buffers)
    assert fourth.video_feats.data_ptr() == ptr
    for got, videos in ((second, b), (third, c), (fourth, a)):
        _assert_same(got, collate(videos))


def test_memory_moved_to_shared_memory_is_never_reused():
    """Sending a tensor through torch.multiprocessing moves its memory into shared memory that
    the receiver maps: refilling it would overwrite the receiver's batch."""
    buffers = Buffers()
    collate(_videos(0, 4), buffers=buffers).video_feats.share_memory_()
    again = collate(_videos(0, 4), buffers=buffers)
    assert not again.video_feats.is_shared()
    _assert_same(again, collate(_videos(0, 4)))


def test_shared_batches_are_float16_in_shared_memory():
    videos = _videos(5, 5)
    sent = collate(videos, buffers=Buffers(shared=True))
    assert sent.video_feats.dtype == sent.query_feats.dtype == torch.float16
    assert sent.teacher_frame_emb.dtype == sent.teacher_text_emb.dtype == torch.float16
    assert sent.video_feats.is_shared() and sent.teacher_frames.is_shared()
    _assert_same(Buffers().float32(sent), collate(videos))


def test_float32_sources_stay_float32():
    videos = _videos(6, 3)
    for v in videos:
        v.frames = v.frames.astype(np.float32) + np.float32(1e-4)   # not representable in float16
    sent = collate(videos, buffers=Buffers(shared=True))
    assert sent.video_feats.dtype == torch.float32 and sent.query_feats.dtype == torch.float16
    _assert_same(sent, collate(videos))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_finiteness_check_in_float16(bad):
    videos = _videos(7, 3, teacher=False)
    for v in videos:   # rows of large finite values: their float16 sums overflow to inf
        v.frames = np.full(v.frames.shape, 60000, np.float16)
    collate(videos, buffers=Buffers(shared=True))
    videos[1].frames[0, 2] = bad
    with pytest.raises(ValueError, match=r"non-finite frame features in videos \['s7v1'\]"):
        collate(videos, buffers=Buffers(shared=True))

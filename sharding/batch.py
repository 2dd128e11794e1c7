"""One decoded video and the training batch built from several (the reader -> trainer contract).

A batch holds B videos with all their captions, ordered as method.md §5 needs: videos sorted by caption
count (descending, stable), each video's queries contiguous, ``labels[i]`` the batch index of query
i's video. Teacher inputs are aligned to the student's frames: position l of video j in every
teacher tensor describes the same time step as ``video_feats[j, l]`` (method.md §2).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from sharding.preprocess import chunk_bounds


@dataclass
class VideoSample:
    """One video as decoded from a shard (arrays already preprocessed per method.md §2)."""

    video_id: str
    frames: np.ndarray            # (n, Dv) float16/32, n <= 128, rows L2-normalised
    tokens: list[np.ndarray]      # per caption (n_tok <= 30, Dq), rows L2-normalised
    cap_ids: list[str]
    captions: list[str]
    n_frames_orig: int = 0
    moments: list[list[float]] | None = None
    # Teacher inputs (any may be absent): raw RGB frames (n_t, H, W, 3) uint8, pre-extracted
    # CLIP frame embeddings (n_t, Dt), pre-extracted CLIP text embeddings (n_caps, Dt).
    teacher_frames: np.ndarray | None = None
    teacher_frame_emb: np.ndarray | None = None
    teacher_text_emb: np.ndarray | None = None
    # (n, 2) int: source feature steps [start, end) behind each row of ``frames`` (where in the
    # video a teacher frame for that row belongs; steps.npy); None = ``step_rows(n_frames_orig)``.
    step_rows: np.ndarray | None = None


@dataclass
class Batch:
    # Float features are float32; collated into Buffers they keep their stored float16 until
    # the consumer casts them (``Buffers.float32``: the reader, as each batch arrives).
    video_feats: torch.Tensor          # (B, L, Dv) float32
    video_mask: torch.Tensor           # (B, L) float32, 1 = valid frame
    query_feats: torch.Tensor          # (Q, Lq, Dq) float32
    query_mask: torch.Tensor           # (Q, Lq) float32
    labels: torch.Tensor               # (Q,) int64, index of the query's video in the batch
    video_ids: list[str]
    cap_ids: list[str]
    captions: list[str]
    # (B, L) int64: index of the teacher frame shown at each student position (-1 = padding);
    # the key of the teacher's frame-embedding cache together with the video id.
    teacher_index: torch.Tensor
    teacher_frames: torch.Tensor | None = None     # (B, L, H, W, 3) uint8
    teacher_frame_emb: torch.Tensor | None = None  # (B, L, Dt) float32
    teacher_text_emb: torch.Tensor | None = None   # (Q, Dt) float32
    # Flat indices of the valid positions of video_mask / query_mask, computed on the host so
    # the student packs its inputs without a device-to-host sync.
    video_rows: torch.Tensor | None = None
    query_rows: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_videos(self) -> int:
        return self.video_feats.shape[0]

    @property
    def num_queries(self) -> int:
        return self.query_feats.shape[0]


def align_index(n_teacher: int, n_student: int) -> np.ndarray:
    """Teacher frame shown at each of ``n_student`` student rows.

    Equal counts map one to one: ``dldkd shard msssl`` and ``shard frames`` put both streams on
    one grid. More teacher frames (one per source step, as the synthetic world writes them): the
    frame at the centre of each row's chunk (``preprocess.chunk_bounds``, the chunks the student
    rows were averaged over). Fewer: the nearest of evenly spaced centres.
    """
    if n_teacher <= 0 or n_student <= 0:
        raise ValueError(f"cannot align {n_teacher} teacher frames to {n_student} student frames")
    if n_teacher == n_student:
        return np.arange(n_student)
    if n_teacher > n_student:
        starts, ends = chunk_bounds(n_teacher, n_student)
        return np.minimum((starts + ends) // 2, n_teacher - 1)
    centres = (np.arange(n_student) + 0.5) * n_teacher / n_student
    return np.minimum(centres.astype(np.int64), n_teacher - 1)


def collate(samples: list[VideoSample], max_words: int = 30,
            buffers: Buffers | None = None) -> Batch:
    """Stack videos into a Batch in method.md §5 order (caption count descending, stable).

    Without ``buffers`` every tensor is allocated afresh, features in float32 (one-off
    batches). With them (the reader) features keep their stored float16 (exact, half the bytes
    to write and to pass between processes) and are written with numpy, one thread: torch
    would run each video's copy as a parallel region, and on a busy machine each of them waits
    for a descheduled thread (the reader ran ~6x slower with 2 threads than with 1 on a loaded
    2-core machine). :meth:`Buffers.float32` then casts the whole batch at once."""
    with warnings.catch_warnings():
        # Decoded shard arrays are read-only views that collate only reads, through
        # torch.from_numpy, which warns about them; silenced here, not process-wide.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _collate(samples, max_words, buffers)


# The float feature tensors: float32 in a Batch, their stored float16 until the consumer casts.
_FLOATS = ("video_feats", "query_feats", "teacher_frame_emb", "teacher_text_emb")
_Alloc = Callable[[str, tuple, torch.dtype], torch.Tensor]


class Buffers:
    """Memory that :func:`collate` fills batch after batch instead of allocating it.

    A fresh TVR batch (32 videos: 50 MB of frame features) is too large for malloc's free lists:
    each one is a new mapping whose pages fault on first touch, which costs about as much as
    filling them and varies with the machine's load. Only the large tensors (features, teacher
    inputs) live here; masks and indices are small heap allocations.

    ``shared=False`` (the consuming process): up to ``slots`` sets of buffers, each handed out
    again only once no tensor outside the pool refers to its memory (torch's storage use count,
    the check torch.compile's CUDA-graph pool makes), so a consumer may keep any batch as long as
    it likes. Memory that was moved to shared memory (the batch was sent to another process) is
    dropped, never reused.

    ``shared=True`` (a DataLoader worker): every batch in fresh shared memory, which the
    DataLoader passes to the main process without a copy. It cannot be reused: the main process
    maps the same pages, and the worker cannot tell when it is done with them.

    Either way features stay in their stored float16 (half the bytes to write and to pass on);
    :meth:`float32`, in the consuming process, casts them into its own buffers.
    """

    def __init__(self, shared: bool = False, slots: int = 3):
        self.shared = shared
        self.slots = slots
        self._pool: list[dict[str, tuple[torch.Tensor, int, int]]] = []

    def take(self) -> _Alloc:
        """``new(name, shape, dtype)`` for one batch: uninitialised tensors that collate overwrites
        entirely (data, then zeros over the padding)."""
        if self.shared:
            return _new_shared
        self._pool = [s for s in self._pool if not any(t.is_shared() for t, _, _ in s.values())]
        slot = next((s for s in self._pool if all(torch._C._storage_Use_Count(ptr) <= idle
                                                  for _, ptr, idle in s.values())), None)
        if slot is None:
            slot = {}
            if len(self._pool) < self.slots:
                self._pool.append(slot)

        def new(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
            n = math.prod(shape)
            flat = slot[name][0] if name in slot else None
            if flat is None or flat.dtype != dtype or flat.numel() < n:
                flat = torch.empty(n, dtype=dtype)
                ptr = flat.untyped_storage()._cdata
                slot[name] = (flat, ptr, torch._C._storage_Use_Count(ptr))   # its idle count
            return flat[:n].view(shape)
        return new

    def float32(self, batch: Batch) -> Batch:
        """``batch`` with its features cast to float32 into these buffers (a fresh copy would
        fault in 50 MB of new pages per TVR batch); float32 ones stay as they are."""
        new = self.take()
        for name in _FLOATS:
            x = getattr(batch, name)
            if x is not None and x.dtype != torch.float32:
                setattr(batch, name, new(name, tuple(x.shape), torch.float32).copy_(x))
        return batch


def _new_shared(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _new_private(name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _collate(samples: list[VideoSample], max_words: int, buffers: Buffers | None) -> Batch:
    if not samples:
        raise ValueError("cannot collate an empty list of videos")
    order = sorted(range(len(samples)), key=lambda k: -len(samples[k].cap_ids))
    samples = [samples[k] for k in order]
    B = len(samples)
    L = max(s.frames.shape[0] for s in samples)
    Dv = samples[0].frames.shape[1]
    Dq = samples[0].tokens[0].shape[1]
    Q = sum(len(s.cap_ids) for s in samples)
    Lq = min(max_words, max(t.shape[0] for s in samples for t in s.tokens))
    new = _new_private if buffers is None else buffers.take()

    def floats(arrays) -> torch.dtype:
        """float16 only where every source is (the exact values) and ``buffers`` are given."""
        return torch.float16 if buffers is not None and all(a.dtype == np.float16 for a in arrays) \
            else torch.float32

    video_feats = new("video_feats", (B, L, Dv), floats(s.frames for s in samples))
    query_feats = new("query_feats", (Q, Lq, Dq), floats(t for s in samples for t in s.tokens))
    video_mask = np.zeros((B, L), np.float32)
    teacher_index = np.full((B, L), -1, np.int64)
    query_mask = np.zeros((Q, Lq), np.float32)
    labels = np.zeros(Q, np.int64)
    has_frames = all(s.teacher_frames is not None for s in samples)
    has_femb = all(s.teacher_frame_emb is not None for s in samples)
    has_temb = all(s.teacher_text_emb is not None for s in samples)
    t_frames = t_femb = t_temb = None
    if has_frames:
        H, W = samples[0].teacher_frames.shape[1:3]
        t_frames = new("teacher_frames", (B, L, H, W, 3), torch.uint8)
    if has_femb:
        t_femb = new("teacher_frame_emb", (B, L, samples[0].teacher_frame_emb.shape[1]),
                     floats(s.teacher_frame_emb for s in samples))
    if has_temb:
        t_temb = new("teacher_text_emb", (Q, samples[0].teacher_text_emb.shape[1]),
                     floats(s.teacher_text_emb for s in samples))

    q = 0
    for j, s in enumerate(samples):
        n = s.frames.shape[0]
        _pad_copy(video_feats[j], s.frames)
        video_mask[j, :n] = 1.0
        n_teacher = _teacher_len(s)
        idx = align_index(n_teacher, n) if n_teacher else np.zeros(0, np.int64)
        teacher_index[j, :len(idx)] = idx
        if has_frames:
            _pad_copy(t_frames[j], s.teacher_frames[idx])
        if has_femb:
            _pad_copy(t_femb[j], s.teacher_frame_emb[idx])
        for c, tok in enumerate(s.tokens):
            k = min(tok.shape[0], Lq)
            _pad_copy(query_feats[q], tok[:k])
            query_mask[q, :k] = 1.0
            labels[q] = j
            if has_temb:
                _pad_copy(t_temb[q], s.teacher_text_emb[c])
            q += 1

    video_ids = [s.video_id for s in samples]
    _check_finite(video_feats, video_ids, "frame features")
    _check_finite(query_feats, [s.video_id for s in samples for _ in s.cap_ids],
                  "caption token features")
    return Batch(
        video_feats=video_feats, video_mask=torch.from_numpy(video_mask),
        query_feats=query_feats, query_mask=torch.from_numpy(query_mask),
        video_rows=torch.from_numpy(np.flatnonzero(video_mask)),
        query_rows=torch.from_numpy(np.flatnonzero(query_mask)),
        labels=torch.from_numpy(labels), video_ids=video_ids,
        cap_ids=[c for s in samples for c in s.cap_ids],
        captions=[c for s in samples for c in s.captions],
        teacher_index=torch.from_numpy(teacher_index), teacher_frames=t_frames,
        teacher_frame_emb=t_femb, teacher_text_emb=t_temb)


def _pad_copy(dst: torch.Tensor, src: np.ndarray) -> None:
    """``dst[:n] = src`` and zeros after it (a reused buffer still holds an earlier batch); a copy
    in the same dtype with numpy (one thread, see collate), a cast with torch (~3x numpy's)."""
    n, d = src.shape[0], dst.numpy()
    if d.dtype == src.dtype:
        d[:n] = src
    else:
        dst[:n].copy_(_tensor(src))
    d[n:] = 0


def _check_finite(x: torch.Tensor, ids: list[str], what: str) -> None:
    """Training never meets NaN/inf inputs: they are refused here, naming the video.

    Row sums and their float32 total decide (NaN and inf propagate through sums): about one
    sum's cost, 20-45x less than ``isfinite(x).all()`` on a TVR batch. A float16 row of
    L2-normalised features sums to at most sqrt(D), far below float16's 65504; a sum that
    overflows anyway is settled element by element."""
    if torch.isfinite(x.sum(-1).sum(dtype=torch.float32)):
        return
    bad = (~torch.isfinite(x.flatten(1))).any(dim=1).nonzero().flatten().tolist()
    if not bad:   # finite values whose float16 row sum overflowed
        return
    names = sorted({ids[i] for i in bad})
    raise ValueError(f"non-finite {what} in videos {names[:5]}: the shards hold NaN or inf; "
                     f"rewrite them from the source features")


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A zero-copy view of a (possibly read-only, decoded-from-shard) array; only read from."""
    return torch.from_numpy(a)


def _teacher_len(s: VideoSample) -> int:
    if s.teacher_frames is not None:
        return s.teacher_frames.shape[0]
    if s.teacher_frame_emb is not None:
        return s.teacher_frame_emb.shape[0]
    return 0

"""One decoded video and the training batch built from several (the reader -> trainer contract).

A batch holds B videos with all their captions, ordered as method.md §5 needs: videos sorted by caption
count (descending, stable), each video's queries contiguous, ``labels[i]`` the batch index of query
i's video. Teacher inputs are aligned to the student's frames: position l of video j in every
teacher tensor describes the same time step as ``video_feats[j, l]`` (method.md §2).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

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


def collate(samples: list[VideoSample], max_words: int = 30) -> Batch:
    """Stack videos into a Batch in method.md §5 order (caption count descending, stable)."""
    with warnings.catch_warnings():
        # Decoded shard arrays are read-only views that collate only reads, through
        # torch.from_numpy, which warns about them; silenced here, not process-wide.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _collate(samples, max_words)


def _collate(samples: list[VideoSample], max_words: int) -> Batch:
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

    # Features land in torch tensors: its float16 -> float32 copy is ~3x faster than numpy's.
    video_feats = torch.zeros((B, L, Dv))
    video_mask = np.zeros((B, L), np.float32)
    teacher_index = np.full((B, L), -1, np.int64)
    query_feats = torch.zeros((Q, Lq, Dq))
    query_mask = np.zeros((Q, Lq), np.float32)
    labels = np.zeros(Q, np.int64)
    has_frames = all(s.teacher_frames is not None for s in samples)
    has_femb = all(s.teacher_frame_emb is not None for s in samples)
    has_temb = all(s.teacher_text_emb is not None for s in samples)
    t_frames = t_femb = t_temb = None
    if has_frames:
        H, W = samples[0].teacher_frames.shape[1:3]
        t_frames = np.zeros((B, L, H, W, 3), np.uint8)
    if has_femb:
        t_femb = np.zeros((B, L, samples[0].teacher_frame_emb.shape[1]), np.float32)
    if has_temb:
        t_temb = np.zeros((Q, samples[0].teacher_text_emb.shape[1]), np.float32)

    q = 0
    for j, s in enumerate(samples):
        n = s.frames.shape[0]
        video_feats[j, :n].copy_(_tensor(s.frames))
        video_mask[j, :n] = 1.0
        n_teacher = _teacher_len(s)
        if n_teacher:
            idx = align_index(n_teacher, n)
            teacher_index[j, :n] = idx
            if has_frames:
                t_frames[j, :n] = s.teacher_frames[idx]
            if has_femb:
                t_femb[j, :n] = s.teacher_frame_emb[idx]
        for c, tok in enumerate(s.tokens):
            k = min(tok.shape[0], Lq)
            query_feats[q, :k].copy_(_tensor(tok[:k]))
            query_mask[q, :k] = 1.0
            labels[q] = j
            if has_temb:
                t_temb[q] = s.teacher_text_emb[c]
            q += 1

    video_ids = [s.video_id for s in samples]
    _check_finite(video_feats, video_ids, "frame features")
    _check_finite(query_feats, [s.video_id for s in samples for _ in s.cap_ids],
                  "caption token features")

    def t(a):
        return None if a is None else torch.from_numpy(a)

    return Batch(
        video_feats=video_feats, video_mask=torch.from_numpy(video_mask),
        query_feats=query_feats, query_mask=torch.from_numpy(query_mask),
        video_rows=torch.from_numpy(np.flatnonzero(video_mask)),
        query_rows=torch.from_numpy(np.flatnonzero(query_mask)),
        labels=torch.from_numpy(labels), video_ids=video_ids,
        cap_ids=[c for s in samples for c in s.cap_ids],
        captions=[c for s in samples for c in s.captions],
        teacher_index=torch.from_numpy(teacher_index), teacher_frames=t(t_frames),
        teacher_frame_emb=t(t_femb), teacher_text_emb=t(t_temb))


def _check_finite(x: torch.Tensor, ids: list[str], what: str) -> None:
    """Training never meets NaN/inf inputs: they are refused here, naming the video.

    One sum decides (NaN and inf propagate through it; features are L2-normalised rows, far
    from float32 overflow): 25x cheaper than ``isfinite(x).all()`` on a TVR batch."""
    if torch.isfinite(x.sum()):
        return
    bad = (~torch.isfinite(x.flatten(1))).any(dim=1).nonzero().flatten().tolist()
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

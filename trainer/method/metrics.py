"""Gallery evaluation of method.md §1: ranks with pessimistic ties, R@K, SumR, MedR, MeanR, MRR.

Scores are computed block by block so that memory stays bounded whatever the gallery size: a
block is (query_chunk, video_chunk * L) frame cosines, and a query's rank needs only its own row
of fused scores, so at most (query_chunk, Nv) scores exist at a time.

Two exact savings over the plain masked computation:
- padded frames are overwritten with a copy of the video's first frame, so the max over all L
  positions equals the max over valid frames without any mask arithmetic;
- videos are scored in chunks sorted by length and each chunk is cut to its longest video, so
  padding is (mostly) not multiplied at all.

One concern over 400 lines: the gallery (encoded once), the blocked scoring and the rank
arithmetic share the block layout above; split apart, each half would re-derive it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharding.batch import VideoSample

RECALL_AT = (1, 5, 10, 100)
NORM_EPS = 1e-12


def ranks_from_scores(scores: Tensor, gt: Tensor) -> Tensor:
    """rank(i) = 1 + #{j != gt(i) : S[i, j] >= S[i, gt(i)]}: ties count against the query.

    ``scores`` is (Nq, Nv), ``gt`` (Nq,) the column of each query's relevant video. Returns int64
    ranks in [1, Nv]. Equal to the count of columns scoring >= the ground truth (itself included).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (queries, videos), got shape {tuple(scores.shape)}")
    nq, nv = scores.shape
    if nq == 0 or nv == 0:
        raise ValueError(f"empty score matrix of shape {(nq, nv)}: need a query and a video")
    if gt.dim() != 1 or gt.shape[0] != nq:
        raise ValueError(f"gt must be ({nq},) to match scores {(nq, nv)}, got {tuple(gt.shape)}")
    if gt.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gt must hold integer video indices, got dtype {gt.dtype}")
    bad = ((gt < 0) | (gt >= nv)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"gt out of range for {nv} videos at queries {bad[:5].tolist()} "
                         f"(values {gt[bad[:5]].tolist()})")
    nan_rows = torch.isnan(scores).any(dim=1).nonzero().flatten()
    if len(nan_rows):
        raise ValueError(f"NaN scores for queries {nan_rows[:5].tolist()}: the model produced "
                         f"NaN embeddings; check its weights and inputs")
    gt = gt.to(device=scores.device, dtype=torch.int64)
    gt_score = scores.gather(1, gt[:, None])
    return (scores >= gt_score).sum(dim=1)


def rank_metrics(ranks: Tensor | np.ndarray | Sequence[int]) -> dict[str, float]:
    """R@1/5/10/100 (percent), SumR, median rank, mean rank and mean reciprocal rank.

    MedR is the textbook median (mean of the two middle ranks for an even count), as
    ``np.median`` in the reference.
    """
    r = torch.as_tensor(ranks).to(torch.float64).flatten().cpu()
    if r.numel() == 0:
        raise ValueError("no ranks to summarise: the gallery has no queries")
    if not torch.isfinite(r).all() or (r < 1).any():
        raise ValueError(f"ranks must be finite and >= 1, got min {r.min().item()}")
    out = {f"R{k}": 100.0 * int((r <= k).sum()) / r.numel() for k in RECALL_AT}
    out["SumR"] = sum(out[f"R{k}"] for k in RECALL_AT)
    out["MedR"] = float(np.median(r.numpy()))
    out["MeanR"] = r.mean().item()
    out["MRR"] = (1.0 / r).mean().item()
    return out


@dataclass
class EvalGallery:
    """All videos and all queries of an evaluation split, as student inputs."""

    video_feats: Tensor   # (Nv, L, Dv), any float dtype (cast per chunk)
    video_mask: Tensor    # (Nv, L), 1 = valid frame
    query_feats: Tensor   # (Nq, Lq, Dq)
    query_mask: Tensor    # (Nq, Lq)
    gt: Tensor            # (Nq,) int64, index of each query's video
    video_ids: list[str]
    cap_ids: list[str]

    def __post_init__(self) -> None:
        if self.video_feats.dim() != 3 or self.query_feats.dim() != 3:
            raise ValueError(f"gallery features must be 3-D: videos {tuple(self.video_feats.shape)}"
                             f", queries {tuple(self.query_feats.shape)}")
        nv, length = self.video_feats.shape[:2]
        nq, lq = self.query_feats.shape[:2]
        if nv == 0 or nq == 0:
            raise ValueError(f"empty gallery: {nv} videos and {nq} queries; an evaluation split "
                             f"needs at least one of each")
        if tuple(self.video_mask.shape) != (nv, length):
            raise ValueError(f"video_mask {tuple(self.video_mask.shape)} must be {(nv, length)}")
        if tuple(self.query_mask.shape) != (nq, lq):
            raise ValueError(f"query_mask {tuple(self.query_mask.shape)} must be {(nq, lq)}")
        if tuple(self.gt.shape) != (nq,) or self.gt.dtype != torch.int64:
            raise ValueError(f"gt must be int64 of shape ({nq},), got {self.gt.dtype} "
                             f"{tuple(self.gt.shape)}")
        if len(self.video_ids) != nv or len(self.cap_ids) != nq:
            raise ValueError(f"{len(self.video_ids)} video ids / {len(self.cap_ids)} cap ids for "
                             f"{nv} videos / {nq} queries")
        if len(set(self.video_ids)) != nv:
            dup = sorted({v for v in self.video_ids if self.video_ids.count(v) > 1})[:5]
            raise ValueError(f"duplicate video ids in the gallery: {dup}; each video once")
        bad = ((self.gt < 0) | (self.gt >= nv)).nonzero().flatten()
        if len(bad):
            raise ValueError(f"gt out of range for {nv} videos at queries "
                             f"{[self.cap_ids[i] for i in bad[:5].tolist()]}")
        for name, mask in (("video", self.video_mask), ("query", self.query_mask)):
            empty = (mask.sum(dim=1) == 0).nonzero().flatten()[:5].tolist()
            if empty:
                ids = self.video_ids if name == "video" else self.cap_ids
                raise ValueError(f"{name}s {[ids[i] for i in empty]} have an all-zero mask")

    @property
    def num_videos(self) -> int:
        return self.video_feats.shape[0]

    @property
    def num_queries(self) -> int:
        return self.query_feats.shape[0]


def build_gallery(samples: list[VideoSample], max_words: int = 30) -> EvalGallery:
    """Stack decoded videos (in the given order) and all their captions into an EvalGallery.

    Frames keep their stored dtype (float16 halves a TVR gallery to 1.7 GB); teacher inputs are
    not copied: evaluation never uses the teacher.
    """
    if not samples:
        raise ValueError("cannot build an evaluation gallery from no videos")
    dv = samples[0].frames.shape[1]
    dq = samples[0].tokens[0].shape[1] if samples[0].tokens else None
    for s in samples:
        if s.frames.ndim != 2 or s.frames.shape[1] != dv or s.frames.shape[0] == 0:
            raise ValueError(f"video {s.video_id}: frames {s.frames.shape}, expected (n>0, {dv})")
        if len(s.tokens) != len(s.cap_ids):
            raise ValueError(f"video {s.video_id}: {len(s.tokens)} token arrays for "
                             f"{len(s.cap_ids)} caption ids")
        for cap, tok in zip(s.cap_ids, s.tokens):
            if tok.ndim != 2 or tok.shape[0] == 0 or tok.shape[1] != dq:
                raise ValueError(f"caption {cap}: tokens {tok.shape}, expected (n>0, {dq})")
    nv = len(samples)
    length = max(s.frames.shape[0] for s in samples)
    nq = sum(len(s.cap_ids) for s in samples)
    if nq == 0:
        raise ValueError(f"the {nv} gallery videos have no captions: nothing to evaluate")
    lq = min(max_words, max(t.shape[0] for s in samples for t in s.tokens))
    dtype = np.result_type(*[s.frames.dtype for s in samples])
    video_feats = np.zeros((nv, length, dv), dtype)
    video_mask = np.zeros((nv, length), np.float32)
    query_feats = np.zeros((nq, lq, dq), np.float32)
    query_mask = np.zeros((nq, lq), np.float32)
    gt = np.zeros(nq, np.int64)
    q = 0
    for j, s in enumerate(samples):
        n = s.frames.shape[0]
        video_feats[j, :n] = s.frames
        video_mask[j, :n] = 1.0
        for tok in s.tokens:
            k = min(tok.shape[0], lq)
            query_feats[q, :k] = tok[:k]
            query_mask[q, :k] = 1.0
            gt[q] = j
            q += 1
    return EvalGallery(
        video_feats=torch.from_numpy(video_feats), video_mask=torch.from_numpy(video_mask),
        query_feats=torch.from_numpy(query_feats), query_mask=torch.from_numpy(query_mask),
        gt=torch.from_numpy(gt), video_ids=[s.video_id for s in samples],
        cap_ids=[c for s in samples for c in s.cap_ids])


@dataclass
class EncodedGallery:
    """Unit-norm embeddings ready to score: queries per branch, videos in length-sorted chunks."""

    queries: dict[str, Tensor]             # branch -> (Nq, d)
    video_chunks: list[dict[str, Tensor]]  # per chunk: branch -> (n_chunk * Lc, d), padding filled
    chunk_sizes: list[int]                 # videos per chunk
    order: Tensor                          # (Nv,) gallery index of each video, chunk order
    gt: Tensor                             # (Nq,) gt as a position in `order`
    weights: dict[str, float]              # branch -> fusion weight

    @property
    def num_queries(self) -> int:
        return self.gt.shape[0]

    @property
    def num_videos(self) -> int:
        return self.order.shape[0]


def branch_weights(student: nn.Module) -> dict[str, float]:
    """w for inh and 1 - w for exp (w = cfg.inh_weight, method.md §7); 1 for a lone branch."""
    names = tuple(student.branch_names)
    if names == ("inh", "exp"):
        if not hasattr(getattr(student, "cfg", None), "inh_weight"):
            raise ValueError("a dual-branch student needs cfg.inh_weight (model.inh_weight) to "
                             "fuse its branch scores")
        w = float(student.cfg.inh_weight)
        return {"inh": w, "exp": 1.0 - w}
    if len(names) == 1:
        return {names[0]: 1.0}
    raise ValueError(f"student.branch_names={names}: expected ('inh', 'exp') or one branch")


def length_order(video_mask: Tensor) -> Tensor:
    """Gallery indices sorted by valid length, longest first (stable), for chunking."""
    lengths = video_mask.sum(dim=1).cpu()
    return torch.sort(lengths, descending=True, stable=True).indices


def chunk_lengths(mask: Tensor, what: str = "video") -> Tensor:
    """Valid lengths of a chunk's videos; masks must be a non-empty prefix (1...1 0...0)."""
    valid = mask > 0
    if (~valid[:, 0]).any() or (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError(f"{what} masks must mark a non-empty prefix of valid frames (1...1 0...0)")
    return valid.sum(dim=1).cpu()


def prepare_video_chunk(frames: Tensor, lengths: Tensor, what: str = "video") -> Tensor:
    """(n, Lc, d) frame embeddings, Lc = max(lengths) -> (n * Lc, d) unit rows, IN PLACE.

    ``frames`` must be a tensor the caller owns (a fresh gather or model output): normalising
    in place saves a full copy of the gallery. Padded positions get a copy of frame 0 so that an
    unmasked max over Lc is the max over valid frames.
    """
    x = frames.float().contiguous()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if not torch.isfinite(norms).all():  # any NaN/inf element makes its row's norm non-finite
        raise ValueError(f"{what} embeddings contain NaN or inf: the model diverged or its inputs "
                         f"are corrupt")
    x.div_(norms.clamp_min_(NORM_EPS))
    for j in (lengths < x.shape[1]).nonzero().flatten().tolist():
        x[j, int(lengths[j]):] = x[j, 0]
    return x.view(-1, x.shape[-1])


def encoded_from_embeddings(queries: Mapping[str, Tensor], videos: Mapping[str, Tensor],
                            video_mask: Tensor, gt: Tensor, weights: Mapping[str, float],
                            video_chunk: int = 32, device: str | torch.device = "cpu"
                            ) -> EncodedGallery:
    """An EncodedGallery from ready embeddings: (Nq, d) and (Nv, L, d) per branch."""
    if set(queries) != set(weights) or set(videos) != set(weights):
        raise ValueError(f"branches differ: queries {sorted(queries)}, videos {sorted(videos)}, "
                         f"weights {sorted(weights)}")
    order = length_order(video_mask)
    chunks, sizes = [], []
    for start in range(0, len(order), video_chunk):
        idx = order[start:start + video_chunk]
        lengths = chunk_lengths(video_mask[idx.to(video_mask.device)])
        lc = int(lengths.max())
        chunks.append({b: prepare_video_chunk(v[idx.to(v.device), :lc].to(device), lengths,
                                              f"branch {b} video")
                       for b, v in videos.items()})
        sizes.append(len(idx))
    q = {b: _unit_queries(e.to(device), b) for b, e in queries.items()}
    return _encoded(q, chunks, sizes, order, gt, dict(weights))


@torch.no_grad()
def encode_gallery(student: nn.Module, gallery: EvalGallery, query_chunk: int = 1024,
                   video_chunk: int = 32, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> EncodedGallery:
    """Encode every video and query once, in chunks, in eval mode (training mode restored).

    The student runs in ``dtype``, the precision it trains in (bf16 under DeepSpeed bf16);
    embeddings, scores and ranks are float32.
    """
    _check_student_dims(student, gallery)
    weights = branch_weights(student)
    was_training = student.training
    student.eval()
    try:
        order = length_order(gallery.video_mask)
        chunks, sizes = [], []
        for start in range(0, gallery.num_videos, video_chunk):
            idx = order[start:start + video_chunk]
            feats = gallery.video_feats[idx].to(device, dtype)
            mask = gallery.video_mask[idx].to(device, torch.float32)
            out = student.encode_videos(feats, mask)
            _check_branches(out, weights, "encode_videos")
            lengths = chunk_lengths(mask)
            lc = int(lengths.max())
            chunks.append({b: prepare_video_chunk(out[b][:len(idx), :lc], lengths,
                                                  f"branch {b} video") for b in weights})
            sizes.append(len(idx))
        parts: dict[str, list[Tensor]] = {b: [] for b in weights}
        for start in range(0, gallery.num_queries, query_chunk):
            sl = slice(start, start + query_chunk)
            feats = gallery.query_feats[sl].to(device, dtype)
            qmask = gallery.query_mask[sl].to(device, torch.float32)
            out = student.encode_queries(feats, qmask)
            _check_branches(out, weights, "encode_queries")
            for b in weights:
                parts[b].append(out[b][:len(feats)])
        queries = {b: _unit_queries(torch.cat(p), b) for b, p in parts.items()}
    finally:
        student.train(was_training)
    return _encoded(queries, chunks, sizes, order, gallery.gt, weights)


def rank_counts(enc: EncodedGallery, queries: slice | None = None, query_chunk: int = 1024
                ) -> Tensor:
    """Pessimistic ranks of the queries in ``queries`` (all by default), int64 on the CPU.

    Ranks of disjoint query slices are independent, so distributed ranks can each take a slice
    and gather the results.
    """
    sl = queries or slice(None)
    lo, hi, step = sl.indices(enc.num_queries)
    if step != 1:
        raise ValueError(f"query slice {sl} must be contiguous (step 1)")
    out = []
    for start in range(lo, hi, query_chunk):
        stop = min(start + query_chunk, hi)
        strip = _fused_strip(enc, start, stop)
        out.append(ranks_from_scores(strip, enc.gt[start:stop].to(strip.device)).cpu())
    if not out:
        raise ValueError(f"query slice {sl} selects no queries of {enc.num_queries}")
    return torch.cat(out)


def score_matrix(enc: EncodedGallery, query_chunk: int = 1024) -> Tensor:
    """The full fused (Nq, Nv) score matrix in gallery order, for reports (memory Nq * Nv)."""
    full = torch.empty(enc.num_queries, enc.num_videos)
    for start in range(0, enc.num_queries, query_chunk):
        stop = min(start + query_chunk, enc.num_queries)
        full[start:stop, enc.order] = _fused_strip(enc, start, stop).cpu()
    return full


def evaluate(student: nn.Module, gallery: EvalGallery, query_chunk: int = 1024,
             video_chunk: int = 32, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The retrieval metrics of a student on a gallery: encode once, score in blocks, rank,
    summarise."""
    enc = encode_gallery(student, gallery, query_chunk, video_chunk, device, dtype)
    return rank_metrics(rank_counts(enc, query_chunk=query_chunk))


def _fused_strip(enc: EncodedGallery, start: int, stop: int) -> Tensor:
    """Fused scores of queries [start, stop) against every video, columns in chunk order."""
    first = next(iter(enc.weights))
    n = stop - start
    strip = enc.queries[first].new_empty(n, enc.num_videos)
    col = 0
    for chunk, size in zip(enc.video_chunks, enc.chunk_sizes):
        block = None
        for b, w in enc.weights.items():
            s = (enc.queries[b][start:stop] @ chunk[b].T).view(n, size, -1).amax(dim=-1)
            block = w * s if block is None else block.add_(w * s)
        strip[:, col:col + size] = block
        col += size
    return strip


def _encoded(queries: dict[str, Tensor], chunks: list[dict[str, Tensor]], sizes: list[int],
             order: Tensor, gt: Tensor, weights: dict[str, float]) -> EncodedGallery:
    dims = {b: q.shape[-1] for b, q in queries.items()}
    for chunk in chunks:
        for b, v in chunk.items():
            if v.shape[-1] != dims[b]:
                raise ValueError(f"branch {b}: query dim {dims[b]} != video dim {v.shape[-1]}")
    if gt.dim() != 1 or gt.dtype != torch.int64 or ((gt < 0) | (gt >= len(order))).any():
        raise ValueError(f"gt must be int64 (Nq,) indices below {len(order)} videos, got "
                         f"{gt.dtype} {tuple(gt.shape)}")
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return EncodedGallery(queries=queries, video_chunks=chunks, chunk_sizes=sizes, order=order,
                          gt=position[gt.cpu()], weights=weights)


def _unit_queries(q: Tensor, branch: str) -> Tensor:
    if q.dim() != 2:
        raise ValueError(f"branch {branch}: query embeddings must be (Nq, d), got {tuple(q.shape)}")
    x = F.normalize(q.float(), dim=-1, eps=NORM_EPS)
    if not torch.isfinite(x).all():
        raise ValueError(f"branch {branch} query embeddings contain NaN or inf: the model "
                         f"diverged or its inputs are corrupt")
    return x.contiguous()


def _check_branches(out: Mapping[str, Tensor], weights: Mapping[str, float], call: str) -> None:
    missing = set(weights) - set(out)
    if missing:
        raise ValueError(f"student.{call} returned branches {sorted(out)}, "
                         f"missing {sorted(missing)}")


def _check_student_dims(student: nn.Module, gallery: EvalGallery) -> None:
    """Name the config key when the gallery's feature dims do not match the student."""
    cfg = getattr(student, "cfg", None)
    for key, have in (("video_dim", gallery.video_feats.shape[-1]),
                      ("query_dim", gallery.query_feats.shape[-1])):
        want = getattr(cfg, key, None)
        if want is not None and want != have:
            raise ValueError(f"gallery {key.split('_')[0]} features have dim {have} but the "
                             f"student expects model.{key}={want}; set model.{key}={have} or "
                             f"rebuild the gallery from matching features")

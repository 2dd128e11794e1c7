"""What a student retrieves, query by query: the retrieval explorer's data (docs/evaluation.md).

Every query is ranked (the same pessimistic ranks as ``trainer.method.metrics.evaluate``, so the
metrics match a plain evaluation); recall is split by video length and by query length; then only
the queries shown (the worst, and a seeded sample of the best) get their top videos and the
per-clip cosine of each branch across their relevant and top-1 videos. Nothing here is
proportional to (queries x clips) beyond the ranking the metrics already need.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from trainer.method.metrics import (RECALL_AT, EncodedGallery, EvalGallery,
                                    encode_gallery, rank_counts, rank_metrics, score_matrix)


@dataclass
class Bucket:
    """Queries whose value (a video's clips, a query's words) lies in [lo, hi]."""

    lo: int
    hi: int
    queries: int
    recall: dict[str, float]   # "R1".. "R100", percent


@dataclass
class Curve:
    """One video against one query: the cosine of each branch at each clip of the video."""

    video_id: str
    score: float                      # fused score (max over clips per branch, weighted)
    cos: dict[str, list[float]]       # branch -> one cosine per clip


@dataclass
class QueryView:
    cap_id: str
    text: str                         # the caption's text, "" when the shards have none
    words: int
    kind: str                         # "worst" or "best"
    rank: int
    video_id: str                     # the relevant video
    top: list[tuple[str, float]]      # (video id, fused score), best first
    curves: list[Curve]               # the relevant video, then the top-1 when it differs


@dataclass
class Explanation:
    metrics: dict[str, float]
    num_videos: int
    num_queries: int
    weights: dict[str, float]
    by_video_length: list[Bucket]
    by_query_length: list[Bucket]
    queries: list[QueryView] = field(default_factory=list)


@torch.no_grad()
def explain_student(student: nn.Module, gallery: EvalGallery, texts: list[str] | None = None,
                    *, worst: int = 8, best: int = 4, top: int = 5, seed: int = 0,
                    query_chunk: int = 1024, video_chunk: int = 32) -> Explanation:
    """Encode ``gallery`` once with ``student`` and explain it (see ``explain``)."""
    enc = encode_gallery(student, gallery, query_chunk, video_chunk)
    return explain(enc, gallery.video_ids, gallery.cap_ids, gallery.video_mask.sum(dim=1),
                   gallery.query_mask.sum(dim=1), texts, worst=worst, best=best, top=top,
                   seed=seed, query_chunk=query_chunk)


def explain(enc: EncodedGallery, video_ids: list[str], cap_ids: list[str], video_len: Tensor,
            words: Tensor, texts: list[str] | None = None, *, worst: int = 8, best: int = 4,
            top: int = 5, seed: int = 0, buckets: int = 5, query_chunk: int = 1024
            ) -> Explanation:
    """Metrics, recall by length bucket, and the ``worst`` queries plus ``best`` sampled among
    the best-ranked ones, each with its ``top`` videos and per-clip curves.

    ``enc``: the gallery encoded (``encode_gallery`` or ``encoded_from_embeddings``); ids,
    ``video_len`` (valid clips per video), ``words`` (valid tokens per query) and ``texts`` (the
    caption of each query) in gallery order."""
    nq, nv = enc.num_queries, enc.num_videos
    sizes = {"video ids": (len(video_ids), nv), "video lengths": (len(video_len), nv),
             "cap ids": (len(cap_ids), nq), "query lengths": (len(words), nq),
             "caption texts": (nq if texts is None else len(texts), nq)}
    for what, (have, want) in sizes.items():
        if have != want:
            raise ValueError(f"{have} {what} for a gallery of {nv} videos and {nq} queries")
    video_len, words = video_len.long().cpu(), words.long().cpu()
    ranks = rank_counts(enc, query_chunk=query_chunk)
    gt = enc.order[enc.gt]                                      # each query's video, gallery index
    out = Explanation(metrics=rank_metrics(ranks), num_videos=nv, num_queries=nq,
                      weights=dict(enc.weights),
                      by_video_length=recall_buckets(video_len[gt], ranks, buckets),
                      by_query_length=recall_buckets(words, ranks, buckets))
    shown = pick_queries(ranks, worst, best, seed)
    if not shown:
        return out
    idx = torch.tensor([q for q, _ in shown])
    scores = score_matrix(_subset(enc, idx), query_chunk)          # (shown, Nv), gallery order
    best_scores, best_videos = scores.topk(min(top, nv), dim=1)
    lookup = _FrameLookup(enc, video_len)
    for row, (q, kind) in enumerate(shown):
        rel, first = int(gt[q]), int(best_videos[row, 0])
        curves = [Curve(video_ids[j], float(scores[row, j]), lookup.cosines(enc, q, j))
                  for j in ([rel] if first == rel else [rel, first])]
        out.queries.append(QueryView(
            cap_id=cap_ids[q], text=texts[q] if texts else "", words=int(words[q]), kind=kind,
            rank=int(ranks[q]), video_id=video_ids[rel],
            top=[(video_ids[int(j)], float(s)) for j, s in zip(best_videos[row], best_scores[row])],
            curves=curves))
    return out


def pick_queries(ranks: Tensor, worst: int, best: int, seed: int = 0) -> list[tuple[int, str]]:
    """The ``worst`` highest ranks (ties: gallery order), then ``best`` drawn (seeded) from the
    remaining queries ranked at least as well as the ``best``-th best of them."""
    r = ranks.cpu().numpy()
    order = np.argsort(-r, kind="stable")
    worst_q = order[:min(worst, len(r))].tolist()
    rest = np.setdiff1d(np.arange(len(r)), worst_q)
    best_q: list[int] = []
    if best > 0 and len(rest):
        cut = np.sort(r[rest])[min(best, len(rest)) - 1]
        pool = rest[r[rest] <= cut]
        pick = np.random.default_rng(seed).choice(pool, size=min(best, len(pool)), replace=False)
        best_q = sorted(pick.tolist(), key=lambda q: (r[q], q))
    return [(q, "worst") for q in worst_q] + [(q, "best") for q in best_q]


def recall_buckets(values: Tensor, ranks: Tensor, n: int = 5) -> list[Bucket]:
    """Recall@K of the queries grouped by an integer ``values`` per query, in up to ``n``
    buckets of about equal query counts (quantile edges; equal values share a bucket)."""
    v, r = values.cpu().numpy(), ranks.cpu().numpy()
    edges = np.unique(np.quantile(v, np.linspace(0, 1, n + 1), method="lower").astype(np.int64))
    which = np.searchsorted(edges[1:-1], v, side="right")
    out = []
    for i in range(max(len(edges) - 1, 1)):
        sel = r[which == i]
        if not len(sel):
            continue
        hi = int(edges[i + 1]) - 1 if i < len(edges) - 2 else int(edges[-1])
        out.append(Bucket(lo=int(edges[i]), hi=hi, queries=len(sel),
                          recall={f"R{k}": 100.0 * float((sel <= k).mean()) for k in RECALL_AT}))
    return out


class _FrameLookup:
    """Where a gallery video's unit clip embeddings sit in the encoded, length-sorted chunks."""

    def __init__(self, enc: EncodedGallery, video_len: Tensor):
        self.len = video_len
        self.chunk = torch.empty(enc.num_videos, dtype=torch.long)
        self.slot = torch.empty(enc.num_videos, dtype=torch.long)
        start = 0
        for c, size in enumerate(enc.chunk_sizes):
            members = enc.order[start:start + size]
            self.chunk[members] = c
            self.slot[members] = torch.arange(size)
            start += size

    def cosines(self, enc: EncodedGallery, q: int, video: int) -> dict[str, list[float]]:
        c, slot, n = int(self.chunk[video]), int(self.slot[video]), int(self.len[video])
        out = {}
        for b in enc.weights:
            rows = enc.video_chunks[c][b]
            per_video = rows.shape[0] // enc.chunk_sizes[c]
            clips = rows[slot * per_video:slot * per_video + n]
            out[b] = (clips @ enc.queries[b][q]).cpu().tolist()
        return out


def _subset(enc: EncodedGallery, idx: Tensor) -> EncodedGallery:
    """``enc`` restricted to the queries ``idx`` (videos shared, not copied)."""
    return EncodedGallery(queries={b: q[idx.to(q.device)] for b, q in enc.queries.items()},
                          video_chunks=enc.video_chunks, chunk_sizes=enc.chunk_sizes,
                          order=enc.order, gt=enc.gt[idx], weights=enc.weights)

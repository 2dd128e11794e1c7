"""The baseline for ``bench.eval``: ranking done the way the reference evaluation does it.

Written from the reference's behaviour (HuiGuanLab/DL-DKD ``method/eval.py``), not copied: ground
truth is found by comparing every caption id's video part with every video id (O(Nq * Nv) string
compares), each query's row is argsorted on its own, the ground truth's position is searched in
the sorted order, and mAP (= MRR with one relevant video) builds a label list per query and walks
it in Python. Ties are broken by the unstable argsort, not pessimistically.
"""
from __future__ import annotations

import numpy as np


def reference_gt(video_ids: list[str], cap_ids: list[str]) -> dict[int, list[int]]:
    """Query index -> indices of its videos, by string comparison of ids."""
    video_to_queries: list[list[int]] = []
    for vid in video_ids:
        matches = []
        for i, cap in enumerate(cap_ids):
            if cap.split("#", 1)[0] == vid:
                matches.append(i)
        video_to_queries.append(matches)
    query_to_videos: dict[int, list[int]] = {}
    for j, queries in enumerate(video_to_queries):
        for i in queries:
            query_to_videos.setdefault(i, []).append(j)
    return query_to_videos


def _average_precision(sorted_labels: list[int]) -> float:
    relevant = sum(1 for x in sorted_labels if x > 0)
    if relevant == 0:
        return 0.0
    hits, ap = 0, 0.0
    for pos, label in enumerate(sorted_labels):
        if label >= 1:
            hits += 1
            ap += hits / (pos + 1.0)
    return ap / relevant


def reference_metrics(scores: np.ndarray, query_to_videos: dict[int, list[int]]
                      ) -> dict[str, float]:
    """R@K, SumR, MedR, MeanR and mAP (reported as MRR) from a (Nq, Nv) score matrix."""
    errors = -1 * scores
    n_q, n_v = errors.shape
    ranks = np.zeros(n_q, np.int64)
    for i in range(n_q):
        order = np.argsort(errors[i])
        best = n_v + 1
        for k in query_to_videos[i]:
            pos = np.where(order == k)[0][0] + 1
            best = min(best, pos)
        ranks[i] = best
    aps = []
    for i in range(n_q):
        labels = [0] * n_v
        labels[query_to_videos[i][0]] = 1
        aps.append(_average_precision([labels[x] for x in np.argsort(errors[i])]))
    out = {f"R{k}": 100.0 * len(np.where(ranks <= k)[0]) / n_q for k in (1, 5, 10, 100)}
    out["SumR"] = out["R1"] + out["R5"] + out["R10"] + out["R100"]
    out["MedR"] = float(np.median(ranks))
    out["MeanR"] = float(ranks.mean())
    out["MRR"] = float(np.mean(aps))
    return out

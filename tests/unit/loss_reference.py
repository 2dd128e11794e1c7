"""Slow plain-loop losses written straight from the method.md §5 formulas, one query / video at a time.

Independent of trainer.method.losses on purpose: the tests compare the vectorised code with these.
Scores are autograd tensors so gradients can be compared too; use float64 inputs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _lse(values: list[Tensor]) -> Tensor:
    return torch.logsumexp(torch.stack(values), dim=0)


def triplet(S: Tensor, labels: list[int], margin: float, neg_rank: list[int],
            video_neg: list[int] | None = None) -> Tensor:
    """neg_rank[i] = k picks the k-th best (1-based) other video for query i; k = 1 is hardest.
    video_neg[j] = i picks query i (of another video) as video j's negative; None = hardest."""
    Q, B = S.shape
    query_terms = []
    for i in range(Q):
        others = sorted((j for j in range(B) if j != labels[i]), key=lambda j: -float(S[i, j]))
        neg = S[i, others[neg_rank[i] - 1]]
        query_terms.append(torch.clamp(margin + neg - S[i, labels[i]], min=0))
    video_terms = []
    for j in range(B):
        mine = [S[i, j] for i in range(Q) if labels[i] == j]
        theirs = [S[i, j] for i in range(Q) if labels[i] != j]
        pos = sum(mine) / len(mine)
        neg = max(theirs, key=float) if video_neg is None else S[video_neg[j], j]
        assert video_neg is None or labels[video_neg[j]] != j
        video_terms.append(torch.clamp(margin + neg - pos, min=0))
    return sum(query_terms) / Q + sum(video_terms) / B


def nce(U: Tensor, labels: list[int]) -> Tensor:
    Q, B = U.shape
    per_query = [_lse([U[i, j] for j in range(B)]) - U[i, labels[i]] for i in range(Q)]
    per_video = [_lse([U[i, j] for i in range(Q)])
                 - _lse([U[i, j] for i in range(Q) if labels[i] == j]) for j in range(B)]
    return sum(per_query) / Q + sum(per_video) / B


def soft_nce(U: Tensor, T: Tensor, labels: list[int], alpha: float, beta: float) -> Tensor:
    Q, B = U.shape
    hq, hv = math.floor(alpha * Q), math.floor(alpha * B)
    r, c = [], []
    for i in range(Q):
        if i < hq:
            target = [1.0 if j == labels[i] else 0.0 for j in range(B)]
        else:
            row = torch.softmax(T[i], dim=0)
            target = [(1 - beta) * row[j] + beta * (1.0 if j == labels[i] else 0.0)
                      for j in range(B)]
        lse = _lse([U[i, k] for k in range(B)])
        r.append(sum(target[j] * (lse - U[i, j]) for j in range(B)))
    for j in range(B):
        if j < hv:
            target = [1.0 if labels[i] == j else 0.0 for i in range(Q)]
        else:
            col = torch.softmax(T[:, j], dim=0)
            target = [(1 - beta) * col[i] + beta * (1.0 if labels[i] == j else 0.0)
                      for i in range(Q)]
        log_t = [torch.log(torch.as_tensor(target[i], dtype=U.dtype) + 1e-12) for i in range(Q)]
        c.append(_lse([U[i, j] for i in range(Q)]) - _lse([log_t[i] + U[i, j] for i in range(Q)]))
    hard = soft = 0.0
    if hq and hv:
        hard = sum(r[:hq]) / hq + sum(c[:hv]) / hv
    if hq < Q and hv < B:
        soft = sum(r[hq:]) / (Q - hq) + sum(c[hv:]) / (B - hv)
    return alpha * hard + (1 - alpha) * soft


def kd(student_cos: Tensor, teacher_cos: Tensor, frame_mask: Tensor, labels: list[int],
       temp: float) -> Tensor:
    total = 0.0
    for i, j in enumerate(labels):
        frames = [l for l in range(frame_mask.shape[1]) if frame_mask[j, l] > 0]
        p_t = torch.softmax(torch.stack([teacher_cos[i, j, l] for l in frames]) / temp, dim=0)
        p_s = torch.softmax(torch.stack([student_cos[i, j, l] for l in frames]) / temp, dim=0)
        total = total + sum(p_t[k] * (torch.log(p_t[k]) - torch.log(p_s[k]))
                            for k in range(len(frames)))
    return total

"""The losses of the method (docs/method.md) as pure, vectorised functions, and the DL-DKD /
DL-DKD++ totals.

Every term works on whole (Q, B) or (Q, B, L) tensors: no Python loop over queries or videos, no
copy of a score matrix, no anomaly mode. ``labels[i]`` is the batch index of query i's video and
the batch is in collate order (videos by caption count, descending; a video's queries contiguous),
which the soft-target split into hard and soft rows relies on.

Value checks (label ranges, NaN, empty masks) each cost a device-to-host sync, so they run only
with ``check=True``: the default for direct calls, off in the training step (``train.debug``),
where the reader and collate have validated the inputs already.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import LossConfig
from trainer.method.schedules import LossWeights

# Score given to padded frames before a max or softmax over frames (the reference's mask_logits).
PAD_SCORE = -1e10


class BranchScores(NamedTuple):
    """One student branch's scores: the loss's input."""

    cos: Tensor  # (Q, B, L) frame cosines, padded frames = PAD_SCORE
    S: Tensor    # (Q, B) cosine max over valid frames
    U: Tensor    # (Q, B) raw dot-product max over valid frames


class TeacherTargets(NamedTuple):
    tau: Tensor  # (Q, B, L) teacher frame cosines, padded frames = PAD_SCORE
    T: Tensor    # (Q, B) raw teacher dot-product max: the inheritance branch's soft-target source


def triplet(S: Tensor, labels: Tensor, margin: float, hard_pool: int,
            generator: torch.Generator | None = None, hard_video: bool = True,
            check: bool = True) -> Tensor:
    """Bidirectional max-margin ranking on cosine S (Q, B).

    Query side: the negative is drawn uniformly from the ``hard_pool`` best other videos
    (``hard_pool=1``: the hardest, deterministic; ``hard_pool >= B - 1``: any other video).
    Video side: mean positive score against the hardest other query, or (``hard_video=False``,
    before hard negatives start, as the reference) one other video's query drawn uniformly.
    Draw order on ``generator``: the query side's ranks, then the video side's noise.
    """
    Q, B = _check_scores("S", S, labels, check)
    if B < 2:
        raise ValueError("triplet needs at least 2 videos in the batch to draw negatives")
    if hard_pool < 1:
        raise ValueError(f"hard_pool={hard_pool} must be >= 1")
    pos = _onehot(labels, B)
    rows = torch.arange(Q, device=S.device)
    pos_score = S[rows, labels]
    pool = min(hard_pool, B - 1)
    if pool == 1:
        neg_idx = S.detach().masked_fill(pos, -math.inf).argmax(dim=1)
    else:
        # The reference's draw: rank k in [1, pool] of the row sorted descending, with the
        # positive forced to rank 0.
        k = torch.randint(1, pool + 1, (Q,), generator=generator,
                          device=_gen_device(generator, S)).to(S.device)
        order = S.detach().masked_fill(pos, math.inf).topk(pool + 1, dim=1).indices
        neg_idx = order[rows, k]
    query_side = (margin + S[rows, neg_idx] - pos_score).clamp(min=0).sum() / Q

    counts = pos.sum(dim=0)
    video_pos = (S * pos).sum(dim=0) / counts
    if hard_video:
        video_neg = S.masked_fill(pos, -math.inf).amax(dim=0)
    else:  # argmax of i.i.d. uniform noise over the other videos' queries: a uniform pick
        noise = torch.rand(Q, B, generator=generator,
                           device=_gen_device(generator, S)).to(S.device)
        pick = noise.masked_fill(pos, -1.0).argmax(dim=0)
        video_neg = S[pick, torch.arange(B, device=S.device)]
    video_side = (margin + video_neg - video_pos).clamp(min=0).sum() / B
    return query_side + video_side


def nce(U: Tensor, labels: Tensor, check: bool = True) -> Tensor:
    """InfoNCE with hard targets on raw U (temperature 1), query-to-video plus video-to-query."""
    _check_scores("U", U, labels, check)
    r, c = _hard_rows(U, labels, _onehot(labels, U.shape[1]))
    return r.mean() + c.mean()


def soft_nce(U: Tensor, T: Tensor, labels: Tensor, alpha: float, beta: float,
             check: bool = True) -> Tensor:
    """DL-DKD++ InfoNCE: the first floor(alpha Q) queries / floor(alpha B) videos keep one-hot
    targets, the rest mix (1 - beta) softmax(T) with beta one-hot.

    T is not detached: for the exploration branch T is its own U and the gradient flows through
    the target too, as in the reference. Hard rows use the exact indicator, so alpha = 1 is
    exactly ``nce``; soft video rows keep the reference's log(target + 1e-12).
    """
    Q, B = _check_scores("U", U, labels, check)
    if tuple(T.shape) != (Q, B):
        raise ValueError(f"soft_nce target source T has shape {tuple(T.shape)}, expected "
                         f"{(Q, B)} like U")
    if check:
        _check_finite("T", T)
    if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
        raise ValueError(f"soft_nce needs alpha, beta in [0, 1], got alpha={alpha}, beta={beta}")
    pos = _onehot(labels, B)
    hq, hv = math.floor(alpha * Q), math.floor(alpha * B)
    r_hard, c_hard = _hard_rows(U, labels, pos)
    hard = r_hard[:hq].mean() + c_hard[:hv].mean() if hq and hv else U.new_zeros(())
    soft = U.new_zeros(())
    if hq < Q and hv < B:
        onehot = pos.to(U.dtype)
        target_q = (1 - beta) * torch.softmax(T[hq:], dim=1) + beta * onehot[hq:]
        lse_q = U[hq:].logsumexp(dim=1, keepdim=True)
        r_soft = (target_q * (lse_q - U[hq:])).sum(dim=1)
        target_v = (1 - beta) * torch.softmax(T[:, hv:], dim=0) + beta * onehot[:, hv:]
        u_v = U[:, hv:]
        c_soft = u_v.logsumexp(dim=0) - (torch.log(target_v + 1e-12) + u_v).logsumexp(dim=0)
        soft = r_soft.mean() + c_soft.mean()
    return alpha * hard + (1 - alpha) * soft


def kd(student_cos: Tensor, teacher_cos: Tensor, frame_mask: Tensor, labels: Tensor,
       temp: float, check: bool = True) -> Tensor:
    """Sum over queries of KL(P_T || P_S) over the valid frames of the query's own video."""
    if student_cos.dim() != 3:
        raise ValueError(f"kd student_cos must be (Q, B, L), got {tuple(student_cos.shape)}")
    Q, B, L = student_cos.shape
    _check_labels(labels, Q, B, check)
    if tuple(teacher_cos.shape) != (Q, B, L):
        raise ValueError(f"kd teacher_cos has shape {tuple(teacher_cos.shape)}, expected "
                         f"{(Q, B, L)} like student_cos (teacher frames must be aligned to the "
                         f"student's)")
    if tuple(frame_mask.shape) != (B, L):
        raise ValueError(f"kd frame_mask has shape {tuple(frame_mask.shape)}, expected {(B, L)}")
    if temp <= 0:
        raise ValueError(f"kd temperature must be > 0, got {temp}")
    rows = torch.arange(Q, device=student_cos.device)
    valid = frame_mask[labels] > 0
    if check:
        _check_finite("student_cos", student_cos)
        _check_finite("teacher_cos", teacher_cos)
        if not valid.any(dim=1).all():
            raise ValueError("kd: a query's video has no valid frame in frame_mask")
    s = student_cos[rows, labels].masked_fill(~valid, -math.inf)
    t = teacher_cos[rows, labels].masked_fill(~valid, -math.inf)
    log_ps = torch.log_softmax(s / temp, dim=1)
    log_pt = torch.log_softmax(t / temp, dim=1)
    kl = torch.where(valid, log_pt.exp() * (log_pt - log_ps), 0.0)
    return kl.sum()


def total_loss(scores: dict[str, BranchScores], labels: Tensor, video_mask: Tensor,
               teacher: TeacherTargets | None, cfg: LossConfig, weights: LossWeights,
               generator: torch.Generator | None = None, check: bool = True
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """DL-DKD (``targets="hard"``) or DL-DKD++ (``"soft"``) over the branches present.

    Per branch: trip(S) + nce_weight * nce-or-snce(U); the inheritance branch adds lambda KD and
    takes its soft targets from the teacher's T, the exploration branch from its own U. ``weights``
    (lambda, alpha, beta, hard negatives) come from :func:`trainer.method.schedules.loss_weights`.
    Returns the loss and every unweighted term as a detached 0-dim tensor (read them only when
    logging: each read is a device-to-host sync).
    """
    unknown = set(scores) - {"inh", "exp"}
    if not scores or unknown:
        raise ValueError(f"scores must hold branches 'inh' and/or 'exp', got {sorted(scores)}")
    soft = cfg.targets == "soft"
    kd_on = cfg.kd != "off"
    if "inh" in scores and (soft or kd_on):
        if teacher is None:
            raise ValueError("the inheritance branch needs teacher targets (soft targets or KD "
                             "are on); pass TeacherTargets or set loss.kd=off loss.targets=hard")
        teacher = _check_teacher(teacher, scores["inh"].cos.shape)
        if cfg.shuffle_teacher:
            perm = torch.randperm(teacher.T.shape[0], generator=generator,
                                  device=_gen_device(generator, teacher.T)).to(teacher.T.device)
            teacher = TeacherTargets(tau=teacher.tau[perm], T=teacher.T[perm])
    B = next(iter(scores.values())).S.shape[1]
    pool = cfg.hard_pool if weights.hard_negatives else B - 1

    terms: dict[str, Tensor] = {}
    loss = None
    for name, sc in scores.items():
        trip = triplet(sc.S, labels, cfg.margin, pool, generator, weights.hard_negatives, check)
        if soft:
            source = teacher.T if name == "inh" else sc.U
            contrast = soft_nce(sc.U, source, labels, weights.alpha, weights.beta, check)
        else:
            contrast = nce(sc.U, labels, check)
        branch = trip + cfg.nce_weight * contrast
        terms[f"{name}_trip"], terms[f"{name}_nce"] = trip, contrast
        if name == "inh" and kd_on:
            distill = kd(sc.cos, teacher.tau, video_mask, labels, cfg.kd_temp, check)
            branch = branch + weights.kd * distill
            terms["inh_kd"] = distill
        loss = branch if loss is None else loss + branch
    terms["loss"] = loss
    return loss, {k: v.detach() for k, v in terms.items()}


def _hard_rows(U: Tensor, labels: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """Per-query r_i = LSE_j U(i, j) - U(i, p(i)) and per-video c_j = LSE_i U - LSE_{pos(j)} U."""
    r = U.logsumexp(dim=1) - U[torch.arange(U.shape[0], device=U.device), labels]
    c = U.logsumexp(dim=0) - U.masked_fill(~pos, -math.inf).logsumexp(dim=0)
    return r, c


def _onehot(labels: Tensor, B: int) -> Tensor:
    return F.one_hot(labels, B).bool()


def _gen_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def _check_labels(labels: Tensor, Q: int, B: int, check: bool = True) -> None:
    if labels.dtype != torch.long or tuple(labels.shape) != (Q,):
        raise ValueError(f"labels must be a LongTensor of shape ({Q},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if Q == 0 or B == 0:
        raise ValueError(f"empty batch: {Q} queries, {B} videos")
    if not check:
        return
    low, high = labels.min().item(), labels.max().item()
    if low < 0 or high >= B:
        raise ValueError(f"labels out of range: values in [{low}, {high}] but the batch has "
                         f"{B} videos (allowed 0..{B - 1})")
    if torch.bincount(labels, minlength=B).eq(0).any():
        raise ValueError("every batch video needs at least one query (collate batches by video "
                         "with all their captions)")


def _check_scores(name: str, X: Tensor, labels: Tensor, check: bool = True) -> tuple[int, int]:
    if X.dim() != 2:
        raise ValueError(f"{name} must be (Q, B), got shape {tuple(X.shape)}")
    Q, B = X.shape
    _check_labels(labels, Q, B, check)
    if check:
        _check_finite(name, X)
    return Q, B


def _check_finite(name: str, X: Tensor) -> None:
    if torch.isnan(X).any():
        raise ValueError(f"{name} contains NaN (diverged model or bad features upstream)")


def _check_teacher(teacher: TeacherTargets, cos_shape: torch.Size) -> TeacherTargets:
    if tuple(teacher.tau.shape) != tuple(cos_shape):
        raise ValueError(f"teacher tau has shape {tuple(teacher.tau.shape)}, expected "
                         f"{tuple(cos_shape)} (Q, B, L) like the student's frame cosines")
    if tuple(teacher.T.shape) != tuple(cos_shape[:2]):
        raise ValueError(f"teacher T has shape {tuple(teacher.T.shape)}, expected "
                         f"{tuple(cos_shape[:2])} (Q, B)")
    return teacher

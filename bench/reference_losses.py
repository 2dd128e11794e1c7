"""The benchmark baseline: one DL-DKD++ training step done the way the reference code does it.

HuiGuanLab/DL-DKD encodes every padded position with an explicit attention softmax, scores each
branch twice (normalised and raw einsum into a (Q, L, B) tensor), loops in Python over videos
(triplet and InfoNCE video sides) and over queries (KD), deep-copies the score matrix to pick
query-side negatives, and runs every step under ``torch.autograd.detect_anomaly``. This file
mirrors that cost structure, written from method.md §3 and 5 on the student's own parameters, so that
bench.step can time it beside ours on the same inputs. It is not used in training.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sharding.batch import Batch
from trainer.config import LossConfig
from trainer.method.losses import TeacherTargets
from trainer.method.schedules import kd_weight, soft_alpha, soft_beta


def _mask_logits(x: Tensor, mask: Tensor) -> Tensor:
    return x * mask + (1 - mask) * -1e10


def _input(layer, x: Tensor) -> Tensor:
    """The reference's LinearLayer + TrainablePositionalEncoding, over every padded position."""
    h = F.relu(layer.proj(layer.drop(layer.in_norm(x))))
    n, length = x.shape[:2]
    positions = torch.arange(length).unsqueeze(0).repeat(n, 1)
    return layer.drop(layer.pos_norm(h + layer.pos(positions)))


def _attention(block, x: Tensor, mask: Tensor) -> Tensor:
    """The reference's BertSelfAttention + BertSelfOutput: explicit softmax, -10000 additive mask."""
    n, length, d = x.shape
    heads = block.heads

    def split(t: Tensor) -> Tensor:
        return t.view(n, length, heads, d // heads).permute(0, 2, 1, 3)

    att = torch.matmul(split(block.q(x)), split(block.k(x)).transpose(-1, -2)) / math.sqrt(d // heads)
    att = att + (1 - mask.unsqueeze(1).unsqueeze(1)) * -10000.0
    probs = F.dropout(torch.softmax(att, dim=-1), block.p, block.training)
    ctx = torch.matmul(probs, split(block.v(x))).permute(0, 2, 1, 3).contiguous().view(n, length, d)
    return block.norm(block.drop(block.out(ctx)) + x)


def encode(branch, batch: Batch) -> tuple[Tensor, Tensor]:
    """(queries (Q, d), frames (B, L, d)) of one student branch, computed as the reference does."""
    h = _attention(branch.query_attn, _input(branch.query_in, batch.query_feats), batch.query_mask)
    att = torch.softmax(_mask_logits(branch.query_pool(h), batch.query_mask.unsqueeze(2)), dim=1)
    q = torch.einsum("blm,bld->bmd", att, h).squeeze()
    v = _attention(branch.video_attn, _input(branch.video_in, batch.video_feats), batch.video_mask)
    return q, branch.video_out(v)


def scores(q: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cosine max (Q, B), frame cosines (Q, L, B), raw dot max (Q, B)), two einsums."""
    m = mask.transpose(0, 1).unsqueeze(0)
    cos = _mask_logits(torch.einsum("md,nld->mln", F.normalize(q, dim=-1),
                                    F.normalize(v, dim=-1)), m)
    raw = _mask_logits(torch.einsum("md,nld->mln", q, v), m)
    return cos.max(dim=1)[0], cos, raw.max(dim=1)[0]


def triplet(S: Tensor, labels: list[int], margin: float, hard_pool: int,
            generator: torch.Generator | None) -> Tensor:
    lab = np.array(labels)
    St = S.t()
    video_loss = 0
    for j in range(St.shape[0]):
        pos = torch.mean(St[j][np.where(lab == j)[0]])
        neg, _ = torch.sort(St[j][np.where(lab != j)[0]], descending=True)
        video_loss = video_loss + (margin + neg[0] - pos).clamp(min=0).sum()
    rows = torch.arange(S.shape[0])
    pos_scores = S[rows, lab]
    masked = copy.deepcopy(S.data)
    masked[rows, lab] = 999
    _, order = torch.sort(masked, descending=True, dim=1)
    high = min(1 + hard_pool, S.shape[1])
    picks = order[rows, torch.randint(1, high, (S.shape[0],), generator=generator)]
    query_loss = (margin + S[rows, picks] - pos_scores).clamp(min=0)
    return query_loss.sum() / len(S) + video_loss / len(St)


def soft_nce(labels: list[int], U: Tensor, sims: Tensor, alpha: float, beta: float) -> Tensor:
    label_dict: dict[int, list[int]] = {}
    for i, j in enumerate(labels):
        label_dict.setdefault(j, []).append(i)
    Q, B = U.shape
    hq, hv = math.floor(alpha * Q), math.floor(alpha * B)
    eye = torch.zeros(Q, B)
    for j, queries in label_dict.items():
        eye[queries, j] = 1
    tq = eye.clone()
    tq[hq:] = torch.clamp((1 - beta) * torch.softmax(sims, dim=-1)[hq:] + beta * tq[hq:], min=0)
    tv = eye.t().clone()
    tv[hv:] = torch.clamp((1 - beta) * torch.softmax(sims.t(), dim=-1)[hv:] + beta * tv[hv:], min=0)
    lse = torch.logsumexp(U, dim=1, keepdim=True)
    t2v_hard = (tq[:hq] * lse[:hq]).sum() - (tq[:hq] * U[:hq]).sum()
    t2v_soft = (tq[hq:] * lse[hq:]).sum() - (tq[hq:] * U[hq:]).sum()
    v2t_hard = torch.zeros(1)
    v2t_soft = torch.zeros(1)
    for j in label_dict:
        c = torch.logsumexp(U[:, j], dim=0) - torch.logsumexp(torch.log(tv[j] + 1e-12) + U[:, j],
                                                               dim=0)
        if j < hv:
            v2t_hard = v2t_hard + c
        else:
            v2t_soft = v2t_soft + c
    hard = soft = 0.0
    if hq and hv:
        hard = t2v_hard / hq + v2t_hard / hv
    if Q - hq and B - hv:
        soft = t2v_soft / (Q - hq) + v2t_soft / (B - hv)
    return (alpha * hard + (1 - alpha) * soft).squeeze()


def kd(cos_qlb: Tensor, tau_qlb: Tensor, mask: Tensor, labels: list[int], temp: float) -> Tensor:
    predict = torch.stack([cos_qlb[i, :, j] for i, j in enumerate(labels)])
    target = torch.stack([tau_qlb[i, :, j] for i, j in enumerate(labels)])
    qmask = mask[labels]
    loss = 0
    for i in range(predict.shape[0]):
        n = torch.nonzero(qmask[i] > 0).shape[0]
        loss = loss + F.kl_div(F.log_softmax(predict[i, :n] / temp, dim=-1),
                               F.softmax(target[i, :n] / temp, dim=-1), reduction="sum")
    return loss


def total_loss(model, batch: Batch, teacher: TeacherTargets, cfg: LossConfig, epoch: int,
               generator: torch.Generator | None) -> Tensor:
    """Dual-branch DL-DKD++ (soft targets, dynamic KD) with the student's weights."""
    labels = batch.labels.tolist()
    alpha, beta = soft_alpha(epoch, cfg), soft_beta(epoch, cfg)
    tau_qlb = teacher.tau.permute(0, 2, 1)
    S_inh, cos_inh, U_inh = scores(*encode(model.branches["inh"], batch), batch.video_mask)
    S_exp, _, U_exp = scores(*encode(model.branches["exp"], batch), batch.video_mask)
    inh = (triplet(S_inh, labels, cfg.margin, cfg.hard_pool, generator)
           + cfg.nce_weight * soft_nce(labels, U_inh, teacher.T, alpha, beta)
           + kd_weight(epoch, cfg)
           * kd(cos_inh, tau_qlb, batch.video_mask, labels, cfg.kd_temp))
    exp = (triplet(S_exp, labels, cfg.margin, cfg.hard_pool, generator)
           + cfg.nce_weight * soft_nce(labels, U_exp, U_exp, alpha, beta))
    return inh + exp


def step(model, optimizer, batch: Batch, teacher: TeacherTargets, cfg: LossConfig, epoch: int,
         generator: torch.Generator | None) -> float:
    """One optimiser step under anomaly detection, as the reference trains every epoch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.detect_anomaly():
            optimizer.zero_grad()
            loss = total_loss(model, batch, teacher, cfg, epoch, generator)
            loss.backward()
            optimizer.step()
    return loss.item()

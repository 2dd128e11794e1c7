"""The teacher's targets from its embeddings (method.md §4): tau (Q, B, L) and T (Q, B).

Pure tensor maths, shared by the online teacher and the shards' pre-extracted embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.method.losses import PAD_SCORE, TeacherTargets


def similarity_targets(text: Tensor, frames: Tensor, mask: Tensor,
                       logit_scale: float | None = None) -> TeacherTargets:
    """tau(i, j, l) = cos(t_i, f_jl) (padded frames = PAD_SCORE); T(i, j) = max_l t_i . f_jl raw.

    With ``logit_scale`` T is ``logit_scale * max_l cos(t_i, f_jl)`` instead (CLIP's own scale on
    normalised embeddings), the documented alternative to the raw, model-dependent dot product.
    """
    if text.dim() != 2 or frames.dim() != 3 or text.shape[1] != frames.shape[2]:
        raise ValueError(f"teacher embeddings do not fit: text {tuple(text.shape)} (Q, D), "
                         f"frames {tuple(frames.shape)} (B, L, D)")
    if tuple(mask.shape) != tuple(frames.shape[:2]):
        raise ValueError(f"frame mask {tuple(mask.shape)} does not match the teacher frames "
                         f"{tuple(frames.shape[:2])} (B, L)")
    t, f = text.float(), frames.float()
    pad = ~(mask > 0)[None]
    tau = torch.einsum("qd,bld->qbl", F.normalize(t, dim=-1), F.normalize(f, dim=-1))
    tau = tau.masked_fill(pad, PAD_SCORE)
    if logit_scale is None:
        raw = torch.einsum("qd,bld->qbl", t, f).masked_fill(pad, PAD_SCORE)
        return TeacherTargets(tau=tau, T=raw.amax(dim=-1))
    return TeacherTargets(tau=tau, T=logit_scale * tau.amax(dim=-1))

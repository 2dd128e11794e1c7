"""The dual-branch student of method.md §3: an inheritance and an exploration branch of identical shape.

Each branch encodes queries to one vector (self-attention, then attention pooling) and videos to
one vector per frame; a query-video score is the best frame. The cosine max S drives the triplet
loss, KD and evaluation; the raw dot max U drives InfoNCE.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharding.batch import Batch
from trainer.config import ModelConfig
from trainer.method.dropout import Dropout
from trainer.method.losses import PAD_SCORE, BranchScores

BRANCHES: dict[str, tuple[str, ...]] = {
    "dual": ("inh", "exp"),
    "inheritance": ("inh",),
    "exploration": ("exp",),
}


class _InputLayer(nn.Module):
    """LayerNorm -> Dropout -> Linear -> ReLU, then + positional embedding -> LayerNorm -> Dropout.

    The projection, the costliest op of a step, runs on the valid rows only (see ``_Packed``):
    padded positions start from zero instead of from the projection of a zero input, which
    changes nothing downstream since they are masked as attention keys and in every score.
    """

    def __init__(self, in_dim: int, hidden: int, positions: int, drop: float):
        super().__init__()
        self.in_norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, hidden)
        self.pos = nn.Embedding(positions, hidden)
        self.pos_norm = nn.LayerNorm(hidden)
        self.drop = Dropout(drop)

    def forward(self, x: _Packed) -> Tensor:
        rows = F.relu(self.proj(self.drop(self.in_norm(x.rows))))
        n, length = x.shape
        h = rows.new_zeros(n * length, rows.shape[1]).index_copy(0, x.index, rows)
        # Call the embedding (not .weight): ZeRO-3 gathers a module's parameters in its forward.
        h = h.view(n, length, -1) + self.pos(torch.arange(length, device=rows.device))
        return self.drop(self.pos_norm(h))


class _Packed(NamedTuple):
    """The valid rows of a padded (N, L, D) input, gathered once and shared by both branches."""

    rows: Tensor   # (n_valid, D)
    index: Tensor  # (n_valid,) flat positions in N * L
    shape: tuple[int, int]

    @staticmethod
    def of(feats: Tensor, mask: Tensor, index: Tensor | None = None) -> _Packed:
        """``index``: the valid positions if known (collate computes them on the host, so the
        training step needs no ``nonzero``, which is a device-to-host sync)."""
        n, length, d = feats.shape
        if index is None:
            index = mask.reshape(-1).nonzero().squeeze(1)
        return _Packed(feats.reshape(n * length, d).index_select(0, index), index, (n, length))


class _SelfAttention(nn.Module):
    """One multi-head self-attention block over valid keys, no feed-forward layer (BertAttention)."""

    def __init__(self, hidden: int, heads: int, drop: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.p = drop
        self.drop = Dropout(drop)

    def _split(self, x: Tensor) -> Tensor:
        n, length, d = x.shape
        return x.view(n, length, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        keep = mask.bool()[:, None, None, :]  # (N, 1, 1, L): every query position sees valid keys
        ctx = F.scaled_dot_product_attention(
            self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x)),
            attn_mask=keep, dropout_p=self.p if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        return self.norm(x + self.drop(self.out(ctx)))


class _Branch(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden
        self.query_in = _InputLayer(cfg.query_dim, d, cfg.max_words, cfg.input_drop)
        self.query_attn = _SelfAttention(d, cfg.heads, cfg.drop)
        self.query_pool = nn.Linear(d, 1, bias=False)
        self.video_in = _InputLayer(cfg.video_dim, d, cfg.max_frames, cfg.input_drop)
        self.video_attn = _SelfAttention(d, cfg.heads, cfg.drop)
        self.video_out = nn.Linear(d, d)

    def encode_queries(self, feats: _Packed, mask: Tensor) -> Tensor:
        h = self.query_attn(self.query_in(feats), mask)
        logits = self.query_pool(h).squeeze(-1).masked_fill(mask == 0, PAD_SCORE)
        return torch.einsum("nt,ntd->nd", torch.softmax(logits, dim=1), h)

    def encode_videos(self, feats: _Packed, mask: Tensor) -> Tensor:
        return self.video_out(self.video_attn(self.video_in(feats), mask))


def branch_scores(q: Tensor, v: Tensor, video_mask: Tensor) -> BranchScores:
    """Frame cosines, S (cosine max) and U (raw dot max) from one raw dot product, in float32
    whatever the encoders' precision (the loss reads them as they are).

    cos = dot / (|q| |v|) equals normalise-then-dot (F.normalize's eps 1e-12 kept), so one
    (Q, B, L) product serves both scores.
    """
    q, v = q.float(), v.float()
    # Under bf16 autocast (trainer/engine.PlainEngine) the product would run in bf16 again.
    kind = q.device.type
    off = torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else nullcontext()
    with off:
        dots = torch.einsum("qd,bld->qbl", q, v)
    q_norm = q.norm(dim=-1).clamp_min(1e-12)
    v_norm = v.norm(dim=-1).clamp_min(1e-12)
    pad = (video_mask == 0)[None]
    cos = (dots / (q_norm[:, None, None] * v_norm[None])).masked_fill(pad, PAD_SCORE)
    U = dots.masked_fill(pad, PAD_SCORE).amax(dim=-1)
    return BranchScores(cos=cos, S=cos.amax(dim=-1), U=U)


class DualStudent(nn.Module):
    """Both branches (or one, for the ablations), each with its own weights."""

    def __init__(self, cfg: ModelConfig, check_inputs: bool = True):
        """``check_inputs``: also reject NaN features and empty masks, at the price of a
        device-to-host sync per call (training validates its inputs in collate instead)."""
        super().__init__()
        if cfg.branches not in BRANCHES:
            raise ValueError(f"model.branches={cfg.branches!r}; choose one of {list(BRANCHES)}")
        if cfg.hidden % cfg.heads:
            raise ValueError(f"model.hidden={cfg.hidden} is not divisible by model.heads={cfg.heads}")
        self.cfg = cfg
        self.check_inputs = check_inputs
        self.branch_names: tuple[str, ...] = BRANCHES[cfg.branches]
        self.branches = nn.ModuleDict({name: _Branch(cfg) for name in self.branch_names})
        self.apply(_init_weights)

    def encode_queries(self, feats: Tensor, mask: Tensor, index: Tensor | None = None
                       ) -> dict[str, Tensor]:
        _check_input("query", feats, mask, self.cfg.query_dim, self.cfg.max_words,
                     "model.max_words", self.check_inputs)
        packed = _Packed.of(feats, mask, index)
        return {name: b.encode_queries(packed, mask) for name, b in self.branches.items()}

    def encode_videos(self, feats: Tensor, mask: Tensor, index: Tensor | None = None
                      ) -> dict[str, Tensor]:
        _check_input("video", feats, mask, self.cfg.video_dim, self.cfg.max_frames,
                     "model.max_frames", self.check_inputs)
        packed = _Packed.of(feats, mask, index)
        return {name: b.encode_videos(packed, mask) for name, b in self.branches.items()}

    def forward(self, batch: Batch) -> dict[str, BranchScores]:
        queries = self.encode_queries(batch.query_feats, batch.query_mask, batch.query_rows)
        videos = self.encode_videos(batch.video_feats, batch.video_mask, batch.video_rows)
        return {name: branch_scores(queries[name], videos[name], batch.video_mask)
                for name in self.branch_names}


def _init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for Linear/Embedding weights, zero biases, LayerNorm (1, 0), as the reference."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_input(kind: str, feats: Tensor, mask: Tensor, dim: int, max_len: int, len_key: str,
                 values: bool = True) -> None:
    """Reject inputs that would otherwise give silent garbage (wrong dims, empty, NaN, no frames)."""
    if feats.dim() != 3:
        raise ValueError(f"{kind} features must be (N, L, D), got shape {tuple(feats.shape)}")
    n, length, d = feats.shape
    if d != dim:
        key = "model.video_dim" if kind == "video" else "model.query_dim"
        raise ValueError(f"{kind} feature dim mismatch: expected {key}={dim}, got {d}; "
                         f"set {key} to the features' dimension")
    if n == 0 or length == 0:
        raise ValueError(f"empty {kind} batch: features have shape {tuple(feats.shape)}")
    if length > max_len:
        raise ValueError(f"{kind} length {length} exceeds {len_key}={max_len} (positional "
                         f"embeddings); cap the input or raise {len_key}")
    if tuple(mask.shape) != (n, length):
        raise ValueError(f"{kind} mask shape {tuple(mask.shape)} does not match features "
                         f"{tuple(feats.shape)}: expected ({n}, {length})")
    if not values:
        return
    empty = (mask.sum(dim=1) == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{kind} rows {empty[:5].tolist()} have no valid "
                         f"{'frame' if kind == 'video' else 'token'} (all-zero mask)")
    if torch.isnan(feats).any():
        raise ValueError(f"{kind} features contain NaN")

"""The frozen open_clip teacher (method.md §4): per-batch similarity targets tau (Q, B, L) and T (Q, B).

Online (``replicated`` or ``zero3``, trainer/teacher/placement.py) from the weights that
trainer/teacher/weights.py resolves, or ``precomputed`` (embeddings read from the batch). Under
``zero3`` every forward is a collective: each rank runs the same number of text and image chunks
per call, padding with a dummy chunk when it has fewer (a short last batch, or frames all served
by its cache).
"""
from __future__ import annotations


import hashlib
import json
import math
import re
from typing import Callable

import open_clip
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from sharding.batch import Batch
from trainer import dist
from trainer.config import TeacherConfig
from trainer.method.losses import TeacherTargets
from trainer.teacher.cache import FrameEmbeddingCache
from trainer.teacher.placement import build_replicated, build_zero3, rank
from trainer.method.targets import similarity_targets
from trainer.teacher.transform import preprocess_frames
from trainer.teacher.weights import HF_HUB, TeacherError, WeightSource, resolve_weights

# CLIP's trained logit scale (open_clip clamps exp(logit_scale) to it); used for
# ``logit_scale_targets`` when only pre-extracted embeddings are available.
PRECOMPUTED_LOGIT_SCALE = 100.0


def teacher_identity(cfg: TeacherConfig, source: WeightSource, preprocess: dict,
                     weights_sha: str, dtype: torch.dtype) -> str:
    """arch + a hash of everything that changes a frame embedding: the cache namespace."""
    hub = source.model_name.startswith(HF_HUB)
    described = json.dumps({"arch": source.model_name, "preprocess": preprocess,
                            "config": None if hub else open_clip.get_model_config(cfg.arch),
                            "weights": weights_sha, "dtype": str(dtype)},
                           sort_keys=True, default=str)
    digest = hashlib.sha256(described.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', source.model_name)}-{digest}"


class Teacher:
    """Frozen CLIP: ``targets(batch)`` once per step on every rank (see the module docstring)."""

    def __init__(self, cfg: TeacherConfig, *, device: torch.device, forward: nn.Module | None = None,
                 clip: nn.Module | None = None, tokenizer: Callable | None = None,
                 preprocess: dict | None = None, dtype: torch.dtype = torch.float32,
                 logit_scale: float = PRECOMPUTED_LOGIT_SCALE, identity: str = "precomputed",
                 cache: FrameEmbeddingCache | None = None, collective: bool = False,
                 embed_dim: int = 0):
        self.cfg = cfg
        self.device = device
        self.forward = forward
        self.clip = clip
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.dtype = dtype
        self.logit_scale = logit_scale
        self.identity = identity
        self.cache = cache
        self.collective = collective
        self.embed_dim = embed_dim
        self.calls = {"text": 0, "image": 0}   # forward calls per tower (equal on every rank)

    @torch.no_grad()
    def targets(self, batch: Batch) -> TeacherTargets:
        text = self.text_embeddings(batch)
        frames = self.frame_embeddings(batch)
        scale = self.logit_scale if self.cfg.logit_scale_targets else None
        return similarity_targets(text, frames, batch.video_mask.to(self.device), scale)

    @torch.no_grad()
    def text_embeddings(self, batch: Batch) -> Tensor:
        """(Q, D) raw text embeddings of the batch's captions (float32)."""
        if self.forward is None:
            if batch.teacher_text_emb is None:
                raise TeacherError("teacher.placement='precomputed' but the batch has no "
                                   "teacher_text_emb: write shards with pre-extracted CLIP text "
                                   "embeddings, or use placement 'replicated'/'zero3'")
            return batch.teacher_text_emb.to(self.device, torch.float32)
        tokens = self.tokenizer(list(batch.captions))
        return self._encode("text", tokens, lambda t: t.to(self.device, non_blocking=True))

    @torch.no_grad()
    def frame_embeddings(self, batch: Batch) -> Tensor:
        """(B, L, D) raw frame embeddings aligned to the student's frames (zeros where padded),
        float32 on the teacher's device.

        Each distinct (video, teacher frame) is encoded once per batch, or not at all when the
        cache has it. Which frames those are is worked out on the host from ``teacher_index``
        (collate's, never moved: the cache keys are host strings); only the frames to encode go
        to the device, and the gathers and scatters of embeddings happen there."""
        if self.forward is None:
            if batch.teacher_frame_emb is None:
                raise TeacherError("teacher.placement='precomputed' but the batch has no "
                                   "teacher_frame_emb: write shards with pre-extracted CLIP frame "
                                   "embeddings, or use placement 'replicated'/'zero3'")
            emb = batch.teacher_frame_emb.to(self.device, torch.float32)
            return emb * (batch.video_mask.to(self.device) > 0)[..., None]
        if batch.teacher_frames is None:
            raise TeacherError("the batch has no teacher_frames (raw RGB frames): write shards "
                               "with teacher frames, or use teacher.placement='precomputed' with "
                               "pre-extracted embeddings")
        index = batch.teacher_index.cpu()   # -1 at padded positions (collate)
        jj, ll = (index >= 0).nonzero(as_tuple=True)
        kk = index[jj, ll]
        key = jj * (int(kk.max()) + 1 if len(kk) else 1) + kk
        uniq, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((len(uniq),), len(key), dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(len(key)), "amin")
        keys = [(batch.video_ids[j], k) for j, k in zip(jj[first].tolist(), kk[first].tolist())]
        emb = torch.zeros(len(keys), self.embed_dim, device=self.device)
        found = torch.zeros(len(keys), dtype=torch.bool)
        if self.cache is not None:
            cached, found = self.cache.lookup(keys, self.embed_dim)
            hit = found.nonzero().flatten()
            if len(hit):
                emb[_on(hit, self.device)] = _on(cached[hit], self.device)
        todo = (~found).nonzero().flatten()
        pixels = batch.teacher_frames.cpu()[jj[first][todo], ll[first][todo]]
        new = self._encode("image", pixels, self._prepare_images)
        if len(todo):
            emb[_on(todo, self.device)] = new
            if self.cache is not None:  # the one device-to-host copy of a step with the cache on
                self.cache.put([keys[i] for i in todo.tolist()], new.cpu())
        out = torch.zeros(*index.shape, self.embed_dim, device=self.device)
        out[_on(jj, self.device), _on(ll, self.device)] = emb[_on(inverse, self.device)]
        return out

    def _prepare_images(self, pixels: Tensor) -> Tensor:
        return preprocess_frames(_on(pixels, self.device), self.preprocess).to(self.dtype)

    def _encode(self, tower: str, inputs: Tensor, prepare: Callable[[Tensor], Tensor]) -> Tensor:
        """Encode in chunks of teacher.image_batch; under zero3 every rank runs the same number
        of chunks (the max over ranks), feeding a one-item dummy when it has run out."""
        chunk = self.cfg.image_batch
        n = math.ceil(len(inputs) / chunk)
        if self.collective:
            count = torch.tensor([n], dtype=torch.int64, device=dist.comm_device())
            torch_dist.all_reduce(count, op=torch_dist.ReduceOp.MAX)
            n = int(count.item())
        outs = []
        for c in range(n):
            part = inputs[c * chunk:(c + 1) * chunk]
            dummy = len(part) == 0
            x = prepare(self._dummy(tower) if dummy else part)
            y = self.forward(image=x) if tower == "image" else self.forward(text=x)
            self.calls[tower] += 1
            if not dummy:
                outs.append(y.float())
        if not outs:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(outs)

    def _dummy(self, tower: str) -> Tensor:
        if tower == "text":
            return self.tokenizer([""])
        size = self.preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        return torch.zeros(1, h, w, 3, dtype=torch.uint8)


def _on(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the teacher's device without making the host wait (no sync)."""
    return t.to(device, non_blocking=True)


def build_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> Teacher:
    """The teacher for this rank. ``zero3`` is collective: call it on every rank together."""
    device = torch.device(device)
    if cfg.placement == "precomputed":
        return Teacher(cfg, device=device)
    if cfg.placement not in ("replicated", "zero3"):
        raise TeacherError(f"teacher.placement={cfg.placement!r}: choose replicated, zero3 or "
                           f"precomputed")
    zero3 = cfg.placement == "zero3"
    source = resolve_weights(cfg, download=not zero3 or rank() == 0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    build = build_zero3 if zero3 else build_replicated
    clip, forward, sha = build(source, device, dtype)
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    if zero3:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([clip.logit_scale]):
            logit_scale = float(clip.logit_scale.float().exp().item())
    else:
        logit_scale = float(clip.logit_scale.float().exp().item())
    identity = teacher_identity(cfg, source, preprocess, sha, dtype)
    cache = (FrameEmbeddingCache(identity, cfg.cache_mem_mb << 20, cfg.cache_dir or None)
             if cfg.cache else None)
    tokenizer = open_clip.get_tokenizer(source.model_name)
    with torch.no_grad():  # on every rank: a collective under zero3
        embed_dim = forward(text=tokenizer([""]).to(device)).shape[-1]
    return Teacher(cfg, device=device, forward=forward, clip=clip, tokenizer=tokenizer,
                   preprocess=preprocess, dtype=dtype, logit_scale=logit_scale,
                   identity=identity, cache=cache, collective=zero3, embed_dim=embed_dim)

"""The frozen open_clip model on this rank: ``replicated`` (a full copy per rank) or ``zero3``.

Under ``zero3`` DeepSpeed ZeRO-3 partitions the parameters over the data-parallel ranks: the
model is built partitioned inside ``zero.Init`` and its weights are loaded parameter by parameter
from rank 0. Each build returns the model, the module whose forward encodes (the DeepSpeed engine
under ``zero3``: its forward gathers the parameters) and the sha256 that names the weights.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Callable

import open_clip
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from sharding.writer import sha256_file
from trainer.teacher.weights import TeacherError, WeightSource, fit_state_dict, read_state_dict


class RawFeatures(nn.Module):
    """One forward per tower returning RAW (unnormalised) embeddings: method.md §4's T needs them, and
    under ZeRO-3 the engine's forward is what gathers the parameters."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        if image is not None:
            return self.clip.encode_image(image)
        return self.clip.encode_text(text)


def zero3_config(bf16: bool) -> dict:
    """DeepSpeed config of the frozen, partitioned teacher (no optimizer; every parameter is
    partitioned, none kept whole as a small 'persistent' one)."""
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": bf16}}


def create_clip(source: WeightSource, device: torch.device) -> nn.Module:
    """The architecture without weights (they are loaded and checked here, not by open_clip).
    open_clip's "No pretrained weights loaded ... initialized randomly" is true only without a
    checkpoint; when one is loaded next it would mislead, so it is dropped then."""
    drop = _RandomInitWarning() if source.checkpoint else None
    root = logging.getLogger()
    if drop:
        root.addFilter(drop)
    try:
        return open_clip.create_model(source.model_name, pretrained=None, load_weights=False,
                                      device=device, force_preprocess_cfg=source.preprocess,
                                      nonscalar_logit_scale=True)
    finally:
        if drop:
            root.removeFilter(drop)


class _RandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def build_replicated(source: WeightSource, device: torch.device, dtype: torch.dtype
                     ) -> tuple[nn.Module, nn.Module, str]:
    clip = create_clip(source, torch.device("cpu"))
    if source.checkpoint:
        shapes = {k: v.shape for k, v in clip.state_dict().items()}
        sd = fit_state_dict(read_state_dict(source.checkpoint), shapes,
                            f"teacher checkpoint {source.checkpoint}")
        clip.load_state_dict(sd, strict=True)
        sha = sha256_file(source.checkpoint)
    else:
        sha = _params_sha(clip, gather=None)
    clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return clip, RawFeatures(clip), sha


def build_zero3(source: WeightSource, device: torch.device, dtype: torch.dtype
                ) -> tuple[nn.Module, nn.Module, str]:
    import deepspeed
    from deepspeed.runtime.zero import GatheredParameters, register_external_parameter

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise TeacherError("teacher.placement='zero3' needs the process group: run under Ray "
                           "Train or a launcher and call trainer.dist.init() first, or use "
                           "'replicated'")
    ds_cfg = zero3_config(bf16=dtype == torch.bfloat16)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        clip = create_clip(source, device)
    this_rank = rank()
    # Rank 0 alone reads the weights; every rank must take the same branch below.
    status: list = [None, "", False]   # error, weights sha256, has a checkpoint
    sd: dict[str, Tensor] = {}
    buffers = [n for n in clip.state_dict() if n not in dict(clip.named_parameters())]
    if this_rank == 0 and source.checkpoint:
        shapes = {n: p.ds_shape for n, p in clip.named_parameters()}
        shapes.update({n: b.shape for n, b in clip.named_buffers() if n in buffers})
        try:
            sd = fit_state_dict(read_state_dict(source.checkpoint), shapes,
                                f"teacher checkpoint {source.checkpoint}")
            status = [None, sha256_file(source.checkpoint), True]
        except TeacherError as err:
            status = [str(err), "", True]
    torch_dist.broadcast_object_list(status, src=0)
    error, sha, has_checkpoint = status
    if error:
        raise TeacherError(error)
    if has_checkpoint:
        for name, p in clip.named_parameters():
            with GatheredParameters([p], modifier_rank=0):
                if this_rank == 0:
                    p.data.copy_(sd[name])
        named = dict(clip.named_buffers())
        for name in buffers:
            if this_rank == 0:
                named[name].copy_(sd[name])
            torch_dist.broadcast(named[name], src=0)
    else:
        sha = _params_sha(clip, gather=GatheredParameters)
    del sd
    clip.eval().requires_grad_(False)
    features = RawFeatures(clip)
    for p in clip.parameters(recurse=False):
        register_external_parameter(features, p)
    engine, *_ = deepspeed.initialize(model=features, config=ds_cfg)
    engine.eval()
    return clip, engine, sha


def _params_sha(model: nn.Module, gather: Callable | None) -> str:
    """sha256 over every parameter (gathered one by one under ZeRO-3): random-init identity."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if gather is None:
            h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
            continue
        with gather([p]):
            h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def param_fraction(model: nn.Module) -> float:
    """Parameters held by this rank / parameters of the model (1.0 unless ZeRO-3 partitioned)."""
    held = total = 0
    for p in model.parameters():
        full = getattr(p, "ds_numel", p.numel())
        total += full
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return held / max(total, 1)

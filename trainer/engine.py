"""The student under a DeepSpeed engine, or under a plain engine with the same few methods.

Both expose ``module``, ``__call__``, ``backward(loss)``, ``step()``, ``get_lr()``,
``save_checkpoint(dir, tag, client_state)`` and ``load_checkpoint(dir, tag)``, so the training loop
reads the same with or without DeepSpeed (the single-process baseline of ``bench.scale`` and the
unit tests use the plain one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharding.files import atomic_path
from trainer.checkpoint import load_weights_only, weights_only_resume
from trainer.config import Config
from trainer.method.optim import build_optimizer, build_scheduler


def per_tensor_clip(cfg: Config) -> bool:
    """BERT-Adam's per-tensor clip needs real tensors: only fp32 ZeRO-0 hands them over."""
    return cfg.optim.name == "bert_adam" and cfg.dist.zero_stage == 0 and cfg.dist.precision == "fp32"


def ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run, derived from ours (one source of truth)."""
    micro = cfg.data.batch_videos
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.dist.grad_accum,
        "train_batch_size": micro * cfg.dist.grad_accum * world_size,
        "gradient_clipping": 0.0 if per_tensor_clip(cfg) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.dist.precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.dist.zero_stage == 3:
        conf["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                          "stage3_gather_16bit_weights_on_model_save": True})
    return conf


def build_engine(cfg: Config, model: nn.Module, total_steps: int, world_size: int,
                 use_deepspeed: bool = True):
    # Without DeepSpeed the optimizer always sees the real float32 tensors.
    optimizer = build_optimizer(model, cfg.optim,
                                per_tensor_clip=per_tensor_clip(cfg) or not use_deepspeed)
    # The schedule advances once per optimizer step, i.e. per grad_accum micro-steps.
    scheduler = build_scheduler(optimizer, max(total_steps // cfg.dist.grad_accum, 1),
                                cfg.optim.warmup)
    if not use_deepspeed:
        return PlainEngine(model, optimizer, scheduler, cfg.dist.grad_accum,
                           autocast=torch.bfloat16 if cfg.dist.precision == "bf16" else None)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=ds_config(cfg, world_size))
    weights_only_resume(engine)
    return engine


class PlainEngine:
    """DeepSpeed's engine interface over a plain module, optimizer and scheduler.

    ``autocast=torch.bfloat16`` (``dist.precision=bf16``) runs the forward under autocast:
    weights, gradients and optimizer state stay float32 and the matrix products run in bf16,
    where DeepSpeed's bf16 instead holds the module itself in bf16.
    """

    def __init__(self, module: nn.Module, optimizer, lr_scheduler, grad_accum: int = 1,
                 autocast: torch.dtype | None = None):
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_accum = grad_accum
        self.autocast = autocast
        self.micro_steps = 0

    def __call__(self, *args, **kwargs):
        if self.autocast is None:
            return self.module(*args, **kwargs)
        device = next(self.module.parameters()).device.type
        with torch.autocast(device, dtype=self.autocast):
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str | Path, tag: str, client_state: dict) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "micro_steps": self.micro_steps,
                 "client_state": client_state}
        with atomic_path(path / "state.pt") as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, load_dir: str | Path, tag: str):
        path = Path(load_dir) / tag / "state.pt"
        state = load_weights_only(path, map_location="cpu")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps = state["micro_steps"]
        return str(path), state["client_state"]

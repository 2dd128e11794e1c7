"""BERT-Adam and the warm-up + linear-decay learning rate of method.md §7.

BERT-Adam is Adam without bias correction, with decoupled weight decay and a gradient-norm clip per
parameter tensor, which is what the reference trains with. DeepSpeed takes it as a client
optimizer. Under ZeRO stages >= 1 the optimizer sees flat fp32 partitions, not tensors, so the
per-tensor clip cannot be done there: the engine's global-norm ``gradient_clipping`` replaces it
(see :func:`trainer.engine.ds_config`). ``optim.name: adamw`` selects torch AdamW (bias-corrected)
as the documented alternative.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.config import OptimConfig


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, decoupled weight decay, optional per-tensor grad clip."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: float = 1.0):
        if lr <= 0 or eps <= 0:
            raise ValueError(f"BertAdam needs lr > 0 and eps > 0, got lr={lr}, eps={eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, each group in a few multi-tensor
        (``torch._foreach_*``) calls instead of a Python loop over its tensors."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b1, b2 = group["betas"]
            grads = [p.grad for p in params]
            if group["max_grad_norm"] > 0:
                # Scale only tensors over the limit, chosen on the device (an `if` on a norm
                # would be a device-to-host sync per tensor).
                limit = group["max_grad_norm"]
                scales = [torch.where(n > limit, limit / (n + 1e-6), 1.0)
                          for n in torch._foreach_norm(grads)]
                grads = torch._foreach_mul(grads, scales)
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, grads, alpha=1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            update = torch._foreach_sqrt(v)
            torch._foreach_add_(update, group["eps"])
            update = torch._foreach_div(m, update)      # no bias correction
            if group["weight_decay"] > 0:
                torch._foreach_add_(update, params, alpha=group["weight_decay"])
            torch._foreach_add_(params, update, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every weight except biases and LayerNorm parameters (method.md §7)."""
    decay, no_decay = [], []
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
                   for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias") or id(p) in norm_params:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, per_tensor_clip: bool = True
                    ) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "bert_adam":
        clip = cfg.grad_clip if per_tensor_clip else 0.0
        return BertAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, max_grad_norm=clip)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total_steps: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of steps, then linear decay to 0."""
    if total_steps <= 0:
        return 1.0
    x = step / total_steps
    if warmup > 0 and x < warmup:
        return x / warmup
    if warmup >= 1:
        return 1.0
    return max((1.0 - x) / (1.0 - warmup), 0.0)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step + 1, total_steps, warmup))


def seek(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Put the schedule at ``steps`` optimizer steps and give the optimizer that rate (a resume on
    another worker count, whose run has another number of steps)."""
    scheduler.last_epoch = steps
    scheduler._last_lr = [base * factor(steps)
                          for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr

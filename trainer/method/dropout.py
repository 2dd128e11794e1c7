"""Dropout whose CPU mask costs a quarter of ``bernoulli_``: four 16-bit draws per 64-bit number.

On CPU, ``nn.Dropout`` draws one Bernoulli sample per element and was the largest single cost
of a training step at TVR dims (the input layers drop 3072-wide frame features). Here one
``random_`` over int64 (full 64-bit range) yields four uniform 16-bit lanes, and an element is
kept when its lane is below ``(1 - p)`` of the int16 range. The keep probability is therefore
``1 - p`` rounded to a multiple of 2^-16 (an error under 8e-6), and the draws come from torch's
generator, so seeding and exact resume work as with ``nn.Dropout``. Other devices (CUDA has a
fused dropout kernel) use ``F.dropout`` unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LANES = 4  # int16 lanes per int64 draw


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> Tensor:
    """A bool mask of ``shape`` whose entries are True with probability 1 - p (to 2^-16)."""
    n = math.prod(shape)
    bits = torch.empty(-(-n // _LANES), dtype=torch.int64, device=device)
    bits.random_(-2**63, None, generator=generator)   # the full 64-bit range: 4 fair lanes
    threshold = round((1.0 - p) * 65536) - 32768
    return (bits.view(torch.int16)[:n] < threshold).view(shape)


class Dropout(nn.Module):
    """``nn.Dropout`` with the cheap CPU mask above; identical in eval mode and off CPU."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        # A float mask holding 1 / (1 - p) or 0: autograd's multiply keeps it for the backward.
        scaled = keep_mask(x.shape, self.p, x.device).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * scaled

    def extra_repr(self) -> str:
        return f"p={self.p}"

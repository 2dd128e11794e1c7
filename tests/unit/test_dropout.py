"""The CPU dropout's cheap mask: its keep rate, its lanes, its gradient and its seeding."""
from __future__ import annotations

import pytest
import torch

from trainer.method.dropout import Dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_rate_is_one_minus_p(p):
    n = 1 << 22
    mask = keep_mask((n,), p, generator=torch.Generator().manual_seed(0))
    # Binomial std of the mean is sqrt(p(1-p)/n) <= 2.5e-4; 6 std plus the 2^-16 rounding.
    assert abs(mask.float().mean().item() - (1 - p)) < 6 * 2.5e-4 + 2**-16
    # Each of the four 16-bit lanes of a 64-bit draw is fair (no lane loses its sign bit).
    lanes = mask.view(-1, 4).float().mean(0)
    assert torch.all((lanes - (1 - p)).abs() < 6 * 5e-4 + 2**-16), lanes


def test_odd_sizes_and_shapes():
    mask = keep_mask((3, 5, 7), 0.3)
    assert mask.shape == (3, 5, 7) and mask.dtype == torch.bool


def test_forward_and_backward_scale_the_kept_entries():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    drop = Dropout(0.25)
    y = drop(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert 0.6 < kept.float().mean() < 0.9


def test_eval_mode_and_p0_are_identity_and_seeding_repeats():
    x = torch.randn(10, 10)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0)(x) is x
    torch.manual_seed(7)
    a = Dropout(0.5)(x)
    torch.manual_seed(7)
    torch.testing.assert_close(Dropout(0.5)(x), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)

"""BERT-Adam (no bias correction, decoupled decay, per-tensor clip) and the lr schedule."""
import pytest
import torch
from torch import nn

from trainer.method.optim import BertAdam, lr_factor, param_groups


def test_bert_adam_matches_the_formula():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    grads = [torch.randn(5) * 3 for _ in range(3)]
    opt = BertAdam([p], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                   max_grad_norm=1.0)
    ref = p.detach().clone()
    m = torch.zeros(5)
    v = torch.zeros(5)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        g = g * (1.0 / (g.norm() + 1e-6)) if g.norm() > 1.0 else g     # per-tensor clip
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - 0.1 * (m / (v.sqrt() + 1e-6) + 0.01 * ref)          # no bias correction
    assert torch.allclose(p.detach(), ref, atol=1e-6)


def test_no_decay_for_bias_and_layernorm():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    decay, no_decay = param_groups(model, 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_warmup_then_linear_decay():
    assert lr_factor(0, 1000, 0.01) == 0.0
    assert lr_factor(5, 1000, 0.01) == pytest.approx(0.5)
    assert lr_factor(10, 1000, 0.01) == pytest.approx(1.0)
    assert lr_factor(505, 1000, 0.01) == pytest.approx(0.5)
    assert lr_factor(1000, 1000, 0.01) == 0.0


def test_bert_adam_updates_many_tensors_as_the_formula_per_tensor():
    """The multi-tensor update equals the formula applied to each tensor on its own (clip per
    tensor: only the tensor over the limit is scaled)."""
    torch.manual_seed(1)
    params = [nn.Parameter(torch.randn(*shape)) for shape in ((4, 3), (7,), (2, 2, 2))]
    opt = BertAdam(params, lr=0.05, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
    refs = [p.detach().clone() for p in params]
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step in range(3):
        grads = [torch.randn_like(p) * (0.1 if k == 1 else 3.0) for k, p in enumerate(params)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for k, g in enumerate(grads):
            g = g * (1.0 / (g.norm() + 1e-6)) if g.norm() > 1.0 else g
            m, v = state[k]
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            state[k] = (m, v)
            refs[k] = refs[k] - 0.05 * (m / (v.sqrt() + 1e-6) + 0.01 * refs[k])
    for p, ref in zip(params, refs):
        torch.testing.assert_close(p.detach(), ref, atol=1e-6, rtol=1e-6)


def test_seek_puts_the_schedule_where_stepping_would():
    from trainer.method.optim import build_scheduler, seek

    def fresh():
        opt = BertAdam([nn.Parameter(torch.zeros(2))], lr=0.1)
        return opt, build_scheduler(opt, 20, 0.1)

    stepped_opt, stepped = fresh()
    for _ in range(7):
        stepped_opt.step()
        stepped.step()
    sought_opt, sought = fresh()
    seek(sought, 7)
    assert sought.get_last_lr() == stepped.get_last_lr()
    assert sought_opt.param_groups[0]["lr"] == stepped_opt.param_groups[0]["lr"]
    sought_opt.step()
    sought.step()
    stepped_opt.step()
    stepped.step()
    assert sought.get_last_lr() == stepped.get_last_lr()

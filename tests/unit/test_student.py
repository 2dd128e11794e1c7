"""The student of method.md §3: size, init, masks, scores against plain formulas, ablations, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sharding.batch import VideoSample, collate
from trainer.config import ModelConfig
from trainer.method.losses import PAD_SCORE
from trainer.method.student import DualStudent, branch_scores

TINY = dict(video_dim=12, query_dim=10, hidden=16, heads=4, max_frames=8, max_words=6,
            input_drop=0.0, drop=0.0)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_batch(seed: int = 0, captions=(3, 2, 1, 2), frames=(8, 3, 5, 1)):
    rng = np.random.default_rng(seed)
    samples = []
    for j, (nc, nf) in enumerate(zip(captions, frames)):
        tokens = [rng.standard_normal((int(rng.integers(1, 7)), 10)).astype(np.float32)
                  for _ in range(nc)]
        samples.append(VideoSample(
            video_id=f"v{j}", frames=rng.standard_normal((nf, 12)).astype(np.float32),
            tokens=tokens, cap_ids=[f"v{j}#enc#{k}" for k in range(nc)],
            captions=[f"caption {k}" for k in range(nc)]))
    return collate(samples, max_words=6)


def test_tvr_parameter_count():
    model = DualStudent(ModelConfig(video_dim=3072, query_dim=768, hidden=384))
    assert n_params(model) == 5_755_392
    assert n_params(model.branches["inh"]) == n_params(model.branches["exp"]) == 2_877_696
    for branches, name in (("inheritance", "inh"), ("exploration", "exp")):
        single = DualStudent(ModelConfig(branches=branches))
        assert single.branch_names == (name,) and n_params(single) == 2_877_696


def test_init():
    torch.manual_seed(0)
    model = DualStudent(ModelConfig(video_dim=256, query_dim=128, hidden=64))
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            if module.weight.numel() >= 1000:
                assert abs(module.weight.std().item() - 0.02) < 0.003
            if getattr(module, "bias", None) is not None:
                assert (module.bias == 0).all()
        if isinstance(module, torch.nn.LayerNorm):
            assert (module.weight == 1).all() and (module.bias == 0).all()


def plain_attention(attn, x, mask):
    """The reference's BertSelfAttention + BertSelfOutput: additive -10000 mask, no fusion."""
    n, length, d = x.shape
    h = attn.heads

    def split(t):
        return t.view(n, length, h, d // h).permute(0, 2, 1, 3)

    scores = split(attn.q(x)) @ split(attn.k(x)).transpose(-1, -2) / math.sqrt(d // h)
    scores = scores + (1 - mask[:, None, None, :]) * -10000.0
    ctx = (torch.softmax(scores, dim=-1) @ split(attn.v(x))).permute(0, 2, 1, 3).reshape(n, length, d)
    return attn.norm(x + attn.out(ctx))


def test_fused_attention_equals_plain_attention():
    torch.manual_seed(1)
    model = DualStudent(ModelConfig(**TINY)).eval()
    attn = model.branches["inh"].video_attn
    x = torch.randn(3, 8, 16)
    mask = torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5, [1.0] + [0.0] * 7])
    assert torch.allclose(attn(x, mask), plain_attention(attn, x, mask), atol=1e-5)


def plain_encode(branch, batch):
    """method.md §3 over every padded position, no packing, no fused attention."""
    def tower(layer, attn, x, mask):
        h = torch.relu(layer.proj(layer.in_norm(x)))
        h = layer.pos_norm(h + layer.pos(torch.arange(x.shape[1])))
        return plain_attention(attn, h, mask)

    h = tower(branch.query_in, branch.query_attn, batch.query_feats, batch.query_mask)
    logits = branch.query_pool(h).squeeze(-1)
    logits = logits * batch.query_mask + (1 - batch.query_mask) * -1e10
    q = (torch.softmax(logits, dim=1)[:, :, None] * h).sum(dim=1)
    v = tower(branch.video_in, branch.video_attn, batch.video_feats, batch.video_mask)
    return q, branch.video_out(v)


def test_encoders_equal_plain_padded_computation():
    torch.manual_seed(4)
    model = DualStudent(ModelConfig(**TINY)).eval()
    batch = tiny_batch(5)
    q = model.encode_queries(batch.query_feats, batch.query_mask)
    v = model.encode_videos(batch.video_feats, batch.video_mask)
    valid = batch.video_mask > 0
    for name in ("inh", "exp"):
        q_ref, v_ref = plain_encode(model.branches[name], batch)
        assert torch.allclose(q[name], q_ref, atol=1e-5)
        assert torch.allclose(v[name][valid], v_ref[valid], atol=1e-5)


def test_scores_match_plain_formulas_and_ignore_padding():
    torch.manual_seed(2)
    model = DualStudent(ModelConfig(**TINY)).eval()
    batch = tiny_batch()
    assert batch.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]  # collate sorted by caption count
    out = model(batch)
    assert set(out) == {"inh", "exp"}
    q = model.encode_queries(batch.query_feats, batch.query_mask)
    v = model.encode_videos(batch.video_feats, batch.video_mask)
    Q, B = batch.num_queries, batch.num_videos
    for name, sc in out.items():
        assert sc.S.shape == sc.U.shape == (Q, B) and sc.cos.shape == (Q, B, 8)
        for i in range(Q):
            for j in range(B):
                valid = [l for l in range(8) if batch.video_mask[j, l] > 0]
                cosines = [torch.nn.functional.cosine_similarity(q[name][i], v[name][j, l], dim=0)
                           for l in valid]
                dots = [q[name][i] @ v[name][j, l] for l in valid]
                assert torch.allclose(sc.S[i, j], max(cosines), atol=1e-5)
                assert torch.allclose(sc.U[i, j], max(dots), atol=1e-4)
                pads = [l for l in range(8) if l not in valid]
                assert all(sc.cos[i, j, l] == PAD_SCORE for l in pads)
    # Padded frames and tokens carry no information: scribbling on them changes nothing.
    noisy = tiny_batch()
    noisy.video_feats[noisy.video_mask == 0] = 50.0
    noisy.query_feats[noisy.query_mask == 0] = -50.0
    again = model(noisy)
    for name in out:
        assert torch.allclose(again[name].S, out[name].S, atol=1e-5)
        assert torch.allclose(again[name].U, out[name].U, atol=1e-4)


def test_branch_scores_single_frame_max():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [100.0, 100.0]]])
    sc = branch_scores(q, v, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(sc.S, torch.tensor([[1.0], [1.0]]))
    assert torch.allclose(sc.U, torch.tensor([[3.0], [2.0]]))


def test_ablation_branches():
    batch = tiny_batch(1)
    for branches, names in (("dual", ("inh", "exp")), ("inheritance", ("inh",)),
                            ("exploration", ("exp",))):
        model = DualStudent(ModelConfig(**TINY, branches=branches))
        assert model.branch_names == names and tuple(model(batch)) == names


def test_dropout_only_in_training():
    model = DualStudent(ModelConfig(**{**TINY, "input_drop": 0.3, "drop": 0.3}))
    batch = tiny_batch(3)
    model.eval()
    assert torch.equal(model(batch)["inh"].S, model(batch)["inh"].S)
    model.train()
    torch.manual_seed(0)
    a = model(batch)["inh"].S
    torch.manual_seed(1)
    assert not torch.equal(a, model(batch)["inh"].S)


def test_bad_input_errors():
    model = DualStudent(ModelConfig(**TINY))
    batch = tiny_batch()
    with pytest.raises(ValueError, match=r"expected model.video_dim=12, got 7"):
        model.encode_videos(torch.zeros(2, 3, 7), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"expected model.query_dim=10, got 11"):
        model.encode_queries(torch.zeros(2, 3, 11), torch.ones(2, 3))
    with pytest.raises(ValueError, match="empty video batch"):
        model.encode_videos(torch.zeros(0, 3, 12), torch.ones(0, 3))
    with pytest.raises(ValueError, match="model.max_frames"):
        model.encode_videos(torch.zeros(1, 9, 12), torch.ones(1, 9))
    with pytest.raises(ValueError, match="mask shape"):
        model.encode_queries(batch.query_feats, batch.query_mask[:, :-1])
    with pytest.raises(ValueError, match="no valid frame"):
        model.encode_videos(batch.video_feats, torch.zeros_like(batch.video_mask))
    batch.video_feats[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(batch)
    with pytest.raises(ValueError, match="model.branches"):
        DualStudent(ModelConfig(**TINY, branches="both"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_collate_refuses_non_finite_features_naming_the_video(bad):
    from sharding.batch import VideoSample, collate

    rng = np.random.default_rng(0)
    samples = [VideoSample(f"v{j}", rng.standard_normal((3, 4)).astype(np.float32),
                           [rng.standard_normal((2, 5)).astype(np.float32)], [f"v{j}#0"], [""])
               for j in range(3)]
    collate(samples)   # finite: fine
    samples[1].frames[2, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite frame features in videos \['v1'\]"):
        collate(samples)
    samples[1].frames[2, 1] = 0.0
    samples[2].tokens[0][1, 3] = bad
    with pytest.raises(ValueError, match=r"non-finite caption token features in videos \['v2'\]"):
        collate(samples)

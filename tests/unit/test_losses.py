"""The vectorised losses against the plain-loop method.md §5 reference, gradients, totals, bad input."""
from __future__ import annotations

import pytest
import torch

from tests.unit import loss_reference as ref
from trainer.config import LossConfig
from trainer.method.losses import (PAD_SCORE, BranchScores, TeacherTargets, kd, nce, soft_nce,
                            total_loss as _total_loss, triplet)
from trainer.method.schedules import LossWeights, loss_weights, soft_alpha, soft_beta

PAPER = LossConfig()


def total_loss(scores, labels, teacher, cfg, epoch, generator=None):
    """The total at an epoch of the paper's schedules, with the frame mask the scores carry."""
    mask = (next(iter(scores.values())).cos[0] > PAD_SCORE / 2).double()
    branches = set(scores)
    w = loss_weights(cfg, epoch, inheritance="inh" in branches)
    loss, terms = _total_loss(scores, labels, mask, teacher, cfg, w, generator)
    return loss, {**terms, **{k: v for k, v in w.as_dict().items()
                              if k in ("lambda", "alpha", "beta")
                              and (k == "lambda" or cfg.targets == "soft")}}


def kd_weight(epoch, name="exp_down"):
    return 0.1 * {"exp_down": 0.95 ** epoch}[name]

CAPTIONS = [4, 3, 3, 2, 2, 1, 1]  # per video, sorted descending as collate does


def make_batch(seed: int, captions=CAPTIONS, L: int = 9, scale: float = 3.0):
    """Random float64 scores for videos with different caption and frame counts."""
    g = torch.Generator().manual_seed(seed)
    B = len(captions)
    labels = torch.tensor([j for j, n in enumerate(captions) for _ in range(n)])
    Q = len(labels)
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).double()
    cos = (torch.rand(Q, B, L, generator=g, dtype=torch.float64) * 2 - 1)
    cos = cos.masked_fill(mask[None] == 0, PAD_SCORE)
    S = cos.amax(dim=-1)
    U = torch.randn(Q, B, generator=g, dtype=torch.float64) * scale
    T = torch.randn(Q, B, generator=g, dtype=torch.float64) * scale
    tau = (torch.rand(Q, B, L, generator=g, dtype=torch.float64) * 2 - 1)
    tau = tau.masked_fill(mask[None] == 0, PAD_SCORE)
    return dict(labels=labels, mask=mask, cos=cos, S=S, U=U, T=T, tau=tau)


def close(a, b, tol=1e-9):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", range(4))
def test_triplet_hardest_matches_reference(seed):
    b = make_batch(seed)
    labels = b["labels"].tolist()
    got = triplet(b["S"], b["labels"], margin=0.2, hard_pool=1)
    want = ref.triplet(b["S"], labels, 0.2, [1] * len(labels))
    assert close(got, want)
    assert got > 0  # margins 0.2 on random cosines: the test is not vacuous


@pytest.mark.parametrize("pool", [3, 6, 50])
def test_triplet_pool_draws_match_reference(pool):
    b = make_batch(7)
    Q, B = b["S"].shape
    got = triplet(b["S"], b["labels"], 0.1, pool, torch.Generator().manual_seed(3))
    ranks = torch.randint(1, min(pool, B - 1) + 1, (Q,), generator=torch.Generator().manual_seed(3))
    want = ref.triplet(b["S"], b["labels"].tolist(), 0.1, ranks.tolist())
    assert close(got, want)
    hardest = triplet(b["S"], b["labels"], 0.1, 1)
    assert got < hardest  # softer negatives than the hardest one on this batch


@pytest.mark.parametrize("seed", range(3))
def test_nce_matches_reference(seed):
    b = make_batch(seed)
    assert close(nce(b["U"], b["labels"]), ref.nce(b["U"], b["labels"].tolist()))


@pytest.mark.parametrize("alpha,beta", [(0.8, 0.8), (0.5, 0.5), (0.3, 0.9), (0.675, 0.675),
                                        (0.0, 0.5), (0.0, 0.0), (1.0, 0.5)])
def test_soft_nce_matches_reference(alpha, beta):
    b = make_batch(11, scale=2.0)
    got = soft_nce(b["U"], b["T"], b["labels"], alpha, beta)
    want = ref.soft_nce(b["U"], b["T"], b["labels"].tolist(), alpha, beta)
    # The reference keeps log(indicator + 1e-12) on hard video rows; ours uses the exact
    # indicator: the two differ by about 1e-12 * exp(score gap), far below this tolerance.
    assert close(got, want, tol=1e-8)


def test_soft_nce_alpha_one_is_exactly_nce():
    for dtype in (torch.float32, torch.float64):
        b = make_batch(5)
        U, T = b["U"].to(dtype), b["T"].to(dtype)
        assert torch.equal(soft_nce(U, T, b["labels"], 1.0, 0.3), nce(U, b["labels"]))


def test_soft_nce_soft_targets_matter():
    b = make_batch(5)
    hard = nce(b["U"], b["labels"])
    assert not close(soft_nce(b["U"], b["T"], b["labels"], 0.0, 0.5), hard, tol=1e-4)


def test_soft_nce_gradient_flows_through_own_targets():
    b = make_batch(3)
    labels = b["labels"]
    U1 = b["U"].clone().requires_grad_(True)
    soft_nce(U1, U1, labels, 0.3, 0.6).backward()
    U2 = b["U"].clone().requires_grad_(True)
    soft_nce(U2, U2.detach(), labels, 0.3, 0.6).backward()
    assert (U1.grad - U2.grad).abs().max() > 1e-4
    U3 = b["U"].clone().requires_grad_(True)
    ref.soft_nce(U3, U3, labels.tolist(), 0.3, 0.6).backward()
    assert torch.allclose(U1.grad, U3.grad, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_kd_matches_reference_and_is_a_sum(seed):
    b = make_batch(seed)
    s_cos = b["cos"].clone().requires_grad_(True)
    got = kd(s_cos, b["tau"], b["mask"], b["labels"], 0.2)
    want = ref.kd(b["cos"], b["tau"], b["mask"], b["labels"].tolist(), 0.2)
    assert close(got, want)
    # Only the positive video's valid frames count: changing anything else leaves it unchanged.
    got.backward()
    onehot = torch.nn.functional.one_hot(b["labels"], b["mask"].shape[0]).bool()
    used = onehot[:, :, None] & (b["mask"][None] > 0)
    assert (s_cos.grad[~used] == 0).all() and (s_cos.grad[used] != 0).any()
    # A sum over queries: the same batch twice over doubles it.
    twice = kd(b["cos"].repeat(2, 1, 1), b["tau"].repeat(2, 1, 1), b["mask"],
               b["labels"].repeat(2), 0.2)
    assert close(twice, 2 * got)


def scores_of(b, shift=0.0):
    return BranchScores(cos=b["cos"], S=b["S"] + shift, U=b["U"] + shift)


def test_total_dlkdpp_matches_composition_of_reference_terms():
    b = make_batch(2)
    other = make_batch(9)
    labels = b["labels"].tolist()
    scores = {"inh": scores_of(b), "exp": scores_of(other)}
    teacher = TeacherTargets(tau=b["tau"], T=b["T"])
    cfg = LossConfig(hard_pool=1, margin=0.1)
    epoch = 40
    loss, terms = total_loss(scores, b["labels"], teacher, cfg, epoch)
    a, be, lam = soft_alpha(epoch, PAPER), soft_beta(epoch, PAPER), kd_weight(epoch, "exp_down")
    ones = [1] * len(labels)
    want = (ref.triplet(b["S"], labels, 0.1, ones)
            + 0.04 * ref.soft_nce(b["U"], b["T"], labels, a, be)
            + lam * ref.kd(b["cos"], b["tau"], b["mask"], labels, 0.2)
            + ref.triplet(other["S"], labels, 0.1, ones)
            + 0.04 * ref.soft_nce(other["U"], other["U"], labels, a, be))
    assert close(loss, want, tol=1e-8)
    assert set(terms) == {"inh_trip", "inh_nce", "inh_kd", "exp_trip", "exp_nce", "loss",
                          "lambda", "alpha", "beta"}
    assert terms["lambda"] == lam and terms["alpha"] == a and terms["beta"] == be
    assert close(terms["exp_nce"], ref.soft_nce(other["U"], other["U"], labels, a, be), 1e-8)
    assert close(terms["loss"], want, tol=1e-8)


def test_total_dldkd_hard_targets_and_kd_switches():
    b = make_batch(4)
    labels = b["labels"].tolist()
    scores = {"inh": scores_of(b), "exp": scores_of(b, 0.5)}
    teacher = TeacherTargets(tau=b["tau"], T=b["T"])
    base = dict(hard_pool=1, targets="hard")
    trip = 2 * ref.triplet(b["S"], labels, 0.1, [1] * len(labels))  # shift cancels in triplet
    nces = ref.nce(b["U"], labels) + ref.nce(b["U"] + 0.5, labels)
    kl = ref.kd(b["cos"], b["tau"], b["mask"], labels, 0.2)
    loss, terms = total_loss(scores, b["labels"], teacher, LossConfig(**base), 3)
    assert close(loss, trip + 0.04 * nces + kd_weight(3) * kl, 1e-8)
    assert "alpha" not in terms
    loss, terms = total_loss(scores, b["labels"], teacher,
                             LossConfig(**base, kd="static", kd_static_weight=0.3), 3)
    assert close(loss, trip + 0.04 * nces + 0.3 * kl, 1e-8) and terms["lambda"] == 0.3
    loss, terms = total_loss(scores, b["labels"], None, LossConfig(**base, kd="off"), 3)
    assert close(loss, trip + 0.04 * nces, 1e-8) and "inh_kd" not in terms


def test_single_branch_ablations():
    b = make_batch(6)
    labels = b["labels"].tolist()
    cfg = LossConfig(hard_pool=1)
    loss, terms = total_loss({"exp": scores_of(b)}, b["labels"], None, cfg, 0)
    want = (ref.triplet(b["S"], labels, 0.1, [1] * len(labels))
            + 0.04 * ref.soft_nce(b["U"], b["U"], labels, soft_alpha(0, PAPER),
                                  soft_beta(0, PAPER)))
    assert close(loss, want, 1e-8)
    assert set(terms) == {"exp_trip", "exp_nce", "loss", "lambda", "alpha", "beta"}
    assert terms["lambda"] == 0.0
    teacher = TeacherTargets(tau=b["tau"], T=b["T"])
    loss, terms = total_loss({"inh": scores_of(b)}, b["labels"], teacher, cfg, 0)
    assert set(terms) == {"inh_trip", "inh_nce", "inh_kd", "loss", "lambda", "alpha", "beta"}
    with pytest.raises(ValueError, match="teacher"):
        total_loss({"inh": scores_of(b)}, b["labels"], None, cfg, 0)


def test_hard_negative_start_epoch_draws_from_all_videos():
    b = make_batch(8)
    Q, B = b["S"].shape
    scores = {"exp": scores_of(b)}
    cfg = LossConfig(hard_pool=1, hard_negative_start_epoch=5, targets="hard", kd="off")
    early, terms = total_loss(scores, b["labels"], None, cfg, 4, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    ranks = torch.randint(1, B, (Q,), generator=g)
    video_neg = random_other_queries(b["labels"].tolist(), B, g)
    assert close(terms["exp_trip"], ref.triplet(b["S"], b["labels"].tolist(), 0.1, ranks.tolist(),
                                                video_neg))
    late, terms = total_loss(scores, b["labels"], None, cfg, 5)
    assert close(terms["exp_trip"], ref.triplet(b["S"], b["labels"].tolist(), 0.1, [1] * Q))


def random_other_queries(labels: list[int], B: int, g: torch.Generator) -> list[int]:
    """Per video, one query of another video drawn uniformly (the reference's pre-hard-negative
    draw), written as a loop over the same uniform noise the vectorised code draws."""
    noise = torch.rand(len(labels), B, generator=g)
    picks = []
    for j in range(B):
        others = [i for i in range(len(labels)) if labels[i] != j]
        picks.append(max(others, key=lambda i: float(noise[i, j])))
    return picks


def test_video_side_random_negative_before_hard_negatives():
    b = make_batch(12)
    Q, B = b["S"].shape
    labels = b["labels"].tolist()
    got = triplet(b["S"], b["labels"], 0.1, 1, torch.Generator().manual_seed(5), hard_video=False)
    g = torch.Generator().manual_seed(5)
    want = ref.triplet(b["S"], labels, 0.1, [1] * Q, random_other_queries(labels, B, g))
    assert close(got, want)
    assert got < triplet(b["S"], b["labels"], 0.1, 1)  # softer than the hardest query
    # uniform over the other videos' queries: every one of them gets picked for video 0
    seen = set()
    for seed in range(300):
        seen.update([random_other_queries(labels, B, torch.Generator().manual_seed(seed))[0]])
    assert seen == {i for i in range(Q) if labels[i] != 0}


def test_shuffle_teacher_permutes_targets_across_queries():
    b = make_batch(10)
    scores = {"inh": scores_of(b)}
    teacher = TeacherTargets(tau=b["tau"], T=b["T"])
    cfg = LossConfig(hard_pool=1, shuffle_teacher=True)
    loss, _ = total_loss(scores, b["labels"], teacher, cfg, 0, torch.Generator().manual_seed(4))
    perm = torch.randperm(len(b["labels"]), generator=torch.Generator().manual_seed(4))
    permuted = TeacherTargets(tau=b["tau"][perm], T=b["T"][perm])
    want, _ = total_loss(scores, b["labels"], permuted, LossConfig(hard_pool=1), 0)
    plain, _ = total_loss(scores, b["labels"], teacher, LossConfig(hard_pool=1), 0)
    assert close(loss, want) and not close(loss, plain, 1e-4)


def test_bad_input_errors():
    b = make_batch(0)
    S, U, labels = b["S"], b["U"], b["labels"]
    B = S.shape[1]
    with pytest.raises(ValueError, match="out of range"):
        nce(U, labels.clone().fill_(B))
    with pytest.raises(ValueError, match="out of range"):
        triplet(S, torch.where(labels == 0, -1, labels), 0.1, 1)
    with pytest.raises(ValueError, match="LongTensor"):
        nce(U, labels.float())
    with pytest.raises(ValueError, match="LongTensor"):
        nce(U, labels[:-1])
    with pytest.raises(ValueError, match="empty batch"):
        nce(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        triplet(S.clone().index_fill_(0, torch.tensor([2]), float("nan")), labels, 0.1, 1)
    with pytest.raises(ValueError, match="NaN"):
        soft_nce(U, torch.full_like(U, float("nan")), labels, 0.5, 0.5)
    with pytest.raises(ValueError, match="expected"):
        soft_nce(U, U[:, :-1], labels, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least one query"):
        nce(torch.cat([U, U[:, :1]], dim=1), labels)
    with pytest.raises(ValueError, match="frame_mask"):
        kd(b["cos"], b["tau"], b["mask"][:, :-1], labels, 0.2)
    with pytest.raises(ValueError, match="teacher_cos"):
        kd(b["cos"], b["tau"][:, :, :-1], b["mask"], labels, 0.2)
    with pytest.raises(ValueError, match="teacher tau"):
        total_loss({"inh": scores_of(b)}, labels, TeacherTargets(b["tau"][:-1], b["T"][:-1]),
                   LossConfig(), 0)
    with pytest.raises(ValueError, match="branches"):
        total_loss({"student": scores_of(b)}, labels, None, LossConfig(), 0)
    with pytest.raises(ValueError, match="2 videos"):
        triplet(S[:4, :1], labels[:4].clamp(max=0), 0.1, 1)

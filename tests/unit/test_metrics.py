"""Evaluation (method.md §1): pessimistic ties, R@K by hand, chunked == unchunked, bad input."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sharding.batch import VideoSample
from trainer.config import ModelConfig
from trainer.method.metrics import (EvalGallery, build_gallery, encode_gallery, encoded_from_embeddings,
                             evaluate, rank_counts, rank_metrics, ranks_from_scores, score_matrix)
from trainer.method.student import DualStudent


def loop_ranks(scores: torch.Tensor, gt: torch.Tensor) -> list[int]:
    """method.md §1 written out: 1 + #{j != gt : S[i, j] >= S[i, gt]}."""
    ranks = []
    for i in range(scores.shape[0]):
        g = int(gt[i])
        ranks.append(1 + sum(1 for j in range(scores.shape[1])
                             if j != g and scores[i, j] >= scores[i, g]))
    return ranks


# Chunkings run different float32 kernels: the student sees other batch shapes and the products
# other blockings, so the same score can differ in its last bits (deterministically so on some
# CPUs). Each fused score here is a cosine of d = 5 unit vectors made by one (8 -> 5) linear
# layer, so its rounding error is bounded by about (8 + 5) * 2^-24 ~ 1e-6 per path: 1e-5 leaves a
# tenfold margin and is still far below the score gaps between distinct random videos.
SCORE_TOL = 1e-5


def assert_ranks_agree(ranks: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor,
                       tol: float = SCORE_TOL) -> None:
    """Ranks equal to the pessimistic ranks of ``scores``, except that a video whose score lies
    within ``tol`` of the ground truth's may count either way (a near-tie that rounding can
    flip); exact and near ties both count against the query at the upper bound."""
    s = scores.double()
    g = s.gather(1, gt[:, None].long())
    low = 1 + (s > g + tol).sum(dim=1)
    high = (s >= g - tol).sum(dim=1)
    ranks = torch.as_tensor(ranks)
    bad = ((ranks < low) | (ranks > high)).nonzero().flatten().tolist()
    assert not bad, (f"queries {bad[:5]}: ranks {ranks[bad[:5]].tolist()} outside "
                     f"[{low[bad[:5]].tolist()}, {high[bad[:5]].tolist()}]")


def assert_metrics_agree(got: dict, ranks_ref: torch.Tensor) -> None:
    """Metrics from ranks that agree (above) are equal when no near-tie flipped, which these
    small galleries of random videos never have; compare them to float tolerance."""
    want = rank_metrics(ranks_ref)
    assert got.keys() == want.keys()
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k


def loop_scores(queries: dict, videos: dict, mask: torch.Tensor, weights: dict) -> torch.Tensor:
    """Fused score from the formula: per branch, best cosine over valid frames, in float64."""
    nq = next(iter(queries.values())).shape[0]
    nv, length = mask.shape
    out = torch.zeros(nq, nv, dtype=torch.float64)
    for i in range(nq):
        for j in range(nv):
            total = 0.0
            for b, w in weights.items():
                q = queries[b][i].double()
                best = -math.inf
                for frame in range(length):
                    if mask[j, frame] > 0:
                        v = videos[b][j, frame].double()
                        best = max(best, float(q @ v / (q.norm() * v.norm())))
                total += w * best
            out[i, j] = total
    return out


class FakeStudent(nn.Module):
    """The student API at toy size: per-frame linear map, mean-pooled linear query map, dropout."""

    def __init__(self, dv: int, dq: int, d: int, branches=("inh", "exp"), inh_weight=0.7):
        super().__init__()
        self.cfg = SimpleNamespace(video_dim=dv, query_dim=dq, inh_weight=inh_weight)
        self.branch_names = tuple(branches)
        self.video = nn.ModuleDict({b: nn.Linear(dv, d) for b in branches})
        self.query = nn.ModuleDict({b: nn.Linear(dq, d) for b in branches})
        self.drop = nn.Dropout(0.5)

    def encode_queries(self, feats, mask):
        pooled = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return {b: self.drop(self.query[b](pooled)) for b in self.branch_names}

    def encode_videos(self, feats, mask):
        return {b: self.drop(self.video[b](feats)) for b in self.branch_names}


def make_gallery(nv=9, caps=(1, 3), length=(1, 6), dv=8, dq=6, lq=4, seed=0, dup=False
                 ) -> EvalGallery:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for j in range(nv):
        n = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        k = int(torch.randint(caps[0], caps[1] + 1, (1,), generator=g))
        frames = torch.randn(n, dv, generator=g).numpy()
        if dup and j == nv - 1:  # an exact copy of video 0 under another id: planted ties
            frames = samples[0].frames.copy()
        toks = [torch.randn(int(torch.randint(1, lq + 1, (1,), generator=g)), dq,
                            generator=g).numpy() for _ in range(k)]
        samples.append(VideoSample(video_id=f"v{j}", frames=frames, tokens=toks,
                                   cap_ids=[f"v{j}#enc#{c}" for c in range(k)],
                                   captions=[""] * k))
    return build_gallery(samples, max_words=lq)


# ---------------------------------------------------------------- ranks and metrics by hand

def test_ranks_hand_made_with_ties():
    S = torch.tensor([[0.9, 0.1, 0.5],
                      [0.2, 0.2, 0.1],   # tie with the gt: counts against
                      [0.3, 0.8, 0.8]])  # tie again, one lower score
    gt = torch.tensor([0, 0, 2])
    assert ranks_from_scores(S, gt).tolist() == [1, 2, 2]


def test_constant_scorer_ranks_last():
    S = torch.full((6, 4), 0.25)
    gt = torch.tensor([0, 1, 2, 3, 0, 1])
    assert ranks_from_scores(S, gt).tolist() == [4] * 6
    m = rank_metrics(ranks_from_scores(S, gt))
    assert m["R1"] == 0.0 and m["MedR"] == 4.0 and m["R5"] == 100.0


def test_ranks_match_loop_on_tied_scores():
    g = torch.Generator().manual_seed(3)
    S = torch.randint(0, 4, (40, 11), generator=g).float()  # four levels: many ties
    gt = torch.randint(0, 11, (40,), generator=g)
    assert ranks_from_scores(S, gt).tolist() == loop_ranks(S, gt)


def test_rank_metrics_worked_by_hand():
    m = rank_metrics([1, 2, 6, 11, 101])
    assert m["R1"] == 20.0 and m["R5"] == 40.0 and m["R10"] == 60.0 and m["R100"] == 80.0
    assert m["SumR"] == 200.0
    assert m["MedR"] == 6.0
    assert m["MeanR"] == pytest.approx(121 / 5)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 11 + 1 / 101) / 5)
    assert rank_metrics([1, 2, 3, 10])["MedR"] == 2.5  # even count: mean of the middle two


# ---------------------------------------------------------------- evaluation of a student

def student_embeddings(student, gallery):
    student.eval()
    with torch.no_grad():
        q = student.encode_queries(gallery.query_feats.float(), gallery.query_mask)
        v = student.encode_videos(gallery.video_feats.float(), gallery.video_mask)
    return q, v


def test_scores_and_ranks_match_plain_loop():
    torch.manual_seed(0)
    gallery = make_gallery(nv=7)
    student = FakeStudent(8, 6, 5)
    enc = encode_gallery(student, gallery, query_chunk=4, video_chunk=3)
    q, v = student_embeddings(student, gallery)
    ref = loop_scores(q, v, gallery.video_mask, {"inh": 0.7, "exp": 0.3})
    torch.testing.assert_close(score_matrix(enc, query_chunk=5).double(), ref, atol=SCORE_TOL,
                               rtol=0)
    assert_ranks_agree(rank_counts(enc, query_chunk=2), ref, gallery.gt)


@pytest.mark.parametrize("dup", [False, True])
def test_chunked_agrees_with_unchunked(dup):
    torch.manual_seed(1)
    gallery = make_gallery(nv=13, dup=dup)
    student = FakeStudent(8, 6, 5)
    full = encode_gallery(student, gallery, query_chunk=10_000, video_chunk=10_000)
    want_scores = score_matrix(full, query_chunk=10_000)
    want_ranks = rank_counts(full, query_chunk=10_000)
    assert_ranks_agree(want_ranks, want_scores, gallery.gt)
    if dup:  # queries of video 0 tie with its copy: within rounding, so the tie counts
        copy = gallery.num_videos - 1
        rows = (gallery.gt == 0).nonzero().flatten()
        torch.testing.assert_close(want_scores[rows, copy], want_scores[rows, 0],
                                   atol=SCORE_TOL, rtol=0)
        s = want_scores[rows]
        assert ((s >= s[:, :1] - SCORE_TOL).sum(dim=1) >= 2).all()
    for qc, vc in [(1, 1), (3, 2), (7, 5), (2, 13)]:
        enc = encode_gallery(student, gallery, query_chunk=qc, video_chunk=vc)
        torch.testing.assert_close(score_matrix(enc, query_chunk=qc), want_scores,
                                   atol=SCORE_TOL, rtol=0)
        ranks = rank_counts(enc, query_chunk=qc)
        assert_ranks_agree(ranks, want_scores, gallery.gt)
        assert_ranks_agree(ranks, score_matrix(enc, query_chunk=qc), gallery.gt, tol=0.0)
        if not dup:
            assert_metrics_agree(evaluate(student, gallery, qc, vc), want_ranks)


def test_real_student_chunked_agrees_with_unchunked_and_loop():
    torch.manual_seed(2)
    cfg = ModelConfig(video_dim=8, query_dim=6, hidden=8, heads=2, max_frames=6, max_words=4,
                      input_drop=0.3, drop=0.3)
    student = DualStudent(cfg)
    student.train()
    gallery = make_gallery(nv=10)
    want = evaluate(student, gallery, query_chunk=10_000, video_chunk=10_000)
    assert student.training  # restored
    q, v = student_embeddings(student, gallery)
    ref = loop_scores(q, v, gallery.video_mask, {"inh": 0.7, "exp": 0.3})
    enc = encode_gallery(student, gallery, query_chunk=3, video_chunk=4)
    torch.testing.assert_close(score_matrix(enc).double(), ref, atol=SCORE_TOL, rtol=0)
    assert_ranks_agree(rank_counts(enc, query_chunk=3), ref, gallery.gt)
    ref_ranks = torch.tensor(loop_ranks(ref, gallery.gt))
    assert_metrics_agree(want, ref_ranks)
    assert_metrics_agree(evaluate(student, gallery, query_chunk=3, video_chunk=4), ref_ranks)


@pytest.mark.parametrize("branches", ["inheritance", "exploration"])
def test_single_branch_student_uses_its_branch(branches):
    torch.manual_seed(4)
    cfg = ModelConfig(video_dim=8, query_dim=6, hidden=8, heads=2, max_frames=6, max_words=4,
                      branches=branches)
    student = DualStudent(cfg)
    gallery = make_gallery(nv=6)
    enc = encode_gallery(student, gallery, query_chunk=5, video_chunk=2)
    (name,) = student.branch_names
    q, v = student_embeddings(student, gallery)
    ref = loop_scores(q, v, gallery.video_mask, {name: 1.0})
    torch.testing.assert_close(score_matrix(enc).double(), ref, atol=1e-5, rtol=0)


def test_query_slices_concatenate_to_all():
    torch.manual_seed(5)
    gallery = make_gallery(nv=8)
    enc = encode_gallery(FakeStudent(8, 6, 5), gallery, video_chunk=3)
    n = gallery.num_queries
    parts = [rank_counts(enc, slice(a, min(a + 4, n)), query_chunk=3) for a in range(0, n, 4)]
    assert_ranks_agree(torch.cat(parts), score_matrix(enc), gallery.gt)
    assert_ranks_agree(rank_counts(enc), score_matrix(enc), gallery.gt)


def test_encoded_from_embeddings_matches_student_path():
    torch.manual_seed(6)
    gallery = make_gallery(nv=8)
    student = FakeStudent(8, 6, 5)
    q, v = student_embeddings(student, gallery)
    a = encoded_from_embeddings(q, v, gallery.video_mask, gallery.gt, {"inh": 0.7, "exp": 0.3},
                                video_chunk=3)
    b = encode_gallery(student, gallery, video_chunk=3)
    assert_ranks_agree(rank_counts(a), score_matrix(b), gallery.gt)
    assert_ranks_agree(rank_counts(b), score_matrix(a), gallery.gt)


def test_build_gallery_layout():
    gallery = make_gallery(nv=5, caps=(2, 2), length=(2, 5))
    assert gallery.video_ids == [f"v{j}" for j in range(5)]
    assert gallery.gt.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [c.split("#")[0] for c in gallery.cap_ids] == [gallery.video_ids[i] for i in gallery.gt]
    half = VideoSample("h", np.ones((3, 4), np.float16), [np.ones((2, 2), np.float32)], ["h#0"],
                       [""])
    assert build_gallery([half]).video_feats.dtype == torch.float16


# ---------------------------------------------------------------- bad input

def test_bad_scores_and_gt():
    S = torch.rand(3, 4)
    with pytest.raises(ValueError, match="out of range"):
        ranks_from_scores(S, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="out of range"):
        ranks_from_scores(S, torch.tensor([0, -1, 1]))
    S[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN scores for queries \\[1\\]"):
        ranks_from_scores(S, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="gt must be"):
        ranks_from_scores(torch.rand(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty score matrix"):
        ranks_from_scores(torch.rand(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no ranks"):
        rank_metrics([])


def test_bad_gallery():
    with pytest.raises(ValueError, match="no videos"):
        build_gallery([])
    g = make_gallery(nv=3)
    with pytest.raises(ValueError, match="empty gallery"):
        EvalGallery(g.video_feats[:0], g.video_mask[:0], g.query_feats, g.query_mask, g.gt, [],
                    g.cap_ids)
    gt = g.gt.clone()
    gt[0] = 3
    with pytest.raises(ValueError, match="gt out of range.*v0#enc#0"):
        EvalGallery(g.video_feats, g.video_mask, g.query_feats, g.query_mask, gt, g.video_ids,
                    g.cap_ids)
    with pytest.raises(ValueError, match="duplicate video ids"):
        EvalGallery(g.video_feats, g.video_mask, g.query_feats, g.query_mask, g.gt,
                    ["v0", "v0", "v2"], g.cap_ids)


def test_dim_mismatch_names_the_key():
    gallery = make_gallery(nv=3)  # video dim 8, query dim 6
    with pytest.raises(ValueError, match="model.video_dim=7"):
        evaluate(FakeStudent(7, 6, 5), gallery)
    with pytest.raises(ValueError, match="model.query_dim=5"):
        evaluate(FakeStudent(8, 5, 5), gallery)


def test_nan_embeddings_are_an_error():
    gallery = make_gallery(nv=4)
    student = FakeStudent(8, 6, 5)
    with torch.no_grad():
        student.video["exp"].bias[0] = float("nan")
    with pytest.raises(ValueError, match="branch exp video embeddings contain NaN"):
        evaluate(student, gallery)


def test_encoded_from_embeddings_rejects_bad_input():
    q = {"inh": torch.randn(3, 4)}
    v = {"inh": torch.randn(2, 5, 4)}
    mask = torch.ones(2, 5)
    with pytest.raises(ValueError, match="gt must be"):
        encoded_from_embeddings(q, v, mask, torch.tensor([0, 1, 2]), {"inh": 1.0})
    with pytest.raises(ValueError, match="query dim 3 != video dim 4"):
        encoded_from_embeddings({"inh": torch.randn(3, 3)}, v, mask, torch.tensor([0, 1, 1]),
                                {"inh": 1.0})
    with pytest.raises(ValueError, match="prefix of valid frames"):
        encoded_from_embeddings(q, v, torch.tensor([[1.0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
                                torch.tensor([0, 1, 1]), {"inh": 1.0})

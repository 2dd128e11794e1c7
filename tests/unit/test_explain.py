"""The retrieval explorer's data (trainer/explain.py) against the full score matrix, and its page
(trainer/infra/explorer_html.py) as text: self-contained, escaped, one panel per query shown."""
from __future__ import annotations

import re

import pytest
import torch

from bench.eval import make_embeddings
from trainer.explain import explain, pick_queries, recall_buckets
from trainer.infra.explorer_html import render
from trainer.method.metrics import (encoded_from_embeddings, rank_counts, rank_metrics,
                                    score_matrix)

WEIGHTS = {"inh": 0.7, "exp": 0.3}


@pytest.fixture(scope="module")
def gallery():
    queries, videos, mask, gt, video_ids, cap_ids = make_embeddings(90, 30, 12, 16, seed=3)
    enc = encoded_from_embeddings(queries, videos, mask, gt, WEIGHTS, video_chunk=7)
    words = torch.arange(90) % 9 + 3
    texts = [f"caption {i} <b>&</b>" if i % 4 else "" for i in range(90)]
    return enc, videos, mask, gt, video_ids, cap_ids, words, texts


def test_panels_agree_with_the_full_score_matrix(gallery):
    enc, videos, mask, gt, video_ids, cap_ids, words, texts = gallery
    ex = explain(enc, video_ids, cap_ids, mask.sum(dim=1), words, texts)
    ranks = rank_counts(enc)
    assert ex.metrics == rank_metrics(ranks)
    full = score_matrix(enc)                                   # (Nq, Nv), gallery order
    kinds = [q.kind for q in ex.queries]
    assert kinds == ["worst"] * 8 + ["best"] * 4
    shown = {cap_ids.index(q.cap_id) for q in ex.queries}
    worst_ranks = [q.rank for q in ex.queries if q.kind == "worst"]
    assert worst_ranks == sorted(worst_ranks, reverse=True)
    assert min(worst_ranks) >= max(int(r) for i, r in enumerate(ranks) if i not in shown)
    for view in ex.queries:
        i = cap_ids.index(view.cap_id)
        rel = int(gt[i])
        assert view.video_id == video_ids[rel] and view.rank == int(ranks[i])
        assert view.rank == int((full[i] >= full[i, rel]).sum())
        assert view.text == texts[i] and view.words == int(words[i])
        top = full[i].topk(5)
        assert [v for v, _ in view.top] == [video_ids[int(j)] for j in top.indices]
        assert [s for _, s in view.top] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert view.curves[0].video_id == view.video_id
        assert [c.video_id for c in view.curves][-1] == view.top[0][0]
        for curve in view.curves:
            j = video_ids.index(curve.video_id)
            n = int(mask[j].sum())
            fused = 0.0
            for b, w in WEIGHTS.items():   # each clip's cosine, recomputed from the raw inputs
                q = torch.nn.functional.normalize(enc.queries[b][i], dim=0)
                v = torch.nn.functional.normalize(videos[b][j, :n], dim=1)
                assert curve.cos[b] == pytest.approx((v @ q).tolist(), abs=1e-5)
                fused += w * max(curve.cos[b])
            assert curve.score == pytest.approx(fused, abs=1e-5)
            assert curve.score == pytest.approx(float(full[i, j]), abs=1e-5)


def test_best_are_a_seeded_sample_of_the_best_ranked():
    ranks = torch.tensor([5, 1, 1, 9, 1, 2, 1, 3, 1, 7])
    picked = pick_queries(ranks, worst=2, best=3, seed=0)
    assert picked[:2] == [(3, "worst"), (9, "worst")]
    best = [q for q, kind in picked if kind == "best"]
    assert len(best) == 3 and all(ranks[q] == 1 for q in best)
    assert picked == pick_queries(ranks, worst=2, best=3, seed=0)
    draws = {tuple(q for q, _ in pick_queries(ranks, 2, 3, seed)) for seed in range(20)}
    assert len(draws) > 1, "the sample of the best never changes with the seed"
    assert pick_queries(torch.tensor([2, 1]), worst=5, best=4) == [(0, "worst"), (1, "worst")]


def test_recall_buckets_partition_the_queries():
    values = torch.tensor([1, 1, 2, 3, 3, 3, 8, 9, 20, 40, 40, 41])
    ranks = torch.tensor([1, 3, 1, 12, 1, 1, 200, 1, 5, 1, 2, 1])
    buckets = recall_buckets(values, ranks, n=4)
    assert sum(b.queries for b in buckets) == len(values)
    for a, b in zip(buckets, buckets[1:]):
        assert a.hi + 1 == b.lo
    assert buckets[0].lo == 1 and buckets[-1].hi == 41
    overall = rank_metrics(ranks)
    for k in ("R1", "R5", "R10", "R100"):
        mean = sum(b.recall[k] * b.queries for b in buckets) / len(values)
        assert mean == pytest.approx(overall[k])
    one = recall_buckets(torch.full((5,), 7), torch.ones(5, dtype=torch.long))
    assert [(b.lo, b.hi, b.queries) for b in one] == [(7, 7, 5)]


def test_page_is_self_contained_escaped_and_has_one_panel_per_query(gallery):
    enc, videos, mask, gt, video_ids, cap_ids, words, texts = gallery
    ex = explain(enc, video_ids, cap_ids, mask.sum(dim=1), words, texts, worst=5, best=3)
    page = render(ex, "best/ on <test>")
    assert len(re.findall(r'<article class="query (worst|best)"', page)) == 8
    assert "<script" not in page and "<b>" not in page and "&lt;b&gt;" in page
    assert "on &lt;test&gt;" in page
    refs = re.findall(r'(?:src|href)="([^"]*)"|url\(([^)]*)\)', page)
    assert all(ref.startswith(("data:", "#")) for pair in refs for ref in pair if ref), refs
    untitled = [q for q in ex.queries if not q.text]
    for q in untitled:   # no caption text: the heading names the caption id
        assert re.search(rf"rank {q.rank} of 30 &middot; {re.escape(q.cap_id)}</h3>", page)
    assert page.count("<polyline") == sum(len(c.cos) for q in ex.queries for c in q.curves)

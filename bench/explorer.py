"""The retrieval explorer on a TVR-sized gallery: its cost over a plain evaluation, and its size.

The gallery is already encoded (bench.eval's random embeddings: both branches, d=384, 1..128
valid clips per video, a planted signal), 2,000 videos and 10,000 queries with captions of 4..30
words. Encoding is shared by both paths and left out.

- baseline: what an evaluation does after encoding (every query's rank, the metrics).
- explorer: trainer.explain.explain (the same ranks and metrics, recall by length buckets, top
  videos and per-clip curves of the queries shown) + rendering the page.

Prints one JSON line: medians over ``--runs``, wall and CPU seconds, the page's bytes (and
gzipped, as a browser or MLflow's artifact store may serve it) and the number of query panels.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time

import torch

from bench.eval import WEIGHTS, make_embeddings
from trainer.explain import explain
from trainer.infra.explorer_html import render
from trainer.method.metrics import encoded_from_embeddings, rank_counts, rank_metrics

WORDS = ("a person walks into the room and picks up a red cup while another one talks on the "
         "phone near the window then sits down").split()


def captions(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Query lengths (4..30 words) and caption texts of those lengths."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(4, 31, (n,), generator=g)
    texts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(int(w)))
             for i, w in enumerate(words)]
    return words, texts


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=2000)
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the page here")
    a = p.parse_args()
    queries, videos, mask, gt, video_ids, cap_ids = make_embeddings(a.queries, a.videos, 128, 384)
    words, texts = captions(a.queries)
    enc = encoded_from_embeddings(queries, videos, mask, gt, WEIGHTS, 32)
    del videos
    video_len = mask.sum(dim=1)
    base_t, base_c, ex_t, ex_c, page_t, page_c = [], [], [], [], [], []
    for _ in range(a.runs):   # alternated, so that load from other processes hits both alike
        base, t, c = _timed(lambda: rank_metrics(rank_counts(enc)))
        base_t.append(t)
        base_c.append(c)
        ex, t, c = _timed(lambda: explain(enc, video_ids, cap_ids, video_len, words, texts))
        ex_t.append(t)
        ex_c.append(c)
        page, t, c = _timed(lambda: render(ex, "bench"))
        page_t.append(t)
        page_c.append(c)
    assert ex.metrics == base, "the explorer's metrics differ from the evaluation's"
    if a.out:
        from sharding.files import write_atomic

        write_atomic(a.out, page)
    med = statistics.median
    data = page.encode()
    print(json.dumps({
        "bench": "explorer", "videos": a.videos, "queries": a.queries, "runs": a.runs,
        "threads": torch.get_num_threads(),
        "baseline_s": round(med(base_t), 3), "baseline_cpu_s": round(med(base_c), 3),
        "explain_s": round(med(ex_t), 3), "explain_cpu_s": round(med(ex_c), 3),
        "render_s": round(med(page_t), 4), "render_cpu_s": round(med(page_c), 4),
        "overhead_s": round(med(ex_t) + med(page_t) - med(base_t), 3),
        "html_bytes": len(data), "html_gzip_bytes": len(gzip.compress(data)),
        "panels": len(ex.queries), "SumR": round(ex.metrics["SumR"], 2)}))


if __name__ == "__main__":
    main()

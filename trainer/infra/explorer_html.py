"""The retrieval explorer as one self-contained HTML page (docs/evaluation.md).

Plain HTML and CSS with inline SVG charts: no script, no external file, no server, so the page
opens from disk, from MLflow's artifact view or from an e-mail, and stays small (a few KB per
query shown). Every text that comes from data (ids, captions) is escaped.
"""
from __future__ import annotations

from html import escape

from sharding.files import write_atomic
from trainer.explain import Bucket, Curve, Explanation, QueryView

BRANCH_COLOURS = {"inh": "#1f6fb4", "exp": "#d9480f"}
RECALL_COLOURS = ("#c5d9ee", "#8db3dc", "#4f86c2", "#1d4f8c")   # R1, R5, R10, R100
METRIC_ORDER = ("R1", "R5", "R10", "R100", "SumR", "MedR", "MeanR", "MRR")

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#1b1f24;
padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:0 0 2px;font-weight:600}.sub,.meta{color:#57606a}.meta{font-size:12px}
table{border-collapse:collapse}td,th{padding:3px 8px;text-align:right;border-bottom:1px solid #eee}
th{font-weight:600;background:#f6f8fa}td.l,th.l{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#57606a}
.query{border:1px solid #d0d7de;border-radius:6px;padding:10px 12px;margin:10px 0}
.query.worst{border-left:5px solid #cf222e}.query.best{border-left:5px solid #1a7f37}
tr.gt td{background:#fff3cd;font-weight:600}.key{display:inline-block;width:12px;height:3px;
vertical-align:middle;margin:0 4px 0 10px}.key.bar{height:10px}
svg text{font:11px system-ui,sans-serif;fill:#444}
"""


def render(ex: Explanation, title: str = "") -> str:
    """The page for ``ex``; ``title`` names what was evaluated (checkpoint and split)."""
    fused = " + ".join(f"{w:g}&middot;{escape(b)}" for b, w in ex.weights.items())
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>Retrieval explorer {escape(title)}</title>",
        f'<link rel="icon" href="data:,"><style>{STYLE}</style></head><body>',
        f'<h1>Retrieval explorer</h1><p class="sub">{escape(title)} &middot; {ex.num_videos} '
        f"videos &middot; {ex.num_queries} queries &middot; score = {fused} (each branch: best "
        "clip's cosine)</p>",
        '<h2 id="metrics">Metrics</h2>', _metrics_table(ex.metrics),
        '<h2 id="recall">Recall by length</h2>', _recall_legend(),
        '<div class="row">',
        _bucket_figure(ex.by_video_length, "relevant video's length (clips)"),
        _bucket_figure(ex.by_query_length, "query length (words)"),
        "</div>",
    ]
    for kind, heading in (("worst", "Worst queries"), ("best", "Best queries (a sample)")):
        shown = [q for q in ex.queries if q.kind == kind]
        if shown:
            parts.append(f'<h2 id="{kind}">{heading}</h2>{_branch_legend(ex.weights)}')
            parts.extend(_query_panel(q, ex.num_videos) for q in shown)
    parts.append("</body></html>")
    return "\n".join(parts)


def _metrics_table(metrics: dict[str, float]) -> str:
    names = [m for m in METRIC_ORDER if m in metrics]
    head = "".join(f"<th>{m}</th>" for m in names)
    cells = "".join(f"<td>{metrics[m]:.2f}</td>" for m in names)
    return f'<table class="metrics"><tr>{head}</tr><tr>{cells}</tr></table>'


def _recall_legend() -> str:
    keys = "".join(f'<span class="key bar" style="background:{c}"></span>R@{k}'
                   for c, k in zip(RECALL_COLOURS, (1, 5, 10, 100)))
    return f'<p class="meta">Recall (%) of the queries in each bucket:{keys}</p>'


def _branch_legend(weights: dict[str, float]) -> str:
    keys = "".join(f'<span class="key" style="background:{BRANCH_COLOURS.get(b, "#555")}">'
                   f"</span>{escape(b)}" for b in weights)
    return (f'<p class="meta">Cosine of the query with each clip of a video, per branch:{keys}'
            " (dot: the clip that scores the branch)</p>")


def _bucket_figure(buckets: list[Bucket], what: str) -> str:
    w, h, left, bottom, top = 520, 200, 34, 34, 14
    plot_h = h - bottom - top
    group = (w - left - 8) / max(len(buckets), 1)
    bar = group * 0.8 / 4
    svg = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">']
    for v in (0, 50, 100):
        y = top + plot_h * (1 - v / 100)
        svg.append(f'<line x1="{left}" x2="{w - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v}</text>')
    for i, b in enumerate(buckets):
        x0 = left + i * group + group * 0.1
        for k, (name, colour) in enumerate(zip(("R1", "R5", "R10", "R100"), RECALL_COLOURS)):
            val = b.recall[name]
            bh = plot_h * val / 100
            svg.append(f'<rect x="{x0 + k * bar:.1f}" y="{top + plot_h - bh:.1f}" '
                       f'width="{bar - 1:.1f}" height="{bh:.1f}" fill="{colour}">'
                       f"<title>{name} {val:.1f}% of {b.queries} queries</title></rect>")
        label = f"{b.lo}" if b.lo == b.hi else f"{b.lo}&#8211;{b.hi}"
        cx = x0 + 2 * bar
        svg.append(f'<text x="{cx:.1f}" y="{h - bottom + 14}" text-anchor="middle">{label}'
                   f'</text><text x="{cx:.1f}" y="{h - bottom + 27}" text-anchor="middle" '
                   f'fill="#888">n={b.queries}</text>')
    svg.append("</svg>")
    return f"<figure>{''.join(svg)}<figcaption>by {escape(what)}</figcaption></figure>"


def _query_panel(q: QueryView, num_videos: int) -> str:
    text = f"&ldquo;{escape(q.text)}&rdquo;" if q.text else escape(q.cap_id)
    gt = ' class="gt"'
    rows = "".join(
        f'<tr{gt if vid == q.video_id else ""}><td>{i + 1}</td>'
        f'<td class="l">{escape(vid)}</td><td>{score:.3f}</td></tr>'
        for i, (vid, score) in enumerate(q.top))
    values = [c for curve in q.curves for cs in curve.cos.values() for c in cs]
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.08, 0.02)
    figures = "".join(_curve_figure(c, "relevant" if c.video_id == q.video_id else "top-1",
                                    lo - pad, hi + pad) for c in q.curves)
    return (f'<article class="query {q.kind}"><h3>rank {q.rank} of {num_videos} &middot; '
            f'{text}</h3><p class="meta">{escape(q.cap_id)} &middot; {q.words} words &middot; '
            f"relevant video {escape(q.video_id)}</p>"
            f'<div class="row"><table class="top"><tr><th>#</th><th class="l">top videos</th>'
            f"<th>score</th></tr>{rows}</table>{figures}</div></article>")


def _curve_figure(curve: Curve, role: str, lo: float, hi: float) -> str:
    w, h, left, right, top, bottom = 340, 150, 40, 10, 10, 22
    pw, ph = w - left - right, h - top - bottom
    svg = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafbfc" '
           'stroke="#d0d7de"/>']
    for v in (lo, (lo + hi) / 2, hi):
        y = top + ph * (hi - v) / (hi - lo)
        svg.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    n = max(len(c) for c in curve.cos.values())
    xs = [left + pw * (i + 0.5) / n for i in range(n)]
    for branch, cos in curve.cos.items():
        colour = BRANCH_COLOURS.get(branch, "#555")
        pts = " ".join(f"{x:.1f},{top + ph * (hi - c) / (hi - lo):.1f}" for x, c in zip(xs, cos))
        peak = max(range(len(cos)), key=cos.__getitem__)
        py = top + ph * (hi - cos[peak]) / (hi - lo)
        svg.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.6"/>'
                   f'<circle cx="{xs[peak]:.1f}" cy="{py:.1f}" r="3" fill="{colour}">'
                   f"<title>{escape(branch)}: clip {peak + 1}, cosine {cos[peak]:.3f}</title>"
                   "</circle>")
    svg.append(f'<text x="{left}" y="{h - 6}">clip 1</text><text x="{w - right}" y="{h - 6}" '
               f'text-anchor="end">clip {n}</text></svg>')
    return (f"<figure>{''.join(svg)}<figcaption>{role}: {escape(curve.video_id)} &middot; score "
            f"{curve.score:.3f}</figcaption></figure>")


def write(ex: Explanation, path, title: str = ""):
    """Render ``ex`` to ``path`` atomically; returns the path."""
    return write_atomic(path, render(ex, title))

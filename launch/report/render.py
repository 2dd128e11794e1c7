"""A report's plots (matplotlib, written atomically as PNG) and its Markdown, for ``dldkd
report`` and a sweep's own trial table and curves."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from launch.report.claims import RESOLVE_SUMR, ClaimResult
from launch.report.runs import SCORES, RunRecord
from launch.report.stats import (ablation_rows, by_teacher, groups, mean_std, score, short_path,
                                 source_of, teacher_series, teacher_sumr_of)
from sharding.files import atomic_path
from trainer.infra.tags import VAL_IS_TEST_TAG

# ------------------------------------------------------------------------------ plots


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, ylabel: str,
                title: str) -> Path:
    """One line per series against step: a sweep's trials, or a report's variants."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_teacher_quality(series: dict[str, list[RunRecord]], base: list[RunRecord],
                         path: Path) -> Path:
    """Student SumR against the teacher's zero-shot SumR, with and without distillation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    xs_all = []
    for name, group in sorted(series.items()):
        src = source_of(group)
        points = by_teacher(group, src)
        xs = [x for x, _ in points]
        xs_all += xs
        means = [mean_std(v)[0] for _, v in points]
        stds = [0.0 if len(v) < 2 else mean_std(v)[1] for _, v in points]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                    label=f"{name} (distilled, {src})")
    if xs_all:
        lo, hi = min(xs_all), max(xs_all)
        for label, group in sorted(groups(base).items()):
            src = source_of(group)
            m, s = mean_std([score(r, src)["SumR"] for r in group])
            s = 0.0 if math.isnan(s) else s
            line = ax.hlines(m, lo, hi, linestyles="--", label=f"{label} (no teacher, {src})")
            ax.fill_between([lo, hi], m - s, m + s, alpha=0.15, color=line.get_color())
        ax.plot([lo, hi], [lo, hi], ":", color="grey", label="teacher alone (y = x)")
    ax.set_xlabel("teacher zero-shot SumR (val)")
    ax.set_ylabel("student SumR (mean ± std over seeds)")
    ax.set_title("when does distillation help?")
    ax.grid(alpha=0.3)
    if ax.lines or ax.collections:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_kd_gain(results: list[ClaimResult], records: list[RunRecord], path: Path) -> Path | None:
    """Paired SumR gain of each series' claims against the teacher's own zero-shot SumR."""
    from matplotlib.figure import Figure

    series: dict[str, list[tuple[float, ClaimResult]]] = defaultdict(list)
    for res in results:
        x = teacher_sumr_of(records, res.better)
        if res.series and x is not None:
            series[res.series].append((x, res))
    if not series:
        return None
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for name, points in sorted(series.items()):
        points.sort(key=lambda p: p[0])
        xs = [x for x, _ in points]
        ys = [r.mean for _, r in points]
        err = [[r.mean - r.low for _, r in points], [r.high - r.mean for _, r in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(0, color="grey", linestyle=":")
    ax.set_xlabel("teacher zero-shot SumR (val)")
    ax.set_ylabel("paired SumR gain (mean, 95% t CI)")
    ax.set_title("KD gain against teacher quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# ------------------------------------------------------------------------------ Markdown


def _pm(cell: tuple[float, float] | None) -> str:
    if cell is None:
        return "-"
    return f"{cell[0]:.1f}" if math.isnan(cell[1]) else f"{cell[0]:.1f} ± {cell[1]:.1f}"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def ablation_table(rows: list[dict]) -> str:
    lines = ["| variant | n | scores | R@1 | R@5 | R@10 | R@100 | SumR |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['n']} | {row['source']} | "
                     + " | ".join(_pm(row.get(k)) for k in SCORES) + " |")
    return "\n".join(lines) + "\n"


def teacher_table(series: dict[str, list[RunRecord]], base: list[RunRecord]) -> str:
    base_cell, base_n = None, 0
    if base:
        src = source_of(base)
        base_cell, base_n = mean_std([score(r, src)["SumR"] for r in base]), len(base)
    lines = ["| series | teacher | teacher zero-shot SumR (val) | student SumR, distilled (n) | "
             "student SumR, no teacher (n) | gain |", "|---|---|---|---|---|---|"]
    for name, group in sorted(series.items()):
        src = source_of(group)
        names = {r.teacher_sumr: short_path(r.params.get("teacher.pretrained", "?")) for r in group}
        for x, ys in by_teacher(group, src):
            m = mean_std(ys)
            gain = "-" if base_cell is None else f"{m[0] - base_cell[0]:+.1f}"
            lines.append(f"| {name} | {names[x]} | {x:.1f} | {_pm(m)} ({len(ys)}) | "
                         f"{_pm(base_cell)} ({base_n}) | {gain} |")
    return "\n".join(lines) + "\n"


def claims_table(results: list[ClaimResult], records: list[RunRecord]) -> str:
    lines = ["| claim | better | worse | teacher SumR | seeds | SumR difference (mean) | 95% CI "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = teacher_sumr_of(records, r.better)
        lines.append(f"| {r.name} | {r.better} | {r.worse} | {_num(t)} | {len(r.seeds)} | "
                     f"{r.mean:+.1f} | {_ci(r.low, r.high)} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def _ci(low: float, high: float) -> str:
    return "-" if low != low else f"[{low:+.1f}, {high:+.1f}]"


def power_table(results: list[ClaimResult], resolve: float) -> str:
    """Each claim's paired spread, the half-width its seeds reached, and the seeds a 95% CI
    half-width of ``resolve`` SumR needs at that spread (launch/report/claims.py)."""
    lines = ["| claim | seeds | sd of the paired difference | 95% CI half-width | "
             f"seeds for a half-width of {resolve:g} |", "|---|---|---|---|---|"]
    for r in results:
        need = r.seeds_needed(resolve)
        need_cell = "-" if len(r.seeds) < 2 else str(need) if need else "more than 10,000"
        lines.append(f"| {r.name} | {len(r.seeds)} | {_num(r.sd)} | {_num(r.half_width)} | "
                     f"{need_cell} |")
    return "\n".join(lines) + "\n"


def cost_table(records: list[RunRecord]) -> str:
    lines = ["| variant | n | data ms/step | teacher ms/step | student ms/step | samples/s | "
             "wall s per run (mean) | wall min, all runs |", "|---|---|---|---|---|---|---|---|"]
    for label, group in sorted(groups(records).items()):
        def med(attr: str) -> float | None:
            values = [getattr(r, attr) for r in group if getattr(r, attr) is not None]
            return statistics.median(values) if values else None

        walls = [r.wall_s for r in group if r.wall_s is not None]
        lines.append(f"| {label} | {len(group)} | {_num(med('data_ms'))} | "
                     f"{_num(med('teacher_ms'))} | {_num(med('student_ms'))} | "
                     f"{_num(med('samples_s'))} | "
                     f"{_num(statistics.fmean(walls) if walls else None, '.0f')} | "
                     f"{_num(sum(walls) / 60 if walls else None)} |")
    return "\n".join(lines) + "\n"


def runs_table(records: list[RunRecord]) -> str:
    lines = ["| run | variant | seed | status | scores | SumR | best val SumR | teacher SumR | "
             "val evals |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r.label, r.params.get("train.seed", ""), r.name)):
        src = "test" if "SumR" in r.test else "val" if "SumR" in r.val else "-"
        lines.append(f"| {r.name} | {r.label} | {r.params.get('train.seed', '-')} | {r.status} "
                     f"| {src} | {_num(score(r, src).get('SumR') if src != '-' else None)} | "
                     f"{_num(r.val.get('SumR'))} | {_num(r.teacher_sumr)} | {len(r.curve)} |")
    return "\n".join(lines) + "\n"


def trials_table(rows: list[tuple[str, dict[str, float]]], params: dict[str, dict]) -> str:
    """A sweep's trials: trial, its sampled values, the metrics of its best evaluation."""
    from trainer.evaluate import COLUMNS

    keys = sorted({k for p in params.values() for k in p})
    cols = [c for c in (*COLUMNS, "step") if any(c in m for _, m in rows)]
    lines = ["| trial | " + " | ".join(keys + cols) + " |",
             "|" + "---|" * (1 + len(keys) + len(cols))]
    for label, m in rows:
        vals = [_value(params.get(label, {}).get(k, "")) for k in keys]
        vals += ["-" if c not in m else f"{m[c]:.0f}" if c == "step" else f"{m[c]:.2f}"
                 for c in cols]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def params_text(values: dict) -> str:
    """A trial's sampled values on one line."""
    return " ".join(f"{k}={_value(v)}" for k, v in sorted(values.items()))


def _value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _val_is_test_note(records: list[RunRecord]) -> list[str]:
    same = [r.name for r in records if r.val_is_test]
    if not same:
        return []
    return ["", f"**Validation was the test split** for {len(same)} of {len(records)} runs "
            f"(MLflow tag `{VAL_IS_TEST_TAG}`: {', '.join(same[:5])}"
            f"{' ...' if len(same) > 5 else ''}): they chose their best weights and stopped "
            "early on the test captions, so their test scores are not held out."]


def render(title: str, header: list[str], records: list[RunRecord], plots: dict[str, Path | None],
           teacher_note: str, claims: list[ClaimResult] = (), resolve: float = RESOLVE_SUMR
           ) -> str:
    series, base = teacher_series(records)
    scored = [r for r in records if r.scored]
    parts = [f"# {title}", "", *header, "",
             f"{len(records)} run(s), {len(scored)} with scores. Scores are `test/*` (the best "
             "validation weights on data.test) when every run of a row logged them, else each "
             "run's best validation evaluation (`val`); mean ± sample std over the row's n runs "
             "(no ± when n = 1).", *_val_is_test_note(records),
             "", "## Ablation", "", ablation_table(ablation_rows(records))]
    if claims:
        parts += ["## Claims", "", claims_table(claims, records),
                  "Paired by seed: the SumR difference better - worse of each seed both variants "
                  "ran; 95% CI: Student t on the paired differences (mean ± t(n-1) · sd / √n). "
                  "A claim holds when the whole CI is above 0, is reversed when it is below 0, "
                  "and otherwise the data rule out only a difference larger than the CI's "
                  "farther end.", ""]
        if plots.get("kd_gain"):
            parts += [f"![KD gain against teacher quality]({plots['kd_gain'].name})", ""]
        parts += ["## Power", "", power_table(claims, resolve),
                  f"Seeds for a half-width of {resolve:g}: the fewest paired seeds n with "
                  f"t(n-1) · sd / √n ≤ {resolve:g}, if the paired spread stays at the sd "
                  "measured here. A claim is extended by giving its two variants more seeds "
                  "(`train.seed: {range: [1, N]}` in their bundles); the rerun of the sweep "
                  "runs only the new trials.", ""]
    parts += ["## Teacher quality", ""]
    if plots.get("teacher"):
        parts += [f"![teacher quality]({plots['teacher'].name})", "", teacher_table(series, base)]
    else:
        parts += [teacher_note, ""]
    parts += ["## Training curves", "", f"![training curves]({plots['curves'].name})", "",
              "Validation SumR at each evaluation, mean over the runs of a variant that reached "
              "that step (early stopping can end a seed sooner).", "",
              "## Compute cost", "", cost_table(scored),
              "Per step: medians over each run's logged windows of `perf/data_ms` (waiting for the "
              "batch), `perf/teacher_ms` (0 = no teacher; it falls once the frame-embedding cache "
              "is warm) and `perf/student_ms` (forward, loss, backward, optimizer), then over "
              "runs. Wall: `perf/wall_s`, set-up to clean-up of each run.", "",
              "## Runs", "", runs_table(records)]
    return "\n".join(parts)

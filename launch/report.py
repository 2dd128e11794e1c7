"""``dldkd report``: a Markdown report of a finished sweep (or an MLflow experiment), from MLflow.

Everything comes from what the runs logged: the variant (tag ``dldkd.variant``, else the params
that differ between runs), the seed-averaged scores (``test/*`` when every run of a row has
them, else each run's best validation evaluation), the validation curves, the teacher's
zero-shot quality (``teacher/*``, logged by sweeps with ``teacher_eval: true``) and the cost
(``perf/teacher_ms``, ``perf/samples_s``, ``perf/wall_s``). The report and its plots are written
to a folder and, for a sweep, logged to its parent run under ``report/``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from launch.claims import ClaimResult, evaluate_claim
from launch.sweep import CLAIMS_PARAM, IDENTITY_KEYS, VARIANT_PARAM, VARIANT_TAG
from sharding.files import atomic_path, write_atomic
from sharding.splits import VAL_IS_TEST_TAG

SCORES = ("R1", "R5", "R10", "R100", "SumR")
SWEEP_KIND = ("dldkd.kind", "sweep")
RUN_KEY_TAG = "dldkd.run_key"
# Params that never tell variants apart: each trial's identity, the seed, the variant's own name.
NOT_A_SETTING = (*IDENTITY_KEYS, "train.seed", VARIANT_PARAM)


class ReportError(ValueError):
    """The sweep or experiment cannot be reported; the message says what exists instead."""


@dataclass
class RunRecord:
    """One run, as far as the report needs it."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    variant: str = ""
    test: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)  # the best validation evaluation
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val/SumR)
    teacher_ms: float | None = None
    data_ms: float | None = None
    student_ms: float | None = None
    samples_s: float | None = None
    val_is_test: bool = False   # selected on the test captions (data.val = data.test)
    wall_s: float | None = None
    teacher_sumr: float | None = None
    uses_teacher: bool | None = None
    label: str = ""

    @property
    def scored(self) -> bool:
        return "SumR" in self.test or "SumR" in self.val


# ------------------------------------------------------------------------------ reading MLflow


def resolve_tracking_uri(explicit: str | None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise ReportError("no MLflow store given: pass --tracking-uri or set MLFLOW_TRACKING_URI "
                          "(a local sweep's store is sqlite:///<run.storage>/<sweep>/mlflow.db)")
    return uri


def _search(client, experiment_ids: list[str], filter_string: str = "") -> list:
    """Every matching run, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def find_sweep(client, name: str, uri: str):
    """The parent run of sweep ``name`` (the newest if the name was reused)."""
    ids = _experiment_ids(client)
    kind = f"tags.`{SWEEP_KIND[0]}` = '{SWEEP_KIND[1]}'"
    found = _search(client, ids, f"{kind} and tags.`{RUN_KEY_TAG}` = '{name}'") if ids else []
    if not found:
        names = sorted({r.data.tags.get(RUN_KEY_TAG, r.info.run_name)
                        for r in (_search(client, ids, kind) if ids else [])})
        raise ReportError(f"no sweep named {name!r} in {uri}; sweeps there: "
                          + (", ".join(names) if names else "none (is this the right store?)"))
    return max(found, key=lambda r: r.info.start_time or 0)


def sweep_runs(client, name: str, uri: str) -> tuple[Any, list]:
    parent = find_sweep(client, name, uri)
    children = _search(client, [parent.info.experiment_id],
                       f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, children


def experiment_runs(client, name: str, uri: str) -> list:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no MLflow experiment named {name!r} in {uri}; "
                          f"experiments there: {', '.join(names) or 'none'}")
    return [r for r in _search(client, [exp.experiment_id])
            if r.data.tags.get(SWEEP_KIND[0]) != SWEEP_KIND[1]]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)
                  if math.isfinite(m.value))


def read_run(client, run) -> RunRecord:
    """Scores, curve, cost and teacher quality of one run."""
    metrics = run.data.metrics
    rec = RunRecord(run.info.run_id, run.info.run_name or run.info.run_id, run.info.status,
                    dict(run.data.params), variant=run.data.tags.get(VARIANT_TAG, ""),
                    val_is_test=run.data.tags.get(VAL_IS_TEST_TAG) == "true")
    rec.test = {k: metrics[f"test/{k}"] for k in SCORES if f"test/{k}" in metrics}
    rec.curve = _history(client, rec.run_id, "val/SumR")
    if rec.curve:
        best_step = max(rec.curve, key=lambda p: p[1])[0]  # the first best, as early stopping
        for k in SCORES:
            at = dict(_history(client, rec.run_id, f"val/{k}")).get(best_step)
            if at is not None:
                rec.val[k] = at
    for attr, key in (("teacher_ms", "perf/teacher_ms"), ("data_ms", "perf/data_ms"),
                      ("student_ms", "perf/student_ms"), ("samples_s", "perf/samples_s")):
        values = [v for _, v in _history(client, rec.run_id, key)]
        setattr(rec, attr, statistics.median(values) if values else None)
    rec.wall_s = metrics.get("perf/wall_s")
    rec.teacher_sumr = metrics.get("teacher/SumR")
    rec.uses_teacher = _uses_teacher(rec.params)
    return rec


def _uses_teacher(params: dict[str, str]) -> bool | None:
    """What the run's own config says (Config.uses_teacher), None when its params are missing."""
    from trainer.config import Config, ConfigError, LossConfig, ModelConfig

    try:
        return Config(model=ModelConfig(branches=params["model.branches"]),
                      loss=LossConfig(kd=params["loss.kd"],
                                      targets=params["loss.targets"])).uses_teacher()
    except (KeyError, ConfigError):
        return None


# ------------------------------------------------------------------------------ grouping


def _short(value: str) -> str:
    """Paths shown by their last component."""
    return value.rstrip("/").rsplit("/", 1)[-1] if "/" in value else value


def varying(records: Iterable[RunRecord], skip: Iterable[str] = ()) -> list[str]:
    """Setting params whose values differ between the records (seed and identity excluded;
    a run that never logged its config, e.g. stopped before it started, differs in nothing)."""
    records = list(records)
    skip = set(NOT_A_SETTING) | set(skip)
    keys = sorted({k for r in records for k in r.params} - skip)
    return [k for k in keys if len({r.params[k] for r in records if k in r.params}) > 1]


def assign_labels(records: list[RunRecord]) -> None:
    """Label = the variant name plus whatever else differs within that variant; without
    variants, the differing params (``optim.lr=0.001``)."""
    by_variant: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_variant[r.variant].append(r)
    for variant, group in by_variant.items():
        keys = varying(group)
        for r in group:
            extra = " ".join(f"{k}={_short(r.params.get(k, '-'))}" for k in keys)
            r.label = " ".join(p for p in (variant, extra) if p) or "all runs"


def groups(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        out[r.label].append(r)
    return dict(out)


def source_of(group: list[RunRecord]) -> str:
    """``test`` when every run of the group logged test metrics, else ``val`` (best eval)."""
    return "test" if all("SumR" in r.test for r in group) else "val"


def score(r: RunRecord, source: str) -> dict[str, float]:
    return r.test if source == "test" else r.val


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value: no spread was measured)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def ablation_rows(records: list[RunRecord]) -> list[dict]:
    """One row per label over its scored runs: n, source, mean and std of each score."""
    rows = []
    for label, group in groups([r for r in records if r.scored]).items():
        src = source_of(group)
        row = {"label": label, "n": len(group), "source": src}
        for k in SCORES:
            values = [score(r, src)[k] for r in group if k in score(r, src)]
            if values:
                row[k] = mean_std(values)
        rows.append(row)
    rows.sort(key=lambda row: -row.get("SumR", (-math.inf, 0))[0])
    return rows


def teacher_series(records: list[RunRecord]) -> tuple[dict[str, list[RunRecord]], list[RunRecord]]:
    """Distilled runs grouped by their settings apart from the teacher (series seen with two or
    more teachers), and the runs that use no teacher (the without-distillation baseline)."""
    scored = [r for r in records if r.scored]
    base = [r for r in scored if r.uses_teacher is False]
    distilled = [r for r in scored if r.uses_teacher and r.teacher_sumr is not None]
    keys = [k for k in varying(distilled) if not k.startswith("teacher.")]
    by_setting: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in distilled:
        by_setting[tuple(r.params.get(k) for k in keys)].append(r)
    series = {}
    for group in by_setting.values():
        if len({r.teacher_sumr for r in group}) >= 2:
            name = min((r.variant or r.label for r in group), key=lambda s: (len(s), s))
            series[name] = group
    return series, base


def claim_results(records: list[RunRecord], claims: dict[str, dict]) -> list[ClaimResult]:
    """Each claim's paired test on SumR (test scores when every run of both variants has them,
    else the best validation evaluation), seeds paired by ``train.seed``."""
    by_variant: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.scored and r.variant:
            by_variant[r.variant].append(r)
    out = []
    for name, claim in claims.items():
        pair = by_variant.get(claim["better"], []) + by_variant.get(claim["worse"], [])
        src = source_of(pair) if pair else "val"
        scores = {v: {r.params.get("train.seed", r.run_id): score(r, src)["SumR"]
                      for r in by_variant.get(v, []) if "SumR" in score(r, src)}
                  for v in (claim["better"], claim["worse"])}
        result = evaluate_claim(name, claim["better"], claim["worse"], scores,
                                claim.get("series", ""))
        if result is not None:
            out.append(result)
    return out


def teacher_sumr_of(records: list[RunRecord], variant: str) -> float | None:
    values = [r.teacher_sumr for r in records if r.variant == variant and r.teacher_sumr is not None]
    return statistics.fmean(values) if values else None


# ------------------------------------------------------------------------------ plots


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_teacher_quality(series: dict[str, list[RunRecord]], base: list[RunRecord],
                         path: Path) -> Path:
    """Student SumR against the teacher's zero-shot SumR, with and without distillation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    xs_all = []
    for name, group in sorted(series.items()):
        src = source_of(group)
        points = _by_teacher(group, src)
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


def _by_teacher(group: list[RunRecord], src: str) -> list[tuple[float, list[float]]]:
    """(teacher SumR, student SumRs) sorted by the teacher's quality."""
    points: dict[float, list[float]] = defaultdict(list)
    for r in group:
        points[r.teacher_sumr].append(score(r, src)["SumR"])
    return sorted(points.items())


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
    ax.set_ylabel("paired SumR gain (mean, 95% bootstrap CI)")
    ax.set_title("KD gain against teacher quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def mean_curve(group: list[RunRecord]) -> list[tuple[int, float, int]]:
    """(step, mean val SumR over the runs that reached it, how many did)."""
    at: dict[int, list[float]] = defaultdict(list)
    for r in group:
        for step, v in r.curve:
            at[step].append(v)
    return [(s, statistics.fmean(v), len(v)) for s, v in sorted(at.items())]


def plot_curves(records: list[RunRecord], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    for label, group in sorted(groups([r for r in records if r.curve]).items()):
        curve = mean_curve(group)
        ax.plot([s for s, _, _ in curve], [v for _, v, _ in curve], marker=".",
                label=f"{label} (n={len(group)})")
    ax.set_xlabel("step")
    ax.set_ylabel("val SumR (mean over seeds)")
    ax.set_title("training curves")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return _save(fig, path)


# ------------------------------------------------------------------------------ Markdown


def _pm(cell: tuple[float, float] | None) -> str:
    if cell is None:
        return "-"
    return f"{cell[0]:.1f}" if math.isnan(cell[1]) else f"{cell[0]:.1f} ± {cell[1]:.1f}"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


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
        names = {r.teacher_sumr: _short(r.params.get("teacher.pretrained", "?")) for r in group}
        for x, ys in _by_teacher(group, src):
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
                     f"{r.mean:+.1f} | [{r.low:+.1f}, {r.high:+.1f}] | {r.verdict} |")
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


def _val_is_test_note(records: list[RunRecord]) -> list[str]:
    same = [r.name for r in records if r.val_is_test]
    if not same:
        return []
    return ["", f"**Validation was the test split** for {len(same)} of {len(records)} runs "
            f"(MLflow tag `{VAL_IS_TEST_TAG}`: {', '.join(same[:5])}"
            f"{' ...' if len(same) > 5 else ''}): they chose their best weights and stopped "
            "early on the test captions, so their test scores are not held out."]


def render(title: str, header: list[str], records: list[RunRecord], plots: dict[str, Path | None],
           teacher_note: str, claims: list[ClaimResult] = ()) -> str:
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
                  "ran; 95% CI: percentile bootstrap of the mean over seeds (10,000 draws). A "
                  "claim holds when the whole CI is above 0, is reversed when it is below 0, and "
                  "is not separable at this power otherwise.", ""]
        if plots.get("kd_gain"):
            parts += [f"![KD gain against teacher quality]({plots['kd_gain'].name})", ""]
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


# ------------------------------------------------------------------------------ entry point


def write_report(sweep: str | None = None, experiment: str | None = None,
                 tracking_uri: str | None = None, out: str | Path | None = None) -> Path:
    """Write ``report.md``, ``teacher_quality.png`` and ``curves.png``; return the report's path."""
    if (sweep is None) == (experiment is None):
        raise ReportError("give exactly one of sweep= (a sweep's name) or experiment= (an "
                          "MLflow experiment's name)")
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    parent = None
    if sweep is not None:
        parent, runs = sweep_runs(client, sweep, uri)
        title = f"Sweep {sweep}"
        header = [f"MLflow `{uri}`, parent run `{parent.info.run_id}` "
                  f"({parent.info.status}); generated {_now()}."]
    else:
        runs = experiment_runs(client, experiment, uri)
        title = f"Experiment {experiment}"
        header = [f"MLflow `{uri}`; generated {_now()}."]
    records = [read_run(client, r) for r in runs]
    if not records:
        raise ReportError(f"{title.lower()} has no runs in {uri}")
    assign_labels(records)
    folder = Path(out) if out else Path("outputs") / "reports" / (sweep or experiment)
    folder.mkdir(parents=True, exist_ok=True)
    series, base = teacher_series(records)
    plots: dict[str, Path | None] = {"curves": plot_curves(records, folder / "curves.png"),
                                     "teacher": None}
    if series:
        plots["teacher"] = plot_teacher_quality(series, base, folder / "teacher_quality.png")
    note = ("No teacher-quality plot: it needs distilled runs at two or more teachers with "
            "`teacher/SumR` logged (sweep `teacher_eval: true`).")
    claims: list[ClaimResult] = []
    if parent is not None and CLAIMS_PARAM in parent.data.params:
        claims = claim_results(records, json.loads(parent.data.params[CLAIMS_PARAM]))
        plots["kd_gain"] = plot_kd_gain(claims, records, folder / "kd_gain.png")
    path = folder / "report.md"
    write_atomic(path, render(title, header, records, plots, note, claims))
    if parent is not None:
        for p in (path, *(p for p in plots.values() if p)):
            client.log_artifact(parent.info.run_id, str(p), "report")
    return path


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

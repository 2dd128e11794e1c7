"""The numbers a report shows, from its runs: labels, seed means and spreads, teacher series,
claims (tested by launch/report/claims.py), training curves, and a sweep's best evaluation per
trial."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Iterable

from launch.report.claims import ClaimResult, evaluate_claim
from launch.report.runs import SCORES, RunRecord
from launch.jobs.sweep_spec import IDENTITY_KEYS, VARIANT_PARAM

# Params that never tell variants apart: each trial's identity, the seed, the variant's own name.
NOT_A_SETTING = (*IDENTITY_KEYS, "train.seed", VARIANT_PARAM)


def short_path(value: str) -> str:
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
            extra = " ".join(f"{k}={short_path(r.params.get(k, '-'))}" for k in keys)
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


def by_teacher(group: list[RunRecord], src: str) -> list[tuple[float, list[float]]]:
    """(teacher SumR, student SumRs) sorted by the teacher's quality."""
    points: dict[float, list[float]] = defaultdict(list)
    for r in group:
        points[r.teacher_sumr].append(score(r, src)["SumR"])
    return sorted(points.items())


def mean_curve(group: list[RunRecord]) -> list[tuple[int, float, int]]:
    """(step, mean val SumR over the runs that reached it, how many did)."""
    at: dict[int, list[float]] = defaultdict(list)
    for r in group:
        for step, v in r.curve:
            at[step].append(v)
    return [(s, statistics.fmean(v), len(v)) for s, v in sorted(at.items())]


def mean_curves(records: list[RunRecord]) -> dict[str, list[tuple[int, float]]]:
    """Label (with its run count) -> its mean validation SumR curve."""
    return {f"{label} (n={len(group)})": [(s, v) for s, v, _ in mean_curve(group)]
            for label, group in sorted(groups([r for r in records if r.curve]).items())}


def trial_rows(histories: dict[str, list[dict]], metric: str, mode: str
               ) -> list[tuple[str, dict[str, float]]]:
    """Each trial's best evaluation (the method.md §1 metrics at its best ``metric``), best first.

    ``histories`` holds each trial's reports (Tune's metrics frame as records); trials that never
    reported ``metric`` are left out.
    """
    from trainer.evaluate import COLUMNS

    prefix = metric.rsplit("/", 1)[0] + "/" if "/" in metric else ""
    rows = []
    for label, history in histories.items():
        scored = [r for r in history if _finite(r.get(metric))]
        if not scored:
            continue
        best = (max if mode == "max" else min)(scored, key=lambda r: r[metric])
        cells = {c: float(best[prefix + c]) for c in COLUMNS if _finite(best.get(prefix + c))}
        cells[metric] = float(best[metric])
        if _finite(best.get("step")):
            cells["step"] = float(best["step"])
        rows.append((label, cells))
    rows.sort(key=lambda r: r[1][metric], reverse=mode == "max")
    return rows


def trial_curves(histories: dict[str, list[dict]], metric: str
                 ) -> dict[str, list[tuple[float, float]]]:
    """Trial -> its (step, ``metric``) points in step order."""
    return {label: sorted((r["step"], r[metric]) for r in history
                          if _finite(r.get(metric)) and _finite(r.get("step")))
            for label, history in histories.items()}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

"""``dldkd report``: a Markdown report of a finished sweep (or an MLflow experiment), from MLflow.

Everything comes from what the runs logged (launch/report/runs.py): the variant (tag
``dldkd.variant``, else the params that differ between runs), the seed-averaged scores (``test/*``
when every run of a row has them, else each run's best validation evaluation), the validation
curves, the teacher's zero-shot quality (``teacher/*``, logged by sweeps with
``teacher_eval: true``) and the cost (``perf/teacher_ms``, ``perf/samples_s``, ``perf/wall_s``).
The report and its plots are written to a folder and, for a sweep, logged to its parent run under
``report/``.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from launch.report.claims import RESOLVE_SUMR, ClaimResult
from launch.report.runs import ReportError, experiment_runs, read_run, sweep_runs
from launch.report.render import plot_curves, plot_kd_gain, plot_teacher_quality, render
from launch.report.stats import assign_labels, claim_results, mean_curves, teacher_series
from launch.jobs.sweep_spec import CLAIMS_PARAM
from sharding.files import write_atomic
from trainer.config import load_config


def write_report(sweep: str | None = None, experiment: str | None = None,
                 tracking_uri: str | None = None, out: str | Path | None = None,
                 resolve: float = RESOLVE_SUMR) -> Path:
    """Write ``report.md``, ``teacher_quality.png`` and ``curves.png``; return the report's path.
    ``resolve``: the SumR difference the power table plans seeds for.

    The store is ``tracking_uri``, else what a config loaded here would log to
    ($MLFLOW_TRACKING_URI).
    """
    if (sweep is None) == (experiment is None):
        raise ReportError("give exactly one of sweep= (a sweep's name) or experiment= (an "
                          "MLflow experiment's name)")
    from mlflow.tracking import MlflowClient

    uri = load_config(overrides={"tracking.uri": tracking_uri or ""}).tracking.uri
    if not uri:
        raise ReportError("no MLflow store given: pass --tracking-uri or set MLFLOW_TRACKING_URI "
                          "(a local sweep's store is sqlite:///<run.storage>/<sweep>/mlflow.db)")
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
    curves = plot_curves(mean_curves(records), folder / "curves.png",
                         "val SumR (mean over seeds)", "training curves")
    plots: dict[str, Path | None] = {"curves": curves, "teacher": None}
    if series:
        plots["teacher"] = plot_teacher_quality(series, base, folder / "teacher_quality.png")
    note = ("No teacher-quality plot: it needs distilled runs at two or more teachers with "
            "`teacher/SumR` logged (sweep `teacher_eval: true`).")
    claims: list[ClaimResult] = []
    if parent is not None and CLAIMS_PARAM in parent.data.params:
        claims = claim_results(records, json.loads(parent.data.params[CLAIMS_PARAM]))
        plots["kd_gain"] = plot_kd_gain(claims, records, folder / "kd_gain.png")
    path = folder / "report.md"
    write_atomic(path, render(title, header, records, plots, note, claims, resolve))
    if parent is not None:
        for p in (path, *(p for p in plots.values() if p)):
            client.log_artifact(parent.info.run_id, str(p), "report")
    return path


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

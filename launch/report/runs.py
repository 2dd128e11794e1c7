"""What ``dldkd report`` reads from MLflow: a sweep's runs (or an experiment's), one
:class:`RunRecord` each, with the scores, curve, cost and teacher quality the runs logged."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from trainer.infra.tags import KIND_TAG, RUN_KEY_TAG, SWEEP_KIND, VAL_IS_TEST_TAG, VARIANT_TAG

SCORES = ("R1", "R5", "R10", "R100", "SumR")


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
    kind = f"tags.`{KIND_TAG}` = '{SWEEP_KIND}'"
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
            if r.data.tags.get(KIND_TAG) != SWEEP_KIND]


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

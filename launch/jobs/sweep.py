"""A hyperparameter sweep: a Ray Tune experiment whose trials are Ray Train runs.

``python -m launch.sweep --config configs/sweep-demo.yaml [key.sub=value ...] [sweep.k=v ...]``

The YAML holds a run config plus a ``sweep:`` section (launch/jobs/sweep_spec.py, docs/sweeps.md).
Each trial is a Tune function trainable that builds and fits the ``TorchTrainer`` of one run
(Ray's pattern for Train V2), named ``<sweep>-<trial id>``, with ``TuneReportCallback`` passing
every evaluation report to Tune. Re-running the same command resumes an interrupted sweep
(``Tuner.restore``): finished trials are kept, unfinished and errored ones continue from their
latest checkpoint. MLflow gets one parent run per sweep and one nested child run per trial.

One concern over 400 lines: the driver's life cycle of a sweep (trial configs, the Tune run,
resume, the MLflow parent run, the best trial's registration); what a sweep *is* (the YAML
spec, variants, the search space) is launch/jobs/sweep_spec.py.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import logging
import math
import os
import shlex
import signal
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from launch.jobs.lease import run_lease
from launch.jobs.stop import DriverStop, poll
from launch.report.render import params_text, plot_curves, trials_table
from launch.report.stats import trial_curves, trial_rows
from launch.jobs.sweep_spec import (CLAIMS_PARAM, VARIANT_KEY, VARIANT_PARAM, SweepSpec,
                                    flat_values, grid_axes, grid_points, load_sweep,
                                    point_space, search_algorithm, tune_space)
from sharding.files import write_atomic
from trainer.config import Config, ConfigError, apply_overrides, from_dict
from trainer.infra.storage import endpoint_env, is_remote, local_run_dir
from trainer.infra.tracking import Tracker, mark_killed, resolve_uri
from trainer.infra.tags import (BEST_TRIAL_TAG, KIND_TAG, REGISTERED_MODEL_TAG, RUN_KEY_TAG,
                                SWEEP_KIND, SWEEP_TAG, VARIANT_TAG)

log = logging.getLogger("dldkd.sweep")

# Seconds a trial stopped by the scheduler gets before Tune kills it (and so its Train workers).
STOPPED_TRIAL_GRACE_S = 20


# ------------------------------------------------------------------------------ resources


def trial_demand(cfg: Config, trial_cpus: float) -> dict[str, float]:
    """What one running trial holds: its driver plus its Train workers."""
    demand = {"CPU": trial_cpus + cfg.dist.num_workers * cfg.dist.cpus_per_worker}
    if cfg.dist.use_gpu:
        demand["GPU"] = float(cfg.dist.num_workers)
    return demand


def concurrent_trials(cluster: dict[str, float], demand: dict[str, float], cap: int = 0) -> int:
    """How many trials fit the cluster at once (at least 1: an autoscaler may add nodes).

    Tune reserves only the trial driver; each Train run then asks for its own workers. Without
    this limit Tune would start more trials than there are workers for, and they would wait on
    each other's resources.
    """
    fits = min((math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0),
               default=1)
    if fits < 1:
        log.warning("one trial needs %s but the cluster has %s now; running one trial at a time "
                    "and waiting for the autoscaler", demand,
                    {k: cluster.get(k, 0.0) for k in demand})
        fits = 1
    return min(fits, cap) if cap else fits


# ------------------------------------------------------------------------------ storage, tracking


def experiment_path(cfg: Config, spec: SweepSpec) -> str:
    """``<run.storage>/<sweep name>``: Tune's experiment folder; trial runs go under ``trials/``."""
    from launch.jobs.train import storage_path

    return f"{storage_path(cfg).rstrip('/')}/{spec.name}"


def tracking_uri(cfg: Config, spec: SweepSpec) -> str:
    """One MLflow store for the driver and every worker of every trial: by default a SQLite file
    in the sweep's folder (config validation refuses a remote run.storage without a tracking
    URI, so that folder is local)."""
    return resolve_uri(cfg.tracking.uri, Path(experiment_path(cfg, spec)))


def report_dir(cfg: Config, spec: SweepSpec) -> Path:
    """Local folder for the sweep's table, plot and MLflow spool."""
    root = experiment_path(cfg, spec)
    if is_remote(root):
        return Path(tempfile.gettempdir()) / "dldkd-sweeps" / spec.name
    return Path(root)


# ------------------------------------------------------------------------------ the trial


def trial_run_name(sweep: str, trial_id: str) -> str:
    """Stable across restores, so a resumed trial finds its checkpoints and MLflow run."""
    return f"{sweep}-{trial_id}"


def _trial_name(sweep: str, trial) -> str:
    return trial_run_name(sweep, trial.trial_id)


def trial_config(base: dict, values: dict[str, Any], *, sweep: str, trial_id: str,
                 storage: str, uri: str, parent_run_id: str,
                 variants: dict[str, dict] | None = None) -> Config:
    """The run config of one trial: the base config, its variant's bundle, the sampled values
    and its identity."""
    values = flat_values(values)
    variant = values.pop(VARIANT_KEY, None)
    tree = copy.deepcopy(base)
    if variant is not None:
        if variant not in (variants or {}):
            raise ConfigError(f"trial {trial_id}: variant {variant!r} is not in sweep.variants "
                              f"{sorted(variants or {})}")
        # A variant's own grid values (a dict domain) reach the trial through ``values``.
        apply_overrides(tree, {k: v for k, v in variants[variant].items()
                               if not isinstance(v, dict)})
    apply_overrides(tree, values)
    apply_overrides(tree, {"run.name": trial_run_name(sweep, trial_id), "run.storage": storage,
                           "tracking.uri": uri, "tracking.parent_run_id": parent_run_id,
                           "tracking.registered_model": ""})
    return from_dict(tree)


def _trial(values: dict, *, base: dict, sweep: str, storage: str, uri: str,
           parent_run_id: str, variants: dict[str, dict], teacher_eval_dir: str | None,
           cwd: str, env: dict[str, str], stop=None) -> None:
    """Tune function trainable: fit one Ray Train run; its reports reach Tune via the callback.
    Stopped by a signal to the sweep's driver (``stop``), it saved a checkpoint and raises, so
    that Tune counts it unfinished and the relaunched sweep resumes it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from launch.jobs.train import build_trainer

    # Tune starts a trial in its trial folder; relative paths in the config (shards, teacher)
    # mean the launch folder, as for a single run (launch.train passes it on to the workers).
    if Path(cwd).is_dir():
        os.chdir(cwd)
    cfg = trial_config(base, values, sweep=sweep, trial_id=tune.get_context().get_trial_id(),
                       storage=storage, uri=uri, parent_run_id=parent_run_id, variants=variants)
    label_trial_run(cfg, flat_values(values).get(VARIANT_KEY), teacher_eval_dir)
    build_trainer(cfg, name=cfg.run.name, callbacks=[TuneReportCallback()], env=env,
                  stop=stop).fit()
    if stop is not None and poll(stop):
        raise RuntimeError(f"trial {cfg.run.name} stopped by a signal to the sweep's driver "
                           "with a checkpoint saved; relaunch the sweep to resume it")


def label_trial_run(cfg: Config, variant: str | None, teacher_eval_dir: str | None) -> None:
    """Open the trial's MLflow run before its workers do (they find it by its run key) and
    record what the config alone does not say: the variant name (tag and param) and, with
    ``teacher_eval``, the teacher's own zero-shot metrics (``teacher/*`` at step 0).

    Records go through the run folder's spool, which the rank-0 tracker replays if MLflow
    is down now.
    """
    teacher = None
    if teacher_eval_dir is not None and cfg.uses_teacher() and cfg.data.val:
        teacher = teacher_quality(cfg, Path(teacher_eval_dir))
    if variant is None and teacher is None:
        return
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name,
                      local_run_dir(cfg.run.storage, cfg.run.name) / "mlflow-spool.jsonl",
                      parent_run_id=cfg.tracking.parent_run_id)
    tracker.start({VARIANT_PARAM: variant} if variant else {},
                  {VARIANT_TAG: variant} if variant else {})
    if teacher:
        tracker.log_metrics({f"teacher/{k}": v for k, v in teacher.items()}, 0)


def teacher_quality(cfg: Config, cache: Path) -> dict[str, float]:
    """The teacher's zero-shot metrics on ``data.val``, computed once per (teacher, split).

    The cache key holds the weights file's size and modification time, so a teacher rewritten
    in place is scored again.
    """
    from trainer.teacher.pretrain import zero_shot_eval_split

    t = cfg.teacher
    weights = Path(t.pretrained)
    identity = {"arch": t.arch, "model_config": t.arch_config, "pretrained": t.pretrained,
                "placement": t.placement, "split": cfg.data.val,
                "weights": [weights.stat().st_size, weights.stat().st_mtime_ns]
                if weights.is_file() else None}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["metrics"]
    metrics = zero_shot_eval_split(cfg, cfg.data.val)
    cache.mkdir(parents=True, exist_ok=True)
    # Concurrent trials may score the same teacher: each writes its own temporary file.
    write_atomic(path, json.dumps({"teacher": identity, "metrics": metrics}, indent=1))
    return metrics


def segment_path(path: str, index: int) -> str:
    """The experiment folder of a sweep's ``index``-th part: the sweep's own folder first, then
    ``<name>.part2``... for the trial points added to it later."""
    return path if index == 1 else f"{path}.part{index}"


def point_key(values: dict[str, Any], axes: list[str]) -> str:
    """A trial's place in the grid (variant and grid axes), comparable across parts."""
    flat = flat_values(values)
    return json.dumps({k: flat.get(k) for k in (*axes, VARIANT_KEY)}, sort_keys=True, default=str)


def open_tuners(path: str, trainable: Callable[[str], Any], make_new: Callable[..., Any],
                spec: SweepSpec) -> tuple[list[Any], bool]:
    """The sweep's parts: each stored part restored (its unfinished and errored trials resume),
    plus a new part holding the grid points no stored part has; a sweep seen for the first time
    is one new part. Extending a grid (more seeds, another variant) therefore runs only the new
    trials."""
    from ray import tune

    tuners, seen, index = [], set(), 1
    axes = grid_axes(spec)
    while tune.Tuner.can_restore(segment_path(path, index)):
        part = segment_path(path, index)
        tuners.append(tune.Tuner.restore(part, trainable(part), resume_unfinished=True,
                                         resume_errored=True))
        if spec.search_alg == "grid":
            # Every stored trial's config, also of those that never reported (a result's
            # config is empty then): errored and pending points are not new.
            seen |= {point_key(t.config or {}, axes) for t in tune.ExperimentAnalysis(part).trials}
        index += 1
    if not tuners:
        return [make_new(path)], False
    if spec.search_alg == "grid":
        new = [p for p in grid_points(spec) if point_key(p, axes) not in seen]
        if new:
            log.info("sweep %s: %d new trial point(s) beyond the stored %d; they run in %s",
                     spec.name, len(new), len(seen), segment_path(path, index))
            tuners.append(make_new(segment_path(path, index), point_space(new)))
    return tuners, True


# ------------------------------------------------------------------------------ the sweep


@dataclass
class SweepResult:
    name: str
    rows: list[tuple[str, dict[str, float]]]
    errors: list[str]
    resumed: bool
    parent_run_id: str
    tracking_uri: str
    plot: Path
    table: Path


def _parent_tracker(cfg: Config, spec: SweepSpec, uri: str):
    """The sweep's MLflow parent run, found again by its name on resume."""
    folder = report_dir(cfg, spec)
    tracker = Tracker(uri, cfg.tracking.experiment, spec.name, folder / "mlflow-spool.jsonl",
                      system_metrics=False)
    params = {f"sweep.{k}": v for k, v in asdict(spec).items()
              if k not in ("space", "variants", "claims")}
    params[CLAIMS_PARAM] = json.dumps(spec.claims, sort_keys=True)
    params.update({f"sweep.space.{k}": json.dumps(v) for k, v in spec.space.items()})
    params.update({f"sweep.variants.{k}": json.dumps(v) for k, v in spec.variants.items()})
    params.update(cfg.flat())
    tracker.start(params, {KIND_TAG: SWEEP_KIND, SWEEP_TAG: spec.name})
    if tracker.run_id is None:
        log.warning("MLflow at %s did not answer: trial runs will not be nested under a sweep "
                    "run (records are spooled to %s)", uri, tracker.spool)
    return tracker


def _close_stale_children(uri: str, parent_run_id: str) -> None:
    """Trials stopped by the scheduler never closed their runs: mark them KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    for run in client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                  "and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status="KILLED")


def run_sweep(cfg: Config, spec: SweepSpec, stop=None) -> SweepResult:
    """Run (or resume) the sweep on the connected Ray cluster; log and print its results.
    ``stop``: the driver's ``DriverStop``; after its signal the parent run ends KILLED."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from launch.jobs.train import storage_path

    # Only evaluations carry the metric; a report with just a checkpoint does not, and ASHA
    # skips it. Tune would otherwise stop the sweep at the first such report.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # A trial the scheduler stops is blocked inside its Train run and never returns by itself;
    # Tune's default waits 600 s before killing it, and its workers hold their CPUs/GPUs until
    # then. Killing the trial ends its Train run (the workers die with their owner).
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOPPED_TRIAL_GRACE_S))
    space = tune_space(spec, cfg)
    path = experiment_path(cfg, spec)
    uri = tracking_uri(cfg, spec)
    tracker = _parent_tracker(cfg, spec, uri)
    parent_id = tracker.run_id or ""

    demand = trial_demand(cfg, spec.trial_cpus)
    limit = concurrent_trials(ray.cluster_resources(), demand, spec.max_concurrent)
    log.info("sweep %s: %s per trial, up to %d concurrent trial(s); experiment %s; MLflow %s "
             "(parent run %s)", spec.name, demand, limit, path, uri, parent_id or "-")

    def trainable(part: str):
        return tune.with_resources(
            tune.with_parameters(_trial, base=cfg.to_dict(), sweep=spec.name,
                                 storage=f"{part}/trials", uri=uri, parent_run_id=parent_id,
                                 variants=spec.variants,
                                 teacher_eval_dir=str(report_dir(cfg, spec) / "teacher-eval")
                                 if spec.teacher_eval else None, cwd=os.getcwd(),
                                 env=endpoint_env(), stop=stop.flag if stop else None),
            {"CPU": spec.trial_cpus})
    if spec.scheduler.type == "asha":
        # stop_last_trials=False: a trial that reaches max_t finishes by itself (test split,
        # best weights, MLflow) instead of being stopped at its last report.
        scheduler = ASHAScheduler(time_attr="step", max_t=spec.scheduler.max_t,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor,
                                  stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()

    def new_tuner(part: str, points: dict | None = None):
        param_space = space if points is None else {
            **{k: v for k, v in space.items() if k in spec.space and k not in grid_axes(spec)},
            **points}
        return tune.Tuner(
            trainable(part), param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                scheduler=scheduler,
                search_alg=search_algorithm(spec, limit),
                trial_name_creator=functools.partial(_trial_name, spec.name),
                trial_dirname_creator=functools.partial(_trial_name, spec.name)),
            run_config=tune.RunConfig(name=part.rsplit("/", 1)[-1],
                                      storage_path=storage_path(cfg)))

    tuners, resumed = open_tuners(path, trainable, new_tuner, spec)
    if resumed:
        log.info("resuming sweep %s from %s", spec.name, path)
    grid = []
    for tuner in tuners:
        grid.extend(tuner.fit())
        if stop is not None and stop.signum is not None:
            break

    histories: dict[str, list[dict]] = {}
    params: dict[str, dict] = {}
    errors: list[str] = []
    for result in grid:
        label = Path(result.path).name
        frame = result.metrics_dataframe
        histories[label] = frame.to_dict("records") if frame is not None else []
        params[label] = {k: v for k, v in flat_values(result.config or {}).items()
                         if k in spec.space or k == VARIANT_KEY}
        if result.error is not None:
            errors.append(f"{label}: {type(result.error).__name__}: {result.error}")
    rows = trial_rows(histories, spec.metric, spec.mode)
    out = report_dir(cfg, spec)
    table = write_atomic(out / "trials.md", f"# Sweep {spec.name}\n\nSorted by best "
                         f"{spec.metric} ({spec.mode}).\n\n" + trials_table(rows, params))
    plot = plot_curves(trial_curves(histories, spec.metric), out / "sumr.png", spec.metric,
                       f"validation {spec.metric} per trial")

    from trainer.evaluate import format_table

    print(f"\nsweep {spec.name}: {len(rows)} of {len(histories)} trial(s) reported {spec.metric}, "
          f"sorted best first")
    print(format_table({f"{label} {params_text(params.get(label, {}))}".strip(): m
                        for label, m in rows}))
    for err in errors:
        print(f"trial failed: {err}")
    print(f"table: {table}\nplot: {plot}\nMLflow: {uri} (parent run {parent_id or '-'})")

    if rows:
        best_label, best = rows[0]
        tracker.log_metrics({f"best/{spec.metric}": best[spec.metric]}, int(best.get("step", 0)))
        tracker.set_tags({BEST_TRIAL_TAG: best_label})
        if cfg.tracking.registered_model:
            register_best_trial(cfg, uri, best_label, tracker)
    tracker.log_artifact(table, "sweep")
    tracker.log_artifact(plot, "sweep")
    stopped = stop is not None and stop.signum is not None
    failed = not rows and not stopped
    tracker.finish("KILLED" if stopped else "FAILED" if failed else "FINISHED")
    if parent_id:
        try:
            _close_stale_children(uri, parent_id)
        except Exception as exc:  # noqa: BLE001 - bookkeeping only
            log.warning("could not close stopped trial runs: %s", exc)
    if failed:
        raise RuntimeError(f"sweep {spec.name}: no trial reported {spec.metric}; "
                           + ("; ".join(errors) or "see the trial logs"))
    return SweepResult(spec.name, rows, errors, resumed, parent_id, uri, plot, table)


def register_best_trial(cfg: Config, uri: str, label: str, tracker: Tracker) -> None:
    """``tracking.registered_model`` on a sweep: register the best trial's model (trials
    register none) and tag the parent run; a failure is reported, the sweep's results stand."""
    from trainer.infra.mlflow_model import register_run

    try:
        where = register_run(uri, cfg.tracking.experiment, label, cfg.tracking.registered_model,
                             cfg.tracking.model_alias)
    except Exception as exc:  # noqa: BLE001 - the sweep's results are kept regardless
        log.error("could not register the model of the best trial %s: %s: %s", label,
                  type(exc).__name__, str(exc)[:500])
        return
    tracker.set_tags({REGISTERED_MODEL_TAG: where})
    print(f"registered: {where} (best trial {label})")


# ------------------------------------------------------------------------------ entry points


def run(args: argparse.Namespace) -> SweepResult:
    from launch.jobs.train import init_ray
    from trainer.infra.logs import setup_logging

    from launch.validate.preflight import preflight

    setup_logging()
    cfg, spec = load_sweep(args.config, args.overrides)
    preflight(cfg)   # validate's cheap checks on the base config, before Ray
    uri = tracking_uri(cfg, spec)
    command = shlex.join(["sweep", "--config", args.config, *args.overrides])
    with run_lease(cfg.run.storage, spec.name, kind="sweep") as lease:

        def abort() -> None:
            kill_sweep_runs(cfg, spec, uri)
            lease.release()

        with DriverStop(cfg.train.stop_grace_s, abort,
                        lambda signum, how: f"sweep {spec.name} stopped by "
                        f"{signal.Signals(signum).name} {how}; its trials resume from their "
                        f"newest complete checkpoints; to resume: dldkd {command}") as stop:
            init_ray(args.address, args.num_cpus)
            stop.arm()
            return stop.run(lambda: run_sweep(cfg, spec, stop))


def kill_sweep_runs(cfg: Config, spec: SweepSpec, uri: str) -> None:
    """A sweep stopped at once: its parent run and its running trial runs end KILLED."""
    from mlflow.tracking import MlflowClient

    if mark_killed(uri, cfg.tracking.experiment, spec.name):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        parent = client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{spec.name}'",
                                    max_results=1)[0]
        _close_stale_children(uri, parent.info.run_id)

"""A hyperparameter sweep: a Ray Tune experiment whose trials are Ray Train runs.

``python -m launch.sweep --config configs/sweep-demo.yaml [key.sub=value ...] [sweep.k=v ...]``

The YAML holds a run config plus a ``sweep:`` section (docs/sweeps.md)::

    sweep:
      name: demo-sweep            # experiment folder <run.storage>/<name>; default run.name
      metric: val/SumR            # reported by every evaluation of a trial
      mode: max
      num_samples: 2
      search_alg: random          # random | grid
      max_concurrent: 0           # 0 = as many trials as the cluster's CPUs/GPUs hold
      scheduler: {type: asha, time_attr: step, max_t: 8, grace_period: 4, reduction_factor: 2}
      space:
        optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
        loss.targets: {choice: [soft, hard]}
        train.seed: {grid: [1, 2]}
      variants:                   # optional: one more grid axis of named override bundles
        dldkd: {loss.targets: hard}
        dldkdpp: {loss.targets: soft}
      teacher_eval: false         # log the teacher's zero-shot val metrics on each child run

Each trial is a Tune function trainable that builds and fits the ``TorchTrainer`` of one run
(Ray's pattern for Train V2), named ``<sweep>-<trial id>``, with ``TuneReportCallback`` passing
every evaluation report to Tune. Re-running the same command resumes an interrupted sweep
(``Tuner.restore``): finished trials are kept, unfinished and errored ones continue from their
latest checkpoint. MLflow gets one parent run per sweep and one nested child run per trial.
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
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from sharding.files import atomic_path, write_atomic
from trainer.config import Config, ConfigError, apply_overrides, from_dict, load_config, load_yaml
from trainer.config import parse_overrides

log = logging.getLogger("dldkd.sweep")

SCHEDULERS = ("asha", "fifo")
SEARCH_ALGS = ("random", "grid")
# Domain name -> number of YAML arguments (None: a non-empty list of values).
DOMAINS: dict[str, int | None] = {"uniform": 2, "quniform": 3, "loguniform": 2, "randint": 2,
                                  "choice": None, "grid": None}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The Tune parameter holding a trial's variant name, and where MLflow records it.
VARIANT_KEY = "variant"
VARIANT_TAG = "dldkd.variant"
VARIANT_PARAM = "sweep.variant"
CLAIMS_PARAM = "sweep.claims"   # on the parent run: what `dldkd report` tests
# Keys a sweep must not vary: they are each trial's identity, set by the sweep.
IDENTITY_KEYS = ("run.name", "run.storage", "tracking.uri", "tracking.parent_run_id")
# Seconds a trial stopped by the scheduler gets before Tune kills it (and so its Train workers).
STOPPED_TRIAL_GRACE_S = 20


@dataclass
class SchedulerSpec:
    type: str = "fifo"
    time_attr: str = "step"
    # 0 = the length of a run: train.epochs x data.steps_per_epoch.
    max_t: int = 0
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepSpec:
    """The validated ``sweep:`` section."""

    name: str
    metric: str = "val/SumR"
    mode: str = "max"
    num_samples: int = 1
    search_alg: str = "random"
    seed: int = 0
    # Cap on concurrent trials; 0 = what the cluster's resources hold.
    max_concurrent: int = 0
    # CPUs held by each trial's driver (the Tune trainable that only waits on its Train run).
    trial_cpus: float = 0.5
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    # Dotted config key -> {domain: args}, as written in the YAML.
    space: dict[str, dict] = field(default_factory=dict)
    # Variant name -> {dotted config key: value}: one more grid axis, crossed with the space.
    variants: dict[str, dict] = field(default_factory=dict)
    # Before a trial that uses a teacher trains, score the teacher alone on data.val and log
    # teacher/* metrics on the trial's run (teacher-quality studies; cached per teacher).
    teacher_eval: bool = False
    # Claim name -> {better: variant, worse: variant, series: optional plot series}: the paired
    # comparisons `dldkd report` tests (difference in SumR by seed, bootstrap 95% CI, verdict).
    claims: dict[str, dict] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the YAML section


def parse_sweep(raw: dict | None, cfg: Config) -> SweepSpec:
    """Validate a ``sweep:`` mapping against the run config it varies."""
    raw = dict(raw or {})
    allowed = {f for f in SweepSpec.__dataclass_fields__}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown}; keys of sweep are {sorted(allowed)}")
    sched_raw = raw.pop("scheduler", None) or {}
    if not isinstance(sched_raw, dict):
        raise ConfigError(f"sweep.scheduler must be a mapping, got {sched_raw!r}")
    sched_allowed = set(SchedulerSpec.__dataclass_fields__)
    unknown = sorted(set(sched_raw) - sched_allowed)
    if unknown:
        raise ConfigError(f"unknown sweep.scheduler key(s) {unknown}; keys are "
                          f"{sorted(sched_allowed)}")
    raw.setdefault("name", cfg.run.name)
    spec = SweepSpec(scheduler=SchedulerSpec(**sched_raw), **raw)
    _check_fields(spec, cfg)
    check_variants(spec.variants, spec.space, cfg)
    check_claims(spec.claims, spec.variants)
    tune_space(spec, cfg)
    return spec


def check_claims(claims: Any, variants: dict) -> None:
    """Each claim compares two variants of this sweep."""
    if not isinstance(claims, dict):
        raise ConfigError(f"sweep.claims must be a mapping of name -> {{better, worse}}, got "
                          f"{claims!r}")
    for name, claim in claims.items():
        where = f"sweep.claims.{name}"
        if not isinstance(claim, dict) or not {"better", "worse"} <= set(claim) \
                or set(claim) - {"better", "worse", "series"}:
            raise ConfigError(f"{where} must be {{better: VARIANT, worse: VARIANT}} with an "
                              f"optional series, got {claim!r}")
        for side in ("better", "worse"):
            if claim[side] not in variants:
                raise ConfigError(f"{where}.{side}={claim[side]!r} is not a variant of this "
                                  f"sweep; variants are {sorted(variants)}")


def _check_fields(spec: SweepSpec, cfg: Config) -> None:
    if not isinstance(spec.name, str) or not NAME_RE.fullmatch(spec.name):
        raise ConfigError(f"sweep.name={spec.name!r} must be a name of letters, digits, '.', "
                          "'_' or '-' (it names the experiment folder and the MLflow parent run)")
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"sweep.mode={spec.mode!r} must be 'max' or 'min'")
    if not isinstance(spec.metric, str) or not spec.metric:
        raise ConfigError(f"sweep.metric={spec.metric!r} must be a reported metric, e.g. val/SumR")
    for key, low in (("num_samples", 1), ("max_concurrent", 0), ("seed", 0)):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"sweep.{key}={value!r} must be an integer >= {low}")
    if isinstance(spec.trial_cpus, bool) or not isinstance(spec.trial_cpus, (int, float)) \
            or not 0 < spec.trial_cpus <= 64:
        raise ConfigError(f"sweep.trial_cpus={spec.trial_cpus!r} must be a number in (0, 64]")
    if spec.search_alg not in SEARCH_ALGS:
        hint = " (optuna/hyperopt are not installed here)" if spec.search_alg in (
            "optuna", "hyperopt", "bayesopt") else ""
        raise ConfigError(f"sweep.search_alg={spec.search_alg!r} is not available{hint}; "
                          f"choose one of {list(SEARCH_ALGS)}")
    sched = spec.scheduler
    if sched.type not in SCHEDULERS:
        raise ConfigError(f"sweep.scheduler.type={sched.type!r}; choose one of {list(SCHEDULERS)}")
    if sched.type == "asha":
        if sched.time_attr != "step":
            # Train V2 reports no training_iteration; `step` is in every evaluation report.
            raise ConfigError(f"sweep.scheduler.time_attr={sched.time_attr!r}: trials report "
                              "their progress as 'step'; use time_attr: step")
        if not sched.max_t:
            sched.max_t = cfg.train.epochs * cfg.data.steps_per_epoch
            if not sched.max_t:
                raise ConfigError("sweep.scheduler.max_t is needed for ASHA when "
                                  "data.steps_per_epoch=0 (set the run length in steps)")
        for key, low in (("max_t", 1), ("grace_period", 1), ("reduction_factor", 1.0001)):
            value = getattr(sched, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ConfigError(f"sweep.scheduler.{key}={value!r} must be >= {low:g}")
        if sched.grace_period > sched.max_t:
            raise ConfigError(f"sweep.scheduler.grace_period={sched.grace_period} exceeds "
                              f"max_t={sched.max_t}")
    if not isinstance(spec.space, dict):
        raise ConfigError(f"sweep.space must be a mapping of config keys, got {spec.space!r}")
    if not isinstance(spec.teacher_eval, bool):
        raise ConfigError(f"sweep.teacher_eval={spec.teacher_eval!r} must be true or false")


def check_variants(variants: Any, space: dict, cfg: Config) -> None:
    """Each variant is a named bundle of valid overrides that no space key also varies."""
    if not isinstance(variants, dict):
        raise ConfigError(f"sweep.variants must be a mapping of name -> {{config key: value}}, "
                          f"got {variants!r}")
    tree = cfg.to_dict()
    for name, bundle in variants.items():
        where = f"sweep.variants.{name}"
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: a variant name is letters, digits, '.', '_' or '-' (it "
                              "names trials in MLflow)")
        if not isinstance(bundle, dict):
            raise ConfigError(f"{where} must be a mapping of config keys to values, e.g. "
                              f"{{loss.kd: 'off'}}; got {bundle!r}")
        fixed = sorted(set(bundle) & set(IDENTITY_KEYS))
        shared = sorted(set(bundle) & set(space))
        if fixed or shared:
            raise ConfigError(f"{where} sets {fixed or shared}, which "
                              + ("the sweep sets for each trial" if fixed else
                                 "sweep.space also varies; set each key in one place"))
        try:
            from_dict(apply_overrides(copy.deepcopy(tree), dict(bundle)))
        except ConfigError as exc:
            raise ConfigError(f"{where} gives an invalid config: {exc}") from None


def build_space(space: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """YAML domains -> Tune domains, each key checked against the config and its values tried.

    Every value a domain can produce at its ends (bounds, choices, grid values) is put into the
    config once, so a space that would give a trial an invalid config fails here, not mid-sweep.
    """
    known = cfg.flat()
    tree = cfg.to_dict()
    out: dict[str, Any] = {}
    for key, spec in space.items():
        where = f"sweep.space.{key}"
        if key not in known:
            from difflib import get_close_matches

            close = get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {key!r} is not a config key{hint}")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where} must be one domain, e.g. {{loguniform: [1e-4, 1e-3]}}, "
                              f"{{choice: [a, b]}}; got {spec!r}")
        (kind, args), = spec.items()
        if kind not in DOMAINS:
            raise ConfigError(f"{where}: unknown domain {kind!r}; choose one of {list(DOMAINS)}")
        arity = DOMAINS[kind]
        if not isinstance(args, list) or (arity is None and not args) or (
                arity is not None and len(args) != arity):
            need = "a non-empty list of values" if arity is None else f"a list of {arity} numbers"
            raise ConfigError(f"{where}: {kind} needs {need}, got {args!r}")
        if arity is not None:
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{where}: {kind} bounds must be numbers, got {args!r}")
            if not args[0] < args[1]:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}: randint bounds must be integers, got {args!r}")
        # randint's high is exclusive; the last value it can give is high - 1.
        ends = args if arity is None else (
            [args[0], args[1] - 1] if kind == "randint" else args[:2])
        for value in ends:
            try:
                from_dict(apply_overrides(copy.deepcopy(tree), {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"{where}: value {value!r} gives an invalid config: {exc}") \
                    from None
        out[key] = _domain(kind, args)
    return out


def tune_space(spec: SweepSpec, cfg: Config) -> dict[str, Any]:
    """The Tune ``param_space``; with ``search_alg: grid``, every choice becomes a grid axis.

    Variants are always a grid axis (``variant``: their names), crossed with the other keys.
    """
    space = build_space(spec.space, cfg)
    variants = {VARIANT_KEY: _domain("grid", list(spec.variants))} if spec.variants else {}
    if spec.search_alg != "grid":
        return {**space, **variants}
    continuous = [k for k, v in spec.space.items() if next(iter(v)) not in ("grid", "choice")]
    if continuous:
        raise ConfigError(f"sweep.search_alg=grid needs grid or choice domains; {continuous} "
                          "are continuous (use search_alg: random)")
    return {**{k: _domain("grid", next(iter(v.values()))) for k, v in spec.space.items()},
            **variants}


def _domain(kind: str, args: list):
    from ray import tune

    if kind == "choice":
        return tune.choice(args)
    if kind == "grid":
        return tune.grid_search(args)
    return getattr(tune, kind)(*args)


def load_sweep(path: str | Path, overrides: list[str]) -> tuple[Config, SweepSpec]:
    """The run config and its sweep; ``sweep.K=V`` / ``sweep.scheduler.K=V`` override the sweep."""
    sweep_over = [o for o in overrides if o.split("=", 1)[0].startswith("sweep.")]
    cfg = load_config(path, [o for o in overrides if o not in sweep_over])
    raw = copy.deepcopy(load_yaml(path).get("sweep") or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: sweep must be a mapping, got {raw!r}")
    for key, value in parse_overrides(sweep_over).items():
        parts = key.split(".")[1:]
        if len(parts) == 2 and parts[0] == "scheduler":
            raw.setdefault("scheduler", {})[parts[1]] = value
        elif len(parts) == 1 and parts[0] not in ("scheduler", "space", "variants"):
            raw[parts[0]] = value
        else:
            raise ConfigError(f"override {key!r}: only sweep.<key> and sweep.scheduler.<key> can "
                              "be overridden; edit the YAML's sweep.space and sweep.variants")
    return cfg, parse_sweep(raw, cfg)


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
    from launch.train import storage_path

    return f"{storage_path(cfg).rstrip('/')}/{spec.name}"


def tracking_uri(cfg: Config, spec: SweepSpec) -> str:
    """One MLflow store for the driver and every worker of every trial."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # Config validation refuses a remote run.storage without a tracking URI, so this is local.
    root = experiment_path(cfg, spec)
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(root, 'mlflow.db')}"


def report_dir(cfg: Config, spec: SweepSpec) -> Path:
    """Local folder for the sweep's table, plot and MLflow spool."""
    from trainer.storage import is_remote

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
    values = dict(values)
    variant = values.pop(VARIANT_KEY, None)
    tree = copy.deepcopy(base)
    if variant is not None:
        if variant not in (variants or {}):
            raise ConfigError(f"trial {trial_id}: variant {variant!r} is not in sweep.variants "
                              f"{sorted(variants or {})}")
        apply_overrides(tree, dict(variants[variant]))
    apply_overrides(tree, values)
    apply_overrides(tree, {"run.name": trial_run_name(sweep, trial_id), "run.storage": storage,
                           "tracking.uri": uri, "tracking.parent_run_id": parent_run_id})
    return from_dict(tree)


def _trial(values: dict, *, base: dict, sweep: str, storage: str, uri: str,
           parent_run_id: str, variants: dict[str, dict], teacher_eval_dir: str | None,
           cwd: str, env: dict[str, str]) -> None:
    """Tune function trainable: fit one Ray Train run; its reports reach Tune via the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from launch.train import build_trainer

    # Tune starts a trial in its trial folder; relative paths in the config (shards, teacher)
    # mean the launch folder, as for a single run (launch.train passes it on to the workers).
    if Path(cwd).is_dir():
        os.chdir(cwd)
    cfg = trial_config(base, values, sweep=sweep, trial_id=tune.get_context().get_trial_id(),
                       storage=storage, uri=uri, parent_run_id=parent_run_id, variants=variants)
    label_trial_run(cfg, values.get(VARIANT_KEY), teacher_eval_dir)
    build_trainer(cfg, name=cfg.run.name, callbacks=[TuneReportCallback()], env=env).fit()


def label_trial_run(cfg: Config, variant: str | None, teacher_eval_dir: str | None) -> None:
    """Open the trial's MLflow run before its workers do (they find it by its run key) and
    record what the config alone does not say: the variant name (tag and param) and, with
    ``teacher_eval``, the teacher's own zero-shot metrics (``teacher/*`` at step 0).

    Records go through the run folder's spool, which the rank-0 tracker replays if MLflow
    is down now.
    """
    from trainer.storage import local_run_dir
    from trainer.tracking import Tracker

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
    from trainer.teacher_pretrain import zero_shot_eval_split

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


def open_tuner(path: str, trainable: Callable, make_new: Callable[[], Any]) -> tuple[Any, bool]:
    """Restore the experiment at ``path`` if one is there, else start a new one."""
    from ray import tune

    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                  resume_errored=True), True
    return make_new(), False


# ------------------------------------------------------------------------------ results


def trial_rows(histories: dict[str, list[dict]], metric: str, mode: str
               ) -> list[tuple[str, dict[str, float]]]:
    """Each trial's best evaluation (the SPEC 1 metrics at its best ``metric``), best first.

    Trials that never reported ``metric`` are left out.
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


def markdown_table(rows: list[tuple[str, dict[str, float]]], params: dict[str, dict]) -> str:
    """The trial table as Markdown: trial, its sampled values, the metrics of its best eval."""
    from trainer.evaluate import COLUMNS

    keys = sorted({k for p in params.values() for k in p})
    cols = [c for c in (*COLUMNS, "step") if any(c in m for _, m in rows)]
    lines = ["| trial | " + " | ".join(keys + cols) + " |",
             "|" + "---|" * (1 + len(keys) + len(cols))]
    for label, m in rows:
        vals = [_short(params.get(label, {}).get(k, "")) for k in keys]
        vals += ["-" if c not in m else f"{m[c]:.0f}" if c == "step" else f"{m[c]:.2f}"
                 for c in cols]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(histories: dict[str, list[dict]], metric: str, path: Path) -> Path:
    """PNG of ``metric`` against step, one line per trial (written atomically)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for label, history in histories.items():
        points = sorted((r["step"], r[metric]) for r in history
                        if _finite(r.get(metric)) and _finite(r.get("step")))
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"validation {metric} per trial")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _write(path: Path, text: str) -> Path:
    return write_atomic(path, text)


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
    from trainer.tracking import Tracker

    folder = report_dir(cfg, spec)
    tracker = Tracker(uri, cfg.tracking.experiment, spec.name, folder / "mlflow-spool.jsonl",
                      system_metrics=False)
    params = {f"sweep.{k}": v for k, v in asdict(spec).items()
              if k not in ("space", "variants", "claims")}
    params[CLAIMS_PARAM] = json.dumps(spec.claims, sort_keys=True)
    params.update({f"sweep.space.{k}": json.dumps(v) for k, v in spec.space.items()})
    params.update({f"sweep.variants.{k}": json.dumps(v) for k, v in spec.variants.items()})
    params.update(cfg.flat())
    tracker.start(params, {"dldkd.kind": "sweep", "dldkd.sweep": spec.name})
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


def run_sweep(cfg: Config, spec: SweepSpec) -> SweepResult:
    """Run (or resume) the sweep on the connected Ray cluster; log and print its results."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from launch.train import storage_path
    from trainer.storage import endpoint_env

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
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.to_dict(), sweep=spec.name,
                             storage=f"{path}/trials", uri=uri, parent_run_id=parent_id,
                             variants=spec.variants,
                             teacher_eval_dir=str(report_dir(cfg, spec) / "teacher-eval")
                             if spec.teacher_eval else None, cwd=os.getcwd(),
                             env=endpoint_env()),
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

    def new_tuner():
        return tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                scheduler=scheduler,
                # Tune ignores max_concurrent_trials next to a generator: limit it here.
                search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=limit),
                trial_name_creator=functools.partial(_trial_name, spec.name),
                trial_dirname_creator=functools.partial(_trial_name, spec.name)),
            run_config=tune.RunConfig(name=spec.name, storage_path=storage_path(cfg)))

    tuner, resumed = open_tuner(path, trainable, new_tuner)
    if resumed:
        log.info("resuming sweep %s from %s", spec.name, path)
    grid = tuner.fit()

    histories: dict[str, list[dict]] = {}
    params: dict[str, dict] = {}
    errors: list[str] = []
    for result in grid:
        label = Path(result.path).name
        frame = result.metrics_dataframe
        histories[label] = frame.to_dict("records") if frame is not None else []
        params[label] = {k: v for k, v in (result.config or {}).items()
                         if k in spec.space or k == VARIANT_KEY}
        if result.error is not None:
            errors.append(f"{label}: {type(result.error).__name__}: {result.error}")
    rows = trial_rows(histories, spec.metric, spec.mode)
    out = report_dir(cfg, spec)
    out.mkdir(parents=True, exist_ok=True)
    table = _write(out / "trials.md", f"# Sweep {spec.name}\n\nSorted by best {spec.metric} "
                   f"({spec.mode}).\n\n" + markdown_table(rows, params))
    plot = plot_curves(histories, spec.metric, out / "sumr.png")

    from trainer.evaluate import format_table

    print(f"\nsweep {spec.name}: {len(rows)} of {len(histories)} trial(s) reported {spec.metric}, "
          f"sorted best first")
    print(format_table({f"{label} {_params_text(params.get(label, {}))}".strip(): m
                        for label, m in rows}))
    for err in errors:
        print(f"trial failed: {err}")
    print(f"table: {table}\nplot: {plot}\nMLflow: {uri} (parent run {parent_id or '-'})")

    if rows:
        best_label, best = rows[0]
        tracker.log_metrics({f"best/{spec.metric}": best[spec.metric]}, int(best.get("step", 0)))
        tracker.set_tags({"dldkd.best_trial": best_label})
    tracker.log_artifact(table, "sweep")
    tracker.log_artifact(plot, "sweep")
    failed = not rows
    tracker.finish("FAILED" if failed else "FINISHED")
    if parent_id:
        try:
            _close_stale_children(uri, parent_id)
        except Exception as exc:  # noqa: BLE001 - bookkeeping only
            log.warning("could not close stopped trial runs: %s", exc)
    if failed:
        raise RuntimeError(f"sweep {spec.name}: no trial reported {spec.metric}; "
                           + ("; ".join(errors) or "see the trial logs"))
    return SweepResult(spec.name, rows, errors, resumed, parent_id, uri, plot, table)


def _params_text(values: dict) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in sorted(values.items()))


# ------------------------------------------------------------------------------ entry points


def run(args: argparse.Namespace) -> SweepResult:
    from launch.train import init_ray
    from trainer.recipe import setup_logging

    setup_logging()
    cfg, spec = load_sweep(args.config, args.overrides)
    init_ray(args.address, args.num_cpus)
    return run_sweep(cfg, spec)


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.sweep ...`` (what ``ray job submit`` runs) is ``dldkd sweep ...``."""
    from launch.cli import main as cli

    return cli(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

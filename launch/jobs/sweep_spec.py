"""A sweep's ``sweep:`` section: the validated spec and its Ray Tune search space.

The YAML holds a run config plus a ``sweep:`` section (docs/sweeps.md)::

    sweep:
      name: demo-sweep            # experiment folder <run.storage>/<name>; default run.name
      metric: val/SumR            # reported by every evaluation of a trial
      mode: max
      num_samples: 2
      search_alg: random          # random | grid | optuna (TPE)
      max_concurrent: 0           # 0 = as many trials as the cluster's CPUs/GPUs hold
      scheduler: {type: asha, time_attr: step, max_t: 8, grace_period: 4, reduction_factor: 2}
      space:
        optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
        loss.targets: {choice: [soft, hard]}
        train.seed: {range: [1, 4]}   # integers 1 to 4, both ends included: a grid axis
      variants:                   # optional: one more grid axis of named override bundles
        dldkd: {loss.targets: hard}
        dldkdpp: {loss.targets: soft, train.seed: {range: [1, 8]}}   # its own seeds
      claims:                     # optional: paired comparisons `dldkd report` tests
        kd_helps: {better: dldkdpp, worse: dldkd}
      teacher_eval: false         # log the teacher's zero-shot val metrics on each child run

A variant may give a grid axis of the space its own values (``train.seed: {range: [1, 8]}``):
claims that need more paired seeds extend only the variants they compare. The grid is then a
list of trial points (``grid_points``), and adding points to a finished sweep runs only the new
ones (launch/jobs/sweep.py).

It is checked here, before a cluster is touched: every key must be a config key, and every value
a domain can produce must give a valid config.
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import Config, ConfigError, apply_overrides, from_dict, load_config, load_yaml
from trainer.config import parse_overrides

SCHEDULERS = ("asha", "fifo")
SEARCH_ALGS = ("random", "grid", "optuna")
# Domain name -> number of YAML arguments (None: a non-empty list of values).
DOMAINS: dict[str, int | None] = {"uniform": 2, "quniform": 3, "loguniform": 2, "randint": 2,
                                  "choice": None, "grid": None, "range": 2}
# Domains that are grid axes under search_alg grid (range: integers low..high, both included).
GRID_DOMAINS = ("grid", "choice", "range")
MAX_RANGE = 10_000
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The Tune parameter holding a trial's variant name, and the MLflow params the sweep adds.
VARIANT_KEY = "variant"
# The Tune parameter holding a trial's grid point when the grid is not a full product.
POINT_KEY = "point"
VARIANT_PARAM = "sweep.variant"
CLAIMS_PARAM = "sweep.claims"   # on the parent run: what `dldkd report` tests
# Keys a sweep must not vary: they are each trial's identity, set by the sweep (a trial registers
# no model: the sweep registers its best trial's).
IDENTITY_KEYS = ("run.name", "run.storage", "tracking.uri", "tracking.parent_run_id",
                 "tracking.registered_model")


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
    # comparisons `dldkd report` tests (difference in SumR by seed, t 95% CI, verdict, power).
    claims: dict[str, dict] = field(default_factory=dict)


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
        hint = " (hyperopt/bayesopt are not installed here)" if spec.search_alg in (
            "hyperopt", "bayesopt") else ""
        raise ConfigError(f"sweep.search_alg={spec.search_alg!r} is not available{hint}; "
                          f"choose one of {list(SEARCH_ALGS)}")
    if spec.search_alg == "optuna" and spec.claims:
        raise ConfigError("sweep.claims compare variants at the same seeds, which only a crossed "
                          "grid guarantees: use search_alg random or grid with claims")
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
        axes = {k: v for k, v in bundle.items() if k in space and isinstance(v, dict)}
        shared = sorted(set(bundle) & set(space) - set(axes))
        if fixed or shared:
            raise ConfigError(f"{where} sets {fixed or shared}, which "
                              + ("the sweep sets for each trial" if fixed else
                                 "sweep.space also varies; set each key in one place"))
        for key, domain in axes.items():
            if next(iter(space[key]), None) not in GRID_DOMAINS:
                raise ConfigError(f"{where}.{key}: only a grid axis of sweep.space (grid, choice "
                                  f"or range) can take a variant's own values; "
                                  f"sweep.space.{key} is {space[key]!r}")
            build_space({key: domain}, cfg, f"{where}.{key}")
            if next(iter(domain)) not in GRID_DOMAINS:
                raise ConfigError(f"{where}.{key} must be a grid, choice or range domain, got "
                                  f"{domain!r}")
        plain = {k: v for k, v in bundle.items() if k not in axes}
        try:
            from_dict(apply_overrides(copy.deepcopy(tree), plain))
        except ConfigError as exc:
            raise ConfigError(f"{where} gives an invalid config: {exc}") from None


def build_space(space: dict[str, Any], cfg: Config, prefix: str = "") -> dict[str, Any]:
    """YAML domains -> Tune domains, each key checked against the config and its values tried.

    Every value a domain can produce at its ends (bounds, choices, grid values) is put into the
    config once, so a space that would give a trial an invalid config fails here, not mid-sweep.
    """
    known = cfg.flat()
    tree = cfg.to_dict()
    out: dict[str, Any] = {}
    for key, spec in space.items():
        where = prefix or f"sweep.space.{key}"
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
            if not (args[0] <= args[1] if kind == "range" else args[0] < args[1]):
                raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
            if kind in ("randint", "range") and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}: {kind} bounds must be integers, got {args!r}")
            if kind == "range" and args[1] - args[0] >= MAX_RANGE:
                raise ConfigError(f"{where}: range {args!r} holds more than {MAX_RANGE} values")
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


def axis_values(domain: dict) -> list:
    """The values of a grid axis (``grid``, ``choice`` or ``range``) in order."""
    (kind, args), = domain.items()
    return list(range(args[0], args[1] + 1)) if kind == "range" else list(args)


def grid_axes(spec: SweepSpec) -> list[str]:
    """The space keys that are grid axes (every key under ``search_alg: grid``; only the
    ``grid`` and ``range`` keys otherwise)."""
    kinds = GRID_DOMAINS if spec.search_alg == "grid" else ("grid", "range")
    return [k for k, v in spec.space.items() if next(iter(v)) in kinds]


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial's grid values (variant, then each grid axis, a variant's own values where it
    gives them), ordered axis by axis with the variant fastest: seed 1 of every variant before
    seed 2, so an interrupted sweep has its pairs complete."""
    axes = grid_axes(spec)
    points = []
    for index, name in enumerate(spec.variants or [None]):
        bundle = spec.variants.get(name, {}) if name else {}
        values = [axis_values(bundle[k] if isinstance(bundle.get(k), dict) else spec.space[k])
                  for k in axes]
        for combo in itertools.product(*values):
            point = dict(zip(axes, combo))
            if name is not None:
                point[VARIANT_KEY] = name
            points.append((combo, index, point))
    points.sort(key=lambda p: (tuple(_order(v) for v in p[0]), p[1]))
    return [p for _, _, p in points]


def _order(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def is_product(spec: SweepSpec) -> bool:
    """True when no variant gives an axis its own values: the grid is axes x variants."""
    return not any(isinstance(v, dict) for b in spec.variants.values() for v in b.values())


def point_space(points: list[dict[str, Any]]) -> dict[str, Any]:
    """A grid that is a list of points, not a product: one grid axis over the points."""
    return {POINT_KEY: _domain("grid", points)}


def flat_values(values: dict[str, Any]) -> dict[str, Any]:
    """A trial's Tune config with its grid point (if any) spread into plain keys."""
    values = dict(values)
    values.update(values.pop(POINT_KEY, None) or {})
    return values


def tune_space(spec: SweepSpec, cfg: Config) -> dict[str, Any]:
    """The Tune ``param_space``; with ``search_alg: grid``, every choice becomes a grid axis.

    Variants are a grid axis (``variant``: their names), crossed with the other keys; when a
    variant gives an axis its own values, the grid is the list of ``grid_points``. Optuna
    samples every key, so with ``search_alg: optuna`` grid keys and variants are categoricals.
    """
    space = build_space(spec.space, cfg)
    if spec.search_alg == "optuna":
        if not is_product(spec):
            raise ConfigError("a variant's own grid values (e.g. its own train.seed range) need "
                              "search_alg grid or random; optuna samples every key")
        grids = {k: _domain("choice", axis_values(v)) for k, v in spec.space.items()
                 if next(iter(v)) in ("grid", "range")}
        variants = {VARIANT_KEY: _domain("choice", list(spec.variants))} if spec.variants else {}
        return {**space, **grids, **variants}
    if spec.search_alg == "grid":
        continuous = [k for k, v in spec.space.items() if next(iter(v)) not in GRID_DOMAINS]
        if continuous:
            raise ConfigError(f"sweep.search_alg=grid needs grid, choice or range domains; "
                              f"{continuous} are continuous (use search_alg: random)")
    axes = grid_axes(spec)
    sampled = {k: v for k, v in space.items() if k not in axes}
    if not is_product(spec):
        return {**sampled, **point_space(grid_points(spec))}
    variants = {VARIANT_KEY: _domain("grid", list(spec.variants))} if spec.variants else {}
    return {**sampled, **{k: _domain("grid", axis_values(spec.space[k])) for k in axes},
            **variants}


def search_algorithm(spec: SweepSpec, limit: int):
    """Tune's search algorithm for ``sweep.search_alg``, running at most ``limit`` trials at once.

    ``random`` and ``grid`` are Tune's variant generator (the space holds the grid axes);
    ``optuna`` is TPE seeded with ``sweep.seed``, learning from each finished trial's last
    reported ``sweep.metric`` (Tune gives it the metric and mode)."""
    if spec.search_alg == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=limit)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores max_concurrent_trials next to a generator: limit it here.
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=limit)


def _domain(kind: str, args: list):
    from ray import tune

    if kind == "choice":
        return tune.choice(args)
    if kind in ("grid", "range"):
        return tune.grid_search(axis_values({kind: args}))
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

"""Typed run configuration: one place that builds, overrides and validates it.

A config is a tree of dataclasses loaded from YAML (``yaml.safe_load``), overridden with dotted
``key.sub=value`` strings, and checked by :func:`validate`, whose errors name the key, the value
and what is allowed. Every other module takes a ``Config`` (or one of its sections), never a dict.
"""
from __future__ import annotations

import ast
import difflib
import os
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sharding.files import write_atomic
from trainer.storage import is_remote


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and what is allowed."""


@dataclass
class ModelConfig:
    """The dual-branch student (method.md §3)."""

    video_dim: int = 3072
    query_dim: int = 768
    hidden: int = 384
    heads: int = 4
    max_frames: int = 128
    max_words: int = 30
    input_drop: float = 0.2
    drop: float = 0.2
    # "dual" (DL-DKD), or one branch alone for the ablations.
    branches: str = "dual"
    # Test score S = w * S_inh + (1 - w) * S_exp (method.md §7).
    inh_weight: float = 0.7


@dataclass
class LossConfig:
    """Loss terms and their coefficients (method.md §5)."""

    margin: float = 0.1
    hard_pool: int = 20
    hard_negative_start_epoch: int = 0
    nce_weight: float = 0.04
    kd_temp: float = 0.2
    # "dynamic" (lambda(e) from kd_schedule), "static" (kd_static_weight), or "off".
    kd: str = "dynamic"
    kd_schedule: str = "exp_down"
    kd_static_weight: float = 0.1
    # lambda(e) = kd_weight * shape(e) for every named shape (the reference's kl_intra_weight).
    kd_weight: float = 0.1
    # Shape constants (docs/method.md): exp_down base^e; linear max(1 - slope e, floor);
    # sigmoid k / (k + exp(100 e / k)); exp_up clip(1 - base^e, exp_up_min, 1).
    kd_exp_base: float = 0.95
    kd_linear_slope: float = 0.01
    kd_linear_floor: float = 0.05
    kd_sigmoid_k: float = 800.0
    kd_exp_up_min: float = 0.01
    # sigma(e) = k / (k + exp(e / tau)); alpha = scale sigma; beta = max(scale sigma, beta_floor).
    soft_sigma_k: float = 800.0
    soft_sigma_tau: float = 8.0
    soft_scale: float = 0.8
    soft_beta_floor: float = 0.5
    # Schedule horizon: 0 = schedules run on real epochs (the paper); H > 0 maps the run's
    # progress (step / total steps) onto schedule epochs [0, H), so a short run traverses the
    # same lambda/alpha/beta trajectory as an H-epoch one.
    schedule_epochs: float = 0.0
    # "soft" = DL-DKD++ dynamic soft targets; "hard" = DL-DKD InfoNCE.
    targets: str = "soft"
    # Control for the ablation: permute the teacher's targets across the batch.
    shuffle_teacher: bool = False


@dataclass
class OptimConfig:
    """BERT-Adam with warm-up and linear decay (method.md §7); AdamW where an engine needs its own."""

    name: str = "bert_adam"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup: float = 0.01
    grad_clip: float = 1.0


@dataclass
class DataConfig:
    """Where the shards are and how batches are cut (DESIGN data flow 2)."""

    train: str = ""
    val: str = ""
    test: str = ""
    batch_videos: int = 128
    # Steps per virtual epoch; 0 = derived from the train manifest (videos / global batch).
    steps_per_epoch: int = 0
    loader_workers: int = 2
    resampled: bool = True
    # Every training video once per epoch, in a fresh order across shards, the same number of
    # steps on every rank (sharding/epochs.py); steps_per_epoch > 0 then cuts epochs short.
    # False: `resampled` decides (streaming, for data too large to index).
    true_epochs: bool = True
    shuffle_buffer: int = 256
    max_bad_fraction: float = 0.01
    # Videos encoded and scored per chunk in evaluation (memory: chunk x frames x features).
    eval_batch_videos: int = 256
    # Hold the decoded training split in memory and batch by indexing (true epochs only):
    # "auto" when it fits in resident_max_mb per worker, "on", or "off" (stream every epoch).
    resident: str = "auto"
    resident_max_mb: float = 4096.0


@dataclass
class TeacherConfig:
    """The frozen open_clip teacher (method.md §4, DESIGN data flow 3)."""

    arch: str = "ViT-B-32"
    # open_clip pretrained tag ("openai", "laion2b_s34b_b79k"), "hf-hub:org/name", or a local file.
    pretrained: str = ""
    # Optional open_clip JSON model config registered under `arch` (custom/tiny models).
    model_config: str = ""
    # "replicated", "zero3" (parameters partitioned over ranks), or "precomputed" (from shards).
    placement: str = "replicated"
    # Use CLIP's logit scale on normalised embeddings for T instead of the raw dot product.
    logit_scale_targets: bool = False
    cache: bool = True
    cache_mem_mb: int = 512
    cache_dir: str = ""
    image_batch: int = 256


@dataclass
class TrainConfig:
    """The loop: length, evaluation, early stopping, checkpoints, logging."""

    epochs: int = 120
    early_stop: int = 10
    # Evaluate every N steps; 0 = at the end of every virtual epoch.
    eval_every: int = 0
    ckpt_every: int = 0
    log_every: int = 50
    seed: int = 9527
    max_eval_queries: int = 0
    deterministic: bool = False
    # On SIGTERM/SIGINT: seconds allowed to reach the next log step and save a checkpoint.
    stop_grace_s: float = 300.0
    # Re-check tensor values inside the step (labels, NaN, empty masks): each check is a
    # device-to-host sync, so it is off in training; inputs are validated where they enter.
    debug: bool = False


@dataclass
class DistConfig:
    """Workers, DeepSpeed engine and fault tolerance."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    zero_stage: int = 0
    precision: str = "fp32"
    grad_accum: int = 1
    # Ray placement strategy: "PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK".
    placement_strategy: str = "PACK"
    max_failures: int = 0
    timeout_s: int = 1800


@dataclass
class TrackingConfig:
    """MLflow: empty uri = $MLFLOW_TRACKING_URI where the config is loaded, else a SQLite file
    under the run folder."""

    uri: str = ""
    experiment: str = "dldkd"
    system_metrics: bool = True
    parent_run_id: str = ""


@dataclass
class RunConfig:
    """Identity and storage of one run."""

    name: str = "dldkd"
    # Local folder or URI (s3://...) where checkpoints and Ray results live.
    storage: str = "runs"
    resume: str = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """``{"model.hidden": 384, ...}``: the form MLflow params and overrides use."""
        return flatten(self.to_dict())

    def uses_teacher(self) -> bool:
        return self.model.branches != "exploration" and (
            self.loss.kd != "off" or self.loss.targets == "soft")


CHOICES: dict[str, tuple[str, ...]] = {
    "model.branches": ("dual", "inheritance", "exploration"),
    "loss.kd": ("dynamic", "static", "off"),
    "loss.targets": ("soft", "hard"),
    "optim.name": ("bert_adam", "adamw"),
    "teacher.placement": ("replicated", "zero3", "precomputed"),
    "dist.precision": ("fp32", "bf16"),
    "dist.placement_strategy": ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"),
    "run.resume": ("auto", "never", "must"),
    "data.resident": ("auto", "on", "off"),
}

# (key, low, high, inclusive-low): numeric ranges checked by `validate`.
RANGES: list[tuple[str, float, float, bool]] = [
    ("model.video_dim", 1, float("inf"), True),
    ("model.query_dim", 1, float("inf"), True),
    ("model.hidden", 1, float("inf"), True),
    ("model.heads", 1, float("inf"), True),
    ("model.max_frames", 1, float("inf"), True),
    ("model.max_words", 1, float("inf"), True),
    ("model.input_drop", 0, 1, True),
    ("model.drop", 0, 1, True),
    ("model.inh_weight", 0, 1, True),
    ("loss.margin", 0, float("inf"), True),
    ("loss.hard_pool", 1, float("inf"), True),
    ("loss.hard_negative_start_epoch", 0, float("inf"), True),
    ("loss.nce_weight", 0, float("inf"), True),
    ("loss.kd_temp", 0, float("inf"), False),
    ("loss.kd_static_weight", 0, float("inf"), True),
    ("loss.kd_weight", 0, float("inf"), True),
    ("loss.kd_exp_base", 0, 1, False),
    ("loss.kd_linear_slope", 0, float("inf"), True),
    ("loss.kd_linear_floor", 0, 1, True),
    ("loss.kd_sigmoid_k", 0, float("inf"), False),
    ("loss.kd_exp_up_min", 0, 1, True),
    ("loss.soft_sigma_k", 0, float("inf"), False),
    ("loss.soft_sigma_tau", 0, float("inf"), False),
    ("loss.soft_scale", 0, 1, True),
    ("loss.soft_beta_floor", 0, 1, True),
    ("loss.schedule_epochs", 0, float("inf"), True),
    ("optim.lr", 0, 1, False),
    ("optim.eps", 0, 1, False),
    ("optim.weight_decay", 0, 1, True),
    ("optim.warmup", 0, 1, True),
    ("optim.grad_clip", 0, float("inf"), True),
    ("data.batch_videos", 1, float("inf"), True),
    ("data.steps_per_epoch", 0, float("inf"), True),
    ("data.loader_workers", 0, 64, True),
    ("data.shuffle_buffer", 0, float("inf"), True),
    ("data.max_bad_fraction", 0, 1, True),
    ("data.eval_batch_videos", 1, float("inf"), True),
    ("data.resident_max_mb", 0, float("inf"), True),
    ("teacher.cache_mem_mb", 0, float("inf"), True),
    ("teacher.image_batch", 1, float("inf"), True),
    ("train.epochs", 1, float("inf"), True),
    ("train.early_stop", 0, float("inf"), True),
    ("train.eval_every", 0, float("inf"), True),
    ("train.ckpt_every", 0, float("inf"), True),
    ("train.log_every", 1, float("inf"), True),
    ("train.max_eval_queries", 0, float("inf"), True),
    ("train.stop_grace_s", 0, float("inf"), False),
    ("dist.num_workers", 1, 4096, True),
    ("dist.cpus_per_worker", 0, 1024, True),
    ("dist.zero_stage", 0, 3, True),
    ("dist.grad_accum", 1, 4096, True),
    ("dist.max_failures", -1, float("inf"), True),
    ("dist.timeout_s", 1, float("inf"), True),
]


def validate(cfg: Config) -> None:
    """Check types, choices, ranges and cross-field rules; raise ConfigError naming the key."""
    _check_types(cfg, "")
    flat = cfg.flat()
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not allowed; choose one of {list(allowed)}")
    for key, low, high, inclusive in RANGES:
        value = flat[key]
        ok = (value >= low if inclusive else value > low) and value <= high
        if not ok:
            bracket = "[" if inclusive else "("
            raise ConfigError(f"{key}={value!r} is out of range; allowed {bracket}{low}, {high}]")
    from trainer.schedules import KD_SHAPES  # local: schedules imports nothing of ours

    if cfg.loss.kd_schedule not in KD_SHAPES:
        raise ConfigError(f"loss.kd_schedule={cfg.loss.kd_schedule!r} is not a schedule; "
                          f"choose one of {sorted(KD_SHAPES)}")
    if cfg.model.hidden % cfg.model.heads:
        raise ConfigError(f"model.hidden={cfg.model.hidden} must be divisible by "
                          f"model.heads={cfg.model.heads}")
    if cfg.teacher.placement == "zero3" and cfg.dist.num_workers < 2:
        raise ConfigError("teacher.placement='zero3' needs dist.num_workers >= 2 to partition "
                          f"the teacher (got {cfg.dist.num_workers}); use 'replicated'")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} must be two numbers in [0, 1)")
    if is_remote(cfg.run.storage) and not cfg.tracking.uri:
        raise ConfigError(f"run.storage={cfg.run.storage!r} is remote, so the default MLflow store "
                          "(a SQLite file in the run folder) has nowhere to live: set tracking.uri "
                          "(e.g. http://mlflow:5000), or $MLFLOW_TRACKING_URI where the config "
                          "is loaded")
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name={cfg.run.name!r} must be a non-empty name without '/'")


# What a relaunch of an existing run (same run.name) may change: length, evaluation, logging,
# I/O and fault-tolerance settings. Any other change needs a new run.name (docs/training.md).
RESUMABLE = ("train.epochs", "train.early_stop", "train.eval_every", "train.ckpt_every",
             "train.log_every", "train.max_eval_queries", "train.stop_grace_s", "train.debug",
             "data.train", "data.val", "data.test", "data.loader_workers", "data.resident",
             "data.resident_max_mb",
             "data.max_bad_fraction", "teacher.cache", "teacher.cache_mem_mb", "teacher.cache_dir",
             "teacher.image_batch", "dist.max_failures", "dist.timeout_s", "dist.cpus_per_worker",
             "dist.placement_strategy", "tracking.", "run.")


def resume_changes(saved: dict[str, Any], now: dict[str, Any]
                   ) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(allowed, refused) differences between a checkpoint's flat config and this one, each
    ``key -> (old, new)``; keys unknown to one side count as changed."""
    allowed, refused = {}, {}
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            old, new = list(old), list(new)
        if old == new:
            continue
        ok = any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)
        (allowed if ok else refused)[key] = (old, new)
    return allowed, refused


def _check_types(obj: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{key} must be a section (mapping), got {value!r}")
            _check_types(value, key + ".")
            continue
        coerced = _coerce(key, value, hint)
        setattr(obj, f.name, coerced)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [0.9, 0.999]")
        args = typing.get_args(hint)
        return tuple(_coerce(f"{key}[{i}]", v, args[min(i, len(args) - 1)])
                     for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_value(text: str) -> Any:
    """A command-line value: a Python/YAML literal where it parses, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    return text


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; an unknown section or key is an error naming it."""
    known = Config().flat()
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        node[parts[-1]] = value
    return tree


def from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (YAML), rejecting unknown keys."""
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, body in tree.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}; sections are {sorted(sections)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{name} must be a mapping, got {body!r}")
        cls = typing.get_type_hints(Config)[name]
        allowed = {f.name for f in dataclasses.fields(cls)}
        for key in body:
            if key not in allowed:
                raise ConfigError(f"unknown config key {name}.{key}; keys of {name} are "
                                  f"{sorted(allowed)}")
        kwargs[name] = cls(**body)
    return Config(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the file "
                          "(indentation, a missing ':' or an unclosed bracket or quote)") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
                ) -> Config:
    """YAML file (optional) + ``key.sub=value`` overrides + this process's environment
    (:func:`resolve_environment`) -> validated Config."""
    tree = load_yaml(path) if path else {}
    tree.pop("sweep", None)  # a sweep file's search space is read by launch.sweep
    return from_dict(resolve_environment(apply_overrides(tree, parse_overrides(overrides or []))))


# Keys that fall back to an environment variable when empty. The value is written into the config
# where it is loaded (the driver), so workers, whose environment may differ, get the same config.
ENV_FALLBACKS = {"tracking.uri": "MLFLOW_TRACKING_URI"}


def resolve_environment(tree: dict[str, Any], environ: dict[str, str] | None = None
                        ) -> dict[str, Any]:
    """Fill empty ``ENV_FALLBACKS`` keys of a config tree from ``environ`` (default os.environ)."""
    environ = os.environ if environ is None else environ
    for key, var in ENV_FALLBACKS.items():
        section, name = key.split(".")
        if not (tree.get(section) or {}).get(name) and environ.get(var):
            apply_overrides(tree, {key: environ[var]})
    return tree


def parse_overrides(overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        out[key.strip()] = parse_value(text)
    return out


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (sharding.files)."""
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""Typed run configuration: one place that builds, overrides and validates it.

A config is a tree of pydantic models; each key's type (``Literal`` for choices), default, bounds
and description live in its ``Field``. YAML files (with their ``base:`` chains) and dotted
``key.sub=value`` overrides are read by the same YAML rules (:mod:`trainer.config_files`), and
every error is a :class:`ConfigError` naming the key, the value and what is allowed. Every other
module takes a ``Config`` (or one of its sections), never a dict. (Over 400 lines: every key of
every section, with its bounds and description, is declared here, in one place by design.)
"""
from __future__ import annotations

import difflib
import os
import reprlib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from sharding.files import write_atomic
# ConfigError, load_yaml and parse_overrides are also imported from here by the rest of dldkd.
from trainer.config_files import ConfigError, load_yaml, parse_overrides
from trainer.infra.storage import is_remote


# Upper bounds: far above any real run, low enough that a typo fails here, not after setup.
MAX_DIM, MAX_BATCH, MAX_EPOCHS = 65_536, 65_536, 100_000
MAX_STEPS, MAX_MB, MAX_SECONDS = 1_000_000_000, 16 * 2**20, 7 * 86_400


class _Model(BaseModel):
    """Unknown keys are refused, and building one directly raises ConfigError like a file does."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            section = tuple(n for n, f in Config.model_fields.items() if f.annotation is type(self))
            raise _config_error(err, section) from None

    @field_validator("*", mode="before")
    @classmethod
    def _exact_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        """A switch takes true/false only (not 1 or 'yes'); a number takes no boolean."""
        kind = cls.model_fields[info.field_name].annotation
        if (kind is bool) != isinstance(value, bool) and kind in (bool, int, float):
            error = f"{kind.__name__}_type"
            raise PydanticCustomError(error, _MUST[error])
        return value


class ModelConfig(_Model):
    """The dual-branch student (method.md §3)."""

    video_dim: int = Field(3072, ge=1, le=MAX_DIM,
        description="Size of the shards' student video features.")
    query_dim: int = Field(768, ge=1, le=MAX_DIM,
        description="Size of the shards' caption token features.")
    hidden: int = Field(384, ge=1, le=MAX_DIM,
        description="Width of the student; a multiple of heads.")
    heads: int = Field(4, ge=1, le=1024, description="Attention heads.")
    max_frames: int = Field(128, ge=1, le=MAX_DIM,
        description="Longest video (feature steps) taken.")
    max_words: int = Field(30, ge=1, le=4096, description="Longest caption (tokens) taken.")
    input_drop: float = Field(0.2, ge=0, le=1, description="Dropout of the input layers.")
    drop: float = Field(0.2, ge=0, le=1, description="Dropout inside the encoders.")
    branches: Literal["dual", "inheritance", "exploration"] = Field(
        "dual", description="'dual' (DL-DKD), or one branch alone for the ablations.")
    inh_weight: float = Field(0.7, ge=0, le=1, description=(
        "w of the test score S = w * S_inh + (1 - w) * S_exp (method.md §7)."))


class LossConfig(_Model):
    """Loss terms and their coefficients (method.md §5); schedule shapes in method.md §6."""

    margin: float = Field(0.1, ge=0, description="Triplet ranking margin.")
    hard_pool: int = Field(20, ge=1, le=MAX_BATCH, description=(
        "A query's negative is drawn from its hard_pool best other videos (1: the hardest)."))
    hard_negative_start_epoch: int = Field(0, ge=0, le=MAX_EPOCHS, description=(
        "Real epoch from which negatives are hard; before it, any other video."))
    nce_weight: float = Field(0.04, ge=0, description="Weight of each branch's (soft) InfoNCE.")
    kd_temp: float = Field(0.2, gt=0, description="Temperature of the KD term.")
    kd: Literal["dynamic", "static", "off"] = Field("dynamic", description=(
        "'dynamic' (lambda(e) from kd_schedule), 'static' (kd_static_weight), or 'off'."))
    kd_schedule: Literal["exp_down", "linear", "sigmoid", "exp_up"] = Field(
        "exp_down", description="Shape of lambda(e) = kd_weight * shape(e) (trainer.method.schedules).")
    kd_static_weight: float = Field(0.1, ge=0, description="lambda when kd is 'static'.")
    kd_weight: float = Field(0.1, ge=0, description=(
        "lambda(e) = kd_weight * shape(e) for every shape (the reference's kl_intra_weight)."))
    kd_exp_base: float = Field(0.95, gt=0, le=1, description=(
        "exp_down: base^e; exp_up: 0.1 * clip(1 - base^e, kd_exp_up_min, 1) (the reference's "
        "decay_way 8)."))
    kd_linear_slope: float = Field(0.01, ge=0, description="linear: max(1 - slope e, floor).")
    kd_linear_floor: float = Field(0.05, ge=0, le=1, description="linear: its floor.")
    kd_sigmoid_k: float = Field(800.0, gt=0, description="sigmoid: k / (k + exp(100 e / k)).")
    kd_exp_up_min: float = Field(0.01, ge=0, le=1, description="exp_up: its lower clip.")
    soft_sigma_k: float = Field(800.0, gt=0, description="sigma(e) = k / (k + exp(e / tau)).")
    soft_sigma_tau: float = Field(8.0, gt=0, description="tau of sigma(e).")
    soft_scale: float = Field(0.8, ge=0, le=1, description=(
        "alpha = scale * sigma(e); beta = max(scale * sigma(e), soft_beta_floor)."))
    soft_beta_floor: float = Field(0.5, ge=0, le=1, description="The floor of beta.")
    schedule_epochs: float = Field(0.0, ge=0, description=(
        "0: schedules run on real epochs (the paper); H > 0 maps the run's progress onto "
        "schedule epochs [0, H), so a short run follows an H-epoch run's lambda/alpha/beta."))
    targets: Literal["soft", "hard"] = Field("soft", description=(
        "'soft': DL-DKD++ dynamic soft targets; 'hard': DL-DKD InfoNCE."))
    shuffle_teacher: bool = Field(False, description=(
        "Ablation control: permute the teacher's targets across the batch."))


class OptimConfig(_Model):
    """BERT-Adam with warm-up and linear decay (method.md §7); AdamW where an engine needs its own."""

    name: Literal["bert_adam", "adamw"] = Field("bert_adam", description=(
        "'bert_adam' (the reference's), or 'adamw' (torch AdamW)."))
    lr: float = Field(3e-4, gt=0, le=1, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999),
        description="Adam betas: two numbers in [0, 1).")
    eps: float = Field(1e-6, gt=0, le=1, description="Adam epsilon.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="Weight decay.")
    warmup: float = Field(0.01, ge=0, le=1, description=(
        "Fraction of the steps with linear warm-up; linear decay to 0 after it."))
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip; 0 = none.")

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                for b in value)):
            raise ConfigError(f"optim.betas={short(value)} must be two numbers in [0, 1)")
        return value


class DataConfig(_Model):
    """Where the shards are and how batches are cut (design.md data flow 2)."""

    train: str = Field("", description=(
        "Training shards: a folder or URI holding manifest.json, the manifest, or shard URLs."))
    val: str = Field("", description="Validation shards (evaluation, early stopping); empty: none.")
    test: str = Field("", description="Test shards, scored with the best weights at the end.")
    batch_videos: int = Field(128, ge=1, le=MAX_BATCH,
        description="Videos per micro-batch per worker.")
    steps_per_epoch: int = Field(0, ge=0, le=MAX_STEPS, description=(
        "Steps per virtual epoch; 0 = derived from the train manifest (videos / global batch)."))
    loader_workers: int = Field(2, ge=0, le=64, description="DataLoader processes per worker.")
    resampled: bool = Field(True, description=(
        "Without true_epochs: draw shards with replacement (streaming), else one pass an epoch."))
    true_epochs: bool = Field(True, description=(
        "Every training video once per epoch in a fresh order, the same steps on every rank "
        "(sharding/epochs.py); steps_per_epoch > 0 cuts epochs short; false: resampled decides."))
    shuffle_buffer: int = Field(256, ge=0, le=1_000_000,
        description="Samples in the streaming shuffle buffer.")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description=(
        "Fraction of damaged samples skipped before reading fails."))
    eval_batch_videos: int = Field(256, ge=1, le=MAX_BATCH, description=(
        "Videos encoded and scored per chunk in evaluation (memory: chunk x frames x features)."))
    resident: Literal["auto", "on", "off"] = Field("auto", description=(
        "Hold the decoded training split in memory and batch by indexing (true epochs only): "
        "'auto' when it fits in resident_max_mb per worker, 'on', or 'off' (stream every epoch)."))
    @field_validator("batch_videos")
    @classmethod
    def _negatives(cls, value: int) -> int:
        if value < 2:
            raise ConfigError(f"data.batch_videos={value}: the ranking losses need at least 2 "
                              "videos per batch (in-batch negatives); set data.batch_videos >= 2")
        return value

    resident_max_mb: float = Field(4096.0, ge=0, le=MAX_MB,
        description="Memory 'auto' residency may use.")


class TeacherConfig(_Model):
    """The frozen open_clip teacher (method.md §4, design.md data flow 3)."""

    arch: str = Field("ViT-B-32", description="open_clip architecture name.")
    pretrained: str = Field("", description=(
        "open_clip pretrained tag ('openai', 'laion2b_s34b_b79k'), 'hf-hub:org/name', or a file."))
    # The key is teacher.model_config; pydantic reserves that attribute name on a model.
    arch_config: str = Field("", alias="model_config", description=(
        "Optional open_clip JSON model config registered under arch (custom/tiny models)."))
    placement: Literal["replicated", "zero3", "precomputed"] = Field("replicated", description=(
        "'replicated', 'zero3' (parameters partitioned over ranks), or 'precomputed' (shards)."))
    logit_scale_targets: bool = Field(False, description=(
        "Use CLIP's logit scale on normalised embeddings for T instead of the raw dot product."))
    cache: bool = Field(True, description="Cache the frame embeddings across epochs.")
    cache_mem_mb: int = Field(512, ge=0, le=MAX_MB,
        description="Memory of the frame-embedding cache.")
    cache_dir: str = Field("", description="Where the cache spills; empty: evicted ones dropped.")
    image_batch: int = Field(256, ge=1, le=MAX_BATCH,
        description="Frames per chunk through the image tower.")


class TrainConfig(_Model):
    """The loop: length, evaluation, early stopping, checkpoints, logging."""

    epochs: int = Field(120, ge=1, le=MAX_EPOCHS, description="Run length in (virtual) epochs.")
    early_stop: int = Field(10, ge=0, le=MAX_EPOCHS, description=(
        "Stop after this many evaluations without a better SumR; 0 = never."))
    eval_every: int = Field(0, ge=0, le=MAX_STEPS, description=(
        "Evaluate every N steps; 0 = at the end of every virtual epoch."))
    ckpt_every: int = Field(0, ge=0, le=MAX_STEPS,
        description="Checkpoint every N steps; 0 = at evaluations.")
    log_every: int = Field(50, ge=1, le=MAX_STEPS, description="Log metrics every N steps.")
    seed: int = Field(9527, description="Seed of every RNG stream (plus the rank).")
    max_eval_queries: int = Field(0, ge=0, le=MAX_STEPS,
        description="Cap on validation queries; 0 = all.")
    deterministic: bool = Field(False, description="torch deterministic algorithms (slower).")
    stop_grace_s: float = Field(300.0, gt=0, le=MAX_SECONDS, description=(
        "On SIGTERM/SIGINT: seconds allowed to reach the next log step and save a checkpoint."))
    debug: bool = Field(False, description=(
        "Re-check tensor values inside the step (labels, NaN, empty masks); each check is a "
        "device-to-host sync, so it is off in training; inputs are validated where they enter."))


class DistConfig(_Model):
    """Workers, DeepSpeed engine and fault tolerance."""

    num_workers: int = Field(1, ge=1, le=4096, description="Training workers (ranks).")
    min_workers: int = Field(0, ge=0, le=4096, description=(
        "Elastic: Ray Train runs min_workers..num_workers workers as resources allow, resuming "
        "from the latest checkpoint on each resize; 0 = always num_workers."))
    resize_check_s: float = Field(60.0, gt=0, le=86400, description=(
        "Elastic: how often Ray Train checks a running group for room for more workers, and "
        "grows it (a restart from the latest checkpoint) when there is."))
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL collectives.")
    cpus_per_worker: int = Field(1, ge=0, le=1024, description="CPUs Ray reserves per worker.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = Field(
        "PACK", description="Ray placement strategy of the workers.")
    max_failures: int = Field(0, ge=-1, le=1_000_000, description=(
        "Worker failures Ray Train restarts from the latest checkpoint; -1 = unlimited."))
    timeout_s: int = Field(1800, ge=1, le=MAX_SECONDS, description="Collective timeout in seconds.")


class TrackingConfig(_Model):
    """MLflow: empty uri = $MLFLOW_TRACKING_URI where the config is loaded, else a SQLite file
    under the run folder."""

    uri: str = Field("", description="MLflow tracking URI (see the section's docstring).")
    experiment: str = Field("dldkd", description="MLflow experiment name.")
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory system metrics.")
    parent_run_id: str = Field("", description="MLflow parent run (set by a sweep per trial).")
    registered_model: str = Field("", description=(
        "Register the run's best student (its MLflow model) as a new version of this registered "
        "model; empty = log the model, register nothing. In a sweep: only the best trial's."))
    model_alias: str = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,254}$",
                             description=("Alias the registered version gets once its test report "
                                          "exists (data.test); letters, digits, '_', '-'."))


class RunConfig(_Model):
    """Identity and storage of one run."""

    name: str = Field("dldkd", description="The run's folder and MLflow key; no '/'.")
    storage: str = Field("runs", description=(
        "Local folder or URI (s3://...) where checkpoints and Ray results live."))
    resume: Literal["auto", "never", "must"] = Field("auto", description=(
        "Relaunch of the same run.name: continue from its latest checkpoint if any ('auto'), "
        "start over ('never'), or fail without one ('must')."))

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str) -> str:
        if not value or "/" in value:
            raise ConfigError(f"run.name={value!r} must be a non-empty name without '/'")
        return value


class Config(_Model):
    """One run's whole configuration: a section per concern, rules between keys checked here."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """An empty YAML section (``model:``) means its defaults."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        """Rules between keys; each key's own type and range is in its Field."""
        if self.model.hidden % self.model.heads:
            raise ConfigError(f"model.hidden={self.model.hidden} must be divisible by "
                              f"model.heads={self.model.heads}")
        if self.teacher.placement == "zero3" and self.dist.num_workers < 2:
            raise ConfigError("teacher.placement='zero3' needs dist.num_workers >= 2 to partition "
                              f"the teacher (got {self.dist.num_workers}); use 'replicated'")
        if self.dist.min_workers > self.dist.num_workers:
            raise ConfigError(f"dist.min_workers={self.dist.min_workers} must be <= "
                              f"dist.num_workers={self.dist.num_workers} (or 0: fixed size)")
        if self.dist.min_workers and self.dist.zero_stage == 3:
            raise ConfigError("dist.min_workers (elastic) needs dist.zero_stage <= 2: a ZeRO-3 "
                              "checkpoint resumes only on the worker count that wrote it")
        if is_remote(self.run.storage) and not self.tracking.uri:
            raise ConfigError(f"run.storage={self.run.storage!r} is remote, so the default MLflow "
                              "store (a SQLite file in the run folder) has nowhere to live: set "
                              "tracking.uri (e.g. http://mlflow:5000), or $MLFLOW_TRACKING_URI "
                              "where the config is loaded")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, no tuples) under the YAML key names."""
        return self.model_dump(mode="json", by_alias=True)

    def flat(self) -> dict[str, Any]:
        """``{"model.hidden": 384, ...}``: the form MLflow params and overrides use."""
        return flatten(self.to_dict())

    def uses_teacher(self) -> bool:
        return self.model.branches != "exploration" and (
            self.loss.kd != "off" or self.loss.targets == "soft")


def fields_by_key() -> dict[str, FieldInfo]:
    """Every dotted key -> its Field (annotation, default, bounds in metadata, description)."""
    return {f"{section}.{info.alias or name}": info
            for section, body in Config.model_fields.items()
            for name, info in body.annotation.model_fields.items()}


# What a relaunch of an existing run (same run.name) may change: length, evaluation, logging,
# I/O and fault-tolerance settings. Any other change needs a new run.name (docs/training.md).
RESUMABLE = ("train.epochs", "train.early_stop", "train.eval_every", "train.ckpt_every",
             "train.log_every", "train.max_eval_queries", "train.stop_grace_s", "train.debug",
             "data.train", "data.val", "data.test", "data.loader_workers", "data.resident",
             "data.resident_max_mb",
             "data.max_bad_fraction", "teacher.cache", "teacher.cache_mem_mb", "teacher.cache_dir",
             "teacher.image_batch", "dist.max_failures", "dist.timeout_s", "dist.cpus_per_worker",
             "dist.placement_strategy", "dist.num_workers", "dist.min_workers", "dist.resize_check_s",
             "tracking.",
             "run.")


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


# pydantic error type -> what the value must be.
_MUST = {"bool_type": "must be true or false", "int_type": "must be an integer",
         "int_parsing": "must be an integer", "int_from_float": "must be an integer",
         "float_type": "must be a number", "float_parsing": "must be a number",
         "string_type": "must be a string", "model_type": "must be a section (mapping)"}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _config_error(err: ValidationError, prefix: tuple[str, ...] = ()) -> ConfigError:
    """pydantic's errors as one ConfigError: per problem, the dotted key, the value and what is
    allowed (cross-field rules raise ConfigError themselves)."""
    problems = []
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        key = ".".join(str(p) for p in prefix + tuple(e["loc"]))
        if isinstance(cause, ConfigError):
            problems.append(str(cause))
        elif e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, [*Config.model_fields, *fields_by_key()], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown config {'key' if '.' in key else 'section'} {key!r}{hint}")
        elif e["type"] == "literal_error":
            choices = list(get_args(fields_by_key()[key].annotation))
            problems.append(f"{key}={short(e['input'])} is not allowed; choose one of {choices}")
        elif e["type"] in _RANGE_ERRORS:
            problems.append(f"{key}={short(e['input'])} is out of range; allowed "
                            f"{_interval(fields_by_key()[key])}")
        else:
            problems.append(f"{key}={short(e['input'])} {_MUST.get(e['type'], e['msg'])}")
    return ConfigError("; ".join(problems))


def short(value: Any) -> str:
    """A value as an error message quotes it: its repr cut to a short prefix, at bounded cost
    (reprlib stops at a few items and levels), so no message prints an unbounded value."""
    text = _REPR.repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def _interval(info: FieldInfo) -> str:
    low, high = "(-inf", "inf)"
    for bound in info.metadata:
        if isinstance(bound, Ge):
            low = f"[{bound.ge}"
        elif isinstance(bound, Gt):
            low = f"({bound.gt}"
        elif isinstance(bound, Le):
            high = f"{bound.le}]"
        elif isinstance(bound, Lt):
            high = f"{bound.lt})"
    return f"{low}, {high}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict; unknown keys are refused when the tree is validated."""
    for key, value in overrides.items():
        node = tree
        *sections, name = key.split(".")
        for part in sections:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        node[name] = value
    return tree


def from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (YAML, or the validated config a worker or
    trial receives); it reads no environment, so a worker rebuilds exactly the driver's config."""
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        raise ConfigError(f"a config must be a mapping of sections, got {tree!r}")
    return Config(**tree)


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
                ) -> Config:
    """YAML file (optional; its ``base:`` chain merged, :func:`load_yaml`) + ``key.sub=value``
    overrides + this process's environment (:func:`resolve_environment`) -> validated Config.
    The only reader of the environment: call it where a config enters (CLI, launcher); workers
    and trials get :func:`from_dict`."""
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


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (sharding.files)."""
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""``dldkd validate``: everything that can be checked before a cluster is touched.

Each check is a small function returning one named :class:`Check` (launch/validate/result.py):
the config and its batch and step arithmetic here, the splits and shards in
launch/validate/data.py, teacher weights in launch/validate/teacher.py, storage and tracking in
launch/validate/stores.py. :func:`validate_run` runs them in order and adds a per-worker memory
estimate (launch/validate/memory.py). With ``offline=True`` the checks that read the shards or
touch storage and tracking are skipped: the config alone is checked. ``deep=True`` decodes every
sample of every shard (by default the first and last of each).
"""
from __future__ import annotations

import math
import os

from launch.validate.data import (SPLITS, check_data_mode, check_readers, check_shard_files,
                                  check_split, check_split_size, check_teacher_inputs,
                                  check_val_split)
from launch.validate.memory import DEFAULT_QUERIES_PER_VIDEO, estimate_memory
from launch.validate.result import FAIL, OK, WARN, Check, Report
from launch.validate.stores import check_storage, check_tracking
from launch.validate.teacher import check_teacher_weights
from sharding.epochs import epoch_steps
from sharding.writer import Manifest
from trainer.config import Config, ConfigError, load_config


# -- config and batch arithmetic -------------------------------------------------------------------
def check_config(path: str | None, overrides: list[str] | dict | None
                 ) -> tuple[Check, Config | None]:
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:   # YAML syntax errors included, with the file and line
        return Check("config", FAIL, str(err)), None
    return Check("config", OK, f"{path or 'defaults'}: types, choices and ranges valid"), cfg


def check_batch(cfg: Config) -> Check:
    from trainer.engine import ds_config

    b, ga, n = cfg.data.batch_videos, cfg.dist.grad_accum, cfg.dist.num_workers
    total = ds_config(cfg, n)["train_batch_size"]
    if total != b * ga * n:
        return Check("batch", FAIL, f"DeepSpeed train_batch_size={total} != data.batch_videos x "
                     f"dist.grad_accum x dist.num_workers = {b} x {ga} x {n}")
    msg = f"train_batch_size = batch_videos x grad_accum x num_workers = {b} x {ga} x {n} = {total}"
    if cfg.loss.hard_pool > b - 1:
        return Check("batch", WARN, f"{msg}; loss.hard_pool={cfg.loss.hard_pool} exceeds the "
                     f"{b - 1} negatives of a batch, so negatives are drawn from all of them")
    return Check("batch", OK, msg)


def exact_batches_per_rank(shard_videos: list[int], batch_videos: int, world_size: int,
                           loader_workers: int) -> list[int]:
    """Batches each rank yields per exact epoch (the reader's round-robin split by rank, then by
    DataLoader worker; each worker's last batch may be short)."""
    workers = max(loader_workers, 1)
    out = []
    for rank in range(world_size):
        mine = shard_videos[rank::world_size]
        out.append(sum(math.ceil(sum(mine[w::workers]) / batch_videos) for w in range(workers)))
    return out


def steps_per_epoch(cfg: Config, train: Manifest | None, requested: int | None = None
                    ) -> int | None:
    """The run's steps per virtual epoch by the reader's rule (``sharding.epochs.epoch_steps``),
    or None where it depends on an unread manifest; ValueError where the reader refuses."""
    d = cfg.data
    return epoch_steps(None if train is None else train.totals["videos"], d.batch_videos,
                       cfg.dist.num_workers, true_epochs=d.true_epochs, resampled=d.resampled,
                       requested=d.steps_per_epoch if requested is None else requested)


def check_steps(cfg: Config, train: Manifest | None) -> Check:
    """steps_per_epoch > 0 and, in exact mode, no more steps than the smallest rank's batches."""
    try:
        steps = steps_per_epoch(cfg, train)
    except ValueError as err:   # more steps than a true epoch has
        return Check("steps", FAIL, str(err))
    if steps is None:
        if cfg.data.true_epochs:
            return Check("steps", OK, "data.true_epochs: whole epochs of ceil(ceil(videos / "
                         "workers) / batch_videos) steps, counted from the shards at run time")
        return Check("steps", OK, "data.steps_per_epoch=0: derived from the train manifest at run "
                     "time (videos / global batch)")
    if steps <= 0:
        return Check("steps", FAIL, "data.resampled=false (exact reading) with "
                     "data.steps_per_epoch=0 trains zero steps: set data.steps_per_epoch to the "
                     "batches of the smallest rank, or use data.resampled=true")
    total = steps * cfg.train.epochs
    msg = f"{steps} steps/epoch x train.epochs={cfg.train.epochs} = {total} steps"
    if cfg.data.true_epochs and train is not None:
        full = steps_per_epoch(cfg, train, requested=0)
        msg += (f" (true epochs: every video once, ceil(ceil({train.totals['videos']} videos / "
                f"{cfg.dist.num_workers} workers) / {cfg.data.batch_videos}) = {full} steps"
                + (", cut short" if steps < full else "") + ")")
    if not cfg.data.true_epochs and not cfg.data.resampled and train is not None:
        per_rank = exact_batches_per_rank([s.videos for s in train.shards], cfg.data.batch_videos,
                                          cfg.dist.num_workers, cfg.data.loader_workers)
        if steps > min(per_rank):
            return Check("steps", FAIL, f"data.steps_per_epoch={steps} but in exact reading the "
                         f"smallest rank has {min(per_rank)} batches per epoch (per rank: "
                         f"{per_rank}): set data.steps_per_epoch <= {min(per_rank)}")
    if cfg.dist.grad_accum > 1 and steps % cfg.dist.grad_accum:
        return Check("steps", WARN, f"{msg}; {steps} steps/epoch is not a multiple of "
                     f"dist.grad_accum={cfg.dist.grad_accum}: accumulation windows straddle epochs")
    return Check("steps", OK, msg)


def check_intervals(cfg: Config, train: Manifest | None) -> Check:
    """eval_every / ckpt_every longer than the run mean one evaluation/checkpoint at the end."""
    try:
        steps = steps_per_epoch(cfg, train)
    except ValueError:
        steps = None   # the steps check fails it
    if not steps:
        return Check("intervals", OK, "checked against the run length at run time")
    total = steps * cfg.train.epochs
    for key, every in (("train.eval_every", cfg.train.eval_every),
                       ("train.ckpt_every", cfg.train.ckpt_every)):
        if every > total:
            return Check("intervals", WARN, f"{key}={every} exceeds the run's {total} steps: only "
                         f"the last step is evaluated/checkpointed (early stopping never triggers);"
                         f" set {key} <= {total} or 0 (once per epoch)")
    return Check("intervals", OK, f"eval every {cfg.train.eval_every or steps}, checkpoint every "
                 f"{cfg.train.ckpt_every or cfg.train.eval_every or steps} of {total} steps")


def check_loader_cpus(cfg: Config) -> Check:
    cpus, lw = cfg.dist.cpus_per_worker, cfg.data.loader_workers
    if cpus and lw + 1 > cpus:
        return Check("cpus", WARN, f"data.loader_workers={lw} + the training process exceed "
                     f"dist.cpus_per_worker={cpus}: loading will compete with training; raise "
                     f"dist.cpus_per_worker to {lw + 1} or lower data.loader_workers")
    if not cfg.dist.use_gpu and cpus * cfg.dist.num_workers < (os.cpu_count() or 1):
        return Check("cpus", WARN, f"CPU training with dist.cpus_per_worker={cpus}: under Ray "
                     f"each worker computes on {cpus} thread(s) (Ray sets OMP_NUM_THREADS from "
                     f"it) while this machine has {os.cpu_count()} cores; set "
                     f"dist.cpus_per_worker={max((os.cpu_count() or 1) // cfg.dist.num_workers, 1)}"
                     " to use them (dldkd train --no-ray uses every core)")
    return Check("cpus", OK, f"{cpus} CPUs per worker for {lw} loader workers + training")


def check_gpu(cfg: Config) -> Check:
    if not cfg.dist.use_gpu:
        return Check("gpu", OK, "dist.use_gpu=false: CPU workers")
    import torch

    if not torch.cuda.is_available():
        return Check("gpu", WARN, "dist.use_gpu=true but this machine has no CUDA device: fine if "
                     "the cluster's workers have GPUs")
    return Check("gpu", OK, f"dist.use_gpu=true; {torch.cuda.device_count()} CUDA devices here")


# -- all together ----------------------------------------------------------------------------------
def validate_run(config_path: str | None, overrides: list[str] | dict | None = None, *,
                 offline: bool = False, deep: bool = False) -> Report:
    """Every check in order; a config that does not load is one FAIL and nothing else runs."""
    first, cfg = check_config(config_path, overrides)
    if cfg is None:
        return Report([first])
    checks = [first, check_batch(cfg)]
    manifests: dict[str, Manifest | None] = {}
    if offline:
        checks.append(Check("data", OK, "skipped (--offline): shards, storage and tracking")
                      if cfg.data.train else check_split(cfg, "train")[0])
    else:
        for split in SPLITS:
            check, manifests[split] = check_split(cfg, split)
            checks.append(check)
            if manifests[split] is not None:
                checks.append(check_shard_files(cfg, split, manifests[split], deep))
        checks.append(check_val_split(cfg))
    train = manifests.get("train")
    if train is not None:
        checks += [check_split_size(cfg, train), check_data_mode(cfg, train),
                   check_readers(cfg, train), check_teacher_inputs(cfg, train)]
    checks += [check_steps(cfg, train), check_intervals(cfg, train), check_loader_cpus(cfg),
               check_teacher_weights(cfg, offline), check_gpu(cfg)]
    if not offline:
        checks += [check_storage(cfg), check_tracking(cfg)]
    qpv = (train.totals["captions"] / train.totals["videos"]
           if train is not None and train.totals["videos"] else DEFAULT_QUERIES_PER_VIDEO)
    return Report(checks, estimate_memory(cfg, qpv))
"""One training run as a Ray Train job of N DeepSpeed workers.

``python -m launch.train --config configs/tvr.yaml [key=value ...]`` is what ``ray job submit``
runs. The run's name (``run.name``) and storage (``run.storage``) fix its Ray ``RunConfig``, so a
relaunch with the same name resumes from the newest complete checkpoint in storage;
``dist.max_failures`` lets Ray restart lost workers from it mid-run.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import tempfile
from pathlib import Path

from launch.jobs import ray_setup
from launch.jobs.lease import run_lease
from launch.jobs.stop import DriverStop
from trainer import checkpoint as ckpt
from trainer.config import Config, from_dict, load_config
from trainer.infra import storage
from trainer.infra.logs import setup_logging
from trainer.infra.reporting import COMPLETE, complete_step
from trainer.infra.tracking import mark_killed, resolve_uri

log = logging.getLogger("dldkd")

# Environment every worker process needs (Ray workers do not inherit a driver's os.environ
# on a remote node, so it travels in the runtime env).
# Hugging Face hub settings go along only where the launching environment sets them: whether
# teacher weights may be downloaded is the user's choice, never forced here.
WORKER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    **{k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "HF_ENDPOINT") if k in os.environ},
}
# OMP_NUM_THREADS is left to Ray, which sets it to each worker's dist.cpus_per_worker.


class RayReporter:
    """Checkpoints staged in a local temp folder per worker and uploaded by Ray to
    ``<run storage>/<run.name>/step-N``; once every rank's files are there, rank 0 writes the
    completeness marker (``reporting.COMPLETE``, the rule of every launch mode). A (re)start
    resumes from the newest complete checkpoint in storage, whatever Ray's own snapshot recorded;
    a partial one is never used. ``stop``: the driver's stop flag (``launch.jobs.stop``)."""

    def __init__(self, location: str, resume: str = "auto", stop=None):
        self.location, self.resume, self.stop = location, resume, stop

    def restore_dir(self) -> Path | None:
        import ray.train

        step = None if self.resume == "never" else complete_step(self.location)
        recorded = ray.train.get_checkpoint()
        if step is None:
            if self.resume == "must":
                raise FileNotFoundError(f"run.resume=must but no complete checkpoint under "
                                        f"{self.location}")
            if recorded is not None and self.resume != "never":
                log.warning("Ray's checkpoint %s is not complete in storage: starting over",
                            recorded.path)
            return None
        found = storage.join(self.location, ckpt.step_dir(Path(), step).name)
        if recorded is None or recorded.path.rstrip("/").rsplit("/", 1)[-1] != Path(found).name:
            log.info("resuming from %s, the newest complete checkpoint in storage (Ray recorded "
                     "%s)", found, recorded.path if recorded is not None else "none")
        if not storage.is_remote(found):
            return Path(found)
        return storage.download(found, Path(tempfile.mkdtemp(prefix="dldkd-restore-")))

    def staging_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"dldkd-step{step:08d}-"))

    def stop_requested(self) -> int:
        """The signal the driver received (0: none)."""
        from launch.jobs.stop import poll

        return poll(self.stop) if self.stop is not None else 0

    def report(self, metrics: dict, staged: Path | None, step: int) -> None:
        import ray.train

        from trainer import dist

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        clean["step"] = float(step)
        checkpoint = ray.train.Checkpoint.from_directory(str(staged)) if staged else None
        name = ckpt.step_dir(Path(), step).name
        ray.train.report(clean, checkpoint=checkpoint, checkpoint_dir_name=name)
        if staged is None:
            return
        shutil.rmtree(staged, ignore_errors=True)
        dist.barrier()   # every rank's upload has returned
        if ray.train.get_context().get_world_rank() == 0:
            storage.write_bytes(storage.join(self.location, name, COMPLETE),
                                json.dumps({"step": step}).encode())
        dist.barrier()


def _worker(loop_config: dict) -> None:
    """Runs in every Ray Train worker: Ray has set RANK/WORLD_SIZE and the process group."""
    import ray.train
    import ray.train.torch

    from trainer.run import train

    setup_logging()
    # Relative paths in the config (shards, teacher config) mean the launch folder: the same
    # folder on a local cluster; under `ray job submit` Ray already starts us in the uploaded
    # working_dir, which has another path on other nodes.
    if Path(loop_config["cwd"]).is_dir():
        os.chdir(loop_config["cwd"])
    ctx = ray.train.get_context()
    os.environ["NODE_RANK"] = str(ctx.get_node_rank())
    cfg = from_dict(loop_config["config"])
    reporter = RayReporter(loop_config["location"], cfg.run.resume, loop_config["stop"])
    try:
        train(cfg, reporter, device=ray.train.torch.get_device())
    except SystemExit as stopped:   # saved and marked KILLED on the driver's signal
        if stopped.code not in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            raise


def storage_path(cfg: Config) -> str:
    """Ray needs an absolute local path or a URI."""
    return storage.absolute(cfg.run.storage)


def workers(cfg: Config) -> int | tuple[int, int]:
    """Ray Train's ``num_workers``: fixed, or ``(min, max)`` for an elastic run, which Ray
    restarts at another size from the latest checkpoint as resources come and go."""
    return (cfg.dist.min_workers, cfg.dist.num_workers) if cfg.dist.min_workers \
        else cfg.dist.num_workers


def build_trainer(cfg: Config, name: str | None = None, callbacks: list | None = None,
                  env: dict[str, str] | None = None, stop=None):
    """The run's ``TorchTrainer``. ``env``: the object-store endpoint variables the workers get
    (default: this process's, see ``trainer.infra.storage.endpoint_env``); the config itself already
    carries what was resolved from the environment where it was loaded. ``stop``: the driver's
    stop flag (``launch.jobs.stop.DriverStop.flag``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.dist.cpus_per_worker}
    if cfg.dist.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.to_dict(), "cwd": os.getcwd(), "stop": stop,
                           "location": storage.join(storage_path(cfg), name or cfg.run.name)},
        torch_config=TorchConfig(backend="nccl" if cfg.dist.use_gpu else "gloo",
                                 timeout_s=cfg.dist.timeout_s),
        scaling_config=ScalingConfig(num_workers=workers(cfg), use_gpu=cfg.dist.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.dist.placement_strategy,
                                     elastic_resize_monitor_interval_s=cfg.dist.resize_check_s),
        run_config=RunConfig(
            name=name or cfg.run.name, storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": {
                **(storage.endpoint_env() if env is None else env), **WORKER_ENV,
                **_accelerator(cfg)}}),
    )


def _accelerator(cfg: Config) -> dict[str, str]:
    """DeepSpeed's accelerator, named where the config decides it: without dist.use_gpu it is
    the CPU (DeepSpeed's own detection would warn on every worker that it found no GPU)."""
    if cfg.dist.use_gpu or "DS_ACCELERATOR" in os.environ:
        return {}
    return {"DS_ACCELERATOR": "cpu"}


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster ``ray job submit`` started us in, or start a local one (with
    ``num_cpus`` logical CPUs: more than the cores runs more trials side by side)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if ray.is_initialized():
        return
    ray_setup.set_env_defaults()
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, runtime_env=ray_setup.runtime_env())
    else:
        # address="local": a cluster of our own, never one that `ray start` left on this
        # machine (join that with --address). With its dashboard: Ray Train's placement-group
        # cleaner asks the state API (served by the dashboard) whether the run is alive.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", configure_logging=False,
                 runtime_env=ray_setup.runtime_env())


def run(args: argparse.Namespace):
    """The run under its lease (``launch.jobs.lease``): a second launch of the same run.name and
    storage is refused before it starts Ray. SIGTERM/SIGINT to this process stop every worker
    at its next log step with a checkpoint (``launch.jobs.stop``)."""
    from launch.validate.preflight import preflight

    setup_logging()
    cfg = load_config(args.config, args.overrides)
    preflight(cfg)   # validate's cheap checks, before the lease, Ray and the workers
    with run_lease(cfg.run.storage, cfg.run.name) as lease:
        uri = resolve_uri(cfg.tracking.uri, storage.local_run_dir(cfg.run.storage, cfg.run.name))

        def abort() -> None:
            mark_killed(uri, cfg.tracking.experiment, cfg.run.name)
            lease.release()

        command = shlex.join(["train", "--config", args.config, *args.overrides])
        with DriverStop(cfg.train.stop_grace_s, abort,
                        functools.partial(resume_hint, cfg, command)) as stop:
            init_ray(args.address)
            stop.arm()
            result = stop.run(lambda: build_trainer(cfg, stop=stop.flag).fit())
    print(f"run {cfg.run.name}: best SumR {result.metrics.get('val/best_SumR', float('nan')):.2f}"
          f" at {result.path}")
    return result


def resume_hint(cfg: Config, command: str, signum: int, how: str) -> str:
    """The one line a stopped run prints: what happened and the command that resumes it."""
    step = complete_step(storage.run_location(cfg.run.storage, cfg.run.name))
    at = f"step {step}" if step is not None else "none yet, it starts over"
    return (f"run {cfg.run.name} stopped by {signal.Signals(signum).name} {how}; newest complete "
            f"checkpoint: {at}; to resume: dldkd {command}")

"""One training run as a Ray Train job of N DeepSpeed workers.

``python -m launch.train --config configs/tvr.yaml [key=value ...]`` is what ``ray job submit``
runs. The run's name (``run.name``) and storage (``run.storage``) fix its Ray ``RunConfig``, so a
relaunch with the same name resumes from the latest checkpoint (``ray.train.get_checkpoint()``);
``dist.max_failures`` lets Ray restart lost workers from that checkpoint mid-run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from launch.jobs.lease import run_lease
from trainer.infra import storage
from trainer.config import Config, from_dict, load_config
from trainer.infra.logs import setup_logging

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
    """Checkpoints staged in a local temp folder per worker, merged by Ray into storage."""

    def restore_dir(self) -> Path | None:
        import ray.train

        found = ray.train.get_checkpoint()
        return Path(found.to_directory()) if found is not None else None

    def staging_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"dldkd-step{step:08d}-"))

    def report(self, metrics: dict, staged: Path | None, step: int) -> None:
        import ray.train

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        clean["step"] = float(step)
        checkpoint = ray.train.Checkpoint.from_directory(str(staged)) if staged else None
        ray.train.report(clean, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}")
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)


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
    train(cfg, RayReporter(), device=ray.train.torch.get_device())


def storage_path(cfg: Config) -> str:
    """Ray needs an absolute local path or a URI."""
    return storage.absolute(cfg.run.storage)


def workers(cfg: Config) -> int | tuple[int, int]:
    """Ray Train's ``num_workers``: fixed, or ``(min, max)`` for an elastic run, which Ray
    restarts at another size from the latest checkpoint as resources come and go."""
    return (cfg.dist.min_workers, cfg.dist.num_workers) if cfg.dist.min_workers \
        else cfg.dist.num_workers


def build_trainer(cfg: Config, name: str | None = None, callbacks: list | None = None,
                  env: dict[str, str] | None = None):
    """The run's ``TorchTrainer``. ``env``: the object-store endpoint variables the workers get
    (default: this process's, see ``trainer.storage.endpoint_env``); the config itself already
    carries what was resolved from the environment where it was loaded."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.dist.cpus_per_worker}
    if cfg.dist.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.to_dict(), "cwd": os.getcwd()},
        torch_config=TorchConfig(backend="nccl" if cfg.dist.use_gpu else "gloo",
                                 timeout_s=cfg.dist.timeout_s),
        scaling_config=ScalingConfig(num_workers=workers(cfg), use_gpu=cfg.dist.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.dist.placement_strategy),
        run_config=RunConfig(
            name=name or cfg.run.name, storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": {
                **(storage.endpoint_env() if env is None else env), **WORKER_ENV}}),
    )


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster ``ray job submit`` started us in, or start a local one (with
    ``num_cpus`` logical CPUs: more than the cores runs more trials side by side)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # With its dashboard: Ray Train's placement-group cleaner asks the state API (served by
        # the dashboard) whether the run is alive, and warns every few seconds without it.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 configure_logging=False)


def run(args: argparse.Namespace):
    """The run under its lease (``launch.lease``): a second launch of the same run.name and
    storage is refused before it starts Ray."""
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    with run_lease(cfg.run.storage, cfg.run.name):
        init_ray(args.address)
        result = build_trainer(cfg).fit()
    print(f"run {cfg.run.name}: best SumR {result.metrics.get('val/best_SumR', float('nan')):.2f}"
          f" at {result.path}")
    return result

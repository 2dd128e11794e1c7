"""Framework overhead: the full training step alone vs under Ray Train + DeepSpeed (1 and 2 workers).

The same DL-DKD++ step (online tiny teacher with its frame cache warm, student forward/backward,
optimizer) at the same global batch, measured inside the loop by the recipe's own throughput
counter (``perf/samples_s`` in MLflow, median after the first epoch), so Ray's start-up is not
counted, only what it and DeepSpeed add per step. ``ray_fixed_s`` is the rest of a 1-worker
Ray run's wall time: its steps at the steady rate taken out, what remains is start-up (controller,
worker group, process group), the first epoch's teacher-cache fill and teardown.

One more Ray row keeps ``dist.cpus_per_worker`` at its default of 1: Ray gives each worker
``OMP_NUM_THREADS`` = its CPUs, so torch computes on 1 thread where the single process uses every
core. That, not Ray or DeepSpeed, is what makes an epoch through Ray slower on a CPU machine when
``cpus_per_worker`` is left below the cores each worker can use.

Floor: the single-process step on the same cores (the baseline) is the floor of the Ray rows.

    python -m bench.scale [--steps 12] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from dldkd_configs import preset


def _median_sps(uri: str, name: str, skip_steps: int) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dldkd")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`dldkd.run_key` = '{name}'")
    hist = client.get_metric_history(run.info.run_id, "perf/samples_s")
    values = [m.value for m in hist if m.step > skip_steps]
    return statistics.median(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch (2 epochs)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (videos)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    import torch

    from launch.jobs.train import build_trainer
    from sharding.synthetic import build_world
    from trainer.config import load_config
    from trainer.run import train
    from trainer.teacher.pretrain import pretrain

    root = Path(args.out or tempfile.mkdtemp(prefix="dldkd-bench-scale-"))
    world = root / "world"
    if not (world / "train" / "manifest.json").exists():
        build_world(world, videos=256, eval_videos=32, pretrain_pairs=256, progress=False)
    teacher = root / "teacher.pt"
    if not teacher.exists():
        pretrain(str(world / "pretrain"), str(teacher), steps=20, batch_size=64)
    uri = f"sqlite:///{root / 'mlflow.db'}"

    def cfg(name: str, workers: int, cpus: int | None = None):
        return load_config(preset("tiny.yaml"), [
            f"data.train={world / 'train'}", "data.val=", f"run.storage={root / 'runs'}",
            f"run.name={name}", "run.resume=never", f"tracking.uri={uri}",
            "tracking.system_metrics=false", f"teacher.pretrained={teacher}",
            f"teacher.model_config={preset('teacher-tiny.json')}",
            f"data.steps_per_epoch={args.steps}", "train.epochs=2", "train.log_every=1",
            "train.ckpt_every=100000", f"dist.num_workers={workers}",
            # The same 2 cores in every setting (Ray sets OMP threads = CPUs per worker).
            f"dist.cpus_per_worker={cpus or max(2 // workers, 1)}",
            f"data.batch_videos={args.batch // workers}"])

    skip = args.steps  # the first epoch fills the teacher's frame cache
    torch.set_num_threads(2)
    train(cfg("single", 1), use_deepspeed=False)
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    wall = {}
    try:
        for name, workers, cpus in (("ray1", 1, None), ("ray2", 2, None), ("ray1_1cpu", 1, 1)):
            t0 = time.perf_counter()
            build_trainer(cfg(name, workers, cpus)).fit()
            wall[name] = time.perf_counter() - t0
    finally:
        ray.shutdown()
    sps = {n: _median_sps(uri, n, skip) for n in ("single", "ray1", "ray2", "ray1_1cpu")}
    samples = 2 * args.steps * args.batch  # both epochs
    print(json.dumps({
        "single_process_sps": round(sps["single"], 2), "ray_ds_1w_sps": round(sps["ray1"], 2),
        "ray_ds_2w_sps": round(sps["ray2"], 2),
        "ray_ds_1w_1cpu_sps": round(sps["ray1_1cpu"], 2),
        "overhead_1w": round(1 - sps["ray1"] / sps["single"], 4),
        "overhead_1w_1cpu": round(1 - sps["ray1_1cpu"] / sps["single"], 4),
        "ray_fixed_s": round(wall["ray1"] - samples / sps["ray1"], 1),
        "global_batch": args.batch, "steps_measured": args.steps}))


if __name__ == "__main__":
    main()

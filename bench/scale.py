"""Framework overhead: the full training step alone vs under Ray Train + DeepSpeed (1 and 2 workers).

The same DL-DKD++ step (online tiny teacher with its frame cache warm, student forward/backward,
optimizer) at the same global batch, measured inside the loop by the recipe's own throughput
counter (``perf/samples_s`` in MLflow, median after the first epoch), so Ray's start-up is not
counted, only what it and DeepSpeed add per step.

    python -m bench.scale [--steps 12] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path


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

    from launch.train import build_trainer
    from sharding.synthetic import build_world
    from trainer.config import load_config
    from trainer.run import train
    from trainer.teacher_pretrain import pretrain

    root = Path(args.out or tempfile.mkdtemp(prefix="dldkd-bench-scale-"))
    world = root / "world"
    if not (world / "train" / "manifest.json").exists():
        build_world(world, videos=256, eval_videos=32, pretrain_pairs=256, progress=False)
    teacher = root / "teacher.pt"
    if not teacher.exists():
        pretrain(str(world / "pretrain"), str(teacher), steps=20, batch_size=64)
    uri = f"sqlite:///{root / 'mlflow.db'}"

    def cfg(name: str, workers: int):
        return load_config("configs/tiny.yaml", [
            f"data.train={world / 'train'}", "data.val=", f"run.storage={root / 'runs'}",
            f"run.name={name}", "run.resume=never", f"tracking.uri={uri}",
            "tracking.system_metrics=false", f"teacher.pretrained={teacher}",
            f"data.steps_per_epoch={args.steps}", "train.epochs=2", "train.log_every=1",
            "train.ckpt_every=100000", f"dist.num_workers={workers}",
            # The same 2 cores in every setting (Ray sets OMP threads = CPUs per worker).
            f"dist.cpus_per_worker={max(2 // workers, 1)}",
            f"data.batch_videos={args.batch // workers}"])

    skip = args.steps  # the first epoch fills the teacher's frame cache
    torch.set_num_threads(2)
    train(cfg("single", 1), use_deepspeed=False)
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    try:
        build_trainer(cfg("ray1", 1)).fit()
        build_trainer(cfg("ray2", 2)).fit()
    finally:
        ray.shutdown()
    single = _median_sps(uri, "single", skip)
    one = _median_sps(uri, "ray1", skip)
    two = _median_sps(uri, "ray2", skip)
    print(json.dumps({"single_process_sps": round(single, 2), "ray_ds_1w_sps": round(one, 2),
                      "ray_ds_2w_sps": round(two, 2), "overhead_1w": round(1 - one / single, 4),
                      "global_batch": args.batch, "steps_measured": args.steps}))


if __name__ == "__main__":
    main()

"""``make demo``: the whole system on one machine, from nothing, in a few minutes.

1. a synthetic PRVR world (train/val/test + image-text pretraining shards),
2. a tiny open_clip teacher pretrained on it, and its own zero-shot metrics,
3. a Ray Tune sweep of 2 DL-DKD++ trials, each a Ray Train run of 2 DeepSpeed workers, on a local
   Ray cluster, tracked in MLflow (SQLite),
4. the trial table next to the teacher's numbers, and how to open the MLflow UI.

Every stage is skipped when its output already exists, so a rerun picks up where it stopped.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from dldkd_configs import preset

# The shipped files, so the demo runs from any folder (the preset names a checkout's
# configs/teacher-tiny.json).
SWEEP_CONFIG = preset("sweep-demo.yaml")
TEACHER_CONFIG = preset("teacher-tiny.json")

# (full, --small): world videos, eval videos, pretraining pairs, teacher steps, sweep overrides
SIZES = {
    False: dict(videos=400, eval_videos=100, pairs=2000, teacher_steps=150,
                sweep=["train.epochs=4", "data.steps_per_epoch=10"]),
    True: dict(videos=96, eval_videos=32, pairs=256, teacher_steps=10,
               sweep=["train.epochs=1", "data.steps_per_epoch=3", "train.log_every=1"]),
}


def _stage(n: int, text: str) -> float:
    print(f"\n[{n}/4] {text}", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"      done in {time.perf_counter() - start:.0f} s", flush=True)


def run_demo(out: str | Path = "outputs/demo", small: bool = False) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    size = SIZES[small]
    out = Path(out).resolve()
    world, teacher_ckpt = out / "world", out / "teacher.pt"
    begin = time.perf_counter()

    t = _stage(1, f"synthetic world -> {world}")
    if not (world / "test" / "manifest.json").is_file():
        from sharding.synthetic import build_world

        build_world(world, videos=size["videos"], eval_videos=size["eval_videos"],
                    pretrain_pairs=size["pairs"])
    else:
        print("      already there")
    _done(t)

    t = _stage(2, f"tiny CLIP teacher: {size['teacher_steps']} contrastive steps -> {teacher_ckpt}")
    from trainer.config import load_config
    from trainer.teacher.pretrain import pretrain, zero_shot_eval_split

    if not teacher_ckpt.is_file():
        def show(step: int, loss: float) -> None:
            if step == 1 or step % 25 == 0 or step == size["teacher_steps"]:
                print(f"      step {step:4d}  loss {loss:.3f}", flush=True)

        pretrain(str(world / "pretrain"), str(teacher_ckpt), steps=size["teacher_steps"],
                 batch_size=64, log=show)
    data = [f"data.train={world / 'train'}", f"data.val={world / 'val'}",
            f"data.test={world / 'test'}", f"teacher.pretrained={teacher_ckpt}",
            f"teacher.model_config={TEACHER_CONFIG}"]
    teacher_metrics = zero_shot_eval_split(load_config(SWEEP_CONFIG, data), str(world / "val"))
    print(f"      teacher zero-shot on val: SumR {teacher_metrics['SumR']:.1f}")
    _done(t)

    t = _stage(3, "sweep: 2 trials x 2 DeepSpeed workers on a local Ray cluster, MLflow on SQLite")
    import ray

    from launch.jobs import ray_setup
    from launch.jobs.sweep import run_sweep
    from launch.jobs.sweep_spec import load_sweep
    from trainer.infra.logs import setup_logging

    setup_logging()
    cfg, spec = load_sweep(SWEEP_CONFIG, data + [f"run.storage={out / 'runs'}"] + size["sweep"])
    # Logical CPUs: both trials (2 workers + a driver each) run side by side on any laptop.
    ray_setup.set_env_defaults()
    ray.init(address="local", num_cpus=max(6, os.cpu_count() or 1), include_dashboard=False,
             configure_logging=False, runtime_env=ray_setup.runtime_env())
    try:
        result = run_sweep(cfg, spec)
    finally:
        ray.shutdown()
    _done(t)

    _stage(4, "results on the validation split (trials: their best evaluation)")
    from trainer.evaluate import format_table

    rows = {"teacher zero-shot": teacher_metrics}
    rows.update({f"trial {label}": m for label, m in result.rows})
    print(format_table(rows))
    db = result.tracking_uri.removeprefix("sqlite:///")
    print(f"\nall in {time.perf_counter() - begin:.0f} s. Open MLflow:\n"
          f"  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1 "
          f"--port 5000   # then http://127.0.0.1:5000 (store: {db})")
    return 0

"""A chaos run: one tiny DL-DKD++ run through five faults, against the same run undisturbed.

The run is what one sweep trial runs (Ray Train, DeepSpeed workers on gloo, the online teacher,
MLflow on a real server), on a small synthetic world, with its run storage (checkpoints,
``best/``, the test report) in S3 (moto's S3 API server on 127.0.0.1), and meets, in this order:

1. a SIGKILLed worker at a random step after the first checkpoint (Ray restarts the group);
2. the MLflow server stopped for a few seconds, then restarted (the tracker spools, replays);
3. one training shard corrupted (one sample's bytes garbled: counted, skipped, logged);
4. a relaunch of the same run on another worker count (elastic resume) by a ``dldkd train``
   driver, which gets SIGTERM mid-run (it saves at the next log step and exits 143);
5. a relaunch that extends the run to its full length.

It prints one JSON line: the faults injected, the steps completed and expected, the steps whose
loss is missing from MLflow (``metrics_lost``, must be 0), the MLflow runs of the trial
(``mlflow_runs``, must be 1), the damaged samples MLflow saw, and the final test SumR next to
an undisturbed run of the same seed. Floor: none; it measures survival, not speed.

Run: ``python -m bench.chaos [--workers 2] [--resume-workers 1] [--seed 0]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from bench.servers import MlflowServer, free_port, train_worker_pids

STEPS_PER_EPOCH = 4
EPOCHS = 4            # the first launch runs half of them


def _overrides(world: Path, runs: str, uri: str, name: str, workers: int, epochs: int,
               seed: int) -> list[str]:
    return [
        f"data.train={world / 'train'}", f"data.val={world / 'val'}", f"data.test={world / 'test'}",
        f"data.steps_per_epoch={STEPS_PER_EPOCH}", "data.max_bad_fraction=0.2",
        f"train.epochs={epochs}", "train.ckpt_every=2", "train.log_every=1", f"train.seed={seed}",
        "loss.hard_negative_start_epoch=2", f"dist.num_workers={workers}", "dist.max_failures=3",
        f"tracking.uri={uri}", "tracking.system_metrics=false", f"run.storage={runs}",
        f"run.name={name}"]


def _config(*args):
    from trainer.config import load_config

    return load_config("configs/tiny.yaml", _overrides(*args))


def _sigterm_driver(overrides: list[str], server_uri: str, name: str, after_step: int) -> int:
    """``dldkd train`` as a driver process on this Ray cluster, SIGTERMed once ``after_step``
    is logged; returns its exit status."""
    import subprocess
    import sys

    import ray

    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "train", "--address",
         ray.get_runtime_context().gcs_address, "--config", "configs/tiny.yaml", *overrides],
        cwd=Path(__file__).resolve().parents[1])
    while _logged_steps(server_uri, name) < after_step and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=600)


def _s3_server():
    """moto's S3 API on 127.0.0.1 and a bucket, found by every client through the standard
    variables (set here, so Ray workers get them too); returns (server, runs URI)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                       "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}"})
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("chaos")
    return server, "s3://chaos/runs"


def _fit(cfg):
    from launch.jobs.train import build_trainer

    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    return result


def _history(uri: str, name: str) -> tuple[int, dict[str, dict[int, float]]]:
    """(MLflow runs of the trial, metric -> step -> value of its run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dldkd")
    runs = client.search_runs([exp.experiment_id], f"tags.`dldkd.run_key` = '{name}'")
    out = {key: {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}
           for key in ("train/loss", "test/SumR", "data/bad_samples")} if runs else {}
    return len(runs), out


def _logged_steps(uri: str, name: str) -> int:
    try:
        _, hist = _history(uri, name)
    except Exception:   # the server is down or the run not created yet
        return 0
    return max(hist.get("train/loss", {0: 0}), default=0)


def _corrupt_one_sample(split: Path) -> str:
    """Garble the first .npy member of the split's second shard; returns the shard's name.

    The manifest's hash of that shard is updated too: the damage stands for bytes that were bad
    before the shard was written, so the reader meets one undecodable sample (counted, skipped,
    logged) rather than a shard whose hash no longer matches (refused whole)."""
    from sharding.files import write_atomic
    from sharding.writer import sha256_file

    shard = sorted(split.glob("*.tar"))[1]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data:member.offset_data + 8] = b"garbage!"
    shard.write_bytes(bytes(data))
    manifest = json.loads((split / "manifest.json").read_text())
    for info in manifest["shards"]:
        if info["name"] == shard.name:
            info["sha256"] = sha256_file(shard)
    write_atomic(split / "manifest.json", json.dumps(manifest, indent=1))
    return shard.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="workers of the first launch")
    parser.add_argument("--resume-workers", type=int, default=1, help="workers of the relaunch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from launch.jobs.train import init_ray
    from sharding.synthetic import build_world

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="dldkd-chaos-"))
    world = root / "world"
    build_world(world, videos=64, eval_videos=32, pretrain_pairs=0, videos_per_shard=16,
                seed=args.seed, progress=False)
    s3, run_storage = _s3_server()
    server = MlflowServer(root / "mlflow", free_port())
    server.start()
    init_ray(None)
    rng = random.Random(args.seed)
    faults: list[dict] = []
    try:
        _fit(_config(world, run_storage, server.uri, "calm", args.workers, EPOCHS, args.seed))
        name, half = "chaos", EPOCHS // 2
        kill_at = rng.randint(3, half * STEPS_PER_EPOCH - 1)   # after the step-2 checkpoint

        def saboteur():
            while _logged_steps(server.uri, name) < kill_at:
                time.sleep(0.2)
            victim = train_worker_pids()[-1]
            os.kill(victim, signal.SIGKILL)
            faults.append({"fault": "sigkill_worker", "after_step": kill_at})
            while _logged_steps(server.uri, name) <= kill_at:   # the group is back
                time.sleep(0.2)
            server.stop()
            time.sleep(5)
            server.start()
            faults.append({"fault": "mlflow_server_down", "seconds": 5})

        thread = threading.Thread(target=saboteur, daemon=True)
        thread.start()
        _fit(_config(world, run_storage, server.uri, name, args.workers, half, args.seed))
        thread.join(timeout=120)
        faults.append({"fault": "corrupt_shard", "shard": _corrupt_one_sample(world / "train")})
        faults.append({"fault": "resume_on_other_worker_count", "from": args.workers,
                       "to": args.resume_workers})
        full = (world, run_storage, server.uri, name, args.resume_workers, EPOCHS, args.seed)
        stop_at = rng.randint(half * STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH - 2)
        status = _sigterm_driver(_overrides(*full), server.uri, name, stop_at)
        faults.append({"fault": "sigterm_driver", "after_step": stop_at, "exit": status})
        _fit(_config(*full))
        runs, hist = _history(server.uri, name)
        _, calm_hist = _history(server.uri, "calm")
    finally:
        ray.shutdown()
        server.stop()
        s3.stop()
    expected = EPOCHS * STEPS_PER_EPOCH
    losses = hist.get("train/loss", {})
    print(json.dumps({
        "faults": faults, "steps_completed": max(losses, default=0), "steps_expected": expected,
        "metrics_lost": len(set(range(1, expected + 1)) - set(losses)), "mlflow_runs": runs,
        "damaged_samples_seen": max(hist.get("data/bad_samples", {0: 0}).values()),
        "final_test_SumR": round(max(hist.get("test/SumR", {0: 0}).values()), 2),
        "undisturbed_test_SumR": round(max(calm_hist.get("test/SumR", {0: 0}).values()), 2),
        "run_storage": run_storage,
        "wall_s": round(time.perf_counter() - started, 1), "workdir": str(root)}))


if __name__ == "__main__":
    main()

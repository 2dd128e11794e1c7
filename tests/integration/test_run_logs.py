"""A Ray run's saved log is quiet: no ERROR line or traceback, no warning repeated, no ANSI colour
code, none of the noise Ray Train, DeepSpeed and open_clip used to print (trainer/infra/logs.py,
launch/jobs/ray_setup.py), while dldkd's own lines are all there.

One tiny run of `dldkd train` as a user starts it (its own local Ray cluster, 2 DeepSpeed
workers, ZeRO-2, the online tiny teacher: the paths that printed the noise), its stdout and
stderr saved to a file as a user or `kubectl logs` would keep them.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

ANSI = re.compile(r"\x1b\[")
RAY_PREFIX = re.compile(r"^\([A-Za-z_]+ pid=\d+(, ip=[^)]*)?\) ")
TIMESTAMP = re.compile(r"\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+\]?")
DEDUP = re.compile(r"\s*\[repeated (\d+)x across cluster\].*$")
# Python logging, DeepSpeed's "[ERROR]", Ray core's C++ "[<time> E <pid> <tid>]", tracebacks.
ERROR = re.compile(r"\bERROR\b|\[ERROR\]|(^|\s)E \d+ \d+\]|Traceback \(most recent call last\)")
WARNING = re.compile(r"\bWARNING\b|\[WARNING\]|\w+Warning: |(^|\s)W \d+ \d+\]")
# What runs printed before (issue: quiet logs); each must be gone, not only deduplicated.
NOISE = ("PreemptionWatcher", "FutureWarning", "No pretrained weights loaded",
         "Parsing model identifier", "Instantiating model architecture",
         "Found multiple active Ray instances", "Setting accelerator to CPU")


def log_problems(text: str) -> list[str]:
    """What makes a saved run log noisy, one entry per problem (empty: quiet)."""
    problems = [f"ANSI code in: {line!r}" for line in text.splitlines() if ANSI.search(line)]
    warnings: Counter[str] = Counter()
    for raw in text.splitlines():
        line = TIMESTAMP.sub("", RAY_PREFIX.sub("", re.sub(r"\x1b\[[0-9;]*m", "", raw))).strip()
        if ERROR.search(line):
            problems.append(f"error: {raw}")
        problems += [f"noise ({n}): {raw}" for n in NOISE if n in line]
        if WARNING.search(line):
            # Ray prints a line once, then "<line> [repeated Nx across cluster]" for N more.
            repeated = DEDUP.search(line)
            warnings[DEDUP.sub("", line)] += int(repeated.group(1)) if repeated else 1
    return problems + [f"warning x{n}: {w}" for w, n in warnings.items() if n > 1]


def test_the_checks_see_the_noise():
    """The checks themselves, on lines the runs printed before."""
    noisy = "\n".join([
        "\x1b[36m(TrainController pid=19253)\x1b[0m [2026-12-06 09:43:16,982 E 19253 19366] "
        "core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' ...",
        "(RayTrainWorker pid=1) x/c10d_logger.py:83: FutureWarning: `torch.distributed."
        "all_gather_into_tensor` is deprecated.",
        "(RayTrainWorker pid=2) [2026-12-06 09:48:54,785] [WARNING] [real_accelerator.py:213:"
        "get_accelerator] Setting accelerator to CPU.",
        "(PlacementGroupCleaner pid=3) 2026-12-06 09:43:17,001\tWARNING placement_group_cleaner"
        ".py:86 -- Failed to query Ray Train Controller actor state.",
        "(PlacementGroupCleaner pid=3) 2026-12-06 09:43:19,001\tWARNING placement_group_cleaner"
        ".py:86 -- Failed to query Ray Train Controller actor state. [repeated 2x across "
        "cluster]"])
    found = log_problems(noisy)
    assert any(p.startswith("ANSI") for p in found) and any(p.startswith("error") for p in found)
    assert any("warning x3" in p and "Failed to query" in p for p in found)
    assert sum(p.startswith("noise") for p in found) == 3
    assert log_problems("step 1/3 ep 0 | loss=1.0\nWARNING dldkd: once\n") == []


def test_a_ray_run_log_has_no_error_no_repeated_warning_no_colour(world, tiny_teacher, tmp_path):
    over = tiny_overrides(world, tmp_path, "quiet", **{
        "train.epochs": 1, "data.steps_per_epoch": 3, "dist.num_workers": 2,
        "dist.zero_stage": 2, "teacher.pretrained": tiny_teacher,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(
        ("RAY_ADDRESS", "RAY_COLOR_PREFIX", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
         "DS_ACCELERATOR"))}
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "launch.cli", "train", "--config", "configs/tiny.yaml",
             *over], cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    for line in ("step 1/3", "step 3/3", "eval step 3:", "run quiet: best SumR"):
        assert line in text, text[-4000:]
    assert log_problems(text) == [], text[-6000:]

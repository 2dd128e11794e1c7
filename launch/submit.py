"""``dldkd submit``: ``ray job submit`` of this project to a running Ray cluster.

It runs the real ``ray job submit --working-dir . --runtime-env-json '{"excludes": [...]}' --
python -m launch.<entry> --config C overrides...``, after checking what can be checked here: the
config loads, and the working directory, less the excludes, fits Ray's upload limit (the package
travels through the GCS in one gRPC message; past the limit the upload fails only after zipping
everything). The job's exit status is returned: 0 only when it ends SUCCEEDED.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ENTRIES = ("train", "sweep")
# Never uploaded: version control, environments, data, outputs, run folders, caches. Leading '/'
# anchors a pattern at the working directory (gitignore syntax, as Ray reads it).
EXCLUDES = [".git", ".venv", "venv", "/data", "/outputs", "/runs", "/mlruns", "*.db", "/.cache",
            ".pytest_cache", "__pycache__", "*.egg-info", "/build"]
# A zip entry costs a local header (30 bytes) and a central-directory record (46 bytes), each
# with the name; the archive ends with a 22-byte record. Ray stores files uncompressed.
_ZIP_ENTRY, _ZIP_END = 30 + 46, 22


def upload_limit() -> int:
    """Ray's limit on a working_dir package: GCS_STORAGE_MAX_SIZE (RAY_max_grpc_message_size)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(GCS_STORAGE_MAX_SIZE)


def upload_size(root: str | Path, excludes: list[str]) -> tuple[int, dict[str, int]]:
    """Bytes of the package Ray would build from ``root``, and bytes per top-level entry.

    Walks the directory with Ray's own traversal, so Ray's default excludes, ``.gitignore`` and
    ``.rayignore`` files and ``excludes`` apply exactly as they will at upload.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(root).absolute()
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    per_entry: dict[str, int] = {}

    def count(path: Path) -> None:
        is_empty_dir = path.is_dir() and next(path.iterdir(), None) is None
        if not (path.is_file() or is_empty_dir):
            return
        rel = path.relative_to(root)
        name = rel.as_posix() + ("/" if is_empty_dir else "")
        size = (path.stat().st_size if path.is_file() else 0) + _ZIP_ENTRY + 2 * len(name.encode())
        top = rel.parts[0] + ("/" if len(rel.parts) > 1 or is_empty_dir else "")
        per_entry[top] = per_entry.get(top, 0) + size

    _dir_travel(root, [_get_excludes(root, patterns)], count, include_gitignore=include_gitignore)
    return sum(per_entry.values()) + _ZIP_END, per_entry


def check_upload(root: str | Path, excludes: list[str], limit: int | None = None) -> int:
    """Raise a ValueError naming what to exclude when ``root`` would not fit Ray's limit."""
    limit = upload_limit() if limit is None else limit
    total, per_entry = upload_size(root, excludes)
    if total < limit:
        return total
    largest = sorted(per_entry.items(), key=lambda kv: -kv[1])[:5]
    listing = ", ".join(f"{name} ({_mib(size)})" for name, size in largest)
    raise ValueError(
        f"working directory {Path(root).absolute()} would upload {_mib(total)}, over Ray's "
        f"working_dir limit of {_mib(limit)}. Largest entries: {listing}. Exclude what the job "
        "does not need to run (data, checkpoints, outputs) by listing it in a .rayignore file "
        "there (gitignore syntax), or move it out and pass its path in the config (data.train=, "
        "run.storage=).")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise FileNotFoundError("the `ray` command is not installed: pip install 'ray[default]'")
    return found


def _check_config(entry: str, config: str, overrides: list[str], root: Path) -> None:
    """The job runs in the uploaded copy, so the config must load and live inside it."""
    path = Path(config)
    if path.is_absolute() or not (root / path).is_file():
        raise FileNotFoundError(f"config {config} must be a file under the working directory "
                                f"{root} (the job sees only the uploaded copy), given relative "
                                "to it, e.g. configs/tvr.yaml")
    if entry == "sweep":
        from launch.sweep import load_sweep

        load_sweep(root / path, overrides)
    else:
        from trainer.config import load_config

        load_config(root / path, overrides)


def job_command(entry: str, config: str, overrides: list[str], address: str, submission_id: str,
                working_dir: str = ".", wait: bool = True) -> list[str]:
    """The ``ray job submit`` command line."""
    cmd = [_ray_cli(), "job", "submit", "--address", address, "--submission-id", submission_id,
           "--working-dir", working_dir, "--runtime-env-json", json.dumps({"excludes": EXCLUDES})]
    if not wait:
        cmd.append("--no-wait")
    return cmd + ["--", "python", "-m", f"launch.{entry}", "--config", config, *overrides]


def submit(entry: str, config: str, overrides: list[str], address: str | None = None,
           wait: bool = True, working_dir: str | Path = ".") -> int:
    """Submit ``python -m launch.<entry>`` as a Ray job; 0 when it ends SUCCEEDED (or, with
    ``wait=False``, when it was accepted)."""
    if entry not in ENTRIES:
        raise ValueError(f"entry {entry!r} is not one of {list(ENTRIES)}")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no Ray cluster to submit to: pass --address http://HEAD:8265 (the "
                         "dashboard) or set RAY_ADDRESS")
    root = Path(working_dir).absolute()
    _check_config(entry, config, list(overrides), root)
    size = check_upload(root, EXCLUDES)
    submission_id = f"dldkd-{entry}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    print(f"submitting {submission_id} to {address}: {root} ({_mib(size)} after excludes)",
          flush=True)
    cmd = job_command(entry, config, list(overrides), address, submission_id, str(root), wait)
    code = subprocess.call(cmd)
    if code or not wait:
        return code
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(address).get_job_status(submission_id)
    if status != JobStatus.SUCCEEDED:
        print(f"job {submission_id} ended {status}", file=sys.stderr)
        return 1
    return 0

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
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ENTRIES = ("train", "sweep")
# Never uploaded: version control, environments, data, outputs, run folders, caches. Leading '/'
# anchors a pattern at the working directory (gitignore syntax, as Ray reads it).
EXCLUDES = [".git", ".venv", "venv", "/data", "/outputs", "/runs", "/mlruns", "*.db", "/.cache",
            ".pytest_cache", "__pycache__", "*.egg-info", "/build"]
# A zip entry costs a local header (30 bytes) and a central-directory record (46 bytes), each
# with the name; the archive ends with a 22-byte record. Ray stores files uncompressed.
_ZIP_ENTRY, _ZIP_END = 30 + 46, 22
# Ray's package limit: a working_dir travels through the GCS in one gRPC message, capped by Ray's
# system setting max_grpc_message_size (512 MiB; the RAY_max_grpc_message_size env var sets it).
_GRPC_MESSAGE_MAX = 512 * 2**20
# Ray's own excludes, which RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES replaces (comma-separated).
_RAY_DEFAULT_EXCLUDES = ".git,.venv,venv,__pycache__"


def upload_limit() -> int:
    """Ray's limit on a working_dir package, in bytes."""
    return int(os.environ.get("RAY_max_grpc_message_size", _GRPC_MESSAGE_MAX))


def _segment(glob: str) -> str:
    """One path segment's wildcards as a regex: ``*`` and ``?`` stop at '/', ``[...]`` is a class
    (``[!...]`` negated), a backslash escapes."""
    out = []
    for tok in re.findall(r"\\.|\[!?\]?[^\]]*\]|.", glob, re.S):
        if tok.startswith("\\"):
            out.append(re.escape(tok[1:]))
        elif tok == "*":
            out.append("[^/]*")
        elif tok == "?":
            out.append("[^/]")
        elif len(tok) > 1:
            body = tok[1:-1]
            neg = "^" if body.startswith("!") else "\\^" if body.startswith("^") else ""
            out.append("[" + neg + body[bool(neg):].replace("\\", "\\\\") + "]")
        else:
            out.append(re.escape(tok))
    return "".join(out)


def _pattern(line: str) -> tuple[re.Pattern, bool] | None:
    """A gitignore line as (regex over a '/'-separated relative path, excludes?), None for blanks
    and comments; the translation Ray's bundled pathspec ("gitwildmatch") makes, edge cases
    included, so the estimate matches the package Ray builds."""
    line = line.strip()
    if not line or line.startswith("#") or line == "/":
        return None
    exclude = not line.startswith("!")
    if not exclude:
        line = line[1:]
    segs = (line[1:] if line.startswith("\\") else line).split("/")
    if not segs[0]:
        del segs[0]                      # leading '/': anchored at the ignore file's folder
    elif (len(segs) == 1 or (len(segs) == 2 and not segs[1])) and segs[0] != "**":
        segs.insert(0, "**")             # a bare name matches at any depth
    if len(segs) > 1 and not segs[-1]:
        segs[-1] = "**"                  # trailing '/': everything below
    regex, slash, last = "^", False, len(segs) - 1
    for i, seg in enumerate(segs):
        if seg == "**":
            regex += ".+" if i == 0 == last else "(?:.+/)?" if i == 0 else \
                "/.*" if i == last else "(?:/.+)?"
            slash = 0 < i < last
            continue
        regex += ("/" if slash else "") + ("[^/]+" if seg == "*" else _segment(seg))
        if i == last and exclude and seg != "*":
            regex += "(?:/.*)?"          # a name also covers what is below it
        slash = True
    return re.compile(regex + "$"), exclude


def _matcher(base: Path, lines: list[str]) -> Callable[[Path], bool]:
    """Whether a path is excluded: the last matching pattern decides (a '!' one re-includes)."""
    patterns = [p for p in map(_pattern, lines) if p]

    def excluded(path: Path) -> bool:
        rel = path.relative_to(base).as_posix()
        verdict = False
        for regex, exclude in patterns:
            if regex.match(rel):
                verdict = exclude
        return verdict

    return excluded


def _walk(path: Path, excludes: list[Callable[[Path], bool]], visit: Callable[[Path], None],
          gitignore: bool) -> None:
    """Ray's traversal: a folder's .gitignore and .rayignore apply, relative to it, to itself and
    everything below; an excluded folder is not entered."""
    found = [_matcher(path, (path / name).read_text().splitlines())
             for name in ((".gitignore", ".rayignore") if gitignore else (".rayignore",))
             if (path / name).is_file()]
    excludes = excludes + found
    if any(excluded(path) for excluded in excludes):
        return
    visit(path)
    if path.is_dir():
        for sub in path.iterdir():
            _walk(sub, excludes, visit, gitignore)


def upload_size(root: str | Path, excludes: list[str]) -> tuple[int, dict[str, int]]:
    """Bytes of the package Ray would build from ``root``, and bytes per top-level entry.

    Walks the directory as Ray does: its default excludes, ``.gitignore`` (unless
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and ``.rayignore`` files and ``excludes`` apply, in
    gitignore syntax, exactly as they will at upload.
    """
    root = Path(root).absolute()
    defaults = os.environ.get("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", _RAY_DEFAULT_EXCLUDES)
    patterns = [x.strip() for x in defaults.split(",") if x.strip()] + list(excludes)
    gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
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

    _walk(root, [_matcher(root, patterns)], count, gitignore)
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
        from launch.jobs.sweep_spec import load_sweep

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

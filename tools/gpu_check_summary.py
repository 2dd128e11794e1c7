"""Fold the GPU check's step records and logs into ``$OUT/summary.json`` (stdlib only).

Reads ``steps.jsonl`` (one line per step: name, status, seconds, limit) and pulls the numbers
out of the logs: ``bench.gpu``'s and ``bench.eval``'s JSON lines, pytest's final line, and the
short training run's validation SumR and wall time. Written after every step, so a check that
is stopped still leaves its summary.

Run: ``python tools/gpu_check_summary.py OUT_DIR``.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path


def last_json(path: Path, key: str | None = None) -> dict | None:
    """The last line of a log that parses as a JSON object (holding ``key``, if given)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                found = json.loads(line)
            except ValueError:
                continue
            if key is None or key in found:
                return found
    return None


def pytest_line(path: Path) -> str | None:
    """pytest's closing summary (``1 passed in 93.2s``)."""
    if not path.is_file():
        return None
    found = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|error).*?) ?=*$",
                       path.read_text(errors="replace"), re.M)
    return found[-1] if found else None


def train_numbers(path: Path) -> dict:
    """Validation SumR per evaluation and the best, from ``dldkd train``'s log lines."""
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    evals = [{"step": int(s), "SumR": float(r)}
             for s, r in re.findall(r"eval step (\d+):.*?SumR=([\d.]+)", text)]
    out: dict = {"evals": evals}
    best = re.findall(r"best SumR ([\d.]+) at step (\d+)", text)
    if best:
        out["best_sumr"], out["best_step"] = float(best[-1][0]), int(best[-1][1])
    rate = re.findall(r"([\d.]+) samples/s", text)
    if rate:
        out["last_samples_s"] = float(rate[-1])
    return out


def summarize(out: Path) -> dict:
    steps = []
    if (out / "steps.jsonl").is_file():
        steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()
                 if line.strip()]
    by_name = {s["name"]: s for s in steps}
    summary = {
        "ok": bool(steps) and all(s["status"] in ("ok", "skipped") for s in steps),
        "total_s": round(sum(s.get("seconds", 0) for s in steps), 1),
        "steps": steps,
        "env": last_json(out / "env.log", "torch"),
        "requirements": last_json(out / "env.log", "unmet"),
        "pytest": pytest_line(out / "pytest.log"),
        "bench_gpu": last_json(out / "bench-gpu.log"),
        "bench_eval": last_json(out / "bench-eval.log"),
        "train": train_numbers(out / "train.log"),
    }
    if "train" in by_name:
        summary["train"]["wall_s"] = by_name["train"].get("seconds")
    return summary


def main() -> None:
    out = Path(sys.argv[1])
    summary = summarize(out)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")


if __name__ == "__main__":
    main()

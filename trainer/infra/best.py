"""A run's best weights, ``<run.storage>/<run.name>/best/``: kept in run storage, cached on a node.

The folder holds ``student.pt`` (a plain state dict), ``config.yaml`` and ``metrics.json`` (with the
step the weights are from), and at the end ``test_report.json``, ``explorer.html`` and
``val_sumr.png``. Every file is written whole (``storage.write_bytes``), ``metrics.json`` last,
so its step names the weights beside it. Workers restarted on another node find the folder in
storage, not on a lost disk.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch
import yaml

from trainer.infra import storage

log = logging.getLogger("dldkd")

# In write order: metrics.json last (it says which step the weights are from).
FILES = ("student.pt", "config.yaml", "metrics.json")


def put(location: str, cache: Path, name: str, data: bytes) -> None:
    """One file into the node's cache and, when storage is remote, into ``location``."""
    storage.write_bytes(str(Path(cache) / name), data)
    if storage.is_remote(location):
        storage.write_bytes(storage.join(location, name), data)


def save(location: str, cache: Path, weights: dict, config: dict, metrics: dict) -> None:
    """The best weights so far, their config, and the evaluation that chose them."""
    buf = io.BytesIO()
    torch.save(weights, buf)
    data = {"student.pt": buf.getvalue(),
            "config.yaml": yaml.safe_dump(config, sort_keys=False).encode(),
            "metrics.json": json.dumps(metrics, indent=1).encode()}
    for name in FILES:
        put(location, cache, name, data[name])


def saved_step(folder: Path) -> int | None:
    """The step named by ``folder/metrics.json``; None when there is none."""
    try:
        return int(json.loads((Path(folder) / "metrics.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_copy(location: str, cache: Path, step: int) -> Path:
    """``cache`` holding the best weights of ``step``, fetched from ``location`` when that is
    remote (run storage speaks, never a node's cache); FileNotFoundError names the folder if
    none exist."""
    cache = Path(cache)
    if storage.is_remote(location):
        for name in FILES:
            source = storage.join(location, name)
            try:
                data = storage.read_bytes(source)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{source} is missing: the run's best weights (step {step})"
                                        " were not kept in run.storage") from err
            storage.write_bytes(str(cache / name), data)
    found = saved_step(cache)
    if found is None:
        raise FileNotFoundError(f"{location} holds no best weights (no metrics.json), though the "
                                f"run's state names step {step}")
    if found != step:
        log.warning("%s holds the weights of step %d, the run's state names step %d (written after"
                    " its last checkpoint); using them", location, found, step)
    return cache

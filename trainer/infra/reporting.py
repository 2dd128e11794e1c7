"""Where a run's checkpoints go and how its progress is announced: the recipe's one seam with
Ray (``launch.train`` gives a Ray reporter) or run storage itself (``LocalReporter``, used by
``dldkd train --no-ray`` and torchrun, on a folder or an object store)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

from trainer import checkpoint as ckpt
from trainer import dist
from trainer.infra import storage


class Reporter(Protocol):
    """Where checkpoints go and how progress is announced (Ray or plain files).

    ``report`` is called by every rank at every evaluation and every checkpoint: ``staged`` is
    the checkpoint folder, or None for an evaluation without one (schedulers such as ASHA act on
    each evaluation). A report without an evaluation carries no ``val/*`` metrics."""

    def restore_dir(self) -> Path | None: ...
    def staging_dir(self, step: int) -> Path: ...
    def report(self, metrics: dict, staged: Path | None, step: int) -> None: ...
    # The signal another process received for this run (the Ray driver's), else 0; polled at
    # each log, evaluation and checkpoint step (trainer.infra.signals).
    def stop_requested(self) -> int: ...


# Written last into a checkpoint folder in run storage: only a folder with it is complete.
COMPLETE = "complete.json"


class LocalReporter:
    """Checkpoints in run storage, ``<run.storage>/<run.name>/checkpoints/step-N``.

    On a (shared) file system a checkpoint is written under ``step-N.tmp`` and complete once
    renamed. On an object store each node stages its ranks' files in its cache, uploads them
    (one put per file), and rank 0 writes ``step-N/complete.json`` last: only a checkpoint with
    that marker is ever resumed from, and resuming downloads it from the store (the node's
    cache is never read in its place)."""

    def __init__(self, root, is_main: bool, resume: str = "auto", cache: Path | None = None,
                 local_rank: int = 0, keep: int = 2):
        self.root, self.is_main, self.resume = str(root), is_main, resume
        self.remote = storage.is_remote(self.root)
        self.cache = Path(cache) if cache is not None else None
        self.is_node_main = local_rank == 0
        self.keep = keep
        if self.remote and self.cache is None:
            raise ValueError(f"checkpoints in {self.root} need a local cache folder")

    def restore_dir(self) -> Path | None:
        if self.remote and self.is_node_main:   # staging left by a stopped attempt
            for old in self.cache.glob("step-*.tmp"):
                shutil.rmtree(old, ignore_errors=True)
        if self.resume == "never":
            dist.barrier()
            return None
        found = complete_step(self.root) if self.remote else ckpt.latest(Path(self.root))
        if found is None and self.resume == "must":
            raise FileNotFoundError(f"run.resume=must but no complete checkpoint under "
                                    f"{self.root}")
        if not self.remote:
            return found
        if found is None:
            dist.barrier()
            return None
        name = ckpt.step_dir(Path(), found).name
        local = self.cache / "restored" / name
        if self.is_node_main:
            storage.download(storage.join(self.root, name), local)
        dist.barrier()
        return local

    def stop_requested(self) -> int:
        """0: without Ray a signal reaches this process itself (StopOnSignals' handlers)."""
        return 0

    def staging_dir(self, step: int) -> Path:
        base = self.cache if self.remote else Path(self.root)
        return ckpt.step_dir(base, step).with_suffix(".tmp")

    def report(self, metrics: dict, staged: Path | None, step: int) -> None:
        if staged is None:
            dist.barrier()
            return
        if not self.remote:
            dist.barrier()  # every rank has finished writing its part
            if self.is_main:
                ckpt.publish(staged, ckpt.step_dir(Path(self.root), step), self.keep)
            dist.barrier()
            return
        target = storage.join(self.root, staged.name[:-len(".tmp")])
        if self.is_main:   # a rerun of this step: its old files go before any new one arrives
            storage.remove(target)
        dist.barrier()
        if self.is_node_main:
            storage.upload(staged, target)
        dist.barrier()   # every node's files are in the store
        if self.is_main:
            storage.write_bytes(storage.join(target, COMPLETE), json.dumps({"step": step}).encode())
            self._prune(step)
        dist.barrier()
        if self.is_node_main:
            shutil.rmtree(staged, ignore_errors=True)

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints up to ``step``; remove every other one
        (older ones, partial ones, and those of an abandoned later timeline)."""
        steps = stored_steps(self.root)
        kept = [s for s in steps if s <= step and steps[s]][-self.keep:]
        for s in steps:
            if s not in kept:
                storage.remove(storage.join(self.root, ckpt.step_dir(Path(), s).name))


def stored_steps(root: str) -> dict[int, bool]:
    """{step: complete} of the ``step-N`` folders under ``root`` (a folder or an object store),
    by step; complete: its ``COMPLETE`` marker is there."""
    found = {}
    for name in storage.listdir(root):
        if name.startswith("step-") and name[5:].isdigit():
            found[int(name[5:])] = storage.exists(storage.join(root, name, COMPLETE))
    return dict(sorted(found.items()))


def complete_step(root: str) -> int | None:
    """The newest checkpoint step under ``root`` whose files are all in the store."""
    done = [s for s, complete in stored_steps(root).items() if complete]
    return done[-1] if done else None

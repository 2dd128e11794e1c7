"""Where a run's checkpoints go and how its progress is announced: the recipe's one seam with
Ray (``launch.train`` gives a Ray reporter) or plain files (``LocalReporter``)."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from trainer import checkpoint as ckpt
from trainer import dist


class Reporter(Protocol):
    """Where checkpoints go and how progress is announced (Ray or plain files).

    ``report`` is called by every rank at every evaluation and every checkpoint: ``staged`` is
    the checkpoint folder, or None for an evaluation without one (schedulers such as ASHA act on
    each evaluation). A report without an evaluation carries no ``val/*`` metrics."""

    def restore_dir(self) -> Path | None: ...
    def staging_dir(self, step: int) -> Path: ...
    def report(self, metrics: dict, staged: Path | None, step: int) -> None: ...


class LocalReporter:
    """Checkpoints on a (shared) file system: ``<storage>/<name>/checkpoints/step-N``."""

    def __init__(self, root: Path, is_main: bool, resume: str = "auto"):
        self.root, self.is_main, self.resume = Path(root), is_main, resume

    def restore_dir(self) -> Path | None:
        if self.resume == "never":
            return None
        found = ckpt.latest(self.root)
        if found is None and self.resume == "must":
            raise FileNotFoundError(f"run.resume=must but no checkpoint under {self.root}")
        return found

    def staging_dir(self, step: int) -> Path:
        return ckpt.step_dir(self.root, step).with_suffix(".tmp")

    def report(self, metrics: dict, staged: Path | None, step: int) -> None:
        dist.barrier()  # every rank has finished writing its part
        if staged is not None and self.is_main:
            ckpt.publish(staged, ckpt.step_dir(self.root, step))
        dist.barrier()

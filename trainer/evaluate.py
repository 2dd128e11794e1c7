"""Evaluate a saved student (a run's ``best/`` folder) on a split, and print metric tables."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointError, load_weights_only
from trainer.config import from_dict, load_yaml
from trainer.infra import storage
from trainer.method.metrics import build_gallery, evaluate
from trainer.method.student import DualStudent

COLUMNS = ("R1", "R5", "R10", "R100", "SumR", "MedR", "MeanR", "MRR")


def fetch_best(location: str | Path) -> Path:
    """A local folder holding ``student.pt`` and ``config.yaml`` of a ``best/`` folder or URI
    (``s3://...``, what the MLflow tag ``dldkd.best_checkpoint`` names), fetched anew each time."""
    location = str(location)
    if not storage.is_remote(location):
        return Path(location)
    cache = storage.cache_dir("eval", location.rstrip("/"), "best")
    for name in ("student.pt", "config.yaml"):
        try:
            storage.write_bytes(str(cache / name), storage.read_bytes(storage.join(location, name)))
        except FileNotFoundError:
            (cache / name).unlink(missing_ok=True)   # reported below, by its URI
    return cache


def load_student(folder: str | Path) -> tuple[DualStudent, object]:
    """The student and config saved in ``folder`` (``student.pt`` + ``config.yaml``), a local
    folder or an object-store URI."""
    where = str(folder)
    folder = fetch_best(folder)
    weights, config = folder / "student.pt", folder / "config.yaml"
    for path in (weights, config):
        if not path.is_file():
            shown = storage.join(where, path.name) if storage.is_remote(where) else path
            raise FileNotFoundError(f"{shown} is missing: pass a run's best/ folder "
                                    "(<run.storage>/<run.name>/best)")
    cfg = from_dict(load_yaml(config))  # a saved, resolved config: no environment applied
    student = DualStudent(cfg.model)
    try:
        state = load_weights_only(weights, map_location="cpu")
    except CheckpointError as err:   # its words are for training (resume); these for eval
        raise CheckpointError(_unreadable(weights, err)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights} is not a state dict of tensors; pass a run's best/ "
                              "folder written by dldkd")
    try:
        student.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or differently shaped tensors
        lines = [ln.strip() for ln in str(err).splitlines()[1:4] if ln.strip()]
        raise CheckpointError(f"{weights} does not fit the model of {config} ({'; '.join(lines)}"
                              "): the weights and config.yaml come from different runs; copy "
                              "the matching pair") from None
    return student.eval(), cfg


def _unreadable(weights: Path, err: CheckpointError) -> str:
    """Why ``student.pt`` does not load, for evaluation, naming the refused class if any but no
    library advice (torch's suggests unpickling the file, which dldkd never does)."""
    named = re.search(r"Unsupported global: GLOBAL [\w.]+", str(err))
    cause = err.__context__
    why = named.group(0) if named else type(cause).__name__ if cause else "unreadable"
    return (f"cannot evaluate {weights}: it is not a student checkpoint dldkd can read ({why}); "
            "the file is damaged or holds objects other than tensors. Copy student.pt again "
            "from the run's best/ folder (<run.storage>/<run.name>/best), or evaluate another "
            "run's best/ folder")


def evaluate_checkpoint(folder: str | Path, split: str) -> dict:
    from sharding.reader import read_all

    student, cfg = load_student(folder)
    gallery = build_gallery(read_all(split, teacher_frames=False), cfg.model.max_words)
    metrics = evaluate(student, gallery, video_chunk=cfg.data.eval_batch_videos)
    return _report(folder, split, gallery, metrics)


def explain_checkpoint(folder: str | Path, split: str, name: str | None = None, **options
                       ) -> tuple[dict, str]:
    """``evaluate_checkpoint``'s report (the same metrics) and the explorer page
    (docs/evaluation.md) from one encoding of the gallery; ``name`` titles the page."""
    from sharding.reader import read_all
    from trainer.explain import explain_student
    from trainer.infra.explorer_html import render

    student, cfg = load_student(folder)
    samples = read_all(split, teacher_frames=False)
    gallery = build_gallery(samples, cfg.model.max_words)
    ex = explain_student(student, gallery, [c for s in samples for c in s.captions],
                         video_chunk=cfg.data.eval_batch_videos, **options)
    return _report(folder, split, gallery, ex.metrics), render(ex, f"{name or folder} on {split}")


def _report(folder, split: str, gallery, metrics: dict) -> dict:
    return {"checkpoint": str(folder), "split": split, "videos": gallery.num_videos,
            "queries": gallery.num_queries, "metrics": metrics}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width table, one row per name, the method.md §1 metrics as columns."""
    width = max([len(n) for n in rows] + [8])
    head = f"{'':<{width}} " + " ".join(f"{c:>7}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = " ".join(f"{m[c]:>7.2f}" if c in m else f"{'-':>7}" for c in COLUMNS)
        lines.append(f"{name:<{width}} {cells}")
    return "\n".join(lines)

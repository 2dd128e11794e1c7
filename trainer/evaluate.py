"""Evaluate a saved student (a run's ``best/`` folder) on a split, and print metric tables."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.checkpoint import CheckpointError, load_weights_only
from trainer.config import from_dict, load_yaml
from trainer.method.metrics import build_gallery, evaluate
from trainer.method.student import DualStudent

COLUMNS = ("R1", "R5", "R10", "R100", "SumR", "MedR", "MeanR", "MRR")


def load_student(folder: str | Path) -> tuple[DualStudent, object]:
    """The student and config saved in ``folder`` (``student.pt`` + ``config.yaml``)."""
    folder = Path(folder)
    weights, config = folder / "student.pt", folder / "config.yaml"
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: pass a run's best/ folder "
                                    "(<run.storage>/<run.name>/best)")
    cfg = from_dict(load_yaml(config))  # a saved, resolved config: no environment applied
    student = DualStudent(cfg.model)
    state = load_weights_only(weights, map_location="cpu")
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


def evaluate_checkpoint(folder: str | Path, split: str) -> dict:
    from sharding.reader import read_all

    student, cfg = load_student(folder)
    gallery = build_gallery(read_all(split, teacher_frames=False), cfg.model.max_words)
    metrics = evaluate(student, gallery, video_chunk=cfg.data.eval_batch_videos)
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

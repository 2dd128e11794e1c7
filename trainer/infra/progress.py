"""Progress: wall time per phase of a step (data, teacher, student) and the ETA in the logs;
the validation SumR plot of a run."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from sharding.files import atomic_path


class PhaseTimer:
    """Wall time per phase since the last log line (data wait, teacher, student)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.phases = {"data": 0.0, "teacher": 0.0, "student": 0.0}
        self.samples = 0
        self.steps = 0

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] += time.perf_counter() - start

    def count(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1

    def rates(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        steps = max(self.steps, 1)
        return {"samples_s": self.samples / wall, "step_s": wall / steps,
                "data_pct": 100 * self.phases["data"] / wall,
                "teacher_pct": 100 * self.phases["teacher"] / wall,
                **{f"{k}_ms": 1000 * v / steps for k, v in self.phases.items()}}


def fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Validation SumR over steps: the evaluation report's plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["step"] for h in history], [h["SumR"] for h in history], marker="o")
    ax.set(xlabel="step", ylabel="validation SumR", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)

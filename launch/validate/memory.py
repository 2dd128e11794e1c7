"""The per-worker memory model of ``dldkd validate`` (docs/validate.md gives the formulas):
model states under the ZeRO stage, the teacher's parameters and one micro-batch's activations,
counted on the meta device so nothing is allocated."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trainer.config import Config

if TYPE_CHECKING:
    from trainer.teacher.weights import WeightSource

DEFAULT_QUERIES_PER_VIDEO = 5.0   # TVR's captions per video; the manifest's ratio when known


@dataclass(frozen=True)
class MemoryRow:
    item: str
    bytes: float
    note: str


@dataclass
class MemoryEstimate:
    """Bytes per worker (one data-parallel rank) of the model states, teacher and activations."""

    student_params: int
    teacher_params: int | None     # None: unknown offline (an hf-hub config)
    rows: list[MemoryRow] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    def render(self) -> str:
        width = max(len(r.item) for r in self.rows + [MemoryRow("total", 0, "")])
        lines = [f"memory per worker (estimate; student {self.student_params:,} parameters, "
                 f"teacher {_count(self.teacher_params)}):"]
        for r in self.rows + [MemoryRow("total", self.total, "")]:
            lines.append(f"  {r.item:<{width}}  {size_text(r.bytes):>10}  {r.note}".rstrip())
        return "\n".join(lines)


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,} parameters"


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def student_param_count(cfg: Config) -> int:
    """Parameters of DualStudent(cfg.model), built on the meta device (nothing allocated)."""
    import torch

    from trainer.method.student import DualStudent

    with torch.device("meta"):
        model = DualStudent(cfg.model)
    return sum(p.numel() for p in model.parameters())


def teacher_param_count(cfg: Config) -> int | None:
    """Parameters of the open_clip teacher built on the meta device; None if it cannot be built
    offline (an hf-hub config, an unknown arch: the teacher check says why)."""
    if not cfg.uses_teacher() or cfg.teacher.placement == "precomputed":
        return 0
    from trainer.teacher.weights import HF_HUB, TeacherError, resolve_weights

    try:
        source = resolve_weights(cfg.teacher, download=False)
    except TeacherError:
        return None
    if source.model_name.startswith(HF_HUB):
        return None
    return sum(p.numel() for p in meta_teacher(source).parameters())


def meta_teacher(source: WeightSource):
    """The open_clip model as the teacher builds it, on the meta device (no memory)."""
    import torch

    from trainer.teacher.placement import create_clip

    root = logging.getLogger()   # open_clip warns "No pretrained weights loaded" on the root
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return create_clip(source, torch.device("meta"))
    finally:
        root.setLevel(level)


def activation_elements(cfg: Config, queries_per_video: float = DEFAULT_QUERIES_PER_VIDEO
                        ) -> float:
    """Elements the student keeps for backward on one micro-batch (docs/validate.md).

    Fitted to the tensors autograd saves (within 2% over dims, batch sizes and branch choices);
    every video counted at ``model.max_frames`` and every query at ``model.max_words``.
    """
    m = cfg.model
    n_br = 1 if m.branches != "dual" else 2
    B, L, W = cfg.data.batch_videos, m.max_frames, m.max_words
    Q = queries_per_video * B
    inputs = (1 + 2 * n_br) * (B * L * m.video_dim + Q * W * m.query_dim)
    per_branch = (11.5 * (B * L + Q * W) * m.hidden + 3 * m.heads * (B * L * L + Q * W * W)
                  + 4.3 * Q * B * L)
    return inputs + n_br * per_branch


def estimate_memory(cfg: Config, queries_per_video: float = DEFAULT_QUERIES_PER_VIDEO,
                    teacher_params: int | None = -1) -> MemoryEstimate:
    """Model states under the ZeRO stage (bf16: 2+2 bytes params+grads, 4+8 fp32 master and
    moments; fp32: 4+4, 8), teacher replicated or /N under zero3, one micro-batch's activations."""
    n, stage = cfg.dist.num_workers, cfg.dist.zero_stage
    bf16 = cfg.dist.precision == "bf16"
    p = student_param_count(cfg)
    if teacher_params == -1:
        teacher_params = teacher_param_count(cfg)
    param_b, grad_b, opt_b = (2, 2, 12) if bf16 else (4, 4, 8)
    split = {s: (n if stage >= s else 1) for s in (1, 2, 3)}

    def shard(k: int) -> str:
        return f"/ {n} workers (ZeRO-{stage})" if split[k] > 1 else "replicated"

    rows = [
        MemoryRow("student params", p * param_b / split[3], f"{param_b} B x {p:,}, {shard(3)}"),
        MemoryRow("gradients", p * grad_b / split[2], f"{grad_b} B x {p:,}, {shard(2)}"),
        MemoryRow("optimizer state", p * opt_b / split[1],
                  ("fp32 master + 2 moments" if bf16 else "2 fp32 moments")
                  + f" = {opt_b} B x {p:,}, {shard(1)}"),
    ]
    if teacher_params is None:
        rows.append(MemoryRow("teacher params", 0, "unknown offline (see the teacher check)"))
    elif teacher_params:
        t_b = 2 if cfg.dist.use_gpu else 4   # the teacher runs in bf16 on GPUs, fp32 on CPUs
        zero3 = cfg.teacher.placement == "zero3"
        rows.append(MemoryRow("teacher params", teacher_params * t_b / (n if zero3 else 1),
                              f"{t_b} B x {teacher_params:,}, "
                              + (f"/ {n} workers (zero3)" if zero3 else "replicated")))
    else:
        rows.append(MemoryRow("teacher params", 0, f"none ({teacher_use(cfg)})"))
    act_b = 2 if bf16 else 4
    rows.append(MemoryRow(
        "activations", activation_elements(cfg, queries_per_video) * act_b,
        f"one micro-batch: B={cfg.data.batch_videos} videos, Q={queries_per_video:g}B queries, "
        f"L={cfg.model.max_frames}, {act_b} B/element"))
    return MemoryEstimate(p, teacher_params, rows)


def teacher_use(cfg: Config) -> str:
    if not cfg.uses_teacher():
        return "not used by this model.branches / loss settings"
    return "precomputed embeddings from the shards"

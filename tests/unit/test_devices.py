"""One device for every tensor: the student, losses and teacher run with inputs on the ``meta``
device, so any tensor they create on a hard-coded device (the CPU) fails the test.

The evaluation's ranks cannot run on ``meta`` (a rank is a data-dependent count); its device
handling is exercised on CUDA by the GPU suite (tests/gpu).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sharding.batch import VideoSample, collate
from trainer.config import LossConfig, ModelConfig, TeacherConfig
from trainer.method.losses import TeacherTargets, total_loss
from trainer.method.schedules import loss_weights
from trainer.method.student import DualStudent

META = torch.device("meta")
STUDENT_INPUTS = ("video_feats", "video_mask", "query_feats", "query_mask", "labels",
                  "video_rows", "query_rows")


def batch(frames: bool = False, emb: bool = False):
    rng = np.random.default_rng(0)
    samples = []
    for j in range(3):
        n = 4 + j % 2
        samples.append(VideoSample(
            f"v{j}", rng.standard_normal((n, 8)).astype(np.float32),
            [rng.standard_normal((3, 6)).astype(np.float32) for _ in range(2)],
            [f"v{j}#0", f"v{j}#1"], ["a cat", "a dog"],
            teacher_frames=rng.integers(0, 255, (3, 40, 50, 3), dtype=np.uint8) if frames else None,
            teacher_frame_emb=rng.standard_normal((3, 16)).astype(np.float32) if emb else None,
            teacher_text_emb=rng.standard_normal((2, 16)).astype(np.float32) if emb else None))
    b = collate(samples, max_words=4)
    for name in STUDENT_INPUTS:  # as the recipe's _to_device moves them
        setattr(b, name, getattr(b, name).to(META))
    return b


@pytest.mark.parametrize("hard_negatives", [False, True])
def test_student_and_losses_stay_on_the_inputs_device(hard_negatives):
    cfg = ModelConfig(video_dim=8, query_dim=6, hidden=8, heads=2, max_frames=6, max_words=4)
    student = DualStudent(cfg, check_inputs=False).to(META)
    b = batch()
    scores = student(b)
    Q, B, L = scores["inh"].cos.shape
    teacher = TeacherTargets(torch.empty(Q, B, L, device=META), torch.empty(Q, B, device=META))
    loss_cfg = LossConfig(hard_pool=2, hard_negative_start_epoch=0 if hard_negatives else 1,
                          shuffle_teacher=True)
    loss, terms = total_loss(scores, b.labels, b.video_mask, teacher, loss_cfg,
                             loss_weights(loss_cfg, 0), check=False)
    assert loss.device == META and {t.device for t in terms.values()} == {META}
    loss.backward()
    assert {p.grad.device for p in student.parameters() if p.grad is not None} == {META}


def test_precomputed_teacher_targets_on_the_inputs_device():
    from trainer.teacher.model import build_teacher

    teacher = build_teacher(TeacherConfig(placement="precomputed"), META)
    b = batch(emb=True)
    b.teacher_frame_emb, b.teacher_text_emb = b.teacher_frame_emb.to(META), b.teacher_text_emb.to(META)
    out = teacher.targets(b)
    assert out.tau.device == META and out.T.device == META


def test_online_teacher_encodes_and_scatters_on_its_device():
    """Frames are selected on the host (cache keys), encoded and scattered on the device."""
    from trainer.teacher.model import Teacher, build_teacher
    from trainer.teacher.placement import RawFeatures

    cfg = TeacherConfig(arch="teacher-tiny", model_config="configs/teacher-tiny.json",
                        cache=False)
    built = build_teacher(cfg, "cpu")
    clip = built.clip.to(META)
    teacher = Teacher(cfg, device=META, forward=RawFeatures(clip), clip=clip,
                      tokenizer=built.tokenizer, preprocess=built.preprocess,
                      embed_dim=built.embed_dim)
    b = batch(frames=True)
    out = teacher.targets(b)
    assert out.tau.device == META and out.T.device == META
    assert tuple(out.tau.shape) == (b.num_queries, b.num_videos, b.video_feats.shape[1])

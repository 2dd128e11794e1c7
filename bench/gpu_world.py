"""Random data at the TVR preset's dims, for the GPU suite and ``bench.gpu``.

Features 3072 / 768, 5 captions of up to 30 tokens per video, 64..128 feature steps, and 16 raw
teacher frames per video (smooth gradients, so JPEG stays small) for the online teacher.
"""
from __future__ import annotations

import numpy as np

from sharding.batch import VideoSample

VIDEO_DIM, QUERY_DIM, CAPTIONS, TEACHER_FRAMES = 3072, 768, 5, 16


def tvr_sample(index: int, seed: int = 0, image_size: int = 224) -> VideoSample:
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(64, 129))
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    frames = unit(rng.standard_normal((n, VIDEO_DIM)))
    tokens = [unit(rng.standard_normal((int(rng.integers(8, 31)), QUERY_DIM)))
              for _ in range(CAPTIONS)]
    ramp = np.linspace(0, 1, image_size, dtype=np.float32)
    base = rng.uniform(0, 255, (TEACHER_FRAMES, 1, 1, 3)).astype(np.float32)
    pictures = (base * ramp[None, :, None, None] * ramp[None, None, :, None]).astype(np.uint8)
    vid = f"tvr{seed}-{index:05d}"
    return VideoSample(video_id=vid, frames=frames, tokens=tokens,
                       cap_ids=[f"{vid}#enc#{k}" for k in range(CAPTIONS)],
                       captions=[f"caption {k} of video {index}" for k in range(CAPTIONS)],
                       n_frames_orig=n, teacher_frames=pictures)

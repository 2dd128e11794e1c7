"""Random data at the TVR preset's dims, for the GPU suite, ``bench.gpu`` and the node check.

Features 3072 / 768, 5 captions of up to 30 tokens per video, 64..128 feature steps, and 16 raw
teacher frames per video (smooth gradients, so JPEG stays small) for the online teacher.

``tvr_precomputed_sample`` is the other teacher input, what ``dldkd shard msssl`` writes from the
release's CLIP files: 512-d "CLIP" frame and caption embeddings, one per feature row. Its videos
have a planted structure (each caption describes one of the video's moments; student features,
caption tokens and teacher embeddings are noisy views of that moment's latent vector), so a short
training run of ``configs/tvr.yaml`` on it learns and its SumR means something.

Run: ``python -m bench.gpu_world --out DIR [--videos N --eval-videos M]`` writes the precomputed
world's train and val splits.
"""
from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

import numpy as np

from sharding.batch import VideoSample

VIDEO_DIM, QUERY_DIM, CAPTIONS, TEACHER_FRAMES = 3072, 768, 5, 16
TEACHER_DIM, LATENT, MOMENTS, CONCEPTS = 512, 32, 4, 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def tvr_sample(index: int, seed: int = 0, image_size: int = 224) -> VideoSample:
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(64, 129))
    frames = _unit(rng.standard_normal((n, VIDEO_DIM)))
    tokens = [_unit(rng.standard_normal((int(rng.integers(8, 31)), QUERY_DIM)))
              for _ in range(CAPTIONS)]
    ramp = np.linspace(0, 1, image_size, dtype=np.float32)
    base = rng.uniform(0, 255, (TEACHER_FRAMES, 1, 1, 3)).astype(np.float32)
    pictures = (base * ramp[None, :, None, None] * ramp[None, None, :, None]).astype(np.uint8)
    vid = f"tvr{seed}-{index:05d}"
    return VideoSample(video_id=vid, frames=frames, tokens=tokens,
                       cap_ids=[f"{vid}#enc#{k}" for k in range(CAPTIONS)],
                       captions=[f"caption {k} of video {index}" for k in range(CAPTIONS)],
                       n_frames_orig=n, teacher_frames=pictures)


@lru_cache(maxsize=1)
def _projections(world_seed: int = 0) -> tuple[np.ndarray, ...]:
    """Fixed concepts, and latent -> student video, caption token and teacher spaces (shared by
    all splits)."""
    rng = np.random.default_rng([world_seed, 7])
    concepts = rng.standard_normal((CONCEPTS, LATENT)).astype(np.float32)
    return concepts, *(rng.standard_normal((LATENT, d)).astype(np.float32) / np.sqrt(LATENT)
                       for d in (VIDEO_DIM, QUERY_DIM, TEACHER_DIM))


def tvr_precomputed_sample(index: int, seed: int = 0, noise: float = 1.0) -> VideoSample:
    """One TVR-dim video with pre-extracted teacher embeddings and a planted signal: each moment
    mixes two of a few shared concepts (so captions match other videos' moments in part)."""
    concepts, to_video, to_query, to_teacher = _projections()
    rng = np.random.default_rng([seed, index, 1])
    n = int(rng.integers(64, 129))
    pairs = rng.integers(0, CONCEPTS, (MOMENTS, 2))
    moments = (concepts[pairs].sum(axis=1)
               + 0.3 * rng.standard_normal((MOMENTS, LATENT))).astype(np.float32)
    cuts = np.sort(rng.choice(np.arange(1, n), MOMENTS - 1, replace=False))
    of_row = np.searchsorted(cuts, np.arange(n), side="right")   # moment of each feature row
    row_latent = moments[of_row] + noise * rng.standard_normal((n, LATENT)).astype(np.float32)
    frames = _unit(row_latent @ to_video)
    # The teacher sees frames better than the student (less noise): it is worth distilling.
    teacher_frames = (moments[of_row] + 0.5 * noise * rng.standard_normal((n, LATENT))) @ to_teacher
    tokens, text = [], []
    for k in range(CAPTIONS):
        m = moments[k % MOMENTS]
        words = int(rng.integers(8, 31))
        tokens.append(_unit((m + 1.5 * noise * rng.standard_normal((words, LATENT))) @ to_query))
        text.append((m + 0.5 * noise * rng.standard_normal(LATENT)) @ to_teacher)
    vid = f"tvrp{seed}-{index:05d}"
    return VideoSample(video_id=vid, frames=frames, tokens=tokens,
                       cap_ids=[f"{vid}#enc#{k}" for k in range(CAPTIONS)],
                       captions=[f"caption {k} of video {index}" for k in range(CAPTIONS)],
                       n_frames_orig=n, teacher_frame_emb=teacher_frames.astype(np.float32),
                       teacher_text_emb=np.stack(text).astype(np.float32))


def write_precomputed_world(out: Path, videos: int, eval_videos: int,
                            videos_per_shard: int = 64) -> dict[str, Path]:
    """Train and val splits of ``tvr_precomputed_sample`` videos under ``out``."""
    from sharding.writer import write_split

    dims = {"video_dim": VIDEO_DIM, "query_dim": QUERY_DIM, "teacher_dim": TEACHER_DIM}
    splits = {}
    for split, count, seed in (("train", videos, 0), ("val", eval_videos, 1)):
        write_split(Path(out) / split, split, [str(i) for i in range(count)],
                    lambda i, s=seed: tvr_precomputed_sample(int(i), s),
                    videos_per_shard=videos_per_shard, dims=dims,
                    notes={"world": "TVR-dim videos with a planted signal and pre-extracted "
                                    "teacher embeddings (bench.gpu_world)"},
                    generator={"source": "bench.gpu_world", "seed": seed, "videos": count},
                    progress=False, overwrite=True)
        splits[split] = Path(out) / split
    return splits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the train/ and val/ splits")
    p.add_argument("--videos", type=int, default=1024, help="training videos")
    p.add_argument("--eval-videos", type=int, default=256, help="validation videos")
    a = p.parse_args()
    for split, path in write_precomputed_world(Path(a.out), a.videos, a.eval_videos).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()

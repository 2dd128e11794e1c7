"""SPEC 2 preprocessing as pure functions: applied once by the shard writers, never by the reader."""
from __future__ import annotations

import numpy as np

MAX_FRAMES = 128
MAX_WORDS = 30


def uniform_sample(frames: np.ndarray, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Average ``n > max_frames`` rows into ``max_frames`` contiguous, nearly equal chunks.

    Chunk k covers rows [floor(k n / M + 1/2), floor((k + 1) n / M + 1/2)), so the chunks
    partition all n rows (the MS-SL reference clamps the last boundary to n - 1 and so drops
    the last frame). With n <= max_frames the rows are returned unchanged (as float32).
    """
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, D) frame array, got shape {x.shape}")
    n = x.shape[0]
    if n <= max_frames:
        return x
    starts = np.floor(np.arange(max_frames) * n / max_frames + 0.5).astype(np.int64)
    ends = np.append(starts[1:], n)
    sums = np.add.reduceat(x.astype(np.float64), starts, axis=0)
    return (sums / (ends - starts)[:, None]).astype(np.float32)


def l2_normalise(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Divide every row by its L2 norm plus ``eps`` (the reference's ``x / (||x|| + eps)``)."""
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)


def prepare_tokens(tokens: np.ndarray, max_words: int = MAX_WORDS) -> np.ndarray:
    """One caption's token features: squeeze a leading 1, L2-normalise rows, keep the first ``max_words``."""
    t = np.asarray(tokens, dtype=np.float32)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n_tok, Dq) token array, got shape {t.shape}")
    return l2_normalise(t)[:max_words]


def prepare_frames(frames: np.ndarray, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Student frame features: uniform sampling to at most ``max_frames``, then L2 rows (SPEC 2)."""
    return l2_normalise(uniform_sample(frames, max_frames))

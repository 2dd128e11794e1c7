"""method.md §2 preprocessing as pure functions: applied once by the shard writers, never by the reader."""
from __future__ import annotations

import numpy as np

MAX_FRAMES = 128
MAX_WORDS = 30


def chunk_bounds(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start_k, end_k) of chunk k when ``n`` rows are averaged into ``m`` (MS-SL's chunks).

    As the reference's ``uniform_feature_sampling``: boundaries ``round(arange(m + 1) / m * n)``
    (numpy rounds half to even), clipped to n - 1, so the last row only counts when a chunk is a
    single row; a chunk whose boundaries coincide is that one row.
    """
    idx = np.round(np.arange(0, m + 1, 1.0) / m * n).astype(np.int64)
    idx = np.minimum(idx, n - 1)
    return idx[:-1], np.maximum(idx[1:], idx[:-1] + 1)


def uniform_sample(frames: np.ndarray, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Average ``n > max_frames`` rows over the reference's chunks (:func:`chunk_bounds`).

    With n <= max_frames the rows are returned unchanged (as float32).
    """
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, D) frame array, got shape {x.shape}")
    n = x.shape[0]
    if n <= max_frames:
        return x
    starts, ends = chunk_bounds(n, max_frames)
    sums = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0, dtype=np.float64)])
    return ((sums[ends] - sums[starts]) / (ends - starts)[:, None]).astype(np.float32)


def step_rows(n: int, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """(min(n, max_frames), 2) int: the rows [start, end) of the ``n`` source steps behind each
    row that :func:`uniform_sample` keeps (where a frame for that row is taken from)."""
    if n <= max_frames:
        rows = np.arange(n)
        return np.stack([rows, rows + 1], axis=1)
    return np.stack(chunk_bounds(n, max_frames), axis=1)


def resample_pair(student: np.ndarray, teacher: np.ndarray, max_frames: int = MAX_FRAMES
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Student and pre-extracted teacher frames on one time grid, as the DL-DKD reference does.

    The longer stream is first averaged to the shorter one's length (the reference does this for
    a longer student and leaves a longer teacher misaligned; method.md §2 aligns both), then both
    go through :func:`uniform_sample`, so row k of each covers the same chunk of the video.
    Returns (student rows, teacher rows, :func:`step_rows`-like spans of the source student
    steps), all unnormalised.
    """
    s = np.asarray(student, dtype=np.float32)
    t = np.asarray(teacher, dtype=np.float32)
    n = min(len(s), len(t))
    grid = step_rows(len(s), n)      # source student rows behind each common-grid row
    rows = step_rows(n, max_frames)  # common-grid rows behind each kept row
    spans = np.stack([grid[rows[:, 0], 0], grid[rows[:, 1] - 1, 1]], axis=1)
    return (uniform_sample(uniform_sample(s, n), max_frames),
            uniform_sample(uniform_sample(t, n), max_frames), spans)


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
    """Student frame features: uniform sampling to at most ``max_frames``, then L2 rows (method.md §2)."""
    return l2_normalise(uniform_sample(frames, max_frames))

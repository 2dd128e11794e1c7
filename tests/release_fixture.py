"""A tiny MS-SL release on disk (method.md §2 layout), with the raw arrays kept to check conversions.

Used by the converter tests and benchmarks: BigFile (rows stored in shuffled order, so lookups by
id.txt are exercised), RoBERTa HDF5 per caption (some with a leading dim of 1, some with more than
30 tokens), caption files, and optionally the DL-DKD CLIP HDF5 files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sharding.msssl import COLLECTIONS


@dataclass
class Release:
    root: Path
    collection: str
    frames: dict[str, np.ndarray] = field(default_factory=dict)    # vid -> (n, D) raw float32
    tokens: dict[str, np.ndarray] = field(default_factory=dict)    # cap_id -> (n_tok, Dq) raw
    captions: dict[str, list[tuple[str, str]]] = field(default_factory=dict)   # split -> lines
    clip_video: dict[str, np.ndarray] = field(default_factory=dict)
    clip_text: dict[str, np.ndarray] = field(default_factory=dict)   # cap_id -> (512,)
    missing_captions: list[str] = field(default_factory=list)      # no RoBERTa features
    frameless_videos: list[str] = field(default_factory=list)


def make_release(root, collection: str = "tvr", videos: dict[str, int] | None = None, *,
                 long_video_frames: int = 300, clip: bool = True, clip_key_enc: bool = False,
                 seed: int = 0, dims: tuple[int, int] | None = None) -> Release:
    """Write ``root/<collection>/`` with ``videos`` per split and return the raw truth.

    Every split gets one video longer than 128 frames, one caption without RoBERTa features (its
    video keeps other captions) and, in train, one video with no frames. Caption ids follow the
    collection (``<vid>#enc#<k>``, Charades ``<vid>#<k>``); the CLIP text file drops ``enc`` unless
    ``clip_key_enc``.
    """
    import h5py

    rng = np.random.default_rng(seed)
    coll = COLLECTIONS[collection]
    dv, dq = dims or (coll.video_dim, coll.query_dim)
    videos = videos or {"train": 6, "test": 4}
    rel = Release(Path(root), collection)
    base = Path(root) / collection
    feat_dir = base / "FeatureData" / coll.visual_feature
    text_dir = base / "TextData"
    feat_dir.mkdir(parents=True)
    text_dir.mkdir(parents=True)
    enc = "#" if collection == "charades" else "#enc#"
    video2frames: dict[str, list[str]] = {}
    for split, n in videos.items():
        lines = []
        for i in range(n):
            vid = f"{split[:2]}{i:03d}V" if collection == "charades" else f"v_{split}_{i:03d}"
            n_frames = long_video_frames if i == 1 else int(rng.integers(3, 40))
            if split == "train" and i == n - 1:
                video2frames[vid] = []
                rel.frameless_videos.append(vid)
            else:
                rel.frames[vid] = rng.standard_normal((n_frames, dv)).astype(np.float32) + 0.1
                video2frames[vid] = [f"{vid}_{k}" for k in range(n_frames)]
                n_clip = max(2, n_frames // 3)
                rel.clip_video[vid] = rng.standard_normal((n_clip, 512)).astype(np.float32)
            for k in range(int(rng.integers(2, 5))):
                cap_id = f"{vid}{enc}{k}"
                n_tok = 40 if k == 1 else int(rng.integers(3, 20))
                rel.tokens[cap_id] = rng.standard_normal((n_tok, dq)).astype(np.float32)
                rel.clip_text[cap_id] = rng.standard_normal(512).astype(np.float32)
                lines.append((cap_id, f"caption {k} of video {vid}"))
        rel.missing_captions.append(lines[2][0])
        rel.captions[split] = lines
        (text_dir / f"{collection}{split}.caption.txt").write_text(
            "".join(f"{c} {t}\n" for c, t in lines))

    ids = [f for v in video2frames.values() for f in v]
    order = rng.permutation(len(ids))            # rows are not stored in video order
    rows = np.concatenate([rel.frames[f.rsplit("_", 1)[0]][int(f.rsplit("_", 1)[1])][None]
                           for f in np.asarray(ids)[order]])
    rows.astype(np.float32).tofile(feat_dir / "feature.bin")
    (feat_dir / "id.txt").write_text(" ".join(np.asarray(ids)[order]))
    (feat_dir / "shape.txt").write_text(f"{len(ids)} {dv}")
    (feat_dir / "video2frames.txt").write_text(repr(video2frames))

    with h5py.File(text_dir / f"roberta_{collection}_query_feat.hdf5", "w") as h5:
        for j, (cap_id, tok) in enumerate(rel.tokens.items()):
            if cap_id in rel.missing_captions:
                continue
            h5[cap_id] = tok[None] if j % 2 else tok     # a leading 1 on every other caption
    if clip:
        with h5py.File(base / "FeatureData" / f"new_clip_vit_32_{collection}_vid_features.hdf5",
                       "w") as h5:
            for vid, emb in rel.clip_video.items():
                h5[vid] = emb
        with h5py.File(text_dir / f"clip_ViT_B_32_{collection}_query_feat.hdf5", "w") as h5:
            for cap_id, emb in rel.clip_text.items():
                h5[cap_id if clip_key_enc else cap_id.replace("#enc#", "#")] = emb[None]
    return rel

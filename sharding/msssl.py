"""Convert the MS-SL data release (method.md §2) into shards, one video with all its captions per sample.

Streams video by video: ``feature.bin`` is memory-mapped and only one video's rows are read at a
time, HDF5 datasets are read per caption, so a TVR-sized release converts in bounded memory.
Missing data never stops a run halfway: a caption without features is dropped (listed in the
manifest notes), a video without frames or without any usable caption is skipped (listed in the
manifest's ``skipped``), and the writer resumes from the last verified shard.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharding.batch import VideoSample
from sharding.preprocess import (l2_normalise, prepare_frames, prepare_tokens, resample_pair,
                                  step_rows)
from sharding.splits import CAPTIONS_DIGEST
from sharding.writer import (DEFAULT_VIDEOS_PER_SHARD, Manifest, SkipVideo, sha256_file,
                             write_split)


@dataclass(frozen=True)
class Collection:
    visual_feature: str
    video_dim: int
    query_dim: int


COLLECTIONS = {
    "tvr": Collection("i3d_resnet", 3072, 768),
    "activitynet": Collection("i3d", 1024, 1024),
    "charades": Collection("i3d_rgb_lgi", 1024, 1024),
}
SPLITS = ("train", "val", "test")


class ReleaseError(ValueError):
    """The release on disk does not have the layout method.md §2 describes."""


@dataclass(frozen=True)
class ReleasePaths:
    features: Path      # the BigFile folder
    roberta: Path
    captions: Path
    clip_video: Path    # optional (DL-DKD teacher features)
    clip_text: Path     # optional


def release_paths(root, collection: str, split: str,
                  visual_feature: str | None = None) -> ReleasePaths:
    if collection not in COLLECTIONS:
        raise ReleaseError(f"unknown collection {collection!r}; expected one of "
                           f"{sorted(COLLECTIONS)}")
    if split not in SPLITS:
        raise ReleaseError(f"unknown split {split!r}; expected one of {SPLITS}")
    base = Path(root) / collection
    feat = visual_feature or COLLECTIONS[collection].visual_feature
    return ReleasePaths(
        features=base / "FeatureData" / feat,
        roberta=base / "TextData" / f"roberta_{collection}_query_feat.hdf5",
        captions=base / "TextData" / f"{collection}{split}.caption.txt",
        clip_video=base / "FeatureData" / f"new_clip_vit_32_{collection}_vid_features.hdf5",
        clip_text=base / "TextData" / f"clip_ViT_B_32_{collection}_query_feat.hdf5")


class BigFile:
    """MS-SL's frame feature store: ``feature.bin`` (float32 rows), ``id.txt``, ``shape.txt``."""

    def __init__(self, folder: Path):
        self.folder = folder
        for name in ("feature.bin", "id.txt", "shape.txt"):
            if not (folder / name).exists():
                raise ReleaseError(f"BigFile {folder} lacks {name}: point --root at the folder "
                                   "that holds <collection>/FeatureData, or pass the feature "
                                   "folder name (--feature)")
        try:
            n, d = (int(v) for v in (folder / "shape.txt").read_text().split())
        except ValueError as e:
            raise ReleaseError(f"{folder / 'shape.txt'} must hold two integers 'N D' ({e})") from e
        ids = (folder / "id.txt").read_text().split()
        if len(ids) != n:
            raise ReleaseError(f"{folder / 'id.txt'} lists {len(ids)} frame ids but shape.txt "
                               f"says {n} rows")
        size = (folder / "feature.bin").stat().st_size
        if size != n * d * 4:
            raise ReleaseError(f"{folder / 'feature.bin'} has {size} bytes, expected {n} x {d} "
                               f"float32 = {n * d * 4} (truncated or a different shape.txt?)")
        self.dim = d
        self.row = {fid: i for i, fid in enumerate(ids)}
        self.data = np.memmap(folder / "feature.bin", dtype=np.float32, mode="r", shape=(n, d))

    def read(self, frame_ids: list[str]) -> np.ndarray:
        """(len(frame_ids), D) float32: the rows of these frames, read from the memory map."""
        missing = [f for f in frame_ids if f not in self.row]
        if missing:
            raise KeyError(f"{len(missing)} frame ids (e.g. {missing[0]!r}) are not in "
                           f"{self.folder / 'id.txt'}")
        return np.array(self.data[[self.row[f] for f in frame_ids]], dtype=np.float32)


def read_video2frames(path: Path) -> dict[str, list[str]]:
    """Parse ``video2frames.txt`` (a dict literal) safely with ``ast.literal_eval``."""
    if not path.exists():
        raise ReleaseError(f"{path} is missing: the BigFile folder needs video2frames.txt")
    try:
        d = ast.literal_eval(path.read_text())
    except (ValueError, SyntaxError) as e:
        raise ReleaseError(f"{path} is not a Python dict literal ({e})") from e
    if not isinstance(d, dict) or not all(isinstance(v, (list, tuple)) for v in d.values()):
        raise ReleaseError(f"{path} must be a dict {{video_id: [frame_id, ...]}}")
    return {str(k): [str(f) for f in v] for k, v in d.items()}


def read_captions(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``cap_id text`` lines grouped by video (``cap_id.split('#')[0]``), in file order."""
    if not path.exists():
        found = sorted(p.name for p in path.parent.glob("*.caption.txt"))
        raise ReleaseError(f"caption file {path} is missing (found: {found or 'none'})")
    videos: dict[str, list[tuple[str, str]]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            cap_id, text = parts[0], parts[1] if len(parts) > 1 else ""
            if "#" not in cap_id:
                raise ReleaseError(f"{path}:{lineno}: caption id {cap_id!r} has no '#' "
                                   "(expected <vid>#enc#<k> or <vid>#<k>)")
            videos.setdefault(cap_id.split("#")[0], []).append((cap_id, text))
    return videos


def clip_text_key(cap_id: str, h5) -> str | None:
    """The key of ``cap_id`` in the CLIP text file: as is, or with ``#enc#`` written ``#``."""
    for key in (cap_id, cap_id.replace("#enc#", "#")):
        if key in h5:
            return key
    return None


def _token_shape_ok(shape: tuple) -> bool:
    """(n_tok, Dq) or (1, n_tok, Dq) with n_tok >= 1."""
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    return len(shape) == 2 and shape[0] >= 1


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ReleaseError(f"cannot open HDF5 file {path}: {e}") from e


class _Source:
    """The open release files of one (collection, split) and the per-video loader."""

    def __init__(self, paths: ReleasePaths, clip: bool | None):
        self.paths = paths
        self.big = BigFile(paths.features)
        self.video2frames = read_video2frames(paths.features / "video2frames.txt")
        self.captions = read_captions(paths.captions)
        if not paths.roberta.exists():
            raise ReleaseError(f"RoBERTa query features {paths.roberta} are missing")
        self.roberta = _open_h5(paths.roberta)
        have_clip = paths.clip_video.exists() and paths.clip_text.exists()
        if clip and not have_clip:
            raise ReleaseError(f"CLIP teacher features were requested but {paths.clip_video} "
                               f"and/or {paths.clip_text} are missing")
        self.use_clip = have_clip if clip is None else clip
        self.clip_video = _open_h5(paths.clip_video) if self.use_clip else None
        self.clip_text = _open_h5(paths.clip_text) if self.use_clip else None
        # Decided up front (key lookups only), so the notes are complete on a resumed run too.
        self.dropped: dict[str, str] = {}
        self.kept: dict[str, list[tuple[str, str]]] = {}
        for vid, caps in self.captions.items():
            keep = []
            for cap_id, text in caps:
                if cap_id not in self.roberta:
                    self.dropped[cap_id] = f"no RoBERTa features in {paths.roberta.name}"
                elif not _token_shape_ok(self.roberta[cap_id].shape):
                    shape = self.roberta[cap_id].shape
                    self.dropped[cap_id] = f"RoBERTa features of shape {shape} in {paths.roberta.name}"
                elif self.use_clip and clip_text_key(cap_id, self.clip_text) is None:
                    self.dropped[cap_id] = f"no CLIP text features in {paths.clip_text.name}"
                else:
                    keep.append((cap_id, text))
            self.kept[vid] = keep

    def close(self) -> None:
        for h in (self.roberta, self.clip_video, self.clip_text):
            if h is not None:
                h.close()

    def dims(self) -> dict:
        dims = {"video_dim": self.big.dim}
        first = next((c for caps in self.kept.values() for c, _ in caps), None)
        if first is None:
            raise ReleaseError(f"no caption of {self.paths.captions} has RoBERTa features in "
                               f"{self.paths.roberta}")
        dims["query_dim"] = int(self.roberta[first].shape[-1])
        if self.use_clip:
            key = clip_text_key(first, self.clip_text)
            dims["teacher_dim"] = int(self.clip_text[key].shape[-1])
        return dims

    def load(self, vid: str) -> VideoSample:
        frame_ids = self.video2frames.get(vid)
        if not frame_ids:
            raise SkipVideo(f"no frames in {self.paths.features / 'video2frames.txt'}")
        caps = self.kept[vid]
        if not caps:
            raise SkipVideo(f"none of its {len(self.captions[vid])} captions has features")
        try:
            raw = self.big.read(frame_ids)
        except KeyError as e:
            raise SkipVideo(str(e.args[0])) from e
        tokens = [prepare_tokens(self.roberta[c][()]) for c, _ in caps]
        if not self.use_clip:
            return VideoSample(vid, prepare_frames(raw), tokens, [c for c, _ in caps],
                               [t for _, t in caps], n_frames_orig=len(raw),
                               step_rows=step_rows(len(raw)))
        if vid not in self.clip_video:
            raise SkipVideo(f"no CLIP frame embeddings in {self.paths.clip_video.name}")
        emb = np.asarray(self.clip_video[vid][()], np.float32)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise SkipVideo(f"CLIP frame embeddings of shape {emb.shape} in "
                            f"{self.paths.clip_video.name}")
        student, teacher, rows = resample_pair(raw, emb)
        sample = VideoSample(vid, l2_normalise(student), tokens, [c for c, _ in caps],
                             [t for _, t in caps], n_frames_orig=len(raw), step_rows=rows,
                             teacher_frame_emb=teacher)
        sample.teacher_text_emb = np.concatenate([
            np.asarray(self.clip_text[clip_text_key(c, self.clip_text)][()],
                       np.float32).reshape(1, -1) for c, _ in caps])
        return sample


def convert(root, collection: str, split: str, out, *, visual_feature: str | None = None,
            videos_per_shard: int = DEFAULT_VIDEOS_PER_SHARD, max_shard_bytes: int | None = None,
            clip: bool | None = None, progress: bool = True, overwrite: bool = False) -> Manifest:
    """Write ``out/<split>/`` shards + manifest.json from ``<root>/<collection>/`` (method.md §2).

    ``visual_feature`` overrides the BigFile folder name; ``clip`` None uses the DL-DKD CLIP HDF5
    files when both exist, True requires them, False ignores them. A folder written from other
    release files or settings is refused unless ``overwrite`` (see ``write_split``).
    """
    paths = release_paths(root, collection, split, visual_feature)
    src = _Source(paths, clip)
    try:
        dims = src.dims()
        expected = COLLECTIONS[collection]
        if visual_feature is None and (dims["video_dim"], dims["query_dim"]) != (
                expected.video_dim, expected.query_dim):
            raise ReleaseError(
                f"{collection} should have video dim {expected.video_dim} ({paths.features}) and "
                f"query dim {expected.query_dim} ({paths.roberta}), found {dims['video_dim']} and "
                f"{dims['query_dim']}; pass --feature if this is another feature")
        notes = {
            "source": "msssl", "collection": collection,
            "visual_feature": paths.features.name,
            "preprocessing": "method.md §2 as the MS-SL/DL-DKD reference: with CLIP features the "
                             "longer of the student and CLIP frame streams is first averaged to "
                             "the shorter's length; then both are averaged over the reference's "
                             "chunks to <= 128 rows (step_rows in meta.json), student rows "
                             "L2-normalised (eps 1e-5); query tokens L2-normalised, first 30 kept",
            "teacher": ("pre-extracted CLIP ViT-B/32 frame embeddings (tframes.npy, raw, averaged "
                        "over the same chunks as the student's rows, one per row) and caption "
                        "embeddings (ttext.npy); placement precomputed reads them") if src.use_clip
                       else "none: no CLIP features were converted and the release has no "
                            "frames; add frames with `dldkd shard frames` for the online "
                            "teacher",
            "dropped_captions": {"count": len(src.dropped), "ids": src.dropped},
            CAPTIONS_DIGEST: sha256_file(paths.captions),
        }
        # The feature files by size and modification time (hashing them would read a whole
        # release once more): a file rewritten since is noticed and the rerun refused.
        files = [paths.features / "feature.bin", paths.roberta]
        if src.use_clip:
            files += [paths.clip_video, paths.clip_text]
        generator = {"source": "msssl", "collection": collection, "clip": src.use_clip,
                     "visual_feature": paths.features.name, "captions": notes[CAPTIONS_DIGEST],
                     "bytes": {f.name: f.stat().st_size for f in files},
                     "mtime_ns": {f.name: f.stat().st_mtime_ns for f in files}}
        return write_split(Path(out) / split, split, list(src.captions), src.load,
                           videos_per_shard=videos_per_shard, max_shard_bytes=max_shard_bytes,
                           dims=dims, notes=notes, progress=progress, generator=generator,
                           overwrite=overwrite)
    finally:
        src.close()

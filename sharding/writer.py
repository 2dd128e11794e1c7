"""Write one split as tar shards + manifest.json, resumable and verified by sha256.

The caller streams video ids and a ``load(id) -> VideoSample`` that does the preprocessing; a
video that cannot be built raises ``SkipVideo(reason)`` and is counted, never fatal. A progress
record (``.progress-<split>.json``) lists finished shards with their checksum and the digest of
the ids they consumed, so a rerun skips them without calling ``load`` and rewrites from the first
shard that is missing, truncated, corrupt or was cut from different ids. The ``generator`` (what
``load`` depends on besides the id: its config and seed) is recorded in the progress record and
the manifest; a folder written by another generator is refused (``overwrite=True`` rewrites the
whole split), so one split never mixes shards of two datasets.

A split holds videos (``VideoSample``, the training data) or image-text pairs (``ImageText``, a
teacher's pretraining data); its manifest says which (``kind``). Every tar shard of dldkd is
written by ``shard_tar``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from webdataset import TarWriter

from sharding.batch import VideoSample
from sharding.files import atomic_path, write_atomic
from sharding.schema import SCHEMA_VERSION, ImageText, encode_image_text, encode_sample

MANIFEST = "manifest.json"
DEFAULT_VIDEOS_PER_SHARD = 500
VIDEO_TEXT, IMAGE_TEXT = "video-text", "image-text"   # a split's kind of sample


class SkipVideo(Exception):
    """Raised by a ``load`` callable: this video cannot be written (the reason is recorded)."""


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or written for another schema version or kind of split;
    or a folder holds shards of another generator."""


@dataclass
class ShardInfo:
    name: str
    sha256: str
    videos: int
    captions: int
    bytes: int


@dataclass
class Manifest:
    split: str
    shards: list[ShardInfo]
    dims: dict
    skipped: dict = field(default_factory=lambda: {"count": 0, "ids": {}})
    notes: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    totals: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)   # the config and seed that made the shards
    kind: str = VIDEO_TEXT
    base: str = ""   # where the manifest was read from (not written)

    def __post_init__(self):
        self.totals = {"shards": len(self.shards), "videos": sum(s.videos for s in self.shards),
                       "captions": sum(s.captions for s in self.shards),
                       "bytes": sum(s.bytes for s in self.shards)}

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("base")
        return json.dumps(d, indent=1, sort_keys=True)

    def urls(self) -> list[str]:
        """Shard locations next to the manifest (paths or URLs, as the manifest was read)."""
        return [f"{self.base.rstrip('/')}/{s.name}" if self.base else s.name for s in self.shards]


def sha256_file(path: str | Path) -> str:
    """Streaming sha256 of a file (shards, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


@contextlib.contextmanager
def shard_tar(path: str | Path) -> Iterator[TarWriter]:
    """A WebDataset ``TarWriter`` onto ``path``: the shard appears whole or not at all
    (``atomic_path``). Members are bytes only (``encoder=False``: nothing is ever pickled), in
    sorted order per sample, with mtime 0 and no owner, so the same samples give the same bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            TarWriter(f, encoder=False, mtime=0, user="", group="") as tar:
        yield tar


class _ShardBuffer:
    """Encoded samples of the shard being built (written in one go when the shard is full)."""

    def __init__(self):
        self.ids: list[str] = []          # every id consumed, skipped ones included
        self.samples: list[dict] = []
        self.videos = self.captions = 0
        self.bytes = 0

    def add(self, encoded: dict, videos: int, captions: int) -> None:
        self.samples.append(encoded)
        self.videos += videos
        self.captions += captions
        self.bytes += sum(len(v) + 512 for k, v in encoded.items() if not k.startswith("__"))

    def write(self, path: Path) -> ShardInfo:
        with shard_tar(path) as tar:
            for s in self.samples:
                tar.write(s)
        return ShardInfo(path.name, sha256_file(path), self.videos, self.captions,
                         path.stat().st_size)


def _encode(sample: VideoSample | ImageText, kind: str, dims: dict) -> tuple[dict, int, int]:
    """(WebDataset sample dict, videos, captions) of one loaded sample of a ``kind`` split."""
    if kind == IMAGE_TEXT:
        size = dims["image_size"]
        if not isinstance(sample, ImageText) or sample.image.shape != (size, size, 3):
            raise ValueError(f"an image-text split of image_size {size} takes ImageText samples "
                             f"of (size, size, 3) pixels, got {sample!r:.80}")
        return encode_image_text(sample), 0, 1
    _check_dims(sample, dims)
    return encode_sample(sample), 1, len(sample.cap_ids)


def _check_dims(s: VideoSample, dims: dict) -> None:
    found = {"video_dim": s.frames.shape[1], "query_dim": s.tokens[0].shape[-1]}
    if s.teacher_frame_emb is not None:
        found["teacher_dim"] = s.teacher_frame_emb.shape[1]
    if s.teacher_text_emb is not None:
        found["teacher_dim"] = s.teacher_text_emb.shape[1]
    for k, v in found.items():
        if k in dims and dims[k] != v:
            raise ValueError(f"video {s.video_id!r}: {k} is {v} but the split declares "
                             f"dims[{k!r}] = {dims[k]}; all videos of a split share one dim")


def write_split(out_dir, split: str, items: Iterable[str],
                load: Callable[[str], VideoSample | ImageText], *,
                videos_per_shard: int = DEFAULT_VIDEOS_PER_SHARD, max_shard_bytes: int | None = None,
                dims: dict, notes: dict | None = None, progress: bool = True,
                generator: dict | None = None, overwrite: bool = False,
                kind: str = VIDEO_TEXT) -> Manifest:
    """Stream ``items`` through ``load`` into ``<split>-NNNNNN.tar`` shards and a manifest.

    A shard closes at ``videos_per_shard`` samples (videos, or pairs of an ``IMAGE_TEXT`` split)
    or once it holds ``max_shard_bytes`` (whichever comes first). One directory holds one split:
    its ``manifest.json`` describes that split. ``generator`` (JSON-able: config, seed) must
    match the one recorded in ``out_dir`` for its shards to be reused; otherwise
    ``ManifestError``, or with ``overwrite`` a rewrite of the split.
    """
    if videos_per_shard < 1:
        raise ValueError(f"videos_per_shard must be >= 1, got {videos_per_shard}")
    if not split or "/" in split or "-" in split:
        raise ValueError(f"split name {split!r} must be non-empty without '/' or '-'")
    if kind not in (VIDEO_TEXT, IMAGE_TEXT):
        raise ValueError(f"kind {kind!r} must be {VIDEO_TEXT!r} or {IMAGE_TEXT!r}")
    for k in ("video_dim", "query_dim") if kind == VIDEO_TEXT else ("image_size",):
        if not isinstance(dims.get(k), int):
            raise ValueError(f"dims must give an integer {k!r}, got {dims!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("split") != split:
            raise ValueError(f"{manifest_path} describes split {old.get('split')!r}, not {split!r}:"
                             f" write each split to its own directory (e.g. {out / split})")
    progress_path = out / f".progress-{split}.json"
    generator = json.loads(json.dumps(generator or {}))   # tuples as lists, as read back
    check_generator(out, split, generator, overwrite, progress_path)
    done: list[dict] = []
    if progress_path.exists():
        record = json.loads(progress_path.read_text())
        if (record.get("schema_version") == SCHEMA_VERSION and record.get("dims") == dims
                and record.get("generator", {}) == generator):
            done = record["shards"]

    bar = _progress_bar(items, split, progress, "video" if kind == VIDEO_TEXT else "pair")
    it = iter(items)
    shards: list[ShardInfo] = []
    skipped: dict[str, str] = {}
    kept: list[dict] = []
    last_ids: list[str] = []   # ids consumed by the last finished shard
    # Resume: keep the leading shards that verify, consuming their ids without loading them.
    for rec in done:
        ids = _take(it, rec["n_items"])
        path = out / rec["info"]["name"]
        if (len(ids) != rec["n_items"] or _ids_digest(ids) != rec["ids_digest"]
                or not path.exists() or sha256_file(path) != rec["info"]["sha256"]):
            it = _chain(ids, it)
            break
        kept.append(rec)
        last_ids = ids
        shards.append(ShardInfo(**rec["info"]))
        skipped.update(rec["skipped"])
        bar.update(len(ids))

    def save_progress():
        write_atomic(progress_path, json.dumps(
            {"schema_version": SCHEMA_VERSION, "dims": dims, "generator": generator,
             "shards": kept}).encode())

    save_progress()
    buf = _ShardBuffer()
    shard_skips: dict[str, str] = {}

    def flush():
        nonlocal buf, shard_skips, last_ids
        info = buf.write(out / f"{split}-{len(shards):06d}.tar")
        shards.append(info)
        kept.append({"info": asdict(info), "n_items": len(buf.ids),
                     "ids_digest": _ids_digest(buf.ids), "skipped": shard_skips})
        save_progress()
        last_ids = buf.ids
        buf, shard_skips = _ShardBuffer(), {}

    for vid in it:
        buf.ids.append(vid)
        bar.update(1)
        try:
            sample = load(vid)
        except SkipVideo as e:
            shard_skips[vid] = skipped[vid] = str(e) or "skipped"
            bar.set_postfix(skipped=len(skipped))
            continue
        buf.add(*_encode(sample, kind, dims))
        if len(buf.samples) >= videos_per_shard or (max_shard_bytes and buf.bytes >= max_shard_bytes):
            flush()
    if buf.samples:
        flush()
    elif buf.ids and kept:   # trailing skipped ids belong to the last shard's record
        last_ids = last_ids + buf.ids
        kept[-1]["n_items"] = len(last_ids)
        kept[-1]["ids_digest"] = _ids_digest(last_ids)
        kept[-1]["skipped"].update(shard_skips)
        save_progress()
    bar.close()
    _remove_stale(out, split, {s.name for s in shards})
    manifest = Manifest(split=split, shards=shards, dims=dict(dims), notes=dict(notes or {}),
                        skipped={"count": len(skipped), "ids": skipped}, generator=generator,
                        kind=kind)
    if not shards:
        raise ValueError(f"split {split!r}: no sample could be written ({len(skipped)} skipped, "
                         f"e.g. {next(iter(skipped.items()), None)})")
    write_atomic(manifest_path, manifest.to_json().encode())
    manifest.base = str(out)
    return manifest


def check_generator(out: Path, split: str, generator: dict, overwrite: bool,
                    progress_path: Path) -> None:
    """Refuse to add to (or resume) shards that another generator wrote, naming what differs;
    the writer's progress record (``progress_path``) speaks first, then the manifest."""
    recorded = None
    for path in (progress_path, out / MANIFEST):
        if path.exists():
            try:
                recorded = json.loads(path.read_text()).get("generator", {})
            except (ValueError, AttributeError):
                continue   # unreadable: nothing to reuse from it
            break
    if recorded is None or recorded == generator or overwrite:
        return
    diffs = [f"{k}: {a!r} on disk, {b!r} now" for k, (a, b) in _differences(recorded, generator)]
    raise ManifestError(
        f"{out} already holds split {split!r} made with other settings ({'; '.join(diffs)}); "
        "reusing its shards would mix two datasets. Write to a new folder (--out), or rewrite "
        "this one with --overwrite (overwrite=True)")


def _differences(old, new, prefix: str = "") -> list[tuple[str, tuple]]:
    """Dotted keys whose values differ between two nested dicts (``<none>`` where absent)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [(prefix or "generator", (old, new))]
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}.{key}" if prefix else str(key)
        out += _differences(old.get(key, "<none>"), new.get(key, "<none>"), name)
    return out


def _take(it: Iterator[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _remove_stale(out: Path, split: str, keep: set[str]) -> None:
    """Delete shards of this split left by an earlier, longer run (a glob would pick them up)."""
    for p in out.glob(f"{split}-*.tar*"):
        if p.name not in keep:
            p.unlink()


def _progress_bar(items, split: str, enabled: bool, unit: str):
    from tqdm import tqdm

    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(total=total, desc=f"shard {split}", unit=unit, disable=not enabled)


def load_manifest(path_or_url: str | os.PathLike, kind: str | None = VIDEO_TEXT) -> Manifest:
    """Read a manifest from a directory, a manifest.json path, or an fsspec URL (file/http/s3).

    ``kind`` (None: any) is the kind of split the caller reads: a pretraining folder given as
    training data, or the reverse, is refused by name.
    """
    loc = str(path_or_url)
    if not loc.endswith(".json"):
        loc = loc.rstrip("/") + "/" + MANIFEST
    try:
        if "://" in loc:
            import fsspec

            with fsspec.open(loc, "rb") as f:
                raw = f.read()
        else:
            raw = Path(loc).read_bytes()
    except FileNotFoundError as e:
        hint = {VIDEO_TEXT: " or point data.train/val/test at the directory that holds it",
                IMAGE_TEXT: " or give --shards the pretraining folder that holds it"}.get(kind, "")
        raise ManifestError(f"no shard manifest at {loc}: write the split with `dldkd shard ...`"
                            f"{hint}") from e
    except OSError as e:
        raise ManifestError(f"cannot read the shard manifest {loc}: {e}") from e
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise ManifestError(f"shard manifest {loc} is not valid JSON ({e})") from e
    version = d.get("schema_version") if isinstance(d, dict) else None
    if version != SCHEMA_VERSION:
        raise ManifestError(f"shard manifest {loc} has schema_version {version!r}; this code reads "
                            f"version {SCHEMA_VERSION}: rewrite the shards with this version")
    try:
        m = Manifest(split=d["split"], shards=[ShardInfo(**s) for s in d["shards"]],
                     dims=d["dims"], skipped=d.get("skipped", {"count": 0, "ids": {}}),
                     notes=d.get("notes", {}), generator=d.get("generator", {}),
                     kind=d.get("kind", VIDEO_TEXT))
    except (KeyError, TypeError) as e:
        raise ManifestError(f"shard manifest {loc} is incomplete ({e!r})") from e
    if kind is not None and m.kind != kind:
        raise ManifestError(f"shard manifest {loc} describes {m.kind} shards, not {kind} ones: "
                            "video splits are training data (data.train/val/test), image-text "
                            "splits pretrain a teacher (dldkd teacher pretrain --shards)")
    m.base = loc.rsplit("/", 1)[0] if "/" in loc else "."
    return m

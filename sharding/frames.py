"""``dldkd shard frames``: add teacher frames, decoded from the raw videos, to a written split.

The split is rewritten into a new folder: each output shard holds the source shard's samples,
every member kept, plus ``f000.jpg..`` (one frame per student feature step, at the centre of the
step's time span). Keeping frames in the same sample as the features, rather than in side shards
joined by key, keeps the reader unchanged and every sample whole (the reader shuffles and splits
by shard, which a join across two shard sets would have to repeat in lockstep); the source
shards are never modified.

Videos are decoded in worker processes, a bounded number of videos in flight. Each output shard
is streamed through ``shard_tar`` (atomic: whole or absent) and recorded in
``.progress-frames.json`` with the video files it read (path, size, mtime; or none found); a
rerun with the same options and source keeps every recorded shard whose source and output still
verify and whose video files are unchanged (a video added since, or replaced, reprocesses its
shard), and other options or another source are refused (the manifest's ``generator``) unless
``overwrite``.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import tarfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from sharding.files import write_atomic
from sharding.images import JPEG_QUALITY
from sharding.preprocess import step_rows
from sharding.schema import FRAMES, META, STEPS
from sharding.video import PROBLEMS, FrameJob, extract, find_video, index_videos
from sharding.writer import (MANIFEST, Manifest, ShardInfo, _remove_stale, check_generator,
                             load_manifest, sha256_file, shard_tar)

PROGRESS = ".progress-frames.json"
DEFAULT_SIZE = 224   # ViT-B/32's input; configs/teacher-tiny.json takes 32
_JPEG = re.compile(r"f\d{3,}\.jpg")


def add_frames(shards, videos, out, *, size: int = DEFAULT_SIZE, quality: int = JPEG_QUALITY,
               seconds_per_step: float | None = None, workers: int | None = None,
               progress: bool = True, overwrite: bool = False) -> Manifest:
    """Write ``out/`` = the split in ``shards/`` with frames from the files under ``videos/``.

    By default a video's feature steps are spread evenly over its duration; with
    ``seconds_per_step`` step i covers [i s, (i + 1) s). Videos that are missing, unreadable or
    too short are left out of the output and listed in its manifest's ``skipped``. An ``out``
    written with other options or from another source is refused unless ``overwrite``.
    """
    src_dir, out_dir = Path(shards), Path(out)
    if "://" in str(shards) or "://" in str(out):
        raise ValueError(f"--shards {shards}: dldkd shard frames reads the source split from a "
                         "local folder; copy it here first (e.g. `aws s3 sync`). --out may be "
                         "an s3:// URL")
    if src_dir.resolve() == out_dir.resolve():
        raise ValueError(f"--out {out} must differ from --shards {shards}: the source shards are "
                         "read while the new ones are written (and stay as they are)")
    if not 16 <= size <= 1024:
        raise ValueError(f"--size {size}: the teacher's input size in pixels, 16..1024 (224 for "
                         "ViT-B-32)")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality}: JPEG quality must be 1..100")
    if seconds_per_step is not None and seconds_per_step <= 0:
        raise ValueError(f"--seconds-per-step {seconds_per_step} must be > 0")
    src = load_manifest(src_dir)
    index = index_videos(videos)
    if not index:
        raise ValueError(f"--videos {videos}: no .mp4/.mkv/.webm/.avi files found under it")
    options = {"size": size, "quality": quality, "seconds_per_step": seconds_per_step,
               "videos": str(Path(videos).resolve())}
    generator = {"frames": options, "source": src.generator}
    out_dir.mkdir(parents=True, exist_ok=True)
    check_generator(out_dir, src.split, generator, overwrite, out_dir / PROGRESS)
    record = {} if overwrite else _read_progress(out_dir / PROGRESS, generator)

    from tqdm import tqdm

    bar = tqdm(total=src.totals["videos"], desc=f"frames {src.split}", unit="video",
               disable=not progress)
    done, todo = {}, []
    for shard in src.shards:
        rec = record.get(shard.name)
        if rec and rec["source_sha256"] == shard.sha256 and _output_ok(out_dir, rec) \
                and rec.get("videos") == _video_files(rec.get("videos") or {}, index):
            done[shard.name] = rec
            bar.update(shard.videos)
        else:
            todo.append(shard)

    def save():
        write_atomic(out_dir / PROGRESS,
                     json.dumps({"generator": generator, "shards": done}).encode())

    save()
    jobs = _jobs(src_dir, todo, index, size, quality, seconds_per_step)
    for shard, results in itertools.groupby(_run(jobs, workers), key=lambda r: r[0]):
        done[shard.name] = _write_shard(out_dir / shard.name, shard, results, bar, index)
        save()
    bar.close()
    return _finish(src, out_dir, done, generator)


def _read_progress(path: Path, generator: dict) -> dict:
    if not path.exists():
        return {}
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return {}
    return rec.get("shards", {}) if rec.get("generator") == generator else {}


def _output_ok(out_dir: Path, rec: dict) -> bool:
    info = rec["info"]
    if info is None:   # every video of that shard was skipped: nothing was written
        return True
    path = out_dir / info["name"]
    return path.exists() and sha256_file(path) == info["sha256"]


def _samples(path: Path) -> Iterator[tuple[str, dict]]:
    """(key, {member: bytes}) of each sample of a local shard, in tar order."""
    with tarfile.open(path, "r:") as tar:
        key, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            k, _, name = m.name.partition(".")
            if k != key and members:
                yield key, members
                members = {}
            key = k
            members[name] = tar.extractfile(m).read()
        if members:
            yield key, members


def _jobs(src_dir: Path, shards: list[ShardInfo], index: dict, size: int, quality: int,
          seconds_per_step: float | None):
    for shard in shards:
        path = src_dir / shard.name
        if not path.exists():
            raise FileNotFoundError(f"shard {path} is listed in {src_dir / MANIFEST} but missing")
        for key, members in _samples(path):
            if META not in members or FRAMES not in members:
                raise ValueError(f"shard {path}: sample {key!r} lacks {META} or {FRAMES}; "
                                 "rewrite the split with `dldkd shard msssl`")
            meta = json.loads(members[META])
            n = np.load(io.BytesIO(members[FRAMES]), allow_pickle=False).shape[0]
            n_orig = int(meta.get("n_frames_orig") or n)
            rows = (np.load(io.BytesIO(members[STEPS]), allow_pickle=False) if STEPS in members
                    else step_rows(n_orig))
            if len(rows) != n:
                raise ValueError(f"shard {path}: video {meta['video_id']!r} has {n} feature rows "
                                 f"but {len(rows)} step spans; rewrite the split with `dldkd "
                                 "shard msssl`")
            kept = {k: v for k, v in members.items() if not _JPEG.fullmatch(k)}
            kept["__key__"] = key
            job = FrameJob(meta["video_id"], find_video(index, meta["video_id"]),
                           tuple(float(c) for c in rows.mean(axis=1)), n_orig, seconds_per_step,
                           size, quality)
            yield shard, kept, job


def _run(jobs, workers: int | None):
    """(shard, members, video id, jpegs, problem) per job, in job order, at most 2 x workers
    videos in flight."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        for shard, members, job in jobs:
            yield (shard, members, *extract(job))
        return
    import multiprocessing

    # spawn: decoder processes start clean (no torch, no inherited threads).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for shard, members, job in jobs:
            pending.append((shard, members, pool.submit(extract, job)))
            if len(pending) >= 2 * workers:
                shard_, members_, fut = pending.popleft()
                yield (shard_, members_, *fut.result())
        while pending:
            shard_, members_, fut = pending.popleft()
            yield (shard_, members_, *fut.result())


def _video_files(ids, index: dict) -> dict:
    """{video id: [file, bytes, mtime_ns] or None when no file is found}: what a shard's frames
    were decoded from, to notice a video added or replaced since."""
    out = {}
    for vid in ids:
        path = find_video(index, vid)
        if path is None:
            out[vid] = None
            continue
        st = os.stat(path)
        out[vid] = [str(path), st.st_size, st.st_mtime_ns]
    return out


def _write_shard(path: Path, source: ShardInfo, results, bar, index: dict) -> dict:
    """Stream the output shard of ``source`` from its videos' results (shard, members, video id,
    jpegs, problem); returns its progress record. A shard whose every video was skipped is not
    kept (``info`` None)."""
    problems: dict[str, str] = {}
    ids: list[str] = []
    videos = captions = 0
    with shard_tar(path) as tar:
        for _, members, vid, jpegs, problem in results:
            bar.update(1)
            ids.append(vid)
            if problem:
                problems[vid] = problem
                bar.set_postfix(skipped=len(problems))
                continue
            tar.write({**members, **{f"f{i:03d}.jpg": data for i, data in enumerate(jpegs)}})
            videos += 1
            captions += len(json.loads(members[META])["cap_ids"])
    info = None
    if videos:
        info = asdict(ShardInfo(path.name, sha256_file(path), videos, captions,
                                path.stat().st_size))
    else:
        path.unlink()
    return {"source_sha256": source.sha256, "info": info, "problems": problems,
            "videos": _video_files(ids, index)}


def _finish(src: Manifest, out_dir: Path, done: dict, generator: dict) -> Manifest:
    shards = [ShardInfo(**done[s.name]["info"]) for s in src.shards if done[s.name]["info"]]
    problems = {vid: why for s in src.shards for vid, why in done[s.name]["problems"].items()}
    if not shards:
        raise ValueError(f"no video of {src.base} got its frames ({len(problems)} skipped, e.g. "
                         f"{next(iter(problems.items()), None)})")
    _remove_stale(out_dir, src.split, {s.name for s in shards})
    counts = {kind: sum(why.startswith(kind) for why in problems.values()) for kind in PROBLEMS}
    options = generator["frames"]
    notes = dict(src.notes)
    notes["frames"] = {**options, "source": str(src.base),
                       "timing": ("feature steps spread evenly over each video"
                                  if options["seconds_per_step"] is None else
                                  f"{options['seconds_per_step']:g} s per feature step"),
                       "frame": "one per student feature step, at the centre of its time span",
                       "skipped": counts}
    skipped = dict(src.skipped.get("ids", {}))
    skipped.update({vid: f"frames: {why}" for vid, why in problems.items()})
    manifest = Manifest(split=src.split, shards=shards, dims={**src.dims, "image_size":
                                                                 options["size"]},
                        skipped={"count": len(skipped), "ids": skipped}, notes=notes,
                        generator=generator)
    write_atomic(out_dir / MANIFEST, manifest.to_json().encode())
    manifest.base = str(out_dir)
    return manifest

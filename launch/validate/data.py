"""``dldkd validate``: the splits' manifests and shards, and what the run asks of them.

Each split's manifest must load and fit the model; every shard it lists must be there with its
size, and a local one with its sha256 and schema members only. Samples are decoded with the
training reader's decoder and finiteness checks (``sharding.schema.decode_sample`` then
``sharding.batch.collate``): the first and last sample of every shard by default, all of them
with ``--deep`` (which also hashes remote shards).
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from launch.validate.memory import teacher_use
from launch.validate.result import FAIL, OK, WARN, Check
from sharding.writer import Manifest, ManifestError
from trainer.config import Config
from trainer.infra.storage import is_remote

SPLITS = ("train", "val", "test")


def check_split(cfg: Config, split: str) -> tuple[Check, Manifest | None]:
    """The split's manifest exists, reads, and matches the model's dims and the schema."""
    from sharding.reader import check_manifest, resolve_source

    key = f"data.{split}"
    source = getattr(cfg.data, split)
    if not source:
        if split == "train":
            return Check(key, FAIL, "data.train is empty: point it at a shard folder"), None
        if split == "val":
            return Check(key, WARN, "data.val is empty: no evaluation, no best checkpoint and no "
                         "early stopping"), None
        return Check(key, OK, "not set"), None
    try:
        urls, manifest = resolve_source(source)
    except ImportError as err:
        return Check(key, FAIL, f"{key}={source!r}: {err}; install the filesystem package "
                     "(s3: pip install s3fs, a dldkd dependency)"), None
    except (ManifestError, ValueError, OSError) as err:
        return Check(key, FAIL, f"{key}={source!r}: {err}"), None
    if manifest is None:
        return Check(key, WARN, f"{key}={source!r}: {len(urls)} shard URLs without a manifest; "
                     "dims and counts are not checked"), None
    try:
        check_manifest(manifest, cfg.model.video_dim, cfg.model.query_dim)
    except ManifestError as err:
        return Check(key, FAIL, f"{key}: {err}"), manifest
    if manifest.split != split and not (split == "val" and manifest.split == "test"):
        return Check(key, WARN, f"{key}={source!r} holds split {manifest.split!r}, not {split!r}: "
                     "is it the intended folder?"), manifest
    t = manifest.totals
    return Check(key, OK, f"{t['shards']} shards, {t['videos']} videos, {t['captions']} captions, "
                 f"dims {manifest.dims}"), manifest


def check_shard_files(cfg: Config, split: str, manifest: Manifest, deep: bool = False) -> Check:
    """Every shard the manifest lists is there with its recorded size; a local one (any one with
    ``deep``) also has its sha256 and only schema members (tar headers, no pickles), and its
    samples decode as training decodes them: data the reader would skip as damaged, or refuse,
    fails here before a cluster is touched."""
    key = f"data.{split} shards"
    frames = cfg.uses_teacher() and cfg.teacher.placement != "precomputed"
    problems = []
    for info, url in zip(manifest.shards, manifest.urls()):
        problem = _shard_problem(info, url, deep, frames, cfg.model.max_words)
        if problem:
            problems.append(f"{info.name} {problem}")
    where = manifest.base or "the manifest's folder"
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        return Check(key, FAIL, f"{len(problems)} of {len(manifest.shards)} shards in {where} are "
                     f"damaged: {'; '.join(problems[:5])}{more}. Rerun the `dldkd shard` command "
                     "that wrote them (it rewrites missing or damaged shards), or restore them")
    local = all(_local_shard(u) is not None for u in manifest.urls())
    hashed = "sha256 as in the manifest, schema members only" if local or deep else \
        "as in the manifest (sha256 checked for local shards, or with --deep)"
    decoded = "every sample decodes" if deep else "first and last samples decode (--deep: all)"
    return Check(key, OK, f"{len(manifest.shards)} shards in {where}: present, sizes and {hashed}"
                 f"; {decoded}, finite")


def _local_shard(url: str) -> Path | None:
    return None if is_remote(url) else Path(url.removeprefix("file://"))


def _shard_problem(info, url: str, deep: bool, frames: bool, max_words: int) -> str | None:
    """Why the shard at ``url`` is not the one the manifest describes, or None. Its bytes are read
    once: the sha256 is computed while its tar headers are indexed (``sharding.epochs``)."""
    from sharding.epochs import index_shard
    from sharding.integrity import ShardHashError
    from sharding.schema import ShardError

    path = _local_shard(url)
    if path is None:   # remote: by default no hash (it would download the whole split)
        import fsspec

        try:
            size = fsspec.core.url_to_fs(url)[0].info(url)["size"]
        except FileNotFoundError:
            return "is listed in the manifest but missing"
        except Exception as err:  # noqa: BLE001  (credentials, network alike)
            return f"cannot be read ({type(err).__name__}: {err})"
    elif not path.is_file():
        return "is listed in the manifest but missing"
    else:
        size = path.stat().st_size
    if size != info.bytes:
        return f"has {size} bytes, the manifest {info.bytes} (truncated or replaced)"
    try:
        refs = index_shard(url, None if path is None else str(path),
                           info.sha256 if path is not None or deep else None)
    except ShardHashError:
        return "has another sha256 than the manifest (corrupt or replaced)"
    except ShardError as err:    # UnsafeMemberError included: a pickle is never read
        return f"is refused by the reader: {err}"
    except (tarfile.TarError, OSError) as err:
        return f"is not a readable tar file ({err})"
    if len(refs) != info.videos:
        return f"holds {len(refs)} samples, the manifest {info.videos}"
    return _decode_problem(refs if deep else refs[:1] + refs[1:][-1:], frames, max_words)


def _decode_problem(refs, frames: bool, max_words: int) -> str | None:
    """The first of ``refs`` that training would skip or refuse, decoded and collated by the
    training code (schema, shapes, pickles refused, NaN/inf refused), or None."""
    from sharding.batch import Buffers, collate
    from sharding.epochs import SampleFiles
    from sharding.integrity import DAMAGE
    from sharding.schema import decode_sample
    from sharding.sources import local_path

    files, buffers = SampleFiles(local_path), Buffers()
    try:
        for ref in refs:
            try:
                collate([decode_sample(files.read(ref), ref.url, teacher_frames=frames)],
                        max_words, buffers)
            except DAMAGE as err:   # UnsafeMemberError too: a ShardError
                return f"has a sample training cannot use ({ref.key!r}): {err}"
    finally:
        files.close()
    return None


def check_teacher_inputs(cfg: Config, train: Manifest) -> Check:
    """The train shards carry what the teacher placement reads: frames for the online teacher,
    pre-extracted CLIP embeddings for ``precomputed``; if not, FAIL with the command that adds
    them."""
    if not cfg.uses_teacher():
        return Check("teacher inputs", OK, teacher_use(cfg))
    dims, placement = train.dims, cfg.teacher.placement
    if placement == "precomputed":
        if "teacher_dim" not in dims:
            return Check("teacher inputs", FAIL, (
                f"teacher.placement='precomputed' reads pre-extracted CLIP embeddings, but "
                f"data.train={cfg.data.train!r} has none (no dims.teacher_dim in its manifest). "
                "Convert the split again with the release's CLIP files in place "
                "(<root>/<collection>/FeatureData/new_clip_vit_32_<collection>_vid_features.hdf5 "
                "and TextData/clip_ViT_B_32_<collection>_query_feat.hdf5): `dldkd shard msssl "
                "--root ROOT --collection COLLECTION --split train --out OUT`; or run the online "
                "teacher on frames (configs/<collection>-online.yaml)"))
        return Check("teacher inputs", OK, f"precomputed embeddings, teacher_dim="
                     f"{dims['teacher_dim']}")
    if "image_size" not in dims:
        also = (" (they hold pre-extracted CLIP embeddings, which teacher.placement=precomputed "
                "reads)" if "teacher_dim" in dims else "")
        return Check("teacher inputs", FAIL, (
            f"teacher.placement={placement!r} runs CLIP on video frames, but data.train="
            f"{cfg.data.train!r} has none (no dims.image_size in its manifest){also}. Add them "
            f"from the raw videos: `dldkd shard frames --videos VIDEO_DIR --shards "
            f"{cfg.data.train} --out NEW_DIR`, then set data.train=NEW_DIR; or use "
            "teacher.placement=precomputed"))
    return Check("teacher inputs", OK, f"online teacher on frames of {dims['image_size']} px")


def check_val_split(cfg: Config) -> Check:
    """Model selection on the test split is allowed (the reference may do it) but never silent."""
    from sharding.splits import val_is_test
    from trainer.infra.tags import VAL_IS_TEST_TAG

    note = val_is_test(cfg.data.val, cfg.data.test)
    if note:
        return Check("val vs test", WARN, f"{note}; the run logs this and tags it in MLflow "
                     f"({VAL_IS_TEST_TAG})")
    return Check("val vs test", OK, "data.val is not the test split" if cfg.data.val else
                 "no data.val")


def check_split_size(cfg: Config, train: Manifest) -> Check:
    b, n = cfg.data.batch_videos, cfg.dist.num_workers
    videos = train.totals["videos"]
    if videos < b:
        return Check("split size", FAIL, f"data.batch_videos={b} > the {videos} videos of "
                     f"{cfg.data.train}: a batch would repeat videos (a video as its own negative);"
                     f" set data.batch_videos <= {videos}")
    if videos // n < b:
        return Check("split size", WARN, f"{videos} train videos / {n} workers = {videos // n} per "
                     f"rank < data.batch_videos={b}: one epoch is less than one batch per rank")
    return Check("split size", OK, f"{videos} train videos, {videos // n} per rank, batches of {b}")


def check_data_mode(cfg: Config, train: Manifest) -> Check:
    """Resident (decoded once, batched from memory) or streamed, and why (data.resident)."""
    from sharding.reader import resident_plan

    try:
        resident, why = resident_plan(
            train, mode=cfg.data.resident, max_mb=cfg.data.resident_max_mb,
            true_epochs=cfg.data.true_epochs,
            teacher_frames=cfg.uses_teacher() and cfg.teacher.placement != "precomputed")
    except ValueError as e:
        return Check("data mode", FAIL, str(e))
    return Check("data mode", OK, f"train split {why}")


def check_readers(cfg: Config, train: Manifest) -> Check:
    """Exact reading splits shards over ranks x loader workers: each needs at least one."""
    n, lw = cfg.dist.num_workers, max(cfg.data.loader_workers, 1)
    shards = len(train.shards)
    if cfg.data.true_epochs:
        return Check("readers", OK, f"{shards} train shards; true epochs read videos by offset, "
                     "so any shard count serves any number of readers")
    if not cfg.data.resampled and shards < n * lw:
        return Check("readers", FAIL, f"data.resampled=false needs at least dist.num_workers x "
                     f"data.loader_workers = {n} x {lw} = {n * lw} shards in {cfg.data.train}, "
                     f"found {shards}: reshard with fewer videos per shard, lower "
                     "data.loader_workers, or use data.resampled=true")
    mode = "resampled" if cfg.data.resampled else "exact"
    return Check("readers", OK, f"{shards} train shards for {n} x {lw} readers ({mode})")

"""``dldkd validate``: everything that can be checked before a cluster is touched.

Each check is a small function returning one named :class:`Check` (launch/validate_report.py).
:func:`validate_run` runs them in order and adds a per-worker memory estimate
(launch/validate_memory.py). With ``offline=True`` the checks that read the shards or touch
storage and tracking are skipped: the config alone is checked.
"""
from __future__ import annotations

import math
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from launch.validate.memory import (DEFAULT_QUERIES_PER_VIDEO, estimate_memory, meta_teacher,
                                    size_text, teacher_use)
from launch.validate.result import FAIL, OK, WARN, Check, Report
from sharding.writer import Manifest, ManifestError
from trainer.config import Config, ConfigError, load_config
from trainer.infra.storage import is_remote

SPLITS = ("train", "val", "test")
HEALTH_TIMEOUT_S = 3.0
PROBE_PREFIX = ".dldkd-validate-"
HF_WEIGHT_FILES = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


# -- config and batch arithmetic -------------------------------------------------------------------
def check_config(path: str | None, overrides: list[str] | dict | None
                 ) -> tuple[Check, Config | None]:
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:   # YAML syntax errors included, with the file and line
        return Check("config", FAIL, str(err)), None
    return Check("config", OK, f"{path or 'defaults'}: types, choices and ranges valid"), cfg


def check_batch(cfg: Config) -> Check:
    from trainer.engine import ds_config

    b, ga, n = cfg.data.batch_videos, cfg.dist.grad_accum, cfg.dist.num_workers
    if b < 2:
        return Check("batch", FAIL, f"data.batch_videos={b}: the ranking losses need at least 2 "
                     "videos per batch for negatives; raise data.batch_videos")
    total = ds_config(cfg, n)["train_batch_size"]
    if total != b * ga * n:
        return Check("batch", FAIL, f"DeepSpeed train_batch_size={total} != data.batch_videos x "
                     f"dist.grad_accum x dist.num_workers = {b} x {ga} x {n}")
    msg = f"train_batch_size = batch_videos x grad_accum x num_workers = {b} x {ga} x {n} = {total}"
    if cfg.loss.hard_pool > b - 1:
        return Check("batch", WARN, f"{msg}; loss.hard_pool={cfg.loss.hard_pool} exceeds the "
                     f"{b - 1} negatives of a batch, so negatives are drawn from all of them")
    return Check("batch", OK, msg)


def exact_batches_per_rank(shard_videos: list[int], batch_videos: int, world_size: int,
                           loader_workers: int) -> list[int]:
    """Batches each rank yields per exact epoch (the reader's round-robin split by rank, then by
    DataLoader worker; each worker's last batch may be short)."""
    workers = max(loader_workers, 1)
    out = []
    for rank in range(world_size):
        mine = shard_videos[rank::world_size]
        out.append(sum(math.ceil(sum(mine[w::workers]) / batch_videos) for w in range(workers)))
    return out


def steps_per_epoch(cfg: Config, train: Manifest | None) -> int | None:
    """The run's steps per virtual epoch, or None where it depends on an unread manifest."""
    if cfg.data.true_epochs and not cfg.data.steps_per_epoch:
        return None if train is None else true_epoch_steps(cfg, train)
    if cfg.data.steps_per_epoch:
        return cfg.data.steps_per_epoch
    if not cfg.data.resampled:
        return 0   # exact reading never derives it
    if train is None:
        return None
    from sharding.reader import steps_per_epoch_for

    return steps_per_epoch_for(train, cfg.data.batch_videos, cfg.dist.num_workers)


def true_epoch_steps(cfg: Config, train: Manifest) -> int:
    """ceil(ceil(videos / workers) / batch_videos): the steps of one true epoch on every rank."""
    from sharding.epochs import steps_for

    return steps_for(train.totals["videos"], cfg.dist.num_workers, cfg.data.batch_videos)


def check_steps(cfg: Config, train: Manifest | None) -> Check:
    """steps_per_epoch > 0 and, in exact mode, no more steps than the smallest rank's batches."""
    steps = steps_per_epoch(cfg, train)
    if steps is None:
        if cfg.data.true_epochs:
            return Check("steps", OK, "data.true_epochs: whole epochs of ceil(ceil(videos / "
                         "workers) / batch_videos) steps, counted from the shards at run time")
        return Check("steps", OK, "data.steps_per_epoch=0: derived from the train manifest at run "
                     "time (videos / global batch)")
    if steps <= 0:
        return Check("steps", FAIL, "data.resampled=false (exact reading) with "
                     "data.steps_per_epoch=0 trains zero steps: set data.steps_per_epoch to the "
                     "batches of the smallest rank, or use data.resampled=true")
    total = steps * cfg.train.epochs
    msg = f"{steps} steps/epoch x train.epochs={cfg.train.epochs} = {total} steps"
    if cfg.data.true_epochs and train is not None:
        full = true_epoch_steps(cfg, train)
        if steps > full:
            return Check("steps", FAIL, f"data.steps_per_epoch={steps} but a true epoch of "
                         f"{train.totals['videos']} videos has {full} steps per rank: set "
                         f"data.steps_per_epoch <= {full}, or 0 for whole epochs")
        msg += (f" (true epochs: every video once, ceil(ceil({train.totals['videos']} videos / "
                f"{cfg.dist.num_workers} workers) / {cfg.data.batch_videos}) = {full} steps"
                + (", cut short" if steps < full else "") + ")")
    if not cfg.data.true_epochs and not cfg.data.resampled and train is not None:
        per_rank = exact_batches_per_rank([s.videos for s in train.shards], cfg.data.batch_videos,
                                          cfg.dist.num_workers, cfg.data.loader_workers)
        if steps > min(per_rank):
            return Check("steps", FAIL, f"data.steps_per_epoch={steps} but in exact reading the "
                         f"smallest rank has {min(per_rank)} batches per epoch (per rank: "
                         f"{per_rank}): set data.steps_per_epoch <= {min(per_rank)}")
    if cfg.dist.grad_accum > 1 and steps % cfg.dist.grad_accum:
        return Check("steps", WARN, f"{msg}; {steps} steps/epoch is not a multiple of "
                     f"dist.grad_accum={cfg.dist.grad_accum}: accumulation windows straddle epochs")
    return Check("steps", OK, msg)


def check_intervals(cfg: Config, train: Manifest | None) -> Check:
    """eval_every / ckpt_every longer than the run mean one evaluation/checkpoint at the end."""
    steps = steps_per_epoch(cfg, train)
    if not steps:
        return Check("intervals", OK, "checked against the run length at run time")
    total = steps * cfg.train.epochs
    for key, every in (("train.eval_every", cfg.train.eval_every),
                       ("train.ckpt_every", cfg.train.ckpt_every)):
        if every > total:
            return Check("intervals", WARN, f"{key}={every} exceeds the run's {total} steps: only "
                         f"the last step is evaluated/checkpointed (early stopping never triggers);"
                         f" set {key} <= {total} or 0 (once per epoch)")
    return Check("intervals", OK, f"eval every {cfg.train.eval_every or steps}, checkpoint every "
                 f"{cfg.train.ckpt_every or cfg.train.eval_every or steps} of {total} steps")


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


def check_loader_cpus(cfg: Config) -> Check:
    cpus, lw = cfg.dist.cpus_per_worker, cfg.data.loader_workers
    if cpus and lw + 1 > cpus:
        return Check("cpus", WARN, f"data.loader_workers={lw} + the training process exceed "
                     f"dist.cpus_per_worker={cpus}: loading will compete with training; raise "
                     f"dist.cpus_per_worker to {lw + 1} or lower data.loader_workers")
    if not cfg.dist.use_gpu and cpus * cfg.dist.num_workers < (os.cpu_count() or 1):
        return Check("cpus", WARN, f"CPU training with dist.cpus_per_worker={cpus}: under Ray "
                     f"each worker computes on {cpus} thread(s) (Ray sets OMP_NUM_THREADS from "
                     f"it) while this machine has {os.cpu_count()} cores; set "
                     f"dist.cpus_per_worker={max((os.cpu_count() or 1) // cfg.dist.num_workers, 1)}"
                     " to use them (dldkd train --no-ray uses every core)")
    return Check("cpus", OK, f"{cpus} CPUs per worker for {lw} loader workers + training")


def check_gpu(cfg: Config) -> Check:
    if not cfg.dist.use_gpu:
        return Check("gpu", OK, "dist.use_gpu=false: CPU workers")
    import torch

    if not torch.cuda.is_available():
        return Check("gpu", WARN, "dist.use_gpu=true but this machine has no CUDA device: fine if "
                     "the cluster's workers have GPUs")
    return Check("gpu", OK, f"dist.use_gpu=true; {torch.cuda.device_count()} CUDA devices here")


# -- shards ----------------------------------------------------------------------------------------
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


def check_shard_files(split: str, manifest: Manifest) -> Check:
    """Every shard the manifest lists is there with its recorded size; a local one also has its
    sha256 and only schema members (tar headers, no pickles): data the reader would skip as
    damaged, or refuse, fails here before a cluster is touched."""
    key = f"data.{split} shards"
    problems = []
    for info, url in zip(manifest.shards, manifest.urls()):
        problem = _shard_problem(info, url)
        if problem:
            problems.append(f"{info.name} {problem}")
    where = manifest.base or "the manifest's folder"
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        return Check(key, FAIL, f"{len(problems)} of {len(manifest.shards)} shards in {where} are "
                     f"damaged: {'; '.join(problems[:5])}{more}. Rerun the `dldkd shard` command "
                     "that wrote them (it rewrites missing or damaged shards), or restore them")
    local = all(_local_shard(u) is not None for u in manifest.urls())
    return Check(key, OK, f"{len(manifest.shards)} shards in {where}: present, sizes "
                 + ("and sha256 as in the manifest, schema members only" if local else
                    "as in the manifest (sha256 and members are checked for local shards only)"))


def _local_shard(url: str) -> Path | None:
    return None if is_remote(url) else Path(url.removeprefix("file://"))


def _shard_problem(info, url: str) -> str | None:
    """Why the shard at ``url`` is not the one the manifest describes, or None."""
    from sharding.epochs import index_shard
    from sharding.schema import ShardError, check_member_names
    from sharding.writer import sha256_file

    path = _local_shard(url)
    if path is None:   # remote: a hash would download the whole split
        import fsspec

        try:
            size = fsspec.core.url_to_fs(url)[0].info(url)["size"]
        except FileNotFoundError:
            return "is listed in the manifest but missing"
        except Exception as err:  # noqa: BLE001  (credentials, network alike)
            return f"cannot be read ({type(err).__name__}: {err})"
        return None if size == info.bytes else \
            f"has {size} bytes, the manifest {info.bytes} (truncated or replaced)"
    if not path.is_file():
        return "is listed in the manifest but missing"
    size = path.stat().st_size
    if size != info.bytes:
        return f"has {size} bytes, the manifest {info.bytes} (truncated or replaced)"
    if sha256_file(path) != info.sha256:
        return "has another sha256 than the manifest (corrupt or replaced)"
    try:
        refs = index_shard(url, str(path))
        for ref in refs:
            check_member_names([name for name, _, _ in ref.members], url)
    except ShardError as err:    # UnsafeMemberError included: a pickle is never read
        return f"is refused by the reader: {err}"
    except (tarfile.TarError, OSError) as err:
        return f"is not a readable tar file ({err})"
    if len(refs) != info.videos:
        return f"holds {len(refs)} samples, the manifest {info.videos}"
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


# -- teacher weights -------------------------------------------------------------------------------
def _looks_like_path(value: str) -> bool:
    from trainer.teacher.weights import HF_HUB, WEIGHT_SUFFIXES

    return not value.startswith(HF_HUB) and ("/" in value or Path(value).suffix in WEIGHT_SUFFIXES)


def check_teacher_weights(cfg: Config, offline: bool) -> Check:
    t = cfg.teacher
    if not cfg.uses_teacher() or t.placement == "precomputed":
        return Check("teacher", OK, teacher_use(cfg))
    from trainer.teacher.weights import HF_HUB, TeacherError, resolve_weights

    import open_clip

    if offline and _looks_like_path(t.pretrained) and not Path(t.pretrained).is_file():
        return Check("teacher", WARN, f"teacher.pretrained={t.pretrained!r} is not on this "
                     "machine: it must exist on the cluster (checked without --offline)")
    try:
        source = resolve_weights(t, download=False)
    except TeacherError as err:
        return Check("teacher", FAIL, str(err))
    if t.pretrained.startswith(HF_HUB):
        repo = t.pretrained[len(HF_HUB):]
        return _weights_check(f"teacher.pretrained={t.pretrained!r}",
                              _hf_cached(repo, HF_WEIGHT_FILES), repo, None, offline)
    if source.checkpoint is None and not t.pretrained:
        return Check("teacher", WARN, f"teacher.pretrained='' : {t.arch} starts from random "
                     "weights, so its targets carry no knowledge; set a tag, a checkpoint or "
                     "hf-hub:org/name")
    if Path(t.pretrained).is_file():
        size = Path(t.pretrained).stat().st_size
        if not size:
            return Check("teacher", FAIL, f"teacher.pretrained={t.pretrained!r} is empty")
        try:   # opened as the run opens it: weights only, keys and shapes against teacher.arch
            from trainer.teacher.weights import fit_state_dict, read_state_dict

            shapes = {k: v.shape for k, v in meta_teacher(source).state_dict().items()}
            fit_state_dict(read_state_dict(t.pretrained), shapes,
                           f"teacher.pretrained={t.pretrained!r}")
        except TeacherError as err:
            return Check("teacher", FAIL, str(err))
        return Check("teacher", OK, f"local checkpoint {t.pretrained} ({size_text(size)}) fits "
                     f"{t.arch}")
    tag = open_clip.get_pretrained_cfg(t.arch, t.pretrained)
    return _weights_check(f"{t.arch} tag {t.pretrained!r}", _tag_cached(tag), tag.get("hf_hub"),
                          tag.get("url"), offline)


def _weights_check(label: str, cached: str | None, hf_repo: str | None, url: str | None,
                   offline: bool) -> Check:
    """Teacher weights: in this machine's cache, downloadable (the hub answers), or neither."""
    fill = ("a run where the hub is reachable downloads it into HF_HOME (default "
            "~/.cache/huggingface; docs/teacher.md has a one-line download): copy that folder to "
            "the workers' HF_HOME, or set teacher.pretrained to a downloaded weights file")
    if cached:
        return Check("teacher", OK, f"{label}: in this machine's cache ({cached})")
    if offline:
        return Check("teacher", WARN, f"{label}: not in this machine's cache; whether the hub is "
                     "reachable is not checked with --offline")
    where, error = _probe_download(hf_repo, url)
    if error is None:
        return Check("teacher", OK, f"{label}: not cached here, downloadable ({where} answers): "
                     "the first run downloads it into the Hugging Face cache (under zero3 on "
                     f"rank 0 only); workers without network need it too: {fill}")
    hint = "unset HF_HUB_OFFLINE where the hub is reachable, or " if _hub_offline() else ""
    return Check("teacher", FAIL, f"{label}: not in this machine's cache and not downloadable "
                 f"({error}); {hint}{fill}")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _probe_download(hf_repo: str | None, url: str | None) -> tuple[str, str | None]:
    """(what was asked, None when it answered, else why not): the hub's model page for a hub
    repo (``HF_ENDPOINT`` honoured), else the tag's URL."""
    if _hub_offline():
        return "", "HF_HUB_OFFLINE is set, so nothing is downloaded"
    if hf_repo:
        repo = "/".join(hf_repo.strip("/").split("/")[:2])
        target = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}" \
                 f"/api/models/{repo}"
    elif url:
        target = url
    else:
        return "", "no download location is known for it"
    try:
        with urllib.request.urlopen(urllib.request.Request(target, method="HEAD"),
                                    timeout=HEALTH_TIMEOUT_S):
            return target, None
    except urllib.error.HTTPError as err:
        return target, f"{target} answered {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return target, f"{target} could not be reached ({HEALTH_TIMEOUT_S:g} s timeout): {err}"


def _hf_cached(repo_file: str, default_files: list[str]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo_file = repo_file.rstrip("/")
    repo, name = os.path.split(repo_file) if repo_file.count("/") > 1 else (repo_file, "")
    for filename in [name] if name else default_files:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _tag_cached(tag: dict) -> str | None:
    if tag.get("hf_hub"):
        found = _hf_cached(tag["hf_hub"], HF_WEIGHT_FILES)
        if found:
            return found
    if tag.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(tag["url"])
        if path.is_file():
            return str(path)
    return None


# -- storage and tracking --------------------------------------------------------------------------
def _probe_local(folder: Path) -> str | None:
    """Create and delete a file in ``folder`` or, if it does not exist yet, in its nearest existing
    parent (where the run would create it); None when that works, else the error."""
    target = folder
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        return f"{target} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=PROBE_PREFIX):
            pass
    except OSError as err:
        return f"cannot write in {target}: {err}"
    return None


def _probe_remote(url: str) -> str | None:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        kwargs = ({"config_kwargs": {"connect_timeout": 5, "read_timeout": 5,
                                     "retries": {"max_attempts": 1}}}
                  if protocol in ("s3", "s3a") else {})
        fs = fsspec.filesystem(protocol, **kwargs)
    except ImportError as err:
        extra = "pip install s3fs (a dldkd dependency)" if protocol in ("s3", "s3a") else \
            f"install the fsspec backend for {protocol}://"
        return f"no filesystem for {protocol}:// ({err}): {extra}"
    except ValueError as err:
        return f"unknown storage protocol {protocol!r}: {err}"
    probe = f"{url.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as err:  # noqa: BLE001  (credentials, network, permissions alike)
        return f"cannot write {probe}: {type(err).__name__}: {err} (check credentials/endpoint)"
    return None


def check_storage(cfg: Config) -> Check:
    storage = cfg.run.storage
    error = _probe_remote(storage) if is_remote(storage) else _probe_local(Path(storage))
    if error:
        return Check("storage", FAIL, f"run.storage={storage!r}: {error}")
    return Check("storage", OK, f"run.storage={storage!r} is writable")


def check_tracking(cfg: Config) -> Check:
    """The MLflow store answers or can be written. ``load_config`` has filled an empty
    ``tracking.uri`` from $MLFLOW_TRACKING_URI; still empty, it is the run folder's SQLite file,
    which the config check refuses for a remote ``run.storage``."""
    uri = cfg.tracking.uri
    if not uri:
        return Check("tracking", OK, f"SQLite file {Path(cfg.run.storage) / cfg.run.name}/"
                     "mlflow.db (storage check covers it)")
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_S) as resp:
                status = resp.status
        except (urllib.error.URLError, OSError) as err:
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {health} did not answer within "
                         f"{HEALTH_TIMEOUT_S:g} s ({err}); start the server or fix the address")
        if status != 200:
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {health} answered {status}")
        return Check("tracking", OK, f"tracking.uri={uri!r} answers /health")
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.exists() and not os.access(path, os.W_OK):
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {path} is not writable")
        error = _probe_local(path.parent)
        if error:
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {error}")
        return Check("tracking", OK, f"tracking.uri={uri!r}: SQLite file writable")
    if uri.startswith("file:") or "://" not in uri:
        error = _probe_local(Path(uri[len("file://"):] if uri.startswith("file://") else uri))
        if error:
            return Check("tracking", FAIL, f"tracking.uri={uri!r}: {error}")
        return Check("tracking", WARN, f"tracking.uri={uri!r} is MLflow's legacy file store; "
                     "prefer sqlite:///path/mlflow.db or a server")
    return Check("tracking", WARN, f"tracking.uri={uri!r}: this kind of store is not checked here")


# -- all together ----------------------------------------------------------------------------------
def validate_run(config_path: str | None, overrides: list[str] | dict | None = None, *,
                 offline: bool = False) -> Report:
    """Every check in order; a config that does not load is one FAIL and nothing else runs."""
    first, cfg = check_config(config_path, overrides)
    if cfg is None:
        return Report([first])
    checks = [first, check_batch(cfg)]
    manifests: dict[str, Manifest | None] = {}
    if offline:
        checks.append(Check("data", OK, "skipped (--offline): shards, storage and tracking"))
    else:
        for split in SPLITS:
            check, manifests[split] = check_split(cfg, split)
            checks.append(check)
            if manifests[split] is not None:
                checks.append(check_shard_files(split, manifests[split]))
        checks.append(check_val_split(cfg))
    train = manifests.get("train")
    if train is not None:
        checks += [check_split_size(cfg, train), check_data_mode(cfg, train),
                   check_readers(cfg, train), check_teacher_inputs(cfg, train)]
    checks += [check_steps(cfg, train), check_intervals(cfg, train), check_loader_cpus(cfg),
               check_teacher_weights(cfg, offline), check_gpu(cfg)]
    if not offline:
        checks += [check_storage(cfg), check_tracking(cfg)]
    qpv = (train.totals["captions"] / train.totals["videos"]
           if train is not None and train.totals["videos"] else DEFAULT_QUERIES_PER_VIDEO)
    return Report(checks, estimate_memory(cfg, qpv))
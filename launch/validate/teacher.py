"""``dldkd validate``: the teacher's weights are where the run will look for them.

A local checkpoint is opened as the run opens it (weights only, keys and shapes against
``teacher.arch``); a tag or hub repo must be in this machine's cache or downloadable.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from launch.validate.memory import meta_teacher, size_text, teacher_use
from launch.validate.result import FAIL, OK, WARN, Check
from launch.validate.stores import HEALTH_TIMEOUT_S
from trainer.config import Config

HF_WEIGHT_FILES = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


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

"""Where the teacher's weights come from, and reading them safely.

An open_clip pretrained tag or ``hf-hub:`` name (downloaded by open_clip into its Hugging Face
cache; set ``HF_HUB_OFFLINE=1`` on machines without network and a pre-filled cache), a local
checkpoint (read by open_clip's own reader with ``weights_only=True``), or nothing (random init,
for tests). A custom architecture is an open_clip JSON config registered under ``teacher.arch``.
"""
from __future__ import annotations


import difflib
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.transform import merge_preprocess_dict
from torch import Tensor

from trainer.config import TeacherConfig

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HF_HUB = "hf-hub:"


class TeacherError(ValueError):
    """The teacher cannot be built or fed; the message says what to change."""


@dataclass(frozen=True)
class WeightSource:
    model_name: str            # what open_clip builds: the arch, or "hf-hub:org/name"
    checkpoint: str | None     # a local weights file; None = random init
    preprocess: dict           # preprocessing overrides of a pretrained tag
    label: str                 # for messages and the identity


def register_model_config(cfg: TeacherConfig) -> None:
    """Register ``teacher.model_config`` (an open_clip JSON config) under ``teacher.arch``."""
    path = Path(cfg.arch_config)
    if not path.is_file():
        raise TeacherError(f"teacher.model_config={cfg.arch_config!r} does not exist; give the "
                           f"path of an open_clip JSON model config (see configs/teacher-tiny.json)")
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TeacherError(f"teacher.model_config={cfg.arch_config!r} is not valid JSON: {err}"
                           ) from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in body]
    if missing:
        raise TeacherError(f"teacher.model_config={cfg.arch_config!r} lacks {missing}: an open_clip "
                           f"model config needs embed_dim, vision_cfg and text_cfg")
    if path.stem != cfg.arch:
        raise TeacherError(f"open_clip registers {path.name} as architecture {path.stem!r}, but "
                           f"teacher.arch={cfg.arch!r}; set teacher.arch={path.stem!r} or rename "
                           f"the file to {cfg.arch}.json")
    if open_clip.get_model_config(cfg.arch) != body:
        open_clip.add_model_config(path)


def resolve_weights(cfg: TeacherConfig, download: bool = True) -> WeightSource:
    """Check arch and weights settings and say what to build; download only when asked."""
    if cfg.arch_config:
        register_model_config(cfg)
    pretrained = cfg.pretrained
    if pretrained.startswith(HF_HUB):
        return WeightSource(pretrained, _download_hub(pretrained) if download else None, {},
                            pretrained)
    if cfg.arch not in open_clip.list_models():
        close = difflib.get_close_matches(cfg.arch, open_clip.list_models(), n=4)
        raise TeacherError(f"teacher.arch={cfg.arch!r} is not an open_clip architecture (close: "
                           f"{close}); pick one of open_clip.list_models(), or register your own "
                           f"with teacher.model_config=path/to/{cfg.arch}.json")
    if not pretrained:
        return WeightSource(cfg.arch, None, {}, "random-init")
    tag = open_clip.get_pretrained_cfg(cfg.arch, pretrained)
    if tag:
        path = _download_tag(cfg.arch, pretrained, tag) if download else None
        return WeightSource(cfg.arch, path, merge_preprocess_dict({}, tag), pretrained)
    if Path(pretrained).is_file():
        return WeightSource(cfg.arch, str(pretrained), {}, Path(pretrained).name)
    tags = open_clip.list_pretrained_tags_by_model(cfg.arch)
    if "/" in pretrained or Path(pretrained).suffix in WEIGHT_SUFFIXES:
        raise TeacherError(f"teacher checkpoint {pretrained!r} not found (relative paths start at "
                           f"{Path.cwd()}); fix teacher.pretrained, write one with `dldkd teacher "
                           f"pretrain`, or use an open_clip tag for {cfg.arch}: {tags}")
    raise TeacherError(f"teacher.pretrained={pretrained!r} is neither an open_clip tag of "
                       f"{cfg.arch} ({tags or 'none'}) nor an existing file; use a tag, "
                       f"'hf-hub:org/name', a checkpoint path, or '' for random weights")


def _offline_hint() -> str:
    return ("without network, download once elsewhere and set teacher.pretrained to the file, or "
            "pre-fill the Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1 so the hub is not "
            "retried")


def _download_tag(arch: str, tag: str, tag_cfg: dict) -> str:
    try:
        return open_clip.download_pretrained(tag_cfg)
    except Exception as err:  # noqa: BLE001  (hub, url and io errors alike)
        raise TeacherError(f"could not fetch the {arch} weights for tag {tag!r}: {err}; "
                           f"{_offline_hint()}") from err


def _download_hub(name: str) -> str:
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return download_pretrained_from_hf(name[len(HF_HUB):])
    except Exception as err:  # noqa: BLE001
        raise TeacherError(f"could not fetch {name}: {err}; {_offline_hint()}") from err


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict read by open_clip's own reader (weights-only torch file or safetensors,
    ``state_dict``/``module.`` wrappers removed), which never unpickles arbitrary objects; what
    it cannot read is a TeacherError that says what the file must be."""
    from open_clip.factory import load_state_dict

    try:
        obj = load_state_dict(path, weights_only=True)
    except Exception as err:  # noqa: BLE001
        named = re.search(r"Unsupported global: GLOBAL [\w.]+", str(err))
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        why = named.group(0) if named else "not a weights-only torch file" if isinstance(
            err, pickle.UnpicklingError) else first
        raise TeacherError(f"cannot read teacher checkpoint {path} ({why}); it must be a state "
                           f"dict saved with torch.save (weights only) or a .safetensors file"
                           ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TeacherError(f"teacher checkpoint {path} does not hold a state dict of tensors")
    return obj


def fit_state_dict(sd: dict[str, Tensor], shapes: dict[str, torch.Size], where: str
                   ) -> dict[str, Tensor]:
    """Check keys and shapes against the model (scalar vs [1] is reshaped); clear error if not.

    Shapes rather than a model: the ZeRO-3 placement fills partitioned parameters from rank 0 and
    ``dldkd validate`` checks against a model on the meta device, where open_clip's
    ``load_checkpoint`` (a strict ``load_state_dict`` into a whole model) cannot serve.
    """
    missing = sorted(set(shapes) - set(sd))
    unexpected = sorted(set(sd) - set(shapes))
    wrong = []
    out = {}
    for name, want in shapes.items():
        if name not in sd:
            continue
        value = sd[name]
        if value.shape != want:
            if value.numel() == 1 and math.prod(want) == 1:
                value = value.reshape(want)
            else:
                wrong.append(f"{name}: {tuple(value.shape)} vs model {tuple(want)}")
        out[name] = value
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {items[:5]}{more}")
        raise TeacherError(f"{where} does not fit the architecture: {'; '.join(parts)}. Was it "
                           f"saved from another architecture? Check teacher.arch and "
                           f"teacher.model_config against the model that wrote it")
    return out

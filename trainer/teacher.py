"""The frozen open_clip teacher (method.md §4): per-batch similarity targets tau (Q, B, L) and T (Q, B).

Weights come from an open_clip pretrained tag or ``hf-hub:`` name (downloaded by open_clip into
its Hugging Face cache; set ``HF_HUB_OFFLINE=1`` on machines without network and a pre-filled
cache), a local checkpoint (read with ``weights_only=True``), or nothing (random init, for tests).
A custom architecture is an open_clip JSON config registered under ``teacher.arch``.

Placement: ``replicated`` (a full copy per rank), ``zero3`` (DeepSpeed ZeRO-3 partitions the
parameters over the data-parallel ranks, the model is built partitioned inside ``zero.Init`` and
weights are loaded parameter by parameter from rank 0), or ``precomputed`` (embeddings read from
the batch). Under ``zero3`` every forward is a collective: each rank runs the same number of
text and image chunks per call, padding with a dummy chunk when it has fewer (a short last batch,
or frames all served by its cache).
"""
from __future__ import annotations

import trainer.compat  # noqa: F401  (must precede open_clip)

import difflib
import hashlib
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from open_clip.transform import center_crop_or_pad, merge_preprocess_dict
from torch import Tensor, nn

from sharding.batch import Batch
from sharding.writer import sha256_file
from trainer import dist
from trainer.config import TeacherConfig
from trainer.losses import PAD_SCORE, TeacherTargets
from trainer.teacher_cache import FrameEmbeddingCache

__all__ = ["Teacher", "TeacherError", "TeacherTargets", "build_teacher", "similarity_targets",
           "preprocess_frames", "resolve_weights", "read_state_dict"]

# CLIP's trained logit scale (open_clip clamps exp(logit_scale) to it); used for
# ``logit_scale_targets`` when only pre-extracted embeddings are available.
PRECOMPUTED_LOGIT_SCALE = 100.0
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HF_HUB = "hf-hub:"


class TeacherError(ValueError):
    """The teacher cannot be built or fed; the message says what to change."""


# -- method.md §4 math -----------------------------------------------------------------------------------
def similarity_targets(text: Tensor, frames: Tensor, mask: Tensor,
                       logit_scale: float | None = None) -> TeacherTargets:
    """tau(i, j, l) = cos(t_i, f_jl) (padded frames = PAD_SCORE); T(i, j) = max_l t_i . f_jl raw.

    With ``logit_scale`` T is ``logit_scale * max_l cos(t_i, f_jl)`` instead (CLIP's own scale on
    normalised embeddings), the documented alternative to the raw, model-dependent dot product.
    """
    if text.dim() != 2 or frames.dim() != 3 or text.shape[1] != frames.shape[2]:
        raise TeacherError(f"teacher embeddings do not fit: text {tuple(text.shape)} (Q, D), "
                           f"frames {tuple(frames.shape)} (B, L, D)")
    if tuple(mask.shape) != tuple(frames.shape[:2]):
        raise TeacherError(f"frame mask {tuple(mask.shape)} does not match the teacher frames "
                           f"{tuple(frames.shape[:2])} (B, L)")
    t, f = text.float(), frames.float()
    pad = ~(mask > 0)[None]
    tau = torch.einsum("qd,bld->qbl", F.normalize(t, dim=-1), F.normalize(f, dim=-1))
    tau = tau.masked_fill(pad, PAD_SCORE)
    if logit_scale is None:
        raw = torch.einsum("qd,bld->qbl", t, f).masked_fill(pad, PAD_SCORE)
        return TeacherTargets(tau=tau, T=raw.amax(dim=-1))
    return TeacherTargets(tau=tau, T=logit_scale * tau.amax(dim=-1))


def preprocess_frames(frames: Tensor, cfg: dict) -> Tensor:
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, h, w) for a whole batch at once.

    The same steps as open_clip's eval transform on PIL images (resize with the model's
    interpolation and resize mode, centre crop or pad, scale to [0, 1], normalise), done
    tensor-wise; a resize rounds to whole pixel values as PIL's uint8 resize does.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise TeacherError(f"teacher frames must be uint8 (N, H, W, 3) RGB, got {frames.dtype} "
                           f"{tuple(frames.shape)}")
    size = cfg["size"]
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    new = _resized_size(h, w, th, tw, cfg.get("resize_mode", "shortest"))
    if new != (h, w):
        mode = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        x = F.interpolate(x, size=new, mode=mode, align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    x = center_crop_or_pad(x, [th, tw], fill=cfg.get("fill_color", 0)) / 255.0
    mean = torch.tensor(cfg["mean"], dtype=x.dtype).to(x.device, non_blocking=True)
    std = torch.tensor(cfg["std"], dtype=x.dtype).to(x.device, non_blocking=True)
    mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    return (x - mean) / std


def _resized_size(h: int, w: int, th: int, tw: int, mode: str) -> tuple[int, int]:
    if mode == "squash":
        return th, tw
    if mode == "shortest" and th == tw:  # torchvision Resize(int): short side -> th, truncating
        if h <= w:
            return th, int(th * w / h)
        return int(th * h / w), th
    if mode not in ("shortest", "longest"):
        raise TeacherError(f"unknown open_clip resize_mode {mode!r}")
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) if mode == "longest" else min(ratio_h, ratio_w)
    return round(h / ratio), round(w / ratio)


# -- where the weights come from -------------------------------------------------------------------
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
    """A state dict from a weights-only torch file or safetensors (``state_dict``/``module.``
    wrappers removed); never unpickles arbitrary objects."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        named = re.search(r"Unsupported global: GLOBAL [\w.]+", str(err))
        why = named.group(0) if named else "not a weights-only torch file" if isinstance(
            err, pickle.UnpicklingError) else (str(err).strip().splitlines() or [""])[0][:200]
        raise TeacherError(f"cannot read teacher checkpoint {path} ({why}); it must be a state "
                           f"dict saved with torch.save (weights only) or a .safetensors file"
                           ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise TeacherError(f"teacher checkpoint {path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def fit_state_dict(sd: dict[str, Tensor], shapes: dict[str, torch.Size], where: str
                   ) -> dict[str, Tensor]:
    """Check keys and shapes against the model (scalar vs [1] is reshaped); clear error if not."""
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


def teacher_identity(cfg: TeacherConfig, source: WeightSource, preprocess: dict,
                     weights_sha: str, dtype: torch.dtype) -> str:
    """arch + a hash of everything that changes a frame embedding: the cache namespace."""
    hub = source.model_name.startswith(HF_HUB)
    described = json.dumps({"arch": source.model_name, "preprocess": preprocess,
                            "config": None if hub else open_clip.get_model_config(cfg.arch),
                            "weights": weights_sha, "dtype": str(dtype)},
                           sort_keys=True, default=str)
    digest = hashlib.sha256(described.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', source.model_name)}-{digest}"


# -- the model and its placements ------------------------------------------------------------------
class RawFeatures(nn.Module):
    """One forward per tower returning RAW (unnormalised) embeddings: method.md §4's T needs them, and
    under ZeRO-3 the engine's forward is what gathers the parameters."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        if image is not None:
            return self.clip.encode_image(image)
        return self.clip.encode_text(text)


def zero3_config(bf16: bool) -> dict:
    """DeepSpeed config of the frozen, partitioned teacher (no optimizer; every parameter is
    partitioned, none kept whole as a small 'persistent' one)."""
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": bf16}}


def _create(source: WeightSource, device: torch.device) -> nn.Module:
    return open_clip.create_model(source.model_name, pretrained=None, load_weights=False,
                                  device=device, force_preprocess_cfg=source.preprocess,
                                  nonscalar_logit_scale=True)


def _rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def _build_replicated(source: WeightSource, device: torch.device, dtype: torch.dtype
                      ) -> tuple[nn.Module, nn.Module, str]:
    clip = _create(source, torch.device("cpu"))
    if source.checkpoint:
        shapes = {k: v.shape for k, v in clip.state_dict().items()}
        sd = fit_state_dict(read_state_dict(source.checkpoint), shapes,
                            f"teacher checkpoint {source.checkpoint}")
        clip.load_state_dict(sd, strict=True)
        sha = sha256_file(source.checkpoint)
    else:
        sha = _params_sha(clip, gather=None)
    clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return clip, RawFeatures(clip), sha


def _build_zero3(source: WeightSource, device: torch.device, dtype: torch.dtype
                 ) -> tuple[nn.Module, nn.Module, str]:
    import deepspeed
    from deepspeed.runtime.zero import GatheredParameters, register_external_parameter

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise TeacherError("teacher.placement='zero3' needs the process group: run under Ray "
                           "Train or a launcher and call trainer.dist.init() first, or use "
                           "'replicated'")
    ds_cfg = zero3_config(bf16=dtype == torch.bfloat16)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        clip = _create(source, device)
    rank = _rank()
    # Rank 0 alone reads the weights; every rank must take the same branch below.
    status: list = [None, "", False]   # error, weights sha256, has a checkpoint
    sd: dict[str, Tensor] = {}
    buffers = [n for n in clip.state_dict() if n not in dict(clip.named_parameters())]
    if rank == 0 and source.checkpoint:
        shapes = {n: p.ds_shape for n, p in clip.named_parameters()}
        shapes.update({n: b.shape for n, b in clip.named_buffers() if n in buffers})
        try:
            sd = fit_state_dict(read_state_dict(source.checkpoint), shapes,
                                f"teacher checkpoint {source.checkpoint}")
            status = [None, sha256_file(source.checkpoint), True]
        except TeacherError as err:
            status = [str(err), "", True]
    torch_dist.broadcast_object_list(status, src=0)
    error, sha, has_checkpoint = status
    if error:
        raise TeacherError(error)
    if has_checkpoint:
        for name, p in clip.named_parameters():
            with GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(sd[name])
        named = dict(clip.named_buffers())
        for name in buffers:
            if rank == 0:
                named[name].copy_(sd[name])
            torch_dist.broadcast(named[name], src=0)
    else:
        sha = _params_sha(clip, gather=GatheredParameters)
    del sd
    clip.eval().requires_grad_(False)
    features = RawFeatures(clip)
    for p in clip.parameters(recurse=False):
        register_external_parameter(features, p)
    engine, *_ = deepspeed.initialize(model=features, config=ds_cfg)
    engine.eval()
    return clip, engine, sha


def _params_sha(model: nn.Module, gather: Callable | None) -> str:
    """sha256 over every parameter (gathered one by one under ZeRO-3): random-init identity."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if gather is None:
            h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
            continue
        with gather([p]):
            h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def param_fraction(model: nn.Module) -> float:
    """Parameters held by this rank / parameters of the model (1.0 unless ZeRO-3 partitioned)."""
    held = total = 0
    for p in model.parameters():
        full = getattr(p, "ds_numel", p.numel())
        total += full
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return held / max(total, 1)


# -- the teacher -----------------------------------------------------------------------------------
class Teacher:
    """Frozen CLIP: ``targets(batch)`` once per step on every rank (see the module docstring)."""

    def __init__(self, cfg: TeacherConfig, *, device: torch.device, forward: nn.Module | None = None,
                 clip: nn.Module | None = None, tokenizer: Callable | None = None,
                 preprocess: dict | None = None, dtype: torch.dtype = torch.float32,
                 logit_scale: float = PRECOMPUTED_LOGIT_SCALE, identity: str = "precomputed",
                 cache: FrameEmbeddingCache | None = None, collective: bool = False,
                 embed_dim: int = 0):
        self.cfg = cfg
        self.device = device
        self.forward = forward
        self.clip = clip
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.dtype = dtype
        self.logit_scale = logit_scale
        self.identity = identity
        self.cache = cache
        self.collective = collective
        self.embed_dim = embed_dim
        self.calls = {"text": 0, "image": 0}   # forward calls per tower (equal on every rank)

    @torch.no_grad()
    def targets(self, batch: Batch) -> TeacherTargets:
        text = self.text_embeddings(batch)
        frames = self.frame_embeddings(batch)
        scale = self.logit_scale if self.cfg.logit_scale_targets else None
        return similarity_targets(text, frames, batch.video_mask.to(self.device), scale)

    @torch.no_grad()
    def text_embeddings(self, batch: Batch) -> Tensor:
        """(Q, D) raw text embeddings of the batch's captions (float32)."""
        if self.forward is None:
            if batch.teacher_text_emb is None:
                raise TeacherError("teacher.placement='precomputed' but the batch has no "
                                   "teacher_text_emb: write shards with pre-extracted CLIP text "
                                   "embeddings, or use placement 'replicated'/'zero3'")
            return batch.teacher_text_emb.to(self.device, torch.float32)
        tokens = self.tokenizer(list(batch.captions))
        return self._encode("text", tokens, lambda t: t.to(self.device, non_blocking=True))

    @torch.no_grad()
    def frame_embeddings(self, batch: Batch) -> Tensor:
        """(B, L, D) raw frame embeddings aligned to the student's frames (zeros where padded),
        float32 on the teacher's device.

        Each distinct (video, teacher frame) is encoded once per batch, or not at all when the
        cache has it. Which frames those are is worked out on the host from ``teacher_index``
        (collate's, never moved: the cache keys are host strings); only the frames to encode go
        to the device, and the gathers and scatters of embeddings happen there."""
        if self.forward is None:
            if batch.teacher_frame_emb is None:
                raise TeacherError("teacher.placement='precomputed' but the batch has no "
                                   "teacher_frame_emb: write shards with pre-extracted CLIP frame "
                                   "embeddings, or use placement 'replicated'/'zero3'")
            emb = batch.teacher_frame_emb.to(self.device, torch.float32)
            return emb * (batch.video_mask.to(self.device) > 0)[..., None]
        if batch.teacher_frames is None:
            raise TeacherError("the batch has no teacher_frames (raw RGB frames): write shards "
                               "with teacher frames, or use teacher.placement='precomputed' with "
                               "pre-extracted embeddings")
        index = batch.teacher_index.cpu()   # -1 at padded positions (collate)
        jj, ll = (index >= 0).nonzero(as_tuple=True)
        kk = index[jj, ll]
        key = jj * (int(kk.max()) + 1 if len(kk) else 1) + kk
        uniq, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((len(uniq),), len(key), dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(len(key)), "amin")
        keys = [(batch.video_ids[j], k) for j, k in zip(jj[first].tolist(), kk[first].tolist())]
        emb = torch.zeros(len(keys), self.embed_dim, device=self.device)
        found = torch.zeros(len(keys), dtype=torch.bool)
        if self.cache is not None:
            cached, found = self.cache.lookup(keys, self.embed_dim)
            hit = found.nonzero().flatten()
            if len(hit):
                emb[_on(hit, self.device)] = _on(cached[hit], self.device)
        todo = (~found).nonzero().flatten()
        pixels = batch.teacher_frames.cpu()[jj[first][todo], ll[first][todo]]
        new = self._encode("image", pixels, self._prepare_images)
        if len(todo):
            emb[_on(todo, self.device)] = new
            if self.cache is not None:  # the one device-to-host copy of a step with the cache on
                self.cache.put([keys[i] for i in todo.tolist()], new.cpu())
        out = torch.zeros(*index.shape, self.embed_dim, device=self.device)
        out[_on(jj, self.device), _on(ll, self.device)] = emb[_on(inverse, self.device)]
        return out

    def _prepare_images(self, pixels: Tensor) -> Tensor:
        return preprocess_frames(_on(pixels, self.device), self.preprocess).to(self.dtype)

    def _encode(self, tower: str, inputs: Tensor, prepare: Callable[[Tensor], Tensor]) -> Tensor:
        """Encode in chunks of teacher.image_batch; under zero3 every rank runs the same number
        of chunks (the max over ranks), feeding a one-item dummy when it has run out."""
        chunk = self.cfg.image_batch
        n = math.ceil(len(inputs) / chunk)
        if self.collective:
            count = torch.tensor([n], dtype=torch.int64, device=dist.comm_device())
            torch_dist.all_reduce(count, op=torch_dist.ReduceOp.MAX)
            n = int(count.item())
        outs = []
        for c in range(n):
            part = inputs[c * chunk:(c + 1) * chunk]
            dummy = len(part) == 0
            x = prepare(self._dummy(tower) if dummy else part)
            y = self.forward(image=x) if tower == "image" else self.forward(text=x)
            self.calls[tower] += 1
            if not dummy:
                outs.append(y.float())
        if not outs:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.cat(outs)

    def _dummy(self, tower: str) -> Tensor:
        if tower == "text":
            return self.tokenizer([""])
        size = self.preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        return torch.zeros(1, h, w, 3, dtype=torch.uint8)


def _on(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the teacher's device without making the host wait (no sync)."""
    return t.to(device, non_blocking=True)


def build_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> Teacher:
    """The teacher for this rank. ``zero3`` is collective: call it on every rank together."""
    device = torch.device(device)
    if cfg.placement == "precomputed":
        return Teacher(cfg, device=device)
    if cfg.placement not in ("replicated", "zero3"):
        raise TeacherError(f"teacher.placement={cfg.placement!r}: choose replicated, zero3 or "
                           f"precomputed")
    zero3 = cfg.placement == "zero3"
    source = resolve_weights(cfg, download=not zero3 or _rank() == 0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    build = _build_zero3 if zero3 else _build_replicated
    clip, forward, sha = build(source, device, dtype)
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    if zero3:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([clip.logit_scale]):
            logit_scale = float(clip.logit_scale.float().exp().item())
    else:
        logit_scale = float(clip.logit_scale.float().exp().item())
    identity = teacher_identity(cfg, source, preprocess, sha, dtype)
    cache = (FrameEmbeddingCache(identity, cfg.cache_mem_mb << 20, cfg.cache_dir or None)
             if cfg.cache else None)
    tokenizer = open_clip.get_tokenizer(source.model_name)
    with torch.no_grad():  # on every rank: a collective under zero3
        embed_dim = forward(text=tokenizer([""]).to(device)).shape[-1]
    return Teacher(cfg, device=device, forward=forward, clip=clip, tokenizer=tokenizer,
                   preprocess=preprocess, dtype=dtype, logit_scale=logit_scale,
                   identity=identity, cache=cache, collective=zero3, embed_dim=embed_dim)

"""A tiny teacher for the synthetic world: contrastive pretraining and zero-shot PRVR evaluation.

``pretrain`` trains an open_clip config with the CLIP loss on image-text WebDataset shards
(``{key}.jpg`` + ``{key}.txt``, as ``sharding.synthetic.write_pretrain`` writes them) and saves
plain state dicts that ``teacher.pretrained=PATH`` loads. ``zero_shot_eval`` scores a split with
the teacher alone (score = max over frames of the text-frame cosine), so a user can see how good
the teacher is before distilling from it.
"""
from __future__ import annotations


import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds

from dldkd_configs import preset
from sharding.batch import VideoSample, collate
from sharding.files import atomic_path
from sharding.images import decode_jpeg
from sharding.writer import IMAGE_TEXT, load_manifest
from trainer.config import Config, TeacherConfig
from trainer.method.metrics import encoded_from_embeddings, rank_counts, rank_metrics
from trainer.teacher.model import Teacher, build_teacher
from trainer.teacher.transform import preprocess_frames
from trainer.teacher.weights import TeacherError, resolve_weights

TINY_CONFIG = preset("teacher-tiny.json")


def shard_urls(shards: str) -> list[str]:
    """An image-text split's folder (its manifest.json lists the shards), or a WebDataset brace
    pattern."""
    if Path(shards).is_dir():
        manifest = load_manifest(shards, kind=IMAGE_TEXT)
        missing = [u for u in manifest.urls() if not Path(u).is_file()]
        if missing:
            raise TeacherError(f"{Path(shards) / 'manifest.json'} lists shards that are missing: "
                               f"{missing[:5]}; rewrite the pretraining split")
        return manifest.urls()
    urls = list(wds.shardlists.expand_urls(shards))
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing or not urls:
        raise TeacherError(f"pretraining shards {shards!r}: not found {missing[:5] or urls}; give "
                           f"the pretrain folder or a pattern like dir/pretrain-{{000000..000003}}.tar")
    return urls


def _decode(sample: dict) -> tuple[np.ndarray, str]:
    """Only the image and the caption are decoded (never webdataset's pickle decoders)."""
    key = sample.get("__key__", "?")
    if "jpg" not in sample or "txt" not in sample:
        raise TeacherError(f"sample {key} in {sample.get('__url__', '?')} needs {key}.jpg and "
                           f"{key}.txt, has {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        img = decode_jpeg(sample["jpg"])
    except ValueError as e:
        raise TeacherError(f"sample {key} in {sample.get('__url__', '?')}: {key}.jpg {e}") from e
    return img, sample["txt"].decode("utf-8").strip()


def image_text_pairs(urls: list[str], seed: int, shuffle: int = 1000
                     ) -> Iterator[tuple[np.ndarray, str]]:
    """An endless, seeded stream of (uint8 HxWx3 image, caption)."""
    ds = (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=None,
                         workersplitter=None, seed=seed)
          .shuffle(shuffle, rng=random.Random(seed)).map(_decode))
    return iter(ds)


def save_state_dict(model: torch.nn.Module, path: str | Path) -> str:
    """Write atomically (sharding.files): a crash never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    return str(path)


def step_checkpoint_path(out_path: str | Path, step: int) -> Path:
    out = Path(out_path)
    return out.with_name(f"{out.stem}-step{step}{out.suffix}")


def pretrain(shards: str, out_path: str, *, arch: str = "teacher-tiny",
             model_config: str = TINY_CONFIG, steps: int = 500, batch_size: int = 64,
             lr: float = 1e-3, seed: int = 0, save_at: Sequence[int] = (),
             device: str | torch.device = "cpu",
             log: Callable[[int, float], None] | None = None) -> dict:
    """Train ``arch`` (registered from ``model_config``) with the CLIP loss for ``steps`` steps.

    Saves the final state dict at ``out_path`` and one at ``<stem>-step<N><suffix>`` for each N in
    ``save_at`` (teachers at several pretraining lengths). Returns ``{"losses": [per step],
    "checkpoints": {step: path}}``.
    """
    if steps < 1 or batch_size < 2:
        raise TeacherError(f"pretrain needs steps >= 1 and batch >= 2 (a contrastive batch), got "
                           f"steps={steps}, batch={batch_size}")
    bad = [s for s in save_at if not 1 <= s <= steps]
    if bad:
        raise TeacherError(f"save_at steps {bad} are outside 1..{steps}")
    resolve_weights(TeacherConfig(arch=arch, model_config=model_config), download=False)
    torch.manual_seed(seed)
    device = torch.device(device)
    model = open_clip.create_model(arch, pretrained=None, device=device)
    tokenizer = open_clip.get_tokenizer(arch)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pairs = image_text_pairs(shard_urls(shards), seed)
    model.train()
    losses, checkpoints = [], {}
    for step in range(1, steps + 1):
        batch = [next(pairs) for _ in range(batch_size)]
        images = torch.cat([preprocess_frames(torch.from_numpy(img)[None], preprocess)
                            for img, _ in batch]).to(device)
        tokens = tokenizer([text for _, text in batch]).to(device)
        image_f, text_f, scale = model(images, tokens)
        loss = loss_fn(image_f, text_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # as open_clip's trainer: temperature at most 1/100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.item()))
        if log is not None:
            log(step, losses[-1])
        if step in save_at and step != steps:
            checkpoints[step] = save_state_dict(model, step_checkpoint_path(out_path, step))
    checkpoints[steps] = save_state_dict(model, out_path)
    return {"losses": losses, "checkpoints": checkpoints}


@torch.no_grad()
def zero_shot_eval(teacher: Teacher, samples: Sequence[VideoSample], video_chunk: int = 32,
                   query_chunk: int = 1024) -> dict[str, float]:
    """method.md §1 metrics of the teacher alone: score(i, j) = max_l cos(t_i, f_jl).

    Videos are encoded ``video_chunk`` at a time through the teacher's own path (frame
    deduplication, cache); under ``zero3`` call it on every rank with the same samples.
    """
    if not samples:
        raise TeacherError("zero-shot evaluation needs at least one video")
    length = max(s.frames.shape[0] for s in samples)
    texts, frames, masks, gts = [], [], [], []
    offset = 0
    for start in range(0, len(samples), video_chunk):
        batch = collate(list(samples[start:start + video_chunk]))
        emb = teacher.frame_embeddings(batch).cpu()
        pad = length - emb.shape[1]
        frames.append(torch.nn.functional.pad(emb, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(batch.video_mask, (0, pad)))
        texts.append(teacher.text_embeddings(batch).cpu())
        gts.append(batch.labels + offset)
        offset += batch.num_videos
    enc = encoded_from_embeddings({"teacher": torch.cat(texts)}, {"teacher": torch.cat(frames)},
                                  torch.cat(masks), torch.cat(gts), {"teacher": 1.0},
                                  video_chunk=video_chunk)
    return rank_metrics(rank_counts(enc, query_chunk=query_chunk))


def zero_shot_eval_split(cfg: Config, split: str, device: str | torch.device = "cpu"
                         ) -> dict[str, float]:
    """The zero-shot metrics of ``cfg.teacher`` on every video of ``split``, in this process.

    A ``zero3`` teacher is loaded whole here (same weights): partitioning needs the ranks of a
    training run, and one process holds a teacher that a training run shards.
    """
    from sharding.reader import read_all

    teacher_cfg = cfg.teacher
    if teacher_cfg.placement == "zero3":
        teacher_cfg = teacher_cfg.model_copy(update={"placement": "replicated"})
    samples = read_all(split, cfg.data.max_bad_fraction)
    return zero_shot_eval(build_teacher(teacher_cfg, device), samples)

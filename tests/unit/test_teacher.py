"""The online teacher (method.md §4) on the tiny open_clip config: targets against a direct computation
from encode_text / encode_image, preprocessing against open_clip's own transform, frame
deduplication, the cache, weights loading and its errors, pretraining and zero-shot evaluation."""
from __future__ import annotations

import trainer.teacher  # noqa: F401  (before open_clip)

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from sharding.batch import VideoSample, align_index, collate
from trainer.config import TeacherConfig
from trainer.method.losses import PAD_SCORE
from trainer.teacher.model import build_teacher
from trainer.teacher.placement import param_fraction
from trainer.method.targets import similarity_targets
from trainer.teacher.transform import preprocess_frames
from trainer.teacher.weights import TeacherError, resolve_weights
from trainer.teacher.cache import FrameEmbeddingCache

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "teacher-tiny.json")


def tiny_cfg(**kw) -> TeacherConfig:
    base = dict(arch="teacher-tiny", model_config=TINY, image_batch=8, cache=False)
    base.update(kw)
    return TeacherConfig(**base)


def video(rng: np.random.Generator, i: int, n: int, n_teacher: int, n_caps: int,
          size: int = 32) -> VideoSample:
    return VideoSample(
        video_id=f"vid{i}", frames=rng.standard_normal((n, 8)).astype(np.float32),
        tokens=[rng.standard_normal((4, 6)).astype(np.float32) for _ in range(n_caps)],
        cap_ids=[f"vid{i}#{c}" for c in range(n_caps)],
        captions=[f"a {['red', 'blue', 'green'][c % 3]} square number {i} {c}"
                  for c in range(n_caps)],
        teacher_frames=rng.integers(0, 256, (n_teacher, size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    # repeated teacher frames (4 shown at 9 positions), more teacher than student frames, padding
    return collate([video(rng, 0, 9, 4, 2), video(rng, 1, 5, 12, 3), video(rng, 2, 3, 3, 1)])


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher(tiny_cfg())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, teacher):
    torch.manual_seed(1)
    model = open_clip.create_model("teacher-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


class CountImages:
    """Wraps a teacher's forward to count the images it encodes."""

    def __init__(self, forward):
        self.inner, self.images = forward, 0

    def __call__(self, image=None, text=None):
        if image is not None:
            self.images += image.shape[0]
        return self.inner(image=image, text=text)


@pytest.fixture(scope="module")
def direct(teacher, batch):
    """Plain loops over method.md §4 with open_clip's own PIL preprocessing and encoders:
    tau, T (raw dot max) and the cosine max (for the logit-scale variant)."""
    clip, tok = teacher.clip, open_clip.get_tokenizer("teacher-tiny")
    transform = image_transform_v2(PreprocessCfg(**teacher.preprocess), is_train=False)
    Q, (B, L) = len(batch.captions), batch.video_mask.shape
    tau = torch.full((Q, B, L), PAD_SCORE)
    T = torch.full((Q, B), -math.inf)
    cos_max = torch.full((Q, B), -math.inf)
    with torch.no_grad():
        t = [clip.encode_text(tok([c]))[0] for c in batch.captions]
        for j in range(B):
            for l in range(L):
                if batch.video_mask[j, l] == 0:
                    continue
                img = Image.fromarray(batch.teacher_frames[j, l].numpy())
                f = clip.encode_image(transform(img)[None])[0]
                for i in range(Q):
                    cos = float(t[i] @ f / (t[i].norm() * f.norm()))
                    tau[i, j, l] = cos
                    T[i, j] = max(T[i, j], float(t[i] @ f))
                    cos_max[i, j] = max(cos_max[i, j], cos)
    return tau, T, cos_max


def test_targets_match_direct_computation(teacher, batch, direct):
    out = teacher.targets(batch)
    tau, T, _ = direct
    assert out.tau.shape == (6, 3, 9) and out.T.shape == (6, 3)
    torch.testing.assert_close(out.tau, tau, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.T, T, atol=1e-4, rtol=1e-5)
    assert (out.tau[:, 2, 3:] == PAD_SCORE).all()  # video 2 has 3 of 9 frames


def test_logit_scale_variant(batch, direct):
    torch.manual_seed(0)  # the same weights as the `teacher` fixture
    t = build_teacher(tiny_cfg(logit_scale_targets=True))
    out = t.targets(batch)
    tau, _, cos_max = direct
    assert t.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's initial scale
    torch.testing.assert_close(out.T, t.logit_scale * cos_max, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.tau, tau, atol=1e-5, rtol=1e-5)


def test_similarity_targets_ignore_padded_frames():
    g = torch.Generator().manual_seed(3)
    text, frames = torch.randn(4, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    frames[0, 2] = 100 * text[0]  # a padded frame that would win every max
    out = similarity_targets(text, frames, mask)
    for i in range(4):
        for j in range(2):
            n = int(mask[j].sum())
            assert out.T[i, j] == pytest.approx(max(float(text[i] @ frames[j, l])
                                                    for l in range(n)), rel=1e-5)
            for l in range(3):
                want = F.cosine_similarity(text[i], frames[j, l], dim=0) if l < n else PAD_SCORE
                assert out.tau[i, j, l] == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def test_each_distinct_frame_is_encoded_once(teacher, batch):
    counter = CountImages(teacher.forward)
    teacher.forward = counter
    try:
        teacher.targets(batch)
    finally:
        teacher.forward = counter.inner
    valid = (batch.video_mask > 0) & (batch.teacher_index >= 0)
    distinct = {(j, int(batch.teacher_index[j, l])) for j, l in valid.nonzero().tolist()}
    assert counter.images == len(distinct) == 4 + 5 + 3


@pytest.mark.parametrize("shape,mode,size", [((32, 32), "shortest", 32), ((48, 40), "shortest", 32),
                                             ((40, 64), "shortest", 32), ((50, 70), "squash", 32),
                                             ((50, 70), "longest", 32), ((60, 80), "shortest",
                                                                         (32, 40))])
def test_preprocessing_matches_open_clip(shape, mode, size):
    rng = np.random.default_rng(1)
    h, w = shape
    coarse = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    img = np.array(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))  # a smooth image
    cfg = dict(dataclasses.asdict(PreprocessCfg()), size=size, resize_mode=mode)
    ref = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(Image.fromarray(img))
    ours = preprocess_frames(torch.from_numpy(img)[None], cfg)[0]
    assert ours.shape == ref.shape
    one_level = 1 / 255 / min(cfg["std"]) + 1e-6  # PIL and torch may round a pixel differently
    assert (ours - ref).abs().max() <= one_level
    if shape == (32, 32):
        assert torch.equal(ours, ref)


def test_cache_returns_fresh_embeddings_and_spills(tmp_path, batch, checkpoint):
    cfg = tiny_cfg(pretrained=str(checkpoint), cache=True, cache_mem_mb=0,
                   cache_dir=str(tmp_path))
    fresh = build_teacher(cfg.model_copy(update={"cache": False})).targets(batch)
    cached = build_teacher(cfg)
    first = cached.targets(batch)
    assert cached.cache.stats.spilled == 3 and cached.cache.memory_bytes == 0
    again = build_teacher(cfg)  # a new process would see the same spilled files
    counter = CountImages(again.forward)
    again.forward = counter
    second = again.targets(batch)
    assert counter.images == 0 and again.cache.stats.loaded == 3
    for out in (first, second):
        torch.testing.assert_close(out.tau, fresh.tau, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.T, fresh.T, atol=1e-5, rtol=0)
    files = list((tmp_path / cached.identity).glob("*.npz"))
    assert len(files) == 3


def test_changed_teacher_misses_the_cache(tmp_path, batch, checkpoint):
    cfg = tiny_cfg(pretrained=str(checkpoint), cache=True, cache_dir=str(tmp_path))
    build_teacher(cfg.model_copy(update={"cache_mem_mb": 0})).targets(batch)  # spill all
    torch.manual_seed(7)
    other_path = tmp_path / "other.pt"
    torch.save(open_clip.create_model("teacher-tiny").state_dict(), other_path)
    other = build_teacher(cfg.model_copy(update={"pretrained": str(other_path)}))
    same = build_teacher(cfg)
    assert other.identity != same.identity and other.identity.startswith("teacher-tiny-")
    counter = CountImages(other.forward)
    other.forward = counter
    other.targets(batch)
    assert counter.images == 12 and other.cache.stats.hits == 0
    same.targets(batch)
    assert same.cache.stats.hits == 12 and same.cache.stats.misses == 0


def test_cache_lru_by_bytes(tmp_path):
    emb = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)
    entry = 2 * 8 + 2 * 3 * 4  # two frames: int64 index + float32 rows
    cache = FrameEmbeddingCache("t", max_bytes=2 * entry)
    cache.put([("a", 0), ("a", 5)], emb[:2])
    cache.put([("b", 1), ("b", 2)], emb[2:])
    got, found = cache.lookup([("a", 5), ("a", 1), ("b", 2)], 3)
    assert found.tolist() == [True, False, True]
    torch.testing.assert_close(got[0], emb[1])
    torch.testing.assert_close(got[2], emb[3])
    cache.put([("c", 0), ("c", 1)], emb[:2])  # evicts a: the lookup touched a, then b
    assert cache.memory_bytes == 2 * entry
    assert cache.lookup([("a", 0)], 3)[1].tolist() == [False]  # no spill dir: dropped
    cache.put([("b", 7)], emb[:1])  # merges into b's entry (and evicts c)
    got, found = cache.lookup([("b", 1), ("b", 2), ("b", 7), ("c", 0)], 3)
    assert found.tolist() == [True, True, True, False]
    assert torch.equal(got[:3], emb[[2, 3, 0]])


def test_loads_a_checkpoint_path(checkpoint, batch):
    t = build_teacher(tiny_cfg(pretrained=str(checkpoint)))
    want = torch.load(checkpoint, weights_only=True)
    got = t.clip.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].reshape(want[k].shape), want[k], rtol=0, atol=0)
    assert param_fraction(t.clip) == 1.0


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherError, match="not found.*teacher pretrain"):
        build_teacher(tiny_cfg(pretrained=str(tmp_path / "nope.pt")))
    with pytest.raises(TeacherError, match="neither an open_clip tag"):
        build_teacher(tiny_cfg(pretrained="laion9000"))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(TeacherError, match=r"not an open_clip architecture.*ViT-B-32"):
        build_teacher(TeacherConfig(arch="ViT-B-33"))
    with pytest.raises(TeacherError, match="teacher.arch='other'"):
        build_teacher(tiny_cfg(arch="other"))
    with pytest.raises(TeacherError, match="does not exist"):
        build_teacher(tiny_cfg(model_config="no/such.json"))


def test_mismatched_checkpoint_keys_are_a_clear_error(tmp_path):
    body = json.loads(Path(TINY).read_text())
    body["vision_cfg"]["layers"] = 3
    body["embed_dim"] = 32
    path = tmp_path / "teacher-deeper.json"
    path.write_text(json.dumps(body))
    open_clip.add_model_config(path)
    ckpt = tmp_path / "deeper.pt"
    torch.save({"state_dict": open_clip.create_model("teacher-deeper").state_dict()}, ckpt)
    with pytest.raises(TeacherError) as err:
        build_teacher(tiny_cfg(pretrained=str(ckpt)))
    msg = str(err.value)
    assert "does not fit the architecture" in msg and "unexpected" in msg
    assert "visual.transformer.resblocks.2" in msg and "shape mismatch" in msg
    assert "text_projection" in msg
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(TeacherError, match="cannot read teacher checkpoint"):
        build_teacher(tiny_cfg(pretrained=str(junk)))


def test_pretrained_tag_and_hub_paths_resolve_without_download():
    src = resolve_weights(TeacherConfig(arch="ViT-B-32", pretrained="openai"), download=False)
    assert src.model_name == "ViT-B-32" and src.label == "openai"
    assert tuple(src.preprocess["mean"]) == open_clip.OPENAI_DATASET_MEAN
    hub = resolve_weights(TeacherConfig(pretrained="hf-hub:timm/vit_base_patch32_clip_224.openai"),
                          download=False)
    assert hub.model_name.startswith("hf-hub:") and hub.checkpoint is None


def test_precomputed_placement(batch):
    g = torch.Generator().manual_seed(5)
    b = dataclasses.replace(batch, teacher_text_emb=torch.randn(6, 16, generator=g),
                            teacher_frame_emb=torch.randn(3, 9, 16, generator=g))
    t = build_teacher(TeacherConfig(placement="precomputed"))
    out = t.targets(b)
    want = similarity_targets(b.teacher_text_emb, b.teacher_frame_emb, b.video_mask)
    torch.testing.assert_close(out.tau, want.tau)
    torch.testing.assert_close(out.T, want.T)
    with pytest.raises(TeacherError, match="no teacher_text_emb"):
        t.targets(batch)


def test_torchvision_guard_is_a_noop_once_importable():
    from trainer.teacher.compat import guard_torchvision
    assert guard_torchvision() is False
    import torchvision.transforms  # noqa: F401


@pytest.mark.slow
def test_pretraining_lowers_the_contrastive_loss(tmp_path):
    from sharding.synthetic import World, WorldConfig, write_pretrain
    from trainer.teacher.pretrain import pretrain

    write_pretrain(tmp_path / "pre", World(0, WorldConfig()), pairs=96, pairs_per_shard=48)
    out = tmp_path / "teacher.pt"
    res = pretrain(str(tmp_path / "pre"), str(out), steps=12, batch_size=32, lr=2e-3, seed=0,
                   save_at=[4])
    losses = res["losses"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2
    assert sorted(res["checkpoints"]) == [4, 12] and out.is_file()
    assert Path(res["checkpoints"][4]).name == "teacher-step4.pt"
    build_teacher(tiny_cfg(pretrained=str(out)))  # loads as a teacher


def test_pretraining_shards_come_from_a_versioned_image_text_manifest(tmp_path):
    from sharding.synthetic import World, write_pretrain
    from sharding.writer import ManifestError, load_manifest
    from trainer.teacher.pretrain import image_text_pairs, shard_urls

    pre = tmp_path / "pre"
    write_pretrain(pre, World(0), pairs=6, pairs_per_shard=4, progress=False)
    urls = shard_urls(str(pre))
    assert [Path(u).name for u in urls] == ["pretrain-000000.tar", "pretrain-000001.tar"]
    img, text = next(image_text_pairs(urls, seed=0))
    assert img.shape == (32, 32, 3) and img.flags.writeable and text

    with pytest.raises(ManifestError, match="image-text shards, not video-text ones"):
        load_manifest(pre)   # as the training data reader reads

    manifest = pre / "manifest.json"
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in old.items() if k != "schema_version"}))
    with pytest.raises(ManifestError, match=f"{manifest}.*schema_version None"):
        shard_urls(str(pre))
    manifest.unlink()
    with pytest.raises(ManifestError, match=f"no shard manifest at {manifest}.*--shards"):
        shard_urls(str(pre))


def test_zero_shot_eval_matches_a_plain_ranking(teacher):
    from trainer.method.metrics import rank_metrics
    from trainer.teacher.pretrain import zero_shot_eval

    rng = np.random.default_rng(4)
    samples = [video(rng, i, n, nt, c) for i, (n, nt, c) in
               enumerate([(6, 3, 2), (4, 8, 1), (5, 5, 3), (3, 2, 2), (7, 7, 1)])]
    got = zero_shot_eval(teacher, samples, video_chunk=2)
    clip, tok = teacher.clip, open_clip.get_tokenizer("teacher-tiny")
    with torch.no_grad():
        vids = []
        for s in samples:
            idx = align_index(len(s.teacher_frames), len(s.frames))
            pix = preprocess_frames(torch.from_numpy(s.teacher_frames[idx]), teacher.preprocess)
            vids.append(F.normalize(clip.encode_image(pix), dim=-1))
        ranks = []
        for j, s in enumerate(samples):
            for cap in s.captions:
                t = F.normalize(clip.encode_text(tok([cap]))[0], dim=0)
                scores = [float((v @ t).max()) for v in vids]
                ranks.append(1 + sum(scores[k] >= scores[j] for k in range(len(vids)) if k != j))
    assert got == pytest.approx(rank_metrics(ranks))

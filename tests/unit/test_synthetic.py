"""The synthetic PRVR world: deterministic per seed, and the structure docs/synthetic-world.md promises."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sharding.reader import read_all
from sharding.synthetic import (ACTIONS, COLOURS, PATTERNS, SHAPES, World, WorldConfig,
                                build_world, caption_concepts, oracle_scores)
from sharding.writer import IMAGE_TEXT, load_manifest
from trainer.method.metrics import rank_metrics, ranks_from_scores


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _hue(rgb: np.ndarray) -> np.ndarray:
    c = np.asarray(rgb, np.float64) - np.mean(rgb)
    return c / np.linalg.norm(c)


def _named_colour(pixels: np.ndarray) -> str:
    """The palette colour whose hue is nearest the mean of ``pixels`` (k, 3)."""
    mean = _hue(pixels.mean(0))
    return max(COLOURS, key=lambda name: float(_hue(COLOURS[name]) @ mean))


def _saturated(img: np.ndarray, threshold: int = 60) -> np.ndarray:
    """Pixels far from grey: the coloured objects (clutter is grey)."""
    img = img.astype(np.int64)
    return img.max(-1) - img.min(-1) > threshold


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, videos=24, eval_videos=8, seed=7, pretrain_pairs=40, videos_per_shard=10,
                progress=False)
    return out


def test_same_seed_gives_byte_identical_shards(world_dir, tmp_path):
    build_world(tmp_path, videos=24, eval_videos=8, seed=7, pretrain_pairs=40,
                videos_per_shard=10, progress=False)
    first, again = _tree_digest(world_dir), _tree_digest(tmp_path)
    assert any(name.endswith(".tar") for name in first)
    assert first == again
    other = tmp_path / "other"
    build_world(other, videos=24, eval_videos=8, seed=8, pretrain_pairs=40,
                videos_per_shard=10, progress=False)
    differ = _tree_digest(other)
    assert first["train/train-000000.tar"] != differ["train/train-000000.tar"]


def test_manifests_give_splits_counts_and_dims(world_dir):
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        m = json.loads((world_dir / split / "manifest.json").read_text())
        assert m["split"] == split
        assert m["dims"] == {"video_dim": 128, "query_dim": 64, "image_size": 32}
        assert m["totals"]["videos"] == n and m["skipped"]["count"] == 0
        samples = read_all(str(world_dir / split))
        assert m["totals"]["captions"] == sum(len(s.cap_ids) for s in samples)


def test_shards_hold_the_world_samples(world_dir):
    world = World(7)
    got = read_all(str(world_dir / "val"))
    assert [s.video_id for s in got] == [f"syn_val_{i:06d}" for i in range(8)]
    for i, s in enumerate(got):
        want = world.sample("val", i)
        np.testing.assert_allclose(s.frames, want.frames, atol=1e-3)
        for a, b in zip(s.tokens, want.tokens):
            np.testing.assert_allclose(a, b, atol=1e-3)
        assert s.captions == want.captions and s.moments == want.moments
        assert s.teacher_frames.shape == (s.n_frames_orig, 32, 32, 3)


def test_every_caption_names_one_minority_moment_of_its_own_video():
    world = World(3)
    for i in range(60):
        lay = world.layout("train", i)
        sample = world.sample("train", i, with_frames=False)
        assert 2 <= len(sample.captions) <= 6 and 1 <= len(lay.moments) <= 3
        assert 16 <= lay.n_frames <= 64
        covered = sum(m.end - m.start for m in lay.moments)
        assert covered * 2 < lay.n_frames                      # mostly background
        spans = {(m.start, m.end): m for m in lay.moments}
        for text, (start, end) in zip(sample.captions, sample.moments):
            moment = spans[(int(start), int(end))]             # the moment exists in this video
            assert (end - start) * 2 < lay.n_frames
            named = caption_concepts(text)
            assert "action" in named and len(named) >= 3
            assert all(getattr(moment, kind) == word for kind, word in named.items()), text


def test_hard_negatives_share_attributes_across_videos():
    world = World(3)
    layouts = [world.layout("val", i) for i in range(40)]
    shared = 0
    for a, lay in enumerate(layouts):
        for m in lay.moments:
            others = [o for b, other in enumerate(layouts) if b != a for o in other.moments]
            shared += any(sum((o.colour == m.colour, o.shape == m.shape, o.action == m.action)) >= 2
                          for o in others)
    assert shared >= 0.8 * sum(len(lay.moments) for lay in layouts)


def test_student_moment_frames_are_closer_to_the_caption_concepts_than_background():
    world = World(5)
    gaps = []
    for i in range(40):
        lay = world.layout("train", i)
        frames = world.student_frames(lay, np.random.default_rng(i))
        frames /= np.linalg.norm(frames, axis=1, keepdims=True)
        inside = np.zeros(lay.n_frames, bool)
        for m in lay.moments:
            inside[m.start:m.end] = True
        for text, k in lay.captions:
            c = caption_concepts(text)
            q = world.moment_vector(c.get("colour"), c.get("shape"), c.get("action"))
            cos = frames @ (q / np.linalg.norm(q))
            m = lay.moments[k]
            gaps.append(cos[m.start:m.end].mean() - cos[~inside].mean())
    gaps = np.asarray(gaps)
    assert (gaps > 0).all()
    assert gaps.mean() > 0.3


def test_patterns_are_invisible_to_the_student_and_actions_to_the_teacher():
    world = World(2)
    lay = world.layout("train", 0)
    other_pattern = dataclasses.replace(lay, moments=[dataclasses.replace(
        m, pattern=PATTERNS[(PATTERNS.index(m.pattern) + 1) % len(PATTERNS)]) for m in lay.moments])
    other_action = dataclasses.replace(lay, moments=[dataclasses.replace(
        m, action=ACTIONS[(ACTIONS.index(m.action) + 1) % len(ACTIONS)]) for m in lay.moments])
    rng = np.random.default_rng
    np.testing.assert_array_equal(world.student_frames(lay, rng(1)),
                                  world.student_frames(other_pattern, rng(1)))
    assert not np.array_equal(world.student_frames(lay, rng(1)),
                              world.student_frames(other_action, rng(1)))
    np.testing.assert_array_equal(world.render(lay, rng(1)), world.render(other_action, rng(1)))
    assert not np.array_equal(world.render(lay, rng(1)), world.render(other_pattern, rng(1)))


def test_rendered_moment_frames_show_the_named_colour(world_dir):
    world = World(7)
    checked = 0
    for s in read_all(str(world_dir / "train")):               # decoded JPEGs, as the teacher sees
        lay = world.layout("train", int(s.video_id.rsplit("_", 1)[1]))
        stray = np.zeros(lay.n_frames, bool)
        for d in lay.distractors:
            stray[d.start:d.end] = d.kind != "action"
        in_moment = np.zeros(lay.n_frames, bool)
        for m in lay.moments:
            in_moment[m.start:m.end] = True
            for f in range(m.start, m.end):
                sat = _saturated(s.teacher_frames[f])
                assert sat.sum() >= 20
                assert _named_colour(s.teacher_frames[f][sat]) == m.colour
                checked += 1
        for f in np.flatnonzero(~in_moment & ~stray):
            assert _saturated(s.teacher_frames[f]).sum() <= 3  # clutter only
    assert checked > 100


def test_frames_beyond_128_are_uniformly_sampled_and_moments_stay_in_original_frames():
    world = World(1, WorldConfig(min_frames=150, max_frames=300))
    s = world.sample("train", 0)
    assert s.n_frames_orig >= 150 and s.frames.shape == (128, 128)
    assert s.teacher_frames.shape[0] == s.n_frames_orig
    assert max(end for _, end in s.moments) <= s.n_frames_orig
    np.testing.assert_allclose(np.linalg.norm(s.frames, axis=1), 1, atol=1e-4)


def test_pretrain_split_is_readable_image_text(world_dir):
    import webdataset as wds

    manifest = load_manifest(world_dir / "pretrain", kind=IMAGE_TEXT)
    assert manifest.totals["captions"] == 40 and manifest.dims == {"image_size": 32}
    assert manifest.generator == load_manifest(world_dir / "train").generator
    urls = manifest.urls()
    for url, s in zip(urls, manifest.shards):
        assert hashlib.sha256(Path(url).read_bytes()).hexdigest() == s.sha256
    pairs = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False)
                 .decode("rgb8").to_tuple("jpg", "txt"))
    assert len(pairs) == 40
    vocab = set(COLOURS) | set(SHAPES) | set(PATTERNS)
    named = 0
    for img, text in pairs:
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        words = caption_concepts(text)
        assert "action" not in words                            # a still image shows no motion
        if "colour" in words:
            assert set(words.values()) <= vocab
            assert _named_colour(img[_saturated(img)]) == words["colour"]
            named += 1
    assert named >= 30


def _oracle_ranks(world, samples) -> torch.Tensor:
    scores, gt = oracle_scores(world, samples)
    return ranks_from_scores(torch.from_numpy(scores), torch.from_numpy(gt))


def test_oracle_is_above_chance_and_far_from_perfect():
    world = World(0)
    samples = [world.sample("val", i, with_frames=False) for i in range(150)]
    r = rank_metrics(_oracle_ranks(world, samples))
    chance_r10 = 100 * 10 / 150
    assert 3 * chance_r10 < r["R10"] < 99
    assert 10 < r["R1"] < 60


def test_oracle_ranks_are_pessimistic_on_ties():
    world = World(0)
    s = world.sample("val", 0, with_frames=False)
    twin = dataclasses.replace(s, video_id="twin")
    ranks = _oracle_ranks(world, [s, twin])
    assert (ranks == 2).all()

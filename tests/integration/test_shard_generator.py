"""Shard writers record what generated a split (config, seed) and never mix two datasets in one
folder: the same generator resumes, another one is refused naming the folder, the differing
values and the fix, and ``overwrite`` rewrites the whole split."""
from __future__ import annotations

import pytest

from launch.cli import main
from sharding.msssl import convert
from sharding.reader import read_all
from sharding.synthetic import World, build_world, write_pretrain
from sharding.writer import ManifestError, load_manifest, write_split
from tests.integration.test_reader import DIMS, _ids, _video
from tests.release_fixture import make_release


def _shas(folder) -> dict[str, str]:
    return {s.name: s.sha256 for s in load_manifest(folder, kind=None).shards}


def test_write_split_reuses_only_shards_of_the_same_generator(tmp_path):
    calls = []

    def load(vid):
        calls.append(vid)
        return _video(vid)

    write_split(tmp_path, "train", _ids(6), load, videos_per_shard=2, dims=DIMS,
                progress=False, generator={"seed": 0, "config": {"n": (1, 2)}})
    assert load_manifest(tmp_path).generator == {"seed": 0, "config": {"n": [1, 2]}}
    first, calls[:] = _shas(tmp_path), []
    write_split(tmp_path, "train", _ids(6), load, videos_per_shard=2, dims=DIMS,
                progress=False, generator={"seed": 0, "config": {"n": (1, 2)}})
    assert calls == [] and _shas(tmp_path) == first

    with pytest.raises(ManifestError) as err:
        write_split(tmp_path, "train", _ids(6), load, videos_per_shard=2, dims=DIMS,
                    progress=False, generator={"seed": 1, "config": {"n": (1, 2)}})
    msg = str(err.value)
    assert str(tmp_path) in msg and "seed: 0 on disk, 1 now" in msg
    assert "--out" in msg and "--overwrite" in msg
    assert calls == [] and _shas(tmp_path) == first, "a refused run must not touch the shards"

    write_split(tmp_path, "train", _ids(6), load, videos_per_shard=2, dims=DIMS,
                progress=False, generator={"seed": 1, "config": {"n": (1, 2)}}, overwrite=True)
    assert calls == _ids(6), "overwrite rewrites the whole split"
    assert load_manifest(tmp_path).generator["seed"] == 1


def test_a_manifest_without_progress_record_is_checked_too(tmp_path):
    write_split(tmp_path, "val", _ids(3), _video, dims=DIMS, progress=False,
                generator={"seed": 0})
    (tmp_path / ".progress-val.json").unlink()
    with pytest.raises(ManifestError, match="seed: 0 on disk, 1 now"):
        write_split(tmp_path, "val", _ids(3), _video, dims=DIMS, progress=False,
                    generator={"seed": 1})


def test_shard_synthetic_with_a_new_seed_is_refused(tmp_path, capsys):
    out = tmp_path / "world"
    args = ["shard", "synthetic", "--out", str(out), "--videos", "8", "--eval-videos", "4",
            "--pretrain-pairs", "4", "--videos-per-shard", "4"]
    assert main(args + ["--seed", "0"]) == 0
    seed0 = _shas(out / "train")
    printed = capsys.readouterr().out
    # Where a student can land: the concept oracle and chance on 4 videos (every R@k>=5 is 100).
    assert "test: concept oracle SumR" in printed
    assert "chance SumR 325.0 over 4 videos" in printed

    assert main(args + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert str(out / "train") in err and "seed: 0 on disk, 1 now" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert _shas(out / "train") == seed0 and load_manifest(out / "train").generator["seed"] == 0

    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    fresh = build_world(tmp_path / "fresh", videos=8, eval_videos=4, pretrain_pairs=4, seed=1,
                        videos_per_shard=4, progress=False)
    for split in ("train", "val", "test", "pretrain"):
        assert _shas(out / split) == _shas(tmp_path / "fresh" / split), split
        assert load_manifest(out / split, kind=None).generator == fresh[split].generator
    assert fresh["pretrain"].generator["seed"] == 1


def test_pretraining_split_of_another_world_is_refused(tmp_path):
    write_pretrain(tmp_path, World(0), pairs=6, pairs_per_shard=4, progress=False)
    first = _shas(tmp_path)
    write_pretrain(tmp_path, World(0), pairs=6, pairs_per_shard=4, progress=False)
    assert _shas(tmp_path) == first
    with pytest.raises(ManifestError, match="seed: 0 on disk, 1 now") as err:
        write_pretrain(tmp_path, World(1), pairs=6, pairs_per_shard=4, progress=False)
    assert str(tmp_path) in str(err.value) and "--overwrite" in str(err.value)
    assert _shas(tmp_path) == first, "a refused run must not touch the shards"
    m = write_pretrain(tmp_path, World(1), pairs=6, pairs_per_shard=4, progress=False,
                       overwrite=True)
    assert m.generator["seed"] == 1 and _shas(tmp_path) != first


def test_msssl_convert_refuses_other_release_settings(tmp_path):
    rel = make_release(tmp_path / "release", "tvr", {"test": 4}, clip=True)
    out = tmp_path / "out"
    convert(rel.root, "tvr", "test", out, videos_per_shard=2, clip=False, progress=False)
    assert load_manifest(out / "test").generator["clip"] is False
    with pytest.raises(ManifestError, match="clip: False on disk, True now"):
        convert(rel.root, "tvr", "test", out, videos_per_shard=2, clip=True, progress=False)
    convert(rel.root, "tvr", "test", out, videos_per_shard=2, clip=True, overwrite=True,
            progress=False)
    assert all(s.teacher_frame_emb is not None for s in read_all(str(out / "test")))


def test_msssl_rerun_after_a_feature_file_changed_is_refused(tmp_path):
    """A feature file rewritten since (same size, new content) is noticed: the rerun names
    --overwrite instead of keeping shards of the old features."""
    import os

    import numpy as np

    rel = make_release(tmp_path / "release", "tvr", {"test": 4}, clip=False)
    out = tmp_path / "out"
    convert(rel.root, "tvr", "test", out, videos_per_shard=2, clip=False, progress=False)
    first = _shas(out / "test")
    feature = next((rel.root / "tvr" / "FeatureData").glob("*/feature.bin"))
    data = np.fromfile(feature, np.float32)
    (data + 1).tofile(feature)
    stat = feature.stat()
    os.utime(feature, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ManifestError, match="feature.bin.*--overwrite"):
        convert(rel.root, "tvr", "test", out, videos_per_shard=2, clip=False, progress=False)
    assert _shas(out / "test") == first
    convert(rel.root, "tvr", "test", out, videos_per_shard=2, clip=False, overwrite=True,
            progress=False)
    assert _shas(out / "test") != first

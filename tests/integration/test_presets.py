"""The paper presets on a converted MS-SL release: `dldkd validate` fails when the shards lack
what the teacher placement reads, and a validation split equal to test is announced."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from launch.validate.checks import validate_run
from launch.validate.result import FAIL, OK, WARN
from sharding.msssl import convert
from tests.release_fixture import make_release

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Charades splits converted twice: with the release's CLIP files and without them; the
    release's val caption file is a copy of its test file, as it may be in the wild."""
    tmp = tmp_path_factory.mktemp("presets")
    rel = make_release(tmp / "release", "charades", {"train": 5, "test": 3})
    text = rel.root / "charades" / "TextData"
    shutil.copy(text / "charadestest.caption.txt", text / "charadesval.caption.txt")
    for split in ("train", "val", "test"):
        convert(rel.root, "charades", split, tmp / "clip", progress=False)
        convert(rel.root, "charades", split, tmp / "noclip", clip=False, progress=False)
    return tmp


def _validate(preset: str, shards: Path, tmp_path, **extra):
    overrides = {"data.train": shards / "train", "data.val": shards / "val",
                 "data.test": shards / "test", "run.storage": tmp_path / "runs",
                 "data.batch_videos": 2, "data.loader_workers": 0, "dist.num_workers": 1,
                 "dist.use_gpu": False, "tracking.uri": "", **extra}
    report = validate_run(str(ROOT / "configs" / preset),
                          [f"{k}={v}" for k, v in overrides.items()])
    return report, {c.name: c for c in report.checks}


@pytest.mark.parametrize("collection", ["tvr", "activitynet", "charades"])
def test_presets_use_precomputed_features_and_the_val_split(collection):
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / f"{collection}.yaml")
    assert cfg.teacher.placement == "precomputed"
    assert cfg.data.val.endswith("/val") and cfg.data.test.endswith("/test")
    online = load_config(ROOT / "configs" / f"{collection}-online.yaml")
    assert (online.teacher.placement, online.teacher.arch, online.teacher.pretrained) == (
        "replicated", "ViT-B-32", "openai")
    assert online.data.val == cfg.data.val and online.model == cfg.model


def test_online_preset_on_frameless_shards_fails_naming_shard_frames(release, tmp_path):
    report, checks = _validate("charades-online.yaml", release / "clip", tmp_path,
                               **{"teacher.pretrained": ""})
    check = checks["teacher inputs"]
    assert not report.ok and check.status == FAIL
    assert "dldkd shard frames --videos VIDEO_DIR --shards" in check.message
    assert str(release / "clip" / "train") in check.message
    assert "teacher.placement=precomputed" in check.message      # these shards have embeddings


def test_precomputed_preset_without_clip_embeddings_fails_naming_shard_msssl(release, tmp_path):
    report, checks = _validate("charades.yaml", release / "noclip", tmp_path)
    check = checks["teacher inputs"]
    assert not report.ok and check.status == FAIL
    assert "dldkd shard msssl" in check.message
    assert "new_clip_vit_32_<collection>_vid_features.hdf5" in check.message


def test_precomputed_preset_on_the_converted_release_passes(release, tmp_path):
    report, checks = _validate("charades.yaml", release / "clip", tmp_path)
    assert checks["teacher inputs"].status == OK and checks["teacher"].status == OK
    # The release's val caption file equals its test file: said, not failed.
    assert checks["val vs test"].status == WARN
    assert "exactly the captions of data.test" in checks["val vs test"].message
    assert report.ok, report.render()


def test_a_run_selecting_on_test_captions_logs_and_tags_it(release, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from trainer.config import load_config
    from trainer.run import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(ROOT / "configs" / "charades.yaml", [
        f"data.train={release / 'clip' / 'train'}", f"data.val={release / 'clip' / 'val'}",
        f"data.test={release / 'clip' / 'test'}", f"run.storage={tmp_path / 'runs'}",
        "run.name=valtest", f"tracking.uri={uri}", "tracking.system_metrics=false",
        "data.batch_videos=2", "data.loader_workers=0", "data.steps_per_epoch=1",
        "train.epochs=1", "model.hidden=32", "dist.num_workers=1", "dist.use_gpu=false",
        "dist.precision=fp32", "dist.zero_stage=0"])
    with caplog.at_level(logging.WARNING, logger="dldkd"):
        train(cfg, use_deepspeed=False)
    assert any("exactly the captions of data.test" in r.getMessage() for r in caplog.records)
    client = MlflowClient(uri)
    run, = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment)
                               .experiment_id], "tags.`dldkd.run_key` = 'valtest'")
    assert run.data.tags["dldkd.val_is_test"] == "true"

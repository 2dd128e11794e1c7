"""Commands that write or read shard and run locations take ``s3://`` URLs (moto's S3 server):
shards and manifests land in the bucket (never in a local folder named ``s3:``), reruns resume
from what the bucket holds, and ``eval`` reads a run's ``best/`` and a split from the store."""
from __future__ import annotations

import json

import pytest

from launch.cli import main
from tests.release_fixture import make_release
from trainer.infra import storage

SMALL_WORLD = ["--videos", "8", "--eval-videos", "6", "--pretrain-pairs", "8",
               "--videos-per-shard", "4", "--min-frames", "8", "--max-frames", "12"]


def _etags(s3, *parts) -> dict[str, str]:
    return {k: v["ETag"] for k, v in storage.files(s3.url(*parts)).items()}


def test_shard_synthetic_to_s3_resumes_from_the_bucket(s3, tmp_path, monkeypatch, capsys):
    from sharding.reader import read_all

    monkeypatch.chdir(tmp_path)
    out = s3.url("world")
    assert main(["shard", "synthetic", "--out", out, *SMALL_WORLD]) == 0
    assert f"val: {out}/val" in capsys.readouterr().out
    assert not (tmp_path / "s3:").exists()
    assert len(read_all(s3.url("world", "val"))) == 6
    first = _etags(s3, "world")
    assert {"train/manifest.json", "val/manifest.json", "pretrain/manifest.json"} <= set(first)

    # This node's cache is gone: the rerun finds the shards in the bucket and keeps them; another
    # seed is refused by what the bucket's manifests record.
    import shutil

    shutil.rmtree(storage.cache_dir("out", out, "world"))
    assert main(["shard", "synthetic", "--out", out, *SMALL_WORLD]) == 0
    assert _etags(s3, "world") == first
    assert main(["shard", "synthetic", "--out", out, *SMALL_WORLD, "--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _etags(s3, "world") == first


def test_shard_msssl_to_s3(s3, tmp_path, monkeypatch, capsys):
    from sharding.reader import read_all

    monkeypatch.chdir(tmp_path)
    rel = make_release(tmp_path / "release", "tvr", {"test": 4}, clip=False)
    out = s3.url("tvr")
    s3.fs.pipe_file(s3.url("tvr", "train", "manifest.json"), b"{}")   # another split: untouched
    assert main(["shard", "msssl", "--root", str(rel.root), "--collection", "tvr", "--split",
                 "test", "--out", out, "--videos-per-shard", "2"]) == 0
    assert f"to {out}/test" in capsys.readouterr().out
    assert not (tmp_path / "s3:").exists()
    assert s3.exists("tvr", "test", "manifest.json")
    assert len(read_all(s3.url("tvr", "test"))) == 4
    assert s3.fs.cat_file(s3.url("tvr", "train", "manifest.json")) == b"{}"
    assert not (storage.cache_dir("out", out, "tvr") / "train").exists()


def test_a_failed_shard_writer_uploads_nothing(s3, tmp_path, monkeypatch):
    """A writer that fails midway leaves the bucket as it was (no shard without a manifest)."""
    import sharding.synthetic as synthetic

    monkeypatch.chdir(tmp_path)
    real = synthetic.write_pretrain

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "write_pretrain", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["shard", "synthetic", "--out", s3.url("w"), *SMALL_WORLD])
    s3.fs.invalidate_cache()
    assert not s3.fs.find(s3.url("w"))
    monkeypatch.setattr(synthetic, "write_pretrain", real)
    assert main(["shard", "synthetic", "--out", s3.url("w"), *SMALL_WORLD]) == 0
    assert s3.exists("w", "pretrain", "manifest.json")


def test_eval_reads_best_and_split_from_s3(world, s3, tmp_path, monkeypatch, capsys):
    """``dldkd eval --checkpoint s3://.../best --split s3://...`` (what the MLflow tag
    dldkd.best_checkpoint names) evaluates and writes its report to the bucket."""
    from tests.conftest import tiny_overrides
    from trainer.config import load_config
    from trainer.infra import best
    from trainer.method.student import DualStudent

    monkeypatch.chdir(tmp_path)
    cfg = load_config(f"{__import__('pathlib').Path(__file__).parents[2]}/configs/tiny.yaml",
                      tiny_overrides(world, tmp_path, "e"))
    student = DualStudent(cfg.model)
    best.save(s3.url("runs", "e", "best"), tmp_path / "cache", student.state_dict(),
              cfg.to_dict(), {"step": 1})
    s3.upload(world / "val", "val")
    report = s3.url("reports", "val.json")
    assert main(["eval", "--checkpoint", s3.url("runs", "e", "best"), "--split", s3.url("val"),
                 "--out", report]) == 0
    assert "SumR" in capsys.readouterr().out
    saved = json.loads(storage.read_bytes(report))
    assert saved["videos"] == 32 and saved["metrics"]["SumR"] > 0
    assert not (tmp_path / "s3:").exists()

    assert main(["eval", "--checkpoint", s3.url("runs", "none", "best"), "--split",
                 s3.url("val")]) == 2
    assert f"{s3.url('runs', 'none', 'best')}/student.pt is missing" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["teacher", "pretrain", "--shards", "x", "--out", "s3://b/t.pt"],
    ["demo", "--out", "s3://b/demo"],
    ["report", "--experiment", "e", "--out", "s3://b/report"],
])
def test_commands_that_write_local_files_refuse_urls(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "--out s3://b/" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()

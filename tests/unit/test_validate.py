"""``dldkd validate``: each misconfiguration is caught by its named check, the presets pass."""
from __future__ import annotations

import http.server
import importlib
import json
import os
import shutil
import socket
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import cli
from launch.validate.checks import exact_batches_per_rank, validate_run
from launch.validate.memory import (activation_elements, estimate_memory, student_param_count,
                                    teacher_param_count)
from launch.validate.result import FAIL, OK, WARN
from sharding.batch import Batch
from sharding.reader import ShardReader
from sharding.synthetic import build_world
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    # 10 videos per shard: 4 train shards, 2 each for val and test.
    build_world(out, videos=40, eval_videos=20, pretrain_pairs=50, progress=False,
                videos_per_shard=10)
    return out


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """Random weights of configs/teacher-tiny.json saved as the run reads them (validate opens
    the file)."""
    import trainer.teacher  # noqa: F401  (must precede open_clip)

    import open_clip

    open_clip.add_model_config(ROOT / "configs" / "teacher-tiny.json")
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(open_clip.create_model("teacher-tiny", pretrained=None).state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def good(world, tmp_path, teacher_file) -> list[str]:
    """Overrides of configs/tiny.yaml that pass every online check on the synthetic world."""
    model_config = tmp_path / "val-tiny.json"
    shutil.copy(ROOT / "configs" / "teacher-tiny.json", model_config)
    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_file, teacher)
    return [f"data.train={world / 'train'}", f"data.val={world / 'val'}",
            f"data.test={world / 'test'}", "teacher.arch=val-tiny",
            f"teacher.model_config={model_config}", f"teacher.pretrained={teacher}",
            f"run.storage={tmp_path / 'runs'}",
            # pinned here so the tests do not follow edits of the preset
            "data.batch_videos=16", "data.loader_workers=0", "data.resampled=true",
            "data.steps_per_epoch=0", "loss.hard_pool=5", "train.epochs=3",
            "train.eval_every=0", "train.ckpt_every=0", "dist.num_workers=1",
            f"dist.cpus_per_worker={os.cpu_count()}", "dist.grad_accum=1", "dist.use_gpu=false",
            "teacher.placement=replicated", "tracking.uri=''"]


def run(overrides: list[str], offline: bool = False, config: Path | None = ROOT / "configs" /
        "tiny.yaml"):
    report = validate_run(str(config) if config else None, overrides, offline=offline)
    return report, {c.name: c for c in report.checks}


def test_a_good_config_passes_every_check(good):
    report, checks = run(good)
    assert report.ok, report.render()
    assert not [c for c in report.checks if c.status != OK], report.render()
    for name in ("data.train", "data.val", "data.test", "data.train shards", "data.val shards",
                 "readers", "steps", "teacher", "storage", "tracking"):
        assert name in checks


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_shipped_presets_pass_offline(preset):
    # configs/tiny.yaml names no shards (its users pass data.train): offline, that alone fails
    over = ["data.train=shards/train"] if preset.stem == "tiny" else []
    report, checks = run(over, offline=True, config=preset)
    assert report.ok, report.render()
    assert "data.train" not in checks and "storage" not in checks   # config-only
    assert "OK" in report.render() and "memory per worker" in report.render()


@pytest.mark.parametrize("override, key", [("model.hidden=abc", "model.hidden"),
                                           ("dist.use_gpu=3", "dist.use_gpu"),
                                           ("data.batch_videos=1.5", "data.batch_videos"),
                                           ("model.hiden=32", "model.hidden")])
def test_a_wrong_type_or_key_is_one_failed_check(good, override, key):
    report, checks = run(good + [override])
    assert not report.ok
    assert [c.name for c in report.checks] == ["config"]
    assert checks["config"].status == FAIL and key in checks["config"].message
    assert report.render().startswith("FAIL  config")


def test_a_broken_yaml_file_is_a_failed_check(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden: [1, 2\n")
    report, checks = run([], config=bad)
    assert not report.ok and "bad.yaml: YAML syntax error at line 2" in checks["config"].message


def test_cpu_workers_below_the_cores_are_a_warning(good, monkeypatch):
    """Ray gives a worker OMP_NUM_THREADS = its CPUs: 1 of 8 cores makes an epoch ~8x slower."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    _, checks = run(good + ["dist.cpus_per_worker=1", "dist.num_workers=2"])
    assert checks["cpus"].status == WARN and "dist.cpus_per_worker=4" in checks["cpus"].message
    _, checks = run(good + ["dist.cpus_per_worker=4", "dist.num_workers=2"])
    assert checks["cpus"].status == OK


def test_batch_of_one_video_fails(good):
    report, checks = run(good + ["data.batch_videos=1"])   # refused by the config model
    assert checks["config"].status == FAIL and "data.batch_videos=1: the ranking losses need " \
        "at least 2 videos" in checks["config"].message


def test_batch_arithmetic_is_reported(good):
    _, checks = run(good + ["data.batch_videos=8", "dist.grad_accum=3", "dist.num_workers=2"])
    assert checks["batch"].status == OK
    assert "8 x 3 x 2 = 48" in checks["batch"].message
    _, checks = run(good + ["data.batch_videos=4"])   # loss.hard_pool=5 > 3 negatives
    assert checks["batch"].status == WARN and "loss.hard_pool=5" in checks["batch"].message


def test_batch_larger_than_the_split_fails(good):
    report, checks = run(good + ["data.batch_videos=64"])
    assert not report.ok
    assert checks["split size"].status == FAIL and "40 videos" in checks["split size"].message
    _, checks = run(good + ["data.batch_videos=32", "dist.num_workers=2"])
    assert checks["split size"].status == WARN   # 20 videos per rank < 32


def test_exact_reading_with_no_steps_fails(good):
    report, checks = run(good + ["data.resampled=false"])
    assert checks["steps"].status == FAIL and "data.steps_per_epoch" in checks["steps"].message
    report, checks = run(good + ["data.resampled=false"], offline=True)
    assert checks["steps"].status == FAIL   # needs no data


def test_exact_reading_steps_bounded_by_the_smallest_rank(good):
    # 4 shards of 10 videos, 2 ranks x 1 reader: each rank 2 shards = 20 videos = 2 batches of 16.
    base = good + ["data.resampled=false", "dist.num_workers=2"]
    _, checks = run(base + ["data.steps_per_epoch=2"])
    assert checks["steps"].status == OK, checks["steps"]
    _, checks = run(base + ["data.steps_per_epoch=3"])
    assert checks["steps"].status == FAIL and "<= 2" in checks["steps"].message


def test_steps_not_divisible_by_grad_accum_warns(good):
    _, checks = run(good + ["data.steps_per_epoch=5", "dist.grad_accum=2"])
    assert checks["steps"].status == WARN and "dist.grad_accum=2" in checks["steps"].message
    _, checks = run(good + ["data.steps_per_epoch=6", "dist.grad_accum=2"])
    assert checks["steps"].status == OK


def test_eval_interval_longer_than_the_run_warns(good):
    # tiny: 3 epochs; resampled: 40 // 16 = 2 steps per epoch -> 6 steps.
    _, checks = run(good + ["train.eval_every=7"])
    assert checks["intervals"].status == WARN and "6 steps" in checks["intervals"].message
    _, checks = run(good + ["train.ckpt_every=100"])
    assert checks["intervals"].status == WARN and "train.ckpt_every" in checks["intervals"].message
    _, checks = run(good + ["train.eval_every=6"])
    assert checks["intervals"].status == OK


def test_fewer_shards_than_readers_in_exact_mode_fails(good):
    exact = good + ["data.resampled=false", "data.steps_per_epoch=1", "dist.num_workers=2",
                    "dist.cpus_per_worker=4", "teacher.placement=zero3"]
    report, checks = run(exact + ["data.loader_workers=3"])   # 2 x 3 = 6 readers, 4 shards
    assert not report.ok
    assert checks["readers"].status == FAIL and "2 x 3 = 6" in checks["readers"].message
    _, checks = run(exact + ["data.loader_workers=2"])
    assert checks["readers"].status == OK
    _, checks = run(good + ["dist.num_workers=2", "data.loader_workers=3",
                            "dist.cpus_per_worker=4"])   # resampled: any shard count works
    assert checks["readers"].status == OK


def test_exact_batches_match_the_reader(world):
    manifest = json.loads((world / "train" / "manifest.json").read_text())
    videos = [s["videos"] for s in manifest["shards"]]
    for world_size, batch in ((2, 3), (1, 7), (4, 16)):
        want = exact_batches_per_rank(videos, batch, world_size, loader_workers=0)
        got = [sum(1 for _ in ShardReader(world / "train", rank=r, world_size=world_size,
                                          batch_videos=batch, loader_workers=0,
                                          resampled=False).epoch(0))
               for r in range(world_size)]
        assert got == want


def test_dim_mismatch_between_manifest_and_model_fails(good):
    report, checks = run(good + ["model.video_dim=256"])
    assert not report.ok
    for split in ("data.train", "data.val", "data.test"):
        assert checks[split].status == FAIL
        assert "video_dim=128" in checks[split].message and "256" in checks[split].message
    _, checks = run(good + ["model.query_dim=32"])
    assert checks["data.train"].status == FAIL and "query_dim" in checks["data.train"].message


def test_missing_shards_and_empty_train_fail(good, tmp_path):
    _, checks = run(good + [f"data.val={tmp_path / 'nothing'}"])
    assert checks["data.val"].status == FAIL and "manifest" in checks["data.val"].message
    _, checks = run(good + ["data.train=''"])
    assert checks["data.train"].status == FAIL


def _pickled_member(shard: Path) -> None:
    """Add a pickle member to the shard's first sample and make the manifest agree (checksum and
    size): only reading the members can find it."""
    import io
    import tarfile

    from sharding.writer import sha256_file

    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isreg()]
    key = members[0][0].name.split(".", 1)[0]
    extra = tarfile.TarInfo(f"{key}.extra.pyd")
    members.insert(1, (extra, b"\x80\x04N."))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, body in members:
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    manifest = json.loads((shard.parent / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == shard.name)
    entry.update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    (shard.parent / "manifest.json").write_text(json.dumps(manifest))


SHARD_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:3000]), "truncated"),
    "random bytes": (lambda p: p.write_bytes(bytes(torch.randint(0, 256, (p.stat().st_size,),
                                                                 dtype=torch.uint8).tolist())),
                     "sha256"),
    "listed but deleted": (lambda p: p.unlink(), "missing"),
    "pickled member": (_pickled_member, "extra.pyd"),
}


@pytest.mark.parametrize("case", SHARD_DAMAGE)
def test_damaged_shards_fail_validation(case, good, world, tmp_path):
    """What training would skip as damaged, or refuse, fails validation first."""
    damage, words = SHARD_DAMAGE[case]
    copy = tmp_path / "world-copy"
    shutil.copytree(world / "val", copy / "val")
    shard = sorted((copy / "val").glob("*.tar"))[1]
    damage(shard)
    report, checks = run(good + [f"data.val={copy / 'val'}"])
    check = checks["data.val shards"]
    assert not report.ok and check.status == FAIL, report.render()
    assert shard.name in check.message and words in check.message
    assert "dldkd shard" in check.message
    assert checks["data.train shards"].status == OK


def _rewrite(shard: Path, change) -> None:
    """Rewrite ``shard`` with ``change(members)`` applied to its [(TarInfo, bytes)] and make the
    manifest agree (checksum and size): only decoding the samples can find what changed."""
    import io
    import tarfile

    from tests.conftest import rehash

    with tarfile.open(shard) as tar:
        members = change([(info, tar.extractfile(info).read()) for info in tar if info.isreg()])
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, body in members:
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    rehash(shard.parent)


def _replace(member: str, body, which: int = 0):
    """A change that replaces ``member`` of sample ``which`` (``body(old bytes)``)."""
    def change(members):
        keys = sorted({info.name.split(".", 1)[0] for info, _ in members})
        name = f"{keys[which]}.{member}"
        return [(info, body(data) if info.name == name else data) for info, data in members]
    return change


def _nan(data: bytes) -> bytes:
    import io

    array = np.load(io.BytesIO(data))
    out = io.BytesIO()
    np.save(out, np.full_like(array, np.nan))
    return out.getvalue()


def _evil(members):
    evil = tarfile.TarInfo("../../evil")
    return members[:1] + [(evil, b"x")] + members[1:]


DECODE_DAMAGE = {   # behind a matching sha256: what only decoding (or the names) can find
    "garbage frames": (_replace("frames.npy", lambda d: b"\x93NUMPY garbage"), "frames.npy"),
    "NaN features": (_replace("frames.npy", _nan), "non-finite"),
    "path-like member": (_evil, "'../../evil'"),
}


@pytest.mark.parametrize("case", DECODE_DAMAGE)
def test_samples_are_decoded_as_training_decodes_them(case, good, tmp_path):
    damage, words = DECODE_DAMAGE[case]
    copy = tmp_path / "val"
    shutil.copytree(Path([g for g in good if g.startswith("data.val=")][0][9:]), copy)
    shard = sorted(copy.glob("*.tar"))[1]
    _rewrite(shard, damage)
    report, checks = run(good + [f"data.val={copy}"])
    check = checks["data.val shards"]
    assert check.status == FAIL and shard.name in check.message and words in check.message, \
        check.message


def test_deep_decodes_every_sample(good, tmp_path):
    """By default the first and last sample of each shard; --deep every one of them."""
    copy = tmp_path / "val"
    shutil.copytree(Path([g for g in good if g.startswith("data.val=")][0][9:]), copy)
    _rewrite(sorted(copy.glob("*.tar"))[0], _replace("frames.npy", _nan, which=4))
    assert run(good + [f"data.val={copy}"])[1]["data.val shards"].status == OK
    deep = validate_run(str(ROOT / "configs" / "tiny.yaml"), good + [f"data.val={copy}"],
                        deep=True)
    check = {c.name: c for c in deep.checks}["data.val shards"]
    assert check.status == FAIL and "non-finite" in check.message, check.message


def test_an_empty_config_fails_offline_naming_data_train():
    report, checks = run([], offline=True, config=None)
    assert not report.ok and "data.train is empty" in checks["data.train"].message


@pytest.mark.parametrize("content, words", [
    (b"\x80garbage" * 1000, "cannot read teacher checkpoint"),   # random bytes
    ("other arch", "does not fit the architecture")])
def test_unreadable_or_foreign_teacher_file_fails(good, tmp_path, content, words):
    path = tmp_path / "bad-teacher.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    report, checks = run(good + [f"teacher.pretrained={path}"])
    assert not report.ok and checks["teacher"].status == FAIL
    assert words in checks["teacher"].message and str(path) in checks["teacher"].message


def test_precomputed_teacher_needs_embeddings_in_the_shards(good):
    report, checks = run(good + ["teacher.placement=precomputed"])
    assert checks["teacher inputs"].status == FAIL and "teacher_dim" in \
        checks["teacher inputs"].message


def test_missing_teacher_checkpoint_fails(good, tmp_path):
    missing = tmp_path / "gone" / "teacher.pt"
    report, checks = run(good + [f"teacher.pretrained={missing}"])
    assert not report.ok
    assert checks["teacher"].status == FAIL and "not found" in checks["teacher"].message
    # Offline the file may live on the cluster: a warning, not a failure.
    report, checks = run(good + [f"teacher.pretrained={missing}"], offline=True)
    assert report.ok and checks["teacher"].status == WARN


@pytest.mark.parametrize("override, words", [("teacher.pretrained=no_such_tag", "tag"),
                                             ("teacher.model_config=/nope/val-tiny.json",
                                              "does not exist")])
def test_bad_teacher_settings_fail(good, override, words):
    _, checks = run(good + [override])
    assert checks["teacher"].status == FAIL and words in checks["teacher"].message


def test_teacher_model_config_that_does_not_parse_fails(good, tmp_path):
    broken = tmp_path / "val-tiny.json"
    broken.write_text("{not json")
    _, checks = run(good + [f"teacher.model_config={broken}"])
    assert checks["teacher"].status == FAIL and "not valid JSON" in checks["teacher"].message


HUB_TEACHER = ["teacher.arch=ViT-B-32", "teacher.model_config=''", "teacher.pretrained=openai"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a local stand-in for the hub (HF_ENDPOINT)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            asked.append(self.path)
            self.send_response(200 if self.path.startswith("/api/models/timm/") else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield tmp_path / "hf", asked
    server.shutdown()


def test_teacher_weights_downloadable_from_the_hub(good, hub):
    _, asked = hub
    _, checks = run(good + HUB_TEACHER)
    assert checks["teacher"].status == OK and "downloadable" in checks["teacher"].message
    assert asked == ["/api/models/timm/vit_base_patch32_clip_224.openai"]
    _, checks = run(good + ["teacher.pretrained=hf-hub:nobody/no-such-model"])
    assert checks["teacher"].status == FAIL and "answered 404" in checks["teacher"].message


def test_teacher_weights_in_the_local_cache(good, hub):
    cache, asked = hub
    repo = cache / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"w")
    _, checks = run(good + HUB_TEACHER)
    assert checks["teacher"].status == OK and "in this machine's cache" in \
        checks["teacher"].message
    assert asked == []


def test_teacher_weights_neither_cached_nor_downloadable_fail_with_the_fix(good, hub,
                                                                         monkeypatch):
    with socket.socket() as sock:         # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    report, checks = run(good + HUB_TEACHER)
    message = checks["teacher"].message
    assert not report.ok and checks["teacher"].status == FAIL
    assert "not downloadable" in message and "could not be reached" in message
    assert "teacher.pretrained" in message and "HF_HOME" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, checks = run(good + HUB_TEACHER)
    assert checks["teacher"].status == FAIL and "unset HF_HUB_OFFLINE" in \
        checks["teacher"].message
    _, checks = run(good + HUB_TEACHER, offline=True)       # config only: not probed
    assert checks["teacher"].status == WARN and "not checked" in checks["teacher"].message


def test_storage_that_cannot_be_created_fails(good, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    report, checks = run(good + [f"run.storage={blocker / 'runs'}"])
    assert not report.ok and checks["storage"].status == FAIL
    assert list(tmp_path.glob(".dldkd-validate-*")) == []   # the probe is cleaned up


def test_s3_storage_without_s3fs_names_the_package(good, monkeypatch):
    loaded = importlib.import_module("fsspec.registry")._registry
    monkeypatch.setitem(sys.modules, "s3fs", None)   # import fails as if not installed
    for proto in ("s3", "s3a"):   # and fsspec forgets an s3fs an earlier test loaded
        monkeypatch.delitem(loaded, proto, raising=False)
    _, checks = run(good + ["run.storage=s3://bucket/runs", "tracking.uri=sqlite:///mlflow.db"])
    assert checks["storage"].status == FAIL and "pip install s3fs" in checks["storage"].message


def test_remote_storage_needs_a_tracking_uri(good, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report, checks = run(good + ["run.storage=s3://bucket/runs"])
    assert not report.ok
    assert checks["config"].status == FAIL and "tracking.uri" in checks["config"].message


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        code = 200 if self.path == "/health" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_tracking_server_health(good):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _, checks = run(good + [f"tracking.uri=http://127.0.0.1:{server.server_port}"])
        assert checks["tracking"].status == OK, checks["tracking"]
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, checks = run(good + [f"tracking.uri=http://127.0.0.1:{port}"])
    assert checks["tracking"].status == FAIL and "/health" in checks["tracking"].message


def test_sqlite_tracking_uri_in_a_writable_folder(good, tmp_path):
    _, checks = run(good + [f"tracking.uri=sqlite:///{tmp_path / 'db' / 'mlflow.db'}"])
    assert checks["tracking"].status == OK


def test_gpu_requested_without_cuda_only_warns(good):
    report, checks = run(good + ["dist.use_gpu=true"])
    expected = OK if torch.cuda.is_available() else WARN
    assert checks["gpu"].status == expected and report.ok


def test_cli_returns_0_or_1(good, capsys):
    assert cli.main(["validate", "--config", str(ROOT / "configs" / "tiny.yaml"), *good]) == 0
    assert "memory per worker" in capsys.readouterr().out
    assert cli.main(["validate", "--config", str(ROOT / "configs" / "tiny.yaml"), *good,
                     "model.video_dim=256"]) == 1
    assert "FAIL  data.train" in capsys.readouterr().out


# -- memory estimate -------------------------------------------------------------------------------
def test_student_parameter_count_of_the_tvr_preset():
    cfg = load_config(ROOT / "configs" / "tvr.yaml")
    assert student_param_count(cfg) == 5_755_392
    assert estimate_memory(cfg, teacher_params=0).student_params == 5_755_392


def test_teacher_parameter_count_matches_a_built_model(good):
    import trainer.teacher  # noqa: F401
    import open_clip

    cfg = load_config(ROOT / "configs" / "tiny.yaml", good)
    open_clip.add_model_config(cfg.teacher.arch_config)
    built = open_clip.create_model(cfg.teacher.arch, pretrained=None, load_weights=False)
    assert teacher_param_count(cfg) == sum(p.numel() for p in built.parameters())


TINY_MODEL = {"model.video_dim": 128, "model.query_dim": 64, "model.hidden": 128,
              "model.heads": 4, "model.max_frames": 128}


@pytest.fixture(scope="module")
def measured_states() -> dict[str, int]:
    """What a real student and its optimizer hold after one step, in float32."""
    from trainer.method.optim import build_optimizer
    from trainer.method.student import DualStudent

    cfg = load_config(None, TINY_MODEL)
    model = DualStudent(cfg.model)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    optimizer = build_optimizer(model, cfg.optim)
    optimizer.step()
    params = list(model.parameters())
    return {"elements": sum(q.numel() for q in params),
            "params": sum(q.nbytes for q in params), "grads": sum(q.grad.nbytes for q in params),
            "optimizer": sum(t.nbytes for state in optimizer.state.values()
                             for t in state.values() if torch.is_tensor(t))}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_stages_divide_model_states(stage, precision, measured_states):
    """fp32: the measured states. bf16 (DeepSpeed's layout): bf16 params and grads, and an fp32
    master copy beside the fp32 moments. ZeRO-1 partitions the optimizer state over the workers,
    ZeRO-2 also the gradients, ZeRO-3 also the params; a zero3 teacher is partitioned too."""
    n, t = 4, 500
    cfg = load_config(None, {**TINY_MODEL, "dist.num_workers": n, "dist.zero_stage": stage,
                             "dist.precision": precision, "teacher.placement": "zero3",
                             "dist.use_gpu": True})
    est = estimate_memory(cfg, teacher_params=t)
    rows = {r.item: r.bytes for r in est.rows}
    m, bf16 = measured_states, torch.empty(0, dtype=torch.bfloat16).element_size()
    if precision == "fp32":
        params, grads, optimizer = m["params"], m["grads"], m["optimizer"]
    else:
        params = grads = m["elements"] * bf16
        optimizer = m["params"] + m["optimizer"]
    assert est.student_params == m["elements"]
    assert rows["student params"] == params / (n if stage == 3 else 1)
    assert rows["gradients"] == grads / (n if stage >= 2 else 1)
    assert rows["optimizer state"] == optimizer / (n if stage >= 1 else 1)
    assert rows["teacher params"] == t * bf16 / n   # bf16 on GPUs
    assert est.total == pytest.approx(sum(rows.values()))


def _saved_activation_bytes(cfg, B: int) -> int:
    """Bytes autograd saves for one student forward + loss (parameters and inputs excluded)."""
    from trainer.method.losses import TeacherTargets, total_loss
    from trainer.method.schedules import loss_weights
    from trainer.method.student import DualStudent

    m = cfg.model
    torch.manual_seed(0)
    student = DualStudent(m).train()
    Q, L, W = 5 * B, m.max_frames, m.max_words
    batch = Batch(video_feats=torch.randn(B, L, m.video_dim), video_mask=torch.ones(B, L),
                  query_feats=torch.randn(Q, W, m.query_dim), query_mask=torch.ones(Q, W),
                  labels=torch.arange(B).repeat_interleave(5), video_ids=[], cap_ids=[],
                  captions=[], teacher_index=torch.zeros(B, L, dtype=torch.long))
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    teacher = TeacherTargets(tau=torch.rand(Q, B, L), T=torch.rand(Q, B))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total_loss(student(batch), batch.labels, batch.video_mask, teacher, cfg.loss,
                   loss_weights(cfg.loss, 0))
    skip = {t.untyped_storage().data_ptr() for t in (*student.parameters(), batch.video_feats,
                                                       batch.query_feats)}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


@pytest.mark.parametrize("branches", ["dual", "inheritance"])
def test_activation_estimate_is_close_to_what_autograd_saves(branches):
    cfg = load_config(None, {"model.video_dim": 200, "model.query_dim": 80, "model.hidden": 48,
                             "model.heads": 2, "model.max_frames": 40, "model.max_words": 10,
                             "model.branches": branches, "data.batch_videos": 12})
    measured = _saved_activation_bytes(cfg, B=12)
    assert activation_elements(cfg) * 4 == pytest.approx(measured, rel=0.1)

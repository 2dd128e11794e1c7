"""Bad input through the one CLI: each case exits 2 with one message naming the file, key or
shard and the fix, never a traceback. The table is the contract; add a row per new case."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launch.cli import main as cli
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HARD = ["loss.kd=off", "loss.targets=hard"]


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> Path:
    """A finished tiny run (best/ and checkpoints) to relaunch and evaluate."""
    storage = tmp_path_factory.mktemp("runs")
    over = tiny_overrides(world, storage, name="done", **{"train.epochs": 1}) + HARD
    assert cli(["train", "--config", "configs/tiny.yaml", "--no-ray", *over]) == 0
    return storage


def _bad_yaml(tmp: Path, world, finished) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_text("model: {hidden: 4\nloss: [\n")
    return ["train", "--config", str(path), "--no-ray"]


def _train(*extra):
    def build(tmp: Path, world, finished) -> list[str]:
        over = tiny_overrides(world, tmp / "runs", name="bad", **{"train.epochs": 1}) + HARD
        return ["train", "--config", "configs/tiny.yaml", "--no-ray", *over,
                *[e.format(tmp=tmp, world=world) for e in extra]]
    return build


def _damaged_shards(tmp: Path, world, finished) -> list[str]:
    shutil.copytree(world / "train", tmp / "train")
    shards = sorted((tmp / "train").glob("*.tar"))
    shards[0].write_bytes(shards[0].read_bytes()[:5000])        # truncated
    shards[1].write_bytes(b"\x00garbage" * 100)                  # random bytes
    return _train(f"data.train={tmp / 'train'}", "data.val=")(tmp, world, finished)


def _bad_manifest(tmp: Path, world, finished) -> list[str]:
    shutil.copytree(world / "train", tmp / "train")
    (tmp / "train" / "manifest.json").write_text("{ not json")
    return _train(f"data.train={tmp / 'train'}")(tmp, world, finished)


def _bad_teacher(tmp: Path, world, finished) -> list[str]:
    (tmp / "teacher.pt").write_bytes(b"not a checkpoint")
    over = tiny_overrides(world, tmp / "runs", name="t", **{"train.epochs": 1})
    return ["train", "--config", "configs/tiny.yaml", "--no-ray", *over,
            f"teacher.pretrained={tmp / 'teacher.pt'}"]


def _eval(damage):
    def build(tmp: Path, world, finished) -> list[str]:
        best = tmp / "best"
        shutil.copytree(finished / "done" / "best", best)
        damage(best)
        return ["eval", "--checkpoint", str(best), "--split", str(world / "val")]
    return build


def _relaunch_changed(tmp: Path, world, finished) -> list[str]:
    over = tiny_overrides(world, finished, name="done", **{"train.epochs": 1}) + HARD
    return ["train", "--config", "configs/tiny.yaml", "--no-ray", *over, "model.hidden=64"]


CASES = {
    "yaml syntax": (_bad_yaml, "bad.yaml: YAML syntax error at line 2"),
    "unknown key": (_train("optim.lrr=0.1"), "unknown config key 'optim.lrr'; did you mean "
                                             "'optim.lr'"),
    "bad choice": (_train("loss.kd=sometimes"), "loss.kd='sometimes' is not allowed; choose one"),
    "out of range": (_train("optim.lr=5"), "optim.lr=5 is out of range; allowed (0, 1]"),
    "missing split": (_train("data.train={tmp}/nowhere"), "no shard manifest at"),
    "damaged shards": (_damaged_shards, "were damaged, more than data.max_bad_fraction"),
    "bad manifest": (_bad_manifest, "manifest.json"),
    "bad teacher file": (_bad_teacher, "cannot read teacher checkpoint"),
    "corrupt student": (_eval(lambda b: (b / "student.pt").write_bytes(b"\x80garbage")),
                        "cannot evaluate"),
    "student from another run": (
        _eval(lambda b: (b / "config.yaml").write_text(
            (b / "config.yaml").read_text().replace("hidden: 128", "hidden: 64"))),
        "does not fit the model"),
    "relaunch, other model": (_relaunch_changed, "model.hidden: 128 -> 64"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_message(case, world, finished, tmp_path, capsys):
    build, fragment = CASES[case]
    argv = build(tmp_path, world, finished)
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err, err[-2000:]
    message = err[err.index(f"dldkd {argv[0]}: error:"):]
    assert "Traceback" not in err and message.count("\n") == 2, err   # message + --debug hint
    if argv[0] == "eval":   # evaluation's words, no training or unpickling advice
        assert "run.resume" not in err and "weights_only=False" not in err, err


# Bad input that fails before any work: no trainer, no Ray, no MLflow run, no run folder.
def _args(*argv):
    return lambda tmp, world: [a.format(tmp=tmp, world=world) for a in argv]


def _tiny(*extra, ray: bool = False):
    """``train`` of configs/tiny.yaml on the session world with ``extra`` overrides."""
    def build(tmp: Path, world) -> list[str]:
        over = tiny_overrides(world, tmp / "runs", name="bad", **{"train.epochs": 1}) + HARD
        return ["train", "--config", "configs/tiny.yaml", *([] if ray else ["--no-ray"]), *over,
                *[e.format(tmp=tmp, world=world) for e in extra]]
    return build


def _empty(tmp: Path, world) -> list[str]:
    (tmp / "empty.yaml").write_text("")
    return ["train", "--config", str(tmp / "empty.yaml"), "--no-ray"]


LONG = "x" * 100_000
EARLY = {
    "batch of one": (_tiny("data.batch_videos=1"),
                     "data.batch_videos=1: the ranking losses need at least 2 videos"),
    "batch beyond any split": (_tiny("data.batch_videos=1000000000"),
                               "data.batch_videos=1000000000 is out of range; allowed [1, 65536]"),
    "batch larger than the split": (_tiny("data.batch_videos=200"),
                                    "data.batch_videos=200 > the 96 videos of"),
    "long value": (_tiny(f"optim.lr={LONG}"), "optim.lr='xxxxxxx"),
    "storage not writable": (_tiny("run.storage=/proc/nope"), "run.storage='/proc/nope': "),
    "empty config": (_empty, "data.train is empty: point it at a shard"),
    "no manifest, Ray": (_tiny("data.train={tmp}/nowhere", ray=True),
                         "data.train='{tmp}/nowhere': no shard manifest at"),
    "no manifest, sweep": (_args("sweep", "--config", "configs/sweep-demo.yaml",
                                 "data.train={tmp}/nowhere", "run.storage={tmp}/runs"),
                           "data.train='{tmp}/nowhere': no shard manifest at"),
    "tracking server down": (_tiny("tracking.uri=http://127.0.0.1:9"),
                             "tracking.uri='http://127.0.0.1:9': http://127.0.0.1:9/health did "
                             "not answer"),
}


@pytest.fixture
def no_work(monkeypatch):
    """Training, Ray and the teacher fail the test if anything reaches them."""
    import launch.jobs.train
    import trainer.run
    import trainer.teacher.model

    def started(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} started before the bad input was refused")
        return fail

    monkeypatch.setattr(trainer.run, "train", started("training"))
    monkeypatch.setattr(launch.jobs.train, "init_ray", started("Ray"))
    monkeypatch.setattr(trainer.teacher.model, "build_teacher", started("the teacher"))
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.parametrize("case", list(EARLY))
def test_bad_input_fails_before_any_work(case, world, tmp_path, capsys, no_work):
    build, fragment = EARLY[case]
    argv = build(tmp_path, world)
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert fragment.format(tmp=tmp_path) in err, err[-2000:]
    message = err[err.index(f"dldkd {argv[0]}: error:"):]
    assert "Traceback" not in err and message.count("\n") == 2, err[-2000:]
    assert len(message) < 1000, message[:2000]     # no unbounded value is ever quoted
    assert not (tmp_path / "runs").exists(), "a run folder (MLflow store, lease) was made"


def test_object_storage_without_credentials_fails_before_any_work(world, tmp_path, capsys,
                                                                   no_work, monkeypatch):
    """S3 run storage with no credentials anywhere: preflight's probe write names the key and
    the cause before the teacher, Ray or a step (it used to fail after a full epoch)."""
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_CONFIG_FILE": "/dev/null",
                       "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()   # no client made with another test's keys
    argv = _tiny("run.storage=s3://bucket/runs",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")(tmp_path, world)
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "run.storage='s3://bucket/runs': cannot write" in err, err[-2000:]
    assert "NoCredentialsError" in err and "Traceback" not in err, err[-2000:]

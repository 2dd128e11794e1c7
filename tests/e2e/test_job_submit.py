"""``dldkd submit``: what it uploads, and a real ``ray job submit`` of a sweep to a Ray head."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from launch.jobs import submit as sub

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------- what is uploaded


def make_tree(root: Path) -> None:
    files = {
        "launch/job.py": 100, "configs/a.yaml": 50, "data/shard-000000.tar": 5000,
        "outputs/demo/x.bin": 3000, "runs/r/ckpt.pt": 4000, ".git/objects/ab": 700,
        ".venv/lib/big.so": 9000, "launch/__pycache__/job.cpython-311.pyc": 300,
        "mlflow.db": 800, "secret.log": 200, "scratch/notes.txt": 64, "sub/data/keep.npy": 128,
        "sub/a.tmp": 10, "sub/keep.tmp": 12,
    }
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    (root / "empty").mkdir()
    (root / ".gitignore").write_text("*.log\n")
    (root / ".rayignore").write_text("scratch\n")
    (root / "sub" / ".rayignore").write_text("# below sub/ only\n*.tmp\n!keep.tmp\n")


def test_upload_size_is_the_size_of_rays_own_package(tmp_path: Path) -> None:
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _zip_files

    make_tree(tmp_path)
    total, per_entry = sub.upload_size(tmp_path, sub.EXCLUDES)
    package = tmp_path.parent / f"{tmp_path.name}.zip"
    _zip_files(str(tmp_path), ray_constants.get_runtime_env_default_excludes() + sub.EXCLUDES,
               str(package), include_gitignore=True)
    assert total == package.stat().st_size
    names = set(zipfile.ZipFile(package).namelist())
    # data, outputs, run folders, stores, caches, VCS, .gitignore'd and .rayignore'd files stay
    # home; only the top-level data/ is excluded, not a package's own data/ folder
    assert {"launch/job.py", "configs/a.yaml", "sub/data/keep.npy", "sub/keep.tmp",
            "empty/"} <= names
    assert not {n for n in names if n.startswith(("data/", "outputs/", "runs/", ".git/",
                                                   ".venv/", "scratch/"))
                or n.endswith((".pyc", ".db", ".log", "a.tmp"))}
    assert set(per_entry) == {"launch/", "configs/", "sub/", "empty/", ".gitignore",
                              ".rayignore"}


def test_an_oversized_working_dir_is_refused_naming_what_to_exclude(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "big.npy").write_bytes(b"x" * 20000)
    total, _ = sub.upload_size(tmp_path, sub.EXCLUDES)
    assert sub.check_upload(tmp_path, sub.EXCLUDES, limit=total + 1) == total
    with pytest.raises(ValueError) as err:
        sub.check_upload(tmp_path, sub.EXCLUDES, limit=total)
    message = str(err.value)
    assert "over Ray's working_dir limit" in message and "features/ (0.0 MiB)" in message
    assert message.index("features/") < message.index("launch/")  # largest first
    assert ".rayignore" in message


def test_gitignore_patterns_read_as_rays_bundled_pathspec() -> None:
    """Ray's own reader (its private copy of pathspec) is the reference for every pattern form."""
    from ray._private.thirdparty.pathspec import PathSpec

    patterns = ["*.log", "/data", "data/", "/build/", "a/**/b", "**/x", "doc/**", "**", "**/",
                "foo/*", "*/c", "*", "?.txt", "[ab]*.py", "[!a]z", "[^a]q", "[]a]x", "x[",
                "a\\*b", "\\#hash", "\\!bang", "#comment", "", "  ", "/", "sub/data", "a/b",
                "!keep.log", "!/data", "*.tar.gz", ".venv", "*.egg-info"]
    paths = [".", "a.log", "x/a.log", "data", "data/f", "sub/data", "sub/data/f", "a/b", "a/c",
             "a/q/r/b", "a/b/c", "b", "x", "y/x", "y/x/z", "foo/a", "foo/a/b", "keep.log", "#hash",
             "!bang", "a.py", "b1.py", "c.py", "az", "bz", "aq", "bq", "^q", "]x", "ax", "x[",
             "a*b", "axb", "doc", "doc/x", "build", "build/o", "1.txt", "12.txt", "f.tar.gz",
             ".venv/lib", "q/venv", "d.egg-info/x"]
    for pattern in patterns:
        ours = sub._matcher(Path("/w"), [pattern])
        theirs = PathSpec.from_lines("gitwildmatch", [pattern])
        assert [ours(Path("/w", p)) for p in paths] == [theirs.match_file(p) for p in paths], pattern
    lines = ["*.log", "!keep.log", "sub/", "!sub/data", "data", "!/data"]
    ours, theirs = sub._matcher(Path("/w"), lines), PathSpec.from_lines("gitwildmatch", lines)
    assert [ours(Path("/w", p)) for p in paths] == [theirs.match_file(p) for p in paths]


def test_rays_upload_limit_is_the_grpc_message_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    assert sub.upload_limit() == GCS_STORAGE_MAX_SIZE  # what this process's Ray read
    monkeypatch.delenv("RAY_max_grpc_message_size", raising=False)
    assert sub.upload_limit() == 512 * 2**20
    monkeypatch.setenv("RAY_max_grpc_message_size", str(2**20))
    assert sub.upload_limit() == 2**20


def test_job_command_is_ray_job_submit_of_the_entry() -> None:
    cmd = sub.job_command("sweep", "configs/sweep-demo.yaml", ["optim.lr=1e-3"],
                          "http://127.0.0.1:8265", "dldkd-sweep-x", "/repo", wait=False)
    assert Path(cmd[0]).name == "ray" and cmd[1:3] == ["job", "submit"]
    head, entry = cmd[:cmd.index("--")], cmd[cmd.index("--") + 1:]
    assert entry == ["python", "-m", "launch.sweep", "--config", "configs/sweep-demo.yaml",
                     "optim.lr=1e-3"]
    opts = dict(zip(head[3::2], head[4::2]))
    assert opts["--address"] == "http://127.0.0.1:8265" and opts["--working-dir"] == "/repo"
    assert opts["--submission-id"] == "dldkd-sweep-x" and "--no-wait" in head
    # only excludes: env vars stay with the runs themselves (RunConfig.worker_runtime_env)
    assert json.loads(opts["--runtime-env-json"]) == {"excludes": sub.EXCLUDES}


def test_submit_checks_before_touching_a_cluster(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="pass --address"):
        sub.submit("train", "configs/tiny.yaml", [], working_dir=ROOT)
    outside = tmp_path / "c.yaml"
    outside.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="under the working directory"):
        sub.submit("train", str(outside), [], address="http://127.0.0.1:1", working_dir=ROOT)
    with pytest.raises(ValueError, match="unknown config key"):
        sub.submit("train", "configs/tiny.yaml", ["optim.lrr=1"], address="http://127.0.0.1:1",
                   working_dir=ROOT)
    with pytest.raises(ValueError, match="sweep.num_samples"):
        sub.submit("sweep", "configs/sweep-demo.yaml", ["sweep.num_samples=0"],
                   address="http://127.0.0.1:1", working_dir=ROOT)


# ------------------------------------------------------------------------- a real Ray head


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _our_processes(marker: str) -> list[int]:
    """Pids whose command line names this test's Ray temp dir (every process of our head)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(proc.name))
            except OSError:
                continue
    return out


@pytest.fixture
def ray_head():
    """A head on 127.0.0.1 on free ports, stopped afterwards, also when the test fails.

    It runs ``ray start --head --block`` as our own child and is stopped through that pid:
    ``ray stop`` would stop every Ray instance on the machine, other users' too. Token
    authentication is on with a token of its own (``ray start`` turns it on by itself whenever
    ~/.ray/auth_token exists), so the test does not depend on the machine's state; clients get
    the token through RAY_AUTH_MODE/RAY_AUTH_TOKEN, as a user of a secured cluster would.
    """
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dash, client, agent, agent_grpc, metrics, rtenv = free_ports(7)
    token = secrets.token_hex(32)
    # RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` sends SIGTERM, then SIGKILL this much later
    # (Ray's default 3 s); the head's job supervisor reads it (docs/training.md).
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_JOB_STOP_WAIT_TIME_S="120",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={rtenv}", "--num-cpus=4", "--include-dashboard=true",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(address, token, head, Path(temp) / "head.log")
        yield address, env, token
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGINT)  # --block shuts its node down on KeyboardInterrupt
            try:   # its graceful stop can take a minute; what is left is killed below
                head.wait(timeout=10)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait()
        log.close()
        deadline = time.time() + 5
        while _our_processes(temp) and time.time() < deadline:
            time.sleep(1)
        for pid in _our_processes(temp):  # leftovers of this head only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _get(address: str, token: str, path: str):
    """The dashboard's REST API over plain HTTP (this process's Ray may be set up otherwise)."""
    request = urllib.request.Request(f"{address}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_for_dashboard(address: str, token: str, head: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 180
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            _get(address, token, "/api/jobs/")
            return
        except OSError:  # not up yet
            if time.time() > deadline:
                raise
            time.sleep(2)


def _job(address: str, token: str, submission_id: str) -> dict:
    return _get(address, token, f"/api/jobs/{submission_id}")


def _stop_a_training_job_and_resume_it(address: str, env: dict, token: str, world: Path,
                                       runs: Path) -> None:
    """`ray job stop` of a `dldkd submit train` job after its first checkpoint: the driver gets
    SIGTERM, the worker saves at its next step (complete in run storage, that step logged), the
    MLflow run ends KILLED, the job log has one resume line and the job ends STOPPED. With Ray's
    own snapshot then lost and a newer partial checkpoint planted, the resubmitted job resumes
    from the newest complete checkpoint in storage, not from step 1, and SUCCEEDS."""
    from mlflow.tracking import MlflowClient

    from trainer.infra import storage
    from trainer.infra.reporting import complete_step

    uri = f"sqlite:///{runs / 'train-mlflow.db'}"
    overrides = [f"data.train={world / 'train'}", f"data.val={world / 'val'}",
                 f"run.storage={runs}", "run.name=stop-me", f"tracking.uri={uri}",
                 "loss.kd=off", "loss.targets=hard", "train.epochs=6", "data.steps_per_epoch=3",
                 "train.log_every=1", "train.ckpt_every=3", "train.eval_every=18",
                 "train.early_stop=0", "tracking.system_metrics=false"]

    def submit(wait: bool) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launch.cli", "submit", "--address", address,
             *([] if wait else ["--no-wait"]), "train", *overrides,
             "--config", "configs/tiny.yaml"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    proc = submit(wait=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (job_id,) = [j["submission_id"] for j in _get(address, token, "/api/jobs/")
                 if j["submission_id"] in proc.stdout]
    location = storage.run_location(str(runs), "stop-me")
    deadline = time.time() + 300
    while not (storage.exists(location) and complete_step(location)):
        assert _job(address, token, job_id)["status"] in ("PENDING", "RUNNING"), \
            _get(address, token, f"/api/jobs/{job_id}/logs")["logs"][-4000:]
        assert time.time() < deadline
        time.sleep(0.3)
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job_id],
                          env=env, capture_output=True, text=True, timeout=200)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    while _job(address, token, job_id)["status"] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline + 200
        time.sleep(0.5)
    logs = _get(address, token, f"/api/jobs/{job_id}/logs")["logs"]
    assert _job(address, token, job_id)["status"] == "STOPPED", logs[-4000:]
    hints = [line for line in logs.splitlines() if "to resume: dldkd train" in line]
    assert len(hints) == 1 and "stopped by SIGTERM with a checkpoint saved" in hints[0], logs[-4000:]
    k = complete_step(location)
    assert k is not None and 3 <= k < 18
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dldkd").experiment_id])
    assert run.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert k in steps, (k, steps)

    # What a hard stop can leave: Ray's snapshot lost (it never recorded the newest checkpoint)
    # and a newer checkpoint whose upload was cut (a file missing, no completion marker).
    partial = storage.join(location, f"step-{k + 3:08d}")
    data = storage.read_bytes(storage.join(location, f"step-{k:08d}", "client.json"))
    storage.write_bytes(storage.join(partial, "client.json"), data)
    storage.remove(storage.join(location, "checkpoint_manager_snapshot.json"))
    proc = submit(wait=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f" at step {k} (epoch" in out and "resumed from" in out, out[-4000:]
    assert f"step-{k:08d}, the newest complete checkpoint" in out, out[-4000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps.count(1) == 1 and max(steps) == 18, steps


@pytest.mark.slow
def test_ray_job_submit_of_a_two_trial_sweep(ray_head, tmp_path: Path) -> None:
    """`dldkd submit` -> `ray job submit` -> a 2-trial sweep on the head; the job SUCCEEDS and
    MLflow holds the sweep's parent run with one child per trial, each with val/SumR. First, on
    the same head, a training job stopped by `ray job stop` saves and its resubmission resumes
    (``_stop_a_training_job_and_resume_it``)."""
    from mlflow.tracking import MlflowClient

    from sharding.synthetic import build_world

    address, env, token = ray_head
    build_world(tmp_path / "world", videos=48, eval_videos=16, pretrain_pairs=0, progress=False)
    runs = tmp_path / "runs"
    _stop_a_training_job_and_resume_it(address, env, token, tmp_path / "world", runs)
    # 2 trials x 1 worker (2 x 2 workers do not fit 2 cores in CI time), 1 epoch of 3 steps;
    # the head has 4 CPUs, so both trials (0.5 + 1 CPU each) run at once.
    overrides = [f"data.train={tmp_path / 'world' / 'train'}",
                 f"data.val={tmp_path / 'world' / 'val'}", f"data.test={tmp_path / 'world' / 'test'}",
                 f"run.storage={runs}", "loss.kd=off",
                 "loss.targets=hard", "dist.num_workers=1", "dist.zero_stage=0",
                 "train.epochs=1", "data.steps_per_epoch=3", "sweep.name=e2e-sweep"]
    # overrides before --config: argparse cannot give `submit ENTRY --config C k=v` its k=v
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "submit", "--address", address, "sweep",
         *overrides, "--config", "configs/sweep-demo.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    (job,) = [j for j in _get(address, token, "/api/jobs/") if j["submission_id"] in proc.stdout]
    assert job["status"] == "SUCCEEDED", tail
    assert job["entrypoint"].startswith("python -m launch.sweep --config configs/sweep-demo.yaml")
    assert job["submission_id"] in proc.stdout
    assert "e2e-sweep-" in proc.stdout and "SumR" in proc.stdout  # the trial table

    client = MlflowClient(f"sqlite:///{runs / 'e2e-sweep' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dldkd")
    found = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in found if r.info.run_name == "e2e-sweep"]
    assert parent.info.status == "FINISHED"
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(found) == 3
    assert all(r.info.run_name.startswith("e2e-sweep-") for r in children)
    assert all(0 < r.data.metrics["val/SumR"] <= 400 for r in children)
    assert {c.data.params["optim.lr"] for c in children} == {"0.001", "0.003"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/trials.md", "sweep/sumr.png"}

"""Local servers that benchmarks and tests start and stop: a real ``mlflow server``."""
from __future__ import annotations

import os


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store; stop and start it to fake an
    outage (it keeps its port and its data)."""

    def __init__(self, root, port: int):
        self.root, self.port, self.proc = root, port, None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)   # its own process group: stop() reaches uvicorn's workers
        deadline = time.time() + 180   # its start-up imports are slow on a loaded machine
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()   # never leave a half-started server (and its workers) behind
        raise RuntimeError(f"mlflow server on port {self.port} did not become healthy in 180 s")

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:   # uvicorn's graceful stop can stall under load
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            try:   # a worker that outlived its parent would keep the port
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc = None


def train_worker_pids(root: int | None = None) -> list[int]:
    """Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``) under process
    ``root`` (default: this one, whose local Ray cluster starts them): other users' runs on the
    same machine are never touched."""
    import psutil

    pids = []
    for proc in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(pids)

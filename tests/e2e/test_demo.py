"""`make demo` in its reduced size (CI): the main job cannot silently break."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_demo_small(tmp_path):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "demo", "--small", "--out",
                           str(tmp_path / "demo")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert stage in out
    table = out[out.index("[4/4]"):]
    assert "teacher zero-shot" in table and table.count("trial ") >= 2
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    # The world and the teacher stay where a rerun finds them (its stages 1 and 2 then skip).
    assert (tmp_path / "demo" / "teacher.pt").is_file()
    assert (tmp_path / "demo" / "world" / "train" / "manifest.json").is_file()

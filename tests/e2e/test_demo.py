"""`make demo` in its reduced size (CI), run from dldkd as installed: the main job cannot silently
break, and the package works without the checkout (its presets ship as package data)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _dockerfile_sources() -> list[str]:
    """What the Dockerfile copies before `pip install .`: the wheel is built from that alone."""
    text = (ROOT / "Dockerfile").read_text()
    return [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]


def install(tmp: Path) -> Path:
    """dldkd's wheel in a fresh venv (bin/dldkd as pip writes it) that borrows this venv's
    dependencies through a plain path entry, so neither this checkout nor its editable finder
    (a .pth file, which only a site directory runs) can be imported there."""
    src = tmp / "src"
    src.mkdir()
    for name in _dockerfile_sources():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    # Built from the copy: an in-tree build would write build/ and *.egg-info into the checkout.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(src), "-w", str(tmp / "dist")], check=True)
    (wheel,) = (tmp / "dist").glob("dldkd-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    Path(site, "dldkd-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True)
    return venv


def demo(venv: Path, out: Path, cwd: Path, env: dict) -> str:
    proc = subprocess.run([str(venv / "bin" / "dldkd"), "demo", "--small", "--out", str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_installed_demo_small(tmp_path):
    venv = install(tmp_path)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import dldkd_configs, launch, sharding, trainer; "
         "print('\\n'.join(m.__file__ for m in (dldkd_configs, launch, sharding, trainer)))"],
        cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert len(where) == 4 and all(Path(f).is_relative_to(venv) for f in where), where
    # The wheel holds the product only: bench/ and tests/ run from a checkout.
    top = subprocess.run([venv / "bin" / "python", "-c", "import importlib.util as u; "
                          "print(u.find_spec('bench'), u.find_spec('tests'))"],
                         cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout
    assert top.split() == ["None", "None"], top

    out_dir = tmp_path / "demo"
    first = demo(venv, out_dir, cwd, env)
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert stage in first
    table = first[first.index("[4/4]"):]
    rows = [line for line in table.splitlines() if line.startswith("trial ")]
    assert "teacher zero-shot" in table and len(rows) == 2
    assert "mlflow ui --backend-store-uri sqlite:///" in first

"""Build the wheels an air-gapped GPU node needs beyond its PyTorch image (``make gpu-bundle``).

The node's image (Python 3.12, torch 2.11 + CUDA) has numpy, pyarrow, h5py, timm, pyyaml, tqdm,
psutil, ninja, py-cpuinfo, msgpack, huggingface-hub, pytest (+timeout, xdist), and what torch,
torchvision and timm pull in (pillow, safetensors, packaging, jinja2/markupsafe, filelock, fsspec).
Everything else the GPU suite, ``bench.gpu``, ``bench.eval`` and ``dldkd train --no-ray`` import
travels as cp312 manylinux wheels in ``gpu-bundle/wheels``: downloaded with pip (``--no-deps``,
one pinned version each, from constraints.txt), DeepSpeed (sdist only) built here. The bundle and
the checkout that travels with it must stay under ``--max-mib`` (48 MiB; the node takes 64).

Left out on purpose (see LEFT_OUT): Ray (one GPU, ``--no-ray``), the full ``mlflow`` wheel (its
web UI alone is 25 MiB; ``mlflow-skinny`` + ``mlflow-tracing`` hold the SQLite store, which
needs SQLAlchemy, alembic and cryptography), and what only other commands use.

Run: ``python tools/gpu_bundle.py [--out gpu-bundle] [--max-mib 48]``.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runtime imports of the GPU check beyond the image, and their install requirements (closure,
# Python 3.12 on Linux, no extras), minus what the image has. Pinned by constraints.txt.
WHEELS = [
    # the product's own dependencies
    "deepspeed", "open_clip_torch", "webdataset", "pydantic", "matplotlib",
    # MLflow's SQLite tracking store
    "mlflow-skinny", "mlflow-tracing", "SQLAlchemy", "alembic", "cryptography",
    # their requirements
    "annotated-doc", "annotated-types", "anyio", "braceexpand", "cachetools",
    "certifi", "cffi", "charset-normalizer", "click", "cloudpickle", "contourpy", "cycler",
    "databricks-sdk", "einops", "fastapi", "fonttools", "ftfy", "gitdb", "GitPython",
    "google-auth", "h11", "hjson", "idna", "importlib_metadata", "kiwisolver", "Mako",
    "opentelemetry-api", "opentelemetry-proto", "opentelemetry-sdk",
    "opentelemetry-semantic-conventions", "protobuf", "pyasn1", "pyasn1_modules", "pycparser",
    "pydantic_core", "pyparsing", "python-dateutil", "python-dotenv", "regex", "requests", "six",
    "smmap", "sqlparse", "starlette", "typing-inspection", "typing_extensions", "urllib3",
    "uvicorn", "wcwidth", "zipp",
]
BUILT_HERE = {"deepspeed"}   # sdist only on PyPI: `pip wheel` here (it compiles no ops)
# Pure-Python wheels of packages whose compiled parts are optional speed-ups (7 MiB less).
PURE = {"fonttools", "sqlalchemy", "wcwidth", "charset-normalizer"}
LEFT_OUT = {
    "ray": "one GPU: the check trains with `dldkd train --no-ray`",
    "mlflow": "full wheel is 25 MiB of web UI + server deps (Flask, gunicorn, pandas, scipy, "
              "scikit-learn); the SQLite store is in mlflow-skinny/mlflow-tracing",
    "pandas, scipy": "MLflow imports them only if present (datasets, sparse signatures)",
    "av": "PyAV decodes videos for `dldkd shard frames` only",
    "s3fs, boto3": "object storage: the check reads and writes local folders",
    "torch, torchvision, pillow, safetensors, packaging, fsspec": "in the image",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(constraints: str, names: list[str]) -> dict[str, str]:
    """``name -> version`` for each of ``names`` from a pip constraints file's ``name==version``
    lines (names compared PEP 503-normalized); a name it does not pin is an error."""
    found = {}
    for line in constraints.splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            found[normalize(m.group(1))] = m.group(2)
    missing = [n for n in names if normalize(n) not in found]
    if missing:
        raise SystemExit(f"constraints.txt pins no version of {', '.join(missing)}")
    return {normalize(n): found[normalize(n)] for n in names}


def code_bytes() -> int:
    """Bytes of the files that travel with a checkout: tracked, plus untracked not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0")
               if p and (ROOT / p).is_file())


def pip(*args: str) -> None:
    """pip, quiet; its complaints about unreachable local indexes in pip.conf are dropped."""
    run = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check",
                          "-q"], capture_output=True, text=True)
    noise = "WARNING: Location "
    sys.stderr.write("".join(line for line in run.stderr.splitlines(keepends=True)
                             if not line.startswith(noise)))
    if run.returncode:
        raise SystemExit(f"pip {args[0]} failed (exit {run.returncode})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "gpu-bundle"), help="bundle folder (git ignores "
                   "gpu-bundle/)")
    p.add_argument("--max-mib", type=float, default=48.0, help="cap on bundle + code, MiB")
    a = p.parse_args()
    versions = pins((ROOT / "constraints.txt").read_text(), WHEELS)
    out = Path(a.out)
    tmp = out / "wheels.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = [f"{n}=={v}" for n, v in sorted(versions.items()) if n not in BUILT_HERE | PURE]
    platform_args = [x for plat in PLATFORMS for x in ("--platform", plat)]
    pip("download", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *platform_args, "--no-deps", "-d", str(tmp), *specs)
    pip("download", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "py",
        "--abi", "none", "--platform", "any", "--no-deps", "-d", str(tmp),
        *(f"{n}=={versions[n]}" for n in sorted(PURE)))
    for n in sorted(BUILT_HERE):
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), f"{n}=={versions[n]}")
    wheels = sorted(tmp.glob("*.whl"))
    got = {normalize(w.name.split("-")[0]) for w in wheels}
    if got != set(versions):
        raise SystemExit(f"expected wheels of {sorted(set(versions) - got)}; got extra "
                         f"{sorted(got - set(versions))}")
    final = out / "wheels"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (out / "bundle.json").write_text(json.dumps(
        {"python": "3.12", "platforms": PLATFORMS, "wheels": [w.name for w in wheels],
         "left_out": LEFT_OUT}, indent=1) + "\n")
    bundle = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    code = code_bytes()
    total = (bundle + code) / 2**20
    for w in wheels:
        print(f"{(final / w.name).stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"bundle {bundle / 2**20:.1f} MiB ({len(wheels)} wheels) + code {code / 2**20:.1f} MiB"
          f" = {total:.1f} MiB (cap {a.max_mib:g} MiB) in {out}")
    if total >= a.max_mib:
        raise SystemExit(f"bundle + code is {total:.1f} MiB, over the {a.max_mib:g} MiB cap")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The bundle on Python 3.12 without a GPU node: a Python 3.12 venv (pyenv's here) with the GPU
# image's packages but torch (this disk has no cp312 CPU torch; PyPI's cp312 torch is the
# multi-GB CUDA build), the bundle installed as on the node (`pip install --no-index --no-deps
# --target`), then tools/bundle_check.py: every wheel installed as itself and every requirement
# met except torch and torchvision, an MLflow SQLite store written and read; then the bundle's
# torch-free packages imported.
#
#   bash tools/bundle-py312-check.sh        (after `make gpu-bundle`; PYTHON312 names python3.12)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# pyenv's 3.12 first: its python3.12 shim fails unless 3.12 is pyenv's selected version.
PY312=${PYTHON312:-$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null \
  | tail -n 1)}
PY312=${PY312:-$(command -v python3.12)}
WORK=$ROOT/.cache/py312-check
VENV=$WORK/venv
TARGET=$WORK/site
[[ -x $VENV/bin/python ]] || "$PY312" -m venv "$VENV"
echo "python: $("$VENV/bin/python" --version)"
# The image's packages (timm without its torch requirements), pinned where constraints.txt pins.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt \
  numpy pyarrow h5py pyyaml tqdm psutil ninja py-cpuinfo msgpack huggingface-hub pytest \
  pytest-timeout pytest-xdist pillow safetensors packaging jinja2 filelock fsspec \
  typing-extensions sympy networkx setuptools 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt \
  timm 2>&1 | grep -v "^WARNING: Location" || true
rm -rf "$TARGET" "$WORK/mlflow"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps \
  --no-compile --target "$TARGET" gpu-bundle/wheels/*.whl
echo "installed $(ls -d "$TARGET"/*.dist-info | wc -l) distributions into $TARGET"
PYTHONPATH=$TARGET "$VENV/bin/python" -c 'import importlib.util as u
print("torch in this venv:", u.find_spec("torch") is not None)'
PYTHONPATH=$TARGET "$VENV/bin/python" tools/bundle_check.py --wheels gpu-bundle/wheels \
  --ignore torch,torchvision --mlflow-smoke "$WORK/mlflow"
PYTHONPATH=$TARGET MPLBACKEND=Agg "$VENV/bin/python" -c '
import importlib.metadata as md
import alembic, contourpy, cryptography.fernet, fastapi, ftfy, google.protobuf, kiwisolver
import matplotlib.pyplot, mlflow, pydantic, pydantic_core, regex, sqlalchemy, webdataset
print("torch-free imports ok:", {n: md.version(n) for n in ("pydantic", "pydantic-core",
      "webdataset", "sqlalchemy", "matplotlib", "mlflow-skinny", "cryptography")})'

#!/usr/bin/env bash
# The GPU check in one command, for an air-gapped GPU node with a fixed PyTorch image
# (docs/benchmarks.md, "GPU"). Run from a checkout with the bundle beside the code
# (`make gpu-bundle` writes gpu-bundle/):
#
#   OUT=/results bash tools/gpu-check.sh            # on the node
#   GPU_CHECK_DRY=1 bash tools/gpu-check.sh         # here: CPU, CUDA steps skipped (--dry-run)
#
# Steps: install the bundle with `pip install --no-index --no-deps --target`; versions of torch,
# CUDA, DeepSpeed and the GPU + the bundle's requirement check; `pytest -m gpu tests/gpu`;
# `python -m bench.gpu`; `python -m bench.eval`; a TVR-dim world with pre-extracted teacher
# embeddings (bench.gpu_world) and a short `dldkd train --no-ray` of configs/tvr.yaml on it.
# Each step runs under `timeout` within what is left of GPU_CHECK_BUDGET_S (480 s), so the
# check stops itself before 9 minutes; a step out of time is killed or skipped and the
# summary is still written. Under $OUT (8 files): steps.jsonl (one JSON line per step),
# summary.json, env.log, install.log, pytest.log, bench-gpu.log, bench-eval.log, train.log.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY=${GPU_CHECK_DRY:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}     # the whole check; summary and kill grace come on top
RESERVE_S=8                             # kept back for the summary
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
OUT=${OUT:-$ROOT/.cache/gpu-check}   # the results folder (a device runner sets it)
OWN_WORK=0
[[ -z ${GPU_CHECK_WORK:-} ]] && OWN_WORK=1
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}   # world, runs, site
WHEELS=${GPU_BUNDLE:-$ROOT/gpu-bundle}/wheels
TARGET=$WORK/site
if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
else
  PY=${PYTHON:-python3}
fi
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export DRY PY ROOT TARGET WHEELS
: > "$OUT/steps.jsonl"

export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if [[ $DRY == 1 ]]; then
  # The project's venv (Python 3.11) runs the code; the cp312 bundle is installed into the
  # target folder as on the node, but not put on the path.
  export DS_ACCELERATOR=cpu PYTHONPATH=$ROOT
else
  export PYTHONPATH=$TARGET:$ROOT
fi

summary() {
  timeout 10 "$PY" "$ROOT/tools/gpu_check_summary.py" "$OUT" 2>> "$OUT/env.log" \
    || echo '{"ok": false, "error": "summary failed; see steps.jsonl"}' > "$OUT/summary.json"
}
trap 'summary; exit 143' TERM INT

record() {   # name status seconds limit_s
  printf '{"name": "%s", "status": "%s", "seconds": %s, "limit_s": %s, "dry_run": %s}\n' \
    "$1" "$2" "$3" "$4" "$([[ $DRY == 1 ]] && echo true || echo false)" >> "$OUT/steps.jsonl"
  echo "[gpu-check] $1: $2 in ${3}s (limit ${4}s)"
}

# step NAME CAP_S LOG CMD...: run CMD under timeout min(CAP_S, time left), log to $OUT/LOG.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((DEADLINE - $(date +%s) - RESERVE_S))
  if ((left < 5)); then
    record "$name" skipped-out-of-time 0 0
    echo "== $name: skipped, out of time (budget ${BUDGET_S}s)" >> "$OUT/$log"
    summary
    return 0
  fi
  local lim=$((cap < left ? cap : left))
  echo "== $name (limit ${lim}s): $*" >> "$OUT/$log"
  local t0 t1 rc status
  t0=$(date +%s.%N)
  if declare -F "$1" > /dev/null; then   # a function of this script: run it in a child bash
    timeout --kill-after=5 "$lim" bash -c "$(declare -f "$1"); $1" >> "$OUT/$log" 2>&1
  else
    timeout --kill-after=5 "$lim" "$@" >> "$OUT/$log" 2>&1
  fi
  rc=$?
  t1=$(date +%s.%N)
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed-rc-$rc ;;
  esac
  record "$name" "$status" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')" "$lim"
  summary
}

skip() {   # name log why
  record "$1" skipped 0 0
  echo "== $1: skipped ($3)" >> "$OUT/$2"
}

install_bundle() {
  local tags=()
  # Here the interpreter is not the node's Python 3.12: pip installs the same cp312 wheels
  # for that target instead.
  [[ $DRY == 1 ]] && tags=(--python-version 3.12 --implementation cp --only-binary=:all:
                           --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
                           --platform manylinux2014_x86_64)
  ls "$WHEELS"/*.whl > /dev/null || { echo "no wheels in $WHEELS: run make gpu-bundle"; return 2; }
  "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check -q \
    "${tags[@]}" \
    --target "$TARGET" "$WHEELS"/*.whl || return 1
  ln -sfn "$ROOT/configs" "$TARGET/dldkd_configs"   # setup.cfg maps configs/ to this package
  echo "installed $(ls -d "$TARGET"/*.dist-info | wc -l) distributions into $TARGET"
}

VERSIONS_PY='
import json, os, platform
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import trainer.teacher   # its torchvision guard, as every teacher process runs it
    import torchvision
    info["torchvision"] = torchvision.__version__
except Exception as e:   # open_clip (the online teacher) needs it
    info["torchvision"] = f"not importable: {type(e).__name__}: {e}"
import deepspeed
info["deepspeed"] = deepspeed.__version__
info["deepspeed_accelerator"] = deepspeed.get_accelerator().device_name()
info["dry_run"] = os.environ.get("DRY") == "1"
print(json.dumps(info))
'

echo "[gpu-check] out=$OUT work=$WORK python=$PY dry_run=$DRY budget=${BUDGET_S}s"
step install 90 install.log install_bundle
step requirements 60 env.log "$PY" tools/bundle_check.py --wheels "$WHEELS" \
  --mlflow-smoke "$WORK/mlflow-smoke"
step versions 60 env.log "$PY" -c "$VERSIONS_PY"
grep '"torch"' "$OUT/env.log" | tail -n 1 | sed 's/^/[gpu-check] /'   # the versions

if [[ $DRY == 1 ]]; then
  # Collects and skips the GPU test (no CUDA): the command, its log and its verdict.
  step pytest-gpu 120 pytest.log "$PY" -m pytest -m gpu tests/gpu -q --timeout 100
  skip bench-gpu bench-gpu.log "dry run: needs CUDA"
  step bench-eval 60 bench-eval.log "$PY" -m bench.eval --device cpu --queries 600 \
    --videos 120 --runs 1
  WORLD=(--videos 32 --eval-videos 16)
  # fp32 without ZeRO: bf16 is slower than fp32 on these CPUs (docs/benchmarks.md).
  TRAIN=(data.batch_videos=8 data.loader_workers=1 data.steps_per_epoch=2 train.epochs=1
         train.log_every=1 dist.use_gpu=false dist.precision=fp32 dist.zero_stage=0)
  TRAIN_CAP=180
else
  step pytest-gpu 180 pytest.log "$PY" -m pytest -m gpu tests/gpu -q -rA --timeout 170
  step bench-gpu 90 bench-gpu.log "$PY" -m bench.gpu
  step bench-eval 60 bench-eval.log "$PY" -m bench.eval --runs 2
  WORLD=(--videos 1024 --eval-videos 256)
  # 8 steps an epoch (1024 videos / 128): 304 steps, 4 evaluations.
  TRAIN=(data.loader_workers=4 train.log_every=25 train.epochs=38 train.eval_every=76)
  TRAIN_CAP=120
fi
step world 60 train.log "$PY" -m bench.gpu_world --out "$WORK/world" "${WORLD[@]}"
step train "$TRAIN_CAP" train.log "$PY" -m launch.cli train --no-ray --config configs/tvr.yaml \
  "data.train=$WORK/world/train" "data.val=$WORK/world/val" data.test= train.early_stop=0 \
  dist.num_workers=1 "run.storage=$WORK/runs" run.name=tvr-short "${TRAIN[@]}"

summary
((OWN_WORK)) && rm -rf "$WORK"
files=$(find "$OUT" -type f | wc -l)
echo "[gpu-check] $(( $(date +%s) - START ))s; $files files in $OUT:"
ls -l "$OUT"
"$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); e = s["bench_eval"] or {}
print(json.dumps({"ok": s["ok"], "total_s": s["total_s"], "env": s["env"],
                  "requirements": s["requirements"], "pytest": s["pytest"],
                  "bench_gpu": s["bench_gpu"], "bench_eval_speedup": e.get("speedup"),
                  "train": s["train"]}))' "$OUT/summary.json"
((files <= 8)) || { echo "more than 8 files in $OUT"; exit 1; }
grep -q '"ok": true' "$OUT/summary.json"

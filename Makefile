# Two commands are all the set-up there is: `make demo` and `make test`.
# Each creates .venv on first use and installs the project into it (editable, pinned).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export RAY_USAGE_STATS_ENABLED = 0
export HF_HUB_OFFLINE = 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# pytest-xdist processes for `make test`: most of a test's time is spent starting processes
# (Ray, DeepSpeed ranks, MLflow servers) and waiting on them, so more workers than cores keeps
# both cores busy. Tests are handed out one at a time and idle workers take queued ones
# (worksteal), so no file of long tests runs alone at the end.
TEST_WORKERS ?= 3

.PHONY: install demo test test-fast test-gpu gpu-bundle gpu-check-dry bench clean

install: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.2
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dldkd demo $(DEMO_ARGS)

# The explorer's browser test needs Debian's chromium: installed where we can (root with apt);
# elsewhere that one test skips and says how to install it.
test: $(STAMP)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; }; } \
	  || echo "chromium not installed: the browser test will skip (as root: apt-get install -y chromium)"
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# On a CUDA machine (install the CUDA build of torch first, see README): the GPU suite at the
# TVR preset's dims, then the GPU benchmarks (one JSON line each).
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu tests/gpu
	$(PY) -m bench.gpu
	$(PY) -m bench.eval --runs 2

# An air-gapped GPU node with a fixed PyTorch image (docs/benchmarks.md, "GPU"): the cp312 wheels
# it lacks, into gpu-bundle/; then `bash tools/gpu-check.sh` there. gpu-check-dry runs that
# script here on the CPU (CUDA steps skipped), then again with a 20 s budget, which must stop
# a step and still write summary.json.
gpu-bundle: $(STAMP)
	$(PY) tools/gpu_bundle.py

gpu-bundle/bundle.json: $(STAMP) constraints.txt tools/gpu_bundle.py
	$(PY) tools/gpu_bundle.py

gpu-check-dry: gpu-bundle/bundle.json
	rm -rf .cache/gpu-check-dry .cache/gpu-check-guard
	GPU_CHECK_DRY=1 OUT=.cache/gpu-check-dry bash tools/gpu-check.sh
	! GPU_CHECK_DRY=1 GPU_CHECK_BUDGET_S=20 OUT=.cache/gpu-check-guard bash tools/gpu-check.sh
	$(PY) -c "import json; s = json.load(open('.cache/gpu-check-guard/summary.json')); \
	  cut = [x['name'] for x in s['steps'] if x['status'] in ('timeout', 'skipped-out-of-time')]; \
	  assert cut, s['steps']; print('time guard stopped or skipped:', cut)"

bench: $(STAMP)
	for b in step eval data teacher scale; do $(PY) -m bench.$$b || exit 1; done

clean:
	rm -rf $(VENV) .cache build *.egg-info

# Two commands are all the set-up there is: `make demo` and `make test`.
# Each creates .venv on first use and installs the project into it (editable, pinned).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0
export RAY_USAGE_STATS_ENABLED = 0
export HF_HUB_OFFLINE = 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-fast test-gpu bench clean

install: $(STAMP)

$(STAMP): setup.cfg constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.2
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dldkd demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# On a CUDA machine (install the CUDA build of torch first, see README): the GPU suite at the
# TVR preset's dims, then the GPU benchmarks (one JSON line each).
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu tests/gpu
	$(PY) -m bench.gpu
	$(PY) -m bench.eval --runs 2

bench: $(STAMP)
	for b in step eval data teacher scale; do $(PY) -m bench.$$b || exit 1; done

clean:
	rm -rf $(VENV) .cache build *.egg-info

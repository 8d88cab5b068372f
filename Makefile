# Two commands do everything on a fresh machine:
#   make run    set up, then run the default pipeline end to end (dvc repro)
#   make test   set up, then run the test suite
# Both are idempotent: the venv is rebuilt only when pyproject.toml changes, and the
# dataset is staged once.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA_STAMP := data/raw/FashionMNIST/raw/t10k-labels-idx1-ubyte

export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(BIN):$(PATH)
# glibc's allocator keeps freed memory for the next tensor instead of handing every large
# block back to the kernel and faulting fresh zeroed pages in for the next one
# (docs/pipeline.md "Allocator"; measured by benchmarks/allocator.py).
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 17179869184
export MALLOC_TOP_PAD_ := 268435456

.PHONY: setup run test test-fast data dag serve mlflow-ui prefect-ui clean

# The project's own modules are byte-compiled too (only the changed ones, well under a
# second): where PYTHONDONTWRITEBYTECODE is set, as on this machine, every command would
# otherwise compile them from source again (0.12 s of a 3-s `securemark trace`).
setup: $(STAMP) $(DATA_STAMP)
	@$(BIN)/python -m compileall -q -j 0 src flows > /dev/null

# Three steps, each with the tool that does it fastest here:
# 1. pip installs torch and torchvision at pyproject.toml's pins: it finds them on this machine's
#    disk (pip's find-links), where uv would download a CUDA build of several GB;
# 2. uv installs the rest (resolves and downloads in parallel; 42 s where pip took 96 s, both
#    with an empty cache) and byte-compiles what it installed on every core. Where uv cannot be
#    installed or fails, pip does it instead;
# 3. compileall byte-compiles what pip installed, on every core (pip compiles on one core).
#    Python 3.12-only files (a few in torch and whenever) do not compile on 3.11, as under pip:
#    they are listed in the log, not fatal.
TORCH_PINS := $(shell grep -oE '"torch(vision)?==[^"]+"' pyproject.toml)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet --no-compile uv && $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -e ".[dev]" || \
		$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > $(VENV)/compileall.log 2>&1 || \
		echo "compileall: $$(grep -c '^\*\*\* Error' $(VENV)/compileall.log) files did not compile (see $(VENV)/compileall.log)"
	@touch $@

data: $(DATA_STAMP)

$(DATA_STAMP): | $(STAMP)
	bash scripts/ensure_dataset.sh $(BIN)/python

# One Prefect server for the whole run (flows/entry/pipeline.py), then dvc repro, in the
# profile PROFILE (default | full | private; README "Profiles").
PROFILE ?= default
run: setup
	$(BIN)/python -m flows.entry.pipeline --profile $(PROFILE)

# The suite runs on TEST_WORKERS processes (pytest-xdist; each test file stays in one
# worker, so its module fixtures are built once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: setup
	$(PYTEST) tests

test-fast: setup
	$(PYTEST) tests -m "not slow and not integration"

dag: setup
	$(BIN)/dvc dag

# Serve the deployments (issue-fingerprint, trace-suspicious-model, robustness-audit,
# retrain) against the Prefect server at PREFECT_API_URL, starting one on
# 127.0.0.1:4200 when none answers. Ctrl-C stops both.
serve: setup
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(BIN)/python -m flows.entry.serve --start-server

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

prefect-ui: setup
	$(BIN)/prefect server start

clean:
	rm -rf .prefect mlruns mlflow.db .pytest_cache dvc_plots

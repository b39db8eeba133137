# The two README commands: `make repro` (set up + run the whole DAG) and `make test` (set up + tests).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
FAISS ?= cpu
BIN := $(abspath $(VENV))/bin

# Offline, quiet, no telemetry: no model hub, no analytics, a private Prefect home.
export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PATH := $(BIN):$(PATH)

GPU_VENV ?= .venv-gpu
GPU_CHECK_ARGS ?=

.PHONY: setup repro test lint bench flow gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(FAISS),dev]"
	touch $@

repro: setup
	dvc repro
	dvc metrics show

test: setup
	pytest -q

lint: setup
	ruff check . && ruff format --check .

flow: setup
	digit flow

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; python $$b || exit 1; done

# On a CUDA machine: its own venv with the `gpu` extra (faiss-gpu never shares a venv with faiss-cpu), then
# the CUDA-vs-CPU checks. Without a GPU: the CPU part in the main venv, then exit status 3.
gpu-check:
	@if nvidia-smi -L >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory setup VENV=$(GPU_VENV) FAISS=gpu && \
		$(abspath $(GPU_VENV))/bin/python scripts/gpu_check.py $(GPU_CHECK_ARGS); \
	else \
		echo "gpu-check: nvidia-smi finds no NVIDIA GPU here"; \
		$(MAKE) --no-print-directory setup && $(BIN)/python scripts/gpu_check.py $(GPU_CHECK_ARGS); \
	fi

clean:
	rm -rf $(VENV) $(GPU_VENV) .prefect reports/inspect

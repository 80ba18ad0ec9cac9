# Two commands on a fresh machine: `make demo` (pipeline on the demo data) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin

# Offline-friendly defaults (see README "Environment").
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
export PATH := $(BIN):$(PATH)

.PHONY: setup demo test lint bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	dvc repro

test: setup
	pytest

lint: setup
	ruff check src tests bench

bench: setup
	python bench/convert.py
	python bench/thresholds.py
	python bench/train_overhead.py

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

.PHONY: setup demo test test-team coverage faults rehearse gpu-check lint bench engines

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	dvc repro

# Two pytest-xdist workers share the two cores (each test training on one thread, see
# tests/conftest.py); files stay whole on one worker and start longest first (the order of
# tests/conftest.py, which xdist keeps with --no-loadscope-reorder). The profile of the
# slowest tests closes the log.
PYTEST_PARALLEL ?= -n 2 --dist loadfile --no-loadscope-reorder

test: setup engines
	pytest $(PYTEST_PARALLEL)

# The suite again under coverage, the stages the tests run as subprocesses included
# ([tool.coverage.run] in pyproject.toml): the summary of src/ and the modules below 70%. CI
# runs it after the timed `make test`; coverage's tracer makes the suite slower.
coverage: setup engines
	rm -f .coverage .coverage.*
	pytest $(PYTEST_PARALLEL) --cov --cov-report=; status=$$?; \
	  python tests/coverage_summary.py 70 && exit $$status

# Servers the tests start on 127.0.0.1: PostgreSQL from Debian's package, installed when missing
# and apt is usable (root); otherwise the tests that need it are skipped (failed under CI=true).
engines:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
	    >/dev/null; } || echo "make engines: PostgreSQL missing (install the postgresql package)"

# The team engines on 127.0.0.1 (PostgreSQL, moto's S3 server, an MLflow server on both).
test-team: setup engines
	pytest $(PYTEST_PARALLEL) -m team tests/team

# The fault suite's long variants (10 seeds, 500 fuzzed DICOMs); rewrites the README table.
faults: setup engines
	PNEUMOSEG_FAULT_SEEDS=10 PNEUMOSEG_FAULT_FUZZED=500 PNEUMOSEG_FAULT_README=1 \
	  pytest -m faults tests/faults

# The SIIM-size rehearsal (bench/rehearse.py): the stages at N = 1,000 ... 10,675 on synthetic
# 1024 px DICOMs, measured; writes bench/results/rehearsal.{json,png} and the README table.
# Hours on 2 cores, up to ~45 GB of disk in /tmp/pneumoseg-rehearsal (deleted per N).
rehearse: setup
	python bench/rehearse.py --readme

# On a CUDA machine: a few AMP training steps of the SIIM profile's model at 512 and 1024 px,
# float16 against float32 inference, a one-rank NCCL torchrun, predict against model-only;
# writes gpu-check.json (bench/gpu_check.py --device cpu runs the same plumbing here).
gpu-check: setup
	pytest -m gpu tests/test_gpu_check.py

lint: setup
	ruff check src tests bench docs

# Every bench, each printing ratios against a bare baseline (tests/test_bench.py runs each on
# its smallest input in `make test`). noop and predict measure this project after `make demo`.
bench: setup demo
	python bench/convert.py
	python bench/convert.py --siim
	python bench/loader.py
	python bench/thresholds.py
	python bench/train_overhead.py
	python bench/team.py
	python bench/study_workers.py
	python bench/noop.py .
	python bench/predict.py .

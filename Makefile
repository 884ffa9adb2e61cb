# Everything runs from a virtual environment at .venv in the checkout, made on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= keras,dev,postgres,parallel,docker,ray

.PHONY: install run test test-fast lint bench ui server stop-services images base-image clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

## the main job on the embedded defaults: one study of the base ANN on digits,
## local SQLite MLflow (./mlflow.db) and Optuna storage (./optuna.db), in-process trials
run: install
	$(VENV)/bin/mlops-tune

## the whole test suite (real MLflow, real Optuna storages, real TensorFlow)
test: install
	$(PY) -m pytest -q

## tests without the ones that train Keras models or run long studies
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: install
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(PY) benchmarks/tracking_overhead.py
	$(PY) benchmarks/workers.py
	$(PY) benchmarks/time_to_target.py
	$(PY) benchmarks/runner_overhead.py   # needs a Docker engine and `make images`
	$(PY) benchmarks/ray_workers.py      # needs the PostgreSQL server binaries

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1

## a team setup on this machine: PostgreSQL + an MLflow server on 127.0.0.1 (prints the URIs to use)
server: install
	$(PY) -m devtools.devservices up .services --port $${MLFLOW_PORT:-5000}

## stop the background services that `make server` started (no-op when none runs)
stop-services:
	@for pidfile in .services/*.pid; do \
		[ -f "$$pidfile" ] || continue; \
		pid="$$(cat "$$pidfile")"; kill -TERM -- "-$$pid" 2>/dev/null || kill "$$pid" 2>/dev/null || true; \
		rm -f "$$pidfile"; \
	done

## the per-family trial images for runner=docker (mlops-tune-sklearn, mlops-tune-keras);
## BASE_IMAGE defaults to the official Python image (offline: `make base-image images BASE_IMAGE=mlops-tune-base:bookworm`)
BASE_IMAGE ?= python:3.11-slim-bookworm
images:
	BASE_IMAGE=$(BASE_IMAGE) docker/build-images.sh

## a Debian bookworm + Python base image made without any registry (debootstrap; needs root)
base-image:
	docker/base-image.sh mlops-tune-base:bookworm

clean:
	rm -rf outputs multirun mlruns mlflow.db optuna.db mlflow.db.lock optuna.db.lock mlflow.db-wal mlflow.db-shm optuna.db-wal optuna.db-shm

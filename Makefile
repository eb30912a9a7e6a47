# The two commands of the README: `make run` and `make test`. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/node.yaml
PYTEST_ARGS ?=

.PHONY: setup system-deps run test demo viewer bench soak lint clean

setup: system-deps $(STAMP)

system-deps:
	@scripts/install-system-deps.sh $(SYSTEM_DEPS_FLAGS)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[test]'
	@touch $(STAMP)

run: setup
	$(BIN)/dicom-node serve --config $(CONFIG)

test: SYSTEM_DEPS_FLAGS = --test
test: setup
	$(BIN)/ruff check ai dicom_node training tests bench scripts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/python scripts/demo.py

# Orthanc (DICOMweb) + the node + OHIF Viewer v3 (npm, cached) for a person to look at.
viewer: SYSTEM_DEPS_FLAGS = --test
viewer: setup
	$(BIN)/python scripts/viewer.py

# Quick by default (about 5 minutes on 2 cores); BENCH_ARGS=--full for the issue's sample
# counts (about half an hour). GPU figures: bench/gpu.sh on a CUDA machine.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# Not part of `make test` (a 2-minute run of the same script is): SOAK_MINUTES=30 by default.
soak: SYSTEM_DEPS_FLAGS = --test
soak: setup
	SOAK_MINUTES=$${SOAK_MINUTES:-30} $(BIN)/python scripts/soak.py

lint: setup
	$(BIN)/ruff check ai dicom_node training tests bench scripts

clean:
	rm -rf $(VENV) var build *.egg-info

# `make run` and `make test` do all set-up on a fresh machine (venv, pinned torch pair, the package editable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must be a compatible pair; they are pinned here and only here.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# test workers (pytest-xdist), one test file each at a time and one torch thread each: `auto` is one per core
# (2 here: 1.35x faster than one process with both cores); TEST_WORKERS=0 runs in this process
TEST_WORKERS ?= auto
# runs of `make run` in parallel, one torch thread each (2 on a 2-core machine: 1.5x the throughput of one run
# after another with both cores); e.g. make run JOBS=8
JOBS ?= 2

.PHONY: setup run test bench clean-outputs

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

## the main job: the 2D toy comparison on CPU, offline -> outputs/figure1/
run: setup
	WANDB_MODE=offline $(VENV)/bin/iif-reproduce figure1 --jobs $(JOBS)

## the test suite (CPU, offline)
test: setup
	WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## benchmarks (ratios measured in one run, JSON under outputs/bench/)
bench: setup
	$(PY) scripts/bench_sampling.py

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

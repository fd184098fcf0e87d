# `make run` and `make test` do all set-up on a fresh machine (venv, pinned torch pair, the package editable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must be a compatible pair; they are pinned here and only here.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# test workers (pytest-xdist), one test file each at a time and one torch thread each: `auto` is one per core
# (2 here); TEST_WORKERS=0 runs in this process. The files that time real multi-process runs (torchrun restarts,
# Slurm requeues, kills) run afterwards on their own, with no other tests beside them: under a second worker's load a
# torchrun restart was seen to abort
TEST_WORKERS ?= auto
ISOLATED_TESTS := tests/test_distributed.py tests/test_slurm.py tests/test_kill.py
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
	WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		$(addprefix --ignore=,$(ISOLATED_TESTS)) $(PYTEST_ARGS)
	WANDB_MODE=offline $(PY) -m pytest -q $(ISOLATED_TESTS) $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

## benchmarks (ratios measured in one run, JSON under outputs/bench/)
bench: setup
	$(PY) scripts/bench_sampling.py

clean-outputs:
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

# The two set-up commands of the README: `make demo` (the end-to-end demo on generated data, CPU) and
# `make test` (lint + the whole test suite). Each creates .venv and installs what it needs on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline

.PHONY: demo test test-fast lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python tools/install_venv.py $(VENV) '.[dev]'  # uv with pip's indexes and pins (pip if uv fails)
	touch $@

demo: install  # replaces $(RUN): the whole pipeline on generated data, CPU, ~20 min; see docs/getting-started.md
	rm -rf $(RUN)
	$(BIN)/ldm-demo --out $(RUN)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers, one torch thread each, a test file per worker at a time (a module's fixtures, such as the
# demo run or the one local Slurm cluster, are built once); tests/conftest.py hands out the longest files first.
# --no-loadscope-reorder: xdist otherwise re-sorts files by their number of tests, which put the few-test,
# minutes-long files (elastic resume, the demo) last and left one worker running them alone at the end.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: lint  # everything CI runs: DeepSpeed ranks, a real local Slurm cluster (installed as root when missing)
	$(BIN)/python -m pytest $(XDIST) --durations=30

test-fast: install  # the edit-test loop (< 3 min): no DeepSpeed launch, Slurm job or training run
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

clean:
	rm -rf runs .pytest_cache .ruff_cache

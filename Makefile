PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow lint demo

# One venv for everything: the CPU torch build first (pinned, from local disk), then the package + extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff check .

# What CI runs (.ci/run): lint, then every test not marked slow.
test: lint
	$(BIN)/python -m pytest -n 2 -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

demo: setup
	$(BIN)/python train.py

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

# What CI runs (.ci/run): lint, every test not marked slow (on this CPU's own bf16 paths), then the in-process
# model tests again as on a CPU of the other kind (BILINGUAL_GLM_BF16=0 where bf16 is native, =1 where it is
# not), so both kinds of path run on any CI machine.
MODEL_TESTS := tests/test_modeling.py tests/test_parity.py tests/test_hardware.py
OTHER_BF16 := import torch; from modeling.kernels_bilingual_glm import fast_bf16; print(0 if fast_bf16() else 1)
test: lint
	$(BIN)/python -m pytest -n 2 -q
	other=$$($(BIN)/python -c "$(OTHER_BF16)") && echo "BILINGUAL_GLM_BF16=$$other (the other kind of CPU)" && \
	BILINGUAL_GLM_BF16=$$other $(BIN)/python -m pytest -n 2 -q $(MODEL_TESTS)

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

demo: setup
	$(BIN)/python train.py

# Two commands: `make demo` and `make test`. Both create .venv if missing, install torch first
# (pinned; CPU build here, the CUDA build of the same version on a GPU machine), then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flipscope-installed
TORCH := torch==2.13.0

.PHONY: demo test lint typecheck organism bench clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -c "import torch, transformers, nnsight; print('torch', torch.__version__, '| transformers', transformers.__version__, '| nnsight', nnsight.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 $(BIN)/flipscope demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 $(BIN)/python -m pytest -q --nbmake tests notebooks

lint: $(STAMP)
	$(BIN)/ruff check hooks interp analyses lora_targeted tests benchmarks
	$(BIN)/mypy

organism: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/flipscope organism train

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_eval.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_patching.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_fingerprint.py

clean-venv:
	rm -rf $(VENV)

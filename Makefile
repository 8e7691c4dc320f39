# Two commands: `make demo` and `make test`. Both create .venv if missing, install torch first
# (pinned; CPU build here, the CUDA build of the same version on a GPU machine), then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flipscope-installed
TORCH := torch==2.13.0

.PHONY: demo test lint typecheck organism bench docs screenshot clean-venv

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
	$(BIN)/ruff check hooks interp analyses lora_targeted tests benchmarks docs
	$(BIN)/mypy

# The notebooks as a reader sees them: executed on the organism, exported as offline HTML with figures.
docs: $(STAMP)
	HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PLOTLY_RENDERER=notebook $(BIN)/python docs/build_notebooks.py notebooks/*.ipynb --out docs/notebooks

# The README's picture: the demo report in headless Chromium (apt-get install chromium).
screenshot: demo
	$(BIN)/python -m analyses.eval.browser runs/demo/report.html docs/report.png 1400 1750

organism: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/flipscope organism train

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_eval.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_patching.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_fingerprint.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_shards.py

clean-venv:
	rm -rf $(VENV)

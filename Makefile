# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs knsparse into it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on machines without a GPU; override e.g. TORCH='torch>=2.11' on a CUDA box.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
CUTLASS := $(VENV)/.cutlass

.PHONY: demo test lint cuda

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

test: lint $(CUTLASS)
	$(PY) -m pytest -q

# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Tools run as executables (`.venv/bin/pytest`, `.venv/bin/knsparse`), never `python -m` from here:
# that puts the repository root first on sys.path, and the top-level kernels/ would then shadow
# Hugging Face's `kernels` package (imported by transformers >= 5).
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
# The CUTLASS release the kernels, the host probes and the metadata layout tests are checked against.
CUTLASS_PIN := nvidia-cutlass==4.2.0.0

.PHONY: demo test test-models lint cuda bench-cpu

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
	$(PY) -m pip install -q --no-deps "$(CUTLASS_PIN)"
	touch $(CUTLASS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

$(MODELS_STAMP): setup.py pyproject.toml
	python3 -m venv $(MODELS_VENV)
	$(MODELS_VENV)/bin/python -m pip install -q --upgrade pip
	$(MODELS_VENV)/bin/python -m pip install -q $(MODELS_TORCH)
	$(MODELS_VENV)/bin/python -m pip install -q -e ".[test,onnx,models,vision]"
	touch $(MODELS_STAMP)

# Only the tests marked `models`; the rest of the suite runs in .venv on the CPU wheel.
test-models: $(MODELS_STAMP)
	$(MODELS_VENV)/bin/pytest -q -m models

test: lint $(CUTLASS)
	$(VENV)/bin/pytest -q -m "not models"
	$(MAKE) --no-print-directory test-models

# pytest-benchmark of the CPU ops, each beside its plain-PyTorch reference in the same run
# (bench/pytest_bench: outside tests/, the only testpaths, so `make test` never collects it);
# writes the JSON and a markdown table (op, knsparse, reference, ratio) with the provenance.
# BENCH_THREADS=1 on a busy host (torch's default thread count otherwise).
BENCH_CPU_JSON := bench/results/pytest_bench_cpu.json
BENCH_THREADS ?=
bench-cpu: $(STAMP)
	KNSPARSE_BENCH_THREADS=$(BENCH_THREADS) $(VENV)/bin/pytest -q bench/pytest_bench --benchmark-only --benchmark-json $(BENCH_CPU_JSON) \
		--benchmark-min-rounds 5 --benchmark-max-time 0.5 --benchmark-sort name
	$(PY) bench/pytest_bench_report.py $(BENCH_CPU_JSON)

# libknsparse_cuda.so (python/knsparse/ops/): the CUDA kernels behind the C ABI of
# csrc/knsparse_capi.h, static CUDA runtime, no libtorch, so it builds on a machine without a GPU.
# CMakeLists.txt is the one build description (sources, sm_80 + compute_80 PTX / sm_90a, the
# ptxas "Potential Performance Loss" check); this only gives it .venv's Python, which has the
# pinned CUTLASS headers. CMake rebuilds only what changed.
CMAKE_BUILD := build/cmake

cuda: $(CUTLASS)
	cmake -S . -B $(CMAKE_BUILD) -DPython_EXECUTABLE=$(abspath $(PY))
	cmake --build $(CMAKE_BUILD) -j2

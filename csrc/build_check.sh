#!/usr/bin/env bash
# Compile-only check of csrc/ for sm_80 and sm_90a: no GPU needed, nothing is linked or run.
# CI calls it so a kernel that does not compile cannot land. It compiles one sparse GEMM
# translation unit per architecture (fp16 for sm_80, bf16 for sm_90a: three fused-epilogue
# instantiations each) in parallel, the im2col kernel for both, and checks the torch binding's
# syntax against the installed PyTorch headers. `csrc/build_check.sh --all` compiles every unit.
#
# Prints a reason and exits 0 (skipped) when nvcc or the CUTLASS headers are missing; exits 1
# when anything fails to compile.
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "build_check: SKIPPED -- nvcc not found (set NVCC or install the CUDA toolkit >= 12.2)"
    exit 0
fi
if ! CUTLASS=$("$PY" csrc/find_cutlass.py 2>&1); then
    echo "build_check: SKIPPED -- $CUTLASS"
    exit 0
fi
echo "build_check: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "build_check: CUTLASS headers in $CUTLASS"

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
NVCC_FLAGS=(-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -Icsrc -isystem "$CUTLASS")
SM80=(-gencode=arch=compute_80,code=sm_80)
SM90=(-gencode=arch=compute_90a,code=sm_90a)

# compile NAME SOURCE GENCODE...: nvcc -c into $OUT, log kept for failures. ptxas's
# "Potential Performance Loss" (e.g. C7510: serialized WGMMA) fails the check too: such a
# Hopper kernel is correct but loses most of its speed.
compile() {
    local name=$1 source=$2 start=$SECONDS
    shift 2
    if ! "$NVCC" "${NVCC_FLAGS[@]}" "$@" -c "$source" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1; then
        echo "build_check: FAIL $name"
        cat "$OUT/$name.log"
        return 1
    fi
    if grep -q "Potential Performance Loss" "$OUT/$name.log"; then
        echo "build_check: FAIL $name (ptxas reports a performance loss)"
        grep "Potential Performance Loss" "$OUT/$name.log" | cut -c1-300
        return 1
    fi
    echo "build_check: ok   $name ($((SECONDS - start)) s)"
}

units=("sm80_f16 csrc/sparse_gemm_sm80_f16.cu SM80" "sm90_bf16 csrc/sparse_gemm_sm90_bf16.cu SM90")
if [[ "${1:-}" == "--all" ]]; then
    units+=("sm80_bf16 csrc/sparse_gemm_sm80_bf16.cu SM80" "sm90_f16 csrc/sparse_gemm_sm90_f16.cu SM90")
fi

start=$SECONDS
status=0
pids=()
for unit in "${units[@]}"; do
    read -r name source arch <<<"$unit"
    if [[ $arch == SM80 ]]; then gencode=("${SM80[@]}"); else gencode=("${SM90[@]}"); fi
    compile "$name" "$source" "${gencode[@]}" &
    pids+=($!)
done
compile im2col csrc/im2col_rsc.cu "${SM80[@]}" "${SM90[@]}" || status=1
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

# The binding: syntax only (linking needs a CUDA build of PyTorch). CPU wheels lack the
# generated c10/cuda macros header; the define below stands in for it.
if TORCH_INCLUDE=$("$PY" -c "import torch.utils.cpp_extension as e; print(' '.join(e.include_paths()))" 2>/dev/null); then
    CUDA_INCLUDE=$(dirname "$(command -v "$NVCC")")/../include
    [[ -f "$CUDA_INCLUDE/cuda_runtime_api.h" ]] || CUDA_INCLUDE=${CUDA_HOME:-/usr/local/cuda}/include
    includes=()
    for dir in $TORCH_INCLUDE; do includes+=(-isystem "$dir"); done
    if "$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${includes[@]}" \
        -isystem "$CUDA_INCLUDE" -Icsrc csrc/torch_ops.cpp >"$OUT/torch_ops.log" 2>&1; then
        echo "build_check: ok   torch_ops (syntax)"
    else
        echo "build_check: FAIL torch_ops"
        cat "$OUT/torch_ops.log"
        status=1
    fi
else
    echo "build_check: torch_ops not checked -- PyTorch is not importable with $PY"
fi

echo "build_check: $([[ $status == 0 ]] && echo passed || echo FAILED) in $((SECONDS - start)) s"
exit $status

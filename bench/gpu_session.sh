#!/usr/bin/env bash
# The first GPU session, as two calls of the device tool's `run` on the H200 image (torch 2.11,
# Triton, ONNX Runtime, timm there; nothing can be downloaded, so the CUTLASS headers travel).
#
# Here, once (copies the headers of the nvidia-cutlass wheel, installing it into .venv if needed, ~27 MiB):
#   bash bench/gpu_session.sh carry-cutlass
# Then, each call with carry [".cutlass"] and timeout_s 600 (a machine left idle is given back
# after 30 s, so every stage builds what it needs itself):
#   bash bench/gpu_session.sh test    # build knsparse-cuda, every @pytest.mark.gpu test
#   bash bench/gpu_session.sh bench   # build, dense vs 2:4 GEMM/conv kernels, the model audit
#                                     # (also with MLP activations fused into the sparse fc1)
#   bash bench/gpu_session.sh yopo    # YOPO on the GPU (Triton vs reference vs scikit-learn)
# What comes back under $OUT: logs, and bench/results as one tarball (the tool returns at most
# 8 files). Commit the JSONs from the tarball; never a figure that is not in one.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh carry-cutlass|test|bench|yopo}
out=${OUT:-$PWD/gpu-session-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 KNSPARSE_CACHE=$PWD/.cache/knsparse

install() {
    # The editable install maps knsparse.kernels to kernels/; no dependency is fetched.
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
        || { tail -20 "$out/install.log"; return 1; }
}

build() {
    install || return 1
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DKNSPARSE_CUTLASS_INCLUDE="$PWD/.cutlass/include" \
        -DPython3_EXECUTABLE="$(command -v python3)" >"$out/build.log" 2>&1 \
        && cmake --build build -j "$(nproc)" >>"$out/build.log" 2>&1 \
        || { tail -40 "$out/build.log"; return 1; }
    python3 -c "import knsparse.backends as b; print(b.available())"
}

case "$stage" in
carry-cutlass)
    py=python3 && [ -x .venv/bin/python ] && py=.venv/bin/python
    include=$("$py" csrc/find_cutlass.py 2>/dev/null) \
        || { "$py" -m pip install -q --no-deps nvidia-cutlass && include=$("$py" csrc/find_cutlass.py); } || exit 1
    rm -rf .cutlass && mkdir -p .cutlass && cp -r "$include" .cutlass/include
    du -sh .cutlass
    ;;
test)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
    build || exit 1
    python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
    ;;
bench)
    build || exit 1
    status=0
    python3 bench/bench_gemm.py 2>&1 | tee "$out/bench_gemm.log" || status=1
    python3 bench/bench_audit.py 2>&1 | tee "$out/bench_audit.log" || status=1
    python3 bench/bench_audit.py --fuse-activations 2>&1 | tee "$out/bench_audit_fused.log" || status=1
    tar czf "$out/results.tgz" bench/results
    exit $status
    ;;
yopo)
    install || exit 1
    python3 bench/bench_yopo.py --name yopo_gpu 2>&1 | tee "$out/bench_yopo.log"
    status=$?
    tar czf "$out/results.tgz" bench/results
    exit $status
    ;;
*)
    echo "unknown stage $stage: carry-cutlass|test|bench|yopo" >&2
    exit 2
    ;;
esac

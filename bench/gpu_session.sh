#!/usr/bin/env bash
# Everything the GPU machine should check, in ONE call of the device tool's `run` (<= 8 min).
# Nothing is compiled there: libknsparse_cuda.so is built here (`make -j2 cuda`) and travels
# with the working tree (carry ["python/knsparse/ops/libknsparse_cuda.so"]).
#
#   run(command="bash bench/gpu_session.sh \$OUT", carry=["python/knsparse/ops/libknsparse_cuda.so"],
#       timeout_s=600)
#   bash bench/gpu_session.sh --dry-run [OUT]   # the same plumbing on a CPU machine (tests run it)
#
# Steps, most important first, each under its own time limit (seconds, overridable as
# KNSPARSE_SESSION_<STEP>_S), each logged into OUT/session.log with its exit status:
#   device    nvidia-smi (the GPU, driver, memory)
#   install   editable install of this tree, no dependencies, nothing downloaded
#   native    the library's build info and what knsparse.backends.available() reports
#   correct   knsparse-cuda correctness first: tests/backends/test_knsparse_cuda_gpu.py + tests/ops/test_native.py
#   gpu       every other @pytest.mark.gpu test
# (limits add up to 535 s, so the call ends within 9 minutes even if every step times out)
#   gemm      bench/bench_gemm.py: dense cuBLAS vs cuSPARSELt vs knsparse-cuda, ViT-B/16 and
#             ResNet-50 shapes, fp16 and bf16 (JSON rewritten after every case)
#   audit     bench/bench_audit.py --timm: timm vit_base_patch16_224 and resnet50, CUDA graphs
#   yopo      bench/bench_yopo.py --quick on the GPU
#   speed     bench/gpu_speed.py: whole-model permutation (timm ResNet-50, ViT-B/16) and one-shot
#             sparsegpt / sparsegpt-refit on ViT-B/16's blocks, on the GPU
# A step that fails or times out is recorded and the next one runs. OUT (default
# gpu-session-out/) ends with at most 9 files: session.log, bench_gemm_<device>.json/.png,
# audit_cuda.json/.png, yopo_gpu.json/.png, speed_gpu.json. Commit the JSON/PNG files (never a
# figure that is not in one); in --dry-run nothing is timed and the GPU steps take their "no device" path.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
out=$(mkdir -p "${1:-gpu-session-out}" && cd "${1:-gpu-session-out}" && pwd)
log=$out/session.log
: >"$log"
export PYTHONUNBUFFERED=1 KNSPARSE_RESULTS_DIR=$out KNSPARSE_CACHE=${KNSPARSE_CACHE:-$PWD/.cache/knsparse}
export KNSPARSE_REQUIRE_CUDA_BACKEND=$((1 - dry_run)) KNSPARSE_REQUIRE_NATIVE=$((1 - dry_run)) MPLBACKEND=Agg
py=python3
[[ $dry_run == 1 && -x .venv/bin/python ]] && py=.venv/bin/python
# A dry run shares a CPU machine with other jobs: its limits stretch (the GPU run's do not).
scale=$((dry_run ? ${KNSPARSE_SESSION_DRY_SCALE:-4} : 1))
session_start=$SECONDS

# step NAME DEFAULT_LIMIT_S COMMAND...: run COMMAND under its time limit, log it, go on.
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    local var="KNSPARSE_SESSION_${name^^}_S"
    limit=${!var:-$((limit * scale))}
    echo "=== $name (limit ${limit} s): $*" >>"$log"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s$([[ $rc == 124 ]] && echo ' (TIME-OUT)')" >>"$log"
    echo "$name: exit $rc after $((SECONDS - start)) s"
}

if [[ $dry_run == 1 ]]; then
    step device 10 echo "dry-run: no nvidia-smi (CPU machine)"
    step install 10 echo "dry-run: the editable install of this tree is already there"
else
    step device 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    step install 45 "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
step native 30 "$py" -c "
import torch, knsparse.backends as b
from knsparse.ops import native
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.is_available() and torch.cuda.get_device_name())
print(native.load_error() or native.build_info())
for s in b.available(): print(s)"
# -P: the repository root stays off sys.path (its kernels/ would shadow Hugging Face's `kernels`)
pytest=("$py" -P -m pytest -q -rs -p no:cacheprovider)
step correct 120 "${pytest[@]}" tests/backends/test_knsparse_cuda_gpu.py tests/ops/test_native.py
step gpu 75 "${pytest[@]}" -m gpu tests --ignore=tests/backends/test_knsparse_cuda_gpu.py --ignore=tests/ops/test_native.py
if [[ $dry_run == 1 ]]; then
    step gemm 120 "$py" bench/bench_gemm.py --linear-batches 1 --skip-conv --dtypes float16
    step audit 10 echo "dry-run: bench_audit.py --timm skipped (no CUDA device)"
    step yopo 10 echo "dry-run: bench_yopo.py skipped (no CUDA device)"
    step speed 10 echo "dry-run: gpu_speed.py skipped (no CUDA device)"
else
    step gemm 100 "$py" bench/bench_gemm.py --warmup 10 --rep 40 --linear-batches 1,8,32,128,256 --conv-batches 1,8,64
    step audit 60 "$py" bench/bench_audit.py --timm
    step yopo 30 "$py" bench/bench_yopo.py --quick --name yopo_gpu --models resnet50
    step speed 60 "$py" bench/gpu_speed.py
fi
echo "session: $((SECONDS - session_start)) s; $(find "$out" -maxdepth 1 -type f | wc -l) files in $out" | tee -a "$log"

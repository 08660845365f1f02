// Ampere / Ada 2:4 sparse GEMM, fp16 in and out.
#include "sparse_gemm_sm80.cuh"

namespace knsparse {

std::string sparse_gemm_sm80_f16(const SparseGemmArgs& args, cudaStream_t stream) {
  return sm80::dispatch<cutlass::half_t>(args, stream);
}

}  // namespace knsparse

// Hopper 2:4 sparse GEMM, bf16 in and out.
#include "sparse_gemm_sm90.cuh"

namespace knsparse {

size_t sparse_gemm_sm90_bf16_workspace(const SparseGemmArgs& args, int device) {
  return sm90::dispatch_workspace<cutlass::bfloat16_t>(args, device);
}

std::string sparse_gemm_sm90_bf16(const SparseGemmArgs& args, void* workspace, int device,
                                  cudaStream_t stream) {
  return sm90::dispatch<cutlass::bfloat16_t>(args, workspace, device, stream);
}

}  // namespace knsparse

// The C++ side of libknsparse_cuda: one function per architecture and element type behind the
// C ABI of knsparse_capi.h (which documents the operands and layouts). Each returns an empty
// string on success and otherwise a message naming the failed requirement.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "knsparse_capi.h"

namespace knsparse {

using SparseGemmArgs = knsparse_gemm_args;
using Im2colArgs = knsparse_im2col_args;

constexpr int kSm90MetaBlockK = KNSPARSE_SM90_META_BLOCK_K;
constexpr int kSm90MetaBlockRows = KNSPARSE_SM90_META_BLOCK_ROWS;

// Ampere / Ada: the CUTLASS 2.x kernel (feature-major output; see knsparse_capi.h).
std::string sparse_gemm_sm80_f16_can_implement(const SparseGemmArgs& args);
std::string sparse_gemm_sm80_bf16_can_implement(const SparseGemmArgs& args);
std::string sparse_gemm_sm80_f16(const SparseGemmArgs& args, cudaStream_t stream);
std::string sparse_gemm_sm80_bf16(const SparseGemmArgs& args, cudaStream_t stream);

// Hopper: the CUTLASS 3.x kernels (token-major output), one table per element type and
// configuration (KNSPARSE_CONFIG_LARGE / _SMALL).
struct Sm90Kernels {
  std::string (*can_implement)(const SparseGemmArgs& args, int sm_count);
  size_t (*workspace)(const SparseGemmArgs& args, int device, int sm_count);
  std::string (*run)(const SparseGemmArgs& args, void* workspace, int device, int sm_count, cudaStream_t stream);
};
extern const Sm90Kernels kSm90F16Large, kSm90F16Small, kSm90Bf16Large, kSm90Bf16Small;

// For any 16-bit element type (fp16, bf16): im2col only moves 16-bit words.
std::string im2col_rsc_16bit(const Im2colArgs& args, cudaStream_t stream);

}  // namespace knsparse

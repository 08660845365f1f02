// knsparse_cuda: the torch-free C++ interface of the CUDA kernels.
//
// The sparse GEMM computes, for a 2:4 sparse weight W [rows, depth] and dense activations
// x [cols, depth] (cols = tokens, or N*P*Q im2col rows):
//
//     out[rows, cols] = act(W @ x^T + bias[:, None])        (fp32 accumulate, fp16/bf16 out)
//
// i.e. the transpose of `act(F.linear(x, W, bias))`. The sparse operand must be the left one on
// sparse tensor cores, so the output is feature-major; a row-major [rows, cols] buffer is the
// same memory as a column-major [cols, rows] `F.linear` result.
//
// W travels as `values` [rows, depth/2] (the kept entries of every group of 4, row-major) and
// `meta` (2-bit indices of the kept entries, 4 bits per group), whose layout depends on the
// architecture:
//   * sm80: CUTLASS 2.x SparseGemm: int16 [rows, depth/16] reordered into
//           ColumnMajorInterleaved<2>, exactly what knsparse.pack / torch's
//           sparse_semi_structured_from_dense_cutlass produce.
//   * sm90: CUTLASS 3.x Sm90GemmSparseConfig tensor-E layout for a threadblock K of
//           kSm90MetaBlockK: int16 [round_up(rows, 64), round_up(depth, kSm90MetaBlockK)/16];
//           knsparse.backends.knsparse_cuda.sm90_meta_from_cutlass converts.
//
// Every function returns an empty string on success and otherwise a message that names the
// failing requirement (the torch layer raises it as an error).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

// The CUDA runtime's own declaration of cudaStream_t (driver_types.h), repeated so that host-only
// code (the CPU probes in tests/native/) can include this header without the CUDA toolkit.
typedef struct CUstream_st* cudaStream_t;

namespace knsparse {

enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2 };

// Logical K (dense elements) of one Hopper mainloop k-block; fixes the sm90 metadata layout.
constexpr int kSm90MetaBlockK = 128;
// Rows of one Hopper metadata atom (the sm90 metadata is padded to a multiple of this).
constexpr int kSm90MetaBlockRows = 64;

struct SparseGemmArgs {
  int64_t rows = 0;   // GEMM M: output features, rows of the sparse weight
  int64_t cols = 0;   // GEMM N: tokens
  int64_t depth = 0;  // GEMM K: reduction length of the dense weight
  const void* values = nullptr;  // [rows, depth/2] row-major, contiguous
  const void* meta = nullptr;    // architecture-specific layout, see above
  const void* x = nullptr;       // [cols, depth] row-major, leading dimension ldx
  int64_t ldx = 0;
  const void* bias = nullptr;    // [rows] or nullptr for no bias
  void* out = nullptr;           // [rows, cols] row-major, leading dimension ldo
  int64_t ldo = 0;
  Activation activation = Activation::kNone;
};

// Ampere / Ada (compute capability 8.x). Requires rows % 32 == 0, depth % 64 == 0,
// cols % 8 == 0, ldx % 8 == 0, ldo % 8 == 0 and 16-byte aligned pointers.
std::string sparse_gemm_sm80_f16(const SparseGemmArgs& args, cudaStream_t stream);
std::string sparse_gemm_sm80_bf16(const SparseGemmArgs& args, cudaStream_t stream);

// Hopper (compute capability 9.0, sm_90a). Requires depth % 16 == 0, ldx % 8 == 0,
// ldo % 8 == 0 and 16-byte aligned pointers; rows and cols are free.
// `workspace` must hold sparse_gemm_sm90_*_workspace(args) bytes; `device` is the CUDA ordinal.
size_t sparse_gemm_sm90_f16_workspace(const SparseGemmArgs& args, int device);
size_t sparse_gemm_sm90_bf16_workspace(const SparseGemmArgs& args, int device);
std::string sparse_gemm_sm90_f16(const SparseGemmArgs& args, void* workspace, int device,
                                 cudaStream_t stream);
std::string sparse_gemm_sm90_bf16(const SparseGemmArgs& args, void* workspace, int device,
                                  cudaStream_t stream);

// im2col with the reduction axis ordered (R, S, C): row (n, p, q) of `out` holds
// x[n, :, p*stride_h - pad_h + r*dil_h, q*stride_w - pad_w + s*dil_w] for r, s in kernel order,
// channels innermost, zero outside the image, then zeros up to k_pad columns.
struct Im2colArgs {
  const void* x = nullptr;  // [n, c, h, w], 16-bit elements, arbitrary element strides
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t stride_n = 0, stride_c = 0, stride_h = 0, stride_w = 0;
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t conv_stride_h = 1, conv_stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  int64_t out_h = 0, out_w = 0;  // P, Q
  int64_t k_pad = 0;             // columns of `out` (>= kernel_h * kernel_w * c)
  void* out = nullptr;           // [n * out_h * out_w, k_pad] row-major, contiguous
};

// For any 16-bit element type (fp16, bf16): im2col only moves 16-bit words.
std::string im2col_rsc_16bit(const Im2colArgs& args, cudaStream_t stream);

}  // namespace knsparse

// im2col with the reduction axis in (R, S, C) order, written straight into the dense operand of
// the sparse GEMM: out[(n, p, q), (r, s, c)] row-major, zero padding outside the image and in
// the k_pad tail. One thread writes VEC consecutive channels of one (row, r, s); VEC = 8
// (16-byte loads and stores) when the channels are contiguous and aligned, else 1.
// im2col only moves 16-bit words, so one kernel serves fp16 and bf16.
#include <algorithm>
#include <string>

#include "im2col_rsc.cuh"

namespace knsparse {
namespace {

constexpr int kThreads = 256;

template <int VEC>
__global__ void __launch_bounds__(kThreads) im2col_rsc_kernel(Im2colArgs a, int64_t vectors) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vectors;
       i += int64_t(gridDim.x) * blockDim.x) {
    im2col_rsc_vector<VEC>(a, i);
  }
}

template <int VEC>
void launch(const Im2colArgs& a, cudaStream_t stream) {
  const int64_t vectors = a.n * a.out_h * a.out_w * (a.k_pad / VEC);
  const int64_t blocks = std::min<int64_t>((vectors + kThreads - 1) / kThreads, int64_t(1) << 20);
  im2col_rsc_kernel<VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, vectors);
}

}  // namespace

std::string im2col_rsc_16bit(const Im2colArgs& a, cudaStream_t stream) {
  const int64_t depth = a.kernel_h * a.kernel_w * a.c;
  if (a.n <= 0 || a.c <= 0 || a.out_h <= 0 || a.out_w <= 0) return "im2col_rsc: empty input or output";
  if (a.k_pad < depth) {
    return "im2col_rsc: k_pad=" + std::to_string(a.k_pad) + " is smaller than R*S*C=" + std::to_string(depth);
  }
  if (im2col_rsc_vectorizable(a)) {
    launch<8>(a, stream);
  } else {
    launch<1>(a, stream);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string("im2col_rsc launch failed: ") + cudaGetErrorString(err);
}

}  // namespace knsparse

// The per-vector body of the (R, S, C) im2col kernel, shared by the CUDA kernel and the host
// probe that tests the index arithmetic on CPU (tests/native/im2col_probe.cpp).
#pragma once

#include <cstdint>

#include "knsparse_cuda.h"

#if defined(__CUDACC__)
#define KNSPARSE_HOST_DEVICE __host__ __device__
#else
#define KNSPARSE_HOST_DEVICE
#endif

namespace knsparse {

template <int VEC>
struct alignas(2 * VEC) Words16 {
  uint16_t v[VEC];
};

// True when 8-wide (16-byte) vectors never straddle a kernel position or the k_pad tail and
// every load and store is 16-byte aligned.
inline bool im2col_rsc_vectorizable(const Im2colArgs& a) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return a.c % 8 == 0 && a.k_pad % 8 == 0 && a.stride_c == 1 && a.stride_n % 8 == 0 && a.stride_h % 8 == 0 &&
         a.stride_w % 8 == 0 && aligned(a.x) && aligned(a.out);
}

// Writes vector `i` (VEC consecutive columns of one output row) of the im2col output.
template <int VEC>
KNSPARSE_HOST_DEVICE inline void im2col_rsc_vector(const Im2colArgs& a, int64_t i) {
  const auto* x = static_cast<const uint16_t*>(a.x);
  auto* out = static_cast<uint16_t*>(a.out);
  const int64_t vec_per_row = a.k_pad / VEC;
  const int64_t depth = a.kernel_h * a.kernel_w * a.c;
  const int64_t row = i / vec_per_row;
  const int64_t col = (i - row * vec_per_row) * VEC;
  Words16<VEC> words{};  // zeros: padding outside the image and the k_pad tail
  if (col < depth) {
    const int64_t c = col % a.c;
    const int64_t rs = col / a.c;
    const int64_t s = rs % a.kernel_w;
    const int64_t r = rs / a.kernel_w;
    const int64_t q = row % a.out_w;
    const int64_t np = row / a.out_w;
    const int64_t p = np % a.out_h;
    const int64_t n = np / a.out_h;
    const int64_t ih = p * a.conv_stride_h - a.pad_h + r * a.dil_h;
    const int64_t iw = q * a.conv_stride_w - a.pad_w + s * a.dil_w;
    if (ih >= 0 && ih < a.h && iw >= 0 && iw < a.w) {
      const uint16_t* src = x + n * a.stride_n + ih * a.stride_h + iw * a.stride_w + c * a.stride_c;
      if constexpr (VEC == 1) {
        words.v[0] = *src;
      } else {
        words = *reinterpret_cast<const Words16<VEC>*>(src);
      }
    }
  }
  *reinterpret_cast<Words16<VEC>*>(out + row * a.k_pad + col) = words;
}

}  // namespace knsparse

// Host-only probe that runs the CUDA im2col kernel's per-vector body (csrc/im2col_rsc.cuh) on
// CPU, used by tests/test_im2col.py to check its index arithmetic against im2col_rsc_ref.
//
// Usage: im2col_probe N C H W R S STRIDE_H STRIDE_W PAD_H PAD_W DIL_H DIL_W K_PAD nchw|nhwc
// The input holds 1 + its storage offset at every element (so 0 marks padding). Prints the
// vector width on stderr and the [N*P*Q, K_PAD] output, one row per line, on stdout.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "im2col_rsc.cuh"

int main(int argc, char** argv) {
  if (argc != 15) {
    std::fprintf(stderr, "usage: %s N C H W R S SH SW PH PW DH DW K_PAD nchw|nhwc\n", argv[0]);
    return 2;
  }
  int64_t v[13];
  for (int i = 0; i < 13; ++i) v[i] = std::atoll(argv[i + 1]);
  const bool nhwc = std::strcmp(argv[14], "nhwc") == 0;
  knsparse::Im2colArgs a{};
  a.n = v[0], a.c = v[1], a.h = v[2], a.w = v[3];
  a.kernel_h = v[4], a.kernel_w = v[5];
  a.conv_stride_h = v[6], a.conv_stride_w = v[7];
  a.pad_h = v[8], a.pad_w = v[9];
  a.dil_h = v[10], a.dil_w = v[11];
  a.k_pad = v[12];
  a.out_h = (a.h + 2 * a.pad_h - a.dil_h * (a.kernel_h - 1) - 1) / a.conv_stride_h + 1;
  a.out_w = (a.w + 2 * a.pad_w - a.dil_w * (a.kernel_w - 1) - 1) / a.conv_stride_w + 1;
  if (nhwc) {
    a.stride_c = 1, a.stride_w = a.c, a.stride_h = a.c * a.w, a.stride_n = a.c * a.w * a.h;
  } else {
    a.stride_w = 1, a.stride_h = a.w, a.stride_c = a.w * a.h, a.stride_n = a.c * a.w * a.h;
  }
  const int64_t numel = a.n * a.c * a.h * a.w;
  const int64_t rows = a.n * a.out_h * a.out_w;
  // 16-byte aligned storage, as the CUDA caching allocator provides.
  std::vector<knsparse::Words16<8>> x_store((numel + 7) / 8), out_store((rows * a.k_pad + 7) / 8);
  auto* x = reinterpret_cast<uint16_t*>(x_store.data());
  auto* out = reinterpret_cast<uint16_t*>(out_store.data());
  for (int64_t i = 0; i < numel; ++i) x[i] = static_cast<uint16_t>(i + 1);
  std::memset(out, 0xff, rows * a.k_pad * sizeof(uint16_t));  // every element must be written
  a.x = x;
  a.out = out;
  const bool vectorized = knsparse::im2col_rsc_vectorizable(a);
  const int vec = vectorized ? 8 : 1;
  const int64_t vectors = rows * (a.k_pad / vec);
  for (int64_t i = 0; i < vectors; ++i) {
    if (vectorized) {
      knsparse::im2col_rsc_vector<8>(a, i);
    } else {
      knsparse::im2col_rsc_vector<1>(a, i);
    }
  }
  std::fprintf(stderr, "vec=%d\n", vec);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < a.k_pad; ++c) std::printf(c ? " %u" : "%u", unsigned(out[r * a.k_pad + c]));
    std::printf("\n");
  }
  return 0;
}

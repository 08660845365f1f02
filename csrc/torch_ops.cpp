// Torch custom ops of knsparse_cuda (namespace knsparse_cuda), CUDA implementations only; the
// fake (meta) implementations live in python/knsparse/backends/knsparse_cuda.py.
//
//   sparse_gemm(Tensor values, Tensor meta, Tensor x, Tensor? bias, str activation) -> Tensor
//       values [rows, depth/2], x [cols, depth] (fp16 or bf16), bias [rows] or None,
//       activation "none" | "relu" | "gelu" (erf GELU). meta: int16 [rows, depth/16]
//       (CUTLASS ColumnMajorInterleaved<2>, as knsparse.pack writes it) on compute capability 8.x,
//       uint8 [round_up(rows, 64), round_up(depth, 128)/8] (CUTLASS sm90 layout) on 9.0.
//       Returns act(W @ x^T + bias) as a [rows, cols] view with row stride round_up(cols, 8).
//   im2col_rsc(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation,
//              int k_pad) -> Tensor
//       x [N, C, H, W] fp16/bf16 (any layout); returns [N*P*Q, k_pad] contiguous, columns in
//       (R, S, C) order, zeros outside the image and in columns >= R*S*C.
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "knsparse_cuda.h"

namespace {

constexpr int64_t kColumnAlign = 8;  // 16 bytes of 16-bit elements

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

std::pair<int, int> capability(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return {major, minor};
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Row-major with a leading dimension that is a multiple of 8 elements and a 16-byte aligned base.
at::Tensor as_gemm_operand(const at::Tensor& t) {
  if (t.stride(-1) == 1 && t.stride(0) % kColumnAlign == 0 && aligned16(t)) return t;
  at::Tensor c = t.contiguous();
  return aligned16(c) && c.stride(0) % kColumnAlign == 0 ? c : c.clone();
}

at::Tensor as_aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

knsparse::Activation parse_activation(c10::string_view name) {
  if (name == "none") return knsparse::Activation::kNone;
  if (name == "relu") return knsparse::Activation::kRelu;
  if (name == "gelu") return knsparse::Activation::kGelu;
  TORCH_CHECK(false, "knsparse_cuda.sparse_gemm: activation must be 'none', 'relu' or 'gelu', got '",
              std::string(name), "'");
}

at::Tensor sparse_gemm(const at::Tensor& values, const at::Tensor& meta, const at::Tensor& x,
                       const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const char* op = "knsparse_cuda.sparse_gemm: ";
  TORCH_CHECK(values.is_cuda() && meta.is_cuda() && x.is_cuda(), op, "values, meta and x must be CUDA tensors");
  TORCH_CHECK(values.device() == x.device() && meta.device() == x.device(), op,
              "values, meta and x must be on one device");
  TORCH_CHECK(values.dim() == 2 && x.dim() == 2, op, "values must be [rows, depth/2] and x [cols, depth], got ",
              values.sizes(), " and ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op, "x must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(values.scalar_type() == dtype, op, "values dtype ", values.scalar_type(), " != x dtype ", dtype);
  const int64_t rows = values.size(0);
  const int64_t depth = values.size(1) * 2;
  const int64_t cols = x.size(0);
  TORCH_CHECK(x.size(1) == depth, op, "x has ", x.size(1), " columns but the weight has depth ", depth);
  TORCH_CHECK(rows < (int64_t(1) << 31) && cols < (int64_t(1) << 31) && depth < (int64_t(1) << 31), op,
              "GEMM extents must fit in int32");
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == x.device(), op, "bias must be on the device of x");
    TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == rows, op,
                "bias must be a ", dtype, " vector of ", rows, " entries, got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  const knsparse::Activation act = parse_activation(activation);

  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const auto [major, minor] = capability(device);
  const int64_t cols_pad = round_up(cols, kColumnAlign);
  at::Tensor out = at::empty({rows, cols_pad}, x.options());
  if (cols == 0 || rows == 0) return out.narrow(1, 0, cols);

  const at::Tensor values_c = as_aligned_contiguous(values);
  const at::Tensor meta_c = as_aligned_contiguous(meta);
  const at::Tensor bias_c = bias.has_value() ? as_aligned_contiguous(*bias) : at::Tensor();
  at::Tensor x_c = as_gemm_operand(x);

  knsparse::SparseGemmArgs args;
  args.rows = rows;
  args.depth = depth;
  args.values = values_c.data_ptr();
  args.meta = meta_c.data_ptr();
  args.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.ldo = cols_pad;
  args.activation = act;

  std::string err;
  if (major == 8) {
    TORCH_CHECK(meta.scalar_type() == at::kShort && meta.dim() == 2 && meta.size(0) == rows &&
                    meta.size(1) == depth / 16,
                op, "on compute capability 8.x meta must be the int16 [", rows, ", ", depth / 16,
                "] CUTLASS layout of knsparse.pack, got ", meta.scalar_type(), " ", meta.sizes());
    if (cols != cols_pad) {  // the Ampere kernel needs cols % 8 == 0: zero rows of x feed unused columns
      x_c = at::constant_pad_nd(x_c, {0, 0, 0, cols_pad - cols});
    }
    args.cols = cols_pad;
    args.x = x_c.data_ptr();
    args.ldx = x_c.stride(0);
    err = dtype == at::kHalf ? knsparse::sparse_gemm_sm80_f16(args, stream)
                             : knsparse::sparse_gemm_sm80_bf16(args, stream);
  } else if (major == 9 && minor == 0) {
    const int64_t meta_rows = round_up(rows, knsparse::kSm90MetaBlockRows);
    const int64_t meta_cols = round_up(depth, knsparse::kSm90MetaBlockK) / 8;
    TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == meta_rows &&
                    meta.size(1) == meta_cols,
                op, "on compute capability 9.0 meta must be the uint8 [", meta_rows, ", ", meta_cols,
                "] sm90 layout from knsparse.backends.knsparse_cuda.prepare_meta, got ", meta.scalar_type(), " ",
                meta.sizes());
    args.cols = cols;
    args.x = x_c.data_ptr();
    args.ldx = x_c.stride(0);
    const size_t bytes = dtype == at::kHalf ? knsparse::sparse_gemm_sm90_f16_workspace(args, device)
                                            : knsparse::sparse_gemm_sm90_bf16_workspace(args, device);
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    void* ws = bytes ? workspace.data_ptr() : nullptr;
    err = dtype == at::kHalf ? knsparse::sparse_gemm_sm90_f16(args, ws, device, stream)
                             : knsparse::sparse_gemm_sm90_bf16(args, ws, device, stream);
  } else {
    TORCH_CHECK(false, op, "no kernels for compute capability ", major, ".", minor,
                " (knsparse_cuda has sm_80 kernels for 8.x and sm_90a kernels for 9.0)");
  }
  TORCH_CHECK(err.empty(), op, err);
  return out.narrow(1, 0, cols);
}

int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (kernel - 1) - 1) / stride + 1;
}

at::Tensor im2col_rsc(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t k_pad) {
  const char* op = "knsparse_cuda.im2col_rsc: ";
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, op, "x must be a 4-D CUDA tensor [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              "x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              "kernel_size, stride, padding and dilation take two values each");
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0 && stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 &&
                  dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              op, "kernel_size, stride and dilation must be positive and padding non-negative");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t p = conv_out_size(h, kernel_size[0], stride[0], padding[0], dilation[0]);
  const int64_t q = conv_out_size(w, kernel_size[1], stride[1], padding[1], dilation[1]);
  TORCH_CHECK(p > 0 && q > 0, op, "the kernel does not fit the padded input ", x.sizes());
  const int64_t depth = kernel_size[0] * kernel_size[1] * c;
  TORCH_CHECK(k_pad >= depth, op, "k_pad=", k_pad, " is smaller than R*S*C=", depth);

  const c10::cuda::CUDAGuard guard(x.device());
  // Channels innermost makes the kernel's loads 16-byte vectors; other layouts are converted once.
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({n * p * q, k_pad}, x.options());
  if (out.numel() == 0) return out;

  knsparse::Im2colArgs args;
  args.x = xc.data_ptr();
  args.n = n;
  args.c = c;
  args.h = h;
  args.w = w;
  args.stride_n = xc.stride(0);
  args.stride_c = xc.stride(1);
  args.stride_h = xc.stride(2);
  args.stride_w = xc.stride(3);
  args.kernel_h = kernel_size[0];
  args.kernel_w = kernel_size[1];
  args.conv_stride_h = stride[0];
  args.conv_stride_w = stride[1];
  args.pad_h = padding[0];
  args.pad_w = padding[1];
  args.dil_h = dilation[0];
  args.dil_w = dilation[1];
  args.out_h = p;
  args.out_w = q;
  args.k_pad = k_pad;
  args.out = out.data_ptr();
  const std::string err = knsparse::im2col_rsc_16bit(args, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err.empty(), op, err);
  return out;
}

}  // namespace

TORCH_LIBRARY(knsparse_cuda, m) {
  // The fake (meta) implementations are registered by this Python module.
  m.set_python_module("knsparse.backends.knsparse_cuda");
  m.def("sparse_gemm(Tensor values, Tensor meta, Tensor x, Tensor? bias, str activation) -> Tensor");
  m.def(
      "im2col_rsc(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int k_pad) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(knsparse_cuda, CUDA, m) {
  m.impl("sparse_gemm", &sparse_gemm);
  m.impl("im2col_rsc", &im2col_rsc);
}

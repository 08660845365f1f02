/* knsparse's CUDA kernels behind a plain C ABI (libknsparse_cuda.so).
 *
 * Every entry point takes plain data (POD structs, raw device pointers, a cudaStream_t) and
 * returns a knsparse_status; on failure it writes a NUL-terminated message naming the failed
 * condition into `msg` (at most `msg_len` bytes, may be NULL). The library links the CUDA
 * runtime statically and nothing else of CUDA or PyTorch, so one build serves every PyTorch
 * version; python/knsparse/ops/native.py calls it through ctypes.
 *
 * The sparse GEMM computes, for a 2:4 sparse weight W [rows, depth] and dense activations
 * x [cols, depth] (cols = tokens, or N*P*Q im2col rows):
 *
 *     y = act(x @ W^T + bias)            fp32 accumulation, fp16/bf16 in and out
 *
 * W travels as `values` [rows, depth/2] row-major and `meta`, whose layout is per architecture:
 *   arch 80 (CUTLASS 2.x, compute capability 8.x, or 9.0 through the compute_80 PTX):
 *       int16 [rows, depth/16], ColumnMajorInterleaved<2> after CUTLASS's row reordering,
 *       exactly what knsparse.core.pack writes. Output FEATURE-major: out[row * ldo + col]
 *       (the transpose of y); needs cols % 8 == 0 (the caller pads x with zero rows).
 *   arch 90 (CUTLASS 3.x, sm_90a): uint8 [round_up(rows, 64), round_up(depth, 128)/8]
 *       (knsparse.ops.meta.sm90_meta_from_sm80). Output TOKEN-major: out[col * ldo + row],
 *       i.e. y itself as F.linear returns it; any cols.
 */
#ifndef KNSPARSE_CAPI_H_
#define KNSPARSE_CAPI_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The CUDA runtime's declaration of cudaStream_t (driver_types.h), repeated so that host-only
 * code (the CPU probes in tests/native/) can include this header without the CUDA toolkit. */
typedef struct CUstream_st* cudaStream_t;

#define KNSPARSE_ABI_VERSION 1

typedef enum knsparse_status {
  KNSPARSE_OK = 0,
  KNSPARSE_INVALID_ARGUMENT = 1, /* a shape, stride, alignment or code the kernel cannot take */
  KNSPARSE_NO_DEVICE = 2,        /* no CUDA driver or device */
  KNSPARSE_UNSUPPORTED_ARCH = 3, /* no kernel for this compute capability / arch code */
  KNSPARSE_CUTLASS_ERROR = 4,    /* CUTLASS refused or failed */
  KNSPARSE_CUDA_ERROR = 5        /* a CUDA runtime call failed */
} knsparse_status;

enum { KNSPARSE_FP16 = 0, KNSPARSE_BF16 = 1 };
enum { KNSPARSE_ACT_NONE = 0, KNSPARSE_ACT_RELU = 1, KNSPARSE_ACT_GELU = 2 };
/* Hopper kernel configurations (arch 80 has one and ignores the field). */
enum {
  KNSPARSE_CONFIG_AUTO = 0,  /* SMALL when the LARGE tiles would not fill every SM, else LARGE */
  KNSPARSE_CONFIG_LARGE = 1, /* 128x128x128 tile, cooperative, cluster 1x2 */
  KNSPARSE_CONFIG_SMALL = 2  /* 64x128x128 tile, ping-pong, cluster 1x1 */
};

/* Logical K of one Hopper mainloop k-block and rows of one metadata atom: fix the sm90 layout. */
#define KNSPARSE_SM90_META_BLOCK_K 128
#define KNSPARSE_SM90_META_BLOCK_ROWS 64

typedef struct knsparse_gemm_args {
  int64_t rows;       /* GEMM M: output features, rows of the sparse weight */
  int64_t cols;       /* GEMM N: tokens */
  int64_t depth;      /* GEMM K: reduction length of the dense weight */
  const void* values; /* [rows, depth/2] row-major, contiguous */
  const void* meta;   /* architecture-specific layout, see above */
  const void* x;      /* [cols, depth] row-major, leading dimension ldx >= depth */
  int64_t ldx;
  const void* bias;   /* [rows] or NULL */
  void* out;          /* arch 80: [rows, ldo >= cols]; arch 90: [cols, ldo >= rows] */
  int64_t ldo;
  int32_t dtype;      /* KNSPARSE_FP16 | KNSPARSE_BF16 (values, x, bias, out alike) */
  int32_t activation; /* KNSPARSE_ACT_* ; GELU is the erf GELU of nn.GELU() */
  int32_t config;     /* KNSPARSE_CONFIG_* */
  int32_t reserved;
} knsparse_gemm_args;

/* im2col with the reduction axis ordered (R, S, C): row (n, p, q) of `out` holds
 * x[n, :, p*stride_h - pad_h + r*dil_h, q*stride_w - pad_w + s*dil_w] for r, s in kernel
 * order, channels innermost, zero outside the image, then zeros up to k_pad columns. */
typedef struct knsparse_im2col_args {
  const void* x; /* [n, c, h, w], 16-bit elements, arbitrary element strides */
  int64_t n, c, h, w;
  int64_t stride_n, stride_c, stride_h, stride_w;
  int64_t kernel_h, kernel_w;
  int64_t conv_stride_h, conv_stride_w;
  int64_t pad_h, pad_w;
  int64_t dil_h, dil_w;
  int64_t out_h, out_w; /* P, Q */
  int64_t k_pad;        /* columns of `out` (>= kernel_h * kernel_w * c) */
  void* out;            /* [n * out_h * out_w, k_pad] row-major, contiguous */
} knsparse_im2col_args;

int knsparse_abi_version(void);
/* sizeof of the two argument structs, so a binding can check its mirror of them. */
size_t knsparse_gemm_args_size(void);
size_t knsparse_im2col_args_size(void);
/* The architectures this build holds kernels for, e.g. "sm_80 (+compute_80 PTX), sm_90a". */
const char* knsparse_build_info(void);

/* Compute capability and SM count of `device`; KNSPARSE_NO_DEVICE without a driver or device. */
int knsparse_device_info(int device, int* major, int* minor, int* sm_count, char* msg, size_t msg_len);

/* Host only, no device needed: the pre-checks of knsparse_sparse_gemm for `arch` (80 or 90),
 * the configuration AUTO resolves to for `sm_count` SMs (written to *config, may be NULL), and
 * CUTLASS's own can_implement on that kernel type. Pointers may be NULL here (alignment is
 * checked only for non-NULL ones). */
int knsparse_sparse_gemm_check(const knsparse_gemm_args* args, int arch, int sm_count, int* config,
                               char* msg, size_t msg_len);

/* Workspace bytes knsparse_sparse_gemm needs for these arguments on `device`. */
int knsparse_sparse_gemm_workspace(const knsparse_gemm_args* args, int arch, int device, size_t* bytes,
                                   char* msg, size_t msg_len);

/* Launch the sparse GEMM on `stream` of `device` (asynchronous). `arch` 90 needs compute
 * capability 9.0; `arch` 80 runs on 8.x (SASS) and on 9.0 (JIT of the compute_80 PTX). */
int knsparse_sparse_gemm(const knsparse_gemm_args* args, int arch, void* workspace, size_t workspace_bytes,
                         int device, cudaStream_t stream, char* msg, size_t msg_len);

/* Launch im2col (fp16 and bf16 alike: it moves 16-bit words) on `stream` of `device`. */
int knsparse_im2col_rsc(const knsparse_im2col_args* args, int device, cudaStream_t stream, char* msg,
                        size_t msg_len);

#ifdef __cplusplus
}
#endif

#endif /* KNSPARSE_CAPI_H_ */

// Hopper 2:4 sparse GEMM, fp16 in and out:
// the large configuration (128x128 cooperative, cluster 1x2),
// three epilogue activations.
#include "sparse_gemm_sm90.cuh"

KNSPARSE_SM90_KERNELS(kSm90F16Large, cutlass::half_t, LargeConfig)

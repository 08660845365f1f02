// Hopper 2:4 sparse GEMM, bf16 in and out:
// the large configuration (128x128 cooperative, cluster 1x2),
// three epilogue activations.
#include "sparse_gemm_sm90.cuh"

KNSPARSE_SM90_KERNELS(kSm90Bf16Large, cutlass::bfloat16_t, LargeConfig)

// Hopper 2:4 sparse GEMM, bf16 in and out:
// the small configuration (64x128 ping-pong, cluster 1x1),
// three epilogue activations.
#include "sparse_gemm_sm90.cuh"

KNSPARSE_SM90_KERNELS(kSm90Bf16Small, cutlass::bfloat16_t, SmallConfig)

// Hopper 2:4 sparse GEMM, fp16 in and out:
// the small configuration (64x128 ping-pong, cluster 1x1),
// three epilogue activations.
#include "sparse_gemm_sm90.cuh"

KNSPARSE_SM90_KERNELS(kSm90F16Small, cutlass::half_t, SmallConfig)

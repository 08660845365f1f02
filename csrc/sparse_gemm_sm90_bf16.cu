// Hopper 2:4 sparse GEMM, bf16 in and out (both configurations, three epilogue activations).
#include "sparse_gemm_sm90.cuh"

KNSPARSE_SM90_ENTRY_POINTS(bf16, cutlass::bfloat16_t)

// Hopper 2:4 sparse GEMM, fp16 in and out (both configurations, three epilogue activations).
#include "sparse_gemm_sm90.cuh"

KNSPARSE_SM90_ENTRY_POINTS(f16, cutlass::half_t)

// Ampere / Ada 2:4 sparse GEMM, bf16 in and out (three epilogue activations).
#include "sparse_gemm_sm80.cuh"

KNSPARSE_SM80_ENTRY_POINTS(bf16, cutlass::bfloat16_t)

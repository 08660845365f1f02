// Ampere / Ada 2:4 sparse GEMM, fp16 in and out (three epilogue activations).
#include "sparse_gemm_sm80.cuh"

KNSPARSE_SM80_ENTRY_POINTS(f16, cutlass::half_t)

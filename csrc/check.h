// Turning CUTLASS / CUDA failures into the error strings of knsparse_cuda.h.
#pragma once

#include <cuda_runtime_api.h>
#include <cutlass/cutlass.h>

#include <string>

namespace knsparse {

inline std::string cutlass_error(cutlass::Status status, const char* what) {
  std::string msg = std::string(what) + " failed: " + cutlass::cutlassGetStatusString(status);
  const cudaError_t cuda = cudaGetLastError();
  if (cuda != cudaSuccess) msg += std::string(" (CUDA: ") + cudaGetErrorString(cuda) + ")";
  return msg;
}

}  // namespace knsparse

#define KNSPARSE_CUTLASS_CHECK(expr, what)                                   \
  do {                                                                       \
    const cutlass::Status knsparse_status_ = (expr);                         \
    if (knsparse_status_ != cutlass::Status::kSuccess) {                     \
      return ::knsparse::cutlass_error(knsparse_status_, what);              \
    }                                                                        \
  } while (0)

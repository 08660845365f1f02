// The C ABI of knsparse_capi.h: argument checks that name the failed condition, device and
// architecture checks, and dispatch to the per-architecture kernels of knsparse_cuda.h.
// Host code only (no kernels here); the library links the CUDA runtime statically.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "knsparse_capi.h"
#include "knsparse_cuda.h"

namespace {

using knsparse::SparseGemmArgs;

int fail(int status, const std::string& what, char* msg, size_t msg_len) {
  if (msg != nullptr && msg_len > 0) std::snprintf(msg, msg_len, "%s", what.c_str());
  return status;
}

std::string num(int64_t v) { return std::to_string(v); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Guards the CUDA runtime's current device: set for the call, restored after it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    ok_ = cudaGetDevice(&previous_) == cudaSuccess && cudaSetDevice(device) == cudaSuccess;
  }
  ~DeviceGuard() {
    if (ok_) cudaSetDevice(previous_);
  }
  bool ok() const { return ok_; }

 private:
  int previous_ = 0;
  bool ok_ = false;
};

// "" when a CUDA device `device` exists, else why not (no driver, no device, bad ordinal).
std::string device_missing(int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return std::string("no CUDA device: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  }
  if (device < 0 || device >= count) {
    return "no CUDA device " + num(device) + " (" + num(count) + " visible)";
  }
  return {};
}

// The checks of every requirement the kernels of `arch` have, each failure named.
std::string check_gemm(const SparseGemmArgs& a, int arch) {
  const std::string op = arch == 90 ? "sm90 sparse GEMM: " : "sm80 sparse GEMM: ";
  if (arch != 80 && arch != 90) return "sparse GEMM: arch must be 80 or 90, got " + num(arch);
  if (a.dtype != KNSPARSE_FP16 && a.dtype != KNSPARSE_BF16) return op + "dtype code " + num(a.dtype) + " is not fp16 (0) or bf16 (1)";
  if (a.activation < KNSPARSE_ACT_NONE || a.activation > KNSPARSE_ACT_GELU) {
    return op + "activation code " + num(a.activation) + " is not none (0), relu (1) or gelu (2)";
  }
  if (a.config < KNSPARSE_CONFIG_AUTO || a.config > KNSPARSE_CONFIG_SMALL) {
    return op + "config code " + num(a.config) + " is not auto (0), large (1) or small (2)";
  }
  if (a.rows <= 0 || a.depth <= 0 || a.cols < 0) {
    return op + "rows=" + num(a.rows) + " and depth=" + num(a.depth) + " must be positive, cols=" + num(a.cols) +
           " non-negative";
  }
  constexpr int64_t kIntMax = (int64_t(1) << 31) - 1;
  if (a.rows > kIntMax || a.cols > kIntMax || a.depth > kIntMax) return op + "rows, cols and depth must fit in int32";
  // 16-byte vectors / TMA boxes of 8 16-bit elements along every contiguous dimension.
  if (a.ldx < a.depth) return op + "ldx=" + num(a.ldx) + " < depth=" + num(a.depth) + " (x rows would overlap)";
  if (a.ldx % 8) return op + "ldx=" + num(a.ldx) + " is not a multiple of 8 (16-byte rows of x)";
  if (arch == 80) {
    if (a.rows % 32) return op + "rows=" + num(a.rows) + " is not a multiple of 32 (CUTLASS metadata reordering)";
    if (a.depth % 64) return op + "depth=" + num(a.depth) + " is not a multiple of 64 (threadblock K; metadata)";
    if (a.cols % 8) return op + "cols=" + num(a.cols) + " is not a multiple of 8 (pad x with zero rows)";
    if (a.ldo < a.cols) return op + "ldo=" + num(a.ldo) + " < cols=" + num(a.cols) + " (feature-major output rows)";
  } else {
    if (a.rows % 8) return op + "rows=" + num(a.rows) + " is not a multiple of 8 (16-byte TMA stores of the output)";
    if (a.depth % 16) return op + "depth=" + num(a.depth) + " is not a multiple of 16 (16-byte TMA loads)";
    if (a.ldo < a.rows) return op + "ldo=" + num(a.ldo) + " < rows=" + num(a.rows) + " (token-major output rows)";
  }
  if (a.ldo % 8) return op + "ldo=" + num(a.ldo) + " is not a multiple of 8 (16-byte output rows)";
  const struct {
    const void* ptr;
    const char* name;
  } pointers[] = {{a.values, "values"}, {a.meta, "meta"}, {a.x, "x"}, {a.bias, "bias"}, {a.out, "out"}};
  for (const auto& p : pointers) {
    if (p.ptr != nullptr && !aligned16(p.ptr)) return op + p.name + " is not 16-byte aligned";
  }
  return {};
}

int resolve_config(const SparseGemmArgs& a, int sm_count) {
  if (a.config != KNSPARSE_CONFIG_AUTO) return a.config;
  const int64_t large_tiles = (a.rows + 127) / 128 * ((a.cols + 127) / 128);
  return large_tiles < sm_count ? KNSPARSE_CONFIG_SMALL : KNSPARSE_CONFIG_LARGE;
}

const knsparse::Sm90Kernels& sm90_kernels(const SparseGemmArgs& a, int config) {
  const bool small = config == KNSPARSE_CONFIG_SMALL;
  if (a.dtype == KNSPARSE_FP16) return small ? knsparse::kSm90F16Small : knsparse::kSm90F16Large;
  return small ? knsparse::kSm90Bf16Small : knsparse::kSm90Bf16Large;
}

std::string can_implement(const SparseGemmArgs& a, int arch, int config, int sm_count) {
  if (arch == 80) {
    return a.dtype == KNSPARSE_FP16 ? knsparse::sparse_gemm_sm80_f16_can_implement(a)
                                    : knsparse::sparse_gemm_sm80_bf16_can_implement(a);
  }
  return sm90_kernels(a, config).can_implement(a, sm_count);
}

// Device, compute capability and SM count for a launch of `arch` on `device`.
int device_for(int arch, int device, int* sm_count, char* msg, size_t msg_len) {
  int major = 0, minor = 0;
  const int status = knsparse_device_info(device, &major, &minor, sm_count, msg, msg_len);
  if (status != KNSPARSE_OK) return status;
  const bool ok = arch == 90 ? (major == 9 && minor == 0) : (major == 8 || (major == 9 && minor == 0));
  if (!ok) {
    return fail(KNSPARSE_UNSUPPORTED_ARCH,
                "sparse GEMM: no arch " + num(arch) + " kernel for compute capability " + num(major) + "." +
                    num(minor) + " (sm_80 SASS + compute_80 PTX serve 8.x and 9.0, sm_90a serves 9.0)",
                msg, msg_len);
  }
  return KNSPARSE_OK;
}

}  // namespace

extern "C" {

int knsparse_abi_version(void) { return KNSPARSE_ABI_VERSION; }
size_t knsparse_gemm_args_size(void) { return sizeof(knsparse_gemm_args); }
size_t knsparse_im2col_args_size(void) { return sizeof(knsparse_im2col_args); }

const char* knsparse_build_info(void) {
  return "sm_80 (+compute_80 PTX): sparse GEMM fp16/bf16; sm_90a: sparse GEMM fp16/bf16 (large, small); "
         "im2col_rsc sm_80 sm_90a";
}

int knsparse_device_info(int device, int* major, int* minor, int* sm_count, char* msg, size_t msg_len) {
  if (const std::string missing = device_missing(device); !missing.empty()) {
    return fail(KNSPARSE_NO_DEVICE, missing, msg, msg_len);
  }
  int values[3] = {0, 0, 0};
  const cudaDeviceAttr attrs[3] = {cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMinor,
                                   cudaDevAttrMultiProcessorCount};
  for (int i = 0; i < 3; ++i) {
    const cudaError_t err = cudaDeviceGetAttribute(&values[i], attrs[i], device);
    if (err != cudaSuccess) {
      return fail(KNSPARSE_CUDA_ERROR, std::string("cudaDeviceGetAttribute: ") + cudaGetErrorString(err), msg,
                  msg_len);
    }
  }
  if (major) *major = values[0];
  if (minor) *minor = values[1];
  if (sm_count) *sm_count = values[2];
  return KNSPARSE_OK;
}

int knsparse_sparse_gemm_check(const knsparse_gemm_args* args, int arch, int sm_count, int* config, char* msg,
                               size_t msg_len) {
  if (args == nullptr) return fail(KNSPARSE_INVALID_ARGUMENT, "sparse GEMM: args is NULL", msg, msg_len);
  if (std::string err = check_gemm(*args, arch); !err.empty()) {
    return fail(KNSPARSE_INVALID_ARGUMENT, err, msg, msg_len);
  }
  const int resolved = arch == 90 ? resolve_config(*args, sm_count) : KNSPARSE_CONFIG_LARGE;
  if (config) *config = resolved;
  if (args->cols == 0) return KNSPARSE_OK;
  if (std::string err = can_implement(*args, arch, resolved, sm_count); !err.empty()) {
    return fail(KNSPARSE_CUTLASS_ERROR, err, msg, msg_len);
  }
  return KNSPARSE_OK;
}

int knsparse_sparse_gemm_workspace(const knsparse_gemm_args* args, int arch, int device, size_t* bytes, char* msg,
                                   size_t msg_len) {
  if (args == nullptr || bytes == nullptr) {
    return fail(KNSPARSE_INVALID_ARGUMENT, "sparse GEMM workspace: args or bytes is NULL", msg, msg_len);
  }
  *bytes = 0;
  if (std::string err = check_gemm(*args, arch); !err.empty()) {
    return fail(KNSPARSE_INVALID_ARGUMENT, err, msg, msg_len);
  }
  if (arch == 80 || args->cols == 0) return KNSPARSE_OK;
  int sm_count = 0;
  if (const int status = device_for(arch, device, &sm_count, msg, msg_len); status != KNSPARSE_OK) return status;
  *bytes = sm90_kernels(*args, resolve_config(*args, sm_count)).workspace(*args, device, sm_count);
  return KNSPARSE_OK;
}

int knsparse_sparse_gemm(const knsparse_gemm_args* args, int arch, void* workspace, size_t workspace_bytes,
                         int device, cudaStream_t stream, char* msg, size_t msg_len) {
  if (args == nullptr) return fail(KNSPARSE_INVALID_ARGUMENT, "sparse GEMM: args is NULL", msg, msg_len);
  const knsparse_gemm_args& a = *args;
  if (std::string err = check_gemm(a, arch); !err.empty()) return fail(KNSPARSE_INVALID_ARGUMENT, err, msg, msg_len);
  if (a.values == nullptr || a.meta == nullptr || a.x == nullptr || a.out == nullptr) {
    return fail(KNSPARSE_INVALID_ARGUMENT, "sparse GEMM: values, meta, x and out must be device pointers", msg,
                msg_len);
  }
  int sm_count = 0;
  if (const int status = device_for(arch, device, &sm_count, msg, msg_len); status != KNSPARSE_OK) return status;
  if (a.cols == 0) return KNSPARSE_OK;
  const DeviceGuard guard(device);
  if (!guard.ok()) return fail(KNSPARSE_CUDA_ERROR, "cudaSetDevice(" + num(device) + ") failed", msg, msg_len);
  std::string err;
  if (arch == 80) {
    err = a.dtype == KNSPARSE_FP16 ? knsparse::sparse_gemm_sm80_f16(a, stream) : knsparse::sparse_gemm_sm80_bf16(a, stream);
  } else {
    const knsparse::Sm90Kernels& kernels = sm90_kernels(a, resolve_config(a, sm_count));
    const size_t needed = kernels.workspace(a, device, sm_count);
    if (needed > workspace_bytes || (needed > 0 && workspace == nullptr)) {
      return fail(KNSPARSE_INVALID_ARGUMENT,
                  "sm90 sparse GEMM: workspace of " + num(int64_t(workspace_bytes)) + " bytes, needs " +
                      num(int64_t(needed)) + " (knsparse_sparse_gemm_workspace)",
                  msg, msg_len);
    }
    err = kernels.run(a, workspace, device, sm_count, stream);
  }
  return err.empty() ? KNSPARSE_OK : fail(KNSPARSE_CUTLASS_ERROR, err, msg, msg_len);
}

int knsparse_im2col_rsc(const knsparse_im2col_args* args, int device, cudaStream_t stream, char* msg,
                        size_t msg_len) {
  if (args == nullptr) return fail(KNSPARSE_INVALID_ARGUMENT, "im2col_rsc: args is NULL", msg, msg_len);
  if (args->x == nullptr || args->out == nullptr) {
    return fail(KNSPARSE_INVALID_ARGUMENT, "im2col_rsc: x and out must be device pointers", msg, msg_len);
  }
  if (const std::string missing = device_missing(device); !missing.empty()) {
    return fail(KNSPARSE_NO_DEVICE, missing, msg, msg_len);
  }
  const DeviceGuard guard(device);
  if (!guard.ok()) return fail(KNSPARSE_CUDA_ERROR, "cudaSetDevice(" + num(device) + ") failed", msg, msg_len);
  const std::string err = knsparse::im2col_rsc_16bit(*args, stream);
  return err.empty() ? KNSPARSE_OK : fail(KNSPARSE_INVALID_ARGUMENT, err, msg, msg_len);
}

}  // extern "C"

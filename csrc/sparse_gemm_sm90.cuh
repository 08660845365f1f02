// Hopper 2:4 sparse GEMM: CUTLASS 3.x sparse collective (TMA, warp-specialized cooperative
// persistent kernel, sparse WGMMA) with the fused epilogue  out = act(acc + bias[row]).
// Included by one .cu per element type.
#pragma once

// clang-format off
#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>
// clang-format on

#include <atomic>
#include <type_traits>

#include "check.h"
#include "knsparse_cuda.h"

namespace knsparse::sm90 {

using namespace cute;

template <class Element, template <class> class ActivationFn>
struct SparseGemmKernel {
  using TileShape = Shape<_128, _128, Int<kSm90MetaBlockK>>;  // logical (dense) K
  using ClusterShape = Shape<_1, _2, _1>;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using ProblemShape = Shape<int, int, int, int>;  // (M, N, K, L)

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignment,     // no source tensor C
      Element, cutlass::layout::RowMajor, kAlignment,  // out [rows, cols] row-major
      cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<ActivationFn, Element, float, Element>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Element, cutlass::layout::RowMajor, kAlignment,     // A: the 2:4 weight [rows, depth]
      Element, cutlass::layout::ColumnMajor, kAlignment,  // B: x [cols, depth] row-major (K-major)
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;

  // tests/native/sm90_meta_layout_probe.cpp reads the metadata layout from this configuration.
  static_assert(std::is_same_v<SparseConfig, cutlass::Sm90GemmSparseConfig<sparse_elem<2, Element>, GMMA::Major::K,
                                                                            sparse_elem<8, uint8_t>, Int<kSm90MetaBlockK>>>,
                "the kernel's sparse configuration differs from the one the layout probe checks");
  static_assert(SparseConfig::TensorEAtomK::value == kSm90MetaBlockK,
                "the sm90 metadata layout of knsparse assumes a metadata atom of kSm90MetaBlockK columns");
  static_assert(SparseConfig::TensorEAtomM::value == kSm90MetaBlockRows,
                "the sm90 metadata layout of knsparse assumes a metadata atom of 64 rows");
};

inline int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) {
    return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  }
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

template <class Element, template <class> class ActivationFn>
typename SparseGemmKernel<Element, ActivationFn>::Gemm::Arguments make_arguments(const SparseGemmArgs& a,
                                                                                  int device) {
  using K = SparseGemmKernel<Element, ActivationFn>;
  using Gemm = typename K::Gemm;
  using Mainloop = typename K::CollectiveMainloop;
  const typename K::ProblemShape problem{static_cast<int>(a.rows), static_cast<int>(a.cols),
                                         static_cast<int>(a.depth), 1};

  typename Gemm::Arguments arguments{};
  arguments.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  arguments.problem_shape = problem;
  arguments.mainloop.ptr_A = static_cast<Element const*>(a.values);
  arguments.mainloop.layout_a = K::SparseConfig::fill_layoutA(problem);
  arguments.mainloop.ptr_B = static_cast<Element const*>(a.x);
  arguments.mainloop.dB = make_stride(int64_t(a.ldx), _1{}, int64_t(0));
  arguments.mainloop.ptr_E = static_cast<typename Mainloop::ElementE const*>(a.meta);
  arguments.mainloop.layout_e = K::SparseConfig::fill_layoutE(problem);
  arguments.epilogue.thread.alpha = 1.0f;
  arguments.epilogue.thread.beta = 0.0f;
  arguments.epilogue.thread.bias_ptr = static_cast<Element const*>(a.bias);  // null reads as 0
  arguments.epilogue.ptr_C = nullptr;
  arguments.epilogue.ptr_D = static_cast<Element*>(a.out);
  arguments.epilogue.dD = make_stride(int64_t(a.ldo), _1{}, int64_t(0));
  arguments.hw_info.device_id = device;
  arguments.hw_info.sm_count = sm_count(device);
  return arguments;
}

template <class Element, template <class> class ActivationFn>
size_t workspace_bytes(const SparseGemmArgs& a, int device) {
  using Gemm = typename SparseGemmKernel<Element, ActivationFn>::Gemm;
  return Gemm::get_workspace_size(make_arguments<Element, ActivationFn>(a, device));
}

template <class Element, template <class> class ActivationFn>
std::string run(const SparseGemmArgs& a, void* workspace, int device, cudaStream_t stream) {
  using Gemm = typename SparseGemmKernel<Element, ActivationFn>::Gemm;
  const auto arguments = make_arguments<Element, ActivationFn>(a, device);
  Gemm gemm;
  KNSPARSE_CUTLASS_CHECK(gemm.can_implement(arguments), "sm90 sparse GEMM can_implement");
  KNSPARSE_CUTLASS_CHECK(gemm.initialize(arguments, workspace, stream), "sm90 sparse GEMM initialize");
  KNSPARSE_CUTLASS_CHECK(gemm.run(stream), "sm90 sparse GEMM launch");
  return {};
}

inline std::string check_args(const SparseGemmArgs& a) {
  if (a.depth % 16 || a.ldx % 8 || a.ldo % 8) {
    return "sm90 sparse GEMM needs depth % 16 == 0 and leading dimensions % 8 == 0; got depth=" +
           std::to_string(a.depth) + " ldx=" + std::to_string(a.ldx) + " ldo=" + std::to_string(a.ldo);
  }
  return {};
}

template <class Element>
size_t dispatch_workspace(const SparseGemmArgs& a, int device) {
  switch (a.activation) {
    case Activation::kNone:
      return workspace_bytes<Element, cutlass::epilogue::thread::Identity>(a, device);
    case Activation::kRelu:
      return workspace_bytes<Element, cutlass::epilogue::thread::ReLu>(a, device);
    case Activation::kGelu:
      return workspace_bytes<Element, cutlass::epilogue::thread::GELU>(a, device);
  }
  return 0;
}

template <class Element>
std::string dispatch(const SparseGemmArgs& a, void* workspace, int device, cudaStream_t stream) {
  if (std::string err = check_args(a); !err.empty()) return err;
  switch (a.activation) {
    case Activation::kNone:
      return run<Element, cutlass::epilogue::thread::Identity>(a, workspace, device, stream);
    case Activation::kRelu:
      return run<Element, cutlass::epilogue::thread::ReLu>(a, workspace, device, stream);
    case Activation::kGelu:
      return run<Element, cutlass::epilogue::thread::GELU>(a, workspace, device, stream);
  }
  return "unknown activation code " + std::to_string(static_cast<int>(a.activation));
}

}  // namespace knsparse::sm90

// Hopper 2:4 sparse GEMM: CUTLASS 3.x sparse collective (TMA, warp-specialized persistent
// kernels, sparse WGMMA) with the fused epilogue  y = act(acc + bias[row]),  D stored
// ColumnMajor as in CUTLASS's example 62: the token-major [cols, rows] result of F.linear, so
// any token count is aligned (only rows, a multiple of 32 after packing, is the contiguous
// dimension). Two configurations, picked per call by the C ABI layer (capi.cpp):
//   Large: 128x128x128 tile, cooperative (two consumer warp groups per tile), cluster 1x2;
//   Small: 64x128x128 tile, ping-pong (one warp group per tile), cluster 1x1, for problems whose
//          large tiles leave SMs idle (ViT-B at batch 1, 64-channel ResNet convolutions).
// Tile K stays 128 in both: the metadata layout (kSm90MetaBlockK) depends on it.
// Included by one .cu per element type and configuration.
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

#include <type_traits>

#include "check.h"
#include "knsparse_cuda.h"

namespace knsparse::sm90 {

using namespace cute;

struct LargeConfig {
  static constexpr int kCode = KNSPARSE_CONFIG_LARGE;
  static constexpr const char* kName = "sm90 sparse GEMM (128x128 cooperative)";
  using TileShape = Shape<_128, _128, Int<kSm90MetaBlockK>>;
  using ClusterShape = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

struct SmallConfig {
  static constexpr int kCode = KNSPARSE_CONFIG_SMALL;
  static constexpr const char* kName = "sm90 sparse GEMM (64x128 ping-pong)";
  using TileShape = Shape<_64, _128, Int<kSm90MetaBlockK>>;
  using ClusterShape = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
};

template <class Element, template <class> class ActivationFn, class Config_>
struct SparseGemmKernel {
  using Config = Config_;
  using TileShape = typename Config_::TileShape;
  using ClusterShape = typename Config_::ClusterShape;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using ProblemShape = Shape<int, int, int, int>;  // (M, N, K, L)

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, kAlignment,     // no source tensor C
      Element, cutlass::layout::ColumnMajor, kAlignment,  // out: token-major [cols, rows]
      typename Config_::EpilogueSchedule,
      cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<ActivationFn, Element, float, Element>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Element, cutlass::layout::RowMajor, kAlignment,     // A: the 2:4 weight [rows, depth]
      Element, cutlass::layout::ColumnMajor, kAlignment,  // B: x [cols, depth] row-major (K-major)
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config_::MainloopSchedule>::CollectiveOp;

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

template <class K>
typename K::Gemm::Arguments make_arguments(const SparseGemmArgs& a, int device, int sm_count) {
  using Gemm = typename K::Gemm;
  using Element = typename Gemm::ElementA;
  using Mainloop = typename K::CollectiveMainloop;
  const typename K::ProblemShape problem{static_cast<int>(a.rows), static_cast<int>(a.cols),
                                         static_cast<int>(a.depth), 1};

  typename Gemm::Arguments arguments{};
  arguments.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  arguments.problem_shape = problem;
  arguments.mainloop.ptr_A = static_cast<Element const*>(a.values);
  arguments.mainloop.layout_a = K::SparseConfig::fill_layoutA(problem);
  arguments.mainloop.ptr_B = static_cast<Element const*>(a.x);
  arguments.mainloop.dB = make_stride(int64_t(a.ldx), _1{}, int64_t(a.ldx) * a.cols);
  arguments.mainloop.ptr_E = static_cast<typename Mainloop::ElementE const*>(a.meta);
  arguments.mainloop.layout_e = K::SparseConfig::fill_layoutE(problem);
  arguments.epilogue.thread.alpha = 1.0f;
  arguments.epilogue.thread.beta = 0.0f;
  arguments.epilogue.thread.bias_ptr = static_cast<Element const*>(a.bias);  // null reads as 0
  arguments.epilogue.ptr_C = nullptr;
  arguments.epilogue.ptr_D = static_cast<Element*>(a.out);
  arguments.epilogue.dD = make_stride(_1{}, int64_t(a.ldo), int64_t(a.ldo) * a.cols);
  arguments.hw_info.device_id = device;
  arguments.hw_info.sm_count = sm_count;
  return arguments;
}

template <class K>
std::string can_implement(const SparseGemmArgs& a, int sm_count) {
  const auto arguments = make_arguments<K>(a, 0, sm_count);
  const std::string what = std::string(K::Config::kName) + " can_implement";
  KNSPARSE_CUTLASS_CHECK(K::Gemm::can_implement(arguments), what.c_str());
  return {};
}

template <class K>
size_t workspace_bytes(const SparseGemmArgs& a, int device, int sm_count) {
  return K::Gemm::get_workspace_size(make_arguments<K>(a, device, sm_count));
}

template <class K>
std::string run(const SparseGemmArgs& a, void* workspace, int device, int sm_count, cudaStream_t stream) {
  using Gemm = typename K::Gemm;
  const auto arguments = make_arguments<K>(a, device, sm_count);
  const std::string name = K::Config::kName;
  Gemm gemm;
  KNSPARSE_CUTLASS_CHECK(gemm.can_implement(arguments), (name + " can_implement").c_str());
  KNSPARSE_CUTLASS_CHECK(gemm.initialize(arguments, workspace, stream), (name + " initialize").c_str());
  KNSPARSE_CUTLASS_CHECK(gemm.run(stream), (name + " launch").c_str());
  return {};
}

// Calls f.template operator()<Kernel>() with the kernel type of `activation`.
template <class Element, class Config, class F>
auto with_kernel(int activation, F&& f) {
  using cutlass::epilogue::thread::GELU;
  using cutlass::epilogue::thread::Identity;
  using cutlass::epilogue::thread::ReLu;
  switch (activation) {
    case KNSPARSE_ACT_RELU:
      return f.template operator()<SparseGemmKernel<Element, ReLu, Config>>();
    case KNSPARSE_ACT_GELU:
      return f.template operator()<SparseGemmKernel<Element, GELU, Config>>();
    default:
      return f.template operator()<SparseGemmKernel<Element, Identity, Config>>();
  }
}

struct CanImplement {
  const SparseGemmArgs& a;
  int sm_count;
  template <class K>
  std::string operator()() const { return can_implement<K>(a, sm_count); }
};

struct Workspace {
  const SparseGemmArgs& a;
  int device, sm_count;
  template <class K>
  size_t operator()() const { return workspace_bytes<K>(a, device, sm_count); }
};

struct Run {
  const SparseGemmArgs& a;
  void* workspace;
  int device, sm_count;
  cudaStream_t stream;
  template <class K>
  std::string operator()() const { return run<K>(a, workspace, device, sm_count, stream); }
};

}  // namespace knsparse::sm90

// The Sm90Kernels table of knsparse_cuda.h for one element type and configuration (one
// translation unit each: the units compile in parallel and each needs half the memory).
#define KNSPARSE_SM90_KERNELS(name, Element, Config)                                                 \
  namespace knsparse {                                                                             \
  const Sm90Kernels name = {                                                                       \
      [](const SparseGemmArgs& a, int sm_count) {                                                  \
        return sm90::with_kernel<Element, sm90::Config>(a.activation, sm90::CanImplement{a, sm_count}); \
      },                                                                                           \
      [](const SparseGemmArgs& a, int device, int sm_count) {                                      \
        return sm90::with_kernel<Element, sm90::Config>(a.activation, sm90::Workspace{a, device, sm_count}); \
      },                                                                                           \
      [](const SparseGemmArgs& a, void* workspace, int device, int sm_count, cudaStream_t stream) { \
        return sm90::with_kernel<Element, sm90::Config>(a.activation,                              \
                                                        sm90::Run{a, workspace, device, sm_count, stream}); \
      }};                                                                                          \
  }

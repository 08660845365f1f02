// Ampere / Ada 2:4 sparse GEMM: CUTLASS 2.x SparseGemmWithVisitor with an epilogue visitor
// tree  out = act(acc + bias[row])  stored row-major, i.e. feature-major [rows, cols]
// (CUTLASS 2.x sparse GEMMs take the sparse operand as A and store D row-major only).
// Included by one .cu per element type.
#pragma once

// clang-format off
#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_sparse_with_visitor.h>  // before the visitors: they need gemm::
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/functional.h>
// clang-format on

#include <type_traits>

#include "check.h"
#include "knsparse_cuda.h"

namespace knsparse::sm80 {

namespace evt = cutlass::epilogue::threadblock;
using cute::_0;
using cute::_1;
using cute::Stride;

template <class Element, template <class> class ActivationFn>
struct SparseGemmKernel {
  using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 64>;  // logical (dense) K
  using WarpShape = cutlass::gemm::GemmShape<64, 64, 64>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 32>;
  static constexpr int kStages = 3;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  static constexpr int kEpilogueStages = 1;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using OutputThreadMap = evt::OutputTileThreadLayout<ThreadblockShape, WarpShape, Element, kAlignment,
                                                      kEpilogueStages>;
  // bias[row] broadcast along the row; a null pointer reads as 0 (no bias).
  using Bias = evt::VisitorColBroadcast<OutputThreadMap, Element, Stride<_1, _0, int64_t>>;
  using AddBias = evt::VisitorCompute<cutlass::plus, float, float, kRound>;
  using Biased = evt::Sm80EVT<AddBias, evt::VisitorAccFetch, Bias>;
  using Activate = evt::VisitorCompute<ActivationFn, Element, float, kRound>;
  using Activated = evt::Sm80EVT<Activate, Biased>;
  using Store = evt::VisitorAuxStore<OutputThreadMap, Element, kRound, Stride<int64_t, _1, int64_t>>;
  using Epilogue = evt::Sm80EVT<Store, Activated>;

  using Gemm = cutlass::gemm::device::SparseGemmWithVisitor<
      Element, cutlass::layout::RowMajor,     // A: compressed weight values [rows, depth/2]
      Element, cutlass::layout::ColumnMajor,  // B: x^T, i.e. x [cols, depth] row-major
      Element, cutlass::layout::RowMajor,     // C/D tag of the base epilogue (D is the Store)
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape,
      InstructionShape, Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
      kStages, kAlignment, kAlignment, cutlass::arch::OpMultiplyAdd, kEpilogueStages>;

  using ElementE = typename Gemm::ElementE;
  using LayoutE = typename Gemm::LayoutE;
  static_assert(sizeof(ElementE) == 2, "knsparse ships int16 metadata for 16-bit inputs");
  static_assert(std::is_same_v<LayoutE, cutlass::layout::ColumnMajorInterleaved<2>>,
                "CUTLASS changed the sparse metadata layout; knsparse.core.pack must follow");
  static_assert(Gemm::kSparse * Gemm::kElementsPerElementE == 16,
                "one int16 of metadata must cover 16 dense elements");
};

template <class Element, template <class> class ActivationFn>
typename SparseGemmKernel<Element, ActivationFn>::Gemm::Arguments make_arguments(const SparseGemmArgs& a) {
  using K = SparseGemmKernel<Element, ActivationFn>;
  const cutlass::gemm::GemmCoord problem(static_cast<int>(a.rows), static_cast<int>(a.cols),
                                         static_cast<int>(a.depth));
  const int meta_cols = static_cast<int>(a.depth / 16);
  cutlass::TensorRef<Element const, cutlass::layout::RowMajor> ref_a(
      static_cast<Element const*>(a.values), cutlass::layout::RowMajor(a.depth / 2));
  cutlass::TensorRef<Element const, cutlass::layout::ColumnMajor> ref_b(
      static_cast<Element const*>(a.x), cutlass::layout::ColumnMajor(a.ldx));
  cutlass::TensorRef<typename K::ElementE, typename K::LayoutE> ref_e(
      static_cast<typename K::ElementE*>(const_cast<void*>(a.meta)),
      K::LayoutE::packed({static_cast<int>(a.rows), meta_cols}));

  typename K::Epilogue::Arguments epilogue{
      {
          {
              {},                                                                    // accumulator
              {static_cast<Element const*>(a.bias), Element(0), {_1{}, _0{}, 0}},  // bias[row]
              {}                                                                     // acc + bias
          },
          {}  // activation
      },
      {static_cast<Element*>(a.out), {a.ldo, _1{}, 0}}  // out[row, col], leading dimension ldo
  };
  return typename K::Gemm::Arguments(problem, ref_a, ref_b, ref_e, epilogue);
}

template <class Element, template <class> class ActivationFn>
std::string can_implement(const SparseGemmArgs& a) {
  using Gemm = typename SparseGemmKernel<Element, ActivationFn>::Gemm;
  KNSPARSE_CUTLASS_CHECK(Gemm::can_implement(make_arguments<Element, ActivationFn>(a)),
                         "sm80 sparse GEMM can_implement");
  return {};
}

template <class Element, template <class> class ActivationFn>
std::string run(const SparseGemmArgs& a, cudaStream_t stream) {
  using Gemm = typename SparseGemmKernel<Element, ActivationFn>::Gemm;
  const auto arguments = make_arguments<Element, ActivationFn>(a);
  Gemm gemm;
  KNSPARSE_CUTLASS_CHECK(Gemm::can_implement(arguments), "sm80 sparse GEMM can_implement");
  KNSPARSE_CUTLASS_CHECK(gemm.initialize(arguments, nullptr, stream), "sm80 sparse GEMM initialize");
  KNSPARSE_CUTLASS_CHECK(gemm.run(stream), "sm80 sparse GEMM launch");
  return {};
}

// `launch` false: CUTLASS's can_implement only (host, no device); true: run on `stream`.
template <class Element>
std::string dispatch(const SparseGemmArgs& a, bool launch, cudaStream_t stream) {
  using cutlass::epilogue::thread::GELU;
  using cutlass::epilogue::thread::Identity;
  using cutlass::epilogue::thread::ReLu;
  switch (a.activation) {
    case KNSPARSE_ACT_RELU:
      return launch ? run<Element, ReLu>(a, stream) : can_implement<Element, ReLu>(a);
    case KNSPARSE_ACT_GELU:
      return launch ? run<Element, GELU>(a, stream) : can_implement<Element, GELU>(a);
    default:
      return launch ? run<Element, Identity>(a, stream) : can_implement<Element, Identity>(a);
  }
}

}  // namespace knsparse::sm80

// The two entry points of knsparse_cuda.h for one element type.
#define KNSPARSE_SM80_ENTRY_POINTS(suffix, Element)                                               \
  namespace knsparse {                                                                          \
  std::string sparse_gemm_sm80_##suffix##_can_implement(const SparseGemmArgs& a) {              \
    return sm80::dispatch<Element>(a, false, nullptr);                                          \
  }                                                                                             \
  std::string sparse_gemm_sm80_##suffix(const SparseGemmArgs& a, cudaStream_t stream) {         \
    return sm80::dispatch<Element>(a, true, stream);                                            \
  }                                                                                             \
  }

// Ampere / Ada 2:4 sparse GEMM: CUTLASS 2.x SparseGemmWithVisitor with an epilogue visitor
// tree  out = act(acc + bias[row])  stored row-major. Included by one .cu per element type.
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
                "CUTLASS changed the sparse metadata layout; knsparse.pack must follow");
  static_assert(Gemm::kSparse * Gemm::kElementsPerElementE == 16,
                "one int16 of metadata must cover 16 dense elements");
};

template <class Element, template <class> class ActivationFn>
std::string run(const SparseGemmArgs& a, cudaStream_t stream) {
  using K = SparseGemmKernel<Element, ActivationFn>;
  using Gemm = typename K::Gemm;

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
  typename Gemm::Arguments arguments(problem, ref_a, ref_b, ref_e, epilogue);

  Gemm gemm;
  KNSPARSE_CUTLASS_CHECK(Gemm::can_implement(arguments), "sm80 sparse GEMM can_implement");
  KNSPARSE_CUTLASS_CHECK(gemm.initialize(arguments, nullptr, stream), "sm80 sparse GEMM initialize");
  KNSPARSE_CUTLASS_CHECK(gemm.run(stream), "sm80 sparse GEMM launch");
  return {};
}

inline std::string check_args(const SparseGemmArgs& a) {
  if (a.rows % 32 || a.depth % 64 || a.cols % 8 || a.ldx % 8 || a.ldo % 8) {
    return "sm80 sparse GEMM needs rows % 32 == 0, depth % 64 == 0, cols % 8 == 0 and leading "
           "dimensions % 8 == 0; got rows=" +
           std::to_string(a.rows) + " depth=" + std::to_string(a.depth) + " cols=" + std::to_string(a.cols) +
           " ldx=" + std::to_string(a.ldx) + " ldo=" + std::to_string(a.ldo);
  }
  return {};
}

template <class Element>
std::string dispatch(const SparseGemmArgs& a, cudaStream_t stream) {
  if (std::string err = check_args(a); !err.empty()) return err;
  switch (a.activation) {
    case Activation::kNone:
      return run<Element, cutlass::epilogue::thread::Identity>(a, stream);
    case Activation::kRelu:
      return run<Element, cutlass::epilogue::thread::ReLu>(a, stream);
    case Activation::kGelu:
      return run<Element, cutlass::epilogue::thread::GELU>(a, stream);
  }
  return "unknown activation code " + std::to_string(static_cast<int>(a.activation));
}

}  // namespace knsparse::sm80

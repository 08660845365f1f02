// Host-only probe of CUTLASS's Hopper sparse metadata layout, used by
// tests/test_cutlass_meta.py to check knsparse's Python conversion against CUTLASS itself.
//
// Usage: sm90_meta_layout_probe ROWS DEPTH
// Prints one line per (row, 16-column metadata unit): "row unit offset", where offset is the
// int16 index at which CUTLASS's structured-sparse compressor stores that unit, derived exactly
// as SM90StructuredSparseCompressor does (fill_layoutE, recast to bytes).
#include <cute/tensor.hpp>
#include <cutlass/gemm/collective/builders/sm90_sparse_config.inl>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "knsparse_cuda.h"

int main(int argc, char** argv) {
  using namespace cute;
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s ROWS DEPTH\n", argv[0]);
    return 2;
  }
  const int rows = std::atoi(argv[1]);
  const int depth = std::atoi(argv[2]);
  // The same configuration the knsparse sm90 kernel builds (checked there by a static_assert).
  using Config = cutlass::Sm90GemmSparseConfig<sparse_elem<2, cutlass::half_t>, GMMA::Major::K,
                                               sparse_elem<8, uint8_t>, Int<knsparse::kSm90MetaBlockK>>;
  const auto problem = make_shape(rows, 1, depth, 1);
  const auto layout_e = Config::fill_layoutE(problem);
  std::vector<uint8_t> storage(size_t(cosize(layout_e)) / 8 + 16);
  Tensor e_sparse = make_tensor(recast_ptr<sparse_elem<8, uint8_t>>(storage.data()), layout_e);
  Tensor e_bytes = recast<uint8_t>(e_sparse);  // (rows, depth / 8, 1) bytes, as the compressor sees it
  for (int m = 0; m < rows; ++m) {
    for (int unit = 0; unit < depth / 16; ++unit) {
      const uint8_t* lo = &e_bytes(m, 2 * unit, 0);
      const uint8_t* hi = &e_bytes(m, 2 * unit + 1, 0);
      if (hi != lo + 1 || (lo - storage.data()) % 2) {
        std::fprintf(stderr, "unit (%d, %d) is not one aligned int16\n", m, unit);
        return 1;
      }
      std::printf("%d %d %ld\n", m, unit, long((lo - storage.data()) / 2));
    }
  }
  std::fprintf(stderr, "storage_int16=%ld\n", long(cosize(layout_e) / 16));
  return 0;
}

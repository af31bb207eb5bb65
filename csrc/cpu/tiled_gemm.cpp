// GEMM tiles fixed by the shape (see tiled_gemm.h).
#include "cpu/tiled_gemm.h"

#include <ATen/ATen.h>

#include <cmath>

#include "cpu/one_blas_thread.h"
#include "cpu/rounding.h"
#include "ops/optional_tensor.h"
namespace qkv_attention::cpu {
namespace {

// A tile of about 4 MFLOP takes some 40 us on one core here (about 100 GFLOP/s in float32),
// against a few us of dispatch per BLAS call.
constexpr double kFlopsPerTile = 4e6;
// Enough tiles to keep two (or four) threads evenly busy, and no more: each tile is a BLAS call
// that packs its own copy of the operands it shares with the other tiles (the weight rows, for a
// projection), so thinner tiles repeat that work. One thread, 1024 x 512 times 512 x 1536 (the
// module's input projection at B 8, L 128, E 512): 29.9 ms in one call, 31.5 ms in 4 row tiles,
// 33.2 in 8, 41.3 in 16 (MKL's copy of B grew to a quarter of the samples).
constexpr int64_t kMaxTiles = 4;

// `extent` cut into about `tiles` blocks, each a multiple of `multiple` (alignment of the block
// starts); returns the block size.
int64_t block_size(int64_t extent, int64_t tiles, int64_t multiple) {
  int64_t block = ceil_div(extent, tiles);
  if (tiles > 1) block = ceil_div(block, multiple) * multiple;
  return std::min(block, extent);
}

}  // namespace

TilePlan::Tile TilePlan::tile(int64_t index) const {
  const int64_t r = index / col_tiles, c = index % col_tiles;
  const int64_t row_begin = r * row_block, col_begin = c * col_block;
  return {row_begin, std::min(rows, row_begin + row_block), col_begin,
          std::min(cols, col_begin + col_block)};
}

TilePlan plan_tiles(int64_t rows, int64_t cols, int64_t depth, int64_t min_rows, int64_t min_cols) {
  TilePlan plan;
  plan.rows = rows;
  plan.cols = cols;
  if (rows <= 0 || cols <= 0) return plan;  // no tiles
  const double flops = 2.0 * double(rows) * double(cols) * double(std::max<int64_t>(depth, 1));
  int64_t wanted = std::clamp<int64_t>(int64_t(std::ceil(flops / kFlopsPerTile)), 1, kMaxTiles);
  if (wanted > 1 && wanted % 2 == 1) ++wanted;  // two threads share an even count evenly
  const int64_t row_tiles =
      std::clamp<int64_t>(wanted, 1, std::max<int64_t>(1, rows / std::max<int64_t>(min_rows, 1)));
  const int64_t col_tiles = std::clamp<int64_t>(
      ceil_div(wanted, row_tiles), 1, std::max<int64_t>(1, cols / std::max<int64_t>(min_cols, 1)));
  plan.row_block = block_size(rows, row_tiles, 8);
  plan.col_block = block_size(cols, col_tiles, 16);  // 64-byte aligned column starts in float32
  plan.row_tiles = ceil_div(rows, plan.row_block);
  plan.col_tiles = ceil_div(cols, plan.col_block);
  return plan;
}

void gemm_tile(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
               const std::optional<at::Tensor>& bias) {
  at::Tensor result = out;         // the ATen out= functions take a mutable handle
  const OneGemmThread one_thread;  // the tile is the task: its sums stay on this thread
  if (given(bias)) {
    at::addmm_out(result, *bias, a, b);
  } else {
    at::mm_out(result, a, b);
  }
}

void column_sums(const at::Tensor& out, const at::Tensor& matrix) {
  const TilePlan plan = plan_tiles(1, matrix.size(1), matrix.size(0), 1, 64);
  if (plan.count() == 0) return;
  run_tiles(plan.count(), [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const TilePlan::Tile tile = plan.tile(t);
      at::Tensor sums = out.slice(0, tile.col_begin, tile.col_end);
      at::sum_out(sums, matrix.slice(1, tile.col_begin, tile.col_end), {0});
    }
  });
}

}  // namespace qkv_attention::cpu

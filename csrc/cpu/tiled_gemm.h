// GEMMs whose bits do not depend on the thread count.
//
// A BLAS splits one GEMM across its threads, and when the product has few rows MKL splits the
// reduction itself: the same product then rounds differently with 1 and with 2 threads (measured
// up to 4.3e-7 of the largest value in float32 for 7 rows). Here the output is cut into tiles
// whose sizes depend on the GEMM's shape alone; each tile is one BLAS call that sums its whole
// reduction, and the calls run inside an ATen parallel region, where MKL and oneDNN run on the
// calling thread only (measured: a 2048 x 1024 x 1536 float32 or bfloat16 at::mm inside the region
// takes the one-thread time with two threads configured, and a 7 x 4096 x 16 product comes out
// bitwise the same with 1 and 2 threads there, while a plain at::mm's does not). A tile's bits
// then depend on its operands alone, and the tiles are the same for every thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace qkv_attention::cpu {

// The (rows x cols) output of a GEMM cut into row_tiles x col_tiles tiles of
// row_block x col_block elements (the last row and column of tiles may be smaller).
struct TilePlan {
  struct Tile {
    int64_t row_begin, row_end, col_begin, col_end;
    int64_t rows() const { return row_end - row_begin; }
    int64_t cols() const { return col_end - col_begin; }
  };

  int64_t rows = 0, cols = 0;
  int64_t row_block = 1, col_block = 1;
  int64_t row_tiles = 0, col_tiles = 0;

  int64_t count() const { return row_tiles * col_tiles; }
  // Tiles are numbered row-major: the column tiles of one row block are consecutive.
  Tile tile(int64_t index) const;
};

// Tiles for a (rows x cols) output with reduction length `depth`, a function of these sizes only.
// Rows are split first (each tile then reads whole rows of the weight-like operand once);
// min_rows / min_cols bound how thin a tile may get.
TilePlan plan_tiles(int64_t rows, int64_t cols, int64_t depth, int64_t min_rows = 16,
                    int64_t min_cols = 64);

// Runs body(first, last) on consecutive ranges of the tile indices [0, count), each range on one
// thread, so that a body allocates its scratch once per range. With more than one thread even a
// single tile runs inside a parallel region (a lone task would run on the calling thread outside
// any region, where the BLAS would split it across threads).
template <typename Body>
void run_tiles(int64_t count, const Body& body) {
  if (count <= 0) return;
  at::parallel_for(0, std::max<int64_t>(count, 2), 1, [&](int64_t begin, int64_t end) {
    // The worker threads do not inherit the caller's dispatch state: the ATen calls of a tile
    // must skip autograd there too (its out= variants refuse inputs that require grad).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    end = std::min(end, count);
    if (begin < end) body(begin, end);
  });
}

// out (m x n) = a (m x k) b (k x n) [+ bias (n)], one BLAS call.
// out may be any 2-D view (a block of a larger matrix, or a transposed one).
void gemm_tile(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
               const std::optional<at::Tensor>& bias = std::nullopt);

// out (n) = the column sums of matrix (rows x n), in column tiles; rows summed in one fixed
// order per column, so that the result does not depend on the thread count either.
void column_sums(const at::Tensor& out, const at::Tensor& matrix);

}  // namespace qkv_attention::cpu

// The tile plans of the thread-count-independent GEMMs (cpu/tiled_gemm.h) and the head-layout
// row views they read and write (cpu/head_rows.h), below the ops that use them.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "cpu/head_gemm.h"
#include "cpu/head_rows.h"
#include "cpu/tiled_gemm.h"

using qkv_attention::cpu::as_row_matrix;
using qkv_attention::cpu::HeadRows;
using qkv_attention::cpu::plan_tiles;
using qkv_attention::cpu::RowOrder;
using qkv_attention::cpu::TilePlan;

TEST_CASE("a tile plan covers every output element exactly once", "[tiled_gemm]") {
  const std::vector<std::array<int64_t, 3>> shapes = {
      {1, 1, 1},         {7, 16, 4096}, {2048, 1536, 512}, {4096, 16, 16}, {33, 1000, 3},
      {512, 2048, 2048}, {5, 0, 9},     {0, 5, 9},         {17, 19, 0}};
  for (const auto& [rows, cols, depth] : shapes) {
    INFO("rows " << rows << " cols " << cols << " depth " << depth);
    const TilePlan plan = plan_tiles(rows, cols, depth);
    CHECK(plan.count() <= 16);
    std::vector<int> covered(size_t(rows * cols), 0);
    for (int64_t t = 0; t < plan.count(); ++t) {
      const TilePlan::Tile tile = plan.tile(t);
      REQUIRE(tile.rows() > 0);
      REQUIRE(tile.cols() > 0);
      for (int64_t r = tile.row_begin; r < tile.row_end; ++r) {
        for (int64_t c = tile.col_begin; c < tile.col_end; ++c) ++covered[size_t(r * cols + c)];
      }
    }
    for (const int count : covered) REQUIRE(count == 1);
  }
}

TEST_CASE("a tile plan depends on the shape alone, not on the thread count", "[tiled_gemm]") {
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const TilePlan one = plan_tiles(2048, 1536, 512);
  at::set_num_threads(2);
  const TilePlan two = plan_tiles(2048, 1536, 512);
  at::set_num_threads(threads);
  CHECK(one.row_block == two.row_block);
  CHECK(one.col_block == two.col_block);
  CHECK(one.count() == two.count());
  CHECK(one.count() > 1);  // big enough to be cut
}

TEST_CASE("head rows gather and scatter the (B*N, parts*H*D) matrix in either row order",
          "[tiled_gemm]") {
  const int64_t B = 3, H = 2, N = 5, D = 4;
  for (const RowOrder order : {RowOrder::kBatchMajor, RowOrder::kPositionMajor}) {
    const at::Tensor first = at::randn({B, H, N, D}, at::kDouble);
    const at::Tensor second = at::randn({B, H, N, D}, at::kDouble);
    // The matrix these stand for: row (b, n) = [first heads | second heads].
    at::Tensor expected = at::cat({first.permute({0, 2, 1, 3}).reshape({B, N, H * D}),
                                   second.permute({0, 2, 1, 3}).reshape({B, N, H * D})},
                                  2);                                            // (B, N, 2*H*D)
    if (order == RowOrder::kPositionMajor) expected = expected.transpose(0, 1);  // (N, B, ...)
    expected = expected.reshape({B * N, 2 * H * D});

    const HeadRows rows({first, second}, order);
    REQUIRE(rows.rows() == B * N);
    REQUIRE(rows.cols() == 2 * H * D);
    // A block that starts and ends inside heads and crosses from one part into the next.
    const int64_t r0 = 2, r1 = 11, c0 = 3, c1 = 13;
    at::Tensor block = at::empty({r1 - r0, c1 - c0}, at::kDouble);
    rows.gather(r0, r1, c0, c1, block.data_ptr(), block.stride(0));
    CHECK(at::equal(block, expected.slice(0, r0, r1).slice(1, c0, c1)));

    const at::Tensor first_out = at::zeros_like(first), second_out = at::zeros_like(second);
    const HeadRows out({first_out, second_out}, order);
    const at::Tensor whole = expected.contiguous();
    out.scatter(whole.data_ptr(), whole.stride(0), 0, B * N, 0, 2 * H * D);
    CHECK(at::equal(first_out, first));
    CHECK(at::equal(second_out, second));
  }
}

TEST_CASE("row matrices view (B, N, F) inputs without a copy in both position orders",
          "[tiled_gemm]") {
  const at::Tensor batch_first = at::randn({3, 5, 4});
  const auto batch_major = as_row_matrix(batch_first);
  CHECK(batch_major.order == RowOrder::kBatchMajor);
  CHECK(batch_major.matrix.data_ptr() == batch_first.data_ptr());
  CHECK(at::equal(batch_major.matrix, batch_first.reshape({15, 4})));

  const at::Tensor sequence_first = at::randn({5, 3, 4});  // (N, B, F), seen as (B, N, F)
  const auto position_major = as_row_matrix(sequence_first.transpose(0, 1));
  CHECK(position_major.order == RowOrder::kPositionMajor);
  CHECK(position_major.matrix.data_ptr() == sequence_first.data_ptr());
  CHECK(at::equal(position_major.matrix, sequence_first.reshape({15, 4})));
}

TEST_CASE("the tiled GEMM into the head layout equals one plain GEMM", "[tiled_gemm]") {
  const int64_t B = 4, N = 37, Ein = 50, H = 3, D = 20;
  const at::Tensor x = at::randn({B, N, Ein}, at::kDouble);
  const at::Tensor weight = at::randn({H * D, Ein}, at::kDouble);
  const at::Tensor bias = at::randn({H * D}, at::kDouble);
  const at::Tensor heads = at::empty({B, H, N, D}, at::kDouble);
  const auto rows = as_row_matrix(x);
  qkv_attention::cpu::gemm_rows_into_heads(rows.matrix, weight.t(), bias,
                                           HeadRows({heads}, rows.order));
  const at::Tensor expected =
      at::addmm(bias, x.reshape({B * N, Ein}), weight.t()).view({B, N, H, D}).permute({0, 2, 1, 3});
  CHECK(at::allclose(heads, expected, 1e-12, 1e-12));
}

// Tiled GEMMs between row matrices and head-layout rows (see head_gemm.h).
#include "cpu/head_gemm.h"

#include <ATen/ATen.h>

#include "cpu/tiled_gemm.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::cpu {

void gemm_rows_into_heads(const at::Tensor& a, const at::Tensor& b,
                          const std::optional<at::Tensor>& bias, const HeadRows& out) {
  const TilePlan plan = plan_tiles(a.size(0), b.size(1), a.size(1));
  run_tiles(plan.count(), [&](int64_t first, int64_t last) {
    // The GEMM writes a tile here, then it is scattered into the head layout.
    const at::Tensor scratch = at::empty({plan.row_block, plan.col_block}, a.options());
    for (int64_t t = first; t < last; ++t) {
      const TilePlan::Tile tile = plan.tile(t);
      const at::Tensor block = scratch.narrow(0, 0, tile.rows()).narrow(1, 0, tile.cols());
      std::optional<at::Tensor> bias_block;
      if (given(bias)) {
        bias_block = bias->slice(0, tile.col_begin, tile.col_end);
      }
      gemm_tile(block, a.slice(0, tile.row_begin, tile.row_end),
                b.slice(1, tile.col_begin, tile.col_end), bias_block);
      out.scatter(scratch.data_ptr(), plan.col_block, tile.row_begin, tile.row_end, tile.col_begin,
                  tile.col_end);
    }
  });
}

void gemm_heads_into_rows(const HeadRows& a, const at::Tensor& b,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  const int64_t K = a.cols();
  const TilePlan plan = plan_tiles(out.size(0), out.size(1), K);
  run_tiles(plan.count(), [&](int64_t first, int64_t last) {
    // Whole rows of a (all K columns), gathered once per row block.
    const at::Tensor scratch = at::empty({plan.row_block, K}, out.options());
    int64_t gathered = -1;
    for (int64_t t = first; t < last; ++t) {
      const TilePlan::Tile tile = plan.tile(t);
      if (tile.row_begin != gathered) {
        a.gather(tile.row_begin, tile.row_end, 0, K, scratch.data_ptr(), K);
        gathered = tile.row_begin;
      }
      std::optional<at::Tensor> bias_block;
      if (given(bias)) {
        bias_block = bias->slice(0, tile.col_begin, tile.col_end);
      }
      gemm_tile(out.slice(0, tile.row_begin, tile.row_end).slice(1, tile.col_begin, tile.col_end),
                scratch.narrow(0, 0, tile.rows()),  // (rows, K)
                b.slice(1, tile.col_begin, tile.col_end), bias_block);
    }
  });
}

void gemm_heads_transposed(const HeadRows& v, const at::Tensor& y, const at::Tensor& out,
                           const std::optional<at::Tensor>& v_column_sums) {
  const int64_t R = y.size(0), N = out.size(1);
  // At least 64 rows of vᵀ per tile: every tile streams all R rows of y through the BLAS. (At
  // least one column, so that v's column sums are taken even when y has none.)
  const TilePlan plan = plan_tiles(out.size(0), std::max<int64_t>(N, 1), R, 64, 64);
  run_tiles(plan.count(), [&](int64_t first, int64_t last) {
    // Columns of v (all R rows), gathered once per row block of out.
    const at::Tensor scratch = at::empty({R, plan.row_block}, y.options());
    int64_t gathered = -1;
    for (int64_t t = first; t < last; ++t) {
      const TilePlan::Tile tile = plan.tile(t);
      if (tile.row_begin != gathered) {
        v.gather(0, R, tile.row_begin, tile.row_end, scratch.data_ptr(), plan.row_block);
        gathered = tile.row_begin;
      }
      const at::Tensor columns = scratch.narrow(1, 0, tile.rows());  // (R, rows)
      const int64_t col_end = std::min(tile.col_end, N);
      if (col_end > tile.col_begin) {
        gemm_tile(out.slice(0, tile.row_begin, tile.row_end).slice(1, tile.col_begin, col_end),
                  columns.t(), y.slice(1, tile.col_begin, col_end));
      }
      if (v_column_sums.has_value() && tile.col_begin == 0) {
        at::Tensor sums = v_column_sums->slice(0, tile.row_begin, tile.row_end);
        at::sum_out(sums, columns, {0});
      }
    }
  });
}

}  // namespace qkv_attention::cpu

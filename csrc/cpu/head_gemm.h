// The three GEMM shapes of the projections, between (B*N, F) row matrices and head-layout rows
// (cpu/head_rows.h), tiled so that the bits do not depend on the thread count
// (cpu/tiled_gemm.h). Blocks of head-layout rows go through per-thread scratch, so that no
// whole-tensor copy into a GEMM-friendly layout is ever made.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "cpu/head_rows.h"

namespace qkv_attention::cpu {

// out (R x C, head layout) = a (R x K) b (K x C) [+ bias (C)]; a's rows in out's row order.
void gemm_rows_into_heads(const at::Tensor& a, const at::Tensor& b,
                          const std::optional<at::Tensor>& bias, const HeadRows& out);

// out (R x N) = a b [+ bias (N)], a (R x K, head layout) in out's row order, b (K x N).
void gemm_heads_into_rows(const HeadRows& a, const at::Tensor& b,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out);

// out (M x N) = vᵀ y, v (R x M, head layout) in y's (R x N) row order; a sum over the R rows,
// each tile one GEMM over all of them. With v_column_sums (M), also the column sums of v.
void gemm_heads_transposed(const HeadRows& v, const at::Tensor& y, const at::Tensor& out,
                           const std::optional<at::Tensor>& v_column_sums = std::nullopt);

}  // namespace qkv_attention::cpu

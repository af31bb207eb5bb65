// CPU kernels of qkv_projection: tiled GEMMs straight into and out of the head layout.
#include <ATen/ATen.h>

#include <torch/library.h>
#include <optional>
#include <vector>

#include "cpu/large_tensor.h"

#include "cpu/head_gemm.h"
#include "cpu/head_rows.h"
#include "ops/optional_tensor.h"
#include "ops/qkv_projection.h"

namespace qkv_attention::cpu {

namespace {

// ---- the CPU kernels ------------------------------------------------------------------------
// Every GEMM goes through cpu/head_gemm.h: tiles fixed by the shape, each one BLAS call, so the
// bits do not depend on the thread count, and the outputs are written into (and the gradients
// read from) the head layout (B, H, N, D) tile by tile, without a whole-tensor transpose copy.
//
// nn.MultiheadAttention's self-attention passes one tensor as query, key and value, and its
// weights (and biases) as in_proj_weight.chunk(3): consecutive row blocks of one (3E, Ein)
// matrix. Then one tiled GEMM against the whole matrix replaces three.

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type();
}

// a, b and c stacked along dimension 0 as one strided view of their common storage, when they
// are that already: the same sizes and strides, and b and c starting where the rows after a's
// last one would (a's offset plus rows * stride(0), twice). Decided on the actual strides, not
// on is_contiguous(): that ignores the stride of a size-1 dimension, so (1, Ein) weights with
// any row stride pass it, and a view built from that stride read the wrong rows for k and v
// (or fell outside the storage). Any strides work, the weights only have to be one view.
std::optional<at::Tensor> stacked(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  if (a.sizes() != b.sizes() || a.sizes() != c.sizes() || a.numel() == 0) return std::nullopt;
  if (a.strides() != b.strides() || a.strides() != c.strides()) return std::nullopt;
  if (!a.storage().is_alias_of(b.storage()) || !a.storage().is_alias_of(c.storage())) {
    return std::nullopt;
  }
  // The step from one part to the next, in elements: a's rows times its row stride. (Sizes
  // and strides are bounded by the input checks, so the product does not overflow.)
  // With a row stride of 0 (an expanded weight) the step is 0: only three views of the same
  // repeated row stack, correctly, into more of it.
  const int64_t step = a.size(0) * a.stride(0);
  if (b.storage_offset() != a.storage_offset() + step ||
      c.storage_offset() != a.storage_offset() + 2 * step) {
    return std::nullopt;
  }
  std::vector<int64_t> sizes = a.sizes().vec();
  sizes[0] *= 3;
  return a.as_strided(sizes, a.strides());
}

struct PackedProjection {
  at::Tensor weight;               // (3E, Ein)
  std::optional<at::Tensor> bias;  // (3E) or none
};

std::optional<PackedProjection> packed_projection(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias) {
  if (!same_view(query, key) || !same_view(query, value)) return std::nullopt;
  const std::optional<at::Tensor> weight = stacked(q_weight, k_weight, v_weight);
  if (!weight) return std::nullopt;
  if (!given(q_bias) && !given(k_bias) && !given(v_bias)) {
    return PackedProjection{*weight, std::nullopt};
  }
  if (!given(q_bias) || !given(k_bias) || !given(v_bias)) return std::nullopt;
  const std::optional<at::Tensor> bias = stacked(*q_bias, *k_bias, *v_bias);
  if (!bias) return std::nullopt;
  return PackedProjection{*weight, bias};
}

// An empty (B, H, N, E/H) output for the projection of x (B, N, Ein) by a weight of E rows.
at::Tensor empty_heads(const at::Tensor& x, int64_t E, int64_t num_heads) {
  return empty_output({x.size(0), num_heads, x.size(1), E / num_heads}, x.options());
}

// heads[0], heads[1], ... <- x (B, N, Ein) @ weight.T + bias, weight (parts*E, Ein) the
// projections' weights stacked.
void project_into_heads(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, std::vector<at::Tensor> heads) {
  const RowMatrix rows = as_row_matrix(x);  // (B*N, Ein)
  gemm_rows_into_heads(rows.matrix, weight.t(), bias, HeadRows(std::move(heads), rows.order));
}

// The three gradients of one projection: input (B, N, Ein), weight (E, Ein), bias (E).
std::tuple<at::Tensor, at::Tensor, at::Tensor> project_back_cpu(
    const std::optional<at::Tensor>& grad_heads, const at::Tensor& x, const at::Tensor& weight) {
  if (!given(grad_heads) || grad_heads->numel() == 0) {
    // No gradient, or an empty one (B*N = 0 or E = 0): every gradient is a sum of no terms.
    return {at::zeros(x.sizes(), x.options()), at::zeros(weight.sizes(), weight.options()),
            at::zeros({weight.size(0)}, weight.options())};
  }
  const at::Tensor grad = HeadRows::with_unit_last_stride(*grad_heads);  // (B, H, N, D)
  const int64_t B = x.size(0), N = x.size(1), Ein = x.size(2);
  at::Tensor grad_x = empty_output({B, N, Ein}, x.options());
  gemm_heads_into_rows(HeadRows({grad}, RowOrder::kBatchMajor), weight, std::nullopt,
                       grad_x.view({B * N, Ein}));
  // grad_weight (E, Ein) = grad_rowsᵀ x_rows, a sum over the B*N positions in x's row order.
  const RowMatrix rows = as_row_matrix(x);
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty({weight.size(0)}, weight.options());
  gemm_heads_transposed(HeadRows({grad}, rows.order), rows.matrix, grad_weight, grad_bias);
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias, int64_t num_heads) {
  check_qkv_projection_inputs("qkv_projection", query, key, value, q_weight, k_weight, v_weight,
                              q_bias, k_bias, v_bias, num_heads);
  at::Tensor q = empty_heads(query, q_weight.size(0), num_heads);
  at::Tensor k = empty_heads(key, k_weight.size(0), num_heads);
  at::Tensor v = empty_heads(value, v_weight.size(0), num_heads);
  // An empty projection is skipped: its input may still be a huge expanded view, which the
  // GEMM would copy or walk.
  if (const auto packed = packed_projection(query, key, value, q_weight, k_weight, v_weight, q_bias,
                                            k_bias, v_bias)) {
    if (q.numel() > 0) project_into_heads(query, packed->weight, packed->bias, {q, k, v});
  } else {
    if (q.numel() > 0) project_into_heads(query, q_weight, q_bias, {q});
    if (k.numel() > 0) project_into_heads(key, k_weight, k_bias, {k});
    if (v.numel() > 0) project_into_heads(value, v_weight, v_bias, {v});
  }
  return {q, k, v};
}

QKVProjectionGrads qkv_projection_backward_cpu(const std::optional<at::Tensor>& grad_q,
                                               const std::optional<at::Tensor>& grad_k,
                                               const std::optional<at::Tensor>& grad_v,
                                               const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value, const at::Tensor& q_weight,
                                               const at::Tensor& k_weight,
                                               const at::Tensor& v_weight, int64_t num_heads) {
  check_qkv_projection_backward_inputs(grad_q, grad_k, grad_v, query, key, value, q_weight,
                                       k_weight, v_weight, num_heads);
  auto [grad_query, grad_q_weight, grad_q_bias] = project_back_cpu(grad_q, query, q_weight);
  auto [grad_key, grad_k_weight, grad_k_bias] = project_back_cpu(grad_k, key, k_weight);
  auto [grad_value, grad_v_weight, grad_v_bias] = project_back_cpu(grad_v, value, v_weight);
  return {grad_query,    grad_key,    grad_value,  grad_q_weight, grad_k_weight,
          grad_v_weight, grad_q_bias, grad_k_bias, grad_v_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("qkv_projection", TORCH_FN(qkv_projection_cpu));
  m.impl("qkv_projection_backward", TORCH_FN(qkv_projection_backward_cpu));
}

}  // namespace qkv_attention::cpu

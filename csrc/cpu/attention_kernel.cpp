// CPU kernels of attention: forward, backward and the dropout mask, and their registration
// at the CPU dispatch key.
//
// The kernels work a query row (forward) or a key column (backward) at a time and never hold
// more than one row of scores, so memory stays linear in the sequence lengths. The backward
// runs in two passes that both parallelise over every (batch, head) pair and sequence position,
// so it keeps all cores busy even when B * H = 1:
//   pass 1, over query rows: delta_i = sum_j p_ij dP_ij, and dQ_i;
//   pass 2, over key rows:   dK_j and dV_j, using delta_i from pass 1.
#include "cpu/attention_kernel.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "cpu/philox.h"
#include "ops/attention.h"

namespace qkv_attention::cpu {
namespace {

template <typename T>
using acc_t = at::opmath_type<T>;

// Keys that query row i may see: all of them, or 0..i when causal (top-left aligned).
inline int64_t visible_keys(const AttentionShape& shape, int64_t i) {
  return shape.is_causal ? std::min(shape.kv_len, i + 1) : shape.kv_len;
}

// What the kept weights are multiplied by: 1 / (1 - p), and 0 when everything is dropped.
inline double dropout_scale(double dropout_p) {
  return dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0;
}

template <typename A, typename T>
inline A dot(const T* a, int64_t a_stride, const T* b, int64_t b_stride, int64_t n) {
  A sum = 0;
  for (int64_t d = 0; d < n; ++d) {
    sum += static_cast<A>(a[d * a_stride]) * static_cast<A>(b[d * b_stride]);
  }
  return sum;
}

// The masks of one query row (b, h, i), applied to its scores.
template <typename T>
class MaskRow {
 public:
  MaskRow(const AttentionShape& shape, int64_t b, int64_t h, int64_t i) {
    for (int m = 0; m < AttentionShape::kMasks; ++m) {
      const MaskOperand& mask = shape.masks[m];
      if (mask.kind == MaskKind::kNone) continue;
      const int64_t elem = b * mask.strides.batch + h * mask.strides.head + i * mask.strides.row;
      Operand& op = operands_[count_++];
      op.kind = mask.kind;
      op.col_stride = mask.strides.col;
      op.row = mask.kind == MaskKind::kBool
                   ? static_cast<const void*>(static_cast<const bool*>(mask.data) + elem)
                   : static_cast<const void*>(static_cast<const T*>(mask.data) + elem);
    }
  }

  bool empty() const { return count_ == 0; }

  acc_t<T> apply(int64_t j, acc_t<T> score) const {
    for (int m = 0; m < count_; ++m) {
      const Operand& op = operands_[m];
      if (op.kind == MaskKind::kBool) {
        if (!static_cast<const bool*>(op.row)[j * op.col_stride]) {
          return -std::numeric_limits<acc_t<T>>::infinity();
        }
      } else {
        score += static_cast<acc_t<T>>(static_cast<const T*>(op.row)[j * op.col_stride]);
      }
    }
    return score;
  }

 private:
  struct Operand {
    MaskKind kind;
    const void* row;
    int64_t col_stride;
  };
  Operand operands_[AttentionShape::kMasks];
  int count_ = 0;
};

// score[j] for j < visible, for query row (b, h, i); returns the row maximum, NaN when a score
// is NaN (so that NaN in gives NaN out) and -inf when no key may be attended to.
template <typename T>
acc_t<T> row_scores(const AttentionShape& shape, const T* query, const Strides4& qs,
                    const T* key, const Strides4& ks, int64_t b, int64_t h, int64_t i,
                    int64_t visible, acc_t<T>* score) {
  using A = acc_t<T>;
  const MaskRow<T> mask(shape, b, h, i);
  const T* q_row = query + b * qs.batch + h * qs.head + i * qs.row;
  const T* key_bh = key + b * ks.batch + h * ks.head;
  const A scale = static_cast<A>(shape.scale);
  A row_max = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < visible; ++j) {
    A s = shape.head_dim == 0
              ? A(0)
              : scale * dot<A>(q_row, qs.col, key_bh + j * ks.row, ks.col, shape.head_dim);
    if (!mask.empty()) s = mask.apply(j, s);
    score[j] = s;
    if (!(s <= row_max)) row_max = s;  // also takes a NaN, which then sticks
  }
  return row_max;
}

template <typename T>
void forward_rows(const AttentionForwardParams<T>& p, int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  const int64_t S = p.kv_len, Dv = p.value_dim;
  std::vector<A> score(std::max<int64_t>(S, 1));
  std::vector<A> acc(std::max<int64_t>(Dv, 1));
  std::vector<char> keep(std::max<int64_t>(S, 1), 1);
  const DropoutStream stream(p.seed, p.offset, p.dropout_p);
  const A kept_scale = static_cast<A>(dropout_scale(p.dropout_p));
  A* logsumexp = static_cast<A*>(p.logsumexp);

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t i = row % p.q_len, bh = row / p.q_len;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const int64_t visible = visible_keys(p, i);
    T* out_row = p.output + row * Dv;
    T* weights_row = p.weights ? p.weights + row * S : nullptr;

    const A row_max = row_scores(p, p.query, p.query_strides, p.key, p.key_strides, b, h, i,
                                 visible, score.data());
    if (row_max == -std::numeric_limits<A>::infinity()) {
      // No key to attend to: a row of zeros, never NaN (see DESIGN.md, section 2).
      logsumexp[row] = row_max;
      std::fill(out_row, out_row + Dv, T(0));
      if (weights_row) std::fill(weights_row, weights_row + S, T(0));
      continue;
    }
    A sum = 0;
    for (int64_t j = 0; j < visible; ++j) {
      score[j] = std::exp(score[j] - row_max);
      sum += score[j];
    }
    logsumexp[row] = row_max + std::log(sum);
    if (p.dropout_p > 0) {
      stream.fill_keep(uint64_t(row) * uint64_t(S), visible, reinterpret_cast<bool*>(keep.data()));
    }

    std::fill(acc.begin(), acc.end(), A(0));
    const T* value_bh = p.value + b * p.value_strides.batch + h * p.value_strides.head;
    const A inv_sum = A(1) / sum;
    for (int64_t j = 0; j < visible; ++j) {
      const A w = keep[j] ? score[j] * inv_sum * kept_scale : A(0);
      if (weights_row) weights_row[j] = static_cast<T>(w);
      if (w == A(0)) continue;
      const T* v_row = value_bh + j * p.value_strides.row;
      for (int64_t d = 0; d < Dv; ++d) acc[d] += w * static_cast<A>(v_row[d * p.value_strides.col]);
    }
    if (weights_row) std::fill(weights_row + visible, weights_row + S, T(0));
    for (int64_t d = 0; d < Dv; ++d) out_row[d] = static_cast<T>(acc[d]);
  }
}

// Pass 1 of the backward: for each query row, delta_i and dQ_i (and dScores when asked).
template <typename T>
void backward_query_rows(const AttentionBackwardParams<T>& p, acc_t<T>* delta,
                         int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  const int64_t S = p.kv_len, D = p.head_dim, Dv = p.value_dim;
  std::vector<A> prob(std::max<int64_t>(S, 1));
  std::vector<A> dprob(std::max<int64_t>(S, 1));
  std::vector<A> dq(std::max<int64_t>(D, 1));
  std::vector<char> keep(std::max<int64_t>(S, 1), 1);
  const DropoutStream stream(p.seed, p.offset, p.dropout_p);
  const A kept_scale = static_cast<A>(dropout_scale(p.dropout_p));
  const A scale = static_cast<A>(p.scale);
  const A* logsumexp = static_cast<const A*>(p.logsumexp);
  A* grad_scores = static_cast<A*>(p.grad_scores);

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t i = row % p.q_len, bh = row / p.q_len;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const int64_t visible = visible_keys(p, i);
    const A lse = logsumexp[row];
    T* dq_out = p.grad_query + row * D;
    A* dscore_row = grad_scores ? grad_scores + row * S : nullptr;
    if (lse == -std::numeric_limits<A>::infinity()) {
      // The row attended to nothing: it has no gradient.
      delta[row] = 0;
      std::fill(dq_out, dq_out + D, T(0));
      if (dscore_row) std::fill(dscore_row, dscore_row + S, A(0));
      continue;
    }
    row_scores(p, p.query, p.query_strides, p.key, p.key_strides, b, h, i, visible, prob.data());
    if (p.dropout_p > 0) {
      stream.fill_keep(uint64_t(row) * uint64_t(S), visible, reinterpret_cast<bool*>(keep.data()));
    }
    const T* do_row = p.grad_output + b * p.grad_output_strides.batch +
                      h * p.grad_output_strides.head + i * p.grad_output_strides.row;
    const T* gw_row = p.grad_weights ? p.grad_weights + b * p.grad_weights_strides.batch +
                                           h * p.grad_weights_strides.head +
                                           i * p.grad_weights_strides.row
                                     : nullptr;
    const T* value_bh = p.value + b * p.value_strides.batch + h * p.value_strides.head;
    A row_delta = 0;
    for (int64_t j = 0; j < visible; ++j) {
      prob[j] = std::exp(prob[j] - lse);
      A d_weight = dot<A>(do_row, p.grad_output_strides.col, value_bh + j * p.value_strides.row,
                          p.value_strides.col, Dv);
      if (gw_row) d_weight += static_cast<A>(gw_row[j * p.grad_weights_strides.col]);
      dprob[j] = keep[j] ? d_weight * kept_scale : A(0);
      row_delta += prob[j] * dprob[j];
    }
    delta[row] = row_delta;

    std::fill(dq.begin(), dq.end(), A(0));
    const T* key_bh = p.key + b * p.key_strides.batch + h * p.key_strides.head;
    for (int64_t j = 0; j < visible; ++j) {
      const A dscore = prob[j] * (dprob[j] - row_delta);
      if (dscore_row) dscore_row[j] = dscore;
      if (dscore == A(0)) continue;
      const T* k_row = key_bh + j * p.key_strides.row;
      for (int64_t d = 0; d < D; ++d) dq[d] += dscore * static_cast<A>(k_row[d * p.key_strides.col]);
    }
    if (dscore_row) std::fill(dscore_row + visible, dscore_row + S, A(0));
    for (int64_t d = 0; d < D; ++d) dq_out[d] = static_cast<T>(dq[d] * scale);
  }
}

// Pass 2 of the backward: for each key row j, dK_j and dV_j, summing over the query rows.
template <typename T>
void backward_key_rows(const AttentionBackwardParams<T>& p, const acc_t<T>* delta,
                       int64_t row_begin, int64_t row_end) {
  using A = acc_t<T>;
  const int64_t L = p.q_len, S = p.kv_len, D = p.head_dim, Dv = p.value_dim;
  std::vector<A> dk(std::max<int64_t>(D, 1));
  std::vector<A> dv(std::max<int64_t>(Dv, 1));
  const DropoutStream stream(p.seed, p.offset, p.dropout_p);
  const A kept_scale = static_cast<A>(dropout_scale(p.dropout_p));
  const A scale = static_cast<A>(p.scale);
  const A* logsumexp = static_cast<const A*>(p.logsumexp);

  for (int64_t key_row = row_begin; key_row < row_end; ++key_row) {
    const int64_t j = key_row % S, bh = key_row / S;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    std::fill(dk.begin(), dk.end(), A(0));
    std::fill(dv.begin(), dv.end(), A(0));
    const T* k_row = p.key + b * p.key_strides.batch + h * p.key_strides.head + j * p.key_strides.row;
    const T* v_row = p.value + b * p.value_strides.batch + h * p.value_strides.head +
                     j * p.value_strides.row;
    // Causal: only queries i >= j see key j.
    for (int64_t i = p.is_causal ? j : 0; i < L; ++i) {
      const int64_t row = bh * L + i;
      const A lse = logsumexp[row];
      if (lse == -std::numeric_limits<A>::infinity()) continue;
      const T* q_row = p.query + b * p.query_strides.batch + h * p.query_strides.head +
                       i * p.query_strides.row;
      A s = D == 0 ? A(0) : scale * dot<A>(q_row, p.query_strides.col, k_row, p.key_strides.col, D);
      const MaskRow<T> mask(p, b, h, i);
      if (!mask.empty()) s = mask.apply(j, s);
      const A prob = std::exp(s - lse);
      const bool kept = p.dropout_p == 0 || stream.keep(uint64_t(row) * uint64_t(S) + uint64_t(j));
      if (!kept) {
        // Dropped: no weight reaches the output, so dV gets nothing and dS = -p * delta.
        const A dscore = -prob * delta[row];
        if (dscore != A(0)) {
          for (int64_t d = 0; d < D; ++d) dk[d] += dscore * static_cast<A>(q_row[d * p.query_strides.col]);
        }
        continue;
      }
      const T* do_row = p.grad_output + b * p.grad_output_strides.batch +
                        h * p.grad_output_strides.head + i * p.grad_output_strides.row;
      const A weight = prob * kept_scale;
      A d_weight = dot<A>(do_row, p.grad_output_strides.col, v_row, p.value_strides.col, Dv);
      if (p.grad_weights) {
        d_weight += static_cast<A>(p.grad_weights[b * p.grad_weights_strides.batch +
                                                  h * p.grad_weights_strides.head +
                                                  i * p.grad_weights_strides.row +
                                                  j * p.grad_weights_strides.col]);
      }
      const A dscore = prob * (d_weight * kept_scale - delta[row]);
      for (int64_t d = 0; d < Dv; ++d) dv[d] += weight * static_cast<A>(do_row[d * p.grad_output_strides.col]);
      for (int64_t d = 0; d < D; ++d) dk[d] += dscore * static_cast<A>(q_row[d * p.query_strides.col]);
    }
    T* dk_out = p.grad_key + key_row * D;
    T* dv_out = p.grad_value + key_row * Dv;
    for (int64_t d = 0; d < D; ++d) dk_out[d] = static_cast<T>(dk[d] * scale);
    for (int64_t d = 0; d < Dv; ++d) dv_out[d] = static_cast<T>(dv[d]);
  }
}

// Rows per task: enough work (about 32k multiply-adds) to amortise the scheduling.
inline int64_t grain_for(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_row, 1));
}

}  // namespace

template <typename T>
void attention_forward_kernel(const AttentionForwardParams<T>& params) {
  const int64_t rows = params.batch * params.heads * params.q_len;
  const int64_t work = params.kv_len * (params.head_dim + params.value_dim);
  at::parallel_for(0, rows, grain_for(work), [&](int64_t begin, int64_t end) {
    forward_rows(params, begin, end);
  });
}

template <typename T>
void attention_backward_kernel(const AttentionBackwardParams<T>& params) {
  const int64_t BH = params.batch * params.heads;
  const int64_t work = (params.kv_len + params.q_len) * (params.head_dim + params.value_dim);
  std::vector<acc_t<T>> delta(std::max<int64_t>(BH * params.q_len, 1));
  at::parallel_for(0, BH * params.q_len, grain_for(work), [&](int64_t begin, int64_t end) {
    backward_query_rows(params, delta.data(), begin, end);
  });
  at::parallel_for(0, BH * params.kv_len, grain_for(work), [&](int64_t begin, int64_t end) {
    backward_key_rows(params, delta.data(), begin, end);
  });
}

void attention_dropout_mask_kernel(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                   uint64_t seed, uint64_t offset, double dropout_p, bool* keep) {
  const DropoutStream stream(seed, offset, dropout_p);
  const int64_t rows = batch * heads * q_len;
  at::parallel_for(0, rows, grain_for(kv_len), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      stream.fill_keep(uint64_t(row) * uint64_t(kv_len), kv_len, keep + row * kv_len);
    }
  });
}

#define QKV_INSTANTIATE(T)                                                        \
  template void attention_forward_kernel<T>(const AttentionForwardParams<T>&); \
  template void attention_backward_kernel<T>(const AttentionBackwardParams<T>&);
QKV_INSTANTIATE(double)
QKV_INSTANTIATE(float)
QKV_INSTANTIATE(c10::BFloat16)
QKV_INSTANTIATE(c10::Half)
#undef QKV_INSTANTIATE

// ---------------------------------------------------------------------------------------------
// Tensor glue: checks, allocation, the dropout seed, and the CPU registrations.
namespace {

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Fills the fields shared by forward and backward. The masks are read in place through the
// strides of their broadcast views (stride 0 in broadcast dimensions); nothing is expanded.
void fill_shape(AttentionShape& shape, const at::Tensor& query, const at::Tensor& key,
                const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                bool is_causal, std::optional<double> scale, const at::Tensor& rng_state) {
  shape.batch = query.size(0);
  shape.heads = query.size(1);
  shape.q_len = query.size(2);
  shape.head_dim = query.size(3);
  shape.kv_len = key.size(2);
  shape.value_dim = value.size(3);
  shape.scale = attention_scale(scale, shape.head_dim);
  shape.is_causal = is_causal;
  shape.dropout_p = dropout_p;
  const int64_t* rng = rng_state.data_ptr<int64_t>();
  shape.seed = static_cast<uint64_t>(rng[0]);
  shape.offset = static_cast<uint64_t>(rng[1]);
  const std::optional<at::Tensor> masks[AttentionShape::kMasks] = {
      attn_mask,
      // (B, S) -> (B, 1, 1, S)
      key_padding_mask.has_value() && key_padding_mask->defined()
          ? std::optional<at::Tensor>(key_padding_mask->unsqueeze(1).unsqueeze(1))
          : std::nullopt};
  for (int m = 0; m < AttentionShape::kMasks; ++m) {
    if (!masks[m].has_value() || !masks[m]->defined()) continue;
    const at::Tensor view =
        masks[m]->expand({shape.batch, shape.heads, shape.q_len, shape.kv_len});
    MaskOperand& operand = shape.masks[m];
    operand.kind = view.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    operand.data = view.const_data_ptr();
    operand.strides = strides_of(view);
  }
}

// A seed and an offset for the dropout stream, drawn from torch's default CPU generator so that
// torch.manual_seed reproduces a call. Nothing is drawn when there is no dropout.
at::Tensor draw_rng_state(double dropout_p) {
  at::Tensor state = at::zeros({2}, at::kLong);
  if (dropout_p > 0) {
    auto gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        std::nullopt, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state.data_ptr<int64_t>()[0] = static_cast<int64_t>(gen->random64());
    state.data_ptr<int64_t>()[1] = static_cast<int64_t>(gen->random64());
  }
  return state;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights) {
  check_attention_inputs("attention", query, key, value, attn_mask, key_padding_mask, dropout_p,
                         scale);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2);
  const int64_t S = key.size(2), Dv = value.size(3);
  at::Tensor output = at::empty({B, H, L, Dv}, query.options());
  at::Tensor logsumexp =
      at::empty({B, H, L}, query.options().dtype(at::toOpMathType(query.scalar_type())));
  at::Tensor weights = need_weights ? at::empty({B, H, L, S}, query.options())
                                    : at::empty({0}, query.options());
  at::Tensor rng_state = draw_rng_state(dropout_p);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(),
                                  "attention_forward", [&] {
    AttentionForwardParams<scalar_t> p;
    fill_shape(p, query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
               rng_state);
    p.query = query.const_data_ptr<scalar_t>();
    p.key = key.const_data_ptr<scalar_t>();
    p.value = value.const_data_ptr<scalar_t>();
    p.query_strides = strides_of(query);
    p.key_strides = strides_of(key);
    p.value_strides = strides_of(value);
    p.output = output.mutable_data_ptr<scalar_t>();
    p.logsumexp = logsumexp.mutable_data_ptr();
    p.weights = need_weights ? weights.mutable_data_ptr<scalar_t>() : nullptr;
    attention_forward_kernel(p);
  });
  return {output, logsumexp, weights, rng_state};
}

// The gradient of a float mask: d loss / d score summed over the dimensions it was broadcast in.
at::Tensor reduce_grad_scores(const at::Tensor& grad_scores, const at::Tensor& mask,
                              bool is_key_padding) {
  at::Tensor grad = is_key_padding ? grad_scores.sum({1, 2})  // (B, H, L, S) -> (B, S)
                                   : grad_scores.sum_to_size(mask.sizes());
  return grad.to(mask.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, const at::Tensor& rng_state,
    bool attn_mask_requires_grad, bool key_padding_mask_requires_grad) {
  check_attention_backward_inputs(grad_output, grad_weights, query, key, value, output, logsumexp,
                                  attn_mask, key_padding_mask, dropout_p, scale, rng_state);
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2);
  const int64_t S = key.size(2);
  at::Tensor grad_query = at::empty(query.sizes(), query.options());
  at::Tensor grad_key = at::empty(key.sizes(), key.options());
  at::Tensor grad_value = at::empty(value.sizes(), value.options());
  const bool has_grad_weights = grad_weights.has_value() && grad_weights->defined();
  const bool attn_mask_grad = attention_mask_gets_grad(attn_mask, attn_mask_requires_grad);
  const bool padding_mask_grad =
      attention_mask_gets_grad(key_padding_mask, key_padding_mask_requires_grad);
  // d loss / d score: the gradient of an additive mask before it is summed to the mask's shape.
  at::Tensor grad_scores = attn_mask_grad || padding_mask_grad
                               ? at::empty({B, H, L, S}, logsumexp.options())
                               : at::Tensor();
  const at::Tensor lse = logsumexp.contiguous();
  const at::Tensor rng = rng_state.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(),
                                  "attention_backward", [&] {
    AttentionBackwardParams<scalar_t> p;
    fill_shape(p, query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
               rng);
    p.query = query.const_data_ptr<scalar_t>();
    p.key = key.const_data_ptr<scalar_t>();
    p.value = value.const_data_ptr<scalar_t>();
    p.output = output.const_data_ptr<scalar_t>();
    p.grad_output = grad_output.const_data_ptr<scalar_t>();
    p.grad_weights = has_grad_weights ? grad_weights->const_data_ptr<scalar_t>() : nullptr;
    p.logsumexp = lse.const_data_ptr();
    p.query_strides = strides_of(query);
    p.key_strides = strides_of(key);
    p.value_strides = strides_of(value);
    p.output_strides = strides_of(output);
    p.grad_output_strides = strides_of(grad_output);
    if (has_grad_weights) p.grad_weights_strides = strides_of(*grad_weights);
    p.grad_query = grad_query.mutable_data_ptr<scalar_t>();
    p.grad_key = grad_key.mutable_data_ptr<scalar_t>();
    p.grad_value = grad_value.mutable_data_ptr<scalar_t>();
    p.grad_scores = grad_scores.defined() ? grad_scores.mutable_data_ptr() : nullptr;
    attention_backward_kernel(p);
  });
  return {grad_query, grad_key, grad_value,
          attn_mask_grad ? reduce_grad_scores(grad_scores, *attn_mask, false)
                         : at::empty({0}, query.options()),
          padding_mask_grad ? reduce_grad_scores(grad_scores, *key_padding_mask, true)
                            : at::empty({0}, query.options())};
}

at::Tensor attention_dropout_mask_cpu(const at::Tensor& rng_state, int64_t batch, int64_t heads,
                                      int64_t q_len, int64_t kv_len, double dropout_p) {
  check_dropout_mask_inputs(rng_state, batch, heads, q_len, kv_len, dropout_p);
  at::Tensor keep = at::empty({batch, heads, q_len, kv_len}, at::kBool);
  const at::Tensor rng = rng_state.contiguous();
  attention_dropout_mask_kernel(batch, heads, q_len, kv_len,
                                static_cast<uint64_t>(rng.data_ptr<int64_t>()[0]),
                                static_cast<uint64_t>(rng.data_ptr<int64_t>()[1]), dropout_p,
                                keep.data_ptr<bool>());
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("_attention_forward", TORCH_FN(attention_forward_cpu));
  m.impl("_attention_backward", TORCH_FN(attention_backward_cpu));
  m.impl("_attention_dropout_mask", TORCH_FN(attention_dropout_mask_cpu));
}

}  // namespace qkv_attention::cpu

// Plain LibTorch references of the three operators, written with ordinary differentiable ATen
// ops (matmul, softmax, masked_fill, linear) and none of torch's fused attention. The tests run
// them in float64 on the same input values as the op under test and take their gradients with
// autograd, so every comparison is against an independent, textbook computation.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace qkv_attention::testing::reference {

struct AttentionResult {
  at::Tensor output;   // (B, H, L, Dv)
  at::Tensor weights;  // (B, H, L, S), after dropout
};

// softmax(query keyᵀ · scale + masks) value, with the conventions of docs/design.md section 2:
// a bool mask is true where a query may attend, a float mask is added to the scores, masks
// broadcast to (B, H, L, S), key_padding_mask (B, S) applies to every head and query, causal is
// top-left aligned, and a query row with no key to attend to gives zero weights (so a zero
// output row and zero gradients). `keep` is the dropout keep-mask (B, H, L, S) or undefined.
inline AttentionResult attention(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value,
                                 const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                 bool is_causal = false, std::optional<double> scale = std::nullopt,
                                 const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                                 const at::Tensor& keep = at::Tensor(), double dropout_p = 0.0) {
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3);
  const int64_t S = key.size(2);
  const double scale_value =
      scale.has_value() ? *scale : (D > 0 ? 1.0 / std::sqrt(static_cast<double>(D)) : 1.0);
  const double minus_inf = -std::numeric_limits<double>::infinity();

  at::Tensor scores = at::matmul(query, key.transpose(-2, -1)) * scale_value;  // (B, H, L, S)
  at::Tensor allowed = at::ones({B, H, L, S}, query.options().dtype(at::kBool));
  auto apply = [&](const at::Tensor& mask) {  // broadcastable to (B, H, L, S)
    if (mask.scalar_type() == at::kBool) {
      allowed = allowed.logical_and(mask);
    } else {
      scores = scores + mask.to(scores.scalar_type());
    }
  };
  if (attn_mask.has_value() && attn_mask->defined()) apply(*attn_mask);
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    apply(key_padding_mask->view({B, 1, 1, S}));
  }
  if (is_causal) {
    allowed = allowed.logical_and(at::ones({L, S}, allowed.options()).tril());  // j <= i
  }
  scores = scores.masked_fill(allowed.logical_not(), minus_inf);

  // Rows that may attend to some key take the softmax; the others get zeros. at::where keeps
  // the masked rows' NaN out of both the values and the gradients.
  const at::Tensor attends = scores.gt(minus_inf).any(-1, /*keepdim=*/true);  // (B, H, L, 1)
  const at::Tensor probs = at::softmax(at::where(attends, scores, at::zeros_like(scores)), -1);
  at::Tensor weights = at::where(attends, probs, at::zeros_like(probs));
  if (keep.defined()) {
    const double kept_scale = dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0;
    weights = weights * keep.to(weights.scalar_type()) * kept_scale;
  }
  return {at::matmul(weights, value), weights};
}

// The attention variants of docs/design.md (sliding window, softcap, ALiBi, sinks), written from
// their definitions with plain differentiable ops:
//   raw = q k^T scale; score = cap(raw) - slope[b, h] |i + o - j| + additive masks, cap(x) =
//   softcap tanh(x / softcap); hidden (-inf): a false bool mask, j > i + o (causal), or j outside
//   [i + o - window_left, i + o + window_right] (-1: open side);
//   p = softmax over the row's scores and, with sinks, one more column holding sink[h] (dropped
//   after the softmax: it has no value); w = p keep / (1 - dropout_p); out = w v.
// A row with no visible key and no sink gives zeros. Key/value heads must already be repeated
// for grouped query heads.
struct VariantOptions {
  double scale = 1.0;
  bool causal = false;
  int64_t offset = 0;  // o, the causal alignment
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  at::Tensor alibi_slopes;   // (H,) or (B, H), or undefined
  at::Tensor sinks;          // (H,), or undefined
  at::Tensor bool_mask;      // broadcastable to (B, H, L, S), true = may attend, or undefined
  at::Tensor additive_mask;  // broadcastable to (B, H, L, S), or undefined
  at::Tensor keep;           // (B, H, L, S) dropout keep-mask, or undefined
  double dropout_p = 0.0;
};

struct VariantResult {
  at::Tensor output;     // (B, H, L, Dv)
  at::Tensor weights;    // (B, H, L, S), after dropout, without the sink column
  at::Tensor logsumexp;  // (B, H, L): log(exp(sink) + sum exp(score)); -inf for no key, no sink
};

inline VariantResult attention_variants(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value, const VariantOptions& o) {
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), S = key.size(2);
  const double minus_inf = -std::numeric_limits<double>::infinity();
  const auto opts = query.options();
  at::Tensor scores = at::matmul(query, key.transpose(-2, -1)) * o.scale;  // (B, H, L, S)
  if (o.softcap > 0) scores = at::tanh(scores / o.softcap) * o.softcap;
  // i + o - j, (L, S)
  const at::Tensor distance =
      at::arange(L, opts).view({L, 1}) + double(o.offset) - at::arange(S, opts).view({1, S});
  if (o.alibi_slopes.defined()) {
    const at::Tensor slopes = o.alibi_slopes.dim() == 1 ? o.alibi_slopes.view({1, H, 1, 1})
                                                        : o.alibi_slopes.view({B, H, 1, 1});
    scores = scores - slopes * distance.abs();
  }
  if (o.additive_mask.defined()) scores = scores + o.additive_mask;
  at::Tensor allowed = at::ones({B, H, L, S}, opts.dtype(at::kBool));
  if (o.bool_mask.defined()) allowed = allowed.logical_and(o.bool_mask);
  if (o.causal) allowed = allowed.logical_and(distance.ge(0));  // j <= i + o
  if (o.window_left >= 0) allowed = allowed.logical_and(distance.le(double(o.window_left)));
  if (o.window_right >= 0) allowed = allowed.logical_and(distance.ge(-double(o.window_right)));
  scores = scores.masked_fill(allowed.logical_not(), minus_inf);

  VariantResult result;
  at::Tensor weights;
  if (o.sinks.defined()) {
    // The sink as one more column of every row, (B, H, L, S + 1): never -inf unless the sink is.
    const at::Tensor sink_column = o.sinks.view({1, H, 1, 1}).expand({B, H, L, 1});
    const at::Tensor extended = at::cat({scores, sink_column}, -1);
    weights = at::softmax(extended, -1).slice(-1, 0, S);
    result.logsumexp = at::logsumexp(extended, -1);
  } else {
    const at::Tensor attends = scores.gt(minus_inf).any(-1, /*keepdim=*/true);  // (B, H, L, 1)
    const at::Tensor probs = at::softmax(at::where(attends, scores, at::zeros_like(scores)), -1);
    weights = at::where(attends, probs, at::zeros_like(probs));
    result.logsumexp = S > 0 ? at::logsumexp(scores, -1) : at::full({B, H, L}, minus_inf, opts);
  }
  if (o.keep.defined()) {
    const double kept_scale = o.dropout_p < 1.0 ? 1.0 / (1.0 - o.dropout_p) : 0.0;
    weights = weights * o.keep.to(weights.scalar_type()) * kept_scale;
  }
  result.output = at::matmul(weights, value);
  result.weights = weights;
  return result;
}

// query (B, L, Eq) -> (B, H, L, E/H): the projection, its E features split into H heads.
inline at::Tensor project_into_heads(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t num_heads) {
  const int64_t B = x.size(0), N = x.size(1), E = weight.size(0);
  return at::linear(x, weight, bias)           // (B, N, E)
      .view({B, N, num_heads, E / num_heads})  // (B, N, H, E/H)
      .transpose(1, 2);                        // (B, H, N, E/H)
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias, int64_t num_heads) {
  return {project_into_heads(query, q_weight, q_bias, num_heads),
          project_into_heads(key, k_weight, k_bias, num_heads),
          project_into_heads(value, v_weight, v_bias, num_heads)};
}

// x (B, H, L, D) -> (B, L, H*D) with head h in features h*D .. h*D + D - 1, then out_proj.
inline at::Tensor merge_heads(const at::Tensor& x, const at::Tensor& out_weight,
                              const std::optional<at::Tensor>& out_bias) {
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  const at::Tensor concatenated = x.transpose(1, 2).reshape({B, L, H * D});  // (B, L, H*D)
  return at::linear(concatenated, out_weight, out_bias);                     // (B, L, Eout)
}

}  // namespace qkv_attention::testing::reference

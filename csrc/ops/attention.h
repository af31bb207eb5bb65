// attention: softmax(query keyᵀ · scale + mask) value, with dropout on the weights.
//
//   query (B, H, L, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv) -> (B, H, L, Dv)
//
// Grouped-query attention: Hkv divides H, and query head h reads key/value head h / (H / Hkv).
// attn_mask is broadcastable to (B, H, L, S): bool (true = may attend) or the query's float
// dtype (added to the scores). key_padding_mask (B, S) is a second mask with the same
// conventions, applied to every head and query: it lets MultiheadAttention pass both of its
// masks without merging them into an (B, H, L, S) tensor. is_causal lets query i see keys 0..i
// (top-left aligned). scale defaults to 1/sqrt(D). A query row that may attend to no key gives
// zeros. The variants (every op of the family takes them, ops/attention_problem.h
// AttentionVariants): window_size (left, right) keeps query i to keys i - left .. i + right
// (-1: that side open); softcap > 0 caps the scaled scores at softcap * tanh(score / softcap);
// alibi_slopes ((H,) or (B, H)) adds -slope * |i - j|; sinks ((H,)) adds one logit per head to
// every row's softmax denominator, with no value (the returned weights exclude it).
//
// The entry points below call the registered operators through the dispatcher, so they get
// autograd, the Meta kernels and whatever backend the tensors live on.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "ops/attention_problem.h"

namespace qkv_attention {

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& attn_mask = std::nullopt,
                     double dropout_p = 0.0, bool is_causal = false,
                     std::optional<double> scale = std::nullopt,
                     const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
                     at::IntArrayRef window_size = {-1, -1}, double softcap = 0.0,
                     const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                     const std::optional<at::Tensor>& sinks = std::nullopt);

// The output and the attention weights (B, H, L, S) after dropout: the weights that produced
// the output, differentiable like it. With average_attn_weights, their mean over the heads,
// (B, L, S), computed without a per-head (B, H, L, S) tensor.
std::tuple<at::Tensor, at::Tensor> attention_with_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask = std::nullopt, double dropout_p = 0.0,
    bool is_causal = false, std::optional<double> scale = std::nullopt,
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
    bool average_attn_weights = false, at::IntArrayRef window_size = {-1, -1}, double softcap = 0.0,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// The forward behind both: (output, logsumexp (B, H, L) in the accumulation dtype, weights or
// an empty tensor). A pure function of its inputs: the dropout mask is the one of rng_state,
// (2,) int64 = the dropout stream's seed and offset (draw_dropout_rng_state), which must be
// given when dropout_p > 0. When the output is empty (Dv = 0) and no weights are asked for,
// nothing is computed: the logsumexp is then -inf (no gradient flows through an empty output).
// average_attn_weights (with need_weights): the weights are averaged over the heads, (B, L, S).
std::tuple<at::Tensor, at::Tensor, at::Tensor> _attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights,
    const std::optional<at::Tensor>& rng_state, bool average_attn_weights = false,
    at::IntArrayRef window_size = {-1, -1}, double softcap = 0.0,
    const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// (grad_query, grad_key, grad_value, grad_attn_mask, grad_key_padding_mask, grad_sinks); a
// mask's gradient has the mask's shape when it is asked for and the mask is additive, and is
// empty otherwise; grad_sinks has the shape and dtype of sinks when they are given, and is
// empty otherwise.
using AttentionGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
AttentionGrads _attention_backward(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_requires_grad,
    bool key_padding_mask_requires_grad, at::IntArrayRef window_size = {-1, -1},
    double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// The same calls from a problem (ops/attention_signatures.h): _attention_forward of a dense
// problem (need_weights and average_weights from it), _attention_backward of a backward call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_call(
    const AttentionProblem& problem);
AttentionGrads attention_backward_call(const AttentionBackwardCall& call);

// The dropout keep-mask (B, H, L, S), bool, of the stream rng_state names.
at::Tensor _attention_dropout_mask(const at::Tensor& rng_state, c10::SymInt batch,
                                   c10::SymInt heads, c10::SymInt q_len, c10::SymInt kv_len,
                                   double dropout_p);

// ---- shared by the kernels of every dispatch key ----

// The dropout stream's state for one call: (2,) int64 (seed, offset) drawn with at::randint
// from torch's default CPU generator (so torch.manual_seed reproduces a call), or nothing when
// dropout_p is 0 (no random number is drawn). The composite ops call it; Python code that
// calls _attention_forward itself draws the same way (qkv_attention.ops).
std::optional<at::Tensor> draw_dropout_rng_state(double dropout_p);

// Whether _attention_backward returns a gradient for a mask.
bool attention_mask_gets_grad(const std::optional<at::Tensor>& mask, bool requires_grad);

// The empty tensor that stands for a gradient that is not returned.
at::Tensor no_gradient(const at::Tensor& like);

void check_dropout_mask_inputs(const at::Tensor& rng_state, const c10::SymInt& batch,
                               const c10::SymInt& heads, const c10::SymInt& q_len,
                               const c10::SymInt& kv_len, double dropout_p);

}  // namespace qkv_attention

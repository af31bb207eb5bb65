// The attention family's operator signatures, each written once for the kernels of every
// dispatch key. A kernel of the family (CPU, Meta, Autograd, AutocastCPU, the composites) is a
// function of the call's problem (ops/attention_problem.h); the templates below (named <op>_op)
// take an operator's arguments in schema order, build its problem once, and call that function:
//
//   m.impl("_attention_forward", TORCH_FN(attention_forward_op<&attention_forward_cpu>));
//
// A new argument of an operator is added to its schema, its typed entry point (ops/<op>.h) and
// here; the kernels read it from the problem.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

#include "ops/attention.h"
#include "ops/attention_problem.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention {

// The four trailing arguments every operator of the family takes, in its schema (ops/<op>.cpp)
// and as the problem's variants.
#define QKV_VARIANT_ARGUMENTS \
  "int[2] window_size=[-1, -1], float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sinks=None"

inline AttentionVariants variants_of(at::IntArrayRef window_size, double softcap,
                                     const std::optional<at::Tensor>& alibi_slopes,
                                     const std::optional<at::Tensor>& sinks) {
  return AttentionVariants{window_size.vec(), softcap, optional_if_given(alibi_slopes),
                           optional_if_given(sinks)};
}

// output, logsumexp, weights (empty unless asked for).
using AttentionForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// output, logsumexp of a packed batch.
using VarlenForwardOutputs = std::tuple<at::Tensor, at::Tensor>;
// grad_query, grad_key, grad_value, grad_sinks (empty without sinks) of a packed batch.
using VarlenGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// attention: the composite's problem (no rng_state yet: the composite draws it).
template <at::Tensor (*Body)(AttentionProblem)>
at::Tensor attention_op(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const std::optional<at::Tensor>& attn_mask, double dropout_p,
                        bool is_causal, std::optional<double> scale,
                        const std::optional<at::Tensor>& key_padding_mask,
                        at::IntArrayRef window_size, double softcap,
                        const std::optional<at::Tensor>& alibi_slopes,
                        const std::optional<at::Tensor>& sinks) {
  return Body(dense_problem(op_label("_attention_forward"), query, key, value, attn_mask,
                            key_padding_mask, dropout_p, is_causal, scale, std::nullopt,
                            variants_of(window_size, softcap, alibi_slopes, sinks),
                            /*rng_state_required=*/false, /*scores_materialised=*/false));
}

// attention_with_weights: as attention, with the weights (or their mean over the heads).
template <std::tuple<at::Tensor, at::Tensor> (*Body)(AttentionProblem)>
std::tuple<at::Tensor, at::Tensor> attention_with_weights_op(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, const std::optional<at::Tensor>& key_padding_mask,
    bool average_attn_weights, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  AttentionProblem problem = dense_problem(
      op_label("_attention_forward"), query, key, value, attn_mask, key_padding_mask, dropout_p,
      is_causal, scale, std::nullopt, variants_of(window_size, softcap, alibi_slopes, sinks),
      /*rng_state_required=*/false, /*scores_materialised=*/true);
  problem.need_weights = true;
  problem.average_weights = average_attn_weights;
  return Body(std::move(problem));
}

template <AttentionForwardOutputs (*Body)(AttentionProblem)>
AttentionForwardOutputs attention_forward_op(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights,
    const std::optional<at::Tensor>& rng_state, bool average_attn_weights,
    at::IntArrayRef window_size, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& sinks) {
  AttentionProblem problem = dense_problem(
      op_label("_attention_forward"), query, key, value, attn_mask, key_padding_mask, dropout_p,
      is_causal, scale, rng_state, variants_of(window_size, softcap, alibi_slopes, sinks),
      /*rng_state_required=*/true, /*scores_materialised=*/need_weights);
  problem.need_weights = need_weights;
  problem.average_weights = need_weights && average_attn_weights;
  return Body(std::move(problem));
}

template <AttentionGrads (*Body)(AttentionBackwardCall)>
AttentionGrads attention_backward_op(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_requires_grad,
    bool key_padding_mask_requires_grad, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  const bool scores_materialised =
      given(grad_weights) || attention_mask_gets_grad(attn_mask, attn_mask_requires_grad) ||
      attention_mask_gets_grad(key_padding_mask, key_padding_mask_requires_grad);
  return Body(AttentionBackwardCall{
      dense_problem(op_label("_attention_backward"), query, key, value, attn_mask, key_padding_mask,
                    dropout_p, is_causal, scale, rng_state,
                    variants_of(window_size, softcap, alibi_slopes, sinks),
                    /*rng_state_required=*/true, scores_materialised),
      grad_output, output, logsumexp, optional_if_given(grad_weights), attn_mask_requires_grad,
      key_padding_mask_requires_grad});
}

// attention_varlen: the composite's problem (no rng_state yet).
template <at::Tensor (*Body)(AttentionProblem)>
at::Tensor attention_varlen_op(const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                               const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
                               c10::SymInt max_seqlen_k, double dropout_p, bool is_causal,
                               std::optional<double> scale, at::IntArrayRef window_size,
                               double softcap, const std::optional<at::Tensor>& alibi_slopes,
                               const std::optional<at::Tensor>& sinks) {
  return Body(packed_problem(op_label("_attention_varlen_forward"), query, key, value, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
                             std::nullopt, variants_of(window_size, softcap, alibi_slopes, sinks),
                             /*rng_state_required=*/false));
}

template <VarlenForwardOutputs (*Body)(AttentionProblem)>
VarlenForwardOutputs attention_varlen_forward_op(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  return Body(packed_problem(op_label("_attention_varlen_forward"), query, key, value, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
                             rng_state, variants_of(window_size, softcap, alibi_slopes, sinks),
                             /*rng_state_required=*/true));
}

template <VarlenGrads (*Body)(AttentionBackwardCall)>
VarlenGrads attention_varlen_backward_op(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks) {
  return Body(AttentionBackwardCall{
      packed_problem(op_label("_attention_varlen_backward"), query, key, value, cu_seqlens_q,
                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
                     rng_state, variants_of(window_size, softcap, alibi_slopes, sinks),
                     /*rng_state_required=*/true),
      grad_output, output, logsumexp});
}

template <at::Tensor (*Body)(AttentionProblem)>
at::Tensor attention_with_kv_cache_op(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& key, const std::optional<at::Tensor>& value,
    const std::optional<at::Tensor>& cache_seqlens, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, std::optional<double> scale, at::IntArrayRef window_size, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& k_cache_scale,
    const std::optional<at::Tensor>& v_cache_scale) {
  return Body(cache_problem(op_label("attention_with_kv_cache"), query, k_cache, v_cache, key,
                            value, cache_seqlens, attn_mask, is_causal, scale,
                            variants_of(window_size, softcap, alibi_slopes, sinks), k_cache_scale,
                            v_cache_scale));
}

}  // namespace qkv_attention

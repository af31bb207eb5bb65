// attention_varlen: attention over a batch of sequences of different lengths, packed back to
// back without padding (the layout of a jagged nested tensor's values(), and of
// flash-attention's varlen functions).
//
//   query (total_q, H, D), key (total_k, Hkv, D), value (total_k, Hkv, Dv) -> (total_q, H, Dv)
//
// cu_seqlens_q and cu_seqlens_k ((B + 1,), int32 or int64, on the CPU) are the offsets of the
// B sequences: sequence b holds query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] and key/value
// rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1]. They start at 0, never decrease and end at
// total_q (total_k). max_seqlen_q / max_seqlen_k bound the lengths (a longer sequence is an
// error). Each sequence attends only to its own keys; is_causal lets query i of a sequence
// see its keys 0..i (top-left aligned, as the dense op). A query of a sequence without keys
// gives a row of zeros (the dense op's fully masked row). Grouped-query attention as the dense
// op: query head h reads key/value head h / (H / Hkv).
//
// Dropout: sequence b draws its mask from the dense op's stream of (seed, offset + b) as a
// (1, H, L_b, S_b) call would (rng_state = (seed, offset)), so every sequence has a part of the
// stream of its own and the backward regenerates the same masks.
//
// The variants (ops/attention.h) apply per sequence, aligned as is_causal (o = 0); (B, H)
// alibi_slopes give sequence b row b.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <tuple>

#include "ops/attention_problem.h"

namespace qkv_attention {

at::Tensor attention_varlen(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                            c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k,
                            double dropout_p = 0.0, bool is_causal = false,
                            std::optional<double> scale = std::nullopt,
                            at::IntArrayRef window_size = {-1, -1}, double softcap = 0.0,
                            const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                            const std::optional<at::Tensor>& sinks = std::nullopt);

// (output (total_q, H, Dv), logsumexp (total_q, H) in the accumulation dtype, -inf for a row
// without keys). A pure function of its inputs: rng_state as _attention_forward's.
std::tuple<at::Tensor, at::Tensor> _attention_varlen_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, at::IntArrayRef window_size = {-1, -1},
    double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// (grad_query, grad_key, grad_value, grad_sinks: sinks' shape and dtype, or empty without them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> _attention_varlen_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, at::IntArrayRef window_size = {-1, -1},
    double softcap = 0.0, const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
    const std::optional<at::Tensor>& sinks = std::nullopt);

// The same calls from a packed problem and a backward call (ops/attention_signatures.h).
std::tuple<at::Tensor, at::Tensor> attention_varlen_forward_call(const AttentionProblem& problem);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_call(
    const AttentionBackwardCall& call);

}  // namespace qkv_attention

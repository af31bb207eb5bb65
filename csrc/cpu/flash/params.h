// set_params: the one place where an attention problem (ops/attention_problem.h) becomes the
// kernels' parameter struct (cpu/attention_kernel.h): sizes, strides, masks read in place
// through their broadcast strides, the dropout stream and the data pointers. The problem must
// already have passed check_attention_problem.
//
// A dense problem is one call over its whole batch (sequence = nullptr). A packed batch
// (attention_varlen) or a cache (attention_with_kv_cache) is one call per sequence
// (attention_sequences), each a batch of one read in place from the packed tensors or from the
// cache's valid prefix through their strides, with that sequence's causal alignment and
// dropout stream.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

#include "cpu/attention_kernel.h"
#include "ops/attention_problem.h"

namespace qkv_attention::cpu::flash {

// alibi_slopes and sinks as the kernels read them: contiguous, in the accumulation dtype
// (AccType of the inputs' dtype). The CPU kernels call it on a checked problem before set_params.
// Returns the sinks' dtype as given (that of their gradient), or nothing without sinks.
std::optional<at::ScalarType> convert_variant_tensors(AttentionProblem& problem);

// The seed and offset in rng_state ((2,) int64 on the CPU, any stride).
std::pair<uint64_t, uint64_t> seed_and_offset(const at::Tensor& rng_state);

// Outputs: (B, H, L, Dv) and (B, H, L) contiguous for a dense problem; a sequence's
// (1, H, L_b, Dv) and (1, H, L_b) head-major blocks otherwise. weights (dense only): (B, H, L, S)
// contiguous, or (B, L, S) with average_weights, or null when not requested.
template <typename T>
AttentionForwardParams<T> set_forward_params(const AttentionProblem& problem,
                                             const SequenceSpan* sequence, T* output,
                                             AccType<T>* logsumexp, T* weights = nullptr,
                                             bool average_weights = false);

// The dense forward writing into tensors.
template <typename T>
AttentionForwardParams<T> set_forward_params(const AttentionProblem& problem,
                                             const at::Tensor& output, const at::Tensor& logsumexp,
                                             const at::Tensor* weights,
                                             bool average_weights = false);

// output and grad_output are the op's tensors (dense (B, H, L, Dv); packed (total_q, H, Dv),
// read in place at the sequence's rows). logsumexp and the gradients are contiguous blocks of
// the problem (dense) or of the sequence (head-major). grad_scores: d loss / d score
// (B, H, L, S) contiguous, or null unless a mask needs a gradient.
template <typename T>
AttentionBackwardParams<T> set_backward_params(const AttentionProblem& problem,
                                               const SequenceSpan* sequence,
                                               const at::Tensor& output,
                                               const at::Tensor& grad_output,
                                               const std::optional<at::Tensor>& grad_weights,
                                               const AccType<T>* logsumexp, T* grad_query,
                                               T* grad_key, T* grad_value, AccType<T>* grad_scores);

// The dense backward writing into tensors.
template <typename T>
AttentionBackwardParams<T> set_backward_params(
    const AttentionProblem& problem, const at::Tensor& output, const at::Tensor& grad_output,
    const std::optional<at::Tensor>& grad_weights, const at::Tensor& logsumexp,
    const at::Tensor& grad_query, const at::Tensor& grad_key, const at::Tensor& grad_value,
    const at::Tensor* grad_scores);

}  // namespace qkv_attention::cpu::flash

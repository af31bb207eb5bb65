// attention_varlen's CPU dispatch-key kernels: the call as a packed problem
// (ops/attention_problem.h), checked, its sequences read; allocation; and per sequence one call
// of the blocked kernels (cpu/attention_kernel.h) as a batch of one, reading the packed tensors
// in place (cpu/flash/params.h). No padding: the work is the sum over sequences of
// heads x queries x keys. The sequences are shared among the threads by
// cpu/sequence_schedule.h.
//
// The kernels write their outputs head-major, (1, heads, rows, features) per sequence; each
// sequence's task then moves its rows into the packed (total, heads, features) result while
// they are still in cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash/params.h"
#include "cpu/large_buffer.h"
#include "cpu/large_tensor.h"
#include "cpu/sequence_schedule.h"
#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/operators.h"

namespace qkv_attention::cpu {
namespace {

// Head-major (heads, rows, features) -> rows of a packed (total, heads, features) tensor,
// starting at `packed` (contiguous).
template <typename T>
void heads_to_packed(const T* head_major, int64_t heads, int64_t rows, int64_t features,
                     T* packed) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const T* src = head_major + (h * rows + r) * features;
      std::copy(src, src + features, packed + (r * heads + h) * features);
    }
  }
}

std::vector<int64_t> sequence_work(const std::vector<SequenceSpan>& sequences, int64_t heads) {
  std::vector<int64_t> work(sequences.size());
  for (size_t b = 0; b < sequences.size(); ++b) {
    // Queries x keys per head, plus the rows themselves (a sequence without keys still writes
    // its zero rows); 0 only for a sequence with nothing to do.
    const int64_t q = sequences[b].q_len, k = sequences[b].k_len;
    work[b] = q == 0 ? 0 : heads * (q * std::max<int64_t>(k, 1) + k);
  }
  return work;
}

VarlenForwardOutputs attention_varlen_forward_cpu(AttentionProblem problem) {
  check_attention_problem(problem);
  flash::convert_variant_tensors(problem);
  const at::Tensor &query = problem.query, &value = problem.value;
  const int64_t total_q = query.size(0), H = query.size(1), Dv = value.size(2);
  const std::vector<SequenceSpan> sequences = attention_sequences(problem);
  const at::ScalarType acc = at::toOpMathType(query.scalar_type());
  at::Tensor output = empty_output({total_q, H, Dv}, query.options());
  at::Tensor logsumexp = at::empty({total_q, H}, query.options().dtype(acc));
  if (output.numel() == 0) {
    // Nothing to compute (no query row, no head, or Dv = 0): only the backward reads the
    // logsumexp, and the gradient of an empty output is zero without it.
    logsumexp.fill_(-std::numeric_limits<double>::infinity());
    return {output, logsumexp};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_varlen_forward", [&] {
        using Acc = AccType<scalar_t>;
        // The kernels' head-major outputs, sequence b's (H, L_b, ...) block at row q_begin(b).
        LargeBuffer<scalar_t> head_major_output(size_t(total_q * H * Dv));
        LargeBuffer<Acc> head_major_lse(size_t(total_q * H));
        scalar_t* out = output.mutable_data_ptr<scalar_t>();
        Acc* lse = logsumexp.mutable_data_ptr<Acc>();
        run_sequences(sequence_work(sequences, H), [&](int64_t b) {
          const SequenceSpan& sequence = sequences[size_t(b)];
          const int64_t q0 = sequence.q_begin, L = sequence.q_len;
          scalar_t* seq_out = head_major_output.data() + q0 * H * Dv;
          Acc* seq_lse = head_major_lse.data() + q0 * H;
          attention_forward_kernel(
              flash::set_forward_params<scalar_t>(problem, &sequence, seq_out, seq_lse));
          heads_to_packed(seq_out, H, L, Dv, out + q0 * H * Dv);
          heads_to_packed(seq_lse, H, L, int64_t(1), lse + q0 * H);
        });
      });
  return {output, logsumexp};
}

VarlenGrads attention_varlen_backward_cpu(AttentionBackwardCall call) {
  check_attention_backward(call);
  AttentionProblem& problem = call.problem;
  // The gradient of sinks has their dtype; the kernels compute it in the accumulation dtype.
  const std::optional<at::ScalarType> sinks_dtype = flash::convert_variant_tensors(problem);
  const at::Tensor &query = problem.query, &key = problem.key, &value = problem.value;
  const at::Tensor &output = call.output, &grad_output = call.grad_output;
  const int64_t total_q = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t total_k = key.size(0), Hkv = key.size(1), Dv = value.size(2);
  const std::vector<SequenceSpan> sequences = attention_sequences(problem);
  const at::TensorOptions acc_options =
      query.options().dtype(at::toOpMathType(query.scalar_type()));
  if (output.numel() == 0) {
    // An empty output: nothing depends on anything, every gradient is zero.
    return {at::zeros(query.sizes(), query.options()), at::zeros(key.sizes(), key.options()),
            at::zeros(value.sizes(), value.options()),
            sinks_dtype ? at::zeros({H}, query.options().dtype(*sinks_dtype))
                        : at::empty({0}, query.options())};
  }
  // Each sequence's d loss / d sinks (B, H), summed over the sequences in order afterwards, so
  // that the sum does not depend on which thread ran which sequence.
  at::Tensor sequence_grad_sinks =
      sinks_dtype ? at::zeros({int64_t(sequences.size()), H}, acc_options) : at::Tensor();
  at::Tensor grad_sinks = sinks_dtype ? at::zeros({H}, acc_options) : at::Tensor();
  at::Tensor grad_query = empty_output(query.sizes(), query.options());
  // Key rows of a sequence without queries get no gradient from its (absent) task.
  at::Tensor grad_key = at::zeros(key.sizes(), key.options());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options());
  const at::Tensor lse_packed = call.logsumexp.contiguous();  // (total_q, H)

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_varlen_backward", [&] {
        using Acc = AccType<scalar_t>;
        // Head-major buffers, sequence b's blocks at its first query / key row.
        LargeBuffer<Acc> head_major_lse(size_t(total_q * H));
        LargeBuffer<scalar_t> head_major_dq(size_t(total_q * H * D));
        LargeBuffer<scalar_t> head_major_dk(size_t(total_k * Hkv * D));
        LargeBuffer<scalar_t> head_major_dv(size_t(total_k * Hkv * Dv));
        const Acc* lse_in = lse_packed.const_data_ptr<Acc>();
        scalar_t* dq_out = grad_query.mutable_data_ptr<scalar_t>();
        scalar_t* dk_out = grad_key.mutable_data_ptr<scalar_t>();
        scalar_t* dv_out = grad_value.mutable_data_ptr<scalar_t>();
        // Query rows of a sequence without work (no queries) do not exist; every query row
        // belongs to a sequence with work, which writes its grad_query rows.
        run_sequences(sequence_work(sequences, H), [&](int64_t b) {
          const SequenceSpan& sequence = sequences[size_t(b)];
          const int64_t q0 = sequence.q_begin, L = sequence.q_len;
          const int64_t k0 = sequence.k_begin, S = sequence.k_len;
          Acc* seq_lse = head_major_lse.data() + q0 * H;
          for (int64_t i = 0; i < L; ++i) {  // (L, H) -> (H, L)
            for (int64_t h = 0; h < H; ++h) seq_lse[h * L + i] = lse_in[(q0 + i) * H + h];
          }
          scalar_t* seq_dq = head_major_dq.data() + q0 * H * D;
          scalar_t* seq_dk = head_major_dk.data() + k0 * Hkv * D;
          scalar_t* seq_dv = head_major_dv.data() + k0 * Hkv * Dv;
          auto params = flash::set_backward_params<scalar_t>(problem, &sequence, output,
                                                             grad_output, std::nullopt, seq_lse,
                                                             seq_dq, seq_dk, seq_dv, nullptr);
          if (sequence_grad_sinks.defined()) {
            params.grad_sinks = sequence_grad_sinks.mutable_data_ptr<Acc>() + b * H;
          }
          attention_backward_kernel(params);
          heads_to_packed(seq_dq, H, L, D, dq_out + q0 * H * D);
          heads_to_packed(seq_dk, Hkv, S, D, dk_out + k0 * Hkv * D);
          heads_to_packed(seq_dv, Hkv, S, Dv, dv_out + k0 * Hkv * Dv);
        });
        if (grad_sinks.defined()) {
          const Acc* per_sequence = sequence_grad_sinks.const_data_ptr<Acc>();
          Acc* total = grad_sinks.mutable_data_ptr<Acc>();
          for (size_t b = 0; b < sequences.size(); ++b) {
            for (int64_t h = 0; h < H; ++h) total[h] += per_sequence[int64_t(b) * H + h];
          }
        }
      });
  return {grad_query, grad_key, grad_value,
          sinks_dtype ? grad_sinks.to(*sinks_dtype) : at::empty({0}, query.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("_attention_varlen_forward",
         TORCH_FN(attention_varlen_forward_op<&attention_varlen_forward_cpu>));
  m.impl("_attention_varlen_backward",
         TORCH_FN(attention_varlen_backward_op<&attention_varlen_backward_cpu>));
}

}  // namespace qkv_attention::cpu

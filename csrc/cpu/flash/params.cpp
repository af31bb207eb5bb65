// cpu/flash/params.h.
#include "cpu/flash/params.h"

#include <ATen/ATen.h>

#include <tuple>

#include "ops/attention.h"

namespace qkv_attention::cpu::flash {
namespace {

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
void set_inputs(AttentionInputs<T>& p, const AttentionArguments& args) {
  p.batch = args.query.size(0);
  p.heads = args.query.size(1);
  p.q_len = args.query.size(2);
  p.head_dim = args.query.size(3);
  p.kv_heads = args.key.size(1);
  p.kv_len = args.key.size(2);
  p.value_dim = args.value.size(3);
  p.scale = attention_scale(args.scale, p.head_dim);
  p.is_causal = args.is_causal;
  p.dropout_p = args.dropout_p;
  if (args.rng_state.has_value() && args.rng_state->defined()) {
    std::tie(p.seed, p.offset) = seed_and_offset(*args.rng_state);
  }
  const std::optional<at::Tensor> masks[AttentionInputs<T>::kMasks] = {
      args.attn_mask,
      // (B, S) -> (B, 1, 1, S)
      args.key_padding_mask.has_value() && args.key_padding_mask->defined()
          ? std::optional<at::Tensor>(args.key_padding_mask->unsqueeze(1).unsqueeze(1))
          : std::nullopt};
  for (int m = 0; m < AttentionInputs<T>::kMasks; ++m) {
    if (!masks[m].has_value() || !masks[m]->defined()) continue;
    // A view with stride 0 in the broadcast dimensions; nothing is expanded in memory.
    const at::Tensor view = masks[m]->expand({p.batch, p.heads, p.q_len, p.kv_len});
    MaskOperand<T>& operand = p.masks[m];
    operand.strides = strides_of(view);
    if (view.scalar_type() == at::kBool) {
      operand.kind = MaskKind::kBool;
      operand.bool_data = view.const_data_ptr<bool>();
    } else {
      operand.kind = MaskKind::kAdditive;
      operand.additive_data = view.const_data_ptr<T>();
    }
  }
  p.query = args.query.const_data_ptr<T>();
  p.key = args.key.const_data_ptr<T>();
  p.value = args.value.const_data_ptr<T>();
  p.query_strides = strides_of(args.query);
  p.key_strides = strides_of(args.key);
  p.value_strides = strides_of(args.value);
}

// Rows first .. of a packed (total, heads, features) tensor as a (1, heads, rows, features)
// operand: the packed row stride becomes the row stride, the head stride stays.
Strides4 packed_strides(const at::Tensor& t) {
  return Strides4{0, t.stride(1), t.stride(0), t.stride(2)};
}

template <typename T>
void set_sequence_inputs(AttentionInputs<T>& p, const PackedArguments& args,
                         const PackedSequence& sequence) {
  p.batch = 1;
  p.heads = args.query.size(1);
  p.q_len = sequence.q_len;
  p.head_dim = args.query.size(2);
  p.kv_heads = args.key.size(1);
  p.kv_len = sequence.k_len;
  p.value_dim = args.value.size(2);
  p.scale = attention_scale(args.scale, p.head_dim);
  p.is_causal = args.is_causal;
  p.dropout_p = args.dropout_p;
  p.seed = args.seed;
  p.offset = args.offset + uint64_t(sequence.index);  // wraps as the stream's counter does
  p.query_strides = packed_strides(args.query);
  p.key_strides = packed_strides(args.key);
  p.value_strides = packed_strides(args.value);
  p.query = args.query.const_data_ptr<T>() + sequence.q_begin * p.query_strides.row;
  p.key = args.key.const_data_ptr<T>() + sequence.k_begin * p.key_strides.row;
  p.value = args.value.const_data_ptr<T>() + sequence.k_begin * p.value_strides.row;
}

}  // namespace

std::pair<uint64_t, uint64_t> seed_and_offset(const at::Tensor& rng_state) {
  const int64_t* rng = rng_state.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(rng[0]), static_cast<uint64_t>(rng[rng_state.stride(0)])};
}

template <typename T>
AttentionForwardParams<T> set_forward_params(const AttentionArguments& args,
                                             const at::Tensor& output, const at::Tensor& logsumexp,
                                             const at::Tensor* weights, bool average_weights) {
  AttentionForwardParams<T> p;
  set_inputs(p, args);
  p.output = output.mutable_data_ptr<T>();
  p.logsumexp = logsumexp.mutable_data_ptr<AccType<T>>();
  p.weights = weights != nullptr ? weights->mutable_data_ptr<T>() : nullptr;
  p.average_weights = weights != nullptr && average_weights;
  return p;
}

template <typename T>
AttentionBackwardParams<T> set_backward_params(
    const AttentionArguments& args, const at::Tensor& output, const at::Tensor& grad_output,
    const std::optional<at::Tensor>& grad_weights, const at::Tensor& logsumexp,
    const at::Tensor& grad_query, const at::Tensor& grad_key, const at::Tensor& grad_value,
    const at::Tensor* grad_scores) {
  AttentionBackwardParams<T> p;
  set_inputs(p, args);
  p.output = output.const_data_ptr<T>();
  p.grad_output = grad_output.const_data_ptr<T>();
  p.output_strides = strides_of(output);
  p.grad_output_strides = strides_of(grad_output);
  if (grad_weights.has_value() && grad_weights->defined()) {
    p.grad_weights = grad_weights->const_data_ptr<T>();
    p.grad_weights_strides = strides_of(*grad_weights);
  }
  p.logsumexp = logsumexp.const_data_ptr<AccType<T>>();
  p.grad_query = grad_query.mutable_data_ptr<T>();
  p.grad_key = grad_key.mutable_data_ptr<T>();
  p.grad_value = grad_value.mutable_data_ptr<T>();
  p.grad_scores = grad_scores != nullptr ? grad_scores->mutable_data_ptr<AccType<T>>() : nullptr;
  return p;
}

template <typename T>
AttentionForwardParams<T> set_sequence_forward_params(const PackedArguments& args,
                                                      const PackedSequence& sequence, T* output,
                                                      AccType<T>* logsumexp) {
  AttentionForwardParams<T> p;
  set_sequence_inputs(p, args, sequence);
  p.output = output;
  p.logsumexp = logsumexp;
  return p;
}

template <typename T>
AttentionBackwardParams<T> set_sequence_backward_params(const PackedArguments& args,
                                                        const PackedSequence& sequence,
                                                        const at::Tensor& output,
                                                        const at::Tensor& grad_output,
                                                        const AccType<T>* logsumexp, T* grad_query,
                                                        T* grad_key, T* grad_value) {
  AttentionBackwardParams<T> p;
  set_sequence_inputs(p, args, sequence);
  p.output_strides = packed_strides(output);
  p.grad_output_strides = packed_strides(grad_output);
  p.output = output.const_data_ptr<T>() + sequence.q_begin * p.output_strides.row;
  p.grad_output = grad_output.const_data_ptr<T>() + sequence.q_begin * p.grad_output_strides.row;
  p.logsumexp = logsumexp;
  p.grad_query = grad_query;
  p.grad_key = grad_key;
  p.grad_value = grad_value;
  return p;
}

#define QKV_INSTANTIATE(T)                                                                       \
  template AttentionForwardParams<T> set_sequence_forward_params<T>(                             \
      const PackedArguments&, const PackedSequence&, T*, AccType<T>*);                           \
  template AttentionBackwardParams<T> set_sequence_backward_params<T>(                           \
      const PackedArguments&, const PackedSequence&, const at::Tensor&, const at::Tensor&,       \
      const AccType<T>*, T*, T*, T*);                                                            \
  template AttentionForwardParams<T> set_forward_params<T>(                                      \
      const AttentionArguments&, const at::Tensor&, const at::Tensor&, const at::Tensor*, bool); \
  template AttentionBackwardParams<T> set_backward_params<T>(                                    \
      const AttentionArguments&, const at::Tensor&, const at::Tensor&,                           \
      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, \
      const at::Tensor&, const at::Tensor*);
QKV_INSTANTIATE(double)
QKV_INSTANTIATE(float)
QKV_INSTANTIATE(c10::BFloat16)
QKV_INSTANTIATE(c10::Half)
#undef QKV_INSTANTIATE

}  // namespace qkv_attention::cpu::flash

// cpu/flash/params.h.
#include "cpu/flash/params.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>

#include "cpu/kv_quantize.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::cpu::flash {
namespace {

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Rows of a packed (total, heads, features) tensor as a (1, heads, rows, features) operand:
// the packed row stride becomes the row stride, the head stride stays.
Strides4 packed_strides(const at::Tensor& t) {
  return Strides4{0, t.stride(1), t.stride(0), t.stride(2)};
}

// A mask broadcast to (B, H, L, S) as a view with stride 0 in the broadcast dimensions
// (nothing is expanded in memory), starting at batch entry `batch_begin`.
template <typename T>
void set_mask(MaskOperand<T>& operand, const at::Tensor& mask, at::IntArrayRef full_shape,
              int64_t batch_begin) {
  const at::Tensor view = mask.expand(full_shape);
  operand.strides = strides_of(view);
  const int64_t start = batch_begin * operand.strides.batch;
  if (view.scalar_type() == at::kBool) {
    operand.kind = MaskKind::kBool;
    operand.bool_data = view.const_data_ptr<bool>() + start;
  } else {
    operand.kind = MaskKind::kAdditive;
    operand.additive_data = view.const_data_ptr<T>() + start;
  }
}

// Sizes: heads are dimension 1 and features the last in every layout; the batch and the
// lengths are the call's (a sequence is a batch of one).
template <typename T>
void set_sizes(AttentionInputs<T>& p, const AttentionProblem& problem, int64_t batch, int64_t q_len,
               int64_t kv_len) {
  p.batch = batch;
  p.heads = problem.query.size(1);
  p.kv_heads = problem.key.size(1);
  p.q_len = q_len;
  p.kv_len = kv_len;
  p.head_dim = problem.query.size(-1);
  p.value_dim = problem.value.size(-1);
}

// query/key/value read through `strides`, starting at query row or batch entry `query_start`
// and key/value row or batch entry `key_start` (rows of a packed batch: by_row; batch entries of
// a cache or a dense call otherwise).
template <typename T>
void set_operands(AttentionInputs<T>& p, const AttentionProblem& problem,
                  Strides4 (*strides)(const at::Tensor&), int64_t query_start, int64_t key_start,
                  bool by_row) {
  p.query_strides = strides(problem.query);
  p.key_strides = strides(problem.key);
  p.value_strides = strides(problem.value);
  auto step = [by_row](const Strides4& st) { return by_row ? st.row : st.batch; };
  p.query = problem.query.const_data_ptr<T>() + query_start * step(p.query_strides);
  p.key = problem.key.const_data_ptr<T>() + key_start * step(p.key_strides);
  p.value = problem.value.const_data_ptr<T>() + key_start * step(p.value_strides);
}

template <typename T>
void set_dense_inputs(AttentionInputs<T>& p, const AttentionProblem& problem) {
  set_sizes(p, problem, problem.query.size(0), problem.query.size(2), problem.key.size(2));
  const std::vector<int64_t> full{p.batch, p.heads, p.q_len, p.kv_len};
  if (given(problem.attn_mask)) set_mask(p.masks[0], *problem.attn_mask, full, 0);
  if (given(problem.key_padding_mask)) {
    // (B, S) -> (B, 1, 1, S)
    set_mask(p.masks[1], problem.key_padding_mask->unsqueeze(1).unsqueeze(1), full, 0);
  }
  if (given(problem.rng_state)) std::tie(p.seed, p.offset) = seed_and_offset(*problem.rng_state);
  set_operands(p, problem, strides_of, 0, 0, /*by_row=*/false);
}

// Sequence s of a packed batch: its rows of the packed tensors, its own part of the stream.
template <typename T>
void set_packed_inputs(AttentionInputs<T>& p, const AttentionProblem& problem,
                       const SequenceSpan& s) {
  set_sizes(p, problem, 1, s.q_len, s.k_len);
  if (given(problem.rng_state)) {
    std::tie(p.seed, p.offset) = seed_and_offset(*problem.rng_state);
    p.offset += uint64_t(s.index);  // wraps as the stream's counter does
  }
  set_operands(p, problem, packed_strides, s.q_begin, s.k_begin, /*by_row=*/true);
}

// A quantized cache (B, Hkv, S_max, D) and its scales (B, Hkv, S_max) from batch entry b on.
QuantizedRows quantized_rows(const at::Tensor& cache, const at::Tensor& scales, int64_t b) {
  QuantizedRows q;
  q.storage = *quantized_storage_of(cache.scalar_type());
  // Codes of one byte: element offsets are byte offsets.
  q.data = static_cast<const uint8_t*>(cache.const_data_ptr()) + b * cache.stride(0);
  q.scales = scales.const_data_ptr<float>() + b * scales.stride(0);
  q.scale_batch = scales.stride(0);
  q.scale_head = scales.stride(1);
  q.scale_row = scales.stride(2);
  return q;
}

// Sequences s.index .. s.index + s.count of a cache (one valid length): a batch read from batch
// entry s.index, their first s.k_len cached positions.
template <typename T>
void set_cache_inputs(AttentionInputs<T>& p, const AttentionProblem& problem,
                      const SequenceSpan& s) {
  set_sizes(p, problem, s.count, problem.query.size(2), s.k_len);
  if (given(problem.attn_mask)) {
    // (B, H, L, S_max) read at batch entry s.index; only its first k_len columns are read.
    set_mask(p.masks[0], *problem.attn_mask,
             {problem.query.size(0), p.heads, p.q_len, problem.key.size(2)}, s.index);
  }
  if (!problem.quantized_cache()) {
    set_operands(p, problem, strides_of, s.index, s.index, /*by_row=*/false);
    return;
  }
  // Quantized caches: the query as above, the caches' codes and scales at batch entry s.index
  // (key and value stay null).
  p.query_strides = strides_of(problem.query);
  p.query = problem.query.const_data_ptr<T>() + s.index * p.query_strides.batch;
  p.key_strides = strides_of(problem.key);
  p.value_strides = strides_of(problem.value);
  p.quantized_key = quantized_rows(problem.key, *problem.k_cache_scale, s.index);
  p.quantized_value = quantized_rows(problem.value, *problem.v_cache_scale, s.index);
}

// The variants; (B, H) slopes are read at batch entry `batch_begin` (a sequence's). The
// tensors are in the accumulation dtype already (convert_variant_tensors).
template <typename T>
void set_variants(AttentionInputs<T>& p, const AttentionVariants& variants, int64_t batch_begin) {
  using Acc = AccType<T>;
  p.window_left = variants.window_size[0];
  p.window_right = variants.window_size[1];
  p.softcap = variants.softcap;
  if (given(variants.alibi_slopes)) {
    const at::Tensor& slopes = *variants.alibi_slopes;  // (H,) or (B, H)
    p.alibi_batch_stride = slopes.dim() == 2 ? p.heads : 0;
    p.alibi_slopes = slopes.const_data_ptr<Acc>() + batch_begin * p.alibi_batch_stride;
  }
  if (given(variants.sinks)) p.sinks = variants.sinks->const_data_ptr<Acc>();
}

template <typename T>
void set_inputs(AttentionInputs<T>& p, const AttentionProblem& problem,
                const SequenceSpan* sequence) {
  switch (problem.layout) {
    case AttentionLayout::kDense:
      set_dense_inputs(p, problem);
      break;
    case AttentionLayout::kPacked:
      set_packed_inputs(p, problem, *sequence);
      break;
    case AttentionLayout::kCache:
      set_cache_inputs(p, problem, *sequence);
      break;
  }
  p.scale = attention_scale(problem.scale, p.head_dim);
  p.is_causal = problem.is_causal;
  // The causal (and window, ALiBi) alignment: a cache's new queries follow its keys.
  p.causal_offset = sequence != nullptr ? sequence->causal_offset : 0;
  p.dropout_p = problem.dropout_p;
  set_variants(p, problem.variants, sequence != nullptr ? sequence->index : 0);
}

}  // namespace

std::optional<at::ScalarType> convert_variant_tensors(AttentionProblem& problem) {
  const std::optional<at::ScalarType> sinks_dtype =
      given(problem.variants.sinks) ? std::optional(problem.variants.sinks->scalar_type())
                                    : std::nullopt;
  const at::ScalarType acc = at::toOpMathType(problem.query.scalar_type());
  for (std::optional<at::Tensor>* t : {&problem.variants.alibi_slopes, &problem.variants.sinks}) {
    if (given(*t)) *t = (*t)->to(acc).contiguous();
  }
  return sinks_dtype;
}

std::pair<uint64_t, uint64_t> seed_and_offset(const at::Tensor& rng_state) {
  const at::Tensor state = rng_state.to(at::kCPU);
  const int64_t* rng = state.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(rng[0]), static_cast<uint64_t>(rng[state.stride(0)])};
}

template <typename T>
AttentionForwardParams<T> set_forward_params(const AttentionProblem& problem,
                                             const SequenceSpan* sequence, T* output,
                                             AccType<T>* logsumexp, T* weights,
                                             bool average_weights) {
  AttentionForwardParams<T> p;
  set_inputs(p, problem, sequence);
  p.output = output;
  p.logsumexp = logsumexp;
  p.weights = weights;
  p.average_weights = weights != nullptr && average_weights;
  return p;
}

template <typename T>
AttentionForwardParams<T> set_forward_params(const AttentionProblem& problem,
                                             const at::Tensor& output, const at::Tensor& logsumexp,
                                             const at::Tensor* weights, bool average_weights) {
  return set_forward_params<T>(
      problem, nullptr, output.mutable_data_ptr<T>(), logsumexp.mutable_data_ptr<AccType<T>>(),
      weights != nullptr ? weights->mutable_data_ptr<T>() : nullptr, average_weights);
}

template <typename T>
AttentionBackwardParams<T> set_backward_params(
    const AttentionProblem& problem, const SequenceSpan* sequence, const at::Tensor& output,
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const AccType<T>* logsumexp, T* grad_query, T* grad_key, T* grad_value,
    AccType<T>* grad_scores) {
  AttentionBackwardParams<T> p;
  set_inputs(p, problem, sequence);
  if (problem.layout == AttentionLayout::kPacked) {
    p.output_strides = packed_strides(output);
    p.grad_output_strides = packed_strides(grad_output);
    p.output = output.const_data_ptr<T>() + sequence->q_begin * p.output_strides.row;
    p.grad_output = grad_output.const_data_ptr<T>() + sequence->q_begin * p.grad_output_strides.row;
  } else {
    p.output_strides = strides_of(output);
    p.grad_output_strides = strides_of(grad_output);
    p.output = output.const_data_ptr<T>();
    p.grad_output = grad_output.const_data_ptr<T>();
  }
  if (given(grad_weights)) {
    p.grad_weights = grad_weights->const_data_ptr<T>();
    p.grad_weights_strides = strides_of(*grad_weights);
  }
  p.logsumexp = logsumexp;
  p.grad_query = grad_query;
  p.grad_key = grad_key;
  p.grad_value = grad_value;
  p.grad_scores = grad_scores;
  return p;
}

template <typename T>
AttentionBackwardParams<T> set_backward_params(
    const AttentionProblem& problem, const at::Tensor& output, const at::Tensor& grad_output,
    const std::optional<at::Tensor>& grad_weights, const at::Tensor& logsumexp,
    const at::Tensor& grad_query, const at::Tensor& grad_key, const at::Tensor& grad_value,
    const at::Tensor* grad_scores) {
  return set_backward_params<T>(
      problem, nullptr, output, grad_output, grad_weights, logsumexp.const_data_ptr<AccType<T>>(),
      grad_query.mutable_data_ptr<T>(), grad_key.mutable_data_ptr<T>(),
      grad_value.mutable_data_ptr<T>(),
      grad_scores != nullptr ? grad_scores->mutable_data_ptr<AccType<T>>() : nullptr);
}

#define QKV_INSTANTIATE(T)                                                                       \
  template AttentionForwardParams<T> set_forward_params<T>(                                      \
      const AttentionProblem&, const SequenceSpan*, T*, AccType<T>*, T*, bool);                  \
  template AttentionForwardParams<T> set_forward_params<T>(                                      \
      const AttentionProblem&, const at::Tensor&, const at::Tensor&, const at::Tensor*, bool);   \
  template AttentionBackwardParams<T> set_backward_params<T>(                                    \
      const AttentionProblem&, const SequenceSpan*, const at::Tensor&, const at::Tensor&,        \
      const std::optional<at::Tensor>&, const AccType<T>*, T*, T*, T*, AccType<T>*);             \
  template AttentionBackwardParams<T> set_backward_params<T>(                                    \
      const AttentionProblem&, const at::Tensor&, const at::Tensor&,                             \
      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, \
      const at::Tensor&, const at::Tensor*);
QKV_INSTANTIATE(double)
QKV_INSTANTIATE(float)
QKV_INSTANTIATE(c10::BFloat16)
QKV_INSTANTIATE(c10::Half)
#undef QKV_INSTANTIATE

}  // namespace qkv_attention::cpu::flash

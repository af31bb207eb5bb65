// Schemas and typed entry points of the attention operators, and the input checks that every
// dispatch key's kernel runs first.
#include "ops/attention.h"

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/randint.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "ops/checks.h"
#include "ops/operators.h"

namespace qkv_attention {
namespace {

// attention and attention_with_weights are compositions: the dropout stream's seed and offset
// drawn by an ATen random op, then _attention_forward. Autograd, Meta and the CPU kernel all
// live on _attention_forward, and torch.compile sees these two ops in their place.
//
// The draw happens here, outside the kernel op, so that _attention_forward is a pure function
// of its inputs: torch.compile may recompute it (activation checkpointing, the partitioner) and
// get the same dropout mask, because the random op is one the compiler knows (it keeps the
// drawn state for the recomputation instead of drawing again), and vmap's randomness modes
// apply to it ("error" raises, "same" draws one state, "different" one per sample).
std::optional<at::Tensor> draw_for(const at::Tensor& query, const at::Tensor& key,
                                   const at::Tensor& value,
                                   const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                   std::optional<double> scale,
                                   const std::optional<at::Tensor>& key_padding_mask) {
  // Bad input raises before the generator is touched.
  check_attention_inputs(op_label("_attention_forward"), query, key, value, attn_mask,
                         key_padding_mask, dropout_p, scale, std::nullopt,
                         /*rng_state_required=*/false);
  return draw_dropout_rng_state(dropout_p);
}

at::Tensor attention_composite(const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                               double dropout_p, bool is_causal, std::optional<double> scale,
                               const std::optional<at::Tensor>& key_padding_mask) {
  const std::optional<at::Tensor> rng_state =
      draw_for(query, key, value, attn_mask, dropout_p, scale, key_padding_mask);
  return std::get<0>(_attention_forward(query, key, value, attn_mask, key_padding_mask, dropout_p,
                                        is_causal, scale, false, rng_state, false));
}

std::tuple<at::Tensor, at::Tensor> attention_with_weights_composite(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, const std::optional<at::Tensor>& key_padding_mask,
    bool average_attn_weights) {
  const std::optional<at::Tensor> rng_state =
      draw_for(query, key, value, attn_mask, dropout_p, scale, key_padding_mask);
  auto [output, logsumexp, weights] =
      _attention_forward(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal,
                         scale, true, rng_state, average_attn_weights);
  return {output, weights};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "float dropout_p=0.0, bool is_causal=False, float? scale=None, "
      "Tensor? key_padding_mask=None) -> Tensor",
      TORCH_FN(attention_composite));
  m.def(
      "attention_with_weights(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, "
      "float dropout_p=0.0, bool is_causal=False, float? scale=None, "
      "Tensor? key_padding_mask=None, bool average_attn_weights=False) -> (Tensor, Tensor)",
      TORCH_FN(attention_with_weights_composite));
  m.def(
      "_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor? key_padding_mask, float dropout_p, bool is_causal, float? scale, "
      "bool need_weights, Tensor? rng_state=None, bool average_attn_weights=False) -> "
      "(Tensor output, Tensor logsumexp, Tensor weights)");
  m.def(
      "_attention_backward(Tensor grad_output, Tensor? grad_weights, Tensor query, Tensor key, "
      "Tensor value, Tensor output, Tensor logsumexp, Tensor? attn_mask, "
      "Tensor? key_padding_mask, float dropout_p, bool is_causal, float? scale, "
      "Tensor? rng_state, bool attn_mask_requires_grad, bool key_padding_mask_requires_grad) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_attn_mask, "
      "Tensor grad_key_padding_mask)");
  m.def(
      "_attention_dropout_mask(Tensor rng_state, SymInt batch, SymInt heads, SymInt q_len, "
      "SymInt kv_len, float dropout_p) -> Tensor");
}

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                     std::optional<double> scale,
                     const std::optional<at::Tensor>& key_padding_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention", "")
                       .typed<decltype(attention)>();
  return op.call(query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask);
}

std::tuple<at::Tensor, at::Tensor> attention_with_weights(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, const std::optional<at::Tensor>& key_padding_mask,
    bool average_attn_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention_with_weights", "")
                       .typed<decltype(attention_with_weights)>();
  return op.call(query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask,
                 average_attn_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _attention_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights,
    const std::optional<at::Tensor>& rng_state, bool average_attn_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_forward", "")
                       .typed<decltype(_attention_forward)>();
  return op.call(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
                 need_weights, rng_state, average_attn_weights);
}

AttentionGrads _attention_backward(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state, bool attn_mask_requires_grad,
    bool key_padding_mask_requires_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_backward", "")
                       .typed<decltype(_attention_backward)>();
  return op.call(grad_output, grad_weights, query, key, value, output, logsumexp, attn_mask,
                 key_padding_mask, dropout_p, is_causal, scale, rng_state, attn_mask_requires_grad,
                 key_padding_mask_requires_grad);
}

at::Tensor _attention_dropout_mask(const at::Tensor& rng_state, c10::SymInt batch,
                                   c10::SymInt heads, c10::SymInt q_len, c10::SymInt kv_len,
                                   double dropout_p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_dropout_mask", "")
                       .typed<decltype(_attention_dropout_mask)>();
  return op.call(rng_state, batch, heads, q_len, kv_len, dropout_p);
}

std::optional<at::Tensor> draw_dropout_rng_state(double dropout_p) {
  if (!(dropout_p > 0)) return std::nullopt;
  // (2,) int64 on the CPU, where the kernels read it: the seed and the offset of the stream,
  // each uniform in [0, 2^63 - 1), from torch's default CPU generator.
  // The device is named (not left to the default): torch.compile's activation checkpointing
  // replays random ops per device, and finds the device of one without tensor inputs only
  // there ("Backend not supported for None" otherwise, under aot_eager).
  return at::randint(std::numeric_limits<int64_t>::max(), {2},
                     at::TensorOptions().dtype(at::kLong).device(at::kCPU));
}

double attention_scale(std::optional<double> scale, int64_t head_dim) {
  if (scale.has_value()) return *scale;
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

bool attention_mask_gets_grad(const std::optional<at::Tensor>& mask, bool requires_grad) {
  return requires_grad && mask.has_value() && mask->defined() && mask->scalar_type() != at::kBool;
}

namespace {

void check_mask_dtype_and_device(const char* op, const char* name, const at::Tensor& mask,
                                 const at::Tensor& query) {
  check_dense(op, name, mask);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == query.scalar_type(), op,
                   ": ", name, " must be bool or have the query's dtype ", query.scalar_type(),
                   ", but has dtype ", mask.scalar_type());
  TORCH_CHECK(mask.device() == query.device(), op, ": ", name, " is on ", mask.device(),
              " but query is on ", query.device());
}

// The seed and offset of the dropout stream (draw_dropout_rng_state).
void check_rng_state(const char* op, const at::Tensor& rng_state) {
  check_defined(op, "rng_state", rng_state);
  TORCH_CHECK_TYPE(rng_state.scalar_type() == at::kLong, op, ": rng_state must be int64, but is ",
                   rng_state.scalar_type());
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.sym_size(0) == 2, op,
              ": rng_state must have shape (2,), but has shape ", rng_state.sym_sizes());
}

// The product of sizes that are all known, or nothing when one is symbolic; 0 when one is 0.
// Raises (naming `what`) when it does not fit an int64.
std::optional<int64_t> concrete_product(const char* op, const char* what,
                                        c10::ArrayRef<c10::SymInt> sizes) {
  std::vector<int64_t> values;
  for (const c10::SymInt& size : sizes) {
    const std::optional<int64_t> value = size.maybe_as_int();
    if (value.has_value() && *value == 0) return 0;
    if (!value.has_value()) return std::nullopt;
    values.push_back(*value);
  }
  uint64_t product = 1;
  bool wrapped = false;
  for (const int64_t value : values) {
    wrapped = wrapped || c10::mul_overflows(product, uint64_t(value), &product);
  }
  TORCH_CHECK(!wrapped && product <= uint64_t(std::numeric_limits<int64_t>::max()), op, ": ", what,
              " of shape ", sizes, " has more elements than an int64 can count");
  return int64_t(product);
}

// Every tensor the attention kernels read or allocate, before any count is computed from it
// (ops/checks.h): the inputs, the output (B, H, L, Dv), the logsumexp (B, H, L), and the scores
// (B, H, L, S) — as a tensor when they are materialised (the returned weights, the gradient of
// a mask), otherwise only as a count of positions, which the dropout stream's counters and the
// kernels' index arithmetic compute in 64 bits.
void check_attention_sizes(const char* op, const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value, bool scores_materialised) {
  check_tensor_elements(op, "query", query);
  check_tensor_elements(op, "key", key);
  check_tensor_elements(op, "value", value);
  const c10::SymInt B = query.sym_size(0), H = query.sym_size(1), L = query.sym_size(2);
  const c10::SymInt S = key.sym_size(2), Dv = value.sym_size(3);
  check_element_count(op, "the output (B, H, L, Dv)", {B, H, L, Dv});
  check_element_count(op, "the logsumexp (B, H, L)", {B, H, L});
  if (scores_materialised) {
    check_element_count(op, "the attention weights (B, H, L, S)", {B, H, L, S});
  } else {
    concrete_product(op, "the attention scores (B, H, L, S)", {B, H, L, S});
  }
}

}  // namespace

// rng_state is optional in the schemas; with dropout it must be given (and is then checked),
// without it it is ignored when absent and checked when given.
void check_optional_rng_state(const char* op, const std::optional<at::Tensor>& rng_state,
                              double dropout_p, bool required, const at::Tensor& query) {
  const bool given = rng_state.has_value() && rng_state->defined();
  TORCH_CHECK(given || !required || !(dropout_p > 0), op,
              ": rng_state (the dropout stream's seed and offset, (2,) int64) must be given "
              "when dropout_p > 0, but is None (dropout_p = ",
              dropout_p, ")");
  if (!given) return;
  check_rng_state(op, *rng_state);
  // The composite ops make rng_state on the CPU, where the kernels read it.
  TORCH_CHECK(rng_state->device() == query.device() || rng_state->device().is_cpu(), op,
              ": rng_state is on ", rng_state->device(), " but must be on the CPU or on query's ",
              query.device());
}

void check_attention_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                            const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                            std::optional<double> scale, const std::optional<at::Tensor>& rng_state,
                            bool rng_state_required, bool scores_materialised) {
  check_input(op, "query", query, 4, "(B, H, L, D)");
  check_input(op, "key", key, 4, "(B, Hkv, S, D)");
  check_input(op, "value", value, 4, "(B, Hkv, S, Dv)");
  check_same_dtype_and_device(op, "key", key, "query", query);
  check_same_dtype_and_device(op, "value", value, "query", query);
  check_size(op, "key", key, 0, query.sym_size(0), "batch entries", "query");
  // Grouped-query attention: key/value may have fewer heads, a divisor of query's.
  const c10::SymInt& kv_heads = key.sym_size(1);
  TORCH_CHECK(kv_heads != 0 ? query.sym_size(1) % kv_heads == 0 && query.sym_size(1) >= kv_heads
                            : query.sym_size(1) == 0,
              op, ": key has ", kv_heads, " heads and query has ", query.sym_size(1),
              "; query's heads must be a multiple of key's (grouped-query attention: query head "
              "h reads key/value head h / (query heads / key heads))");
  check_size(op, "key", key, 3, query.sym_size(3), "features per head", "query");
  check_size(op, "value", value, 0, query.sym_size(0), "batch entries", "query");
  check_size(op, "value", value, 1, key.sym_size(1), "heads", "key");
  check_size(op, "value", value, 2, key.sym_size(2), "positions", "key");
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p <= 1.0, op,
              ": dropout_p must be in [0, 1], but is ", dropout_p);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), op,
              ": scale must be a finite number, but is ", scale.value_or(0.0));
  if (scale.has_value()) {
    check_representable(op, "scale", *scale, at::toOpMathType(query.scalar_type()),
                        query.scalar_type());
  }
  check_optional_rng_state(op, rng_state, dropout_p, rng_state_required, query);
  check_attention_sizes(op, query, key, value, scores_materialised);

  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& padding = *key_padding_mask;
    check_mask_dtype_and_device(op, "key_padding_mask", padding, query);
    TORCH_CHECK(padding.dim() == 2 && padding.sym_size(0) == query.sym_size(0) &&
                    padding.sym_size(1) == key.sym_size(2),
                op, ": key_padding_mask must have shape (B, S) = (", query.sym_size(0), ", ",
                key.sym_size(2), "), but has shape ", padding.sym_sizes());
    check_tensor_elements(op, "key_padding_mask", padding);
  }
  if (!attn_mask.has_value() || !attn_mask->defined()) return;
  const at::Tensor& mask = *attn_mask;
  check_mask_dtype_and_device(op, "attn_mask", mask, query);
  check_tensor_elements(op, "attn_mask", mask);
  const c10::SymInt target[4] = {query.sym_size(0), query.sym_size(1), query.sym_size(2),
                                 key.sym_size(2)};
  bool broadcastable = mask.dim() <= 4;
  for (int64_t d = 0; broadcastable && d < mask.dim(); ++d) {
    const c10::SymInt& size = mask.sym_size(mask.dim() - 1 - d);
    broadcastable = size == 1 || size == target[3 - d];
  }
  TORCH_CHECK(broadcastable, op, ": attn_mask of shape ", mask.sym_sizes(),
              " cannot be broadcast to the attention scores' shape (B, H, L, S) = (", target[0],
              ", ", target[1], ", ", target[2], ", ", target[3], ")");
}

void check_attention_backward_inputs(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, std::optional<double> scale, const std::optional<at::Tensor>& rng_state,
    bool scores_materialised) {
  constexpr const char* op = op_label("_attention_backward");
  check_attention_inputs(op, query, key, value, attn_mask, key_padding_mask, dropout_p, scale,
                         rng_state, /*rng_state_required=*/true, scores_materialised);
  check_input(op, "output", output, 4, "(B, H, L, Dv)");
  check_same_dtype_and_device(op, "output", output, "query", query);
  check_size(op, "output", output, 0, query.sym_size(0), "batch entries", "query");
  check_size(op, "output", output, 1, query.sym_size(1), "heads", "query");
  check_size(op, "output", output, 2, query.sym_size(2), "positions", "query");
  check_size(op, "output", output, 3, value.sym_size(3), "features per head", "value");
  check_input(op, "grad_output", grad_output, 4, "(B, H, L, Dv)");
  check_same_dtype_and_device(op, "grad_output", grad_output, "query", query);
  TORCH_CHECK(grad_output.sym_sizes() == output.sym_sizes(), op, ": grad_output has shape ",
              grad_output.sym_sizes(), " but the output has shape ", output.sym_sizes());
  check_logsumexp(op, logsumexp, query, 3, "(B, H, L)");
  check_tensor_elements(op, "output", output);
  check_tensor_elements(op, "grad_output", grad_output);
  if (grad_weights.has_value() && grad_weights->defined()) {
    check_input(op, "grad_weights", *grad_weights, 4, "(B, H, L, S)");
    check_same_dtype_and_device(op, "grad_weights", *grad_weights, "query", query);
    check_size(op, "grad_weights", *grad_weights, 0, query.sym_size(0), "batch entries", "query");
    check_size(op, "grad_weights", *grad_weights, 1, query.sym_size(1), "heads", "query");
    check_size(op, "grad_weights", *grad_weights, 2, query.sym_size(2), "positions", "query");
    check_size(op, "grad_weights", *grad_weights, 3, key.sym_size(2), "positions", "key");
    check_tensor_elements(op, "grad_weights", *grad_weights);
  }
}

void check_dropout_mask_inputs(const at::Tensor& rng_state, const c10::SymInt& batch,
                               const c10::SymInt& heads, const c10::SymInt& q_len,
                               const c10::SymInt& kv_len, double dropout_p) {
  constexpr const char* op = op_label("_attention_dropout_mask");
  check_rng_state(op, rng_state);
  const std::pair<const char*, const c10::SymInt*> sizes[] = {
      {"batch", &batch}, {"heads", &heads}, {"q_len", &q_len}, {"kv_len", &kv_len}};
  for (const auto& [name, size] : sizes) {
    TORCH_CHECK(*size >= 0, op, ": ", name, " must be non-negative, but is ", *size);
  }
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p <= 1.0, op,
              ": dropout_p must be in [0, 1], but is ", dropout_p);
  check_element_count(op, "the mask (batch, heads, q_len, kv_len)", {batch, heads, q_len, kv_len});
}

}  // namespace qkv_attention

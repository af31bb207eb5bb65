// Schemas and typed entry points of the variable-length attention operators
// (ops/attention_varlen.h), and the input checks every dispatch key's kernel runs first.
#include "ops/attention_varlen.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "ops/attention.h"
#include "ops/checks.h"

namespace qkv_attention {
namespace {

constexpr const char* kOp = "attention_varlen";

// attention_varlen is a composition, like attention: the dropout stream's state drawn by an
// ATen random op (ops/attention.cpp explains why outside the kernel op), then
// _attention_varlen_forward, which carries autograd, Meta and the CPU kernel.
at::Tensor attention_varlen_composite(const at::Tensor& query, const at::Tensor& key,
                                      const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
                                      c10::SymInt max_seqlen_k, double dropout_p, bool is_causal,
                                      std::optional<double> scale) {
  // Bad input raises before the generator is touched.
  check_varlen_inputs(kOp, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, dropout_p, scale, std::nullopt,
                      /*rng_state_required=*/false);
  const std::optional<at::Tensor> rng_state = draw_dropout_rng_state(dropout_p);
  return std::get<0>(_attention_varlen_forward(query, key, value, cu_seqlens_q, cu_seqlens_k,
                                               std::move(max_seqlen_q), std::move(max_seqlen_k),
                                               dropout_p, is_causal, scale, rng_state));
}

void check_offsets_tensor(const char* op, const char* name, const at::Tensor& offsets,
                          const at::Tensor& query) {
  check_defined(op, name, offsets);
  check_dense(op, name, offsets);
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong, op,
                   ": ", name, " must be int32 or int64, but has dtype ", offsets.scalar_type());
  // The kernels read the offsets on the CPU (shape-only kernels: on query's device, e.g.
  // meta, where FakeTensor puts them).
  TORCH_CHECK(offsets.device().is_cpu() || offsets.device() == query.device(), op, ": ", name,
              " must be on the CPU, but is on ", offsets.device());
  TORCH_CHECK(offsets.dim() == 1 && offsets.sym_size(0) >= 1, op, ": ", name,
              " must have shape (B + 1,) (the offsets of B sequences, starting at 0), but has "
              "shape ",
              offsets.sym_sizes());
  check_tensor_elements(op, name, offsets);
}

// A product of sizes that must fit an int64: the dropout stream's counters of one sequence
// and the kernels' index arithmetic count up to H * max_seqlen_q * max_seqlen_k.
void check_product_fits(const char* op, const char* what, c10::ArrayRef<c10::SymInt> sizes) {
  uint64_t product = 1;
  bool wrapped = false;
  for (const c10::SymInt& size : sizes) {
    const std::optional<int64_t> value = size.maybe_as_int();
    if (!value.has_value()) return;  // symbolic: checked by the kernel on real sizes
    if (*value == 0) return;
    wrapped = wrapped || c10::mul_overflows(product, uint64_t(*value), &product);
  }
  TORCH_CHECK(!wrapped && product <= uint64_t(std::numeric_limits<int64_t>::max()), op, ": ", what,
              " of shape ", sizes, " has more elements than an int64 can count");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "attention_varlen(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p=0.0, "
      "bool is_causal=False, float? scale=None) -> Tensor",
      TORCH_FN(attention_varlen_composite));
  m.def(
      "_attention_varlen_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, "
      "bool is_causal, float? scale, Tensor? rng_state=None) -> "
      "(Tensor output, Tensor logsumexp)");
  m.def(
      "_attention_varlen_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, "
      "Tensor output, Tensor logsumexp, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, bool is_causal, "
      "float? scale, Tensor? rng_state) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

at::Tensor attention_varlen(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                            c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, double dropout_p,
                            bool is_causal, std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention_varlen", "")
                       .typed<decltype(attention_varlen)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
                 std::move(max_seqlen_k), dropout_p, is_causal, scale);
}

std::tuple<at::Tensor, at::Tensor> _attention_varlen_forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_varlen_forward", "")
                       .typed<decltype(_attention_varlen_forward)>();
  return op.call(query, key, value, cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
                 std::move(max_seqlen_k), dropout_p, is_causal, scale, rng_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _attention_varlen_backward(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
    c10::SymInt max_seqlen_k, double dropout_p, bool is_causal, std::optional<double> scale,
    const std::optional<at::Tensor>& rng_state) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::_attention_varlen_backward", "")
                       .typed<decltype(_attention_varlen_backward)>();
  return op.call(grad_output, query, key, value, output, logsumexp, cu_seqlens_q, cu_seqlens_k,
                 std::move(max_seqlen_q), std::move(max_seqlen_k), dropout_p, is_causal, scale,
                 rng_state);
}

void check_varlen_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                         const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                         const at::Tensor& cu_seqlens_k, const c10::SymInt& max_seqlen_q,
                         const c10::SymInt& max_seqlen_k, double dropout_p,
                         std::optional<double> scale, const std::optional<at::Tensor>& rng_state,
                         bool rng_state_required) {
  check_input(op, "query", query, 3, "(total_q, H, D)");
  check_input(op, "key", key, 3, "(total_k, Hkv, D)");
  check_input(op, "value", value, 3, "(total_k, Hkv, Dv)");
  check_same_dtype_and_device(op, "key", key, "query", query);
  check_same_dtype_and_device(op, "value", value, "query", query);
  const c10::SymInt& kv_heads = key.sym_size(1);
  TORCH_CHECK(kv_heads != 0 ? query.sym_size(1) % kv_heads == 0 && query.sym_size(1) >= kv_heads
                            : query.sym_size(1) == 0,
              op, ": key has ", kv_heads, " heads and query has ", query.sym_size(1),
              "; query's heads must be a multiple of key's (grouped-query attention: query head "
              "h reads key/value head h / (query heads / key heads))");
  check_size(op, "key", key, 2, query.sym_size(2), "features per head", "query");
  check_size(op, "value", value, 0, key.sym_size(0), "rows (total_k)", "key");
  check_size(op, "value", value, 1, key.sym_size(1), "heads", "key");
  check_offsets_tensor(op, "cu_seqlens_q", cu_seqlens_q, query);
  check_offsets_tensor(op, "cu_seqlens_k", cu_seqlens_k, query);
  TORCH_CHECK(cu_seqlens_k.sym_size(0) == cu_seqlens_q.sym_size(0), op, ": cu_seqlens_k has ",
              cu_seqlens_k.sym_size(0), " entries (", cu_seqlens_k.sym_size(0) - 1,
              " sequences) but cu_seqlens_q has ", cu_seqlens_q.sym_size(0), " (",
              cu_seqlens_q.sym_size(0) - 1, " sequences); both must have B + 1 entries");
  TORCH_CHECK(max_seqlen_q >= 0, op, ": max_seqlen_q must be non-negative, but is ", max_seqlen_q);
  TORCH_CHECK(max_seqlen_k >= 0, op, ": max_seqlen_k must be non-negative, but is ", max_seqlen_k);
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p <= 1.0, op,
              ": dropout_p must be in [0, 1], but is ", dropout_p);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), op,
              ": scale must be a finite number, but is ", scale.value_or(0.0));
  if (scale.has_value()) {
    check_representable(op, "scale", *scale, at::toOpMathType(query.scalar_type()),
                        query.scalar_type());
  }
  check_optional_rng_state(op, rng_state, dropout_p, rng_state_required, query);
  check_tensor_elements(op, "query", query);
  check_tensor_elements(op, "key", key);
  check_tensor_elements(op, "value", value);
  check_element_count(op, "the output (total_q, H, Dv)",
                      {query.sym_size(0), query.sym_size(1), value.sym_size(2)});
  // One sequence's scores, counted (never allocated) by the dropout stream and the kernels.
  check_product_fits(op, "the scores of one sequence (H, max_seqlen_q, max_seqlen_k)",
                     {query.sym_size(1), max_seqlen_q, max_seqlen_k});
}

void check_varlen_backward_inputs(const at::Tensor& grad_output, const at::Tensor& query,
                                  const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& output, const at::Tensor& logsumexp,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                  const c10::SymInt& max_seqlen_q, const c10::SymInt& max_seqlen_k,
                                  double dropout_p, std::optional<double> scale,
                                  const std::optional<at::Tensor>& rng_state) {
  constexpr const char* op = "attention_varlen backward";
  check_varlen_inputs(op, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      dropout_p, scale, rng_state, /*rng_state_required=*/true);
  check_input(op, "output", output, 3, "(total_q, H, Dv)");
  check_same_dtype_and_device(op, "output", output, "query", query);
  check_size(op, "output", output, 0, query.sym_size(0), "rows (total_q)", "query");
  check_size(op, "output", output, 1, query.sym_size(1), "heads", "query");
  check_size(op, "output", output, 2, value.sym_size(2), "features per head", "value");
  check_input(op, "grad_output", grad_output, 3, "(total_q, H, Dv)");
  check_same_dtype_and_device(op, "grad_output", grad_output, "query", query);
  TORCH_CHECK(grad_output.sym_sizes() == output.sym_sizes(), op, ": grad_output has shape ",
              grad_output.sym_sizes(), " but the output has shape ", output.sym_sizes());
  check_logsumexp(op, logsumexp, query, 2, "(total_q, H)");
  check_tensor_elements(op, "output", output);
  check_tensor_elements(op, "grad_output", grad_output);
}

SequenceOffsets read_sequence_offsets(const char* op, const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k, int64_t total_q,
                                      int64_t total_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  SequenceOffsets offsets;
  auto read = [&](const char* name, const at::Tensor& cu, int64_t total, int64_t max_len,
                  const char* rows, std::vector<int64_t>& out) {
    const at::Tensor values = cu.to(at::kLong).contiguous();
    const int64_t* data = values.const_data_ptr<int64_t>();
    out.assign(data, data + values.numel());
    TORCH_CHECK(out[0] == 0, op, ": ", name, " must start at 0, but ", name, "[0] = ", out[0]);
    for (size_t b = 1; b < out.size(); ++b) {
      TORCH_CHECK(out[b] >= out[b - 1], op, ": ", name, " must be non-decreasing, but ", name, "[",
                  b, "] = ", out[b], " < ", name, "[", b - 1, "] = ", out[b - 1]);
      TORCH_CHECK(out[b] - out[b - 1] <= max_len, op, ": sequence ", b - 1, " has ",
                  out[b] - out[b - 1], " ", rows, " (", name, "[", b, "] - ", name, "[", b - 1,
                  "]), more than max_seqlen_", name[11], " = ", max_len);
    }
    TORCH_CHECK(out.back() == total, op, ": ", name, " must end at the number of packed ", rows,
                " (", total, "), but ", name, "[", out.size() - 1, "] = ", out.back());
  };
  read("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "query rows", offsets.query);
  read("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "key rows", offsets.key);
  return offsets;
}

at::Tensor sequence_rng_state(const at::Tensor& rng_state, int64_t b) {
  const at::Tensor state = rng_state.to(at::kCPU).contiguous();
  const int64_t* data = state.const_data_ptr<int64_t>();
  const uint64_t offset = static_cast<uint64_t>(data[1]) + static_cast<uint64_t>(b);
  return at::tensor({data[0], static_cast<int64_t>(offset)}, at::TensorOptions().dtype(at::kLong));
}

}  // namespace qkv_attention

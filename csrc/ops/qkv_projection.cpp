// Schema, typed entry points and input checks of qkv_projection.
#include "ops/qkv_projection.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <utility>

#include "ops/checks.h"
#include "ops/operators.h"

namespace qkv_attention {

TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "qkv_projection(Tensor query, Tensor key, Tensor value, Tensor q_weight, "
      "Tensor k_weight, Tensor v_weight, Tensor? q_bias, Tensor? k_bias, Tensor? v_bias, "
      "SymInt num_heads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "qkv_projection_backward(Tensor? grad_q, Tensor? grad_k, Tensor? grad_v, Tensor query, "
      "Tensor key, Tensor value, Tensor q_weight, Tensor k_weight, Tensor v_weight, "
      "SymInt num_heads) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, "
      "Tensor grad_q_weight, Tensor grad_k_weight, Tensor grad_v_weight, Tensor grad_q_bias, "
      "Tensor grad_k_bias, Tensor grad_v_bias)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias, c10::SymInt num_heads) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::qkv_projection", "")
                       .typed<decltype(qkv_projection)>();
  return op.call(query, key, value, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias,
                 std::move(num_heads));
}

QKVProjectionGrads qkv_projection_backward(const std::optional<at::Tensor>& grad_q,
                                           const std::optional<at::Tensor>& grad_k,
                                           const std::optional<at::Tensor>& grad_v,
                                           const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value, const at::Tensor& q_weight,
                                           const at::Tensor& k_weight, const at::Tensor& v_weight,
                                           c10::SymInt num_heads) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::qkv_projection_backward", "")
                       .typed<decltype(qkv_projection_backward)>();
  return op.call(grad_q, grad_k, grad_v, query, key, value, q_weight, k_weight, v_weight,
                 std::move(num_heads));
}

namespace {

void check_weight_and_bias(const char* op, const char* weight_name, const at::Tensor& weight,
                           const char* bias_name, const std::optional<at::Tensor>& bias,
                           const char* input_name, const at::Tensor& input, const at::Tensor& query,
                           const at::Tensor& q_weight) {
  check_input(op, weight_name, weight, 2, "(E, in_features)");
  check_same_dtype_and_device(op, weight_name, weight, "query", query);
  check_size(op, weight_name, weight, 1, input.sym_size(2), "input features", input_name);
  check_size(op, weight_name, weight, 0, q_weight.sym_size(0), "output features", "q_weight");
  if (!bias.has_value() || !bias->defined()) return;
  check_input(op, bias_name, *bias, 1, "(E,)");
  check_same_dtype_and_device(op, bias_name, *bias, "query", query);
  check_size(op, bias_name, *bias, 0, q_weight.sym_size(0), "features", "q_weight");
}

}  // namespace

void check_qkv_projection_inputs(const char* op, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& q_weight,
                                 const at::Tensor& k_weight, const at::Tensor& v_weight,
                                 const std::optional<at::Tensor>& q_bias,
                                 const std::optional<at::Tensor>& k_bias,
                                 const std::optional<at::Tensor>& v_bias,
                                 const c10::SymInt& num_heads) {
  check_input(op, "query", query, 3, "(B, L, Eq)");
  check_input(op, "key", key, 3, "(B, S, Ek)");
  check_input(op, "value", value, 3, "(B, S, Ev)");
  check_same_dtype_and_device(op, "key", key, "query", query);
  check_same_dtype_and_device(op, "value", value, "query", query);
  check_size(op, "key", key, 0, query.sym_size(0), "batch entries", "query");
  check_size(op, "value", value, 0, query.sym_size(0), "batch entries", "query");
  check_size(op, "value", value, 1, key.sym_size(1), "positions", "key");
  check_weight_and_bias(op, "q_weight", q_weight, "q_bias", q_bias, "query", query, query,
                        q_weight);
  check_weight_and_bias(op, "k_weight", k_weight, "k_bias", k_bias, "key", key, query, q_weight);
  check_weight_and_bias(op, "v_weight", v_weight, "v_bias", v_bias, "value", value, query,
                        q_weight);
  const c10::SymInt& embed_dim = q_weight.sym_size(0);
  TORCH_CHECK(num_heads > 0, op, ": num_heads must be positive, but is ", num_heads);
  TORCH_CHECK(embed_dim % num_heads == 0, op, ": num_heads (", num_heads,
              ") must divide the embedding size E = ", embed_dim, " (q_weight has shape ",
              q_weight.sym_sizes(), ")");
  // Sizes, before the kernels compute any count from them (ops/checks.h).
  const std::pair<const char*, const at::Tensor*> tensors[] = {
      {"query", &query},       {"key", &key},           {"value", &value},
      {"q_weight", &q_weight}, {"k_weight", &k_weight}, {"v_weight", &v_weight}};
  for (const auto& [name, tensor] : tensors) check_tensor_elements(op, name, *tensor);
  const std::pair<const char*, const std::optional<at::Tensor>*> biases[] = {
      {"q_bias", &q_bias}, {"k_bias", &k_bias}, {"v_bias", &v_bias}};
  for (const auto& [name, bias] : biases) {
    if (bias->has_value()) check_tensor_elements(op, name, **bias);
  }
  check_element_count(op, "the projected q (B, H, L, E/H)",
                      {query.sym_size(0), query.sym_size(1), embed_dim});
  check_element_count(op, "the projected k and v (B, H, S, E/H)",
                      {key.sym_size(0), key.sym_size(1), embed_dim});
}

namespace {

void check_projection_grad(const char* name, const std::optional<at::Tensor>& grad,
                           const at::Tensor& input, const at::Tensor& weight,
                           const c10::SymInt& num_heads) {
  if (!grad.has_value() || !grad->defined()) return;
  constexpr const char* op = op_label("qkv_projection_backward");
  check_input(op, name, *grad, 4, "(B, H, L, E/H)");
  check_same_dtype_and_device(op, name, *grad, "query", input);
  const c10::SymInt expected[4] = {input.sym_size(0), num_heads, input.sym_size(1),
                                   weight.sym_size(0) / num_heads};
  TORCH_CHECK(grad->sym_sizes() == c10::SymIntArrayRef(expected), op, ": ", name,
              " must have the projection's shape (", expected[0], ", ", expected[1], ", ",
              expected[2], ", ", expected[3], "), but has shape ", grad->sym_sizes());
  check_tensor_elements(op, name, *grad);
}

}  // namespace

void check_qkv_projection_backward_inputs(const std::optional<at::Tensor>& grad_q,
                                          const std::optional<at::Tensor>& grad_k,
                                          const std::optional<at::Tensor>& grad_v,
                                          const at::Tensor& query, const at::Tensor& key,
                                          const at::Tensor& value, const at::Tensor& q_weight,
                                          const at::Tensor& k_weight, const at::Tensor& v_weight,
                                          const c10::SymInt& num_heads) {
  check_qkv_projection_inputs(op_label("qkv_projection_backward"), query, key, value, q_weight,
                              k_weight, v_weight, std::nullopt, std::nullopt, std::nullopt,
                              num_heads);
  check_projection_grad("grad_q", grad_q, query, q_weight, num_heads);
  check_projection_grad("grad_k", grad_k, key, k_weight, num_heads);
  check_projection_grad("grad_v", grad_v, value, v_weight, num_heads);
}

}  // namespace qkv_attention

// The backward under create_graph=true. Then each op's backward runs its differentiable ATen
// path instead of the fused kernel (a second implementation of the same gradients), and its
// result must itself be differentiable: both the first-order gradients it gives and the
// second-order ones (d/d inputs and d/d grad_output of <grads, r>) must match the reference's.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <vector>

#include "ops_by_name.h"
#include "reference.h"
#include "test_support.h"

using namespace qkv_attention::testing;
namespace op = qkv_attention::testing::by_name;

namespace {

using Tensors = std::vector<at::Tensor>;
using Function = std::function<Tensors(const Tensors&)>;

Tensors leaves(const Tensors& values, at::ScalarType dtype) {
  Tensors out;
  for (const at::Tensor& t : values) out.push_back(t.detach().to(dtype).requires_grad_(true));
  return out;
}

Tensors zeros_for_undefined(Tensors grads, const Tensors& like) {
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = at::zeros_like(like[i]);
  }
  return grads;
}

// The first-order gradients of sum <outputs, grad_outputs> with create_graph, and the
// gradients of sum_i <first_order_i, directions_i> with respect to the inputs and the
// grad_outputs: what a double backward computes.
struct DoubleBackward {
  Tensors first, second;
};

DoubleBackward double_backward(const Function& f, const Tensors& inputs,
                               const Tensors& grad_outputs, const Tensors& directions) {
  const Tensors outputs = f(inputs);
  const Tensors first = zeros_for_undefined(
      torch::autograd::grad(outputs, inputs, grad_outputs, /*retain_graph=*/true,
                            /*create_graph=*/true, /*allow_unused=*/true),
      inputs);
  at::Tensor objective = at::zeros({}, inputs[0].options()).requires_grad_(false);
  for (size_t i = 0; i < first.size(); ++i) {
    objective = objective + (first[i] * directions[i]).sum();
  }
  Tensors wrt = inputs;
  wrt.insert(wrt.end(), grad_outputs.begin(), grad_outputs.end());
  const Tensors second = zeros_for_undefined(
      torch::autograd::grad({objective}, wrt, {}, std::nullopt, false, /*allow_unused=*/true), wrt);
  return {first, second};
}

// `op_fn` in `dtype` against `reference_fn` in float64 on the same values.
void check_double_backward(const Function& op_fn, const Function& reference_fn,
                           const Tensors& values, at::ScalarType dtype, uint64_t seed) {
  INFO("dtype " << dtype);
  const Tensors inputs = leaves(values, dtype);
  const Tensors ref_inputs = leaves(inputs, at::kDouble);
  at::Generator gen = seeded(seed);
  Tensors grad_outputs, directions;
  {
    at::NoGradGuard no_grad;
    for (const at::Tensor& out : op_fn(inputs)) {
      grad_outputs.push_back(random_tensor(gen, out.sizes(), dtype).requires_grad_(true));
    }
  }
  for (const at::Tensor& in : inputs) directions.push_back(random_tensor(gen, in.sizes(), dtype));
  const DoubleBackward ours = double_backward(op_fn, inputs, grad_outputs, directions);
  const DoubleBackward ref = double_backward(
      reference_fn, ref_inputs, leaves(grad_outputs, at::kDouble), leaves(directions, at::kDouble));
  // Second derivatives multiply one more rounded factor in: twice the gradient allowance.
  const Tolerance first_tol = gradient_tolerance(dtype);
  const Tolerance second_tol = {2 * first_tol.atol, 2 * first_tol.rtol};
  for (size_t i = 0; i < ours.first.size(); ++i) {
    INFO("first-order gradient of input " << i);
    CHECK_THAT(ours.first[i], IsCloseTo(ref.first[i], first_tol));
  }
  for (size_t i = 0; i < ours.second.size(); ++i) {
    INFO("second-order gradient of " << (i < inputs.size() ? "input " : "grad_output ")
                                     << (i < inputs.size() ? i : i - inputs.size()));
    CHECK_THAT(ours.second[i], IsCloseTo(ref.second[i], second_tol));
  }
}

}  // namespace

TEST_CASE(
    "attention's create_graph backward matches the reference's first and second "
    "derivatives, with masks, causal and dropout",
    "[double_backward][attention]") {
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat);
  constexpr int64_t B = 2, H = 2, L = 5, S = 6, D = 4, Dv = 3;
  const double p = GENERATE(0.0, 0.3);
  INFO("dropout_p " << p);
  at::Generator gen = seeded(60);
  const Tensors values = {random_tensor(gen, {B, H, L, D}, dtype),
                          random_tensor(gen, {B, H, S, D}, dtype),
                          random_tensor(gen, {B, H, S, Dv}, dtype),
                          random_tensor(gen, {L, S}, dtype)};  // a float attn_mask
  const at::Tensor padding = random_bool_mask(gen, {B, S}, 0.8);
  padding[0].fill_(false);  // batch entry 0 attends to nothing: zeros, and zero derivatives
  constexpr uint64_t kSeed = 11;

  at::Tensor keep;
  if (p > 0) {
    at::manual_seed(kSeed);
    const auto forward = op::attention_forward(values[0], values[1], values[2], values[3], padding,
                                               p, true, std::nullopt, false);
    keep = op::attention_dropout_mask(std::get<3>(forward), B, H, L, S, p);
  }
  const Function ours = [&](const Tensors& in) -> Tensors {
    at::manual_seed(kSeed);
    return {op::attention(in[0], in[1], in[2], in[3], p, true, std::nullopt, padding)};
  };
  const Function reference = [&](const Tensors& in) -> Tensors {
    return {reference::attention(in[0], in[1], in[2], in[3], true, std::nullopt, padding, keep, p)
                .output};
  };
  check_double_backward(ours, reference, values, dtype, 61);
}

TEST_CASE(
    "qkv_projection's create_graph backward matches the reference's first and second "
    "derivatives",
    "[double_backward][qkv_projection]") {
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat);
  constexpr int64_t B = 2, L = 3, S = 4, E = 6, Eq = 5, Ek = 4, Ev = 3, H = 2;
  at::Generator gen = seeded(62);
  const Tensors values = {
      random_tensor(gen, {B, L, Eq}, dtype), random_tensor(gen, {B, S, Ek}, dtype),
      random_tensor(gen, {B, S, Ev}, dtype), random_tensor(gen, {E, Eq}, dtype),
      random_tensor(gen, {E, Ek}, dtype),    random_tensor(gen, {E, Ev}, dtype),
      random_tensor(gen, {E}, dtype),        random_tensor(gen, {E}, dtype)};  // q_bias, v_bias
  const Function ours = [&](const Tensors& in) -> Tensors {
    const auto [q, k, v] =
        op::qkv_projection(in[0], in[1], in[2], in[3], in[4], in[5], in[6], std::nullopt, in[7], H);
    return {q, k, v};
  };
  const Function reference = [&](const Tensors& in) -> Tensors {
    const auto [q, k, v] = reference::qkv_projection(in[0], in[1], in[2], in[3], in[4], in[5],
                                                     in[6], std::nullopt, in[7], H);
    return {q, k, v};
  };
  check_double_backward(ours, reference, values, dtype, 63);
}

TEST_CASE(
    "merge_heads' create_graph backward matches the reference's first and second "
    "derivatives",
    "[double_backward][merge_heads]") {
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat);
  at::Generator gen = seeded(64);
  const Tensors values = {random_tensor(gen, {2, 3, 4, 2}, dtype),
                          random_tensor(gen, {5, 6}, dtype), random_tensor(gen, {5}, dtype)};
  const Function ours = [&](const Tensors& in) -> Tensors {
    return {op::merge_heads(in[0], in[1], in[2])};
  };
  const Function reference = [&](const Tensors& in) -> Tensors {
    return {reference::merge_heads(in[0], in[1], in[2])};
  };
  check_double_backward(ours, reference, values, dtype, 65);
}

// qkv_projection against the plain LibTorch reference (at::linear, then the head split),
// forward and backward, in every dtype: kdim/vdim different from E, optional biases, one head
// or E heads, non-contiguous inputs and weights, empty sizes. The backward is checked both
// through torch::autograd::grad and by calling qkv_projection_backward through the dispatcher.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <optional>
#include <vector>

#include "ops/qkv_projection.h"
#include "ops_by_name.h"
#include "reference.h"
#include "test_support.h"

using namespace qkv_attention::testing;
namespace op = qkv_attention::testing::by_name;

namespace {

struct ProjectionInputs {
  at::Tensor query, key, value;                      // (B, L, Eq), (B, S, Ek), (B, S, Ev)
  at::Tensor q_weight, k_weight, v_weight;           // (E, Eq), (E, Ek), (E, Ev)
  std::optional<at::Tensor> q_bias, k_bias, v_bias;  // (E,) or None
  int64_t num_heads = 1;
};

// Standard normal inputs, weights and biases scaled by 1/sqrt(fan-in) as nn.Linear initialises
// them, so that the projections are O(1) like the inputs.
ProjectionInputs random_projection_inputs(uint64_t seed, int64_t B, int64_t L, int64_t S, int64_t E,
                                          int64_t Eq, int64_t Ek, int64_t Ev, int64_t num_heads,
                                          at::ScalarType dtype, bool with_biases = true,
                                          bool contiguous = true) {
  at::Generator gen = seeded(seed);
  ProjectionInputs in;
  in.query = random_tensor(gen, {B, L, Eq}, dtype, contiguous);
  in.key = random_tensor(gen, {B, S, Ek}, dtype, contiguous);
  in.value = random_tensor(gen, {B, S, Ev}, dtype, contiguous);
  auto weight = [&](int64_t fan_in) {
    return random_tensor(gen, {E, fan_in}, dtype, contiguous, 1.0 / std::sqrt(double(fan_in)));
  };
  in.q_weight = weight(Eq);
  in.k_weight = weight(Ek);
  in.v_weight = weight(Ev);
  if (with_biases) {
    in.q_bias = random_tensor(gen, {E}, dtype, contiguous, 0.5);
    in.k_bias = random_tensor(gen, {E}, dtype, contiguous, 0.5);
    in.v_bias = random_tensor(gen, {E}, dtype, contiguous, 0.5);
  }
  in.num_heads = num_heads;
  return in;
}

at::Tensor leaf(const at::Tensor& t) { return t.detach().requires_grad_(true); }

at::Tensor double_leaf(const at::Tensor& t) {
  return t.detach().to(at::kDouble).requires_grad_(true);
}

// The op against the reference: outputs, then the nine gradients through autograd and through
// qkv_projection_backward called directly.
void check_projection_against_reference(const ProjectionInputs& in, uint64_t grad_seed = 3) {
  const at::ScalarType dtype = in.query.scalar_type();
  const Tolerance out_tol = output_tolerance(dtype), grad_tol = gradient_tolerance(dtype);
  const int64_t B = in.query.size(0), L = in.query.size(1), S = in.key.size(1);
  const int64_t E = in.q_weight.size(0), H = in.num_heads;
  INFO("dtype " << dtype << ", (B, L, S, E, H) = (" << B << ", " << L << ", " << S << ", " << E
                << ", " << H << "), biases " << in.q_bias.has_value() << in.k_bias.has_value()
                << in.v_bias.has_value());

  at::Generator gen = seeded(grad_seed);
  const at::Tensor grad_q = random_tensor(gen, {B, H, L, E / H}, dtype);
  const at::Tensor grad_k = random_tensor(gen, {B, H, S, E / H}, dtype);
  const at::Tensor grad_v = random_tensor(gen, {B, H, S, E / H}, dtype);

  // The reference always has biases (zeros where the op has None), so that it also gives the
  // bias gradients qkv_projection_backward returns whether or not the forward had a bias.
  auto bias_or_zeros = [&](const std::optional<at::Tensor>& bias) {
    return double_leaf(bias.has_value() ? *bias : at::zeros({E}, dtype));
  };
  const std::vector<at::Tensor> ref_inputs = {
      double_leaf(in.query),    double_leaf(in.key),      double_leaf(in.value),
      double_leaf(in.q_weight), double_leaf(in.k_weight), double_leaf(in.v_weight),
      bias_or_zeros(in.q_bias), bias_or_zeros(in.k_bias), bias_or_zeros(in.v_bias)};
  const auto [ref_q, ref_k, ref_v] = reference::qkv_projection(
      ref_inputs[0], ref_inputs[1], ref_inputs[2], ref_inputs[3], ref_inputs[4], ref_inputs[5],
      ref_inputs[6], ref_inputs[7], ref_inputs[8], H);
  const std::vector<at::Tensor> ref_grads = torch::autograd::grad(
      {ref_q, ref_k, ref_v}, ref_inputs,
      {grad_q.to(at::kDouble), grad_k.to(at::kDouble), grad_v.to(at::kDouble)}, std::nullopt, false,
      /*allow_unused=*/true);
  auto expected_grad = [&](size_t i) {  // unused (an empty input): zeros
    return ref_grads[i].defined() ? ref_grads[i] : at::zeros_like(ref_inputs[i]);
  };

  {
    INFO("qkv_projection differentiated by torch::autograd::grad");
    std::vector<at::Tensor> inputs = {leaf(in.query),    leaf(in.key),      leaf(in.value),
                                      leaf(in.q_weight), leaf(in.k_weight), leaf(in.v_weight)};
    std::vector<size_t> reference_index = {0, 1, 2, 3, 4, 5};
    std::optional<at::Tensor> biases[3];
    const std::optional<at::Tensor>* given[3] = {&in.q_bias, &in.k_bias, &in.v_bias};
    for (size_t i = 0; i < 3; ++i) {
      if (!given[i]->has_value()) continue;
      biases[i] = leaf(**given[i]);
      inputs.push_back(*biases[i]);
      reference_index.push_back(6 + i);
    }
    const auto [q, k, v] = op::qkv_projection(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4],
                                              inputs[5], biases[0], biases[1], biases[2], H);
    for (const at::Tensor& out : {q, k, v}) {
      CHECK(out.scalar_type() == dtype);
      CHECK(out.is_contiguous());
      CHECK(out.requires_grad());
    }
    CHECK_THAT(q, IsCloseTo(ref_q, out_tol));
    CHECK_THAT(k, IsCloseTo(ref_k, out_tol));
    CHECK_THAT(v, IsCloseTo(ref_v, out_tol));
    const auto grads = torch::autograd::grad({q, k, v}, inputs, {grad_q, grad_k, grad_v});
    for (size_t i = 0; i < grads.size(); ++i) {
      INFO("gradient of input " << reference_index[i]);
      CHECK_THAT(grads[i], IsCloseTo(expected_grad(reference_index[i]), grad_tol));
    }
  }
  {
    INFO("qkv_projection_backward called directly");
    const auto grads =
        op::qkv_projection_backward(grad_q, grad_k, grad_v, in.query, in.key, in.value, in.q_weight,
                                    in.k_weight, in.v_weight, H);
    const at::Tensor all[9] = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                               std::get<3>(grads), std::get<4>(grads), std::get<5>(grads),
                               std::get<6>(grads), std::get<7>(grads), std::get<8>(grads)};
    for (size_t i = 0; i < 9; ++i) {
      INFO("gradient " << i);
      CHECK(all[i].scalar_type() == dtype);
      CHECK_THAT(all[i], IsCloseTo(expected_grad(i), grad_tol));
    }
  }
}

}  // namespace

TEST_CASE("qkv_projection matches the reference in every dtype, forward and backward",
          "[qkv_projection]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  check_projection_against_reference(
      random_projection_inputs(1, 2, 5, 7, 12, 12, 12, 12, 3, dtype));
}

TEST_CASE("qkv_projection with kdim and vdim different from E matches the reference",
          "[qkv_projection]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  check_projection_against_reference(random_projection_inputs(2, 3, 4, 6, 16, 10, 7, 5, 4, dtype));
}

TEST_CASE("qkv_projection without biases, or with only some, matches the reference",
          "[qkv_projection]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  ProjectionInputs in = random_projection_inputs(3, 2, 5, 5, 8, 8, 6, 6, 2, dtype);
  SECTION("no biases") {
    in.q_bias.reset();
    in.k_bias.reset();
    in.v_bias.reset();
  }
  SECTION("only k_bias") {
    in.q_bias.reset();
    in.v_bias.reset();
  }
  SECTION("q_bias and v_bias") { in.k_bias.reset(); }
  check_projection_against_reference(in);
}

TEST_CASE("qkv_projection with one head and with one feature per head matches the reference",
          "[qkv_projection]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  check_projection_against_reference(random_projection_inputs(4, 2, 3, 4, 6, 5, 5, 5, 1, dtype));
  check_projection_against_reference(random_projection_inputs(5, 2, 3, 4, 6, 5, 5, 5, 6, dtype));
}

TEST_CASE("qkv_projection of non-contiguous inputs, weights and biases matches the reference",
          "[qkv_projection][strides]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  ProjectionInputs in = random_projection_inputs(6, 2, 5, 6, 12, 9, 8, 7, 3, dtype,
                                                 /*with_biases=*/true, /*contiguous=*/false);
  REQUIRE_FALSE(in.query.is_contiguous());
  REQUIRE_FALSE(in.q_weight.is_contiguous());
  REQUIRE_FALSE(in.q_bias->is_contiguous());
  check_projection_against_reference(in);
}

TEST_CASE(
    "qkv_projection with an empty batch, no queries or no keys gives empty outputs and "
    "zero weight gradients",
    "[qkv_projection][sizes]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  SECTION("B = 0") {
    check_projection_against_reference(random_projection_inputs(7, 0, 3, 4, 8, 8, 8, 8, 2, dtype));
  }
  SECTION("L = 0") {
    check_projection_against_reference(random_projection_inputs(8, 2, 0, 4, 8, 8, 8, 8, 2, dtype));
  }
  SECTION("S = 0") {
    check_projection_against_reference(random_projection_inputs(9, 2, 3, 0, 8, 8, 8, 8, 2, dtype));
  }
}

TEST_CASE("qkv_projection_backward counts a missing gradient as zeros", "[qkv_projection]") {
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat);
  const ProjectionInputs in = random_projection_inputs(10, 2, 4, 5, 8, 8, 6, 7, 2, dtype);
  at::Generator gen = seeded(100);
  const at::Tensor grad_q = random_tensor(gen, {2, 2, 4, 4}, dtype);
  const auto with_k_missing =
      op::qkv_projection_backward(grad_q, std::nullopt, std::nullopt, in.query, in.key, in.value,
                                  in.q_weight, in.k_weight, in.v_weight, 2);
  const auto with_k_zeros = op::qkv_projection_backward(
      grad_q, at::zeros({2, 2, 5, 4}, dtype), at::zeros({2, 2, 5, 4}, dtype), in.query, in.key,
      in.value, in.q_weight, in.k_weight, in.v_weight, 2);
  CHECK(all_zero(std::get<1>(with_k_missing)));  // grad_key
  CHECK(all_zero(std::get<4>(with_k_missing)));  // grad_k_weight
  CHECK(all_zero(std::get<7>(with_k_missing)));  // grad_k_bias
  CHECK(all_zero(std::get<2>(with_k_missing)));  // grad_value
  CHECK(std::get<1>(with_k_missing).sizes() == in.key.sizes());
  CHECK(std::get<4>(with_k_missing).sizes() == in.k_weight.sizes());
  CHECK_THAT(std::get<0>(with_k_missing),
             IsCloseTo(std::get<0>(with_k_zeros), output_tolerance(dtype)));
  CHECK_THAT(std::get<3>(with_k_missing),
             IsCloseTo(std::get<3>(with_k_zeros), output_tolerance(dtype)));

  // Through autograd: a loss on q alone leaves key and k_weight with no (or zero) gradient.
  const at::Tensor query = leaf(in.query), key = leaf(in.key), k_weight = leaf(in.k_weight);
  const auto [q, k, v] = op::qkv_projection(query, key, in.value, in.q_weight, k_weight,
                                            in.v_weight, in.q_bias, in.k_bias, in.v_bias, 2);
  const auto grads = torch::autograd::grad({q}, {query, key, k_weight}, {grad_q}, std::nullopt,
                                           false, /*allow_unused=*/true);
  CHECK_THAT(grads[0], IsCloseTo(std::get<0>(with_k_zeros), output_tolerance(dtype)));
  CHECK((!grads[1].defined() || all_zero(grads[1])));
  CHECK((!grads[2].defined() || all_zero(grads[2])));
}

TEST_CASE("the typed C++ entry point qkv_projection gives what the dispatcher-by-name call gives",
          "[qkv_projection]") {
  const ProjectionInputs in = random_projection_inputs(11, 2, 3, 4, 8, 8, 6, 7, 4, at::kFloat);
  const auto direct =
      qkv_attention::qkv_projection(in.query, in.key, in.value, in.q_weight, in.k_weight,
                                    in.v_weight, in.q_bias, in.k_bias, in.v_bias, in.num_heads);
  const auto named = op::qkv_projection(in.query, in.key, in.value, in.q_weight, in.k_weight,
                                        in.v_weight, in.q_bias, in.k_bias, in.v_bias, in.num_heads);
  CHECK(bitwise_equal(std::get<0>(direct), std::get<0>(named)));
  CHECK(bitwise_equal(std::get<1>(direct), std::get<1>(named)));
  CHECK(bitwise_equal(std::get<2>(direct), std::get<2>(named)));
}

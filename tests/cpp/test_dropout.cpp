// Dropout on the attention weights: reproducible under torch::manual_seed, the forward and the
// backward use the one keep-mask that _attention_dropout_mask regenerates from rng_state, and
// the kept weights are scaled by 1 / (1 - p).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <catch2/catch.hpp>

#include <algorithm>

#include "attention_harness.h"
#include "test_support.h"

using namespace qkv_attention::testing;
namespace op = qkv_attention::testing::by_name;

TEST_CASE(
    "attention with dropout: the same torch::manual_seed gives the same output and "
    "gradients, another seed another output",
    "[dropout]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  const AttentionInputs in = random_attention_inputs(30, 2, 2, 6, 9, 8, 8, dtype);
  const at::Tensor q = in.query.detach().requires_grad_(true);
  auto run = [&](uint64_t seed) {
    at::manual_seed(seed);
    const at::Tensor out = op::attention(q, in.key, in.value, std::nullopt, 0.4);
    const at::Tensor grad = torch::autograd::grad({out}, {q}, {at::ones_like(out)})[0];
    return std::make_pair(out, grad);
  };
  const auto [out_a, grad_a] = run(123);
  const auto [out_b, grad_b] = run(123);
  const auto [out_c, grad_c] = run(124);
  CHECK(bitwise_equal(out_a, out_b));
  CHECK(bitwise_equal(grad_a, grad_b));
  CHECK_FALSE(bitwise_equal(out_a, out_c));
}

TEST_CASE(
    "attention with dropout matches the reference under the keep-mask of "
    "_attention_dropout_mask, forward and backward, in every dtype",
    "[dropout]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  const double p = GENERATE(0.1, 0.5, 0.9);
  INFO("dropout_p " << p);
  AttentionInputs in = random_attention_inputs(31, 2, 3, 7, 10, 8, 6, dtype);
  in.dropout_p = p;
  in.dropout_seed = 4321;
  check_attention_against_reference(in);
}

TEST_CASE("dropout combines with masks, causal and a float mask's gradient", "[dropout]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  constexpr int64_t B = 2, H = 2, L = 6, S = 8;
  AttentionInputs in = random_attention_inputs(32, B, H, L, S, 4, 4, dtype);
  at::Generator gen = seeded(320);
  in.attn_mask = random_tensor(gen, {H, L, S}, dtype);
  in.attn_mask_requires_grad = true;
  in.key_padding_mask = random_bool_mask(gen, {B, S}, 0.8);
  in.is_causal = true;
  in.dropout_p = 0.3;
  in.dropout_seed = 99;
  check_attention_against_reference(in);
}

TEST_CASE(
    "the returned weights are the softmax weights times keep / (1 - p), and about 1 - p "
    "of them are kept",
    "[dropout]") {
  constexpr int64_t B = 2, H = 4, L = 64, S = 64;
  constexpr double p = 0.25;
  const AttentionInputs in = random_attention_inputs(33, B, H, L, S, 8, 8, at::kDouble);
  const auto [out_plain, weights_plain] = op::attention_with_weights(in.query, in.key, in.value);
  at::manual_seed(7);
  const auto [output, logsumexp, weights, rng_state] = op::attention_forward(
      in.query, in.key, in.value, std::nullopt, std::nullopt, p, false, std::nullopt, true);
  const at::Tensor keep = op::attention_dropout_mask(rng_state, B, H, L, S, p);
  REQUIRE(keep.scalar_type() == at::kBool);
  REQUIRE(keep.sizes().vec() == std::vector<int64_t>{B, H, L, S});
  CHECK_THAT(weights, IsCloseTo(weights_plain * keep / (1 - p), output_tolerance(at::kDouble)));
  // 32768 Bernoulli(0.75) draws: the standard deviation of the kept share is 0.0024, so
  // 0.015 is more than 6 sigma.
  const double kept = keep.to(at::kDouble).mean().item<double>();
  CHECK(kept == Approx(1 - p).margin(0.015));
  // A second call draws a fresh seed: another mask.
  const auto next = op::attention_forward(in.query, in.key, in.value, std::nullopt, std::nullopt, p,
                                          false, std::nullopt, false);
  CHECK_FALSE(bitwise_equal(std::get<3>(next), rng_state));
}

TEST_CASE("attention without dropout draws nothing from torch's default generator", "[dropout]") {
  const AttentionInputs in = random_attention_inputs(34, 1, 2, 3, 4, 8, 8, at::kFloat);
  at::manual_seed(5);
  const at::Tensor expected_next = at::rand({4});
  at::manual_seed(5);
  op::attention(in.query, in.key, in.value, std::nullopt, 0.0, true);
  op::attention_with_weights(in.query, in.key, in.value, std::nullopt, 0.0, false);
  CHECK(bitwise_equal(at::rand({4}), expected_next));
  // while with dropout the composite ops draw (so the check above can fail)
  at::manual_seed(5);
  op::attention(in.query, in.key, in.value, std::nullopt, 0.5, true);
  CHECK_FALSE(bitwise_equal(at::rand({4}), expected_next));
}

TEST_CASE(
    "_attention_forward is a pure function of rng_state: the same state gives the same "
    "mask, whatever the generator does",
    "[dropout]") {
  const AttentionInputs in = random_attention_inputs(35, 1, 2, 9, 11, 8, 8, at::kFloat);
  const at::Tensor rng_state = at::tensor({int64_t(0x1234'5678'9abc), int64_t(99)}, at::kLong);
  auto run = [&] {
    return std::get<2>(op::handle("qkv_attention::_attention_forward")
                           .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                               double, bool, std::optional<double>, bool,
                               const std::optional<at::Tensor>&, bool, QKV_TEST_VARIANT_TYPES)>()
                           .call(in.query, in.key, in.value, std::nullopt, std::nullopt, 0.5, false,
                                 std::nullopt, true, rng_state, false, op::kNoWindow, 0.0,
                                 std::nullopt, std::nullopt));
  };
  const at::Tensor first = run();
  at::rand({100});
  CHECK(bitwise_equal(run(), first));
  CHECK(bitwise_equal(first != 0, op::attention_dropout_mask(rng_state, 1, 2, 9, 11, 0.5)));
}

TEST_CASE("dropout_p = 1 drops every weight: zero output and zero gradients", "[dropout]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  AttentionInputs in = random_attention_inputs(35, 2, 2, 4, 5, 8, 8, dtype);
  in.dropout_p = 1.0;
  in.dropout_seed = 1;
  check_attention_against_reference(in);

  const at::Tensor q = in.query.detach().requires_grad_(true);
  const at::Tensor k = in.key.detach().requires_grad_(true);
  const at::Tensor v = in.value.detach().requires_grad_(true);
  const at::Tensor out = op::attention(q, k, v, std::nullopt, 1.0);
  CHECK(all_zero(out));
  for (const at::Tensor& g : torch::autograd::grad({out}, {q, k, v}, {at::ones_like(out)})) {
    CHECK(all_zero(g));
  }
}

TEST_CASE("the dropout keep-mask and the output do not depend on the number of threads",
          "[dropout]") {
  // The Philox stream is indexed by each weight's position, not by the thread that draws it.
  const AttentionInputs in = random_attention_inputs(36, 2, 3, 33, 40, 8, 8, at::kFloat);
  const int threads_before = at::get_num_threads();
  auto run = [&](int threads) {
    at::set_num_threads(threads);
    at::manual_seed(77);
    return op::attention_with_weights(in.query, in.key, in.value, std::nullopt, 0.5);
  };
  const auto [out_one, weights_one] = run(1);
  const auto [out_many, weights_many] = run(std::max(2, threads_before));
  at::set_num_threads(threads_before);
  CHECK(bitwise_equal(weights_one.eq(0), weights_many.eq(0)));
  CHECK_THAT(out_many, IsCloseTo(out_one, output_tolerance(at::kFloat)));
}

// merge_heads against the plain LibTorch reference (head concatenation, then at::linear),
// forward and backward, in every dtype: with and without bias, non-contiguous x and weight,
// odd and empty sizes. The backward is checked both through torch::autograd::grad and by
// calling merge_heads_backward through the dispatcher.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <optional>
#include <vector>

#include "ops/merge_heads.h"
#include "ops_by_name.h"
#include "reference.h"
#include "test_support.h"

using namespace qkv_attention::testing;
namespace op = qkv_attention::testing::by_name;

namespace {

struct MergeInputs {
  at::Tensor x;                        // (B, H, L, D)
  at::Tensor out_weight;               // (Eout, H*D)
  std::optional<at::Tensor> out_bias;  // (Eout,) or None
};

// Standard normal x, the weight scaled by 1/sqrt(H*D) as nn.Linear initialises it.
MergeInputs random_merge_inputs(uint64_t seed, int64_t B, int64_t H, int64_t L, int64_t D,
                                int64_t Eout, at::ScalarType dtype, bool with_bias = true,
                                bool contiguous = true) {
  at::Generator gen = seeded(seed);
  MergeInputs in;
  in.x = random_tensor(gen, {B, H, L, D}, dtype, contiguous);
  const double fan_in = std::max<double>(1.0, static_cast<double>(H * D));
  in.out_weight = random_tensor(gen, {Eout, H * D}, dtype, contiguous, 1.0 / std::sqrt(fan_in));
  if (with_bias) in.out_bias = random_tensor(gen, {Eout}, dtype, contiguous, 0.5);
  return in;
}

void check_merge_heads_against_reference(const MergeInputs& in, uint64_t grad_seed = 5) {
  const at::ScalarType dtype = in.x.scalar_type();
  const Tolerance out_tol = output_tolerance(dtype), grad_tol = gradient_tolerance(dtype);
  const int64_t B = in.x.size(0), L = in.x.size(2), Eout = in.out_weight.size(0);
  INFO("dtype " << dtype << ", x " << in.x.sizes() << ", out_weight " << in.out_weight.sizes()
                << ", bias " << in.out_bias.has_value());
  at::Generator gen = seeded(grad_seed);
  const at::Tensor grad_output = random_tensor(gen, {B, L, Eout}, dtype);

  // The reference always has a bias (zeros for None): merge_heads_backward returns its
  // gradient either way.
  const at::Tensor rx = in.x.detach().to(at::kDouble).requires_grad_(true);
  const at::Tensor rw = in.out_weight.detach().to(at::kDouble).requires_grad_(true);
  const at::Tensor rb = (in.out_bias.has_value() ? *in.out_bias : at::zeros({Eout}, dtype))
                            .detach()
                            .to(at::kDouble)
                            .requires_grad_(true);
  const at::Tensor ref_out = reference::merge_heads(rx, rw, rb);
  const auto ref_grads =
      torch::autograd::grad({ref_out}, {rx, rw, rb}, {grad_output.to(at::kDouble)}, std::nullopt,
                            false, /*allow_unused=*/true);
  auto expected_grad = [&](size_t i, const at::Tensor& like) {
    return ref_grads[i].defined() ? ref_grads[i] : at::zeros_like(like);
  };

  {
    INFO("merge_heads differentiated by torch::autograd::grad");
    const at::Tensor x = in.x.detach().requires_grad_(true);
    const at::Tensor w = in.out_weight.detach().requires_grad_(true);
    std::optional<at::Tensor> b;
    std::vector<at::Tensor> inputs = {x, w};
    if (in.out_bias.has_value()) {
      b = in.out_bias->detach().requires_grad_(true);
      inputs.push_back(*b);
    }
    const at::Tensor out = op::merge_heads(x, w, b);
    CHECK(out.scalar_type() == dtype);
    CHECK(out.is_contiguous());
    CHECK_THAT(out, IsCloseTo(ref_out, out_tol));
    const auto grads = torch::autograd::grad({out}, inputs, {grad_output});
    CHECK_THAT(grads[0], IsCloseTo(expected_grad(0, rx), grad_tol));
    CHECK_THAT(grads[1], IsCloseTo(expected_grad(1, rw), grad_tol));
    if (b.has_value()) CHECK_THAT(grads[2], IsCloseTo(expected_grad(2, rb), grad_tol));
  }
  {
    INFO("merge_heads_backward called directly");
    const auto [gx, gw, gb] = op::merge_heads_backward(grad_output, in.x, in.out_weight);
    CHECK(gx.scalar_type() == dtype);
    CHECK_THAT(gx, IsCloseTo(expected_grad(0, rx), grad_tol));
    CHECK_THAT(gw, IsCloseTo(expected_grad(1, rw), grad_tol));
    CHECK_THAT(gb, IsCloseTo(expected_grad(2, rb), grad_tol));
  }
}

}  // namespace

TEST_CASE(
    "merge_heads matches the reference in every dtype, forward and backward, with and "
    "without bias",
    "[merge_heads]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  const bool with_bias = GENERATE(true, false);
  check_merge_heads_against_reference(random_merge_inputs(1, 2, 3, 5, 4, 10, dtype, with_bias));
}

TEST_CASE("merge_heads of non-contiguous x and weights matches the reference",
          "[merge_heads][strides]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  SECTION("permuted and strided x, out_weight and out_bias") {
    const MergeInputs in = random_merge_inputs(2, 2, 3, 5, 4, 7, dtype, true, false);
    REQUIRE_FALSE(in.x.is_contiguous());
    REQUIRE_FALSE(in.out_weight.is_contiguous());
    check_merge_heads_against_reference(in);
  }
  SECTION("x in (B, L, H, D) storage, as attention outputs are often laid out") {
    at::Generator gen = seeded(20);
    MergeInputs in = random_merge_inputs(3, 2, 3, 5, 4, 6, dtype);
    in.x = random_tensor(gen, {2, 5, 3, 4}, dtype).transpose(1, 2);
    check_merge_heads_against_reference(in);
  }
}

TEST_CASE(
    "merge_heads with one head, one feature, one output and empty sizes matches the "
    "reference",
    "[merge_heads][sizes]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  check_merge_heads_against_reference(random_merge_inputs(4, 2, 1, 3, 8, 5, dtype));
  check_merge_heads_against_reference(random_merge_inputs(5, 2, 4, 3, 1, 1, dtype));
  check_merge_heads_against_reference(random_merge_inputs(6, 1, 1, 1, 1, 1, dtype));
  check_merge_heads_against_reference(random_merge_inputs(7, 0, 2, 3, 4, 5, dtype));  // B = 0
  check_merge_heads_against_reference(random_merge_inputs(8, 2, 2, 0, 4, 5, dtype));  // L = 0
}

TEST_CASE("the typed C++ entry point merge_heads gives what the dispatcher-by-name call gives",
          "[merge_heads]") {
  const MergeInputs in = random_merge_inputs(9, 2, 3, 4, 5, 6, at::kFloat);
  CHECK(bitwise_equal(qkv_attention::merge_heads(in.x, in.out_weight, in.out_bias),
                      op::merge_heads(in.x, in.out_weight, in.out_bias)));
  const at::Tensor grad = at::ones({2, 4, 6});
  const auto direct = qkv_attention::merge_heads_backward(grad, in.x, in.out_weight);
  const auto named = op::merge_heads_backward(grad, in.x, in.out_weight);
  CHECK(bitwise_equal(std::get<0>(direct), std::get<0>(named)));
  CHECK(bitwise_equal(std::get<1>(direct), std::get<1>(named)));
}

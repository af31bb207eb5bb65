// The attention operator against the plain LibTorch reference (reference.h), forward and
// backward, in every dtype: masks of every kind and broadcast shape, causal, custom scale,
// odd sizes, non-contiguous inputs and rows with no key to attend to. Each case goes through
// check_attention_against_reference (attention_harness.h): forward op + backward op called
// directly, `attention` under autograd, and `attention_with_weights`, all found by name.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_harness.h"
#include "ops/attention.h"
#include "test_support.h"

using namespace qkv_attention::testing;
namespace op = qkv_attention::testing::by_name;

namespace {

constexpr double kMinusInf = -std::numeric_limits<double>::infinity();

// A float mask of `sizes`: normal values with a spread of 2, so it visibly reshapes the softmax.
at::Tensor random_float_mask(at::Generator& gen, at::IntArrayRef sizes, at::ScalarType dtype) {
  return random_tensor(gen, sizes, dtype, true, 2.0);
}

}  // namespace

TEST_CASE("attention matches the reference in every dtype, forward and backward", "[attention]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  check_attention_against_reference(random_attention_inputs(1, 2, 3, 5, 7, 8, 8, dtype));
}

TEST_CASE("attention with D != Dv and longer sequences matches the reference", "[attention]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  // Odd sizes, S not a multiple of any vector width, D != Dv in both directions.
  check_attention_against_reference(random_attention_inputs(2, 2, 2, 33, 47, 5, 11, dtype));
  check_attention_against_reference(random_attention_inputs(3, 1, 3, 17, 9, 16, 3, dtype));
}

TEST_CASE("attention with a custom scale (including 0 and negative) matches the reference",
          "[attention]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  const double scale = GENERATE(0.3, 1.7, 0.0, -0.75);
  AttentionInputs in = random_attention_inputs(4, 2, 2, 6, 9, 8, 4, dtype);
  in.scale = scale;
  INFO("scale " << scale);
  check_attention_against_reference(in);
}

TEST_CASE("attention with a bool attn_mask of every broadcastable shape matches the reference",
          "[attention][mask]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  constexpr int64_t B = 2, H = 3, L = 5, S = 7;
  const std::vector<int64_t> shape = GENERATE(
      std::vector<int64_t>{B, H, L, S}, std::vector<int64_t>{L, S}, std::vector<int64_t>{S},
      std::vector<int64_t>{1, H, 1, S}, std::vector<int64_t>{B, 1, L, 1},
      std::vector<int64_t>{H, L, S}, std::vector<int64_t>{B, 1, 1, S});
  INFO("attn_mask shape " << at::IntArrayRef(shape));
  AttentionInputs in = random_attention_inputs(5, B, H, L, S, 8, 6, dtype);
  at::Generator gen = seeded(50);
  in.attn_mask = random_bool_mask(gen, shape);
  check_attention_against_reference(in);
}

TEST_CASE(
    "attention with a float attn_mask of every broadcastable shape matches the reference, "
    "mask gradient included",
    "[attention][mask]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  constexpr int64_t B = 2, H = 3, L = 5, S = 7;
  const std::vector<int64_t> shape = GENERATE(
      std::vector<int64_t>{B, H, L, S}, std::vector<int64_t>{L, S}, std::vector<int64_t>{S},
      std::vector<int64_t>{1, H, 1, S}, std::vector<int64_t>{B, 1, L, 1},
      std::vector<int64_t>{1, 1, 1, 1}, std::vector<int64_t>{});
  INFO("attn_mask shape " << at::IntArrayRef(shape));
  AttentionInputs in = random_attention_inputs(6, B, H, L, S, 8, 6, dtype);
  at::Generator gen = seeded(60);
  in.attn_mask = random_float_mask(gen, shape, dtype);
  in.attn_mask_requires_grad = true;
  check_attention_against_reference(in);
}

TEST_CASE("attention with a float attn_mask holding -inf entries matches the reference",
          "[attention][mask]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  AttentionInputs in = random_attention_inputs(7, 2, 2, 6, 8, 4, 4, dtype);
  at::Generator gen = seeded(70);
  // The additive form of a bool mask, as nn.MultiheadAttention users build it.
  const at::Tensor blocked = random_bool_mask(gen, {6, 8}, 0.3);
  in.attn_mask = at::zeros({6, 8}, dtype).masked_fill(blocked, kMinusInf);
  in.attn_mask_requires_grad = GENERATE(false, true);
  check_attention_against_reference(in);
}

TEST_CASE(
    "attention with a key_padding_mask (bool or float) matches the reference, alone and "
    "together with an attn_mask",
    "[attention][mask]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  constexpr int64_t B = 3, H = 2, L = 4, S = 6;
  AttentionInputs in = random_attention_inputs(8, B, H, L, S, 8, 5, dtype);
  at::Generator gen = seeded(80);
  SECTION("bool key_padding_mask") { in.key_padding_mask = random_bool_mask(gen, {B, S}); }
  SECTION("float key_padding_mask, with its gradient") {
    in.key_padding_mask = random_float_mask(gen, {B, S}, dtype);
    in.key_padding_mask_requires_grad = true;
  }
  SECTION("bool key_padding_mask and float attn_mask") {
    in.key_padding_mask = random_bool_mask(gen, {B, S});
    in.attn_mask = random_float_mask(gen, {L, S}, dtype);
    in.attn_mask_requires_grad = true;
  }
  SECTION("float key_padding_mask and bool attn_mask") {
    in.key_padding_mask = random_float_mask(gen, {B, S}, dtype);
    in.key_padding_mask_requires_grad = true;
    in.attn_mask = random_bool_mask(gen, {B, H, L, S});
  }
  SECTION("both float, each with or without its gradient") {
    in.key_padding_mask = random_float_mask(gen, {B, S}, dtype);
    in.attn_mask = random_float_mask(gen, {1, H, L, S}, dtype);
    for (const bool mask_grad : {false, true}) {
      for (const bool padding_grad : {false, true}) {
        INFO("attn_mask requires grad " << mask_grad << ", key_padding_mask " << padding_grad);
        in.attn_mask_requires_grad = mask_grad;
        in.key_padding_mask_requires_grad = padding_grad;
        check_attention_against_reference(in);
      }
    }
    return;
  }
  check_attention_against_reference(in);
}

TEST_CASE("causal attention matches the reference for L < S, L == S and L > S",
          "[attention][causal]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  const std::pair<int64_t, int64_t> lengths =
      GENERATE(std::make_pair(int64_t(5), int64_t(5)), std::make_pair(int64_t(3), int64_t(9)),
               std::make_pair(int64_t(9), int64_t(3)), std::make_pair(int64_t(1), int64_t(4)),
               std::make_pair(int64_t(4), int64_t(1)));
  INFO("L = " << lengths.first << ", S = " << lengths.second);
  AttentionInputs in = random_attention_inputs(9, 2, 2, lengths.first, lengths.second, 8, 6, dtype);
  in.is_causal = true;
  check_attention_against_reference(in);
}

TEST_CASE("causal attention combines with attn_mask and key_padding_mask", "[attention][causal]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  constexpr int64_t B = 2, H = 2, L = 7, S = 10;
  AttentionInputs in = random_attention_inputs(10, B, H, L, S, 8, 8, dtype);
  at::Generator gen = seeded(100);
  in.is_causal = true;
  in.attn_mask = random_float_mask(gen, {B, 1, L, S}, dtype);
  in.attn_mask_requires_grad = true;
  in.key_padding_mask = random_bool_mask(gen, {B, S}, 0.8);
  in.scale = 0.4;
  check_attention_against_reference(in);
}

TEST_CASE("query rows with no key to attend to give zero outputs and zero, finite gradients",
          "[attention][mask]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  constexpr int64_t B = 2, H = 2, L = 4, S = 5;
  AttentionInputs in = random_attention_inputs(11, B, H, L, S, 8, 6, dtype);
  // (b, h, i) of one row that must come out as zeros; -1 in h or b: every head or batch entry.
  int64_t dead_batch = -1, dead_head = -1, dead_row = -1;
  SECTION("a bool attn_mask row of all false") {
    at::Tensor mask = at::ones({B, H, L, S}, at::kBool);
    mask[1][0][2].fill_(false);
    in.attn_mask = mask;
    dead_batch = 1, dead_head = 0, dead_row = 2;
  }
  SECTION("a float attn_mask row of all -inf, whose gradient is asked for") {
    at::Tensor mask = at::zeros({L, S}, dtype);
    mask[3].fill_(kMinusInf);
    in.attn_mask = mask;
    in.attn_mask_requires_grad = true;
    dead_row = 3;
  }
  SECTION("a key_padding_mask that hides every key of a batch entry") {
    at::Tensor padding = at::ones({B, S}, at::kBool);
    padding[0].fill_(false);
    in.key_padding_mask = padding;
    dead_batch = 0;
  }
  SECTION("causal with an attn_mask that hides the one key the first query may see") {
    at::Tensor mask = at::ones({L, S}, at::kBool);
    mask[0][0] = false;
    in.attn_mask = mask;
    in.is_causal = true;
    dead_row = 0;
  }
  SECTION("every row fully masked") { in.attn_mask = at::zeros({1}, at::kBool); }
  check_attention_against_reference(in);

  // The reference gives these rows zeros too; check the contract directly as well.
  const at::Tensor q = in.query.detach().requires_grad_(true);
  const at::Tensor k = in.key.detach().requires_grad_(true);
  const at::Tensor v = in.value.detach().requires_grad_(true);
  const at::Tensor out =
      op::attention(q, k, v, in.attn_mask, 0.0, in.is_causal, std::nullopt, in.key_padding_mask);
  const auto grads = torch::autograd::grad({out}, {q, k, v}, {at::ones_like(out)});
  auto pick = [&](at::Tensor t) {  // the dead rows of a (B, H, L, *) tensor
    if (dead_batch >= 0) t = t.select(0, dead_batch).unsqueeze(0);
    if (dead_head >= 0) t = t.select(1, dead_head).unsqueeze(1);
    if (dead_row >= 0) t = t.select(2, dead_row).unsqueeze(2);
    return t;
  };
  CHECK(all_zero(pick(out)));
  CHECK(all_zero(pick(grads[0])));
  for (const at::Tensor& g : grads) CHECK(all_finite(g));
}

TEST_CASE("attention with a single query (L = 1) or a single key (S = 1) matches the reference",
          "[attention][sizes]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  check_attention_against_reference(random_attention_inputs(12, 2, 3, 1, 6, 8, 8, dtype));
  check_attention_against_reference(random_attention_inputs(13, 2, 3, 6, 1, 8, 8, dtype));
  check_attention_against_reference(random_attention_inputs(14, 1, 1, 1, 1, 1, 1, dtype));
  AttentionInputs causal = random_attention_inputs(15, 2, 2, 1, 1, 4, 4, dtype);
  causal.is_causal = true;
  check_attention_against_reference(causal);
}

TEST_CASE("attention with no keys (S = 0) gives zeros and zero gradients", "[attention][sizes]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  AttentionInputs in = random_attention_inputs(16, 2, 3, 4, 0, 8, 5, dtype);
  check_attention_against_reference(in);

  const at::Tensor q = in.query.detach().requires_grad_(true);
  const at::Tensor k = in.key.detach().requires_grad_(true);
  const at::Tensor v = in.value.detach().requires_grad_(true);
  const at::Tensor out = op::attention(q, k, v);
  REQUIRE(out.sizes().vec() == std::vector<int64_t>{2, 3, 4, 5});
  CHECK(all_zero(out));
  const auto grads = torch::autograd::grad({out}, {q, k, v}, {at::ones_like(out)});
  CHECK(all_zero(grads[0]));
  CHECK(grads[1].sizes() == k.sizes());
  CHECK(grads[2].sizes() == v.sizes());
}

TEST_CASE("attention with an empty batch (B = 0) or no queries (L = 0) gives empty outputs",
          "[attention][sizes]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  SECTION("B = 0") {
    AttentionInputs in = random_attention_inputs(17, 0, 2, 3, 4, 8, 6, dtype);
    in.is_causal = true;
    check_attention_against_reference(in);
    CHECK(op::attention(in.query, in.key, in.value).sizes().vec() ==
          std::vector<int64_t>{0, 2, 3, 6});
  }
  SECTION("L = 0: empty output, and zero gradients for key and value") {
    AttentionInputs in = random_attention_inputs(18, 2, 2, 0, 4, 8, 6, dtype);
    check_attention_against_reference(in);
    const at::Tensor k = in.key.detach().requires_grad_(true);
    const at::Tensor v = in.value.detach().requires_grad_(true);
    const at::Tensor out = op::attention(in.query, k, v);
    CHECK(out.sizes().vec() == std::vector<int64_t>{2, 2, 0, 6});
    const auto grads = torch::autograd::grad({out}, {k, v}, {at::ones_like(out)});
    CHECK(all_zero(grads[0]));
    CHECK(all_zero(grads[1]));
  }
  SECTION("H = 0") {
    check_attention_against_reference(random_attention_inputs(19, 2, 0, 3, 4, 8, 6, dtype));
  }
}

TEST_CASE("attention with zero features per head (D = 0) averages the values",
          "[attention][sizes]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  // Every score is 0, so each row's weights are uniform over the keys it may see.
  AttentionInputs in = random_attention_inputs(20, 2, 2, 4, 5, 0, 3, dtype);
  in.is_causal = GENERATE(false, true);
  check_attention_against_reference(in);
}

TEST_CASE("attention of non-contiguous query, key, value and masks matches the reference",
          "[attention][strides]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  constexpr int64_t B = 2, H = 3, L = 6, S = 7, D = 8, Dv = 5;
  SECTION("permuted and strided query, key, value and attn_mask") {
    AttentionInputs in =
        random_attention_inputs(21, B, H, L, S, D, Dv, dtype, /*contiguous=*/false);
    at::Generator gen = seeded(210);
    in.attn_mask = random_tensor(gen, {B, H, L, S}, dtype, /*contiguous=*/false);
    in.attn_mask_requires_grad = true;
    in.key_padding_mask = random_bool_mask(gen, {S, B}, 0.8).t();  // (B, S), transposed
    REQUIRE_FALSE(in.query.is_contiguous());
    REQUIRE_FALSE(in.attn_mask->is_contiguous());
    check_attention_against_reference(in);
  }
  SECTION("(B, L, H, D) storage viewed as (B, H, L, D), as a fused projection produces") {
    at::Generator gen = seeded(211);
    AttentionInputs in;
    in.query = random_tensor(gen, {B, L, H, D}, dtype).transpose(1, 2);
    in.key = random_tensor(gen, {B, S, H, D}, dtype).transpose(1, 2);
    in.value = random_tensor(gen, {B, S, H, Dv}, dtype).transpose(1, 2);
    in.is_causal = true;
    check_attention_against_reference(in);
  }
  SECTION("key and value shared by every head (stride 0), an expanded bool mask") {
    at::Generator gen = seeded(212);
    AttentionInputs in;
    in.query = random_tensor(gen, {B, H, L, D}, dtype);
    in.key = random_tensor(gen, {B, 1, S, D}, dtype).expand({B, H, S, D});
    in.value = random_tensor(gen, {B, 1, S, Dv}, dtype).expand({B, H, S, Dv});
    in.attn_mask = random_bool_mask(gen, {L, S}).expand({B, H, L, S});
    check_attention_against_reference(in);
  }
}

TEST_CASE("attention gradients flow only to the inputs that require them", "[attention]") {
  const at::ScalarType dtype = GENERATE(at::kDouble, at::kFloat);
  AttentionInputs in = random_attention_inputs(22, 2, 2, 4, 5, 8, 8, dtype);
  at::Generator gen = seeded(220);
  const at::Tensor grad_output = random_tensor(gen, {2, 2, 4, 8}, dtype);
  const ReferenceRun ref = run_reference(in, at::Tensor(), grad_output);
  const Tolerance tol = gradient_tolerance(dtype);

  const at::Tensor v = in.value.detach().requires_grad_(true);
  const at::Tensor out = op::attention(in.query, in.key, v);
  CHECK(out.requires_grad());
  CHECK_THAT(torch::autograd::grad({out}, {v}, {grad_output})[0], IsCloseTo(ref.grads[2], tol));

  const at::Tensor q = in.query.detach().requires_grad_(true);
  const at::Tensor out_q = op::attention(q, in.key, in.value);
  CHECK_THAT(torch::autograd::grad({out_q}, {q}, {grad_output})[0], IsCloseTo(ref.grads[0], tol));

  // No input requires grad: the output is a plain tensor.
  CHECK_FALSE(op::attention(in.query, in.key, in.value).requires_grad());
  // Grad mode off: no graph, even when the inputs require grad.
  at::NoGradGuard no_grad;
  CHECK_FALSE(op::attention(q, in.key, v).requires_grad());
}

TEST_CASE("attention_with_weights backpropagates through both the output and the weights",
          "[attention]") {
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  constexpr int64_t B = 2, H = 2, L = 5, S = 6, Dv = 4;
  AttentionInputs in = random_attention_inputs(23, B, H, L, S, 8, Dv, dtype);
  at::Generator gen = seeded(230);
  in.attn_mask = random_float_mask(gen, {L, S}, dtype);
  in.attn_mask_requires_grad = true;
  in.key_padding_mask = random_bool_mask(gen, {B, S}, 0.8);
  in.is_causal = GENERATE(false, true);
  const at::Tensor grad_output = random_tensor(gen, {B, H, L, Dv}, dtype);
  const at::Tensor grad_weights = random_tensor(gen, {B, H, L, S}, dtype);
  const ReferenceRun ref = run_reference(in, at::Tensor(), grad_output, grad_weights);
  const Tolerance out_tol = output_tolerance(dtype), grad_tol = gradient_tolerance(dtype);
  INFO("dtype " << dtype << ", causal " << in.is_causal);

  const at::Tensor q = in.query.detach().requires_grad_(true);
  const at::Tensor k = in.key.detach().requires_grad_(true);
  const at::Tensor v = in.value.detach().requires_grad_(true);
  const at::Tensor mask = in.attn_mask->detach().requires_grad_(true);
  const auto [out, weights] = op::attention_with_weights(q, k, v, mask, 0.0, in.is_causal,
                                                         std::nullopt, in.key_padding_mask);
  CHECK_THAT(out, IsCloseTo(ref.result.output, out_tol));
  CHECK_THAT(weights, IsCloseTo(ref.result.weights, out_tol));
  const auto grads =
      torch::autograd::grad({out, weights}, {q, k, v, mask}, {grad_output, grad_weights});
  CHECK_THAT(grads[0], IsCloseTo(ref.grads[0], grad_tol));
  CHECK_THAT(grads[1], IsCloseTo(ref.grads[1], grad_tol));
  CHECK_THAT(grads[2], IsCloseTo(ref.grads[2], grad_tol));
  CHECK_THAT(grads[3], IsCloseTo(ref.grads[3], grad_tol));

  // The backward op directly, given grad_weights.
  const auto [output, logsumexp, w, rng_state] =
      op::attention_forward(in.query, in.key, in.value, in.attn_mask, in.key_padding_mask, 0.0,
                            in.is_causal, std::nullopt, true);
  const auto [gq, gk, gv, gmask, gpadding, gsinks] = op::attention_backward(
      grad_output, grad_weights, in.query, in.key, in.value, output, logsumexp, in.attn_mask,
      in.key_padding_mask, 0.0, in.is_causal, std::nullopt, rng_state, true, false);
  CHECK_THAT(gq, IsCloseTo(ref.grads[0], grad_tol));
  CHECK_THAT(gk, IsCloseTo(ref.grads[1], grad_tol));
  CHECK_THAT(gv, IsCloseTo(ref.grads[2], grad_tol));
  CHECK_THAT(gmask, IsCloseTo(ref.grads[3], grad_tol));
  CHECK(gpadding.numel() == 0);  // a bool mask has no gradient
}

TEST_CASE("the typed C++ entry points of csrc/ops give what the dispatcher-by-name route gives",
          "[attention]") {
  AttentionInputs in = random_attention_inputs(24, 2, 2, 5, 6, 8, 8, at::kFloat);
  at::Generator gen = seeded(240);
  const at::Tensor mask = random_float_mask(gen, {5, 6}, at::kFloat);
  const at::Tensor padding = random_bool_mask(gen, {2, 6}, 0.8);
  CHECK(bitwise_equal(
      qkv_attention::attention(in.query, in.key, in.value, mask, 0.0, true, 0.5, padding),
      op::attention(in.query, in.key, in.value, mask, 0.0, true, 0.5, padding)));
  const auto [out_a, w_a] = qkv_attention::attention_with_weights(in.query, in.key, in.value, mask);
  const auto [out_b, w_b] = op::attention_with_weights(in.query, in.key, in.value, mask);
  CHECK(bitwise_equal(out_a, out_b));
  CHECK(bitwise_equal(w_a, w_b));
}

TEST_CASE(
    "attention over sequences longer than a kernel tile matches the reference, causal or "
    "not, with padding",
    "[attention][sizes]") {
  // Lengths just past powers of two and head sizes of real models, so that a blocked kernel
  // meets partial tiles in both directions.
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  const bool causal = GENERATE(false, true);
  SECTION("L = 67, S = 259, D = Dv = 64") {
    AttentionInputs in = random_attention_inputs(25, 1, 2, 67, 259, 64, 64, dtype);
    in.is_causal = causal;
    at::Generator gen = seeded(250);
    in.key_padding_mask = random_bool_mask(gen, {1, 259}, 0.9);
    check_attention_against_reference(in);
  }
  SECTION("L = 200, S = 70, D = 80, Dv = 32") {
    AttentionInputs in = random_attention_inputs(26, 1, 1, 200, 70, 80, 32, dtype);
    in.is_causal = causal;
    check_attention_against_reference(in);
  }
}

TEST_CASE("attention stays finite and accurate when the scores are far beyond exp's range",
          "[attention]") {
  // Scores of a few hundred: exp overflows float32 (and float16) unless the kernel subtracts
  // each row's maximum first. Outputs keep the usual allowances. Gradients are ill-conditioned
  // here: rounding a score s (or the logsumexp the backward recomputes the probabilities from)
  // costs |s| * eps, and dK multiplies that by the 60-times larger query. So the gradient
  // allowances grow with the largest |score| relative to the ~4 of the other tests (here ~55x).
  // (Measured in float32: ATen's own float32 softmax/matmul errs by 3e-5 on dK, the op by
  // 4e-4, against an allowance of 1.1e-3.)
  const at::ScalarType dtype = GENERATE(from_range(all_dtypes()));
  AttentionInputs in = random_attention_inputs(27, 2, 2, 9, 13, 8, 8, dtype);
  in.query = (in.query.to(at::kDouble) * 60).to(dtype);
  in.is_causal = GENERATE(false, true);
  const double max_score =
      (at::matmul(in.query.to(at::kDouble), in.key.to(at::kDouble).transpose(-2, -1)) /
       std::sqrt(8.0))
          .abs()
          .max()
          .item<double>();
  INFO("largest |score| " << max_score);
  REQUIRE(max_score > 200);  // beyond float32's exp range (88), as the test's name promises
  check_attention_against_reference(in, 7, std::max(1.0, max_score / 4));
}

// Bad inputs: every op rejects them at the boundary with a c10::Error (c10::TypeError for
// dtypes) whose message names the op, the argument and what was found. The CPU and the Meta
// kernels run the same checks, so each case runs on both devices.
#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "ops_by_name.h"
#include "test_support.h"

using namespace qkv_attention::testing;
using Catch::Contains;
namespace op = qkv_attention::testing::by_name;

// Rejected with `error_type`, and the message matches `matcher`.
#define CHECK_REJECTS(expression, error_type, matcher) \
  do {                                                 \
    CHECK_THROWS_AS(expression, error_type);           \
    CHECK_THROWS_WITH(expression, matcher);            \
  } while (false)

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// q (2, 3, 4, 8), k (2, 3, 5, 8), v (2, 3, 5, 6): valid attention inputs on `device`.
struct AttentionArgs {
  at::Tensor q, k, v;
  at::TensorOptions options;
};

AttentionArgs attention_args(at::Device device) {
  const at::TensorOptions options = at::TensorOptions().dtype(at::kFloat).device(device);
  return {at::zeros({2, 3, 4, 8}, options), at::zeros({2, 3, 5, 8}, options),
          at::zeros({2, 3, 5, 6}, options), options};
}

}  // namespace

namespace {

// query (2, 4, 8), key (2, 5, 6), value (2, 5, 7); E = 8 in 2 heads.
struct ProjectionArgs {
  at::Tensor query, key, value, q_weight, k_weight, v_weight, bias;
  at::TensorOptions options;
};

ProjectionArgs projection_args(at::Device device) {
  const at::TensorOptions o = at::TensorOptions().dtype(at::kFloat).device(device);
  return {at::zeros({2, 4, 8}, o), at::zeros({2, 5, 6}, o),
          at::zeros({2, 5, 7}, o), at::zeros({8, 8}, o),
          at::zeros({8, 6}, o),    at::zeros({8, 7}, o),
          at::zeros({8}, o),       o};
}

}  // namespace

TEST_CASE(
    "attention rejects query, key and value of the wrong rank or sizes, naming the "
    "argument and the sizes found",
    "[bad_inputs][attention]") {
  const at::Device device = GENERATE(at::Device(at::kCPU), at::Device(at::kMeta));
  INFO("device " << device);
  const auto [q, k, v, options] = attention_args(device);
  CHECK_REJECTS(op::attention(q.flatten(0, 1), k, v), c10::Error,
                Contains("attention") && Contains("query must be 4-D") && Contains("[6, 4, 8]"));
  CHECK_REJECTS(op::attention(q, k.unsqueeze(0), v), c10::Error, Contains("key must be 4-D"));
  CHECK_REJECTS(op::attention(q, k, v[0]), c10::Error, Contains("value must be 4-D"));
  CHECK_REJECTS(op::attention(q, at::zeros({2, 3, 5, 7}, options), v), c10::Error,
                Contains("key has 7 features per head but query has 8") &&
                    Contains("key has shape [2, 3, 5, 7]"));
  CHECK_REJECTS(op::attention(q, at::zeros({3, 3, 5, 8}, options), v), c10::Error,
                Contains("key has 3 batch entries but query has 2"));
  // Grouped-query attention: key/value may have fewer heads than query, a divisor of them.
  CHECK_REJECTS(
      op::attention(q, at::zeros({2, 2, 5, 8}, options), at::zeros({2, 2, 5, 6}, options)),
      c10::Error,
      Contains("key has 2 heads and query has 3") &&
          Contains("query's heads must be a multiple of key's"));
  CHECK_REJECTS(op::attention(q, at::zeros({2, 1, 5, 8}, options), v), c10::Error,
                Contains("value has 3 heads but key has 1"));
  CHECK_REJECTS(op::attention(q, k, at::zeros({2, 3, 4, 6}, options)), c10::Error,
                Contains("value has 4 positions but key has 5"));
  CHECK_REJECTS(op::attention(q, k, at::zeros({1, 3, 5, 6}, options)), c10::Error,
                Contains("value has 1 batch entries but query has 2"));
  CHECK_REJECTS(op::attention(q, k, at::zeros({2, 2, 5, 6}, options)), c10::Error,
                Contains("value has 2 heads but key has 3"));
}

TEST_CASE(
    "attention rejects unsupported and mixed dtypes with a c10::TypeError naming the "
    "argument",
    "[bad_inputs][attention]") {
  const at::Device device = GENERATE(at::Device(at::kCPU), at::Device(at::kMeta));
  INFO("device " << device);
  const auto [q, k, v, options] = attention_args(device);
  CHECK_REJECTS(op::attention(q.to(at::kInt), k, v), c10::TypeError,
                Contains("query must be float64, float32, bfloat16 or float16") && Contains("Int"));
  CHECK_REJECTS(op::attention(q, k.to(at::kComplexFloat), v), c10::TypeError,
                Contains("key must be float64, float32, bfloat16 or float16"));
  CHECK_REJECTS(op::attention(q, k.to(at::kDouble), v), c10::TypeError,
                Contains("key has dtype Double but query has dtype Float"));
  CHECK_REJECTS(op::attention(q, k, v.to(at::kHalf)), c10::TypeError,
                Contains("value has dtype Half but query has dtype Float"));
  CHECK_REJECTS(op::attention(q.to(at::kBFloat16), k.to(at::kBFloat16), v), c10::TypeError,
                Contains("value has dtype Float but query has dtype BFloat16"));
}

TEST_CASE(
    "attention rejects masks of the wrong dtype or shape, naming attn_mask or "
    "key_padding_mask",
    "[bad_inputs][attention][mask]") {
  const at::Device device = GENERATE(at::Device(at::kCPU), at::Device(at::kMeta));
  INFO("device " << device);
  const auto [q, k, v, options] = attention_args(device);
  CHECK_REJECTS(
      op::attention(q, k, v, at::zeros({4, 5}, options.dtype(at::kInt))), c10::TypeError,
      Contains("attn_mask must be bool or have the query's dtype Float") && Contains("Int"));
  CHECK_REJECTS(op::attention(q, k, v, at::zeros({4, 5}, options.dtype(at::kDouble))),
                c10::TypeError, Contains("attn_mask") && Contains("Double"));
  CHECK_REJECTS(
      op::attention(q, k, v, at::zeros({4, 6}, options)), c10::Error,
      Contains("attn_mask of shape [4, 6] cannot be broadcast") && Contains("(2, 3, 4, 5)"));
  CHECK_REJECTS(op::attention(q, k, v, at::zeros({1, 2, 3, 4, 5}, options.dtype(at::kBool))),
                c10::Error, Contains("attn_mask of shape [1, 2, 3, 4, 5]"));
  CHECK_REJECTS(op::attention(q, k, v, at::zeros({2, 2, 4, 5}, options)), c10::Error,
                Contains("attn_mask of shape [2, 2, 4, 5]"));
  const std::optional<at::Tensor> no_mask;
  auto with_padding = [&](const at::Tensor& padding) {
    return op::attention(q, k, v, no_mask, 0.0, false, std::nullopt, padding);
  };
  CHECK_REJECTS(with_padding(at::ones({2, 4}, options.dtype(at::kBool))), c10::Error,
                Contains("key_padding_mask must have shape (B, S) = (2, 5)") && Contains("[2, 4]"));
  CHECK_REJECTS(with_padding(at::ones({5}, options.dtype(at::kBool))), c10::Error,
                Contains("key_padding_mask must have shape (B, S)"));
  CHECK_REJECTS(with_padding(at::ones({2, 1, 1, 5}, options.dtype(at::kBool))), c10::Error,
                Contains("key_padding_mask must have shape (B, S)"));
  CHECK_REJECTS(with_padding(at::ones({2, 5}, options.dtype(at::kLong))), c10::TypeError,
                Contains("key_padding_mask must be bool or have the query's dtype"));
}

TEST_CASE("attention rejects dropout_p outside [0, 1] and a non-finite scale",
          "[bad_inputs][attention]") {
  const at::Device device = GENERATE(at::Device(at::kCPU), at::Device(at::kMeta));
  INFO("device " << device);
  const auto [q, k, v, options] = attention_args(device);
  for (const double p : {-0.1, 1.5, kNaN, kInf}) {
    INFO("dropout_p " << p);
    CHECK_REJECTS(op::attention(q, k, v, std::nullopt, p), c10::Error,
                  Contains("attention: dropout_p must be in [0, 1]"));
  }
  for (const double scale : {kNaN, kInf, -kInf}) {
    INFO("scale " << scale);
    CHECK_REJECTS(op::attention(q, k, v, std::nullopt, 0.0, false, scale), c10::Error,
                  Contains("attention: scale must be a finite number"));
  }
}

TEST_CASE("every op names an undefined tensor argument", "[bad_inputs]") {
  const at::Tensor none;
  const auto [q, k, v, options] = attention_args(at::kCPU);
  CHECK_REJECTS(op::attention(none, k, v), c10::Error,
                Contains("attention: query is an undefined tensor"));
  CHECK_REJECTS(op::attention(q, none, v), c10::Error,
                Contains("attention: key is an undefined tensor"));
  CHECK_REJECTS(op::attention_with_weights(q, k, none), c10::Error,
                Contains("attention: value is an undefined tensor"));
  const auto [out, lse, weights, rng] =
      op::attention_forward(q, k, v, std::nullopt, std::nullopt, 0.0, false, std::nullopt, false);
  CHECK_REJECTS(op::attention_backward(none, std::nullopt, q, k, v, out, lse, std::nullopt,
                                       std::nullopt, 0.0, false, std::nullopt, rng, false, false),
                c10::Error, Contains("grad_output is an undefined tensor"));
  CHECK_REJECTS(op::attention_backward(out, std::nullopt, q, k, v, none, lse, std::nullopt,
                                       std::nullopt, 0.0, false, std::nullopt, rng, false, false),
                c10::Error, Contains("output is an undefined tensor"));

  const auto [query, key, value, wq, wk, wv, bias, o] = projection_args(at::kCPU);
  CHECK_REJECTS(op::qkv_projection(query, key, value, wq, none, wv, bias, bias, bias, 2),
                c10::Error, Contains("qkv_projection: k_weight is an undefined tensor"));
  CHECK_REJECTS(op::qkv_projection(query, key, none, wq, wk, wv, bias, bias, bias, 2), c10::Error,
                Contains("qkv_projection: value is an undefined tensor"));
  CHECK_REJECTS(op::qkv_projection_backward(std::nullopt, std::nullopt, std::nullopt, query, key,
                                            value, none, wk, wv, 2),
                c10::Error, Contains("q_weight is an undefined tensor"));

  const at::Tensor x = at::zeros({2, 3, 4, 5}), w = at::zeros({6, 15});
  CHECK_REJECTS(op::merge_heads(none, w, std::nullopt), c10::Error,
                Contains("merge_heads: x is an undefined tensor"));
  CHECK_REJECTS(op::merge_heads(x, none, std::nullopt), c10::Error,
                Contains("merge_heads: out_weight is an undefined tensor"));
  CHECK_REJECTS(op::merge_heads_backward(at::zeros({2, 4, 6}), x, none), c10::Error,
                Contains("out_weight is an undefined tensor"));
}

TEST_CASE("attention rejects tensors on different devices, naming them",
          "[bad_inputs][attention]") {
  const auto [q, k, v, options] = attention_args(at::kCPU);
  CHECK_REJECTS(op::attention(q, k.to(at::kMeta), v), c10::Error,
                Contains("key is on meta but query is on cpu"));
  CHECK_REJECTS(op::attention(q, k, v, at::ones({4, 5}, at::kBool).to(at::kMeta)), c10::Error,
                Contains("attn_mask is on meta but query is on cpu"));
}

TEST_CASE("attention checks its inputs under autograd too", "[bad_inputs][attention]") {
  const auto [q, k, v, options] = attention_args(at::kCPU);
  const at::Tensor leaf = q.detach().requires_grad_(true);
  CHECK_REJECTS(op::attention(leaf, at::zeros({2, 3, 5, 7}), v), c10::Error,
                Contains("key has 7 features per head but query has 8"));
  CHECK_REJECTS(op::attention_with_weights(leaf, k, v, std::nullopt, 2.0), c10::Error,
                Contains("dropout_p must be in [0, 1]"));
}

TEST_CASE(
    "the attention backward and dropout-mask ops reject inconsistent arguments, naming "
    "them",
    "[bad_inputs][attention]") {
  const at::Device device = GENERATE(at::Device(at::kCPU), at::Device(at::kMeta));
  INFO("device " << device);
  const auto [q, k, v, options] = attention_args(device);
  const auto [out, lse, weights, no_rng] =
      op::attention_forward(q, k, v, std::nullopt, std::nullopt, 0.0, false, std::nullopt, false);
  const at::Tensor rng = at::zeros({2}, options.dtype(at::kLong));
  auto backward = [&](const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_weights,
                      const at::Tensor& output, const at::Tensor& logsumexp,
                      const std::optional<at::Tensor>& rng_state, double dropout_p = 0.0) {
    return op::attention_backward(grad_output, grad_weights, q, k, v, output, logsumexp,
                                  std::nullopt, std::nullopt, dropout_p, false, std::nullopt,
                                  rng_state, false, false);
  };
  CHECK_REJECTS(backward(out, std::nullopt, out, lse, std::nullopt, 0.5), c10::Error,
                Contains("attention backward: rng_state") && Contains("must be given") &&
                    Contains("dropout_p > 0"));
  CHECK_REJECTS(backward(out[0], std::nullopt, out, lse, rng), c10::Error,
                Contains("attention backward: grad_output must be 4-D"));
  CHECK_REJECTS(backward(at::zeros({2, 3, 4, 5}, options), std::nullopt, out, lse, rng), c10::Error,
                Contains("grad_output has shape [2, 3, 4, 5]") &&
                    Contains("the output has shape [2, 3, 4, 6]"));
  CHECK_REJECTS(backward(out.to(at::kDouble), std::nullopt, out, lse, rng), c10::TypeError,
                Contains("grad_output has dtype Double"));
  CHECK_REJECTS(backward(out, std::nullopt, at::zeros({2, 3, 4, 7}, options), lse, rng), c10::Error,
                Contains("output has 7 features per head but value has 6"));
  CHECK_REJECTS(backward(out, std::nullopt, out, lse.to(at::kDouble), rng), c10::Error,
                Contains("attention backward: logsumexp must be") && Contains("Double"));
  CHECK_REJECTS(backward(out, std::nullopt, out, lse[0], rng), c10::Error,
                Contains("logsumexp must") && Contains("(B, H, L)") && Contains("[3, 4]"));
  CHECK_REJECTS(backward(out, std::nullopt, out, lse, at::zeros({3}, rng.options())), c10::Error,
                Contains("rng_state must") && Contains("(2,)") && Contains("[3]"));
  CHECK_REJECTS(backward(out, std::nullopt, out, lse, rng.to(at::kInt)), c10::Error,
                Contains("rng_state must") && Contains("int64") && Contains("Int"));
  CHECK_REJECTS(backward(out, at::zeros({2, 3, 4, 4}, options), out, lse, rng), c10::Error,
                Contains("grad_weights has 4 positions but key has 5"));

  CHECK_REJECTS(
      op::attention_dropout_mask(rng, 2, -1, 4, 5, 0.5), c10::Error,
      Contains("attention dropout mask:") && Contains("must be non-negative") && Contains("-1"));
  CHECK_REJECTS(op::attention_dropout_mask(rng, 2, 3, 4, 5, 1.5), c10::Error,
                Contains("dropout_p must be in [0, 1], but is 1.5"));
  CHECK_REJECTS(op::attention_dropout_mask(rng.to(at::kFloat), 2, 3, 4, 5, 0.5), c10::Error,
                Contains("rng_state must") && Contains("int64") && Contains("Float"));
}

TEST_CASE("qkv_projection rejects bad shapes, dtypes and num_heads, naming the argument",
          "[bad_inputs][qkv_projection]") {
  const at::Device device = GENERATE(at::Device(at::kCPU), at::Device(at::kMeta));
  INFO("device " << device);
  const auto [query, key, value, wq, wk, wv, bias, o] = projection_args(device);
  auto project = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& q_weight, const at::Tensor& k_weight,
                     const at::Tensor& v_weight, const std::optional<at::Tensor>& q_bias,
                     const std::optional<at::Tensor>& k_bias,
                     const std::optional<at::Tensor>& v_bias, int64_t heads) {
    return op::qkv_projection(q, k, v, q_weight, k_weight, v_weight, q_bias, k_bias, v_bias, heads);
  };
  CHECK_REJECTS(project(query, key, value, wq, wk, wv, bias, bias, bias, 3), c10::Error,
                Contains("qkv_projection: num_heads (3) must divide the embedding size E = 8"));
  CHECK_REJECTS(project(query, key, value, wq, wk, wv, bias, bias, bias, 0), c10::Error,
                Contains("num_heads must be positive, but is 0"));
  CHECK_REJECTS(project(query, key, value, wq, wk, wv, bias, bias, bias, -2), c10::Error,
                Contains("num_heads must be positive, but is -2"));
  CHECK_REJECTS(project(query[0], key, value, wq, wk, wv, bias, bias, bias, 2), c10::Error,
                Contains("query must be 3-D (B, L, Eq)") && Contains("[4, 8]"));
  CHECK_REJECTS(project(query, at::zeros({3, 5, 6}, o), value, wq, wk, wv, bias, bias, bias, 2),
                c10::Error, Contains("key has 3 batch entries but query has 2"));
  CHECK_REJECTS(project(query, key, at::zeros({2, 4, 7}, o), wq, wk, wv, bias, bias, bias, 2),
                c10::Error, Contains("value has 4 positions but key has 5"));
  CHECK_REJECTS(project(query, key, value, wq, at::zeros({8, 5}, o), wv, bias, bias, bias, 2),
                c10::Error, Contains("k_weight has 5 input features but key has 6"));
  CHECK_REJECTS(project(query, key, value, wq, wk, at::zeros({6, 7}, o), bias, bias, bias, 2),
                c10::Error, Contains("v_weight has 6 output features but q_weight has 8"));
  CHECK_REJECTS(project(query, key, value, wq[0], wk, wv, bias, bias, bias, 2), c10::Error,
                Contains("q_weight must be 2-D"));
  CHECK_REJECTS(project(query, key, value, wq, wk, wv, bias, at::zeros({7}, o), bias, 2),
                c10::Error, Contains("k_bias has 7 features but q_weight has 8"));
  CHECK_REJECTS(project(query, key, value, wq, wk, wv, bias, bias, bias.unsqueeze(0), 2),
                c10::Error, Contains("v_bias must be 1-D"));
  CHECK_REJECTS(project(query, key, value, wq, wk, wv, bias.to(at::kDouble), bias, bias, 2),
                c10::TypeError, Contains("q_bias has dtype Double but query has dtype Float"));
  CHECK_REJECTS(project(query, key.to(at::kHalf), value, wq, wk, wv, bias, bias, bias, 2),
                c10::TypeError, Contains("key has dtype Half but query has dtype Float"));
  CHECK_REJECTS(project(query, key, value, wq, wk, wv.to(at::kBFloat16), bias, bias, bias, 2),
                c10::TypeError, Contains("v_weight has dtype BFloat16"));
  CHECK_REJECTS(project(query.to(at::kLong), key, value, wq, wk, wv, bias, bias, bias, 2),
                c10::TypeError, Contains("query must be float64, float32, bfloat16 or float16"));
}

TEST_CASE("qkv_projection_backward rejects gradients of the wrong shape or dtype, naming them",
          "[bad_inputs][qkv_projection]") {
  const at::Device device = GENERATE(at::Device(at::kCPU), at::Device(at::kMeta));
  INFO("device " << device);
  const auto [query, key, value, wq, wk, wv, bias, o] = projection_args(device);
  const at::Tensor grad_q = at::zeros({2, 2, 4, 4}, o);
  CHECK_REJECTS(
      op::qkv_projection_backward(at::zeros({2, 2, 5, 4}, o), std::nullopt, std::nullopt, query,
                                  key, value, wq, wk, wv, 2),
      c10::Error,
      Contains("grad_q must have the projection's shape (2, 2, 4, 4)") && Contains("[2, 2, 5, 4]"));
  CHECK_REJECTS(op::qkv_projection_backward(grad_q, at::zeros({2, 2, 5, 4}, o.dtype(at::kDouble)),
                                            std::nullopt, query, key, value, wq, wk, wv, 2),
                c10::TypeError, Contains("grad_k has dtype Double"));
  CHECK_REJECTS(op::qkv_projection_backward(grad_q, std::nullopt, at::zeros({2, 5, 8}, o), query,
                                            key, value, wq, wk, wv, 2),
                c10::Error, Contains("grad_v must be 4-D"));
  CHECK_REJECTS(op::qkv_projection_backward(grad_q, std::nullopt, std::nullopt, query, key, value,
                                            wq, wk, wv, 3),
                c10::Error, Contains("num_heads (3) must divide"));
}

TEST_CASE(
    "merge_heads and merge_heads_backward reject bad shapes and dtypes, naming the "
    "argument",
    "[bad_inputs][merge_heads]") {
  const at::Device device = GENERATE(at::Device(at::kCPU), at::Device(at::kMeta));
  INFO("device " << device);
  const at::TensorOptions o = at::TensorOptions().dtype(at::kFloat).device(device);
  const at::Tensor x = at::zeros({2, 3, 4, 5}, o), w = at::zeros({6, 15}, o);
  const at::Tensor b = at::zeros({6}, o);
  CHECK_REJECTS(op::merge_heads(x[0], w, b), c10::Error,
                Contains("merge_heads: x must be 4-D (B, H, L, D)") && Contains("[3, 4, 5]"));
  CHECK_REJECTS(op::merge_heads(x, at::zeros({6, 14}, o), b), c10::Error,
                Contains("out_weight has 14 input features but x has H*D = 3*5 = 15"));
  CHECK_REJECTS(op::merge_heads(x, w[0], b), c10::Error, Contains("out_weight must be 2-D"));
  CHECK_REJECTS(op::merge_heads(x, w, at::zeros({5}, o)), c10::Error,
                Contains("out_bias has 5 features but out_weight has 6"));
  CHECK_REJECTS(op::merge_heads(x, w, b.unsqueeze(0)), c10::Error,
                Contains("out_bias must be 1-D"));
  CHECK_REJECTS(op::merge_heads(x, w, b.to(at::kHalf)), c10::TypeError,
                Contains("out_bias has dtype Half but x has dtype Float"));
  CHECK_REJECTS(op::merge_heads(x, w.to(at::kDouble), b), c10::TypeError,
                Contains("out_weight has dtype Double but x has dtype Float"));
  CHECK_REJECTS(op::merge_heads(x.to(at::kBool), w, b), c10::TypeError,
                Contains("x must be float64, float32, bfloat16 or float16"));
  CHECK_REJECTS(op::merge_heads_backward(at::zeros({2, 4, 7}, o), x, w), c10::Error,
                Contains("merge_heads backward: grad_output must have the output's shape") &&
                    Contains("(2, 4, 6)") && Contains("[2, 4, 7]"));
  CHECK_REJECTS(op::merge_heads_backward(at::zeros({2, 4, 6}, o.dtype(at::kDouble)), x, w),
                c10::TypeError, Contains("grad_output has dtype Double"));
}

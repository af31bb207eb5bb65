// attention_varlen through the dispatcher: each sequence of the packed batch equals the dense
// attention op on that sequence alone (output and gradients, float64, causal, GQA, lengths 0
// and L != S), and bad offsets are rejected with a message naming the argument.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <catch2/catch.hpp>

#include <vector>

#include "ops_by_name.h"
#include "test_support.h"

using namespace qkv_attention::testing;
using Catch::Contains;
namespace op = qkv_attention::testing::by_name;

namespace {

at::Tensor attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                            int64_t max_k, bool is_causal) {
  static const auto handle = op::typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      c10::SymInt, c10::SymInt, double, bool, std::optional<double>, QKV_TEST_VARIANT_TYPES)>(
      "qkv_attention::attention_varlen");
  return handle.call(q, k, v, cu_q, cu_k, c10::SymInt(max_q), c10::SymInt(max_k), 0.0, is_causal,
                     std::nullopt, op::kNoWindow, 0.0, std::nullopt, std::nullopt);
}

at::Tensor offsets(const std::vector<int64_t>& lengths) {
  std::vector<int64_t> cu = {0};
  for (const int64_t n : lengths) cu.push_back(cu.back() + n);
  return at::tensor(cu, at::kLong);
}

// Rows of sequence b of a packed (total, heads, features) tensor as (1, heads, rows, features).
at::Tensor sequence(const at::Tensor& packed, const at::Tensor& cu, int64_t b) {
  const int64_t first = cu[b].item<int64_t>(), last = cu[b + 1].item<int64_t>();
  return packed.narrow(0, first, last - first).transpose(0, 1).unsqueeze(0);
}

}  // namespace

TEST_CASE("attention_varlen equals the dense op on each sequence, with gradients",
          "[attention_varlen]") {
  const bool is_causal = GENERATE(false, true);
  const std::vector<int64_t> lengths_q = {2, 0, 7, 3, 1}, lengths_k = {5, 3, 7, 0, 1};
  const at::Tensor cu_q = offsets(lengths_q), cu_k = offsets(lengths_k);
  at::manual_seed(7);
  // H 4 query heads reading Hkv 2 key/value heads; D 8, Dv 6.
  const at::Tensor q = at::randn({13, 4, 8}, at::kDouble).requires_grad_(true);
  const at::Tensor k = at::randn({16, 2, 8}, at::kDouble).requires_grad_(true);
  const at::Tensor v = at::randn({16, 2, 6}, at::kDouble).requires_grad_(true);
  const at::Tensor out = attention_varlen(q, k, v, cu_q, cu_k, 7, 7, is_causal);
  REQUIRE(out.sizes() == at::IntArrayRef({13, 4, 6}));
  const at::Tensor grad_output = at::randn_like(out);
  const auto grads = torch::autograd::grad({out}, {q, k, v}, {grad_output});

  std::vector<at::Tensor> expected;
  for (int64_t b = 0; b < int64_t(lengths_q.size()); ++b) {
    expected.push_back(op::attention(sequence(q, cu_q, b), sequence(k, cu_k, b),
                                     sequence(v, cu_k, b), {}, 0.0, is_causal)[0]
                           .transpose(0, 1));  // (1, H, L, Dv) -> (L, H, Dv)
  }
  const at::Tensor reference = at::cat(expected, 0);
  const Tolerance tol{1e-12, 1e-10};
  CHECK_THAT(out, IsCloseTo(reference, tol));
  const auto reference_grads = torch::autograd::grad({reference}, {q, k, v}, {grad_output});
  for (size_t i = 0; i < 3; ++i) CHECK_THAT(grads[i], IsCloseTo(reference_grads[i], tol));
}

TEST_CASE("attention_varlen rejects bad offsets, naming the argument", "[attention_varlen]") {
  const at::Tensor q = at::randn({5, 2, 4}), k = at::randn({6, 2, 4}), v = at::randn({6, 2, 4});
  const at::Tensor cu_k = at::tensor(std::vector<int64_t>{0, 4, 6}, at::kLong);
  CHECK_THROWS_WITH(
      attention_varlen(q, k, v, at::tensor(std::vector<int64_t>{1, 2, 5}, at::kLong), cu_k, 3, 4,
                       false),
      Contains("attention_varlen: cu_seqlens_q must start at 0, but cu_seqlens_q[0] = 1"));
  CHECK_THROWS_WITH(attention_varlen(q, k, v, at::tensor(std::vector<int64_t>{0, 2, 4}, at::kLong),
                                     cu_k, 3, 4, false),
                    Contains("cu_seqlens_q must end at the number of packed query rows (5)"));
  CHECK_THROWS_WITH(attention_varlen(q, k, v, at::tensor(std::vector<int64_t>{0, 5}, at::kLong),
                                     cu_k, 5, 4, false),
                    Contains("cu_seqlens_k has 3 entries (2 sequences) but cu_seqlens_q has 2"));
  CHECK_THROWS_AS(
      attention_varlen(q, k, v, at::tensor(std::vector<float>{0, 2, 5}), cu_k, 3, 4, false),
      c10::TypeError);
}

// The operators as the dispatcher knows them: every name registered, with the kernels each
// dispatch key needs, the public schemas of docs/design.md section 2, and Meta kernels that give
// the output shapes without touching data.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "ops_by_name.h"
#include "test_support.h"

using namespace qkv_attention::testing;
namespace op = qkv_attention::testing::by_name;

namespace {

// Ops with kernels of their own at CPU, Meta and Autograd.
const std::vector<std::string> kKernelOps = {
    "qkv_attention::qkv_projection",
    "qkv_attention::qkv_projection_backward",
    "qkv_attention::_attention_forward",
    "qkv_attention::_attention_backward",
    "qkv_attention::merge_heads",
    "qkv_attention::merge_heads_backward",
    "qkv_attention::attention_with_kv_cache",
    "qkv_attention::_attention_varlen_forward",
    "qkv_attention::_attention_varlen_backward",
};

// Compositions of _attention_forward or _attention_varlen_forward (CompositeImplicitAutograd):
// autograd, Meta and CPU come from the op they call, so torch.compile and autograd see that op
// in their place.
const std::vector<std::string> kCompositeOps = {
    "qkv_attention::attention",
    "qkv_attention::attention_with_weights",
    "qkv_attention::attention_varlen",
};

std::vector<std::string> argument_names(const c10::FunctionSchema& schema) {
  std::vector<std::string> names;
  for (const c10::Argument& argument : schema.arguments()) names.push_back(argument.name());
  return names;
}

}  // namespace

TEST_CASE("every operator is registered under its qualified name", "[registration]") {
  std::vector<std::string> all = kKernelOps;
  all.insert(all.end(), kCompositeOps.begin(), kCompositeOps.end());
  all.push_back("qkv_attention::_attention_dropout_mask");
  for (const std::string& name : all) {
    INFO(name);
    const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    REQUIRE(handle.has_value());
    CHECK(handle->schema().name() == name);
  }
  CHECK_FALSE(c10::Dispatcher::singleton().findSchema({"qkv_attention::no_such_op", ""}));
}

TEST_CASE(
    "each operator has CPU, Meta and Autograd kernels, or is a CompositeImplicitAutograd "
    "composition of one that has",
    "[registration]") {
  for (const std::string& name : kKernelOps) {
    INFO(name);
    const c10::OperatorHandle handle = op::handle(name.c_str());
    CHECK(handle.hasKernelForDispatchKey(c10::DispatchKey::CPU));
    CHECK(handle.hasKernelForDispatchKey(c10::DispatchKey::Meta));
    CHECK(handle.hasKernelForDispatchKey(c10::DispatchKey::Autograd));
    // Wired in one place only: no composite kernel that would shadow the Autograd one.
    CHECK_FALSE(handle.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd));
    CHECK_FALSE(handle.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd));
  }
  for (const std::string& name : kCompositeOps) {
    INFO(name);
    const c10::OperatorHandle handle = op::handle(name.c_str());
    CHECK(handle.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd));
    CHECK_FALSE(handle.hasKernelForDispatchKey(c10::DispatchKey::CPU));
    // The composite serves every backend key and autograd (the computed dispatch table).
    CHECK(handle.hasComputedKernelForDispatchKey(c10::DispatchKey::CPU));
    CHECK(handle.hasComputedKernelForDispatchKey(c10::DispatchKey::AutogradCPU));
  }
  // The keep-mask is a bool tensor, nothing to differentiate: CPU and Meta only.
  const c10::OperatorHandle mask = op::handle("qkv_attention::_attention_dropout_mask");
  CHECK(mask.hasKernelForDispatchKey(c10::DispatchKey::CPU));
  CHECK(mask.hasKernelForDispatchKey(c10::DispatchKey::Meta));
}

TEST_CASE("the public schemas keep docs/design.md's argument names, order and defaults",
          "[registration]") {
  using Names = std::vector<std::string>;
  const c10::FunctionSchema& attention = op::handle("qkv_attention::attention").schema();
  const Names variants{"window_size", "softcap", "alibi_slopes", "sinks"};
  Names attention_names{"query",     "key",       "value", "attn_mask",
                        "dropout_p", "is_causal", "scale", "key_padding_mask"};
  attention_names.insert(attention_names.end(), variants.begin(), variants.end());
  CHECK(argument_names(attention) == attention_names);
  CHECK(attention.returns().size() == 1);
  const auto& args = attention.arguments();
  for (size_t i = 0; i < 3; ++i) CHECK_FALSE(args[i].default_value().has_value());
  REQUIRE(args[3].default_value().has_value());
  CHECK(args[3].default_value()->isNone());
  REQUIRE(args[4].default_value().has_value());
  CHECK(args[4].default_value()->toDouble() == 0.0);
  REQUIRE(args[5].default_value().has_value());
  CHECK(args[5].default_value()->toBool() == false);
  REQUIRE(args[6].default_value().has_value());
  CHECK(args[6].default_value()->isNone());
  REQUIRE(args[7].default_value().has_value());
  CHECK(args[7].default_value()->isNone());
  // The variants' defaults: no window, no cap, no slopes, no sinks.
  REQUIRE(args[8].default_value().has_value());
  CHECK(args[8].default_value()->toIntVector() == std::vector<int64_t>{-1, -1});
  REQUIRE(args[9].default_value().has_value());
  CHECK(args[9].default_value()->toDouble() == 0.0);
  for (size_t i = 10; i < 12; ++i) {
    REQUIRE(args[i].default_value().has_value());
    CHECK(args[i].default_value()->isNone());
  }
  // attention_with_weights takes attention's arguments before the variants, then
  // average_attn_weights=False, then the variants.
  const c10::FunctionSchema& with_weights =
      op::handle("qkv_attention::attention_with_weights").schema();
  Names expected(attention_names.begin(), attention_names.begin() + 8);
  expected.push_back("average_attn_weights");
  expected.insert(expected.end(), variants.begin(), variants.end());
  CHECK(argument_names(with_weights) == expected);
  REQUIRE(with_weights.arguments()[8].default_value().has_value());
  CHECK(with_weights.arguments()[8].default_value()->toBool() == false);

  const c10::FunctionSchema& projection = op::handle("qkv_attention::qkv_projection").schema();
  CHECK(argument_names(projection) == Names{"query", "key", "value", "q_weight", "k_weight",
                                            "v_weight", "q_bias", "k_bias", "v_bias", "num_heads"});
  CHECK(projection.returns().size() == 3);
  CHECK(projection.arguments()[9].real_type()->kind() == c10::TypeKind::SymIntType);

  const c10::FunctionSchema& merge = op::handle("qkv_attention::merge_heads").schema();
  CHECK(argument_names(merge) == Names{"x", "out_weight", "out_bias"});
  CHECK(merge.returns().size() == 1);

  // None of the ops writes to or aliases its inputs (docs/design.md section 2: outputs are fresh
  // tensors).
  for (const char* name :
       {"qkv_attention::attention", "qkv_attention::qkv_projection", "qkv_attention::merge_heads",
        "qkv_attention::_attention_forward", "qkv_attention::_attention_backward"}) {
    INFO(name);
    const c10::FunctionSchema& schema = op::handle(name).schema();
    CHECK_FALSE(schema.is_mutable());
    for (const c10::Argument& out : schema.returns()) CHECK(out.alias_info() == nullptr);
  }
}

TEST_CASE("attention_with_kv_cache declares the caches it writes and nothing else",
          "[registration]") {
  using Names = std::vector<std::string>;
  const c10::FunctionSchema& schema = op::handle("qkv_attention::attention_with_kv_cache").schema();
  CHECK(argument_names(schema) == Names{"query", "k_cache", "v_cache", "key", "value",
                                        "cache_seqlens", "attn_mask", "is_causal", "scale",
                                        "window_size", "softcap", "alibi_slopes", "sinks",
                                        "k_cache_scale", "v_cache_scale"});
  CHECK(schema.is_mutable());
  const auto& args = schema.arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    INFO(args[i].name());
    // The caches, and the scales of quantized caches.
    const bool written = args[i].name() == "k_cache" || args[i].name() == "v_cache" ||
                         args[i].name() == "k_cache_scale" || args[i].name() == "v_cache_scale";
    CHECK((args[i].alias_info() != nullptr && args[i].alias_info()->isWrite()) == written);
  }
  for (size_t i = 3; i < 7; ++i) {
    REQUIRE(args[i].default_value().has_value());
    CHECK(args[i].default_value()->isNone());
  }
  REQUIRE(args[7].default_value().has_value());
  CHECK(args[7].default_value()->toBool() == true);  // bottom-right causal by default
  for (size_t i = 13; i < 15; ++i) {
    REQUIRE(args[i].default_value().has_value());
    CHECK(args[i].default_value()->isNone());
  }
  REQUIRE(schema.returns().size() == 1);
  CHECK(schema.returns()[0].alias_info() == nullptr);  // a fresh output
}

TEST_CASE("the Meta kernels give every op's output shapes and dtypes on meta tensors",
          "[registration][meta]") {
  constexpr int64_t B = 2, H = 3, L = 5, S = 7, D = 4, Dv = 6;
  const auto meta = at::TensorOptions().device(at::kMeta).dtype(at::kBFloat16);
  auto sizes = [](const at::Tensor& t) { return t.sizes().vec(); };
  using Sizes = std::vector<int64_t>;
  const at::Tensor q = at::empty({B, H, L, D}, meta), k = at::empty({B, H, S, D}, meta);
  const at::Tensor v = at::empty({B, H, S, Dv}, meta);
  const at::Tensor mask = at::empty({L, S}, meta);

  const at::Tensor out = op::attention(q, k, v, mask, 0.1, true, 0.5);
  CHECK(out.is_meta());
  CHECK(out.scalar_type() == at::kBFloat16);
  CHECK(sizes(out) == Sizes{B, H, L, Dv});
  const auto [output, logsumexp, weights, no_rng_state] =
      op::attention_forward(q, k, v, mask, std::nullopt, 0.0, false, std::nullopt, true);
  CHECK(sizes(weights) == Sizes{B, H, L, S});
  CHECK(sizes(logsumexp) == Sizes{B, H, L});
  CHECK(logsumexp.scalar_type() == at::kFloat);  // bfloat16 accumulates in float32
  const at::Tensor rng_state = at::empty({2}, meta.dtype(at::kLong));
  const auto grads =
      op::attention_backward(output, std::nullopt, q, k, v, output, logsumexp, mask, std::nullopt,
                             0.0, false, std::nullopt, rng_state, true, false);
  CHECK(sizes(std::get<0>(grads)) == sizes(q));
  CHECK(sizes(std::get<1>(grads)) == sizes(k));
  CHECK(sizes(std::get<2>(grads)) == sizes(v));
  CHECK(sizes(std::get<3>(grads)) == sizes(mask));
  CHECK(std::get<4>(grads).numel() == 0);
  const at::Tensor keep = op::attention_dropout_mask(rng_state, B, H, L, S, 0.5);
  CHECK(keep.is_meta());
  CHECK(keep.scalar_type() == at::kBool);
  CHECK(sizes(keep) == Sizes{B, H, L, S});

  constexpr int64_t E = 12, Eq = 10, Ek = 9, Ev = 8;
  const at::Tensor query = at::empty({B, L, Eq}, meta), key = at::empty({B, S, Ek}, meta);
  const at::Tensor value = at::empty({B, S, Ev}, meta);
  const at::Tensor wq = at::empty({E, Eq}, meta), wk = at::empty({E, Ek}, meta);
  const at::Tensor wv = at::empty({E, Ev}, meta), bias = at::empty({E}, meta);
  const auto [pq, pk, pv] = op::qkv_projection(query, key, value, wq, wk, wv, bias, bias, bias, H);
  CHECK(sizes(pq) == Sizes{B, H, L, E / H});
  CHECK(sizes(pk) == Sizes{B, H, S, E / H});
  CHECK(sizes(pv) == Sizes{B, H, S, E / H});
  const auto projection_grads =
      op::qkv_projection_backward(pq, pk, std::nullopt, query, key, value, wq, wk, wv, H);
  CHECK(sizes(std::get<0>(projection_grads)) == sizes(query));
  CHECK(sizes(std::get<5>(projection_grads)) == sizes(wv));
  CHECK(sizes(std::get<8>(projection_grads)) == Sizes{E});

  constexpr int64_t Eout = 7;
  const at::Tensor x = at::empty({B, H, L, D}, meta), wo = at::empty({Eout, H * D}, meta);
  const at::Tensor merged = op::merge_heads(x, wo, at::empty({Eout}, meta));
  CHECK(sizes(merged) == Sizes{B, L, Eout});
  const auto merge_grads = op::merge_heads_backward(merged, x, wo);
  CHECK(sizes(std::get<0>(merge_grads)) == sizes(x));
  CHECK(sizes(std::get<1>(merge_grads)) == sizes(wo));
  CHECK(sizes(std::get<2>(merge_grads)) == Sizes{Eout});
}

TEST_CASE(
    "attention called boxed by name, with its schema's defaults on the stack, gives the "
    "typed call's result",
    "[registration]") {
  // The route TorchScript and torch.ops take: arguments as IValues, missing ones filled from
  // the schema's defaults.
  at::Generator gen = seeded(40);
  const at::Tensor q = random_tensor(gen, {2, 2, 3, 4}, at::kFloat);
  const at::Tensor k = random_tensor(gen, {2, 2, 5, 4}, at::kFloat);
  const at::Tensor v = random_tensor(gen, {2, 2, 5, 6}, at::kFloat);
  const c10::OperatorHandle handle = op::handle("qkv_attention::attention");
  torch::jit::Stack stack = {q, k, v};
  for (size_t i = stack.size(); i < handle.schema().arguments().size(); ++i) {
    stack.push_back(*handle.schema().arguments()[i].default_value());
  }
  handle.callBoxed(&stack);
  REQUIRE(stack.size() == 1);
  REQUIRE(stack[0].isTensor());
  CHECK(bitwise_equal(stack[0].toTensor(), op::attention(q, k, v)));
}

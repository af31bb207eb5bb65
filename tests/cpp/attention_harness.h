// One call of the attention operator checked three ways against the float64 reference of
// reference.h:
//   1. the forward op _attention_forward (output and weights), then the backward op
//      _attention_backward called directly through the dispatcher;
//   2. `attention`, differentiated with torch::autograd::grad (the C++ autograd Function);
//   3. `attention_with_weights`, whose weights must be the reference's.
// All three are looked up by name. With dropout, each call starts from the same
// torch::manual_seed, and the reference applies the keep-mask that _attention_dropout_mask
// regenerates from the forward's rng_state.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <optional>
#include <string>
#include <vector>

#include "ops_by_name.h"
#include "reference.h"
#include "test_support.h"

namespace qkv_attention::testing {

struct AttentionInputs {
  at::Tensor query;  // (B, H, L, D), any strides
  at::Tensor key;    // (B, H, S, D)
  at::Tensor value;  // (B, H, S, Dv)
  std::optional<at::Tensor> attn_mask;
  std::optional<at::Tensor> key_padding_mask;
  bool attn_mask_requires_grad = false;         // only meaningful for a float mask
  bool key_padding_mask_requires_grad = false;  // likewise
  double dropout_p = 0.0;
  bool is_causal = false;
  std::optional<double> scale;
  uint64_t dropout_seed = 0;  // torch::manual_seed before every call when dropout_p > 0
};

// (B, H, L, D) query, (B, H, S, D) key, (B, H, S, Dv) value of standard normal values.
inline AttentionInputs random_attention_inputs(uint64_t seed, int64_t B, int64_t H, int64_t L,
                                               int64_t S, int64_t D, int64_t Dv,
                                               at::ScalarType dtype, bool contiguous = true) {
  at::Generator gen = seeded(seed);
  AttentionInputs in;
  in.query = random_tensor(gen, {B, H, L, D}, dtype, contiguous);
  in.key = random_tensor(gen, {B, H, S, D}, dtype, contiguous);
  in.value = random_tensor(gen, {B, H, S, Dv}, dtype, contiguous);
  return in;
}

namespace detail {

inline bool is_float_mask(const std::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() && mask->scalar_type() != at::kBool;
}

// The mask as the autograd route passes it: a fresh leaf that requires grad when asked.
inline std::optional<at::Tensor> leaf_mask(const std::optional<at::Tensor>& mask,
                                           bool requires_grad) {
  if (!mask.has_value() || !mask->defined()) return std::nullopt;
  at::Tensor leaf = mask->detach();
  if (requires_grad && leaf.scalar_type() != at::kBool) leaf.requires_grad_(true);
  return leaf;
}

inline std::optional<at::Tensor> in_double(const std::optional<at::Tensor>& mask,
                                           bool requires_grad) {
  if (!mask.has_value() || !mask->defined()) return std::nullopt;
  if (mask->scalar_type() == at::kBool) return mask->detach();
  return mask->detach().to(at::kDouble).requires_grad_(requires_grad);
}

inline void seed_dropout(const AttentionInputs& in) {
  if (in.dropout_p > 0) at::manual_seed(in.dropout_seed);
}

}  // namespace detail

// The gradients (query, key, value, attn_mask, key_padding_mask) the reference gives for
// the loss <output, grad_output> + <weights, grad_weights>; a mask gets one only when it is a
// float mask that requires grad (undefined otherwise).
struct ReferenceRun {
  reference::AttentionResult result;
  std::vector<at::Tensor> grads;  // 5 entries
};

inline ReferenceRun run_reference(const AttentionInputs& in, const at::Tensor& keep,
                                  const at::Tensor& grad_output,
                                  const at::Tensor& grad_weights = at::Tensor()) {
  const at::Tensor q = in.query.detach().to(at::kDouble).requires_grad_(true);
  const at::Tensor k = in.key.detach().to(at::kDouble).requires_grad_(true);
  const at::Tensor v = in.value.detach().to(at::kDouble).requires_grad_(true);
  const bool mask_grad = detail::is_float_mask(in.attn_mask) && in.attn_mask_requires_grad;
  const bool padding_grad =
      detail::is_float_mask(in.key_padding_mask) && in.key_padding_mask_requires_grad;
  const auto mask = detail::in_double(in.attn_mask, mask_grad);
  const auto padding = detail::in_double(in.key_padding_mask, padding_grad);
  ReferenceRun run;
  run.result =
      reference::attention(q, k, v, mask, in.is_causal, in.scale, padding, keep, in.dropout_p);

  std::vector<at::Tensor> inputs = {q, k, v};
  if (mask_grad) inputs.push_back(*mask);
  if (padding_grad) inputs.push_back(*padding);
  std::vector<at::Tensor> outputs = {run.result.output};
  std::vector<at::Tensor> grads_out = {grad_output.to(at::kDouble)};
  if (grad_weights.defined()) {
    outputs.push_back(run.result.weights);
    grads_out.push_back(grad_weights.to(at::kDouble));
  }
  std::vector<at::Tensor> grads = torch::autograd::grad(outputs, inputs, grads_out,
                                                        /*retain_graph=*/std::nullopt,
                                                        /*create_graph=*/false,
                                                        /*allow_unused=*/true);
  // An input the loss does not reach (e.g. when S = 0) has a zero gradient.
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = at::zeros_like(inputs[i]);
  }
  run.grads = {grads[0], grads[1], grads[2], at::Tensor(), at::Tensor()};
  size_t next = 3;
  if (mask_grad) run.grads[3] = grads[next++];
  if (padding_grad) run.grads[4] = grads[next++];
  return run;
}

// Checks the op against the reference by the three routes described at the top of the file.
// `grad_tolerance_factor` widens the gradient allowances for ill-conditioned inputs.
inline void check_attention_against_reference(const AttentionInputs& in, uint64_t grad_seed = 7,
                                              double grad_tolerance_factor = 1.0) {
  namespace op = by_name;
  const at::ScalarType dtype = in.query.scalar_type();
  const Tolerance out_tol = output_tolerance(dtype);
  const Tolerance grad_tol = {gradient_tolerance(dtype).atol * grad_tolerance_factor,
                              gradient_tolerance(dtype).rtol * grad_tolerance_factor};
  const int64_t B = in.query.size(0), H = in.query.size(1), L = in.query.size(2);
  const int64_t S = in.key.size(2), Dv = in.value.size(3);
  const bool mask_grad = detail::is_float_mask(in.attn_mask) && in.attn_mask_requires_grad;
  const bool padding_grad =
      detail::is_float_mask(in.key_padding_mask) && in.key_padding_mask_requires_grad;
  INFO("dtype " << dtype << ", (B, H, L, S, D, Dv) = (" << B << ", " << H << ", " << L << ", " << S
                << ", " << in.query.size(3) << ", " << Dv << "), causal " << in.is_causal
                << ", dropout_p " << in.dropout_p);

  at::Generator gen = seeded(grad_seed);
  const at::Tensor grad_output = random_tensor(gen, {B, H, L, Dv}, dtype);

  // Route 1: the forward op, then the backward op, both called directly.
  detail::seed_dropout(in);
  const auto [output, logsumexp, weights, rng_state] =
      op::attention_forward(in.query, in.key, in.value, in.attn_mask, in.key_padding_mask,
                            in.dropout_p, in.is_causal, in.scale, /*need_weights=*/true);
  const at::Tensor keep = in.dropout_p > 0
                              ? op::attention_dropout_mask(rng_state, B, H, L, S, in.dropout_p)
                              : at::Tensor();
  const ReferenceRun ref = run_reference(in, keep, grad_output);

  CHECK(output.scalar_type() == dtype);
  CHECK(output.is_contiguous());
  CHECK_THAT(output, IsCloseTo(ref.result.output, out_tol));
  CHECK_THAT(weights, IsCloseTo(ref.result.weights, out_tol));
  CHECK(logsumexp.sizes().vec() == std::vector<int64_t>{B, H, L});
  {
    INFO("backward op called directly");
    const auto [gq, gk, gv, gmask, gpadding, gsinks] =
        op::attention_backward(grad_output, std::nullopt, in.query, in.key, in.value, output,
                               logsumexp, in.attn_mask, in.key_padding_mask, in.dropout_p,
                               in.is_causal, in.scale, rng_state, mask_grad, padding_grad);
    CHECK_THAT(gq, IsCloseTo(ref.grads[0], grad_tol));
    CHECK_THAT(gk, IsCloseTo(ref.grads[1], grad_tol));
    CHECK_THAT(gv, IsCloseTo(ref.grads[2], grad_tol));
    if (mask_grad) {
      CHECK_THAT(gmask, IsCloseTo(ref.grads[3], grad_tol));
    } else {
      CHECK(gmask.numel() == 0);
    }
    if (padding_grad) {
      CHECK_THAT(gpadding, IsCloseTo(ref.grads[4], grad_tol));
    } else {
      CHECK(gpadding.numel() == 0);
    }
    CHECK(gsinks.numel() == 0);  // no sinks, no gradient of them
  }

  // Route 2: `attention` under autograd.
  {
    INFO("attention differentiated by torch::autograd::grad");
    const at::Tensor q = in.query.detach().requires_grad_(true);
    const at::Tensor k = in.key.detach().requires_grad_(true);
    const at::Tensor v = in.value.detach().requires_grad_(true);
    const auto mask = detail::leaf_mask(in.attn_mask, mask_grad);
    const auto padding = detail::leaf_mask(in.key_padding_mask, padding_grad);
    detail::seed_dropout(in);
    const at::Tensor out =
        op::attention(q, k, v, mask, in.dropout_p, in.is_causal, in.scale, padding);
    CHECK(out.scalar_type() == dtype);
    CHECK(out.requires_grad());
    CHECK_THAT(out, IsCloseTo(ref.result.output, out_tol));
    std::vector<at::Tensor> inputs = {q, k, v};
    if (mask_grad) inputs.push_back(*mask);
    if (padding_grad) inputs.push_back(*padding);
    const std::vector<at::Tensor> grads = torch::autograd::grad({out}, inputs, {grad_output});
    CHECK_THAT(grads[0], IsCloseTo(ref.grads[0], grad_tol));
    CHECK_THAT(grads[1], IsCloseTo(ref.grads[1], grad_tol));
    CHECK_THAT(grads[2], IsCloseTo(ref.grads[2], grad_tol));
    size_t next = 3;
    if (mask_grad) CHECK_THAT(grads[next++], IsCloseTo(ref.grads[3], grad_tol));
    if (padding_grad) CHECK_THAT(grads[next++], IsCloseTo(ref.grads[4], grad_tol));
  }

  // Route 3: the weights of attention_with_weights.
  {
    INFO("attention_with_weights");
    detail::seed_dropout(in);
    const auto [out, w] =
        op::attention_with_weights(in.query, in.key, in.value, in.attn_mask, in.dropout_p,
                                   in.is_causal, in.scale, in.key_padding_mask);
    CHECK_THAT(out, IsCloseTo(ref.result.output, out_tol));
    CHECK_THAT(w, IsCloseTo(ref.result.weights, out_tol));
  }
}

}  // namespace qkv_attention::testing

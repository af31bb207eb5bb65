// The attention variants in the blocked kernels (cpu/flash/), on plain pointers, at every CPU level
// this machine runs: sliding window, softcap, ALiBi ((H,) and (B, H) slopes) and attention sinks,
// each alone and combined, with grouped-query heads, L != S, masks, causal alignment offsets,
// dropout, the returned and averaged weights, and the split-KV decoding path (L <= 16, S > 512),
// in float64, float32, bfloat16 and float16, against reference::attention_variants (reference.h)
// in float64 from the same rounded inputs. The backward's gradients of query, key, value, a key
// padding mask and the sinks are checked against autograd through that reference. Also: keys a
// window hides from every query are never read (NaN there changes nothing), and results are
// bitwise the same for 1 and 2 threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash/levels.h"
#include "cpu/flash/params.h"
#include "cpu/philox.h"
#include "kernel_levels.h"
#include "ops/attention_problem.h"
#include "reference.h"
#include "test_support.h"

namespace {

using qkv_attention::AttentionProblem;
using qkv_attention::DropoutStream;
using qkv_attention::cpu::AttentionInputs;
using qkv_attention::cpu::flash::CpuLevel;
using qkv_attention::cpu::flash::level_name;
namespace flash = qkv_attention::cpu::flash;
namespace testing = qkv_attention::testing;
using testing::IsCloseTo;
using testing::runnable_levels;
using testing::Tolerance;

enum class Alibi { kNone, kPerHead, kPerBatchHead };
enum class VariantMask {
  kNone,
  kBool,                 // attn_mask (L, S) bool, stride 0 over (B, H); row 1 all false
  kPaddingAdditiveGrad,  // key_padding_mask (B, S) of the dtype, its gradient requested
};

struct VariantCase {
  int64_t B, H, Hkv, L, S, D, Dv;
  bool causal = false;
  int64_t offset = 0;  // the causal alignment, forward and backward
  int64_t left = -1, right = -1;
  double softcap = 0.0;
  Alibi alibi = Alibi::kNone;
  bool sinks = false;
  double dropout = 0.0;
  VariantMask mask = VariantMask::kNone;
  bool grad_weights = false;
  std::optional<double> scale;  // default 1 / sqrt(D)

  VariantCase(int64_t B_, int64_t H_, int64_t Hkv_, int64_t L_, int64_t S_, int64_t D_, int64_t Dv_)
      : B(B_), H(H_), Hkv(Hkv_), L(L_), S(S_), D(D_), Dv(Dv_) {}
  VariantCase& with_causal(int64_t o) {
    causal = true;
    offset = o;
    return *this;
  }
  VariantCase& with_offset(int64_t o) {
    offset = o;
    return *this;
  }
  VariantCase& with_window(int64_t l, int64_t r) {
    left = l;
    right = r;
    return *this;
  }
  VariantCase& with_softcap(double cap, double s) {
    softcap = cap;
    scale = s;  // a scale that makes the raw scores reach the cap
    return *this;
  }
  VariantCase& with_alibi(Alibi a) {
    alibi = a;
    return *this;
  }
  VariantCase& with_sinks() {
    sinks = true;
    return *this;
  }
  VariantCase& with_dropout(double p) {
    dropout = p;
    return *this;
  }
  VariantCase& with_mask(VariantMask m) {
    mask = m;
    return *this;
  }
  VariantCase& with_grad_weights() {
    grad_weights = true;
    return *this;
  }
};

std::string describe(const VariantCase& c) {
  std::ostringstream out;
  out << "(B, H, Hkv, L, S, D, Dv) = (" << c.B << ", " << c.H << ", " << c.Hkv << ", " << c.L
      << ", " << c.S << ", " << c.D << ", " << c.Dv << "), causal " << c.causal << ", offset "
      << c.offset << ", window (" << c.left << ", " << c.right << "), softcap " << c.softcap
      << ", alibi " << int(c.alibi) << ", sinks " << c.sinks << ", dropout " << c.dropout
      << ", mask " << int(c.mask) << (c.grad_weights ? ", grad_weights" : "");
  return out.str();
}

struct Problem {
  VariantCase c;
  at::ScalarType dtype;
  at::Tensor query, key, value, grad_output;
  std::optional<at::Tensor> attn_mask, key_padding_mask, grad_weights;
  bool padding_grad = false;
  // Slopes ((H,) or (B, H)) and sinks ((H,)) in the kernels' accumulation type; the reference
  // reads the same values.
  at::Tensor slopes, sinks;
  std::optional<at::Tensor> rng_state;  // (2,) int64: seed, offset
  at::Tensor keep;                      // (B, H, L, S) bool from DropoutStream, or undefined

  Problem(const VariantCase& c_, at::ScalarType dtype_, uint64_t seed) : c(c_), dtype(dtype_) {
    at::Generator gen = testing::seeded(seed);
    query = testing::random_tensor(gen, {c.B, c.H, c.L, c.D}, dtype);
    key = testing::random_tensor(gen, {c.B, c.Hkv, c.S, c.D}, dtype);
    value = testing::random_tensor(gen, {c.B, c.Hkv, c.S, c.Dv}, dtype);
    grad_output = testing::random_tensor(gen, {c.B, c.H, c.L, c.Dv}, dtype);
    if (c.grad_weights) grad_weights = testing::random_tensor(gen, {c.B, c.H, c.L, c.S}, dtype);
    const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
    if (c.alibi != Alibi::kNone) {
      const std::vector<int64_t> sizes =
          c.alibi == Alibi::kPerHead ? std::vector<int64_t>{c.H} : std::vector<int64_t>{c.B, c.H};
      slopes = (at::rand(sizes, gen, at::kDouble) * 0.3 + 0.02).to(acc);
    }
    if (c.sinks) {
      // Of the order of log(S), so that the sink takes a share comparable to the keys'.
      const double shift = 0.5 * std::log(double(std::max<int64_t>(c.S, 1)));
      sinks = (at::randn({c.H}, gen, at::kDouble) + shift).to(acc);
    }
    switch (c.mask) {
      case VariantMask::kNone:
        break;
      case VariantMask::kBool: {
        at::Tensor m = testing::random_bool_mask(gen, {c.L, c.S});
        if (c.L > 1) m[1].fill_(false);
        attn_mask = m;
        break;
      }
      case VariantMask::kPaddingAdditiveGrad:
        key_padding_mask = testing::random_tensor(gen, {c.B, c.S}, at::kDouble).to(dtype);
        padding_grad = true;
        break;
    }
    const uint64_t dropout_seed = 0x9e3779b97f4a7c15ull ^ seed, dropout_offset = 3 * seed + 5;
    rng_state = at::tensor({int64_t(dropout_seed), int64_t(dropout_offset)}, at::kLong);
    if (c.dropout > 0) {
      // Element (b, h, i, j) is number ((b H + h) L + i) S + j of the stream.
      const DropoutStream stream(dropout_seed, dropout_offset, c.dropout);
      keep = at::empty({c.B, c.H, c.L, c.S}, at::kBool);
      bool* data = keep.data_ptr<bool>();
      for (int64_t row = 0; row < c.B * c.H * c.L; ++row) {
        stream.fill_keep(uint64_t(row * c.S), c.S, data + row * c.S);
      }
    }
  }

  // The problem, variants included: set_params carries them into the kernels' parameters.
  AttentionProblem arguments() const {
    AttentionProblem problem{query,     key,      value,   attn_mask, key_padding_mask,
                             c.dropout, c.causal, c.scale, rng_state};
    problem.variants.window_size = {c.left, c.right};
    problem.variants.softcap = c.softcap;
    if (slopes.defined()) problem.variants.alibi_slopes = slopes;
    if (sinks.defined()) problem.variants.sinks = sinks;
    return problem;
  }

  // The causal alignment of a dense problem is 0; the cases try others (a cache's
  // bottom-right alignment is a sequence's, which set_params gives per sequence).
  template <typename T>
  void apply(AttentionInputs<T>& params) const {
    params.causal_offset = c.offset;
  }
};

// What one level's kernels return.
struct KernelRun {
  at::Tensor output, logsumexp, weights, output_no_weights, logsumexp_no_weights;
  at::Tensor output_averaged, averaged_weights;
  at::Tensor grad_query, grad_key, grad_value, grad_scores, grad_sinks;
};

template <typename T>
KernelRun run_kernels(CpuLevel level, const Problem& p) {
  const VariantCase& c = p.c;
  const auto acc = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  // Outputs start as NaN, so that anything the kernels leave unwritten shows.
  auto empty = [&](at::IntArrayRef sizes, at::ScalarType dtype) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), at::dtype(dtype));
  };
  const AttentionProblem args = p.arguments();
  KernelRun run;
  auto forward = [&](at::Tensor& out, at::Tensor& lse, at::Tensor* weights, bool average) {
    auto params = flash::set_forward_params<T>(args, out, lse, weights, average);
    p.apply(params);
    flash::attention_forward_at<T>(level, params);
  };
  run.output = empty({c.B, c.H, c.L, c.Dv}, p.dtype);
  run.logsumexp = empty({c.B, c.H, c.L}, acc);
  run.weights = empty({c.B, c.H, c.L, c.S}, p.dtype);
  forward(run.output, run.logsumexp, &run.weights, false);
  // Without weights: the online softmax, or the split-KV path for few queries and many keys.
  run.output_no_weights = empty({c.B, c.H, c.L, c.Dv}, p.dtype);
  run.logsumexp_no_weights = empty({c.B, c.H, c.L}, acc);
  forward(run.output_no_weights, run.logsumexp_no_weights, nullptr, false);
  run.output_averaged = empty({c.B, c.H, c.L, c.Dv}, p.dtype);
  run.averaged_weights = empty({c.B, c.L, c.S}, p.dtype);
  at::Tensor logsumexp_averaged = empty({c.B, c.H, c.L}, acc);
  forward(run.output_averaged, logsumexp_averaged, &run.averaged_weights, true);

  run.grad_query = empty(p.query.sizes(), p.dtype);
  run.grad_key = empty(p.key.sizes(), p.dtype);
  run.grad_value = empty(p.value.sizes(), p.dtype);
  if (p.padding_grad) run.grad_scores = empty({c.B, c.H, c.L, c.S}, acc);
  auto params = flash::set_backward_params<T>(
      args, run.output, p.grad_output, p.grad_weights, run.logsumexp, run.grad_query, run.grad_key,
      run.grad_value, run.grad_scores.defined() ? &run.grad_scores : nullptr);
  p.apply(params);
  if (p.sinks.defined()) {
    run.grad_sinks = empty({c.H}, acc);
    params.grad_sinks = run.grad_sinks.data_ptr<qkv_attention::cpu::AccType<T>>();
  }
  flash::attention_backward_at<T>(level, params);
  return run;
}

KernelRun run_kernels(CpuLevel level, const Problem& p) {
  switch (p.dtype) {
    case at::kDouble:
      return run_kernels<double>(level, p);
    case at::kFloat:
      return run_kernels<float>(level, p);
    case at::kBFloat16:
      return run_kernels<c10::BFloat16>(level, p);
    case at::kHalf:
      return run_kernels<c10::Half>(level, p);
    default:
      FAIL("no kernels for dtype " << p.dtype);
      return {};
  }
}

struct ReferenceRun {
  at::Tensor output, weights, logsumexp, grad_query, grad_key, grad_value, grad_padding, grad_sinks;
};

// The float64 reference from the same inputs, the key/value heads repeated for grouped query
// heads; gradients by autograd. `zero_keys_before`: keys and values before this index are read
// as 0 (the reference would otherwise turn a NaN the kernels must never read into NaN weights).
ReferenceRun run_reference(const Problem& p, int64_t zero_keys_before = 0) {
  const VariantCase& c = p.c;
  const int64_t group = c.H / c.Hkv;
  auto leaf = [](const at::Tensor& t) { return t.detach().to(at::kDouble).requires_grad_(true); };
  const at::Tensor q = leaf(p.query);
  // Copies: for float64 inputs .to() would alias them.
  at::Tensor key_values = p.key.detach().to(at::kDouble).clone();
  at::Tensor value_values = p.value.detach().to(at::kDouble).clone();
  if (zero_keys_before > 0) {
    key_values.narrow(2, 0, zero_keys_before).zero_();
    value_values.narrow(2, 0, zero_keys_before).zero_();
  }
  const at::Tensor k = key_values.requires_grad_(true);
  const at::Tensor v = value_values.requires_grad_(true);
  testing::reference::VariantOptions o;
  o.scale = c.scale.has_value() ? *c.scale : 1.0 / std::sqrt(double(std::max<int64_t>(c.D, 1)));
  o.causal = c.causal;
  o.offset = c.offset;
  o.window_left = c.left;
  o.window_right = c.right;
  o.softcap = c.softcap;
  if (p.slopes.defined()) o.alibi_slopes = p.slopes.to(at::kDouble);
  at::Tensor sinks;
  if (p.sinks.defined()) o.sinks = sinks = leaf(p.sinks);
  if (p.attn_mask.has_value()) o.bool_mask = *p.attn_mask;
  at::Tensor padding;
  if (p.key_padding_mask.has_value()) {
    padding = leaf(*p.key_padding_mask);
    o.additive_mask = padding.view({c.B, 1, 1, c.S});
  }
  o.keep = p.keep;
  o.dropout_p = c.dropout;
  const auto result = testing::reference::attention_variants(q, k.repeat_interleave(group, 1),
                                                             v.repeat_interleave(group, 1), o);
  ReferenceRun ref;
  ref.output = result.output.detach();
  ref.weights = result.weights.detach();
  ref.logsumexp = result.logsumexp.detach();

  std::vector<at::Tensor> inputs = {q, k, v};
  if (padding.defined()) inputs.push_back(padding);
  if (sinks.defined()) inputs.push_back(sinks);
  std::vector<at::Tensor> outputs = {result.output};
  std::vector<at::Tensor> grads_out = {p.grad_output.to(at::kDouble)};
  if (p.grad_weights.has_value()) {
    outputs.push_back(result.weights);
    grads_out.push_back(p.grad_weights->to(at::kDouble));
  }
  std::vector<at::Tensor> grads =
      torch::autograd::grad(outputs, inputs, grads_out, /*retain_graph=*/std::nullopt,
                            /*create_graph=*/false, /*allow_unused=*/true);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = at::zeros_like(inputs[i]);
  }
  ref.grad_query = grads[0];
  ref.grad_key = grads[1];
  ref.grad_value = grads[2];
  size_t next = 3;
  if (padding.defined()) ref.grad_padding = grads[next++];
  if (sinks.defined()) ref.grad_sinks = grads[next++];
  return ref;
}

Tolerance logsumexp_tolerance(at::ScalarType dtype) {
  return dtype == at::kDouble ? Tolerance{1e-10, 1e-10} : Tolerance{1e-5, 1e-5};
}

// d loss / d sink_h sums p_sink (dO . O) over the B L rows of head h: each row's term carries
// the output's rounding (delta is taken from the output as rounded to the dtype), so the
// allowance grows with the square root of the rows summed.
Tolerance sink_gradient_tolerance(const Problem& p) {
  const Tolerance t = testing::gradient_tolerance(p.dtype);
  const double rows = std::sqrt(double(std::max<int64_t>(p.c.B * p.c.L, 1)));
  return {t.atol * rows, t.rtol};
}

// Returns the kernels' run, for further checks.
KernelRun check_against_reference(CpuLevel level, const Problem& p, const ReferenceRun& ref) {
  INFO("level " << level_name(level) << ", dtype " << p.dtype << ", " << describe(p.c));
  const KernelRun run = run_kernels(level, p);
  const Tolerance out_tol = testing::output_tolerance(p.dtype);
  Tolerance grad_tol = testing::gradient_tolerance(p.dtype);
  if (p.grad_weights.has_value() && (p.dtype == at::kBFloat16 || p.dtype == at::kHalf)) {
    // As in test_kernel_flash.cpp: d loss / d weights reaches dS undamped in rows that see few
    // keys (here a window's), with delta from the rounded output.
    grad_tol = {grad_tol.atol * 1.5, grad_tol.rtol * 1.5};
  }
  CHECK_THAT(run.output, IsCloseTo(ref.output, out_tol));
  CHECK_THAT(run.weights, IsCloseTo(ref.weights, out_tol));
  CHECK_THAT(run.logsumexp, IsCloseTo(ref.logsumexp, logsumexp_tolerance(p.dtype)));
  {
    INFO("forward without weights");
    CHECK_THAT(run.output_no_weights, IsCloseTo(ref.output, out_tol));
    CHECK_THAT(run.logsumexp_no_weights, IsCloseTo(ref.logsumexp, logsumexp_tolerance(p.dtype)));
  }
  {
    INFO("forward with the weights averaged over the heads");
    CHECK_THAT(run.output_averaged, IsCloseTo(ref.output, out_tol));
    CHECK_THAT(run.averaged_weights, IsCloseTo(ref.weights.mean(1), out_tol));
  }
  CHECK_THAT(run.grad_query, IsCloseTo(ref.grad_query, grad_tol));
  CHECK_THAT(run.grad_key, IsCloseTo(ref.grad_key, grad_tol));
  CHECK_THAT(run.grad_value, IsCloseTo(ref.grad_value, grad_tol));
  if (p.padding_grad) {
    INFO("key_padding_mask gradient (d loss / d score summed over heads and rows)");
    CHECK_THAT(run.grad_scores.sum({1, 2}), IsCloseTo(ref.grad_padding, grad_tol));
  }
  if (p.sinks.defined()) {
    INFO("sinks gradient");
    CHECK_THAT(run.grad_sinks, IsCloseTo(ref.grad_sinks, sink_gradient_tolerance(p)));
  }
  return run;
}

void check_cases(const std::vector<VariantCase>& cases, uint64_t first_seed) {
  const auto levels = runnable_levels();
  uint64_t seed = first_seed;
  for (const VariantCase& c : cases) {
    for (at::ScalarType dtype : testing::all_dtypes()) {
      const Problem problem(c, dtype, seed++);
      const ReferenceRun ref = run_reference(problem);
      for (CpuLevel level : levels) check_against_reference(level, problem, ref);
    }
  }
}

using VC = VariantCase;

}  // namespace

TEST_CASE("sliding window alone, with causality and alignment offsets, at every level",
          "[flash][variants][window][levels]") {
  const std::vector<VC> cases = {
      VC(2, 2, 2, 70, 90, 16, 16).with_window(7, 5),
      VC(1, 2, 2, 50, 140, 24, 16).with_window(20, -1).with_causal(90),  // bottom-right
      VC(2, 2, 2, 60, 40, 8, 8).with_window(-1, 3).with_causal(-10),     // first rows: no key
      VC(1, 2, 2, 40, 70, 16, 8).with_window(0, 0).with_offset(15),      // one key per row
      // Across the blocks of every level (forward 48/128 x 256/512, backward 48 x 128).
      VC(1, 1, 1, 300, 600, 16, 16).with_window(100, 30).with_causal(300),
  };
  check_cases(cases, 1);
}

TEST_CASE("softcap, ALiBi and sinks alone at every level", "[flash][variants][levels]") {
  const std::vector<VC> cases = {
      VC(2, 2, 2, 40, 60, 16, 8).with_softcap(3.0, 0.5),
      VC(1, 2, 2, 50, 130, 16, 16).with_softcap(2.0, 1.0).with_causal(0),
      VC(2, 3, 3, 45, 70, 16, 16).with_alibi(Alibi::kPerHead),
      VC(2, 2, 2, 30, 140, 8, 8).with_alibi(Alibi::kPerBatchHead).with_causal(110),
      VC(2, 2, 2, 50, 80, 16, 16).with_sinks(),
      // Rows with no key at all: zero output, logsumexp = the sink, no gradient.
      VC(2, 2, 2, 20, 33, 8, 8).with_sinks().with_mask(VariantMask::kBool),
      VC(1, 2, 2, 30, 20, 8, 8).with_sinks().with_causal(-5),
      VC(2, 2, 2, 5, 0, 8, 8).with_sinks(),  // no key
      VC(2, 2, 2, 0, 5, 8, 8).with_sinks(),  // no query
  };
  check_cases(cases, 100);
}

TEST_CASE("all variants combined: grouped heads, L != S, masks, dropout, grad_weights",
          "[flash][variants][levels]") {
  const std::vector<VC> cases = {
      VC(2, 4, 2, 50, 140, 16, 16)
          .with_window(30, 10)
          .with_softcap(4.0, 0.6)
          .with_alibi(Alibi::kPerBatchHead)
          .with_sinks()
          .with_dropout(0.2)
          .with_mask(VariantMask::kPaddingAdditiveGrad)
          .with_grad_weights(),
      VC(1, 4, 1, 130, 100, 24, 8)
          .with_window(40, -1)
          .with_causal(-20)
          .with_softcap(2.5, 0.5)
          .with_alibi(Alibi::kPerHead)
          .with_sinks()
          .with_mask(VariantMask::kBool),
      VC(2, 2, 1, 60, 300, 16, 16)
          .with_window(64, 64)
          .with_offset(200)
          .with_sinks()
          .with_dropout(0.1)
          .with_mask(VariantMask::kPaddingAdditiveGrad),
  };
  check_cases(cases, 200);
}

TEST_CASE("split-KV decoding with the variants at every level (L <= 16, S > 512)",
          "[flash][variants][decode][levels]") {
  // The forward without weights takes the split-KV path here: the window selects the chunks of
  // 256 keys read, the sink enters in the merge.
  const std::vector<VC> cases = {
      VC(1, 4, 2, 3, 700, 16, 16)
          .with_window(300, -1)
          .with_causal(697)
          .with_softcap(3.0, 0.5)
          .with_alibi(Alibi::kPerHead)
          .with_sinks(),
      VC(2, 2, 2, 16, 1100, 8, 8).with_window(100, 50).with_offset(1084).with_dropout(0.1),
      VC(1, 2, 2, 1, 1030, 16, 16).with_window(40, -1).with_causal(1029).with_sinks(),
      // The window reaches no key: only the sink, zero output.
      VC(1, 2, 2, 2, 600, 8, 8).with_window(10, -1).with_causal(-50).with_sinks(),
      VC(2, 2, 2, 4, 800, 8, 8)
          .with_alibi(Alibi::kPerBatchHead)
          .with_sinks()
          .with_mask(VariantMask::kPaddingAdditiveGrad),
  };
  check_cases(cases, 300);
}

TEST_CASE("keys a window hides from every query are never read, forward and backward",
          "[flash][variants][window][levels]") {
  // Bottom-right causal with a window of 101 keys: the first keys (here the first 1024, more
  // than any key block before the window) are NaN; nothing the kernels compute may see them, and
  // their gradients are exactly 0. 40 queries take the blocked forward, 2 the split-KV one.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t S = 2000, hidden = 1024;
  for (int64_t L : {40, 2}) {
    for (at::ScalarType dtype : testing::all_dtypes()) {
      const VC c = VC(1, 2, 2, L, S, 16, 16).with_window(100, -1).with_causal(S - L).with_sinks();
      Problem p(c, dtype, 400 + uint64_t(L));
      const ReferenceRun ref = run_reference(p, hidden);
      p.key.narrow(2, 0, hidden).fill_(nan);
      p.value.narrow(2, 0, hidden).fill_(nan);
      for (CpuLevel level : runnable_levels()) {
        INFO("level " << level_name(level) << ", dtype " << dtype << ", L " << L);
        const KernelRun run = check_against_reference(level, p, ref);
        CHECK(testing::all_zero(run.grad_key.narrow(2, 0, hidden)));
        CHECK(testing::all_zero(run.grad_value.narrow(2, 0, hidden)));
      }
    }
  }
}

TEST_CASE("variant results are bitwise identical for 1 and 2 threads at every level",
          "[flash][variants][threads][levels]") {
  testing::ThreadCountGuard guard;
  // One (batch, key/value head) pair, so the backward splits its key blocks into groups; the
  // sinks' gradient sums over rows of several tasks.
  const std::vector<VC> cases = {
      VC(1, 2, 1, 150, 600, 16, 16)
          .with_window(128, 0)
          .with_causal(450)
          .with_softcap(3.0, 0.5)
          .with_alibi(Alibi::kPerHead)
          .with_sinks()
          .with_dropout(0.1)
          .with_mask(VariantMask::kPaddingAdditiveGrad),
      VC(2, 2, 2, 9, 1031, 8, 8).with_window(300, -1).with_causal(1022).with_sinks(),
  };
  uint64_t seed = 500;
  for (const VC& c : cases) {
    for (at::ScalarType dtype : testing::all_dtypes()) {
      const Problem p(c, dtype, seed++);
      for (CpuLevel level : runnable_levels()) {
        INFO("level " << level_name(level) << ", dtype " << dtype << ", " << describe(c));
        at::set_num_threads(1);
        const KernelRun one = run_kernels(level, p);
        at::set_num_threads(2);
        const KernelRun two = run_kernels(level, p);
        CHECK(testing::bitwise_equal(one.output, two.output));
        CHECK(testing::bitwise_equal(one.output_no_weights, two.output_no_weights));
        CHECK(testing::bitwise_equal(one.logsumexp, two.logsumexp));
        CHECK(testing::bitwise_equal(one.weights, two.weights));
        CHECK(testing::bitwise_equal(one.averaged_weights, two.averaged_weights));
        CHECK(testing::bitwise_equal(one.grad_query, two.grad_query));
        CHECK(testing::bitwise_equal(one.grad_key, two.grad_key));
        CHECK(testing::bitwise_equal(one.grad_value, two.grad_value));
        CHECK(testing::bitwise_equal(one.grad_sinks, two.grad_sinks));
        if (p.padding_grad) CHECK(testing::bitwise_equal(one.grad_scores, two.grad_scores));
      }
    }
  }
}

// A measurement, not a test (hidden: run it by its tag, `qkv_attention_tests "[.timing]"`):
// forward + backward at the level in use, B 1, H 8, D 64, float32, L = S = 4096, causal with a
// window of 512 keys against full causal attention; the median of 3 interleaved runs each.
TEST_CASE("timing: sliding window 512 against full causal attention, L = 4096", "[.timing]") {
  const int64_t L = 4096;
  const CpuLevel level = flash::current_level();
  const VC full = VC(1, 8, 8, L, L, 64, 64).with_causal(0);
  const VC window = VC(1, 8, 8, L, L, 64, 64).with_causal(0).with_window(511, 0);
  const Problem full_p(full, at::kFloat, 1), window_p(window, at::kFloat, 1);
  // Seconds of the forward and of the backward.
  auto seconds = [&](const Problem& p) {
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    auto out = at::empty({1, 8, L, 64}), lse = at::empty({1, 8, L});
    auto fwd = flash::set_forward_params<float>(p.arguments(), out, lse, nullptr);
    p.apply(fwd);
    flash::attention_forward_at<float>(level, fwd);
    const auto middle = Clock::now();
    auto gq = at::empty_like(p.query), gk = at::empty_like(p.key), gv = at::empty_like(p.value);
    auto bwd = flash::set_backward_params<float>(p.arguments(), out, p.grad_output, std::nullopt,
                                                 lse, gq, gk, gv, nullptr);
    p.apply(bwd);
    flash::attention_backward_at<float>(level, bwd);
    const auto end = Clock::now();
    return std::pair<double, double>{std::chrono::duration<double>(middle - start).count(),
                                     std::chrono::duration<double>(end - middle).count()};
  };
  std::vector<double> full_f, full_b, full_s, window_f, window_b, window_s;
  for (int rep = 0; rep < 3; ++rep) {
    const auto [ff, fb] = seconds(full_p);
    const auto [wf, wb] = seconds(window_p);
    full_f.push_back(ff);
    full_b.push_back(fb);
    full_s.push_back(ff + fb);
    window_f.push_back(wf);
    window_b.push_back(wb);
    window_s.push_back(wf + wb);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  WARN("level " << level_name(level) << ", " << at::get_num_threads()
                << " threads, median seconds (forward + backward): causal " << median(full_f)
                << " + " << median(full_b) << ", causal with window 512 " << median(window_f)
                << " + " << median(window_b) << "; fwd+bwd ratio "
                << median(full_s) / median(window_s));
}

// A measurement, like the one above: one decoding step (L = 1, B 1, H 8, D 64, float32) with a
// window of 1024 keys over a cache of 16384, against a cache of 1024 keys; median of 5 each.
TEST_CASE("timing: decoding with a window of 1024 over 16k keys against 1024 keys", "[.timing]") {
  const CpuLevel level = flash::current_level();
  const int64_t long_s = 16384, short_s = 1024;
  const VC windowed = VC(1, 8, 8, 1, long_s, 64, 64).with_causal(long_s - 1).with_window(1023, 0);
  const VC short_cache = VC(1, 8, 8, 1, short_s, 64, 64).with_causal(short_s - 1);
  const Problem windowed_p(windowed, at::kFloat, 2), short_p(short_cache, at::kFloat, 2);
  auto seconds = [&](const Problem& p) {
    const auto start = std::chrono::steady_clock::now();
    auto out = at::empty({1, 8, 1, 64}), lse = at::empty({1, 8, 1});
    auto fwd = flash::set_forward_params<float>(p.arguments(), out, lse, nullptr);
    p.apply(fwd);
    flash::attention_forward_at<float>(level, fwd);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::vector<double> windowed_s, short_s_times;
  for (int rep = 0; rep < 5; ++rep) {
    windowed_s.push_back(seconds(windowed_p));
    short_s_times.push_back(seconds(short_p));
  }
  std::sort(windowed_s.begin(), windowed_s.end());
  std::sort(short_s_times.begin(), short_s_times.end());
  WARN("level " << level_name(level) << ", " << at::get_num_threads()
                << " threads, median microseconds: window 1024 over 16384 keys "
                << windowed_s[2] * 1e6 << ", 1024 keys " << short_s_times[2] * 1e6);
}

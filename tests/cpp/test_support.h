// What every C++ test shares: per-dtype tolerances, a Catch2 matcher that compares a tensor with
// its reference and says where they differ, and seeded random inputs (contiguous or not).
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

// Catch prints a tensor in a failure message by its dtype and shape, never by its values
// (the matcher below says which values differ).
namespace Catch {
template <>
struct StringMaker<at::Tensor> {
  static std::string convert(const at::Tensor& t) {
    if (!t.defined()) return "Tensor(undefined)";
    std::ostringstream out;
    out << "Tensor(" << t.scalar_type() << ", shape " << t.sizes() << ")";
    return out.str();
  }
};
}  // namespace Catch

namespace qkv_attention::testing {

// |actual - expected| <= atol + rtol * |expected|, elementwise, as in torch.allclose.
struct Tolerance {
  double atol;
  double rtol;
};

// Tolerances of an op's output against a float64 reference computed from the very same input
// values (the inputs are rounded to the dtype first, so only the op's own rounding counts).
// The values compared are O(1): inputs are standard normal and weights scaled by 1/sqrt(fan-in).
//   float64:  both sides in double; only the summation order differs (~1e-16 per term).
//             1e-10 leaves a huge margin and still catches any wrong term.
//   float32:  epsilon 1.2e-7; a softmax and sums of up to ~50 terms lose a few ulps.
//   bfloat16: 8 mantissa bits, epsilon 7.8e-3. The output is rounded once after accumulating in
//             float32 (half an ulp, up to 3.9e-3 relative), and a fast kernel may also round the
//             probabilities to bfloat16 before its P.V product: 1e-2 is about 1.3 ulps at 1.
//   float16:  11 mantissa bits, epsilon 9.8e-4; the same reasoning gives 2e-3 (2 ulps at 1).
// Measured over the whole suite with the first CPU kernel, the worst element used 29% of the
// bfloat16 allowance below, 16% of float16's and 4% of float32's.
inline Tolerance output_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return {1e-10, 1e-10};
    case at::kFloat:
      return {1e-5, 1e-5};
    case at::kBFloat16:
      return {1e-2, 1e-2};
    case at::kHalf:
      return {2e-3, 2e-3};
    default:
      FAIL("no tolerance for dtype " << dtype);
      return {0, 0};
  }
}

// Gradients go through one more reduction (over the query rows for dK and dV, over the key
// columns for dQ, over broadcast dimensions for a mask) and a subtraction (dP - delta) that
// cancels, so their errors run about twice those of the output; the allowances double.
// (Measured likewise: 17% of bfloat16's, 10% of float16's and 13% of float32's.)
inline Tolerance gradient_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return {1e-10, 1e-10};
    case at::kFloat:
      return {2e-5, 2e-5};
    case at::kBFloat16:
      return {2e-2, 2e-2};
    case at::kHalf:
      return {4e-3, 4e-3};
    default:
      FAIL("no tolerance for dtype " << dtype);
      return {0, 0};
  }
}

// CHECK_THAT(actual, IsCloseTo(expected, tolerance)): same shape, and every element within
// the tolerance (NaN never matches). On failure it names the worst element.
class IsCloseTo : public Catch::MatcherBase<at::Tensor> {
 public:
  IsCloseTo(at::Tensor expected, Tolerance tolerance)
      : expected_(std::move(expected)), tolerance_(tolerance) {}

  bool match(const at::Tensor& actual) const override {
    if (!actual.defined() || !expected_.defined()) {
      report_ = "has a defined value on both sides";
      return actual.defined() == expected_.defined();
    }
    if (actual.sizes() != expected_.sizes()) {
      std::ostringstream out;
      out << "has the reference's shape " << expected_.sizes();
      report_ = out.str();
      return false;
    }
    const at::Tensor a = actual.detach().to(at::kDouble);
    const at::Tensor e = expected_.detach().to(at::kDouble);
    const at::Tensor diff = (a - e).abs();
    const at::Tensor allowed = tolerance_.atol + tolerance_.rtol * e.abs();
    const at::Tensor ok = diff.le(allowed).logical_or(a.eq(e));  // a.eq(e): equal infinities
    const int64_t bad = ok.logical_not().sum().item<int64_t>();
    if (bad == 0) return true;
    // The worst element: the largest diff / allowed, a NaN counting as infinitely bad.
    const at::Tensor badness =
        at::where(ok, at::zeros_like(diff),
                  at::where(diff.isnan(), at::full_like(diff, INFINITY), diff / allowed));
    int64_t flat = badness.flatten().argmax().item<int64_t>();
    std::vector<int64_t> index(a.dim());
    for (int64_t d = a.dim() - 1; d >= 0; --d) {
      index[d] = flat % a.size(d);
      flat /= a.size(d);
    }
    at::Tensor worst_a = a, worst_e = e;
    for (int64_t d = 0; d < a.dim(); ++d) {
      worst_a = worst_a.select(0, index[d]);
      worst_e = worst_e.select(0, index[d]);
    }
    std::ostringstream out;
    out.precision(8);
    out << "is within atol " << tolerance_.atol << " + rtol " << tolerance_.rtol
        << " of the reference; " << bad << " of " << a.numel() << " elements are not, the worst at "
        << at::IntArrayRef(index) << ": " << worst_a.item<double>() << " vs reference "
        << worst_e.item<double>() << " (max |diff| " << diff.max().item<double>() << ")";
    report_ = out.str();
    return false;
  }

  std::string describe() const override { return report_; }

 private:
  at::Tensor expected_;
  Tolerance tolerance_;
  mutable std::string report_ = "is close to the reference";
};

// Exactly equal, bit for bit where it matters (NaN never matches).
inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a, b);
}

inline bool all_finite(const at::Tensor& t) { return t.isfinite().all().item<bool>(); }

inline bool all_zero(const at::Tensor& t) { return t.eq(0).all().item<bool>(); }

// A seeded generator, so that every test sees the same inputs run after run.
inline at::Generator seeded(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

// Standard normal values of `sizes` in `dtype`, times `scale`. When `contiguous` is false the
// tensor is a strided view: its dimensions are laid out in reverse order and every other
// element of the innermost one is skipped, so no stride of the result is the contiguous one.
inline at::Tensor random_tensor(at::Generator& gen, at::IntArrayRef sizes, at::ScalarType dtype,
                                bool contiguous = true, double scale = 1.0) {
  if (contiguous || sizes.empty()) {
    return (at::randn(sizes, gen, at::kDouble) * scale).to(dtype);
  }
  std::vector<int64_t> reversed(sizes.rbegin(), sizes.rend());
  reversed[0] *= 2;
  std::vector<int64_t> back(sizes.size());
  for (size_t d = 0; d < sizes.size(); ++d) back[d] = static_cast<int64_t>(sizes.size() - 1 - d);
  const at::Tensor base = (at::randn(reversed, gen, at::kDouble) * scale).to(dtype);
  return base.slice(0, 0, reversed[0], 2).permute(back);
}

// A random bool mask (true = may attend) in which each entry is true with probability `keep`.
inline at::Tensor random_bool_mask(at::Generator& gen, at::IntArrayRef sizes, double keep = 0.7) {
  return at::rand(sizes, gen, at::kDouble).lt(keep);
}

// The dtypes every operator supports, for GENERATE.
inline std::vector<at::ScalarType> all_dtypes() {
  return {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf};
}

}  // namespace qkv_attention::testing

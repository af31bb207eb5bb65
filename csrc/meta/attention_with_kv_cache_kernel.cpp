// Shape-only kernel of attention_with_kv_cache: what torch.compile, torch.export and FakeTensor
// see. The call becomes the CPU kernel's problem (ops/attention_problem.h), checked on
// (possibly symbolic) sizes; the values of cache_seqlens are data, checked by the CPU kernel
// when it runs. The caches are written in
// place by the real kernel only: here nothing is written.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/operators.h"

namespace qkv_attention::meta {
namespace {

at::Tensor attention_with_kv_cache_meta(AttentionProblem problem) {
  check_attention_problem(problem);
  return at::empty_symint(output_shape(problem), problem.query.options());  // (B, H, L, Dv)
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, Meta, m) {
  m.impl("attention_with_kv_cache",
         TORCH_FN(attention_with_kv_cache_op<&attention_with_kv_cache_meta>));
}

}  // namespace qkv_attention::meta

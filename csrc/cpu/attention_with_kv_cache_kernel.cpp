// The CPU kernel of attention_with_kv_cache: the call as a cache problem
// (ops/attention_problem.h), checked, its sequences' lengths read and checked — all before
// anything is written — then the in-place write of the new keys and values, then the attention
// forward of cpu/attention_kernel.h once per sequence, on that sequence's valid prefix.
//
// Why a call per sequence: the sequences' valid lengths differ, and the forward's key/value
// operands have one S. Sequence b's first n_b + L_new cache rows (read in place through the
// cache's strides, nothing packed beforehand) let the forward choose its own path for that
// length (split-KV decoding for few queries against many keys), never read an entry past the
// valid prefix (a cache from torch.empty holds anything there), and never spend work on it.
// The causal diagonal is shifted to the bottom right (causal_offset = n_b + L_new - L).
//
// The inputs mean what they held before the call: a query, key or value that shares memory
// with a cache (a view of cache rows, say) is copied before the first write, as the functional
// form that torch.compile runs would see it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash/params.h"
#include "cpu/large_tensor.h"
#include "cpu/memory_overlap.h"
#include "ops/attention_problem.h"
#include "ops/attention_signatures.h"
#include "ops/operators.h"
#include "ops/optional_tensor.h"

namespace qkv_attention::cpu {
namespace {

constexpr const char* kOp = op_label("attention_with_kv_cache");

// A cache that is written must own each of its elements once, and the two caches must not
// share an element: otherwise one write lands on another entry (an expanded cache, k_cache and
// v_cache overlapping views of one buffer). Decided exactly, dense or not (cpu/memory_overlap.h).
void check_writable_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(!has_repeated_elements(k_cache), kOp,
              ": k_cache is written in place, but several of its elements share memory "
              "(strides ",
              k_cache.strides(), "); allocate the cache with its full size");
  TORCH_CHECK(!has_repeated_elements(v_cache), kOp,
              ": v_cache is written in place, but several of its elements share memory "
              "(strides ",
              v_cache.strides(), "); allocate the cache with its full size");
  TORCH_CHECK(!share_elements(k_cache, v_cache), kOp,
              ": k_cache and v_cache share memory; writing one would overwrite the other");
}

// `input` as it is before the caches are written: itself, or a copy when it shares memory with
// a cache.
at::Tensor before_writes(const at::Tensor& input, const at::Tensor& k_cache,
                         const at::Tensor& v_cache) {
  const bool aliased = input.defined() && (input.storage().is_alias_of(k_cache.storage()) ||
                                           input.storage().is_alias_of(v_cache.storage()));
  return aliased ? input.clone() : input;
}

at::Tensor attention_with_kv_cache_cpu(AttentionProblem problem) {
  check_attention_problem(problem);
  flash::convert_variant_tensors(problem);
  // Copies: problem.query may be replaced by a copy below.
  const at::Tensor query = problem.query, k_cache = problem.key, v_cache = problem.value;
  const std::vector<SequenceSpan> sequences = attention_sequences(problem);
  const bool writes = given(problem.new_key) && problem.new_key->size(2) > 0;
  if (writes) check_writable_caches(k_cache, v_cache);

  // Every check has passed: from here on the call succeeds.
  problem.query = before_writes(query, k_cache, v_cache);
  if (writes) {
    const at::Tensor new_key = before_writes(*problem.new_key, k_cache, v_cache);
    const at::Tensor new_value = before_writes(*problem.new_value, k_cache, v_cache);
    for (const SequenceSpan& s : sequences) {
      // (Hkv, L_new, D) into rows n_b .. n_b + L_new of sequence b.
      k_cache.select(0, s.index)
          .narrow(1, s.write_at, s.write_len)
          .copy_(new_key.select(0, s.index));
      v_cache.select(0, s.index)
          .narrow(1, s.write_at, s.write_len)
          .copy_(new_value.select(0, s.index));
    }
  }

  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), Dv = v_cache.size(3);
  at::Tensor output = empty_output({B, H, L, Dv}, query.options());
  if (output.numel() == 0) return output;  // B, H, L or Dv is 0: nothing to attend
  // The kernel's logsumexp of one sequence: scratch, not returned (no backward).
  at::Tensor logsumexp =
      at::empty({1, H, L}, query.options().dtype(at::toOpMathType(query.scalar_type())));

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_with_kv_cache", [&] {
        using Acc = AccType<scalar_t>;
        for (const SequenceSpan& s : sequences) {
          // Sequence b's (1, H, L, Dv) block of the contiguous output.
          scalar_t* out = output.mutable_data_ptr<scalar_t>() + s.index * H * L * Dv;
          attention_forward_kernel(flash::set_forward_params<scalar_t>(
              problem, &s, out, logsumexp.mutable_data_ptr<Acc>()));
        }
      });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("attention_with_kv_cache",
         TORCH_FN(attention_with_kv_cache_op<&attention_with_kv_cache_cpu>));
}

}  // namespace qkv_attention::cpu

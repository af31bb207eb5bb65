// The CPU kernel of attention_with_kv_cache: the call as a cache problem
// (ops/attention_problem.h), checked, its sequences' lengths read and checked — all before
// anything is written — then the in-place write of the new keys and values, then the attention
// forward of cpu/attention_kernel.h once per run of consecutive sequences of one valid length
// (once per sequence when all differ), on their valid prefix.
//
// Why a call per length: the sequences' valid lengths differ, and the forward's key/value
// operands have one S. Sequence b's first n_b + L_new cache rows (read in place through the
// cache's strides, nothing packed beforehand) let the forward choose its own path for that
// length (split-KV decoding for few queries against many keys), never read an entry past the
// valid prefix (a cache from torch.empty holds anything there), and never spend work on it.
// The causal diagonal is shifted to the bottom right (causal_offset = n_b + L_new - L).
//
// Quantized caches (int8, float8): the new rows are quantized as they are written, their scales
// written beside them (cpu/kv_quantize.h), and the forward dequantizes the cached rows block
// by block (cpu/flash/dequantize.h).
//
// The inputs mean what they held before the call: a query, key or value that shares memory
// with a cache (a view of cache rows, say) is copied before the first write, as the functional
// form that torch.compile runs would see it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash/params.h"
#include "cpu/kv_quantize.h"
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
void check_writable_caches(const AttentionProblem& problem) {
  const at::Tensor &k_cache = problem.key, &v_cache = problem.value;
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
  if (!problem.quantized_cache()) return;
  // The scales are written too: the same rules among all four tensors.
  const std::pair<const char*, const at::Tensor*> written[] = {
      {"k_cache", &k_cache},
      {"v_cache", &v_cache},
      {"k_cache_scale", &*problem.k_cache_scale},
      {"v_cache_scale", &*problem.v_cache_scale}};
  for (int i = 2; i < 4; ++i) {
    TORCH_CHECK(!has_repeated_elements(*written[i].second), kOp, ": ", written[i].first,
                " is written in place, but several of its elements share memory (strides ",
                written[i].second->strides(), "); allocate it with its full size");
  }
  for (int i = 0; i < 4; ++i) {
    for (int j = std::max(i + 1, 2); j < 4; ++j) {
      TORCH_CHECK(!share_elements(*written[i].second, *written[j].second), kOp, ": ",
                  written[i].first, " and ", written[j].first,
                  " share memory; writing one would overwrite the other");
    }
  }
}

// `input` as it is before the caches are written: itself, or a copy when it shares memory with
// a cache.
at::Tensor before_writes(const at::Tensor& input, const AttentionProblem& problem) {
  if (!input.defined()) return input;
  bool aliased = input.storage().is_alias_of(problem.key.storage()) ||
                 input.storage().is_alias_of(problem.value.storage());
  for (const std::optional<at::Tensor>& scale : {problem.k_cache_scale, problem.v_cache_scale}) {
    aliased = aliased || (given(scale) && input.storage().is_alias_of(scale->storage()));
  }
  return aliased ? input.clone() : input;
}

at::Tensor attention_with_kv_cache_cpu(AttentionProblem problem) {
  check_attention_problem(problem);
  flash::convert_variant_tensors(problem);
  // Copies: problem.query may be replaced by a copy below.
  const at::Tensor query = problem.query, k_cache = problem.key, v_cache = problem.value;
  const std::vector<SequenceSpan> sequences = attention_sequences(problem);
  const bool writes = given(problem.new_key) && problem.new_key->size(2) > 0;
  if (writes) check_writable_caches(problem);

  // Every check has passed: from here on the call succeeds.
  problem.query = before_writes(query, problem);
  if (writes) {
    const at::Tensor new_key = before_writes(*problem.new_key, problem);
    const at::Tensor new_value = before_writes(*problem.new_value, problem);
    // (Hkv, L_new, D) into rows n_b .. n_b + L_new of sequence b: copied, or quantized with
    // their scales written beside them.
    auto write = [&](const at::Tensor& rows, const at::Tensor& cache,
                     const std::optional<at::Tensor>& scales, const SequenceSpan& s) {
      const at::Tensor target = cache.select(0, s.index).narrow(1, s.write_at, s.write_len);
      if (!given(scales)) {
        target.copy_(rows.select(0, s.index));
        return;
      }
      quantize_rows(rows.select(0, s.index), target,
                    scales->select(0, s.index).narrow(1, s.write_at, s.write_len));
    };
    for (const SequenceSpan& s : sequences) {
      write(new_key, k_cache, problem.k_cache_scale, s);
      write(new_value, v_cache, problem.v_cache_scale, s);
    }
  }

  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), Dv = v_cache.size(3);
  at::Tensor output = empty_output({B, H, L, Dv}, query.options());
  if (output.numel() == 0) return output;  // B, H, L or Dv is 0: nothing to attend
  // The kernel's logsumexp: scratch, not returned (no backward).
  at::Tensor logsumexp =
      at::empty({B, H, L}, query.options().dtype(at::toOpMathType(query.scalar_type())));

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_with_kv_cache", [&] {
        using Acc = AccType<scalar_t>;
        // Consecutive sequences of one valid length are one call, a batch of them read through
        // the batch strides from the first one's entry: one parallel region for a batch of
        // equal lengths (the usual decoding step) instead of one per sequence, whose waits
        // cost more than the work on a busy machine (measured: B8 H32/8 S4096 int8 decode,
        // 2 threads on a busy machine: 156 ms with a call per sequence, 37 ms in one call).
        for (size_t first = 0, end = 0; first < sequences.size(); first = end) {
          SequenceSpan run = sequences[first];
          for (end = first + 1; end < sequences.size() && sequences[end].k_len == run.k_len;
               ++end) {
          }
          run.count = int64_t(end - first);
          // Sequences first .. end: their (count, H, L, Dv) block of the contiguous output.
          scalar_t* out = output.mutable_data_ptr<scalar_t>() + run.index * H * L * Dv;
          attention_forward_kernel(flash::set_forward_params<scalar_t>(
              problem, &run, out, logsumexp.mutable_data_ptr<Acc>() + run.index * H * L));
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

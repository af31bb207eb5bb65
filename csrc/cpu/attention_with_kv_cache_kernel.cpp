// The CPU kernel of attention_with_kv_cache: checks (the lengths included) before anything is
// written, the in-place write of the new keys and values, then the attention forward of
// cpu/attention_kernel.h once per sequence, on views of that sequence's valid prefix.
//
// Why a call per sequence: the sequences' valid lengths differ, and the forward's key/value
// operands are (B, Hkv, S, D) views with one S. A view of sequence b's first n_b + L_new cache
// rows (read in place through the cache's strides, nothing packed beforehand) lets the forward
// choose its own path for that length (split-KV decoding for few queries against many keys),
// never read an entry past the valid prefix (a cache from torch.empty holds anything there),
// and never spend work on it. The causal diagonal is shifted to the bottom right
// (causal_offset = n_b + L_new - L).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "cpu/attention_kernel.h"
#include "cpu/flash/params.h"
#include "cpu/large_tensor.h"
#include "ops/attention_with_kv_cache.h"

namespace qkv_attention::cpu {
namespace {

constexpr const char* kOp = "attention_with_kv_cache";

// A cache that is written must own each of its elements once, and the two caches must not
// share memory: otherwise one write lands on another entry (an expanded cache, or k_cache and
// v_cache views of one buffer).
void check_writable_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(at::has_internal_overlap(k_cache) != at::MemOverlap::Yes, kOp,
              ": k_cache is written in place, but several of its elements share memory "
              "(strides ",
              k_cache.strides(), "); allocate the cache with its full size");
  TORCH_CHECK(at::has_internal_overlap(v_cache) != at::MemOverlap::Yes, kOp,
              ": v_cache is written in place, but several of its elements share memory "
              "(strides ",
              v_cache.strides(), "); allocate the cache with its full size");
  const at::MemOverlapStatus shared = at::get_overlap_status(k_cache, v_cache);
  TORCH_CHECK(k_cache.numel() == 0 || v_cache.numel() == 0 ||
                  (shared != at::MemOverlapStatus::Full && shared != at::MemOverlapStatus::Partial),
              kOp, ": k_cache and v_cache share memory; writing one would overwrite the other");
}

at::Tensor attention_with_kv_cache_cpu(const at::Tensor& query, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache,
                                       const std::optional<at::Tensor>& key,
                                       const std::optional<at::Tensor>& value,
                                       const std::optional<at::Tensor>& cache_seqlens,
                                       const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                       std::optional<double> scale) {
  check_kv_cache_inputs(query, k_cache, v_cache, key, value, cache_seqlens, attn_mask, scale);
  const bool writes = key.has_value() && key->defined();
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2);
  const int64_t S_max = k_cache.size(2), Dv = v_cache.size(3);
  const int64_t L_new = writes ? key->size(2) : 0;
  const std::vector<int64_t> cached = check_kv_cache_lengths(cache_seqlens, B, L_new, S_max);
  if (writes && L_new > 0) check_writable_caches(k_cache, v_cache);

  // Every check has passed: from here on the call succeeds.
  if (writes && L_new > 0) {
    for (int64_t b = 0; b < B; ++b) {
      // (Hkv, L_new, D) into rows n_b .. n_b + L_new of sequence b.
      k_cache.select(0, b).narrow(1, cached[size_t(b)], L_new).copy_(key->select(0, b));
      v_cache.select(0, b).narrow(1, cached[size_t(b)], L_new).copy_(value->select(0, b));
    }
  }

  at::Tensor output = empty_output({B, H, L, Dv}, query.options());
  if (output.numel() == 0) return output;  // B, H, L or Dv is 0: nothing to attend
  at::Tensor logsumexp =
      at::empty({1, H, L}, query.options().dtype(at::toOpMathType(query.scalar_type())));
  // (B, H, L, S_max) views of the mask, with stride 0 where it broadcasts.
  const std::optional<at::Tensor> full_mask =
      attn_mask.has_value() && attn_mask->defined()
          ? std::optional<at::Tensor>(attn_mask->expand({B, H, L, S_max}))
          : std::nullopt;
  const std::optional<at::Tensor> no_tensor;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, query.scalar_type(), "attention_with_kv_cache", [&] {
        for (int64_t b = 0; b < B; ++b) {
          const int64_t n = cached[size_t(b)] + L_new;  // sequence b's valid entries
          const at::Tensor q = query.narrow(0, b, 1);   // (1, H, L, D)
          const at::Tensor k = k_cache.narrow(0, b, 1).narrow(2, 0, n);  // (1, Hkv, n, D)
          const at::Tensor v = v_cache.narrow(0, b, 1).narrow(2, 0, n);  // (1, Hkv, n, Dv)
          const std::optional<at::Tensor> mask =
              full_mask.has_value()
                  ? std::optional<at::Tensor>(full_mask->narrow(0, b, 1).narrow(3, 0, n))
                  : std::nullopt;  // (1, H, L, n)
          const flash::AttentionArguments args{q,   k,         v,     mask,     no_tensor,
                                               0.0, is_causal, scale, no_tensor};
          const at::Tensor out = output.narrow(0, b, 1);  // contiguous: b is the outer dimension
          auto p = flash::set_forward_params<scalar_t>(args, out, logsumexp, nullptr);
          p.causal_offset = n - L;  // bottom-right: the last query sees the last key
          attention_forward_kernel(p);
        }
      });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, CPU, m) {
  m.impl("attention_with_kv_cache", TORCH_FN(attention_with_kv_cache_cpu));
}

}  // namespace qkv_attention::cpu

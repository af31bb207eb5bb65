// attention_with_kv_cache: one step of inference against a key/value cache, in place.
//
//   query (B, H, L, D), k_cache (B, Hkv, S_max, D), v_cache (B, Hkv, S_max, Dv),
//   key (B, Hkv, L_new, D), value (B, Hkv, L_new, Dv), cache_seqlens (B,) int32 or int64
//   -> (B, H, L, Dv)
//
// Sequence b holds n_b = cache_seqlens[b] valid entries before the call. key and value (both or
// neither) are written into the caches at positions n_b .. n_b + L_new - 1 of sequence b, and
// nothing else is written: not the rest of the caches, not cache_seqlens (the caller advances
// it). Then sequence b's L queries attend to its first n_b + L_new entries and never read past
// them (a cache allocated with torch.empty may hold anything there). is_causal is aligned
// bottom-right: query i sees keys j <= n_b + L_new - L + i, so new queries follow the cached
// keys. attn_mask is broadcastable to (B, H, L, S_max) (bool true = may attend, or added to the
// scores; only its first n_b + L_new columns are read). Query head h reads key/value head
// h / (H / Hkv). cache_seqlens None means every S_max entry is valid (key must then be None).
// A query row that sees no key gives zeros. The variants (ops/attention.h) are aligned
// bottom-right as is_causal (o = n_b + L_new - L): a window (w - 1, 0) with is_causal reads only
// the last w valid entries for the last query.
//
// Quantized caches: k_cache and v_cache of one dtype int8, float8_e4m3fn or float8_e5m2, each
// with its float32 scale k_cache_scale / v_cache_scale (B, Hkv, S_max), one per cached position
// and head: a cached element is stored * scale. key and value (query's dtype) are quantized as
// they are written, per (position, head): s = max|x| / top over the features (top 127 int8,
// 448 e4m3fn, 57344 e5m2), stored = round-to-nearest-even(x / s) saturated, s = 0 storing zeros;
// the scales are written at the same positions. Attention dequantizes the cache rows inside
// the kernel's blocks and accumulates in float32; the output has query's dtype. Float caches
// take no scales.
//
// Inference only: no autograd. Every check, the lengths included, happens before anything is
// written, so a call that raises leaves the caches as they were.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ops/attention_problem.h"

namespace qkv_attention {

at::Tensor attention_with_kv_cache(const at::Tensor& query, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache,
                                   const std::optional<at::Tensor>& key = std::nullopt,
                                   const std::optional<at::Tensor>& value = std::nullopt,
                                   const std::optional<at::Tensor>& cache_seqlens = std::nullopt,
                                   const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                   bool is_causal = true,
                                   std::optional<double> scale = std::nullopt,
                                   at::IntArrayRef window_size = {-1, -1}, double softcap = 0.0,
                                   const std::optional<at::Tensor>& alibi_slopes = std::nullopt,
                                   const std::optional<at::Tensor>& sinks = std::nullopt,
                                   const std::optional<at::Tensor>& k_cache_scale = std::nullopt,
                                   const std::optional<at::Tensor>& v_cache_scale = std::nullopt);

// The same call from a cache problem (ops/attention_signatures.h).
at::Tensor attention_with_kv_cache_call(const AttentionProblem& problem);

}  // namespace qkv_attention

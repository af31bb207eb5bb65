// Schema and typed entry point of attention_with_kv_cache, and the input checks that every
// dispatch key's kernel runs first.
#include "ops/attention_with_kv_cache.h"

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "ops/checks.h"

namespace qkv_attention {
namespace {

constexpr const char* kOp = "attention_with_kv_cache";

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Both sizes known and `size` > `limit`.
bool known_to_exceed(const c10::SymInt& size, const c10::SymInt& limit) {
  const std::optional<int64_t> s = size.maybe_as_int(), l = limit.maybe_as_int();
  return s.has_value() && l.has_value() && *s > *l;
}

void check_new_entries(const at::Tensor& query, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& key, const at::Tensor& value,
                       const std::optional<at::Tensor>& cache_seqlens) {
  check_input(kOp, "key", key, 4, "(B, Hkv, L_new, D)");
  check_input(kOp, "value", value, 4, "(B, Hkv, L_new, Dv)");
  // key and value are copied into the caches as they are: no dtype conversion on the way.
  check_same_dtype_and_device(kOp, "key", key, "k_cache", k_cache);
  check_same_dtype_and_device(kOp, "value", value, "v_cache", v_cache);
  check_size(kOp, "key", key, 0, query.sym_size(0), "batch entries", "query");
  check_size(kOp, "key", key, 1, k_cache.sym_size(1), "heads", "k_cache");
  check_size(kOp, "key", key, 3, k_cache.sym_size(3), "features per head", "k_cache");
  check_size(kOp, "value", value, 0, query.sym_size(0), "batch entries", "query");
  check_size(kOp, "value", value, 1, v_cache.sym_size(1), "heads", "v_cache");
  check_size(kOp, "value", value, 2, key.sym_size(2), "positions", "key");
  check_size(kOp, "value", value, 3, v_cache.sym_size(3), "features per head", "v_cache");
  TORCH_CHECK(!known_to_exceed(key.sym_size(2), k_cache.sym_size(2)), kOp, ": key has ",
              key.sym_size(2),
              " new positions but the caches hold at most S_max = ", k_cache.sym_size(2),
              " (k_cache has shape ", k_cache.sym_sizes(), ")");
  TORCH_CHECK(given(cache_seqlens), kOp,
              ": key and value are given but cache_seqlens is None; the positions where they "
              "are written (after each sequence's cache_seqlens[b] valid entries) are then "
              "unknown. Pass cache_seqlens, (B,) int32 or int64");
  check_tensor_elements(kOp, "key", key);
  check_tensor_elements(kOp, "value", value);
}

void check_mask(const at::Tensor& mask, const at::Tensor& query, const at::Tensor& k_cache) {
  check_dense(kOp, "attn_mask", mask);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == query.scalar_type(),
                   kOp, ": attn_mask must be bool or have the query's dtype ", query.scalar_type(),
                   ", but has dtype ", mask.scalar_type());
  TORCH_CHECK(mask.device() == query.device(), kOp, ": attn_mask is on ", mask.device(),
              " but query is on ", query.device());
  check_tensor_elements(kOp, "attn_mask", mask);
  const c10::SymInt target[4] = {query.sym_size(0), query.sym_size(1), query.sym_size(2),
                                 k_cache.sym_size(2)};
  bool broadcastable = mask.dim() <= 4;
  for (int64_t d = 0; broadcastable && d < mask.dim(); ++d) {
    const c10::SymInt& size = mask.sym_size(mask.dim() - 1 - d);
    broadcastable = size == 1 || size == target[3 - d];
  }
  TORCH_CHECK(broadcastable, kOp, ": attn_mask of shape ", mask.sym_sizes(),
              " cannot be broadcast to (B, H, L, S_max) = (", target[0], ", ", target[1], ", ",
              target[2], ", ", target[3], ")");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkv_attention, m) {
  m.def(
      "attention_with_kv_cache(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor? key=None, Tensor? value=None, Tensor? cache_seqlens=None, "
      "Tensor? attn_mask=None, bool is_causal=True, float? scale=None) -> Tensor");
}

at::Tensor attention_with_kv_cache(const at::Tensor& query, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                                   const std::optional<at::Tensor>& value,
                                   const std::optional<at::Tensor>& cache_seqlens,
                                   const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                   std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qkv_attention::attention_with_kv_cache", "")
                       .typed<decltype(attention_with_kv_cache)>();
  // The typed call takes the caches by const reference, as ATen's in-place ops do.
  return op.call(query, k_cache, v_cache, key, value, cache_seqlens, attn_mask, is_causal, scale);
}

void check_kv_cache_inputs(const at::Tensor& query, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                           const std::optional<at::Tensor>& value,
                           const std::optional<at::Tensor>& cache_seqlens,
                           const std::optional<at::Tensor>& attn_mask,
                           std::optional<double> scale) {
  check_input(kOp, "query", query, 4, "(B, H, L, D)");
  check_input(kOp, "k_cache", k_cache, 4, "(B, Hkv, S_max, D)");
  check_input(kOp, "v_cache", v_cache, 4, "(B, Hkv, S_max, Dv)");
  check_same_dtype_and_device(kOp, "k_cache", k_cache, "query", query);
  check_same_dtype_and_device(kOp, "v_cache", v_cache, "query", query);
  check_size(kOp, "k_cache", k_cache, 0, query.sym_size(0), "batch entries", "query");
  // Grouped-query attention: the caches may have fewer heads, a divisor of query's.
  const c10::SymInt& kv_heads = k_cache.sym_size(1);
  TORCH_CHECK(kv_heads != 0 ? query.sym_size(1) % kv_heads == 0 && query.sym_size(1) >= kv_heads
                            : query.sym_size(1) == 0,
              kOp, ": k_cache has ", kv_heads, " heads and query has ", query.sym_size(1),
              "; query's heads must be a multiple of the caches' (grouped-query attention: "
              "query head h reads cache head h / (query heads / cache heads))");
  check_size(kOp, "k_cache", k_cache, 3, query.sym_size(3), "features per head", "query");
  check_size(kOp, "v_cache", v_cache, 0, query.sym_size(0), "batch entries", "query");
  check_size(kOp, "v_cache", v_cache, 1, k_cache.sym_size(1), "heads", "k_cache");
  check_size(kOp, "v_cache", v_cache, 2, k_cache.sym_size(2), "positions", "k_cache");
  check_tensor_elements(kOp, "query", query);
  check_tensor_elements(kOp, "k_cache", k_cache);
  check_tensor_elements(kOp, "v_cache", v_cache);
  const c10::SymInt B = query.sym_size(0), H = query.sym_size(1), L = query.sym_size(2);
  check_element_count(kOp, "the output (B, H, L, Dv)", {B, H, L, v_cache.sym_size(3)});
  check_element_count(kOp, "the attention scores (B, H, L, S_max)", {B, H, L, k_cache.sym_size(2)});

  TORCH_CHECK(given(key) == given(value), kOp,
              ": key and value must be given together (the new entries of both caches), but ",
              given(key) ? "key is given and value is None" : "value is given and key is None");
  if (given(key)) check_new_entries(query, k_cache, v_cache, *key, *value, cache_seqlens);

  if (given(cache_seqlens)) {
    const at::Tensor& lengths = *cache_seqlens;
    check_dense(kOp, "cache_seqlens", lengths);
    TORCH_CHECK_TYPE(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong, kOp,
                     ": cache_seqlens must be int32 or int64, but has dtype ",
                     lengths.scalar_type());
    TORCH_CHECK(lengths.device() == query.device(), kOp, ": cache_seqlens is on ", lengths.device(),
                " but query is on ", query.device());
    TORCH_CHECK(lengths.dim() == 1 && lengths.sym_size(0) == B, kOp,
                ": cache_seqlens must have shape (B,) = (", B,
                "), one length per sequence, "
                "but has shape ",
                lengths.sym_sizes());
  }
  if (given(attn_mask)) check_mask(*attn_mask, query, k_cache);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), kOp,
              ": scale must be a finite number, but is ", scale.value_or(0.0));
  if (scale.has_value()) {
    check_representable(kOp, "scale", *scale, at::toOpMathType(query.scalar_type()),
                        query.scalar_type());
  }
}

std::vector<int64_t> check_kv_cache_lengths(const std::optional<at::Tensor>& cache_seqlens,
                                            int64_t batch, int64_t new_len, int64_t s_max) {
  if (!given(cache_seqlens)) return std::vector<int64_t>(static_cast<size_t>(batch), s_max);
  const at::Tensor& lengths = *cache_seqlens;
  std::vector<int64_t> result(static_cast<size_t>(batch));
  const int64_t stride = lengths.stride(0);
  for (int64_t b = 0; b < batch; ++b) {
    result[size_t(b)] = lengths.scalar_type() == at::kInt
                            ? int64_t(lengths.const_data_ptr<int32_t>()[b * stride])
                            : lengths.const_data_ptr<int64_t>()[b * stride];
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = result[size_t(b)];
    TORCH_CHECK(n >= 0, kOp, ": cache_seqlens[", b, "] = ", n,
                " is negative; a sequence's valid length must be in [0, S_max = ", s_max, "]");
    // new_len <= s_max was checked with the shapes, so s_max - new_len cannot wrap.
    TORCH_CHECK(n <= s_max - new_len, kOp, ": sequence ", b,
                " would overflow its cache: ", "cache_seqlens[", b, "] = ", n,
                " valid entries plus the ", new_len,
                " new positions of key exceed the caches' S_max = ", s_max, " (at most ",
                s_max - new_len, " entries may be valid before this call)");
  }
  return result;
}

}  // namespace qkv_attention

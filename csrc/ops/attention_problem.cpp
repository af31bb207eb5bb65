// ops/attention_problem.h: the attention family's problem description and its checks, one
// wording per rule.
#include "ops/attention_problem.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

#include "ops/checks.h"
#include "ops/optional_tensor.h"

namespace qkv_attention {
namespace {

// The axes of query/key/value in a layout: dense and cache (B, heads, rows, features), packed
// (rows, heads, features).
struct Axes {
  int64_t rank, heads, rows, features;
};
Axes axes_of(AttentionLayout layout) {
  return layout == AttentionLayout::kPacked ? Axes{3, 1, 0, 2} : Axes{4, 1, 2, 3};
}

struct LayoutNames {
  const char *query, *key, *value;
};
LayoutNames layout_names(AttentionLayout layout) {
  switch (layout) {
    case AttentionLayout::kPacked:
      return {"(total_q, H, D)", "(total_k, Hkv, D)", "(total_k, Hkv, Dv)"};
    case AttentionLayout::kCache:
      return {"(B, H, L, D)", "(B, Hkv, S_max, D)", "(B, Hkv, S_max, Dv)"};
    case AttentionLayout::kDense:
      break;
  }
  return {"(B, H, L, D)", "(B, Hkv, S, D)", "(B, Hkv, S, Dv)"};
}

void check_mask_dtype_and_device(const char* op, const char* name, const at::Tensor& mask,
                                 const at::Tensor& query) {
  check_dense(op, name, mask);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == query.scalar_type(), op,
                   ": ", name, " must be bool or have the query's dtype ", query.scalar_type(),
                   ", but has dtype ", mask.scalar_type());
  TORCH_CHECK(mask.device() == query.device(), op, ": ", name, " is on ", mask.device(),
              " but query is on ", query.device());
}

// attn_mask broadcastable to (B, H, L, S); `s_name` says what S is ("S", "S_max").
void check_attn_mask(const char* op, const at::Tensor& mask, const at::Tensor& query,
                     const c10::SymInt& kv_len, const char* s_name) {
  check_mask_dtype_and_device(op, "attn_mask", mask, query);
  check_tensor_elements(op, "attn_mask", mask);
  const c10::SymInt target[4] = {query.sym_size(0), query.sym_size(1), query.sym_size(2), kv_len};
  bool broadcastable = mask.dim() <= 4;
  for (int64_t d = 0; broadcastable && d < mask.dim(); ++d) {
    const c10::SymInt& size = mask.sym_size(mask.dim() - 1 - d);
    broadcastable = size == 1 || size == target[3 - d];
  }
  TORCH_CHECK(broadcastable, op, ": attn_mask of shape ", mask.sym_sizes(),
              " cannot be broadcast to the attention scores' shape (B, H, L, ", s_name, ") = (",
              target[0], ", ", target[1], ", ", target[2], ", ", target[3], ")");
}

void check_rng_state_device(const char* op, const at::Tensor& rng_state, const at::Tensor& query) {
  check_rng_state(op, rng_state);
  // The composite ops make rng_state on the CPU, where the kernels read it.
  TORCH_CHECK(rng_state.device() == query.device() || rng_state.device().is_cpu(), op,
              ": rng_state is on ", rng_state.device(), " but must be on the CPU or on query's ",
              query.device());
}

// Grouped-query attention: key/value may have fewer heads, a divisor of query's. When the
// sizes look like (B, L, H, D) given for (B, H, L, D) — query and key agree in dimension 2,
// not in dimension 1 — the message says so: the usual cause is the axis order.
void check_grouped_heads(const AttentionProblem& p) {
  const c10::SymInt& heads = p.query.sym_size(1);
  const c10::SymInt& kv_heads = p.key.sym_size(1);
  const bool ok = kv_heads != 0 ? heads % kv_heads == 0 && heads >= kv_heads : heads == 0;
  if (ok) return;
  const bool looks_transposed = p.layout != AttentionLayout::kPacked &&
                                p.query.sym_size(2) == p.key.sym_size(2) && heads != kv_heads;
  TORCH_CHECK(!looks_transposed, p.op, ": ", p.key_name(), " has ", kv_heads,
              " heads and query has ", heads, "; query's heads must be a multiple of ",
              p.key_name(), "'s (grouped-query attention). Both have ", p.query.sym_size(2),
              " in dimension 2: if they are laid out (B, L, H, D), with the heads third, pass "
              "query.transpose(1, 2) (and the same for key and value); the ops take "
              "(B, H, L, D)");
  TORCH_CHECK(false, p.op, ": ", p.key_name(), " has ", kv_heads, " heads and query has ", heads,
              "; query's heads must be a multiple of ", p.key_name(),
              "'s (grouped-query attention: query head h reads key/value head h / (query heads / "
              "key heads))");
}

void check_offsets_tensor(const char* op, const char* name, const at::Tensor& offsets,
                          const at::Tensor& query) {
  check_defined(op, name, offsets);
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong, op,
                   ": ", name, " must be int32 or int64, but has dtype ", offsets.scalar_type());
  // The kernels read the offsets on the CPU (shape-only kernels: on query's device, e.g.
  // meta, where FakeTensor puts them).
  TORCH_CHECK(offsets.device().is_cpu() || offsets.device() == query.device(), op, ": ", name,
              " must be on the CPU, but is on ", offsets.device());
  TORCH_CHECK(offsets.dim() == 1 && offsets.sym_size(0) >= 1, op, ": ", name,
              " must have shape (B + 1,) (the offsets of B sequences, starting at 0), but has "
              "shape ",
              offsets.sym_sizes());
  check_tensor_elements(op, name, offsets);
}

void check_packed_offsets(const AttentionProblem& p) {
  check_offsets_tensor(p.op, "cu_seqlens_q", p.cu_seqlens_q, p.query);
  check_offsets_tensor(p.op, "cu_seqlens_k", p.cu_seqlens_k, p.query);
  const c10::SymInt& entries_q = p.cu_seqlens_q.sym_size(0);
  const c10::SymInt& entries_k = p.cu_seqlens_k.sym_size(0);
  TORCH_CHECK(entries_k == entries_q, p.op, ": cu_seqlens_k has ", entries_k, " entries (",
              entries_k - 1, " sequences) but cu_seqlens_q has ", entries_q, " (", entries_q - 1,
              " sequences); both must have B + 1 entries");
  TORCH_CHECK(p.max_seqlen_q >= 0, p.op, ": max_seqlen_q must be non-negative, but is ",
              p.max_seqlen_q);
  TORCH_CHECK(p.max_seqlen_k >= 0, p.op, ": max_seqlen_k must be non-negative, but is ",
              p.max_seqlen_k);
}

// Both sizes known and `size` > `limit`.
bool known_to_exceed(const c10::SymInt& size, const c10::SymInt& limit) {
  const std::optional<int64_t> s = size.maybe_as_int(), l = limit.maybe_as_int();
  return s.has_value() && l.has_value() && *s > *l;
}

// A quantized cache (int8 or float8) and its scale: the cache (B, Hkv, S_max, D) of a quantized
// dtype on query's device, the scale float32 (B, Hkv, S_max) beside it.
void check_quantized_cache(const AttentionProblem& p, const char* name, const at::Tensor& cache,
                           const char* layout, const char* scale_name,
                           const std::optional<at::Tensor>& scale) {
  const char* op = p.op;
  check_defined(op, name, cache);
  TORCH_CHECK_TYPE(is_quantized_cache_dtype(cache.scalar_type()), op, ": ", name,
                   " must be float64, float32, bfloat16, float16, or a quantized cache's int8, "
                   "float8_e4m3fn or float8_e5m2, but has dtype ",
                   cache.scalar_type());
  TORCH_CHECK(cache.dim() == 4, op, ": ", name, " must be 4-D ", layout, ", but has shape ",
              cache.sym_sizes());
  TORCH_CHECK(cache.device() == p.query.device(), op, ": ", name, " is on ", cache.device(),
              " but query is on ", p.query.device());
  TORCH_CHECK(given(scale), op, ": ", name, " has the quantized dtype ", cache.scalar_type(),
              ", so ", scale_name,
              " (float32 (B, Hkv, S_max), one scale per cached position and head) must be given, "
              "but is None");
  const at::Tensor& s = *scale;
  check_dense(op, scale_name, s);
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, ": ", scale_name,
                   " must be float32, but has dtype ", s.scalar_type());
  TORCH_CHECK(s.device() == p.query.device(), op, ": ", scale_name, " is on ", s.device(),
              " but query is on ", p.query.device());
  TORCH_CHECK(s.dim() == 3 && s.sym_size(0) == cache.sym_size(0) &&
                  s.sym_size(1) == cache.sym_size(1) && s.sym_size(2) == cache.sym_size(2),
              op, ": ", scale_name, " must have shape (B, Hkv, S_max) = (", cache.sym_size(0), ", ",
              cache.sym_size(1), ", ", cache.sym_size(2), "), ", name,
              "'s first three sizes, but has shape ", s.sym_sizes());
  check_tensor_elements(op, scale_name, s);
}

void check_cache_entries(const AttentionProblem& p) {
  const char* op = p.op;
  // The new entries have the caches' dtype, or query's when the caches are quantized (they
  // are quantized as they are written).
  const bool quantized = p.quantized_cache();
  const at::Tensor& key_reference = quantized ? p.query : p.key;
  const at::Tensor& value_reference = quantized ? p.query : p.value;
  const char* key_reference_name = quantized ? "query" : "k_cache";
  const char* value_reference_name = quantized ? "query" : "v_cache";
  TORCH_CHECK(
      given(p.new_key) == given(p.new_value), op,
      ": key and value must be given together (the new entries of both caches), but ",
      given(p.new_key) ? "key is given and value is None" : "value is given and key is None");
  if (given(p.new_key)) {
    const at::Tensor &key = *p.new_key, &value = *p.new_value;
    check_input(op, "key", key, 4, "(B, Hkv, L_new, D)");
    check_input(op, "value", value, 4, "(B, Hkv, L_new, Dv)");
    // key and value are copied into float caches as they are: no dtype conversion on the way.
    check_same_dtype_and_device(op, "key", key, key_reference_name, key_reference);
    check_same_dtype_and_device(op, "value", value, value_reference_name, value_reference);
    check_size(op, "key", key, 0, p.query.sym_size(0), "batch entries", "query");
    check_size(op, "key", key, 1, p.key.sym_size(1), "heads", "k_cache");
    check_size(op, "key", key, 3, p.key.sym_size(3), "features per head", "k_cache");
    check_size(op, "value", value, 0, p.query.sym_size(0), "batch entries", "query");
    check_size(op, "value", value, 1, p.value.sym_size(1), "heads", "v_cache");
    check_size(op, "value", value, 2, key.sym_size(2), "positions", "key");
    check_size(op, "value", value, 3, p.value.sym_size(3), "features per head", "v_cache");
    TORCH_CHECK(!known_to_exceed(key.sym_size(2), p.key.sym_size(2)), op, ": key has ",
                key.sym_size(2),
                " new positions but the caches hold at most S_max = ", p.key.sym_size(2),
                " (k_cache has shape ", p.key.sym_sizes(), ")");
    TORCH_CHECK(given(p.cache_seqlens), op,
                ": key and value are given but cache_seqlens is None; the positions where they "
                "are written (after each sequence's cache_seqlens[b] valid entries) are then "
                "unknown. Pass cache_seqlens, (B,) int32 or int64");
    check_tensor_elements(op, "key", key);
    check_tensor_elements(op, "value", value);
  }
  if (given(p.cache_seqlens)) {
    const at::Tensor& lengths = *p.cache_seqlens;
    check_dense(op, "cache_seqlens", lengths);
    TORCH_CHECK_TYPE(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong, op,
                     ": cache_seqlens must be int32 or int64, but has dtype ",
                     lengths.scalar_type());
    TORCH_CHECK(lengths.device() == p.query.device(), op, ": cache_seqlens is on ",
                lengths.device(), " but query is on ", p.query.device());
    TORCH_CHECK(lengths.dim() == 1 && lengths.sym_size(0) == p.query.sym_size(0), op,
                ": cache_seqlens must have shape (B,) = (", p.query.sym_size(0),
                "), one length per sequence, but has shape ", lengths.sym_sizes());
  }
}

// alibi_slopes and sinks: small per-head tensors of float32 or the inputs' dtype, on query's
// device, read by the kernels in the accumulation dtype.
void check_head_tensor(const AttentionProblem& p, const char* name, const at::Tensor& t,
                       bool per_batch_allowed) {
  const char* op = p.op;
  check_dense(op, name, t);
  const at::ScalarType dtype = p.query.scalar_type();
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == dtype, op, ": ", name,
                   " must be float32 or have the inputs' dtype ", dtype, ", but has dtype ",
                   t.scalar_type());
  TORCH_CHECK(t.device() == p.query.device(), op, ": ", name, " is on ", t.device(),
              " but query is on ", p.query.device());
  const c10::SymInt& heads = p.query.sym_size(1);
  const bool per_head = t.dim() == 1 && t.sym_size(0) == heads;
  if (!per_batch_allowed) {
    TORCH_CHECK(per_head, op, ": ", name, " must have shape (H,) = (", heads,
                "), one value per query head, but has shape ", t.sym_sizes());
  } else {
    // The batch of a packed problem is its number of sequences.
    const c10::SymInt batch =
        p.layout == AttentionLayout::kPacked ? p.cu_seqlens_q.sym_size(0) - 1 : p.query.sym_size(0);
    const bool per_batch_head = t.dim() == 2 && t.sym_size(0) == batch && t.sym_size(1) == heads;
    TORCH_CHECK(per_head || per_batch_head, op, ": ", name, " must have shape (H,) = (", heads,
                ") or (B, H) = (", batch, ", ", heads, "), but has shape ", t.sym_sizes());
  }
  check_tensor_elements(op, name, t);
}

void check_variants(const AttentionProblem& p) {
  const char* op = p.op;
  const AttentionVariants& v = p.variants;
  TORCH_CHECK(v.window_size.size() == 2, op,
              ": window_size must have two entries (left, right), but has ", v.window_size.size(),
              ": ", c10::IntArrayRef(v.window_size));
  TORCH_CHECK(v.window_size[0] >= -1 && v.window_size[1] >= -1, op,
              ": window_size entries must be -1 (that side open) or a number of keys >= 0, but "
              "window_size is (",
              v.window_size[0], ", ", v.window_size[1], ")");
  TORCH_CHECK(std::isfinite(v.softcap) && v.softcap >= 0, op,
              ": softcap must be a finite number >= 0 (0: no cap), but is ", v.softcap);
  if (given(v.alibi_slopes)) {
    check_head_tensor(p, "alibi_slopes", *v.alibi_slopes, /*per_batch_allowed=*/true);
    TORCH_CHECK(!v.alibi_slopes->requires_grad(), op,
                ": alibi_slopes requires grad, but the slopes are not differentiable (they are "
                "fixed per head); pass alibi_slopes.detach()");
  }
  if (given(v.sinks)) check_head_tensor(p, "sinks", *v.sinks, /*per_batch_allowed=*/false);
}

// Every tensor the kernels read or allocate, before any count is computed from it
// (ops/checks.h): the inputs, the output, the logsumexp, and the scores (B, H, L, S) — as a
// tensor when they are materialised (the returned weights, the gradient of a mask), otherwise
// only as a count of positions, which the dropout stream's counters and the kernels' index
// arithmetic compute in 64 bits. A packed batch's scores are counted per sequence, from the
// real lengths (attention_sequences): max_seqlen is only a bound.
void check_problem_sizes(const AttentionProblem& p) {
  check_tensor_elements(p.op, "query", p.query);
  check_tensor_elements(p.op, p.key_name(), p.key);
  check_tensor_elements(p.op, p.value_name(), p.value);
  const Axes axes = axes_of(p.layout);
  const std::vector<c10::SymInt> output = output_shape(p);
  check_element_count(p.op,
                      p.layout == AttentionLayout::kPacked ? "the output (total_q, H, Dv)"
                                                           : "the output (B, H, L, Dv)",
                      output);
  check_element_count(p.op,
                      p.layout == AttentionLayout::kPacked ? "the logsumexp (total_q, H)"
                                                           : "the logsumexp (B, H, L)",
                      logsumexp_shape(p));
  if (p.layout == AttentionLayout::kPacked) return;
  const c10::SymInt B = p.query.sym_size(0), H = p.query.sym_size(1), L = p.query.sym_size(2);
  const c10::SymInt S = p.key.sym_size(axes.rows);
  if (p.layout == AttentionLayout::kCache) {
    // Bounded like a tensor: the call's work is B * H * L * S_max at most.
    check_element_count(p.op, "the attention scores (B, H, L, S_max)", {B, H, L, S});
  } else if (p.scores_materialised) {
    check_element_count(p.op, "the attention weights (B, H, L, S)", {B, H, L, S});
  } else {
    check_count_fits(p.op, "the attention scores (B, H, L, S)", {B, H, L, S});
  }
}

}  // namespace

bool is_quantized_cache_dtype(at::ScalarType dtype) {
  return dtype == at::kChar || dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2;
}

bool AttentionProblem::quantized_cache() const {
  return layout == AttentionLayout::kCache && key.defined() &&
         is_quantized_cache_dtype(key.scalar_type());
}

const char* AttentionProblem::key_name() const {
  return layout == AttentionLayout::kCache ? "k_cache" : "key";
}
const char* AttentionProblem::value_name() const {
  return layout == AttentionLayout::kCache ? "v_cache" : "value";
}

AttentionProblem dense_problem(const char* op, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                               const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                               bool is_causal, std::optional<double> scale,
                               const std::optional<at::Tensor>& rng_state,
                               AttentionVariants variants, bool rng_state_required,
                               bool scores_materialised) {
  AttentionProblem p{query,
                     key,
                     value,
                     optional_if_given(attn_mask),
                     optional_if_given(key_padding_mask),
                     dropout_p,
                     is_causal,
                     scale,
                     optional_if_given(rng_state)};
  p.variants = std::move(variants);
  p.op = op;
  p.rng_state_required = rng_state_required;
  p.scores_materialised = scores_materialised;
  return p;
}

AttentionProblem packed_problem(const char* op, const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& cu_seqlens_q,
                                const at::Tensor& cu_seqlens_k, const c10::SymInt& max_seqlen_q,
                                const c10::SymInt& max_seqlen_k, double dropout_p, bool is_causal,
                                std::optional<double> scale,
                                const std::optional<at::Tensor>& rng_state,
                                AttentionVariants variants, bool rng_state_required) {
  AttentionProblem p{query,        key,          value,
                     std::nullopt, std::nullopt, dropout_p,
                     is_causal,    scale,        optional_if_given(rng_state)};
  p.variants = std::move(variants);
  p.layout = AttentionLayout::kPacked;
  p.op = op;
  p.rng_state_required = rng_state_required;
  p.cu_seqlens_q = cu_seqlens_q;
  p.cu_seqlens_k = cu_seqlens_k;
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  return p;
}

AttentionProblem cache_problem(const char* op, const at::Tensor& query, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const std::optional<at::Tensor>& key,
                               const std::optional<at::Tensor>& value,
                               const std::optional<at::Tensor>& cache_seqlens,
                               const std::optional<at::Tensor>& attn_mask, bool is_causal,
                               std::optional<double> scale, AttentionVariants variants,
                               const std::optional<at::Tensor>& k_cache_scale,
                               const std::optional<at::Tensor>& v_cache_scale) {
  AttentionProblem p{query,        k_cache, v_cache,   optional_if_given(attn_mask),
                     std::nullopt, 0.0,     is_causal, scale,
                     std::nullopt};
  p.variants = std::move(variants);
  p.layout = AttentionLayout::kCache;
  p.op = op;
  p.rng_state_required = false;
  p.new_key = optional_if_given(key);
  p.new_value = optional_if_given(value);
  p.cache_seqlens = optional_if_given(cache_seqlens);
  p.k_cache_scale = optional_if_given(k_cache_scale);
  p.v_cache_scale = optional_if_given(v_cache_scale);
  return p;
}

void check_attention_problem(const AttentionProblem& p) {
  const char* op = p.op;
  const Axes axes = axes_of(p.layout);
  const LayoutNames names = layout_names(p.layout);
  const at::Tensor &query = p.query, &key = p.key, &value = p.value;
  const char *key_name = p.key_name(), *value_name = p.value_name();
  check_input(op, "query", query, axes.rank, names.query);
  if (p.quantized_cache() || (p.layout == AttentionLayout::kCache && value.defined() &&
                              is_quantized_cache_dtype(value.scalar_type()))) {
    // Quantized caches: both of one quantized dtype, each with its scale.
    check_defined(op, key_name, key);
    check_defined(op, value_name, value);
    TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), op, ": ", value_name, " has dtype ",
                     value.scalar_type(), " but ", key_name, " has dtype ", key.scalar_type(),
                     "; quantized caches must share one dtype");
    check_quantized_cache(p, key_name, key, names.key, "k_cache_scale", p.k_cache_scale);
    check_quantized_cache(p, value_name, value, names.value, "v_cache_scale", p.v_cache_scale);
  } else {
    check_input(op, key_name, key, axes.rank, names.key);
    check_input(op, value_name, value, axes.rank, names.value);
    check_same_dtype_and_device(op, key_name, key, "query", query);
    check_same_dtype_and_device(op, value_name, value, "query", query);
    for (const auto& [scale_name, scale] : {std::pair{"k_cache_scale", &p.k_cache_scale},
                                            std::pair{"v_cache_scale", &p.v_cache_scale}}) {
      TORCH_CHECK(!given(*scale), op, ": ", scale_name, " is given but the caches have dtype ",
                  key.scalar_type(),
                  "; scales belong to quantized caches (int8, float8_e4m3fn, float8_e5m2) only");
    }
  }
  if (p.layout != AttentionLayout::kPacked) {
    check_size(op, key_name, key, 0, query.sym_size(0), "batch entries", "query");
  }
  check_grouped_heads(p);
  check_size(op, key_name, key, axes.features, query.sym_size(axes.features), "features per head",
             "query");
  if (p.layout != AttentionLayout::kPacked) {
    check_size(op, value_name, value, 0, query.sym_size(0), "batch entries", "query");
  }
  check_size(op, value_name, value, axes.heads, key.sym_size(axes.heads), "heads", key_name);
  check_size(op, value_name, value, axes.rows, key.sym_size(axes.rows),
             p.layout == AttentionLayout::kPacked ? "rows (total_k)" : "positions", key_name);

  check_dropout_p(op, p.dropout_p);
  TORCH_CHECK(!p.scale.has_value() || std::isfinite(*p.scale), op,
              ": scale must be a finite number, but is ", p.scale.value_or(0.0));
  if (p.scale.has_value()) {
    check_representable(op, "scale", *p.scale, at::toOpMathType(query.scalar_type()),
                        query.scalar_type());
  }
  // rng_state is optional in the schemas: with dropout it must be given when required (the
  // kernel ops; the composites check before they draw it), and when given it is checked.
  TORCH_CHECK(given(p.rng_state) || !p.rng_state_required || !p.has_dropout(), op,
              ": rng_state (the dropout stream's seed and offset, (2,) int64) must be given "
              "when dropout_p > 0, but is None (dropout_p = ",
              p.dropout_p, ")");
  if (given(p.rng_state)) check_rng_state_device(op, *p.rng_state, query);

  if (p.layout == AttentionLayout::kPacked) check_packed_offsets(p);
  if (p.layout == AttentionLayout::kCache) check_cache_entries(p);
  check_variants(p);
  check_problem_sizes(p);

  if (given(p.key_padding_mask)) {
    const at::Tensor& padding = *p.key_padding_mask;
    check_mask_dtype_and_device(op, "key_padding_mask", padding, query);
    TORCH_CHECK(padding.dim() == 2 && padding.sym_size(0) == query.sym_size(0) &&
                    padding.sym_size(1) == key.sym_size(2),
                op, ": key_padding_mask must have shape (B, S) = (", query.sym_size(0), ", ",
                key.sym_size(2), "), but has shape ", padding.sym_sizes());
    check_tensor_elements(op, "key_padding_mask", padding);
  }
  if (given(p.attn_mask)) {
    check_attn_mask(op, *p.attn_mask, query, key.sym_size(axes.rows),
                    p.layout == AttentionLayout::kCache ? "S_max" : "S");
  }
}

void check_attention_backward(const AttentionBackwardCall& t) {
  const AttentionProblem& p = t.problem;
  check_attention_problem(p);
  const char* op = p.op;
  const Axes axes = axes_of(p.layout);
  const bool packed = p.layout == AttentionLayout::kPacked;
  const char* output_layout = packed ? "(total_q, H, Dv)" : "(B, H, L, Dv)";
  check_input(op, "output", t.output, axes.rank, output_layout);
  check_same_dtype_and_device(op, "output", t.output, "query", p.query);
  if (packed) {
    check_size(op, "output", t.output, 0, p.query.sym_size(0), "rows (total_q)", "query");
    check_size(op, "output", t.output, 1, p.query.sym_size(1), "heads", "query");
  } else {
    check_size(op, "output", t.output, 0, p.query.sym_size(0), "batch entries", "query");
    check_size(op, "output", t.output, 1, p.query.sym_size(1), "heads", "query");
    check_size(op, "output", t.output, 2, p.query.sym_size(2), "positions", "query");
  }
  check_size(op, "output", t.output, axes.features, p.value.sym_size(axes.features),
             "features per head", "value");
  check_input(op, "grad_output", t.grad_output, axes.rank, output_layout);
  check_same_dtype_and_device(op, "grad_output", t.grad_output, "query", p.query);
  TORCH_CHECK(t.grad_output.sym_sizes() == t.output.sym_sizes(), op, ": grad_output has shape ",
              t.grad_output.sym_sizes(), " but the output has shape ", t.output.sym_sizes());
  if (packed) {
    check_logsumexp(op, t.logsumexp, p.query, 2, "(total_q, H)");
  } else {
    check_logsumexp(op, t.logsumexp, p.query, 3, "(B, H, L)");
  }
  check_tensor_elements(op, "output", t.output);
  check_tensor_elements(op, "grad_output", t.grad_output);
  if (given(t.grad_weights)) {
    const at::Tensor& grad_weights = *t.grad_weights;
    check_input(op, "grad_weights", grad_weights, 4, "(B, H, L, S)");
    check_same_dtype_and_device(op, "grad_weights", grad_weights, "query", p.query);
    check_size(op, "grad_weights", grad_weights, 0, p.query.sym_size(0), "batch entries", "query");
    check_size(op, "grad_weights", grad_weights, 1, p.query.sym_size(1), "heads", "query");
    check_size(op, "grad_weights", grad_weights, 2, p.query.sym_size(2), "positions", "query");
    check_size(op, "grad_weights", grad_weights, 3, p.key.sym_size(2), "positions", "key");
    check_tensor_elements(op, "grad_weights", grad_weights);
  }
}

std::vector<c10::SymInt> output_shape(const AttentionProblem& p) {
  const Axes axes = axes_of(p.layout);
  const c10::SymInt& Dv = p.value.sym_size(axes.features);
  if (p.layout == AttentionLayout::kPacked) return {p.query.sym_size(0), p.query.sym_size(1), Dv};
  return {p.query.sym_size(0), p.query.sym_size(1), p.query.sym_size(2), Dv};
}

std::vector<c10::SymInt> logsumexp_shape(const AttentionProblem& p) {
  if (p.layout == AttentionLayout::kPacked) return {p.query.sym_size(0), p.query.sym_size(1)};
  return {p.query.sym_size(0), p.query.sym_size(1), p.query.sym_size(2)};
}

double attention_scale(std::optional<double> scale, int64_t head_dim) {
  if (scale.has_value()) return *scale;
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

namespace {

// A 1-D int32/int64 tensor's values as int64, read on the CPU.
std::vector<int64_t> read_integers(const at::Tensor& t) {
  const at::Tensor values = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = values.const_data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + values.numel());
}

// Offsets `name` (B + 1 entries) of `total` packed rows, each sequence at most `max_len` long.
void check_offsets(const char* op, const char* name, const std::vector<int64_t>& offsets,
                   int64_t total, const char* max_name, int64_t max_len, const char* rows) {
  TORCH_CHECK(offsets[0] == 0, op, ": ", name, " must start at 0, but ", name,
              "[0] = ", offsets[0]);
  for (size_t b = 1; b < offsets.size(); ++b) {
    TORCH_CHECK(offsets[b] >= offsets[b - 1], op, ": ", name, " must be non-decreasing, but ", name,
                "[", b, "] = ", offsets[b], " < ", name, "[", b - 1, "] = ", offsets[b - 1]);
    TORCH_CHECK(offsets[b] - offsets[b - 1] <= max_len, op, ": sequence ", b - 1, " has ",
                offsets[b] - offsets[b - 1], " ", rows, " (", name, "[", b, "] - ", name, "[",
                b - 1, "]), more than ", max_name, " = ", max_len);
  }
  TORCH_CHECK(offsets.back() == total, op, ": ", name, " must end at the number of packed ", rows,
              " (", total, "), but ", name, "[", offsets.size() - 1, "] = ", offsets.back());
}

std::vector<SequenceSpan> packed_sequences(const AttentionProblem& p) {
  const std::vector<int64_t> q = read_integers(p.cu_seqlens_q);
  const std::vector<int64_t> k = read_integers(p.cu_seqlens_k);
  check_offsets(p.op, "cu_seqlens_q", q, p.query.size(0), "max_seqlen_q",
                p.max_seqlen_q.guard_int(__FILE__, __LINE__), "query rows");
  check_offsets(p.op, "cu_seqlens_k", k, p.key.size(0), "max_seqlen_k",
                p.max_seqlen_k.guard_int(__FILE__, __LINE__), "key rows");
  std::vector<SequenceSpan> spans(q.size() - 1);
  for (size_t b = 0; b < spans.size(); ++b) {
    SequenceSpan& s = spans[b];
    s.index = int64_t(b);
    s.q_begin = q[b];
    s.q_len = q[b + 1] - q[b];
    s.k_begin = k[b];
    s.k_len = k[b + 1] - k[b];
    // What the kernels count for this sequence: its scores and dropout stream positions.
    check_count_fits(p.op, "a sequence's attention scores (H, L_b, S_b)",
                     {p.query.sym_size(1), s.q_len, s.k_len});
  }
  return spans;
}

std::vector<SequenceSpan> cache_sequences(const AttentionProblem& p) {
  const int64_t batch = p.query.size(0), s_max = p.key.size(2), L = p.query.size(2);
  const int64_t new_len = given(p.new_key) ? p.new_key->size(2) : 0;
  const std::vector<int64_t> lengths = given(p.cache_seqlens)
                                           ? read_integers(*p.cache_seqlens)
                                           : std::vector<int64_t>(size_t(batch), s_max);
  std::vector<SequenceSpan> spans(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = lengths[size_t(b)];
    TORCH_CHECK(n >= 0, p.op, ": cache_seqlens[", b, "] = ", n,
                " is negative; a sequence's valid length must be in [0, S_max = ", s_max, "]");
    // new_len <= s_max was checked with the shapes, so s_max - new_len cannot wrap.
    TORCH_CHECK(n <= s_max - new_len, p.op, ": sequence ", b,
                " would overflow its cache: cache_seqlens[", b, "] = ", n,
                " valid entries plus the ", new_len,
                " new positions of key exceed the caches' S_max = ", s_max, " (at most ",
                s_max - new_len, " entries may be valid before this call)");
    SequenceSpan& s = spans[size_t(b)];
    s.index = b;
    s.q_len = L;
    s.k_len = n + new_len;
    s.causal_offset = s.k_len - L;  // bottom-right: the last query sees the last key
    s.write_at = n;
    s.write_len = new_len;
  }
  return spans;
}

}  // namespace

std::vector<SequenceSpan> attention_sequences(const AttentionProblem& p) {
  switch (p.layout) {
    case AttentionLayout::kPacked:
      return packed_sequences(p);
    case AttentionLayout::kCache:
      return cache_sequences(p);
    case AttentionLayout::kDense:
      break;
  }
  TORCH_CHECK(false, p.op, ": a dense problem is one call, not a list of sequences");
}

at::Tensor sequence_rng_state(const at::Tensor& rng_state, int64_t b) {
  const at::Tensor state = rng_state.to(at::kCPU).contiguous();
  const int64_t* data = state.const_data_ptr<int64_t>();
  const uint64_t offset = static_cast<uint64_t>(data[1]) + static_cast<uint64_t>(b);
  return at::tensor({data[0], static_cast<int64_t>(offset)}, at::TensorOptions().dtype(at::kLong));
}

}  // namespace qkv_attention

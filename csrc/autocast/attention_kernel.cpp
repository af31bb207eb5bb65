// AutocastCPU kernels of attention and attention_with_weights: inside
// torch.autocast("cpu", dtype=...) they compute in the lower precision, as torch's
// scaled_dot_product_attention does, and return it. query, key, value and a float attn_mask or
// key_padding_mask are cast (cast.h: float64 and bool stay as they are).
//
// _attention_forward gets the same kernel: torch.compile and torch.export may decompose the
// two composites into it before autocast is applied, and its outputs must not depend on that.
#include <torch/library.h>

#include "autocast/cast.h"
#include "ops/attention.h"

namespace qkv_attention::autocast {
namespace {

at::Tensor attention_autocast(const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                              double dropout_p, bool is_causal, std::optional<double> scale,
                              const std::optional<at::Tensor>& key_padding_mask) {
  BelowAutocast below;
  return attention(cast(query), cast(key), cast(value), cast(attn_mask), dropout_p, is_causal,
                   scale, cast(key_padding_mask));
}

std::tuple<at::Tensor, at::Tensor> attention_with_weights_autocast(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    std::optional<double> scale, const std::optional<at::Tensor>& key_padding_mask,
    bool average_attn_weights) {
  BelowAutocast below;
  return attention_with_weights(cast(query), cast(key), cast(value), cast(attn_mask), dropout_p,
                                is_causal, scale, cast(key_padding_mask), average_attn_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_autocast(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
    double dropout_p, bool is_causal, std::optional<double> scale, bool need_weights,
    const std::optional<at::Tensor>& rng_state, bool average_attn_weights) {
  BelowAutocast below;
  // rng_state (int64) is not a floating tensor: passed as it is.
  return _attention_forward(cast(query), cast(key), cast(value), cast(attn_mask),
                            cast(key_padding_mask), dropout_p, is_causal, scale, need_weights,
                            rng_state, average_attn_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, AutocastCPU, m) {
  m.impl("attention", TORCH_FN(attention_autocast));
  m.impl("attention_with_weights", TORCH_FN(attention_with_weights_autocast));
  m.impl("_attention_forward", TORCH_FN(attention_forward_autocast));
}

}  // namespace qkv_attention::autocast

// AutocastCPU kernel of qkv_projection: three linear layers, so torch's autocast policy for
// linear (lower precision). Inputs, weights and biases are cast (cast.h); the projected heads
// come out in the autocast dtype, as torch's F.linear under torch.autocast("cpu").
#include <torch/library.h>

#include "autocast/cast.h"
#include "ops/qkv_projection.h"

#include <utility>

namespace qkv_attention::autocast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection_autocast(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& q_bias, const std::optional<at::Tensor>& k_bias,
    const std::optional<at::Tensor>& v_bias, c10::SymInt num_heads) {
  BelowAutocast below;
  return qkv_projection(cast(query), cast(key), cast(value), cast(q_weight), cast(k_weight),
                        cast(v_weight), cast(q_bias), cast(k_bias), cast(v_bias),
                        std::move(num_heads));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, AutocastCPU, m) {
  m.impl("qkv_projection", TORCH_FN(qkv_projection_autocast));
}

}  // namespace qkv_attention::autocast

// AutocastCPU kernel of merge_heads: the output projection is a linear layer, so torch's
// autocast policy for linear (lower precision): heads, weight and bias are cast (cast.h) and
// the output is in the autocast dtype, as torch's out_proj under torch.autocast("cpu").
#include <torch/library.h>

#include "autocast/cast.h"
#include "ops/merge_heads.h"

namespace qkv_attention::autocast {
namespace {

at::Tensor merge_heads_autocast(const at::Tensor& x, const at::Tensor& out_weight,
                                const std::optional<at::Tensor>& out_bias) {
  BelowAutocast below;
  return merge_heads(cast(x), cast(out_weight), cast(out_bias));
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, AutocastCPU, m) {
  m.impl("merge_heads", TORCH_FN(merge_heads_autocast));
}

}  // namespace qkv_attention::autocast

// The one list of the operators that have kernels of their own, each with the name its error
// messages give it ("attention backward" for _attention_backward).
//
// ops/unsupported_layouts.cpp registers its sparse/quantized/mkldnn/nested guard for every entry,
// and the input checks of ops/*.cpp take their labels from here (op_label). An operator defined
// with a composite kernel only (attention and attention_with_weights: CompositeImplicitAutograd,
// they reach the kernels through _attention_forward; attention_varlen through
// _attention_varlen_forward) needs no entry. A new operator with kernels adds one line;
// tests/python/robustness/test_unsupported_layouts.py fails for a registered operator of the
// namespace that is neither here nor composite.
#pragma once

#include <stdexcept>
#include <string_view>

namespace qkv_attention {

struct OperatorLabel {
  const char* name;   // the schema's name without the namespace
  const char* label;  // the operator as its messages name it
};

inline constexpr OperatorLabel kOperators[] = {
    {"qkv_projection", "qkv_projection"},
    {"qkv_projection_backward", "qkv_projection backward"},
    {"_attention_forward", "attention"},
    {"_attention_backward", "attention backward"},
    {"_attention_dropout_mask", "attention dropout mask"},
    {"merge_heads", "merge_heads"},
    {"merge_heads_backward", "merge_heads backward"},
    {"_attention_varlen_forward", "attention_varlen"},
    {"_attention_varlen_backward", "attention_varlen backward"},
    {"attention_with_kv_cache", "attention_with_kv_cache"},
};

// The label of operator `name`. Used in a constant expression (`constexpr const char* op =
// op_label("...")`), a name missing from kOperators does not compile.
constexpr const char* op_label(std::string_view name) {
  for (const OperatorLabel& op : kOperators) {
    if (name == op.name) return op.label;
  }
  throw std::invalid_argument("qkv_attention: operator missing from kOperators (ops/operators.h)");
}

}  // namespace qkv_attention

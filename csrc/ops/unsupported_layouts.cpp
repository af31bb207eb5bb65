// Kernels for the dispatch keys of tensors the operators do not support (sparse, sparse
// compressed, quantized, mkldnn, nested): they name the offending argument.
//
// Such a tensor sends the call to its own dispatch key (SparseCPU, ...), where the operators have
// no kernel, so without these the caller would see the dispatcher's "Could not run
// 'qkv_attention::...' with arguments from the 'SparseCPU' backend", which names no argument.
// The CPU and Meta kernels also reject these layouts (check_dense), for the calls that reach them
// through the Autograd kernels' differentiable paths.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <string_view>

#include "ops/checks.h"

namespace qkv_attention {
namespace {

// The operator as the messages of its input checks name it.
std::string op_label(const c10::OperatorHandle& op) {
  std::string_view name = op.schema().name();  // "qkv_attention::_attention_forward"
  name.remove_prefix(name.find("::") + 2);
  if (name == "_attention_forward") return "attention";
  if (name == "_attention_backward") return "attention backward";
  if (name == "_attention_dropout_mask") return "attention dropout mask";
  if (name == "_attention_varlen_forward") return "attention_varlen";
  if (name == "_attention_varlen_backward") return "attention_varlen backward";
  if (name == "qkv_projection_backward") return "qkv_projection backward";
  if (name == "merge_heads_backward") return "merge_heads backward";
  return std::string(name);
}

// A boxed kernel for every operator: finds the first tensor argument that is not dense and
// raises NotImplementedError naming it.
void reject_unsupported_layout(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                               torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const std::string label = op_label(op);
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = *(first + static_cast<std::ptrdiff_t>(i));
    if (value.isTensor()) check_dense(label.c_str(), arguments[i].name().c_str(), value.toTensor());
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, label, ": no kernel for the tensors given (dispatch keys ",
                              keys, "); every tensor argument must be a dense tensor");
}

constexpr const char* kOperators[] = {
    "_attention_forward", "_attention_backward",     "_attention_dropout_mask",
    "qkv_projection",     "qkv_projection_backward", "merge_heads",
    "merge_heads_backward", "attention_with_kv_cache", "_attention_varlen_forward",
    "_attention_varlen_backward"};

void register_rejections(torch::Library& m) {
  for (const char* name : kOperators) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&reject_unsupported_layout>());
  }
}

}  // namespace

// attention and attention_with_weights are compositions of _attention_forward, attention_varlen
// of _attention_varlen_forward: they reach the kernels below through them.
TORCH_LIBRARY_IMPL(qkv_attention, SparseCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, SparseMeta, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, SparseCsrCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, SparseCsrMeta, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, QuantizedCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, MkldnnCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, NestedTensorCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, NestedTensorMeta, m) { register_rejections(m); }

}  // namespace qkv_attention

// Kernels for the dispatch keys of tensors the operators do not support (sparse, sparse
// compressed, quantized, mkldnn, nested): they name the offending argument.
//
// Such a tensor sends the call to its own dispatch key (SparseCPU, ...), where the operators have
// no kernel, so without these the caller would see the dispatcher's "Could not run
// 'qkv_attention::...' with arguments from the 'SparseCPU' backend", which names no argument.
// The operators are those of ops/operators.h (the one list); attention and
// attention_with_weights are compositions of _attention_forward and reach these through it.
// The CPU and Meta kernels also reject these layouts (check_dense), for the calls that reach them
// through the Autograd kernels' differentiable paths.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string_view>

#include "ops/checks.h"
#include "ops/operators.h"

namespace qkv_attention {
namespace {

// The operator as the messages of its input checks name it.
const char* label_of(const c10::OperatorHandle& op) {
  std::string_view name = op.schema().name();  // "qkv_attention::_attention_forward"
  name.remove_prefix(name.find("::") + 2);
  return op_label(name);
}

// A boxed kernel for every operator: finds the first tensor argument that is not dense and
// raises NotImplementedError naming it.
void reject_unsupported_layout(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                               torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const char* label = label_of(op);
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = *(first + static_cast<std::ptrdiff_t>(i));
    if (value.isTensor()) check_dense(label, arguments[i].name().c_str(), value.toTensor());
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, label, ": no kernel for the tensors given (dispatch keys ",
                              keys, "); every tensor argument must be a dense tensor");
}

void register_rejections(torch::Library& m) {
  for (const OperatorLabel& op : kOperators) {
    m.impl(op.name, torch::CppFunction::makeFromBoxedFunction<&reject_unsupported_layout>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(qkv_attention, SparseCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, SparseMeta, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, SparseCsrCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, SparseCsrMeta, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, QuantizedCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, MkldnnCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, NestedTensorCPU, m) { register_rejections(m); }
TORCH_LIBRARY_IMPL(qkv_attention, NestedTensorMeta, m) { register_rejections(m); }

}  // namespace qkv_attention

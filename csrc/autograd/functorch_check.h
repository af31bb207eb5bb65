// torch.func's differentiating transforms and our C++ autograd.
//
// torch.func.grad, vjp, jacrev, jacfwd, hessian (and functional_call under them) run autograd
// at levels of their own, and need each op's derivative formula in a form they can replay per
// level: a torch.autograd.Function with setup_context (Python), or a derivatives.yaml entry.
// A C++ torch::autograd::Function offers neither, and PyTorch refuses it there ("cannot use C++
// torch::autograd::Function with functorch transforms"). Our forward ops keep their autograd in
// C++, so under those transforms they raise this error instead, which names the limitation and
// what works: torch.autograd.grad / backward() for gradients (torch.func.vmap is supported, and
// composes with them). The backward ops need no such check: with inputs that require grad they
// compute with differentiable ATen ops, which the transforms handle.
#pragma once

#include <ATen/FuncTorchTLS.h>
#include <c10/util/Exception.h>

namespace qkv_attention::autograd {

// Under vmap alone the Autograd kernels run after functorch has left its layer (the batching
// rules call the ops on plain tensors), so PyTorch's own check passes; it fails exactly when a
// differentiating transform is active at this point. Its message is replaced by ours.
inline void check_no_functorch_autodiff(const char* op) {
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (!functorch_tls) return;
  try {
    functorch_tls->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false, op,
        ": torch.func's differentiating transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, "
        "functional_call under them) are not supported: the autograd of qkv_attention's ops is "
        "a C++ torch::autograd::Function, which these transforms cannot run. Take gradients "
        "with torch.autograd.grad or .backward() instead (torch.func.vmap is supported and "
        "composes with them).");
  }
}

}  // namespace qkv_attention::autograd

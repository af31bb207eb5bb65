// qkv_attention._C: loading it registers the operators (torch.ops.qkv_attention.*); it also
// says what it was built with, and draws the dropout stream's state for Python callers of the
// kernel ops (the one draw of ops/attention.h).
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/extension.h>
#include <torch/headeronly/version.h>

#include "cpu/flash/levels.h"
#include "ops/attention.h"

#ifndef QKV_ATTENTION_VERSION
#define QKV_ATTENTION_VERSION "unknown"
#endif

#define QKV_STRINGIFY_(x) #x
#define QKV_STRINGIFY(x) QKV_STRINGIFY_(x)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = QKV_ATTENTION_VERSION;
  info["torch_version"] = QKV_STRINGIFY(TORCH_VERSION_MAJOR) "." QKV_STRINGIFY(
      TORCH_VERSION_MINOR) "." QKV_STRINGIFY(TORCH_VERSION_PATCH);
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  info["cpu_capability"] = at::get_cpu_capability();  // what ATen's own kernels dispatch to
  // The CPU level the attention kernels run at: torch's capability, as far as this build and
  // this CPU have it ("avx512", "avx2" or "default").
  info["kernel_isa"] =
      qkv_attention::cpu::flash::level_name(qkv_attention::cpu::flash::current_level());
  info["num_threads"] = at::get_num_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qkv_attention's C++ operators; use them through torch.ops.qkv_attention";
  m.attr("__version__") = QKV_ATTENTION_VERSION;
  m.def("build_info", &build_info,
        "What this extension was built with: its version, the torch version it was compiled "
        "against, the compiler, OpenMP on/off, the C++ ABI and the CPU capability.");
  m.def("_draw_dropout_rng_state", &qkv_attention::draw_dropout_rng_state,
        pybind11::arg("dropout_p"), pybind11::arg("samples") = pybind11::none(),
        "The dropout stream's state as the composite ops draw it: (2,) int64, or (samples, 2); "
        "None when dropout_p is 0.");
}

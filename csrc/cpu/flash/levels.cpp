// Run-time choice of the kernels' CPU level (cpu/flash/levels.h), the entry points of
// cpu/attention_kernel.h, and the dropout-mask kernel. Compiled for the baseline ISA: this file
// runs on every CPU before anything level-specific does.
#include "cpu/flash/levels.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <string>

#include "cpu/philox.h"

namespace qkv_attention::cpu::flash {
namespace {

#if defined(__x86_64__)
bool cpu_has_avx2() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  }();
  return supported;
}

bool cpu_has_avx512() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
  }();
  return supported;
}
#endif

CpuLevel level_from_torch() {
  // Torch decides once per process (ATEN_CPU_CAPABILITY, capped by what the CPU has) and spells
  // it in capitals ("AVX512").
  std::string torch_level = at::get_cpu_capability();
  std::transform(torch_level.begin(), torch_level.end(), torch_level.begin(),
                 [](unsigned char c) { return char(std::tolower(c)); });
  if (torch_level == "avx512" && level_available(CpuLevel::kAvx512)) return CpuLevel::kAvx512;
  if ((torch_level == "avx512" || torch_level == "avx2") && level_available(CpuLevel::kAvx2)) {
    return CpuLevel::kAvx2;
  }
  return CpuLevel::kDefault;
}

}  // namespace

#if defined(__x86_64__)
bool cpu_has_avx512_bf16() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  }();
  return supported;
}

bool amx_bf16_usable() {
  // The CPU part is decided once inside ATen; the oneDNN switch is read on each call.
  return cpu_has_avx512_bf16() && at::native::cpublas::could_pack(at::kBFloat16);
}
#endif

bool level_available(CpuLevel level) {
  switch (level) {
    case CpuLevel::kDefault:
      return true;
#if defined(__x86_64__)
    case CpuLevel::kAvx2:
      return cpu_has_avx2();
    case CpuLevel::kAvx512:
      return cpu_has_avx512();
#else
    default:
      return false;
#endif
  }
  return false;
}

CpuLevel current_level() {
  static const CpuLevel level = level_from_torch();
  return level;
}

const char* level_name(CpuLevel level) {
  switch (level) {
    case CpuLevel::kAvx512:
      return "avx512";
    case CpuLevel::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

template <typename T>
void attention_forward_at(CpuLevel level, const AttentionForwardParams<T>& params) {
  TORCH_CHECK(level_available(level), "attention: the ", level_name(level),
              " kernels cannot run on this CPU");
  switch (level) {
#if defined(__x86_64__)
    case CpuLevel::kAvx512:
      return AVX512::attention_forward(params);
    case CpuLevel::kAvx2:
      return AVX2::attention_forward(params);
#endif
    default:
      return DEFAULT::attention_forward(params);
  }
}

template <typename T>
void attention_backward_at(CpuLevel level, const AttentionBackwardParams<T>& params) {
  TORCH_CHECK(level_available(level), "attention: the ", level_name(level),
              " kernels cannot run on this CPU");
  TORCH_CHECK(!params.quantized_key.quantized() && !params.quantized_value.quantized(),
              "attention: the backward takes no quantized key or value (only a KV cache's "
              "forward reads them)");
  switch (level) {
#if defined(__x86_64__)
    case CpuLevel::kAvx512:
      return AVX512::attention_backward(params);
    case CpuLevel::kAvx2:
      return AVX2::attention_backward(params);
#endif
    default:
      return DEFAULT::attention_backward(params);
  }
}

#define QKV_INSTANTIATE(T)                                                           \
  template void attention_forward_at<T>(CpuLevel, const AttentionForwardParams<T>&); \
  template void attention_backward_at<T>(CpuLevel, const AttentionBackwardParams<T>&);
QKV_INSTANTIATE(double)
QKV_INSTANTIATE(float)
QKV_INSTANTIATE(c10::BFloat16)
QKV_INSTANTIATE(c10::Half)
#undef QKV_INSTANTIATE

}  // namespace qkv_attention::cpu::flash

namespace qkv_attention::cpu {

template <typename T>
void attention_forward_kernel(const AttentionForwardParams<T>& params) {
  flash::attention_forward_at(flash::current_level(), params);
}

template <typename T>
void attention_backward_kernel(const AttentionBackwardParams<T>& params) {
  flash::attention_backward_at(flash::current_level(), params);
}

void attention_dropout_mask_kernel(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                   uint64_t seed, uint64_t offset, double dropout_p, bool* keep) {
  const DropoutStream stream(seed, offset, dropout_p);
  const int64_t rows = batch * heads * q_len;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(kv_len, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      stream.fill_keep(uint64_t(row) * uint64_t(kv_len), kv_len, keep + row * kv_len);
    }
  });
}

#define QKV_INSTANTIATE(T)                                                     \
  template void attention_forward_kernel<T>(const AttentionForwardParams<T>&); \
  template void attention_backward_kernel<T>(const AttentionBackwardParams<T>&);
QKV_INSTANTIATE(double)
QKV_INSTANTIATE(float)
QKV_INSTANTIATE(c10::BFloat16)
QKV_INSTANTIATE(c10::Half)
#undef QKV_INSTANTIATE

}  // namespace qkv_attention::cpu

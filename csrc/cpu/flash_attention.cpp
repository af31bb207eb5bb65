// The attention kernels of cpu/attention_kernel.h: the blocked algorithm of
// cpu/flash_attention.h, with the AVX-512 building blocks when the CPU has them (bfloat16 GEMMs
// with vdpbf16ps where it exists) and the portable ones otherwise, and always for float64,
// whose gradcheck wants double accumulation.
#include <ATen/Parallel.h>

#include "cpu/attention_kernel.h"
#include "cpu/flash_attention.h"
#include "cpu/flash_ops.h"

namespace qkv_attention::cpu {

template <typename T>
void attention_forward_kernel(const AttentionForwardParams<T>& params) {
  if constexpr (std::is_same_v<T, double>) {
    flash::flash_forward<T, flash::PortableOps<double>>(params);
  } else {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (flash::cpu_has_avx512_bf16()) {
        flash::flash_forward<T, flash::Avx512Bf16Ops>(params);
        return;
      }
    }
    if (flash::cpu_has_avx512()) {
      flash::flash_forward<T, flash::Avx512Ops>(params);
    } else {
      flash::flash_forward<T, flash::PortableOps<float>>(params);
    }
  }
}

template <typename T>
void attention_backward_kernel(const AttentionBackwardParams<T>& params) {
  if constexpr (std::is_same_v<T, double>) {
    flash::flash_backward<T, flash::PortableOps<double>>(params);
  } else {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (flash::cpu_has_avx512_bf16()) {
        flash::flash_backward<T, flash::Avx512Bf16Ops>(params);
        return;
      }
    }
    if (flash::cpu_has_avx512()) {
      flash::flash_backward<T, flash::Avx512Ops>(params);
    } else {
      flash::flash_backward<T, flash::PortableOps<float>>(params);
    }
  }
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

#define QKV_INSTANTIATE(T)                                                      \
  template void attention_forward_kernel<T>(const AttentionForwardParams<T>&); \
  template void attention_backward_kernel<T>(const AttentionBackwardParams<T>&);
QKV_INSTANTIATE(double)
QKV_INSTANTIATE(float)
QKV_INSTANTIATE(c10::BFloat16)
QKV_INSTANTIATE(c10::Half)
#undef QKV_INSTANTIATE

}  // namespace qkv_attention::cpu

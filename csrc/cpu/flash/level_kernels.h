// The body of one CPU level's kernels (level_default.cpp, level_avx2.cpp, level_avx512.cpp):
// the forward and backward templates instantiated with that level's building blocks, as the
// entry points cpu/flash/levels.h declares. Included once per level source, which the build
// compiles with the level's instruction flags and CPU_CAPABILITY macros.
#pragma once

#include <type_traits>

#include "cpu/attention_kernel.h"
#include "cpu/flash/backward.h"
#include "cpu/flash/forward.h"
#include "cpu/flash/level_namespace.h"
#include "cpu/flash/vec_ops.h"
#if defined(CPU_CAPABILITY_AVX512)
#include "cpu/flash/avx512_ops.h"
#include "cpu/flash/levels.h"
#endif

QKV_FLASH_LEVEL_BEGIN

#if defined(CPU_CAPABILITY_AVX512)
// Float accumulation on AVX-512: at::vec element-wise code, the hand-written GEMMs and
// vectorised dropout bits (the backward; measured faster there than BLAS calls on its small
// blocks).
struct FloatOps : VecElementwise<float>, Avx512Ops {
  using Avx512Ops::keep_bits;
};
// bfloat16 where the CPU has the bf16 dot product.
struct Bf16DotOps : VecElementwise<float>, Avx512Bf16Ops {
  using Avx512Bf16Ops::keep_bits;
};
// bfloat16 where the CPU has AMX: the same operands, the GEMMs on AMX tiles.
struct Bf16AmxOps : VecElementwise<float>, Avx512AmxOps {
  using Avx512AmxOps::keep_bits;
};
#elif defined(CPU_CAPABILITY_AVX2)
using FloatOps = VecTiledOps<float>;
#else
using FloatOps = VecOps<float>;
#endif
#if defined(CPU_CAPABILITY_AVX2)
// The AVX2 forward through BLAS, in its 128 x 512 blocks: there MKL's AVX2 GEMM (what torch's
// kernel calls) beat the micro-kernels on 48 x 256 blocks (B2 H8 L1024 D64, one thread: the
// GEMMs took 9875 perf samples against torch's 6770). The backward's 48 x 128 blocks stay with
// the micro-kernels, which beat BLAS calls on blocks that small.
using ForwardFloatOps = VecOps<float>;
#elif defined(CPU_CAPABILITY_AVX512)
// The same on AVX-512: MKL's AVX-512 GEMM on 128 x 512 blocks beat the micro-kernels on 48 x 256
// in the forward (B2 H8 L1024 D64, same process as torch: torch/ours 0.85 -> 0.90 on one thread,
// 0.72 -> 0.84 on two), not in the backward (1.06 with the micro-kernels, 1.00 through BLAS).
struct ForwardFloatOps : VecElementwise<float>, BlasGemm<float> {
  static void keep_bits(const DropoutKey& key, uint64_t first, int64_t count, uint64_t* keep) {
    Avx512Ops::keep_bits(key, first, count, keep);
  }
};
#else
using ForwardFloatOps = FloatOps;
#endif

template <typename T>
void attention_forward(const AttentionForwardParams<T>& params) {
  if constexpr (std::is_same_v<T, double>) {
    flash_forward<T, VecOps<double>>(params);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (amx_bf16_usable()) return flash_forward<T, Bf16AmxOps>(params);
      if (cpu_has_avx512_bf16()) return flash_forward<T, Bf16DotOps>(params);
    }
#endif
    flash_forward<T, ForwardFloatOps>(params);
  }
}

template <typename T>
void attention_backward(const AttentionBackwardParams<T>& params) {
  if constexpr (std::is_same_v<T, double>) {
    flash_backward<T, VecOps<double>>(params);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (amx_bf16_usable()) return flash_backward<T, Bf16AmxOps>(params);
      if (cpu_has_avx512_bf16()) return flash_backward<T, Bf16DotOps>(params);
    }
#endif
    flash_backward<T, FloatOps>(params);
  }
}

#define QKV_INSTANTIATE(T)                                              \
  template void attention_forward<T>(const AttentionForwardParams<T>&); \
  template void attention_backward<T>(const AttentionBackwardParams<T>&);
QKV_INSTANTIATE(double)
QKV_INSTANTIATE(float)
QKV_INSTANTIATE(c10::BFloat16)
QKV_INSTANTIATE(c10::Half)
#undef QKV_INSTANTIATE

QKV_FLASH_LEVEL_END

// The CPU levels the attention kernels are built for, and which one runs. The level follows
// torch's own CPU capability (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY forces), so
// forcing torch to a level forces our kernels to the same one:
//   avx512   AVX-512 (x86-64): at::vec 512-bit code; float GEMMs through BLAS (forward) and
//            hand-written micro-kernels (backward); bfloat16 GEMMs on AMX tiles (oneDNN's
//            brgemm) where the CPU has AMX, else with the vdpbf16ps dot product;
//   avx2     AVX2 + FMA (x86-64): at::vec 256-bit code, GEMMs as at::vec register tiles;
//   default  the baseline build: at::vec's generic code on x86-64, NEON on ARM; BLAS GEMMs.
// On ARM torch may report sve256; our kernels have no SVE build and run the NEON default.
#pragma once

#include <cstdint>

#include "cpu/attention_kernel.h"

namespace qkv_attention::cpu::flash {

enum class CpuLevel { kDefault, kAvx2, kAvx512 };

// The level the kernels use now.
CpuLevel current_level();
// Its name as ATEN_CPU_CAPABILITY spells it: "default", "avx2" or "avx512".
const char* level_name(CpuLevel level);
// Whether this build has the level and this CPU can run it.
bool level_available(CpuLevel level);

// The kernels of one level (a test calls each level it can run).
template <typename T>
void attention_forward_at(CpuLevel level, const AttentionForwardParams<T>& params);
template <typename T>
void attention_backward_at(CpuLevel level, const AttentionBackwardParams<T>& params);

// The per-level entry points, defined by level_<name>.cpp through level_kernels.h.
#define QKV_DECLARE_LEVEL_KERNELS(LEVEL)                             \
  namespace LEVEL {                                                  \
  template <typename T>                                              \
  void attention_forward(const AttentionForwardParams<T>& params);   \
  template <typename T>                                              \
  void attention_backward(const AttentionBackwardParams<T>& params); \
  }
QKV_DECLARE_LEVEL_KERNELS(DEFAULT)
#if defined(__x86_64__)
QKV_DECLARE_LEVEL_KERNELS(AVX2)
QKV_DECLARE_LEVEL_KERNELS(AVX512)
// AVX-512 with the bfloat16 dot product (vdpbf16ps), as the avx512 level's bfloat16 GEMMs use.
bool cpu_has_avx512_bf16();
// Whether the avx512 level's bfloat16 GEMMs run on AMX tiles through oneDNN's brgemm: the CPU
// has AMX and torch's oneDNN may use it (cpublas::could_pack; false while the user has turned
// oneDNN off with torch.backends.mkldnn). Asked per call, so that turning oneDNN off takes effect.
bool amx_bf16_usable();
#endif
#undef QKV_DECLARE_LEVEL_KERNELS

}  // namespace qkv_attention::cpu::flash

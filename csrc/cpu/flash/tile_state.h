// The AMX tile state of a thread: oneDNN's brgemm (Avx512AmxOps in avx512_ops.h) configures the
// tiles on a thread's first AMX call and keeps them for the next ones; the task pool
// (workspace.h) releases them when the thread has run its tasks, so that no thread leaves a
// kernel with its tiles configured (a configured tile state is saved and restored with every
// context switch).
#pragma once

#include <ATen/native/CPUBlas.h>

namespace qkv_attention::cpu::flash {

// Whether this thread ran an AMX GEMM since its tiles were last released.
inline thread_local bool amx_tiles_configured = false;

inline void release_amx_tiles() {
  if (!amx_tiles_configured) return;
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  amx_tiles_configured = false;
}

}  // namespace qkv_attention::cpu::flash

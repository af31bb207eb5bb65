// Hold the GEMM libraries to one thread on the calling thread for a scope.
//
// Why: a GEMM whose sums are split across threads gives other bits than the same GEMM on one
// thread, and the libraries choose their splits (and oneDNN its blocking) from the thread count
// they see where the call runs: outside a parallel region torch's count, inside one another. A
// result would then depend on torch.set_num_threads. Our GEMMs are cut into tasks fixed by the
// shape (cpu/tiled_gemm.h, the attention kernels' blocks); each task's GEMM runs on the thread
// that runs the task.
#pragma once

#include <omp.h>

extern "C" {
// MKL's thread-local thread count, by value (the C entry point behind mkl_service.h's
// mkl_set_num_threads_local; the lower-case symbol itself is the Fortran one, by pointer).
// torch's x86 builds link MKL. Weak: absent from other BLAS builds (OpenBLAS on ARM), where it
// stays null.
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

namespace qkv_attention::cpu {

// MKL (the float32/float64 BLAS calls): its thread-local count. Cheap enough for every block
// GEMM of the attention kernels.
class OneBlasThread {
 public:
  OneBlasThread() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: the global count
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_;
};

// Everything at::mm may run: MKL as above, and oneDNN (its bfloat16/float16 GEMMs), which reads
// this thread's OpenMP count. Setting that count costs more than MKL's (measured 8% of the avx2
// level's forward when done per block), so only the projection and merge tiles (several MFLOP
// each, cpu/tiled_gemm.cpp) take it.
class OneGemmThread {
 public:
  OneGemmThread() : previous_omp_(omp_get_max_threads()) {
    // Per thread: outside a parallel region this thread's own copy, inside one the task's.
    omp_set_num_threads(1);
  }
  ~OneGemmThread() { omp_set_num_threads(previous_omp_); }
  OneGemmThread(const OneGemmThread&) = delete;
  OneGemmThread& operator=(const OneGemmThread&) = delete;

 private:
  OneBlasThread blas_;
  int previous_omp_;
};

}  // namespace qkv_attention::cpu

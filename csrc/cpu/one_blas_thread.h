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
// torch's x86 builds link MKL. Weak: absent from other BLAS builds, where it stays null.
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
// NVPL BLAS (NVIDIA's, which torch's aarch64 wheels link): its thread-local thread count, set
// the same way (0: follow the global count). Weak likewise: null where NVPL is not loaded.
int nvpl_blas_set_num_threads_local(int threads) __attribute__((weak));
}

namespace qkv_attention::cpu {

// The BLAS calls (float32/float64): the library's thread-local count set to 1. Cheap enough for
// every block GEMM of the attention kernels. Outside a parallel region (a kernel's single task
// runs inline) the library would otherwise split a call over torch's thread count.
class OneBlasThread {
 public:
  OneBlasThread() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {
    if (nvpl_blas_set_num_threads_local) nvpl_blas_set_num_threads_local(1);
  }
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: the global count
    // Nothing here sets NVPL's local count otherwise: back to the global one.
    if (nvpl_blas_set_num_threads_local) nvpl_blas_set_num_threads_local(0);
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

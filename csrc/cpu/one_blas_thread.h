// Holds the GEMM libraries to one thread on the calling thread for a scope: MKL (float32,
// float64) through its thread-local count, oneDNN (the bfloat16/float16 GEMMs of at::mm) through
// this thread's OpenMP thread count, which it reads.
//
// Why: a GEMM whose sums are split across threads gives other bits than the same GEMM on one
// thread, and the libraries choose their splits (and oneDNN its blocking) from the thread count
// they see where the call runs: outside a parallel region torch's count, inside one another. A
// result would then depend on torch.set_num_threads. Our GEMMs are cut into tasks fixed by the
// shape (cpu/tiled_gemm.h, the attention kernels' blocks); each task's BLAS call runs on the thread
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

class OneBlasThread {
 public:
  OneBlasThread()
      : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0),
        previous_omp_(omp_get_max_threads()) {
    // Per thread: outside a parallel region this thread's own copy, inside one the task's.
    omp_set_num_threads(1);
  }
  ~OneBlasThread() {
    omp_set_num_threads(previous_omp_);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: the global count
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_;
  int previous_omp_;
};

}  // namespace qkv_attention::cpu

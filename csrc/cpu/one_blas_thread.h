// Holds MKL to one thread on the calling thread for a scope.
//
// Why: a GEMM whose sums MKL splits across threads gives other bits than the same GEMM on one
// thread, and whether MKL threads a call depends on where it runs (outside a parallel region it
// uses torch's thread count; inside one it may not) — so a result would depend on
// torch.set_num_threads. Our GEMMs are cut into tasks fixed by the shape (cpu/tiled_gemm.h, the
// attention kernels' blocks); each task's BLAS call runs on the thread that runs the task.
#pragma once

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
  OneBlasThread() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: the global count
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_;
};

}  // namespace qkv_attention::cpu

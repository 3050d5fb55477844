// One BLAS thread per call for the calling thread (RAII), so that a product's summation order, hence its bits,
// does not depend on the thread count.
#pragma once

namespace gradkit {

// MKL's per-thread thread count (exported by the x86 torch wheels, which link MKL into libtorch_cpu; a weak
// reference, so builds whose BLAS is not MKL load and skip it). The GEMM path's sums must not depend on the
// thread count: inside at::parallel_for's threads MKL already runs one thread per call, but a group run inline
// (one group, or one thread) let MKL split the product by itself, and for some shapes it split the inner
// dimension: 5 x 3000 -> 100 Gaussian gave other bits at 2 threads than at 1 (session 42). (search.cpp's BLAS
// blocks need no guard: they only bound the scores, which the exact chains then settle.)
#if defined(__GNUC__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // mkl.h's mkl_set_num_threads_local (the
// lower-case symbol is the Fortran entry, which takes a pointer)
#define GK_MKL_LOCAL 1
#endif
struct OneBlasThread {
  int prev = 0;
  bool set = false;
  OneBlasThread() {
#ifdef GK_MKL_LOCAL
    if (&MKL_Set_Num_Threads_Local != nullptr) {
      prev = MKL_Set_Num_Threads_Local(1);
      set = true;
    }
#endif
  }
  ~OneBlasThread() {
#ifdef GK_MKL_LOCAL
    if (set) MKL_Set_Num_Threads_Local(prev);
#endif
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;
};

}  // namespace gradkit

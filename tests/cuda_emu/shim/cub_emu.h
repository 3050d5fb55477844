// tests/cuda_emu: the parts of cub the kernels use, on the emulator, with cub's contracts: a block reduce's
// aggregate is valid in thread 0 only (the others get a poison value here, so a kernel that reads it
// elsewhere shows it), a block scan's aggregate in every thread, and temp storage may be reused only after
// a __syncthreads of the kernel's own (nothing here waits after the last read).
#pragma once
#include <cstddef>
#include <cstring>

#include "../emu.h"

namespace cub {

// One slot per thread: each thread deposits its value, then waits for the whole block.
template <typename T, int kBlock>
struct BlockSlots {
  struct TempStorage {
    T v[kBlock];
  };
  TempStorage& s;
  explicit BlockSlots(TempStorage& t) : s(t) {}
  void deposit(T x) {
    s.v[threadIdx.x] = x;
    __syncthreads();
  }
};

template <typename T, int kBlock>
struct BlockReduce : BlockSlots<T, kBlock> {
  using BlockSlots<T, kBlock>::BlockSlots;
  using BlockSlots<T, kBlock>::s;
  T Sum(T x) {
    const unsigned t = threadIdx.x;
    this->deposit(x);
    if (t != 0) {
      T poison;
      std::memset(&poison, 0x5A, sizeof poison);
      return poison;
    }
    T r = s.v[0];
    for (unsigned i = 1; i < blockDim.x; ++i) r = r + s.v[i];
    return r;
  }
};

template <typename T, int kBlock>
struct BlockScan : BlockSlots<T, kBlock> {
  using BlockSlots<T, kBlock>::BlockSlots;
  using BlockSlots<T, kBlock>::s;
  void ExclusiveSum(T x, T& out, T& aggregate) {
    const unsigned t = threadIdx.x;
    this->deposit(x);
    T run = T(0), all = T(0);
    for (unsigned i = 0; i < blockDim.x; ++i) {
      if (i == t) run = all;
      all = all + s.v[i];
    }
    out = run;
    aggregate = all;
  }
  void ExclusiveSum(T x, T& out) {
    T aggregate;
    ExclusiveSum(x, out, aggregate);
  }
};

struct DeviceScan {
  // cub's two-phase call: with temp == nullptr only the temp size is set; the scan runs on the host here.
  template <typename In, typename Out>
  static int ExclusiveSum(void* temp, size_t& bytes, In in, Out out, int64_t n, int /*stream*/ = 0) {
    if (temp == nullptr) {
      bytes = 1;
      return 0;
    }
    auto run = decltype(+in[0])(0);
    for (int64_t i = 0; i < n; ++i) {
      const auto v = in[i];
      out[i] = run;
      run = run + v;
    }
    return 0;
  }
};

}  // namespace cub

// Host helpers shared by every csrc/cuda/*.cu file.
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

namespace gradkit {
namespace cuda {

// Streaming multiprocessors of device `dev` (queried once per device, then cached).
inline int sm_count(int dev) {
  static std::atomic<int> cache[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_INTERNAL_ASSERT(dev >= 0 && dev < C10_COMPILE_TIME_MAX_GPUS, "gradkit: bad CUDA device index ", dev);
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    v = std::max(v, 1);
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Index of the last table row whose first tile is <= tile, for the multi-tensor tile tables
// (rows sorted by `first_tile`, every row covering >= 1 tile).
template <typename Row>
__device__ __forceinline__ int find_seg(const Row* __restrict__ rows, int nrows, int64_t tile) {
  int lo = 0, hi = nrows - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (rows[mid].first_tile <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace cuda
}  // namespace gradkit

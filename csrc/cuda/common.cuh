// Host helpers shared by every csrc/cuda/*.cu file.
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

// Kernel launches and dynamic shared memory through two macros, so that a file can also be compiled as
// plain C++ by the CPU emulator of tests/cuda_emu (GRADKIT_CUDA_EMU: every block's threads run as fibers,
// __syncthreads a barrier among them), which runs the kernels and their host code in CI without a GPU.
//   GK_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)  ==  kernel<<<grid, block, smem, stream>>>(args...)
//   GK_DYNAMIC_SHARED(float, sm);                                ==  extern __shared__ float sm[];
#ifdef GRADKIT_CUDA_EMU
#define GK_LAUNCH(kernel, grid, block, smem, stream, ...)                                          \
  ::gk_emu::launch(dim3(grid), dim3(block), static_cast<size_t>(smem), static_cast<int>(stream), \
                   [&] { kernel(__VA_ARGS__); })
#define GK_DYNAMIC_SHARED(type, name) type* name = ::gk_emu::dynamic_shared<type>()
#else
#define GK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define GK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace gradkit {
namespace cuda {

#ifdef GRADKIT_CUDA_EMU
inline int sm_count(int) { return ::gk_emu::sm_count(); }  // the emulated device's, set by the test
// The emulator's "device" tensors are CPU tensors, and a CPU-only torch has no pinned allocator.
inline bool on_device(const c10::Device& d) { return d.is_cpu(); }
inline c10::Device current_device() { return c10::Device(c10::kCPU); }
constexpr bool kPinnedStaging = false;
#else
// Whether d is this backend's device (a CUDA device; under the emulator, the CPU).
inline bool on_device(const c10::Device& d) { return d.is_cuda(); }
// The current device, where an op with no tensor to take it from puts its output.
inline c10::Device current_device() { return c10::Device(c10::kCUDA, c10::cuda::current_device()); }
// Host staging buffers for async uploads are pinned (page-locked) memory.
constexpr bool kPinnedStaging = true;
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
#endif

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

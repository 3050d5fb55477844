// A small cache of large CPU output buffers for kernels that write their output densely.
//
// torch has no caching allocator on CPU: every call that returns a new 16 MiB mask gets fresh
// pages from the kernel and pays ~4096 first-touch page faults for them (measured: +0.5-1 ms on a
// 3.5 ms scope_mask over 4096x4096, 2 threads). Buffers of at least kPoolMin bytes handed out
// here go back to the cache when their tensor is freed (up to kPoolMax bytes in all, exact-size
// reuse), so a loop that makes the same mask again reuses pages that are already mapped.
// GRADKIT_OUT_POOL_MB=N (read per call) caps what the cache keeps at N MiB instead; 0 turns it off: outputs
// are plain at::empty tensors (resizable storage, nothing kept after they are freed).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <sys/mman.h>
#include <iterator>
#include <map>
#include <mutex>

namespace gradkit {

struct OutPool {
  static constexpr size_t kPoolMin = size_t(4) << 20;
  static constexpr size_t kPoolMax = size_t(256) << 20;  // the default cap
  // check: a value that is not a whole number is an error (at the op's call); unchecked (a freed tensor's
  // deleter, which must not throw) it reads as the default
  static size_t cap(bool check) {
    const char* env = std::getenv("GRADKIT_OUT_POOL_MB");
    if (env == nullptr || *env == '\0') return kPoolMax;
    char* end = nullptr;
    const unsigned long long mb = std::strtoull(env, &end, 10);
    const bool ok = *end == '\0' && *env != '-' && *env != '+';
    TORCH_CHECK(ok || !check, "GRADKIT_OUT_POOL_MB: expected a whole number of MiB (0 turns the output cache off), got '",
                env, "'");
    if (!ok) return kPoolMax;
    return static_cast<size_t>(std::min<unsigned long long>(mb, 1ull << 30)) << 20;
  }
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;
  size_t cached = 0;
};

inline OutPool& out_pool() {
  static OutPool* pool = new OutPool();  // never destroyed: tensors may outlive static destruction
  return *pool;
}

// An uninitialised CPU tensor of `sizes`, from the cache when it is large. `huge`: a fresh block is 2 MiB-aligned
// and asks for transparent huge pages (MADV_HUGEPAGE; THP "madvise", the common default, grants them only to
// such ranges), so its first touch takes ~500x fewer page faults. factored_project's outputs (session 29, Intel
// Emerald Rapids VM, 8192 one-token examples of a 1000 x 1000 layer, bfloat16, 2 threads): p = 64 (134 MB out)
// 43.6 -> 21.0 ms a call with torch's THP_MEM_ALLOC_ENABLE=1, the same pages this asks for.
inline at::Tensor pooled_empty(c10::IntArrayRef sizes, const at::TensorOptions& opt, bool huge = false) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  if (OutPool::cap(true) == 0 || bytes < OutPool::kPoolMin) return at::empty(sizes, opt);
  OutPool& P = out_pool();
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> g(P.mu);
    // the most recently freed block of this size (its pages are the likeliest to be in cache and the TLB; and a
    // call that follows a free gets that buffer, whatever other blocks of the size the cache holds)
    const auto range = P.free_blocks.equal_range(bytes);
    if (range.first != range.second) {
      const auto it = std::prev(range.second);
      p = it->second;
      P.free_blocks.erase(it);
      P.cached -= bytes;
    }
  }
  if (p == nullptr) {
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t align = huge ? kHuge : 64, len = (bytes + align - 1) / align * align;
    p = std::aligned_alloc(align, len);
#ifdef MADV_HUGEPAGE
    if (p != nullptr && huge) madvise(p, len, MADV_HUGEPAGE);  // advice only: a refusal changes nothing
#endif
  }
  if (p == nullptr) return at::empty(sizes, opt);
  return at::from_blob(
      p, sizes,
      [bytes](void* q) {
        OutPool& Q = out_pool();
        std::lock_guard<std::mutex> g(Q.mu);
        if (Q.cached + bytes <= OutPool::cap(false)) {
          Q.free_blocks.emplace(bytes, q);
          Q.cached += bytes;
        } else {
          std::free(q);
        }
      },
      opt.device(at::kCPU));
}

}  // namespace gradkit

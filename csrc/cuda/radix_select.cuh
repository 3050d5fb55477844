// Device building blocks of an exact, MSB-first radix select over unsigned integer keys, with
// the select state on the device (no host round trip between passes). Used by golden.cu; the
// same scheme as parammap.cu's top-k select (which keeps its own copy).
//
// State (unsigned long long words, zero before pass 0): prefix / mask = the digits of the k-th
// largest key fixed so far; need = how many of the candidates whose key matches prefix under
// mask are still to be taken (1 <= need <= #matching while 1 <= k <= #candidates).
// Pass p looks at digit bits [shift, shift + width) (Digits<K>::shift / width):
//   histogram: each block counts the digit of the candidates that match prefix in a shared
//     histogram (hist_add: warp-aggregated shared atomics), then flush_hist adds its nonzero
//     bins to the global histogram (uint64 atomics);
//   walk_kernel: one block scans the bins from the largest digit down; the digit d where the
//     count of matching keys with a larger digit (`above`) is < need <= above + hist[d] is the
//     k-th key's digit: need -= above, prefix |= d << shift. It also zeroes the histogram.
// After the last pass, kth = prefix exactly, #(candidates > kth) = k - need, and the first
// `need` candidates == kth (in whatever order the caller defines) complete the top k.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace gradkit {
namespace radix {

constexpr int kWalkThreads = 1024;  // walk_kernel's block size (exactly)

enum : int { kPrefix = 0, kMask = 1, kNeed = 2, kStateWords = 4 };

// Digit geometry of K-bit keys: 16- and 32-bit keys use 11-bit digits (2048-bin histograms,
// 8 KB shared; 2 / 3 passes), 64-bit keys 13-bit digits (8192 bins, 32 KB shared; 5 passes).
// The first pass takes the top `kBits` bits, the last one whatever is left.
template <typename K>
struct Digits {
  static constexpr int kKeyBits = static_cast<int>(sizeof(K) * 8);
  static constexpr int kBits = sizeof(K) == 8 ? 13 : 11;
  static constexpr int kBins = 1 << kBits;
  static constexpr int kPasses = (kKeyBits + kBits - 1) / kBits;
  static constexpr int shift(int p) { return kKeyBits - kBits * (p + 1) > 0 ? kKeyBits - kBits * (p + 1) : 0; }
  static constexpr int width(int p) { return kKeyBits - kBits * p < kBits ? kKeyBits - kBits * p : kBits; }
};

// Adds digit (key >> shift) & dmask of the lanes with `take` to the shared histogram `sh`.
// Must be called by all 32 lanes of the warp (uniform control flow up to here).
template <typename K>
__device__ __forceinline__ void hist_add(unsigned int* sh, K key, bool take, int shift, K dmask) {
  const unsigned part = __ballot_sync(0xffffffffu, take);
  if (take) {
    const unsigned d = static_cast<unsigned>((key >> shift) & dmask);
    // One shared atomic per distinct digit in the warp (skewed data hits few bins).
    const unsigned peers = __match_any_sync(part, d);
    if ((threadIdx.x & 31) == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&sh[d], __popc(peers));
  }
}

template <int BINS>
__device__ __forceinline__ void clear_hist(unsigned int* sh) {
  for (int i = threadIdx.x; i < BINS; i += blockDim.x) sh[i] = 0;
  __syncthreads();
}

template <int BINS>
__device__ __forceinline__ void flush_hist(const unsigned int* sh, unsigned long long* __restrict__ hist) {
  __syncthreads();
  for (int i = threadIdx.x; i < BINS; i += blockDim.x) {
    if (sh[i] != 0) atomicAdd(&hist[i], static_cast<unsigned long long>(sh[i]));
  }
}

// Exactly kWalkThreads threads, one block. Thread t owns the P bins with descending rank
// t*P .. t*P+P-1 (bin = BINS-1-rank), so an exclusive block scan of per-thread sums gives, for
// each bin, the count of matching keys in larger bins. `k` seeds need in pass 0.
template <int BINS>
__global__ void __launch_bounds__(kWalkThreads)
    walk_kernel(unsigned long long* st, unsigned long long* __restrict__ hist, int pass, int shift, int width,
                unsigned long long k) {
  constexpr int P = BINS / kWalkThreads;
  static_assert(BINS % kWalkThreads == 0, "bins must split evenly over the walk block");
  using BS = cub::BlockScan<unsigned long long, kWalkThreads>;
  __shared__ typename BS::TempStorage tmp;
  const unsigned long long need = pass == 0 ? k : st[kNeed];
  const unsigned long long prefix = st[kPrefix], pmask = st[kMask];
  unsigned long long c[P];
  unsigned long long local = 0;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int bin = BINS - 1 - (static_cast<int>(threadIdx.x) * P + i);
    c[i] = hist[bin];
    hist[bin] = 0;  // ready for the next pass (each bin is owned by exactly one thread)
    local += c[i];
  }
  unsigned long long above = 0;
  BS(tmp).ExclusiveSum(local, above);
  __syncthreads();  // every thread has read st[] before the owner of the digit writes it
#pragma unroll
  for (int i = 0; i < P; ++i) {
    if (above < need && above + c[i] >= need) {  // exactly one bin satisfies this
      const unsigned long long bin = BINS - 1 - (static_cast<int>(threadIdx.x) * P + i);
      st[kPrefix] = prefix | (bin << shift);
      st[kMask] = pmask | (((1ull << width) - 1ull) << shift);
      st[kNeed] = need - above;
    }
    above += c[i];
  }
}

}  // namespace radix
}  // namespace gradkit

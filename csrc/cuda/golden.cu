// CUDA kernels for the golden family: the per-sample golden update (top-k of |g| ANDed into a
// packed bitmask, counts, popcount) and packed-bitmask algebra over lists. Semantics:
// python/gradkit/kernels/reference/golden.py. Bitmasks are packed little-endian: bit j of byte
// i is element 8i+j; padding bits of the last byte are 0.
//
// Headers and conventions as in parammap.cu: only c10/cuda/* and the toolkit's CUB (not
// ATen/cuda/CUDAContext.h); a CUDAGuard, then launches on the current stream; kThreads = 256
// threads per block (kernels with cub::Block* / shared arrays sized by it REQUIRE that size);
// int64 element offsets; grids capped at 8 blocks/SM with grid-stride loops over work items;
// loops containing __syncthreads / cub::Block* / warp intrinsics have block-uniform trip counts.
//
// golden_topk_and_ (no host sync at all):
// * key(|g|) from g's raw bits (uint16 for half/bf16, uint32 for float, uint64 for double):
//   key = (bits & ~sign) + 1, NaN -> 0. Unsigned key order == order of |g| with NaN below every
//   number; -0.0 and +0.0 share a key. The radix select (radix_select.cuh) runs over all numel
//   keys, so it is well defined for every 1 <= k <= numel; NaN (key 0) is never selected.
// * 0 < k < numel: one histogram + walk launch pair per digit pass (2 / 3 / 5 passes), then
//   ties_kernel counts keys == kth per chunk of kChunk elements, a CUB exclusive scan over the
//   chunks gives E[c] = ties before chunk c (chunk order == position order), and write_kernel
//   takes element j iff key != 0 and (key > kth, or key == kth and fewer than `need` ties
//   precede j): lowest position first among the ties.
// * k == numel: no passes (state stays 0: kth = 0, need = 0): every non-NaN entry. k == 0: none.
// * write_kernel, per round of kRound = kThreads * kItems elements: item i of warp w covers the
//   32 consecutive elements [base + i*kThreads + 32w, +32) (coalesced loads), i.e. exactly one
//   32-bit word of the bitmask, so __ballot_sync of the selection IS the packed word (lane L =
//   bit L, little-endian). In-round tie ranks: per-(item, warp) tie counts (popc of a ballot)
//   are scanned in (item, warp) order = position order. Lane 0 stores the word (ANDed with the
//   old word unless `first`) and counts its bits; `counts` gets +1 per selected element; the
//   popcount is block-reduced and added atomically into the 0-dim result.
//
// bitmask_binary / bitmask_not / bitmask_count: ONE launch per call over all tensors of the
// list. The host packs one BmSeg per non-empty tensor into a pinned buffer and uploads it with
// one async H2D copy; tensors are cut into tiles of kBmTile bytes numbered globally in list order
// (BmSeg::first_tile), a block maps a tile to its tensor by binary search. Each thread handles
// 16-byte vectors (uint4) when the tensor's pointers are 16-byte aligned, bytes otherwise and for
// the vector holding the last byte (where bitmask_not clears the padding bits). Popcounts use
// __popc, block-reduced per tile and added atomically into the tensor's slot.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.cuh"
#include "radix_select.cuh"

namespace gradkit {
namespace golden {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------
// small host helpers
// ---------------------------------------------------------------------------

using gradkit::cuda::sm_count;

// Blocks for `work` independent work items: at most 8 resident 256-thread blocks per SM.
int64_t grid_for(int64_t work, int dev) {
  return std::max<int64_t>(1, std::min(work, static_cast<int64_t>(sm_count(dev)) * 8));
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// CUB's two-phase call: query the temp size, allocate it from torch's caching allocator, run.
void exclusive_sum(const int64_t* in, int64_t* out, int64_t n, const at::Device& dev, cudaStream_t stream) {
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, n, stream));
  const Tensor tmp = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                               at::TensorOptions().dtype(at::kByte).device(dev));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp.data_ptr(), bytes, in, out, n, stream));
}

// Pinned staging + non_blocking: one async H2D copy on the current stream (ATen records the
// pinned block's use on that stream, so it is not recycled before the copy ran).
template <typename T>
Tensor upload(const std::vector<T>& rows, const at::Device& dev) {
  const int64_t bytes = static_cast<int64_t>(rows.size() * sizeof(T));
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(cuda::kPinnedStaging));
  std::memcpy(host.data_ptr<uint8_t>(), rows.data(), static_cast<size_t>(bytes));
  Tensor d = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(dev));
  d.copy_(host, /*non_blocking=*/true);
  return d;
}

// ===========================================================================
// golden_topk_and_
// ===========================================================================

constexpr int kHistItems = 4;  // elements per thread per work unit of the histogram pass
constexpr int64_t kUnit = static_cast<int64_t>(kThreads) * kHistItems;  // 1024
// Histogram blocks count in uint32 shared bins: no block gets more than 2^20 units (2^30 elements).
constexpr int64_t kMaxUnitsPerBlock = int64_t(1) << 20;
constexpr int kItems = 8;   // 32-element words per warp per round of the ties / write passes
constexpr int kRounds = 4;  // rounds per chunk
constexpr int64_t kRound = static_cast<int64_t>(kThreads) * kItems;  // 2048 elements = 64 bitmask words
constexpr int64_t kChunk = kRound * kRounds;                         // 8192 elements
constexpr int kWarps = kThreads / 32;
static_assert(kItems * kWarps <= kThreads, "one scan entry per (item, warp) must fit the block");

// st (int64 words): radix state (radix::kPrefix, kMask, kNeed) | histogram (up to 8192 bins).
constexpr int kStHist = radix::kStateWords;

// Key of |g| from its raw bits: magnitude + 1, NaN -> 0 (inf = the bit pattern of +inf).
template <typename K>
__device__ __forceinline__ K abs_key(K u, K inf) {
  const K mag = u & static_cast<K>(~(K(1) << (sizeof(K) * 8 - 1)));
  return mag <= inf ? static_cast<K>(mag + 1) : K(0);
}

template <typename K>
__global__ void __launch_bounds__(kThreads)
    hist_kernel(const K* __restrict__ g, int64_t n, K inf, int64_t units, const unsigned long long* __restrict__ st,
                int shift, int width, unsigned long long* __restrict__ hist) {
  constexpr int kBins = radix::Digits<K>::kBins;
  __shared__ unsigned int sh[kBins];
  radix::clear_hist<kBins>(sh);
  const K prefix = static_cast<K>(st[radix::kPrefix]);
  const K pmask = static_cast<K>(st[radix::kMask]);
  const K dmask = static_cast<K>((1u << width) - 1u);
  const int lane = threadIdx.x & 31;
  // Each warp owns 32*kHistItems consecutive elements of a unit; `base` is warp-uniform.
  const int64_t warp_off = static_cast<int64_t>(threadIdx.x >> 5) * 32 * kHistItems;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t base = u * kUnit + warp_off;
    if (base >= n) continue;  // the whole warp skips
    K key[kHistItems];
#pragma unroll
    for (int i = 0; i < kHistItems; ++i) {
      const int64_t j = base + i * 32 + lane;
      key[i] = j < n ? abs_key<K>(g[j], inf) : K(0);
    }
#pragma unroll
    for (int i = 0; i < kHistItems; ++i) {
      radix::hist_add<K>(sh, key[i], base + i * 32 + lane < n && (key[i] & pmask) == prefix, shift, dmask);
    }
  }
  radix::flush_hist<kBins>(sh, hist);
}

// eq[c] = #keys == kth in chunk c.
template <typename K>
__global__ void __launch_bounds__(kThreads)
    ties_kernel(const K* __restrict__ g, int64_t n, K inf, int64_t nchunks, const unsigned long long* __restrict__ st,
                int64_t* __restrict__ eq) {
  using BR = cub::BlockReduce<int, kThreads>;
  __shared__ typename BR::TempStorage tmp;
  const K kth = static_cast<K>(st[radix::kPrefix]);
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    int cnt = 0;
    for (int i = 0; i < kItems * kRounds; ++i) {
      const int64_t j = c * kChunk + static_cast<int64_t>(i) * kThreads + threadIdx.x;  // coalesced
      cnt += j < n && abs_key<K>(g[j], inf) == kth;
    }
    const int tot = BR(tmp).Sum(cnt);
    if (threadIdx.x == 0) eq[c] = tot;
    __syncthreads();  // tmp is reused by the next chunk
  }
}

// See the file comment. E: ties before each chunk (null when no tie can be taken: k == 0 or
// k == numel); `none`: k == 0.
template <typename K>
__global__ void __launch_bounds__(kThreads)
    write_kernel(const K* __restrict__ g, int64_t n, K inf, int64_t nchunks, const unsigned long long* __restrict__ st,
                 const int64_t* __restrict__ E, bool none, bool first, uint8_t* __restrict__ bits, int64_t nbytes,
                 bool bits_aligned4, int32_t* __restrict__ counts, unsigned long long* __restrict__ pop) {
  using BS = cub::BlockScan<int, kThreads>;
  using BR = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ union {
    typename BS::TempStorage scan;
    typename BR::TempStorage reduce;
  } tmp;
  __shared__ int before[kItems * kWarps];  // ties in this round before (item, warp), position order
  const K kth = static_cast<K>(st[radix::kPrefix]);
  const int64_t need = static_cast<int64_t>(st[radix::kNeed]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lt = (1u << lane) - 1u;  // lanes below this one
  unsigned long long my_pop = 0;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    int64_t run = E != nullptr ? E[c] : 0;  // ties before this round
    for (int r = 0; r < kRounds; ++r) {
      const int64_t base = c * kChunk + r * kRound;
      if (base >= n) break;  // block-uniform
      K key[kItems];
      unsigned tie[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t j = base + static_cast<int64_t>(i) * kThreads + threadIdx.x;
        key[i] = j < n ? abs_key<K>(g[j], inf) : K(0);
        tie[i] = __ballot_sync(0xffffffffu, j < n && key[i] == kth);
        if (lane == 0) before[i * kWarps + warp] = __popc(tie[i]);
      }
      __syncthreads();
      const int t = threadIdx.x;
      int pre = 0, total = 0;
      BS(tmp.scan).ExclusiveSum(t < kItems * kWarps ? before[t] : 0, pre, total);
      __syncthreads();  // every entry was read before it is overwritten
      if (t < kItems * kWarps) before[t] = pre;
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t j = base + static_cast<int64_t>(i) * kThreads + threadIdx.x;
        const int64_t rank = run + before[i * kWarps + warp] + __popc(tie[i] & lt);  // ties before j
        const bool sel = !none && key[i] != 0 && (key[i] > kth || (((tie[i] >> lane) & 1u) && rank < need));
        const unsigned word = __ballot_sync(0xffffffffu, sel);
        if (sel && counts != nullptr) counts[j] += 1;
        const int64_t b0 = (base + static_cast<int64_t>(i) * kThreads + 32 * warp) / 8;  // first byte of the word
        if (lane == 0 && b0 < nbytes) {
          unsigned w = word;
          if (bits_aligned4 && b0 + 4 <= nbytes) {
            unsigned* p = reinterpret_cast<unsigned*>(bits + b0);
            if (!first) w &= *p;
            *p = w;
          } else {
            unsigned old = 0;
            for (int q = 0; q < 4 && b0 + q < nbytes; ++q) old |= static_cast<unsigned>(bits[b0 + q]) << (8 * q);
            if (!first) w &= old;
            for (int q = 0; q < 4 && b0 + q < nbytes; ++q) bits[b0 + q] = static_cast<uint8_t>(w >> (8 * q));
          }
          my_pop += __popc(w);
        }
      }
      run += total;
      __syncthreads();  // `before` and tmp are reused by the next round
    }
  }
  const unsigned long long tot = BR(tmp.reduce).Sum(my_pop);
  if (threadIdx.x == 0 && tot != 0) atomicAdd(pop, tot);
}

template <typename K>
void golden_run(const Tensor& g, const Tensor& bits, int32_t* counts, int64_t k, bool first, K inf, Tensor& pop) {
  using D = radix::Digits<K>;
  const at::Device dev = g.device();
  const int di = dev.index();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = g.numel(), nbytes = bits.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const K* gk = static_cast<const K*>(g.data_ptr());
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  Tensor st = at::zeros({kStHist + D::kBins}, long_opts);
  unsigned long long* s = reinterpret_cast<unsigned long long*>(st.data_ptr<int64_t>());
  Tensor eq;
  const int64_t* E = nullptr;
  if (0 < k && k < n) {
    const int64_t units = (n + kUnit - 1) / kUnit;
    // Enough blocks to fill the GPU, and enough that no block sees more than kMaxUnitsPerBlock units.
    const int64_t hist_grid = std::min(units, std::max(grid_for(units, di), (units + kMaxUnitsPerBlock - 1) /
                                                                                 kMaxUnitsPerBlock));
    for (int p = 0; p < D::kPasses; ++p) {
      GK_LAUNCH(hist_kernel<K>, static_cast<unsigned>(hist_grid), kThreads, 0, stream, gk, n, inf, units, s,
                D::shift(p), D::width(p), s + kStHist);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      GK_LAUNCH(radix::walk_kernel<D::kBins>, 1, radix::kWalkThreads, 0, stream, s, s + kStHist, p, D::shift(p),
                D::width(p), static_cast<unsigned long long>(k));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    eq = at::empty({2 * nchunks}, long_opts);  // per-chunk ties | their exclusive prefix
    int64_t* e = eq.data_ptr<int64_t>();
    GK_LAUNCH(ties_kernel<K>, static_cast<unsigned>(grid_for(nchunks, di)), kThreads, 0, stream, gk, n, inf, nchunks,
              s, e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    exclusive_sum(e, e + nchunks, nchunks, dev, stream);
    E = e + nchunks;
  }
  uint8_t* b = bits.data_ptr<uint8_t>();
  GK_LAUNCH(write_kernel<K>, static_cast<unsigned>(grid_for(nchunks, di)), kThreads, 0, stream, gk, n, inf, nchunks, s,
            E, k == 0, first, b, nbytes, is_aligned(b, 4), counts,
            reinterpret_cast<unsigned long long*>(pop.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_golden(const Tensor& g, const Tensor& bits, const std::optional<Tensor>& counts, int64_t k) {
  const auto dt = g.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "g: expected float32/float64/float16/bfloat16, got ", dt);
  TORCH_CHECK_VALUE(cuda::on_device(g.device()), "g: expected a CUDA tensor, got one on ", g.device());
  TORCH_CHECK_VALUE(g.is_contiguous(), "g: expected a contiguous tensor");
  const int64_t n = g.numel();
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, "bits: expected a uint8 packed bitmask, got ",
                   bits.scalar_type());
  TORCH_CHECK_VALUE(bits.dim() == 1 && bits.numel() == (n + 7) / 8 && bits.is_contiguous(),
                    "bits: expected a contiguous uint8 tensor of shape (", (n + 7) / 8, ",) for ", n,
                    " elements, got shape ", bits.sizes());
  TORCH_CHECK_VALUE(bits.device() == g.device(), "bits: on ", bits.device(), " but expected ", g.device());
  if (counts.has_value()) {
    const Tensor& c = *counts;
    TORCH_CHECK_VALUE(c.scalar_type() == at::kInt && c.numel() == n && c.is_contiguous() && c.device() == g.device(),
                      "counts: expected a contiguous int32 tensor of ", n, " elements on ", g.device());
  }
  TORCH_CHECK_VALUE(0 <= k && k <= n, "k: must be in [0, ", n, "], got ", k);
}

Tensor golden_topk_and_cuda(const Tensor& g, Tensor& bits, const std::optional<Tensor>& counts, int64_t k,
                            bool first) {
  check_golden(g, bits, counts, k);
  const c10::cuda::CUDAGuard guard(g.device());
  Tensor pop = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(g.device()));
  if (g.numel() == 0) return pop;
  int32_t* c = counts.has_value() ? counts->data_ptr<int32_t>() : nullptr;
  switch (g.scalar_type()) {
    case at::kHalf: golden_run<uint16_t>(g, bits, c, k, first, 0x7C00u, pop); break;
    case at::kBFloat16: golden_run<uint16_t>(g, bits, c, k, first, 0x7F80u, pop); break;
    case at::kFloat: golden_run<uint32_t>(g, bits, c, k, first, 0x7F800000u, pop); break;
    default: golden_run<uint64_t>(g, bits, c, k, first, 0x7FF0000000000000ull, pop); break;
  }
  return pop;
}

// ===========================================================================
// bitmask algebra
// ===========================================================================

constexpr int kVecRounds = 4;
constexpr int64_t kBmTile = static_cast<int64_t>(kThreads) * 16 * kVecRounds;  // 16 KB per tile
enum : int { kAnd = 0, kOr = 1, kXor = 2, kAndNot = 3, kNot = 4 };

// One non-empty mask of a bitmask call (device table entry).
struct BmSeg {
  const uint8_t* a;
  const uint8_t* b;  // second operand (binary ops), else null
  uint8_t* out;      // result (binary / not), else null
  int64_t nbytes;    // >= 1
  int64_t first_tile;
  int64_t slot;      // bitmask_count: index of the mask in the list
  int32_t last;      // bitmask_not: valid bits of the last byte
  int32_t vec;       // every pointer 16-byte aligned: uint4 path
};
static_assert(sizeof(BmSeg) % 8 == 0, "BmSeg must keep 8-byte alignment in the packed table");

using gradkit::cuda::find_seg;

template <int OP>
__device__ __forceinline__ unsigned bm_apply(unsigned x, unsigned y) {
  if constexpr (OP == kAnd) return x & y;
  if constexpr (OP == kOr) return x | y;
  if constexpr (OP == kXor) return x ^ y;
  if constexpr (OP == kAndNot) return x & ~y;
  return ~x;
}

// out = a OP b (or ~a with the padding bits of the last byte cleared), over every tile.
template <int OP>
__global__ void __launch_bounds__(kThreads)
    bitmask_map_kernel(const BmSeg* __restrict__ segs, int nseg, int64_t tiles) {
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const BmSeg& sg = segs[find_seg(segs, nseg, tile)];
    const int64_t t0 = (tile - sg.first_tile) * kBmTile;
    for (int r = 0; r < kVecRounds; ++r) {
      const int64_t b0 = t0 + (static_cast<int64_t>(r) * kThreads + threadIdx.x) * 16;
      if (b0 >= sg.nbytes) break;
      if (sg.vec && b0 + 16 < sg.nbytes) {  // not the vector holding the last byte
        const uint4 x = *reinterpret_cast<const uint4*>(sg.a + b0);
        const uint4 y = OP == kNot ? x : *reinterpret_cast<const uint4*>(sg.b + b0);
        *reinterpret_cast<uint4*>(sg.out + b0) =
            make_uint4(bm_apply<OP>(x.x, y.x), bm_apply<OP>(x.y, y.y), bm_apply<OP>(x.z, y.z), bm_apply<OP>(x.w, y.w));
      } else {
        const int64_t b1 = std::min<int64_t>(b0 + 16, sg.nbytes);
        for (int64_t q = b0; q < b1; ++q) {
          unsigned v = bm_apply<OP>(sg.a[q], OP == kNot ? 0u : sg.b[q]);
          if (OP == kNot && q == sg.nbytes - 1) v &= static_cast<unsigned>(sg.last);
          sg.out[q] = static_cast<uint8_t>(v);
        }
      }
    }
  }
}

// out[slot] += set bits of every tile of the mask.
__global__ void __launch_bounds__(kThreads)
    bitmask_count_kernel(const BmSeg* __restrict__ segs, int nseg, int64_t tiles, unsigned long long* out) {
  using BR = cub::BlockReduce<int, kThreads>;
  __shared__ typename BR::TempStorage tmp;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const BmSeg& sg = segs[find_seg(segs, nseg, tile)];
    const int64_t t0 = (tile - sg.first_tile) * kBmTile;
    int cnt = 0;
    for (int r = 0; r < kVecRounds; ++r) {
      const int64_t b0 = t0 + (static_cast<int64_t>(r) * kThreads + threadIdx.x) * 16;
      if (b0 >= sg.nbytes) break;
      if (sg.vec && b0 + 16 <= sg.nbytes) {
        const uint4 x = *reinterpret_cast<const uint4*>(sg.a + b0);
        cnt += __popc(x.x) + __popc(x.y) + __popc(x.z) + __popc(x.w);
      } else {
        const int64_t b1 = std::min<int64_t>(b0 + 16, sg.nbytes);
        for (int64_t q = b0; q < b1; ++q) cnt += __popc(static_cast<unsigned>(sg.a[q]));
      }
    }
    const int tot = BR(tmp).Sum(cnt);
    if (threadIdx.x == 0 && tot != 0) atomicAdd(&out[sg.slot], static_cast<unsigned long long>(tot));
    __syncthreads();  // tmp is reused by the next tile
  }
}

// Checks a list of packed bitmasks (`what` names the argument); returns its device.
at::Device check_bit_list(at::TensorList a, const char* what) {
  TORCH_CHECK_VALUE(!a.empty(), what, ": expected at least one mask");
  for (const auto i : c10::irange(a.size())) {
    const Tensor& t = a[i];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kByte && t.dim() == 1 && t.is_contiguous(), what, "[", i,
                     "]: expected a contiguous 1-D uint8 tensor");
    TORCH_CHECK_VALUE(t.device() == a[0].device(), what, "[", i, "]: on ", t.device(), " but ", what, "[0] is on ",
                      a[0].device());
  }
  TORCH_CHECK_VALUE(cuda::on_device(a[0].device()), what, ": expected CUDA tensors, got ones on ", a[0].device());
  return a[0].device();
}

// Uploads the table of the non-empty masks and runs `launch(segs, nseg, tiles, stream)` (if any).
template <typename F>
void bitmask_launch(std::vector<BmSeg>& table, const at::Device& dev, F launch) {
  int64_t tiles = 0;
  for (BmSeg& s : table) {
    s.first_tile = tiles;
    tiles += (s.nbytes + kBmTile - 1) / kBmTile;
  }
  if (table.empty()) return;
  const Tensor tdev = upload(table, dev);  // outlives the launch in stream order
  launch(reinterpret_cast<const BmSeg*>(tdev.data_ptr<uint8_t>()), static_cast<int>(table.size()), tiles,
         at::cuda::getCurrentCUDAStream(), static_cast<unsigned>(grid_for(tiles, dev.index())));
}

bool aligned16(const void* p) { return is_aligned(p, 16); }

template <int OP>
void map_launch(std::vector<BmSeg>& table, const at::Device& dev) {
  bitmask_launch(table, dev, [](const BmSeg* segs, int nseg, int64_t tiles, cudaStream_t stream, unsigned grid) {
    GK_LAUNCH(bitmask_map_kernel<OP>, grid, kThreads, 0, stream, segs, nseg, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<Tensor> bitmask_binary_cuda(at::TensorList a, at::TensorList b, int64_t op) {
  TORCH_CHECK_VALUE(0 <= op && op <= 3, "op: expected 0 (and), 1 (or), 2 (xor) or 3 (andnot), got ", op);
  const at::Device dev = check_bit_list(a, "a");
  TORCH_CHECK_VALUE(b.size() == a.size(), "b: expected ", a.size(), " masks (one per mask of a), got ", b.size());
  for (const auto i : c10::irange(a.size())) {
    TORCH_CHECK_TYPE(b[i].scalar_type() == at::kByte && b[i].dim() == 1 && b[i].is_contiguous(), "b[", i,
                     "]: expected a contiguous 1-D uint8 tensor");
    TORCH_CHECK_VALUE(b[i].sizes() == a[i].sizes() && b[i].device() == dev, "b[", i, "]: shape ", b[i].sizes(),
                      " on ", b[i].device(), " differs from a[", i, "]'s ", a[i].sizes(), " on ", dev);
  }
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<Tensor> out;
  std::vector<BmSeg> table;
  for (const auto i : c10::irange(a.size())) {
    out.push_back(at::empty_like(a[i]));
    const int64_t nb = a[i].numel();
    if (nb == 0) continue;
    const uint8_t* pa = a[i].data_ptr<uint8_t>();
    const uint8_t* pb = b[i].data_ptr<uint8_t>();
    uint8_t* po = out.back().data_ptr<uint8_t>();
    table.push_back(BmSeg{pa, pb, po, nb, 0, static_cast<int64_t>(i), 0,
                          aligned16(pa) && aligned16(pb) && aligned16(po)});
  }
  switch (op) {
    case kAnd: map_launch<kAnd>(table, dev); break;
    case kOr: map_launch<kOr>(table, dev); break;
    case kXor: map_launch<kXor>(table, dev); break;
    default: map_launch<kAndNot>(table, dev); break;
  }
  return out;
}

std::vector<Tensor> bitmask_not_cuda(at::TensorList a, c10::IntArrayRef numel) {
  const at::Device dev = check_bit_list(a, "a");
  TORCH_CHECK_VALUE(numel.size() == a.size(), "numel: expected a list of ", a.size(), " ints");
  for (const auto i : c10::irange(a.size())) {
    TORCH_CHECK_VALUE(numel[i] >= 0 && a[i].numel() == (numel[i] + 7) / 8, "a[", i, "]: ", a[i].numel(),
                      " bytes cannot hold numel[", i, "]=", numel[i], " bits");
  }
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<Tensor> out;
  std::vector<BmSeg> table;
  for (const auto i : c10::irange(a.size())) {
    out.push_back(at::empty_like(a[i]));
    const int64_t nb = a[i].numel();
    if (nb == 0) continue;
    const uint8_t* pa = a[i].data_ptr<uint8_t>();
    uint8_t* po = out.back().data_ptr<uint8_t>();
    const int rem = static_cast<int>(numel[i] % 8);
    table.push_back(BmSeg{pa, nullptr, po, nb, 0, static_cast<int64_t>(i), rem ? (1 << rem) - 1 : 0xFF,
                          aligned16(pa) && aligned16(po)});
  }
  map_launch<kNot>(table, dev);
  return out;
}

Tensor bitmask_count_cuda(at::TensorList bits) {
  const at::Device dev = check_bit_list(bits, "bits");
  const c10::cuda::CUDAGuard guard(dev);
  Tensor out = at::zeros({static_cast<int64_t>(bits.size())}, at::TensorOptions().dtype(at::kLong).device(dev));
  std::vector<BmSeg> table;
  for (const auto i : c10::irange(bits.size())) {
    if (bits[i].numel() == 0) continue;
    const uint8_t* p = bits[i].data_ptr<uint8_t>();
    table.push_back(BmSeg{p, nullptr, nullptr, bits[i].numel(), 0, static_cast<int64_t>(i), 0, aligned16(p)});
  }
  unsigned long long* o = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  bitmask_launch(table, dev, [o](const BmSeg* segs, int nseg, int64_t tiles, cudaStream_t stream, unsigned grid) {
    GK_LAUNCH(bitmask_count_kernel, grid, kThreads, 0, stream, segs, nseg, tiles, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace golden

TORCH_LIBRARY_IMPL(gradkit, CUDA, m) {
  m.impl("golden_topk_and_", &golden::golden_topk_and_cuda);
  m.impl("bitmask_binary", &golden::bitmask_binary_cuda);
  m.impl("bitmask_not", &golden::bitmask_not_cuda);
  m.impl("bitmask_count", &golden::bitmask_count_cuda);
}

}  // namespace gradkit

// CUDA kernels for the param-map family (masked multi-tensor gather/scatter,
// selection encodings, exact top-k select). Semantics: python/gradkit/kernels/reference/parammap.py;
// every op mirrors csrc/cpu/parammap.cpp (same checks, same messages, same TORCH_CHECK_* kinds,
// same rounding of every stored value).
//
// Headers: only c10/cuda/* (stream, guard, launch check) and the toolkit's CUB are used. In
// particular NOT ATen/cuda/CUDAContext.h / ATen/cuda/cub.cuh, which pull in cuSPARSE/cuBLAS
// headers that a CUDA-toolkit-without-math-libs (and the CPU torch wheel) do not have.
// at::cuda::getCurrentCUDAStream() resolves through c10's `namespace at::cuda { using
// namespace c10::cuda; }`, so the same source builds in a real CUDAExtension build and in
// scripts/nvcc_check.sh (compile-only against the CPU wheel's headers).
//
// Conventions for every kernel in this file:
// * launches use the current stream of the tensors' device (a CUDAGuard is set first);
// * 1-D kernels run kThreads = 256 threads per block (kernels that use cub::Block* or
//   shared arrays sized by kThreads REQUIRE exactly that block size; the top-k walk kernel
//   requires exactly kWalkThreads = 1024);
// * all element offsets are int64; grids are capped at 8 blocks/SM and every kernel loops
//   grid-stride over its work items (tiles, chunks or elements), so any grid size is correct;
// * loops that contain __syncthreads / cub::Block* / warp intrinsics have block- (or warp-)
//   uniform trip counts.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
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
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "../checks.h"
#include "../overlap.h"
#include "../segments.h"

namespace gradkit {
namespace {

using at::Tensor;

constexpr int kThreads = 256;  // block size of every kernel except topk_walk_kernel

// ---------------------------------------------------------------------------
// small host helpers
// ---------------------------------------------------------------------------

using gradkit::cuda::sm_count;

// Blocks for `work` independent work items: at most 8 resident 256-thread blocks per SM
// (2048 threads, the sm_90 maximum); kernels loop grid-stride over the rest.
int64_t grid_for(int64_t work, int dev) {
  const int64_t cap = static_cast<int64_t>(sm_count(dev)) * 8;
  return std::max<int64_t>(1, std::min(work, cap));
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Device -> host copy of a few int64 values (synchronises the current stream).
std::vector<int64_t> fetch_i64(const Tensor& t) {
  const Tensor h = t.to(at::kCPU);
  std::vector<int64_t> v(h.numel());
  if (!v.empty()) std::memcpy(v.data(), h.data_ptr<int64_t>(), sizeof(int64_t) * v.size());
  return v;
}

// CUB's two-phase call: query the temp size, allocate it from torch's caching allocator, run.
template <typename In, typename Out>
void exclusive_sum(In in, Out out, int64_t n, const at::Device& dev, cudaStream_t stream) {
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, n, stream));
  const Tensor tmp = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                               at::TensorOptions().dtype(at::kByte).device(dev));
  C10_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(tmp.data_ptr(), bytes, in, out, n, stream));
}

#define GK_DISPATCH_FLOAT(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, __VA_ARGS__)

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ===========================================================================
// gather / scatter
// ===========================================================================
//
// ONE launch covers all segments. The host packs one DevSeg per non-empty segment into a
// pinned buffer behind a 64-byte header and uploads it with ONE async H2D copy (the header's
// first int32 is the out-of-range flag, so the same copy also zeroes it).
//
// Work map: segment s is cut into ceil(count_s / kTile) tiles of kTile consecutive entries
// of its selection; tiles are numbered globally in segment order and DevSeg::first_tile is
// the exclusive prefix of the per-segment tile counts. A block owning global tile t finds
// its segment by binary search (the last s with first_tile[s] <= t; every table entry has
// >= 1 tile, so that s contains t) and handles entries [j0, j1) = [(t - first_tile)*kTile,
// min(count, j0 + kTile)). Blocks loop grid-stride over tiles.
//
// Out-of-range indices (k >= numel as uint64, so negatives too) are never dereferenced:
// the element is skipped and the header flag is set; the host reads the flag after the
// launch (only when some segment has an index) and raises TORCH_CHECK_INDEX.
// The in-place ops (gather_segments(out=), scatter_segments_) write into tensors the caller
// owns, so an out-of-range position must not leave them half-written: when some segment has
// an index, check_kernel first reads every indexed position and sets the flag, and the
// writing kernel, launched after it on the same stream, is gated: each block reads the flag
// before its first write and stops if it is set (the CPU kernel's pre-pass; no extra host
// synchronisation, one more read of the positions). The functional ops write only tensors
// they allocated: gather keeps one launch. Scatter positions must be distinct (a repeat makes the
// writes race and += lose updates), so every scatter with an index runs check_kernel with
// `ascending`: it also flags (bit 2) positions that are not strictly ascending; after the writer
// the host then sorts each indexed segment's positions and raises on a repeat, or, for the gated
// in-place writer (which wrote nothing), launches it again ungated. Sorted positions (ParamMap's)
// cost one read of the positions more than before in the functional scatter, nothing more in place.

constexpr int kVec = 4;                             // elements per vector access
constexpr int64_t kTile = kThreads * 4 * kVec;       // 4096 entries per tile (multiple of kVec)
constexpr int64_t kHeaderBytes = 64;

enum : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
enum : int32_t { kNoIndex = 0, kIdx32 = 1, kIdx64 = 2 };
enum : int32_t {
  kContig = 1,  // flat position == element offset
  kVecOK = 2,   // no index, contiguous, and both sides aligned to kVec elements: vector path
  kSmall = 4,   // numel <= UINT32_MAX: strided offsets use 32-bit div/mod
};

struct DevSeg {
  void* data;           // src (gather) or dst (scatter) base, storage offset applied
  const void* index;    // contiguous int32/int64 positions, or null
  int64_t numel;        // elements of the tensor (bound for indices)
  int64_t count;        // entries in the flat vector
  int64_t flat_off;     // first entry of this segment in the flat vector
  int64_t first_tile;   // global tile number of this segment's first tile
  int32_t dtype;        // kF32 ...
  int32_t index_kind;   // kNoIndex ...
  int32_t ndim;         // collapsed dims, >= 1
  int32_t flags;        // kContig | kVecOK | kSmall
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
};
static_assert(sizeof(DevSeg) % 8 == 0, "DevSeg must keep 8-byte alignment in the packed table");
static_assert(kHeaderBytes % alignof(DevSeg) == 0, "header must keep DevSeg aligned");

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_INTERNAL_ASSERT(false, "gradkit: unexpected segment dtype ", t);
  }
  return kF32;
}

// Row-major flat position -> element offset only depends on the (size, stride) pairs; drop
// size-1 dims and merge an outer dim into the next inner one when stride_outer ==
// stride_inner * size_inner (then i_o*st_o + i_i*st_i == (i_o*size_i + i_i)*st_i).
// Fewer dims = fewer 64-bit div/mods per element on the strided paths.
void collapse_dims(const SegView& v, DevSeg& d) {
  int nd = 0;
  for (int k = 0; k < v.ndim; ++k) {
    if (v.sizes[k] == 1) continue;
    if (nd > 0 && d.strides[nd - 1] == v.strides[k] * v.sizes[k]) {
      d.sizes[nd - 1] *= v.sizes[k];
      d.strides[nd - 1] = v.strides[k];
    } else {
      d.sizes[nd] = v.sizes[k];
      d.strides[nd] = v.strides[k];
      ++nd;
    }
  }
  if (nd == 0) {  // 0-d or all-ones shape: the single element sits at offset 0
    d.sizes[0] = 1;
    d.strides[0] = 1;
    nd = 1;
  }
  d.ndim = nd;
}

struct SegTable {
  Tensor dev;               // keeps the device copy alive until the kernel has run
  const DevSeg* segs = nullptr;
  int* bad = nullptr;
  int nseg = 0;
  int64_t tiles = 0;
  bool any_index = false;
};

// `flat` is the gathered-into / scattered-from flat vector (contiguous, elem size flat_esz).
SegTable upload_table(const std::vector<Segment>& segs, const std::vector<int64_t>& offs, const void* flat,
                      int64_t flat_esz, const at::Device& device) {
  std::vector<int> live;
  for (const auto s : c10::irange(segs.size())) {
    if (segs[s].count > 0) live.push_back(static_cast<int>(s));
  }
  SegTable t;
  t.nseg = static_cast<int>(live.size());
  const int64_t bytes = kHeaderBytes + static_cast<int64_t>(live.size()) * static_cast<int64_t>(sizeof(DevSeg));
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(cuda::kPinnedStaging));
  uint8_t* hp = host.data_ptr<uint8_t>();
  std::memset(hp, 0, bytes);  // header flag = 0, struct padding deterministic
  DevSeg* table = reinterpret_cast<DevSeg*>(hp + kHeaderBytes);
  int64_t tile = 0;
  for (const auto i : c10::irange(live.size())) {
    const Segment& sg = segs[live[i]];
    const SegView& v = sg.view;
    DevSeg& d = table[i];
    d.data = v.data;
    d.numel = v.numel;
    d.count = sg.count;
    d.flat_off = offs[live[i]];
    d.first_tile = tile;
    tile += (sg.count + kTile - 1) / kTile;
    d.dtype = dtype_code(v.dtype);
    if (sg.index.defined()) {
      d.index = sg.index.data_ptr();
      d.index_kind = sg.index.scalar_type() == at::kInt ? kIdx32 : kIdx64;
      t.any_index = true;
    } else {
      d.index = nullptr;
      d.index_kind = kNoIndex;
    }
    collapse_dims(v, d);
    const bool contig = v.contiguous || (d.ndim == 1 && d.strides[0] == 1);
    const int64_t esz = static_cast<int64_t>(c10::elementSize(v.dtype));
    const void* flat_seg = static_cast<const uint8_t*>(flat) + d.flat_off * flat_esz;
    d.flags = 0;
    if (contig) d.flags |= kContig;
    if (contig && d.index_kind == kNoIndex && is_aligned(v.data, kVec * esz) &&
        is_aligned(flat_seg, kVec * flat_esz)) {
      d.flags |= kVecOK;
    }
    if (static_cast<uint64_t>(v.numel) <= 0xffffffffull) d.flags |= kSmall;
  }
  t.tiles = tile;
  t.dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  // Pinned source + non_blocking: one async H2D copy on the current stream; ATen records the
  // pinned block's use on that stream so it is not recycled before the copy ran.
  t.dev.copy_(host, /*non_blocking=*/true);
  uint8_t* dp = t.dev.data_ptr<uint8_t>();
  t.bad = reinterpret_cast<int*>(dp);
  t.segs = reinterpret_cast<const DevSeg*>(dp + kHeaderBytes);
  return t;
}

// The header flag (0 without an indexed segment); raises when a position was out of range.
int32_t check_oob(const SegTable& t) {
  if (!t.any_index) return 0;  // only indexed segments can be out of range
  const Tensor h = t.dev.narrow(0, 0, 4).to(at::kCPU);  // synchronises the stream
  int32_t flag = 0;
  std::memcpy(&flag, h.data_ptr<uint8_t>(), 4);
  TORCH_CHECK_INDEX(!(flag & 1), "index: a position is out of range for its segment");
  return flag;
}

using gradkit::cuda::find_seg;  // the gather/scatter (DevSeg) and top-k (TopkSeg) tables

// Flat row-major position f (< numel) -> element offset: peel dims innermost first.
template <typename U>
__device__ __forceinline__ int64_t strided_off(U f, const DevSeg& d) {
  int64_t off = 0;
  for (int k = d.ndim - 1; k > 0; --k) {
    const U s = static_cast<U>(d.sizes[k]);
    const U q = f / s;
    off += static_cast<int64_t>(f - q * s) * d.strides[k];
    f = q;
  }
  return off + static_cast<int64_t>(f) * d.strides[0];  // f < sizes[0] here
}

__device__ __forceinline__ int64_t elem_off(uint64_t f, const DevSeg& d, int flags) {
  if (flags & kContig) return static_cast<int64_t>(f);
  if (flags & kSmall) return strided_off<uint32_t>(static_cast<uint32_t>(f), d);
  return strided_off<uint64_t>(f, d);
}

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// out (+)= cast(x), rounded exactly like the CPU kernel: D(out + D(x)).
template <typename S, typename D>
__device__ __forceinline__ void gather_put(D& dst, S x, bool acc) {
  const D y = static_cast<D>(x);
  dst = acc ? static_cast<D>(dst + y) : y;
}

// dst (+)= scale * f, rounded exactly like the CPU kernel. __dmul_rn/__dadd_rn keep nvcc
// from contracting into an FMA, which would round differently from the CPU's mul-then-add.
template <typename F, typename D>
__device__ __forceinline__ void scatter_put(D& dst, F f, double scale, bool unit, bool acc) {
  if (acc) {
    dst = static_cast<D>(__dadd_rn(static_cast<double>(dst), __dmul_rn(static_cast<double>(f), scale)));
  } else if constexpr (std::is_same<D, double>::value) {
    dst = __dmul_rn(static_cast<double>(f), scale);
  } else if (unit) {
    dst = static_cast<D>(f);
  } else {
    dst = static_cast<D>(static_cast<float>(__dmul_rn(static_cast<double>(f), scale)));
  }
}

// Entries [j0, j1) of an index-free segment: out[j] (+)= src.flatten()[j].
template <typename S, typename D>
__device__ void gather_dense(const DevSeg& sg, D* __restrict__ out, int64_t j0, int64_t j1, bool acc) {
  const S* __restrict__ src = static_cast<const S*>(sg.data);
  D* __restrict__ o = out + sg.flat_off;
  const int flags = sg.flags;
  if (flags & kVecOK) {
    // j0 is a multiple of kTile (so of kVec) and both bases are kVec-element aligned, so every
    // src + j0 + v*kVec and o + j0 + v*kVec is aligned for one vector access.
    const int64_t nvec = (j1 - j0) / kVec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t j = j0 + v * kVec;
      const Vec<S> a = *reinterpret_cast<const Vec<S>*>(src + j);
      Vec<D> r;
      if (acc) r = *reinterpret_cast<const Vec<D>*>(o + j);
#pragma unroll
      for (int e = 0; e < kVec; ++e) gather_put<S, D>(r.v[e], a.v[e], acc);
      *reinterpret_cast<Vec<D>*>(o + j) = r;
    }
    for (int64_t j = j0 + nvec * kVec + threadIdx.x; j < j1; j += blockDim.x) gather_put<S, D>(o[j], src[j], acc);
  } else {
    for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
      gather_put<S, D>(o[j], src[elem_off(static_cast<uint64_t>(j), sg, flags)], acc);
    }
  }
}

// Entries [j0, j1) of an indexed segment: out[j] (+)= src.flatten()[index[j]].
template <typename S, typename D, typename I>
__device__ void gather_indexed(const DevSeg& sg, D* __restrict__ out, int64_t j0, int64_t j1, bool acc, int* bad) {
  const S* __restrict__ src = static_cast<const S*>(sg.data);
  const I* __restrict__ ix = static_cast<const I*>(sg.index);
  D* __restrict__ o = out + sg.flat_off;
  const int flags = sg.flags;
  const uint64_t n = static_cast<uint64_t>(sg.numel);
  bool oob = false;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(ix[j]));  // negative -> huge
    if (k >= n) {
      oob = true;  // never read src out of bounds; the error is raised after the launch
      continue;
    }
    gather_put<S, D>(o[j], src[elem_off(k, sg, flags)], acc);
  }
  if (oob) *bad = 1;
}

template <typename S, typename D>
__device__ __forceinline__ void gather_seg(const DevSeg& sg, D* out, int64_t j0, int64_t j1, bool acc, int* bad) {
  switch (sg.index_kind) {
    case kIdx32: gather_indexed<S, D, int32_t>(sg, out, j0, j1, acc, bad); break;
    case kIdx64: gather_indexed<S, D, int64_t>(sg, out, j0, j1, acc, bad); break;
    default: gather_dense<S, D>(sg, out, j0, j1, acc); break;
  }
}

// One launch for all segments; out dtype D is uniform, the src dtype is per segment.
template <typename D>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const DevSeg* __restrict__ segs, int nseg, int64_t tiles, D* __restrict__ out, int* bad, bool acc,
                  bool gated) {
  if (gated && *static_cast<volatile int*>(bad) != 0) return;  // check_kernel found a bad position
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const DevSeg& sg = segs[find_seg(segs, nseg, tile)];
    const int64_t j0 = (tile - sg.first_tile) * kTile;
    const int64_t j1 = min64(sg.count, j0 + kTile);
    switch (sg.dtype) {
      case kF32: gather_seg<float, D>(sg, out, j0, j1, acc, bad); break;
      case kF64: gather_seg<double, D>(sg, out, j0, j1, acc, bad); break;
      case kF16: gather_seg<c10::Half, D>(sg, out, j0, j1, acc, bad); break;
      default: gather_seg<c10::BFloat16, D>(sg, out, j0, j1, acc, bad); break;
    }
  }
}

// Entries [j0, j1) of an index-free segment: dst.flatten()[j] (+)= scale * flat[j].
template <typename F, typename D>
__device__ void scatter_dense(const DevSeg& sg, const F* __restrict__ flat, int64_t j0, int64_t j1, double scale,
                              bool unit, bool acc) {
  D* __restrict__ dst = static_cast<D*>(sg.data);
  const F* __restrict__ f = flat + sg.flat_off;
  const int flags = sg.flags;
  if (flags & kVecOK) {  // alignment argument as in gather_dense
    const int64_t nvec = (j1 - j0) / kVec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t j = j0 + v * kVec;
      const Vec<F> a = *reinterpret_cast<const Vec<F>*>(f + j);
      Vec<D> r;
      if (acc) r = *reinterpret_cast<const Vec<D>*>(dst + j);
#pragma unroll
      for (int e = 0; e < kVec; ++e) scatter_put<F, D>(r.v[e], a.v[e], scale, unit, acc);
      *reinterpret_cast<Vec<D>*>(dst + j) = r;
    }
    for (int64_t j = j0 + nvec * kVec + threadIdx.x; j < j1; j += blockDim.x) {
      scatter_put<F, D>(dst[j], f[j], scale, unit, acc);
    }
  } else {
    for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
      scatter_put<F, D>(dst[elem_off(static_cast<uint64_t>(j), sg, flags)], f[j], scale, unit, acc);
    }
  }
}

// Entries [j0, j1) of an indexed segment: dst.flatten()[index[j]] (+)= scale * flat[j].
// Duplicate positions inside one call race (plain read-modify-write, like the CPU kernel
// across its parallel chunks); callers must not rely on them.
template <typename F, typename D, typename I>
__device__ void scatter_indexed(const DevSeg& sg, const F* __restrict__ flat, int64_t j0, int64_t j1, double scale,
                                bool unit, bool acc, int* bad) {
  D* __restrict__ dst = static_cast<D*>(sg.data);
  const F* __restrict__ f = flat + sg.flat_off;
  const I* __restrict__ ix = static_cast<const I*>(sg.index);
  const int flags = sg.flags;
  const uint64_t n = static_cast<uint64_t>(sg.numel);
  bool oob = false;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(ix[j]));
    if (k >= n) {
      oob = true;  // never written; raised after the launch
      continue;
    }
    scatter_put<F, D>(dst[elem_off(k, sg, flags)], f[j], scale, unit, acc);
  }
  if (oob) *bad = 1;
}

template <typename F, typename D>
__device__ __forceinline__ void scatter_seg(const DevSeg& sg, const F* flat, int64_t j0, int64_t j1, double scale,
                                            bool unit, bool acc, int* bad) {
  switch (sg.index_kind) {
    case kIdx32: scatter_indexed<F, D, int32_t>(sg, flat, j0, j1, scale, unit, acc, bad); break;
    case kIdx64: scatter_indexed<F, D, int64_t>(sg, flat, j0, j1, scale, unit, acc, bad); break;
    default: scatter_dense<F, D>(sg, flat, j0, j1, scale, unit, acc); break;
  }
}

// One launch for all segments; flat dtype F is uniform, the dst dtype is per segment.
template <typename F>
__global__ void __launch_bounds__(kThreads) scatter_kernel(const DevSeg* __restrict__ segs, int nseg, int64_t tiles,
                                                           const F* __restrict__ flat, double scale, bool acc,
                                                           int* bad, bool gated) {
  if (gated && *static_cast<volatile int*>(bad) != 0) return;  // check_kernel found a bad position
  const bool unit = scale == 1.0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const DevSeg& sg = segs[find_seg(segs, nseg, tile)];
    const int64_t j0 = (tile - sg.first_tile) * kTile;
    const int64_t j1 = min64(sg.count, j0 + kTile);
    switch (sg.dtype) {
      case kF32: scatter_seg<F, float>(sg, flat, j0, j1, scale, unit, acc, bad); break;
      case kF64: scatter_seg<F, double>(sg, flat, j0, j1, scale, unit, acc, bad); break;
      case kF16: scatter_seg<F, c10::Half>(sg, flat, j0, j1, scale, unit, acc, bad); break;
      default: scatter_seg<F, c10::BFloat16>(sg, flat, j0, j1, scale, unit, acc, bad); break;
    }
  }
}

// Flags of entries [j0, j1) of an indexed segment: kOutOfRange if a position lies outside [0, numel);
// with `ascending`, kNotAscending if some j in [j0, j1) has ix[j] >= ix[j + 1] (j + 1 < count: a tile's last
// position is compared with the next tile's first).
constexpr int kOutOfRange = 1, kNotAscending = 2;
template <typename I>
__device__ int position_flags(const DevSeg& sg, int64_t j0, int64_t j1, bool ascending) {
  const I* __restrict__ ix = static_cast<const I*>(sg.index);
  const uint64_t n = static_cast<uint64_t>(sg.numel);
  bool oob = false, down = false;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    const I v = ix[j];
    oob |= static_cast<uint64_t>(static_cast<int64_t>(v)) >= n;
    if (ascending && j + 1 < sg.count) down |= v >= ix[j + 1];
  }
  return (oob ? kOutOfRange : 0) | (down ? kNotAscending : 0);
}

// ORs into *bad kOutOfRange if an indexed segment holds a position outside [0, numel), and with `ascending`
// (the scatters) kNotAscending if one's positions are not strictly ascending; writes nothing else.
__global__ void __launch_bounds__(kThreads) check_kernel(const DevSeg* __restrict__ segs, int nseg, int64_t tiles,
                                                         int* bad, bool ascending) {
  int f = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const DevSeg& sg = segs[find_seg(segs, nseg, tile)];
    const int64_t j0 = (tile - sg.first_tile) * kTile;
    const int64_t j1 = min64(sg.count, j0 + kTile);
    if (sg.index_kind == kIdx32) f |= position_flags<int32_t>(sg, j0, j1, ascending);
    else if (sg.index_kind == kIdx64) f |= position_flags<int64_t>(sg, j0, j1, ascending);
  }
  if (f) atomicOr(bad, f);
}

// check_kernel over the indexed positions (false: no segment has an index). Before the in-place launches
// (into the caller's tensors), whose writing kernel is then gated on the flag, and before the functional
// scatter (ascending: a repeated position is refused there too).
bool launch_check(const SegTable& t, int64_t grid, cudaStream_t stream, bool ascending) {
  if (!t.any_index) return false;
  GK_LAUNCH(check_kernel, static_cast<unsigned>(grid), kThreads, 0, stream, t.segs, t.nseg, t.tiles, t.bad,
            ascending);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// After a scatter's check found positions that are not strictly ascending: true when some indexed segment
// repeats a position (a sorted copy per segment; this path is for unsorted position lists only).
bool any_repeated(const std::vector<Segment>& segs) {
  for (const auto& sg : segs) {
    if (!sg.index.defined() || sg.count < 2) continue;
    const Tensor s = std::get<0>(sg.index.sort());
    if (s.slice(0, 1).eq(s.slice(0, 0, sg.count - 1)).any().item<bool>()) return true;
  }
  return false;
}

void gather_impl(at::TensorList src_in, const c10::List<std::optional<Tensor>>& index, Tensor& out,
                 bool accumulate, bool in_place) {
  // A caller's out that shares memory with a source (out=x with src=[x], out a view of a gradient being read):
  // the sources are read as they were before the call, as the reference and the CPU kernel read them (blocks
  // run in any order: one block's writes would reach another's reads), so such a source is read from a copy
  // (a new output never overlaps).
  std::vector<Tensor> src_copy;
  at::TensorList src = src_in;
  if (in_place) {
    for (const auto i : c10::irange(src_in.size())) {
      if (spans_meet(src_in[i], {out})) {
        if (src_copy.empty()) src_copy.assign(src_in.begin(), src_in.end());
        src_copy[i] = src_in[i].clone(at::MemoryFormat::Contiguous);
      }
    }
    if (!src_copy.empty()) src = src_copy;
  }
  const auto segs = make_segments(src, index, "src");
  std::vector<int64_t> offs;
  const int64_t total = segment_offsets(segs, &offs);
  check_gather_out(out, total);
  if (total == 0) return;
  TORCH_CHECK_VALUE(out.device() == src[0].device(), "out: on ", out.device(), " but src is on ", src[0].device());
  TORCH_CHECK_VALUE(cuda::on_device(out.device()), "out: expected a CUDA tensor, got one on ", out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  GK_DISPATCH_FLOAT(out.scalar_type(), "gather_out", [&] {
    using D = scalar_t;
    D* o = out.data_ptr<D>();
    const SegTable t = upload_table(segs, offs, o, sizeof(D), out.device());
    const int64_t grid = grid_for(t.tiles, out.device().index());
    const bool gated = in_place && launch_check(t, grid, stream, false);
    GK_LAUNCH(gather_kernel<D>, static_cast<unsigned>(grid), kThreads, 0, stream, t.segs, t.nseg, t.tiles, o, t.bad,
              accumulate, gated);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    check_oob(t);
  });
}

Tensor gather_segments_cuda(at::TensorList src, const c10::List<std::optional<Tensor>>& index,
                            std::optional<at::ScalarType> dtype) {
  const int64_t total = gather_total(src, index);
  const at::ScalarType dt = gather_dtype(src, dtype);
  const at::Device device = src.empty() ? cuda::current_device() : src[0].device();
  Tensor out = at::empty({total}, at::TensorOptions().dtype(dt).device(device));
  gather_impl(src, index, out, false, /*in_place=*/false);
  return out;
}

void gather_segments_out_cuda(at::TensorList src, const c10::List<std::optional<Tensor>>& index,
                              const Tensor& out, bool accumulate) {
  Tensor o = out;
  gather_impl(src, index, o, accumulate, /*in_place=*/true);
}

void scatter_impl(const Tensor& flat, const c10::List<std::optional<Tensor>>& index, at::TensorList dst,
                  double scale, bool accumulate, bool in_place) {
  const auto segs = make_segments(dst, index, "dst");
  std::vector<int64_t> offs;
  const int64_t total = segment_offsets(segs, &offs);
  check_scatter_flat(flat, total);
  if (total == 0) return;
  TORCH_CHECK_VALUE(flat.device() == dst[0].device(), "flat: on ", flat.device(), " but dst is on ",
                    dst[0].device());
  TORCH_CHECK_VALUE(cuda::on_device(flat.device()), "flat: expected a CUDA tensor, got one on ", flat.device());
  const c10::cuda::CUDAGuard guard(flat.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // In place: two destinations sharing an element (the same tensor twice, overlapping views, an expand()ed one)
  // would be written by two blocks at once: refused, naming them, before anything is written (as the CPU
  // kernel); a flat that shares memory with a destination is read as it was before the call, from a copy.
  // The functional scatter writes only the tensors it allocated.
  if (in_place) {
    std::vector<NamedTensor> named;
    for (const auto i : c10::irange(dst.size())) named.push_back({&dst[i], "dst", static_cast<int64_t>(i), true});
    check_no_overlap(named);
  }
  const Tensor f = in_place && spans_meet(flat, dst) ? flat.clone(at::MemoryFormat::Contiguous) : flat.contiguous();
  GK_DISPATCH_FLOAT(f.scalar_type(), "scatter_flat", [&] {
    using F = scalar_t;
    const F* fp = f.data_ptr<F>();
    const SegTable t = upload_table(segs, offs, fp, sizeof(F), f.device());
    const int64_t grid = grid_for(t.tiles, f.device().index());
    // The check runs before every scatter with an index (the functional one too): it also flags positions that
    // are not strictly ascending, which may repeat one (racing writes, lost += updates). The in-place writer is
    // gated on the flag; the functional one writes only its own new tensors.
    const bool checked = launch_check(t, grid, stream, true);
    const bool gated = in_place && checked;
    GK_LAUNCH(scatter_kernel<F>, static_cast<unsigned>(grid), kThreads, 0, stream, t.segs, t.nseg, t.tiles, fp,
              scale, accumulate, t.bad, gated);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (check_oob(t) & kNotAscending) {  // unsorted positions: refused if one repeats
      TORCH_CHECK_VALUE(!any_repeated(segs), "index: a position occurs more than once in a segment; scatter "
                        "positions must be distinct");
      if (gated) {  // distinct after all: the gated writer wrote nothing, so write now (no position is out of range)
        GK_LAUNCH(scatter_kernel<F>, static_cast<unsigned>(grid), kThreads, 0, stream, t.segs, t.nseg, t.tiles, fp,
                  scale, accumulate, t.bad, false);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
}

std::vector<Tensor> scatter_segments_cuda(const Tensor& flat, const c10::List<std::optional<Tensor>>& index,
                                          c10::IntArrayRef numel, double scale) {
  check_numel_list(numel, index);
  std::vector<Tensor> outs;
  outs.reserve(numel.size());
  for (const auto i : c10::irange(numel.size())) {
    const int64_t n = numel[i];
    const auto ix = index.get(i);
    // Only indexed segments leave unselected positions: those need zeros; the others are
    // fully overwritten by the kernel.
    if (ix.has_value() && ix->defined()) {
      outs.push_back(at::zeros({n}, flat.options()));
    } else {
      outs.push_back(at::empty({n}, flat.options()));
    }
  }
  // `flat * scale` in flat's opmath type (float32 with a float32 scale unless flat is float64), like
  // the reference and the CPU kernel: the product of two floats is exact in double (scatter_put).
  const double fscale =
      flat.scalar_type() == at::kDouble ? scale : static_cast<double>(static_cast<float>(scale));
  scatter_impl(flat, index, outs, fscale, false, /*in_place=*/false);
  return outs;
}

void scatter_segments__cuda(const Tensor& flat, const c10::List<std::optional<Tensor>>& index,
                            at::TensorList dst, double scale, bool accumulate) {
  scatter_impl(flat, index, dst, scale, accumulate, /*in_place=*/true);
}

// ===========================================================================
// selection encodings
// ===========================================================================
//
// Both decoders see the input as 32-bit "flag words": word w holds the flags of elements
// [32w, 32w + 32), bit b = element 32w + b (for a packed bitmask that is exactly the
// little-endian uint32 at byte 4w; for a bool mask it is built from 32 bytes).
//
// Two-pass stream compaction, one block per chunk of kChunkWords = 1024 words:
//   count:  counts[c] = popcount of chunk c          (+ the bitmask tail check)
//   scan:   offsets = exclusive_sum(counts[0..nchunks]) with counts[nchunks] = 0,
//           so offsets[nchunks] = total; total (and the tail flag) come back in ONE D2H copy
//   write:  per round of 256 words (8192 elements): exclusive BlockScan of per-thread
//           popcounts gives each thread its first slot; threads stage uint16 element offsets
//           (< 8192) in shared memory in (thread, bit) = ascending element order, then the
//           block writes them out coalesced at offsets[c] + running round total.

constexpr int kRounds = 4;
constexpr int64_t kChunkWords = static_cast<int64_t>(kThreads) * kRounds;

// 4 bool bytes (as one little-endian uint32) -> 4 bits, bit b = (byte b != 0).
__device__ __forceinline__ uint32_t nib4(uint32_t x) {
  const uint32_t m = __vcmpne4(x, 0u);  // 0xff in every nonzero byte
  return (m & 0x1u) | ((m >> 7) & 0x2u) | ((m >> 14) & 0x4u) | ((m >> 21) & 0x8u);
}

struct MaskLoader {
  const uint8_t* m;
  int64_t n;
  bool aligned16;  // m is 16-byte aligned: full words load as two uint4
  __device__ __forceinline__ uint32_t load(int64_t w, bool* /*bad*/) const {
    const int64_t e0 = w * 32;
    if (aligned16 && e0 + 32 <= n) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(m + e0));
      const uint4 b = __ldg(reinterpret_cast<const uint4*>(m + e0 + 16));
      return nib4(a.x) | (nib4(a.y) << 4) | (nib4(a.z) << 8) | (nib4(a.w) << 12) | (nib4(b.x) << 16) |
             (nib4(b.y) << 20) | (nib4(b.z) << 24) | (nib4(b.w) << 28);
    }
    uint32_t r = 0;
    const int lim = static_cast<int>(min64(32, n - e0));
    for (int b = 0; b < lim; ++b) r |= static_cast<uint32_t>(m[e0 + b] != 0) << b;
    return r;
  }
};

struct BitsLoader {
  const uint8_t* p;
  int64_t nbytes;
  int64_t n;      // numel: bits at positions >= n must be zero
  bool aligned4;  // p is 4-byte aligned: full words load as one uint32
  __device__ __forceinline__ uint32_t load(int64_t w, bool* bad) const {
    const int64_t b0 = w * 4;
    uint32_t raw = 0;
    if (aligned4 && b0 + 4 <= nbytes) {
      raw = __ldg(reinterpret_cast<const unsigned int*>(p + b0));
    } else {
      for (int i = 0; i < 4 && b0 + i < nbytes; ++i) raw |= static_cast<uint32_t>(p[b0 + i]) << (8 * i);
    }
    const int64_t valid = n - w * 32;  // >= 1 for every word the kernels load
    const uint32_t keep = valid >= 32 ? 0xffffffffu : ((1u << valid) - 1u);
    if (raw & ~keep) *bad = true;
    return raw & keep;
  }
};

template <typename L>
__global__ void __launch_bounds__(kThreads)
    compact_count_kernel(L ld, int64_t nwords, int64_t nchunks, int64_t* __restrict__ counts, int64_t* flag) {
  using BR = cub::BlockReduce<int, kThreads>;
  __shared__ typename BR::TempStorage tmp;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    int cnt = 0;
    bool bad = false;
    for (int r = 0; r < kRounds; ++r) {
      const int64_t w = c * kChunkWords + r * kThreads + threadIdx.x;
      if (w < nwords) cnt += __popc(ld.load(w, &bad));
    }
    if (bad) *flag = 1;
    const int tot = BR(tmp).Sum(cnt);
    if (threadIdx.x == 0) counts[c] = tot;
    __syncthreads();  // tmp is reused by the next chunk
  }
}

template <typename L, typename I>
__global__ void __launch_bounds__(kThreads) compact_write_kernel(L ld, int64_t nwords, int64_t nchunks,
                                                                 const int64_t* __restrict__ offsets,
                                                                 I* __restrict__ out) {
  using BS = cub::BlockScan<int, kThreads>;
  __shared__ typename BS::TempStorage tmp;
  __shared__ uint16_t stage[kThreads * 32];  // one round: 256 words * 32 elements, offsets < 8192
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    int64_t base = offsets[c];
    for (int r = 0; r < kRounds; ++r) {
      const int64_t w0 = c * kChunkWords + r * kThreads;  // first word of this round
      if (w0 >= nwords) break;                           // block-uniform
      const int64_t w = w0 + threadIdx.x;
      bool bad = false;
      uint32_t word = w < nwords ? ld.load(w, &bad) : 0u;
      int q = 0, tot = 0;
      BS(tmp).ExclusiveSum(__popc(word), q, tot);
      while (word) {
        const int b = __ffs(word) - 1;
        stage[q++] = static_cast<uint16_t>(threadIdx.x * 32 + b);
        word &= word - 1;
      }
      __syncthreads();
      const int64_t e0 = w0 * 32;
      for (int i = threadIdx.x; i < tot; i += kThreads) out[base + i] = static_cast<I>(e0 + stage[i]);
      base += tot;
      __syncthreads();  // stage and tmp are reused by the next round
    }
  }
}

// Runs count + scan, returns {total, tail_flag}; buf must stay alive for the write pass.
template <typename L>
std::pair<int64_t, bool> compact_count(const L& ld, int64_t nwords, int64_t nchunks, Tensor& buf,
                                       const at::Device& dev, cudaStream_t stream) {
  // buf: counts[0..nchunks] | offsets[0..nchunks] | flag ; counts[nchunks] stays 0.
  buf = at::zeros({2 * nchunks + 3}, at::TensorOptions().dtype(at::kLong).device(dev));
  int64_t* counts = buf.data_ptr<int64_t>();
  int64_t* offsets = counts + nchunks + 1;
  int64_t* flag = counts + 2 * nchunks + 2;
  GK_LAUNCH(compact_count_kernel<L>, static_cast<unsigned>(grid_for(nchunks, dev.index())), kThreads, 0, stream, ld,
            nwords, nchunks, counts, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  exclusive_sum(counts, offsets, nchunks + 1, dev, stream);
  const auto v = fetch_i64(buf.narrow(0, 2 * nchunks + 1, 2));  // offsets[nchunks], flag
  return {v[0], v[1] != 0};
}

template <typename L>
Tensor compact_write(const L& ld, int64_t nwords, int64_t nchunks, const Tensor& buf, int64_t total,
                     at::ScalarType dtype, const at::Device& dev, cudaStream_t stream) {
  Tensor out = at::empty({total}, at::TensorOptions().dtype(dtype).device(dev));
  if (total == 0) return out;
  const int64_t* offsets = buf.data_ptr<int64_t>() + nchunks + 1;
  const unsigned grid = static_cast<unsigned>(grid_for(nchunks, dev.index()));
  if (dtype == at::kInt) {
    GK_LAUNCH((compact_write_kernel<L, int32_t>), grid, kThreads, 0, stream, ld, nwords, nchunks, offsets,
              out.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    GK_LAUNCH((compact_write_kernel<L, int64_t>), grid, kThreads, 0, stream, ld, nwords, nchunks, offsets,
              out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

Tensor mask_to_indices_cuda(const Tensor& mask, at::ScalarType dtype) {
  check_bool_mask(mask);
  check_index_dtype(dtype, mask.numel());
  const c10::cuda::CUDAGuard guard(mask.device());
  const Tensor m = mask.contiguous();
  const int64_t n = m.numel();
  if (n == 0) return at::empty({0}, at::TensorOptions().dtype(dtype).device(m.device()));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const MaskLoader ld{p, n, is_aligned(p, 16)};
  const int64_t nwords = (n + 31) / 32;
  const int64_t nchunks = (nwords + kChunkWords - 1) / kChunkWords;
  Tensor buf;
  const auto res = compact_count(ld, nwords, nchunks, buf, m.device(), stream);
  return compact_write(ld, nwords, nchunks, buf, res.first, dtype, m.device(), stream);
}

Tensor bitmask_to_indices_cuda(const Tensor& bits, int64_t numel, at::ScalarType dtype) {
  const int64_t nbytes = check_bitmask(bits, numel, dtype);
  const c10::cuda::CUDAGuard guard(bits.device());
  if (numel == 0) return at::empty({0}, at::TensorOptions().dtype(dtype).device(bits.device()));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor b = bits.contiguous();
  const uint8_t* p = b.data_ptr<uint8_t>();
  const BitsLoader ld{p, nbytes, numel, is_aligned(p, 4)};
  const int64_t nwords = (numel + 31) / 32;
  const int64_t nchunks = (nwords + kChunkWords - 1) / kChunkWords;
  Tensor buf;
  const auto res = compact_count(ld, nwords, nchunks, buf, b.device(), stream);
  TORCH_CHECK_VALUE(!res.second, "bits: bits are set beyond numel=", numel);
  return compact_write(ld, nwords, nchunks, buf, res.first, dtype, b.device(), stream);
}

// Thread per flag word w: output bytes [4w, 4w + 4) = the word, little-endian. `out` is a
// fresh allocation (storage offset 0, caching-allocator alignment >= 512 B), so a full word
// store at byte 4w is 4-byte aligned.
__global__ void __launch_bounds__(kThreads)
    pack_bitmask_kernel(MaskLoader ld, int64_t nwords, int64_t nbytes, uint8_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < nwords; w += stride) {
    bool unused = false;
    const uint32_t x = ld.load(w, &unused);
    const int64_t b0 = w * 4;
    if (b0 + 4 <= nbytes) {
      *reinterpret_cast<uint32_t*>(out + b0) = x;
    } else {
      for (int i = 0; i < 4 && b0 + i < nbytes; ++i) out[b0 + i] = static_cast<uint8_t>(x >> (8 * i));
    }
  }
}

Tensor pack_bitmask_cuda(const Tensor& mask) {
  check_bool_mask(mask);
  const c10::cuda::CUDAGuard guard(mask.device());
  const Tensor m = mask.contiguous();
  const int64_t n = m.numel(), nbytes = (n + 7) / 8;
  Tensor out = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).device(m.device()));
  if (n == 0) return out;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const MaskLoader ld{p, n, is_aligned(p, 16)};
  const int64_t nwords = (n + 31) / 32;
  const int64_t grid = grid_for((nwords + kThreads - 1) / kThreads, m.device().index());
  GK_LAUNCH(pack_bitmask_kernel, static_cast<unsigned>(grid), kThreads, 0, at::cuda::getCurrentCUDAStream(), ld, nwords,
            nbytes, out.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ===========================================================================
// exact top-k select (radix select on order-preserving integer keys)
// ===========================================================================
//
// topk_select and topk_select_segments run the same code (topk_impl): topk_select is the
// one-segment case, so both share every kernel, check order and message.
//
// Segments (no concatenated copy of the scores is ever made). The input is a list of
// contiguous score tensors of ONE float dtype, each with an optional contiguous bool `active`
// of the same numel. Element j of segment s has the global position pos_off[s] + j, where
// pos_off is the exclusive prefix of the segments' numels in list order, i.e. its position in
// the (never materialised) concatenation of the flattened scores. The host packs one TopkSeg
// per NON-EMPTY segment, in list order, into a pinned buffer and uploads it with one async H2D
// copy. Every segment is cut into ceil(n_s / kSelChunk) chunks of kSelChunk consecutive
// elements, so a chunk never straddles two segments; chunks are numbered globally in segment
// order and TopkSeg::first_tile is the exclusive prefix of the per-segment chunk counts
// (every table entry has >= 1 chunk, so find_seg maps a global chunk to its segment as for
// the gather table). Consequently ascending global chunk number == ascending global position,
// which is the only ordering property the position-ordered write pass relies on.
// The stats and histogram passes hand out work in units of kUnit = kThreads * kHistItems =
// 1024 elements (kUnitsPerChunk units per chunk, unit u lies in chunk u / kUnitsPerChunk);
// units past the end of a segment's last (partial) chunk are skipped (block- / warp-uniformly).
// Finer units than chunks keep small inputs spread over many blocks.
//
// key(x): float/half/bf16 -> uint32 of the float, double -> uint64; -0.0 is first mapped to
// +0.0; then positives get the sign bit set and negatives are bit-inverted, so unsigned key
// order == float order (NaN is rejected before).
//
// Validation: one stats pass counts the active scores and the active NaNs of all segments
// into ws[kWsActive], ws[kWsNaN]; ONE device->host copy brings both back (the only sync of
// the op); the NaN and k checks run on the host before any select kernel is launched.
//
// Radix select for the k-th largest key among the active elements (over all segments),
// most significant digit first, with no host round trip between passes. Device state (ws,
// int64 words):
//   prefix/mask: the digits of the k-th key fixed so far; need: how many of the elements
//   whose key matches `prefix` under `mask` are still to be taken (1 <= need <= #matching).
// Pass p (digit = bits [shift, shift + width) of the key):
//   hist:  every block builds a shared-memory histogram of the digit over active elements
//          whose key matches prefix (shared atomics, warp-aggregated with __match_any_sync),
//          then adds its nonzero bins to the global histogram (uint64 atomics);
//   walk:  one block scans the bins from the largest digit down: the digit d where the count
//          of matching keys with a larger digit (`above`) is < need <= above + hist[d] is the
//          k-th key's digit; need -= above, prefix |= d << shift. It also zeroes the histogram.
// uint32 keys: 3 passes of 11/11/10 bits (2048-bin histograms, 8 KB shared);
// uint64 keys: 5 passes of 13/13/13/13/12 bits (8192 bins, 32 KB shared).
// Afterwards kth = prefix exactly and #(keys > kth) = k - need (every key > kth was counted
// in `above` of the pass where its digits first exceed kth's). Pass 0 starts with need = k,
// and 1 <= k <= #active holds (k == 0 returns before any select kernel), so the walk's bin
// always exists.
//
// Stable select: element j (global position) is taken iff key > kth, or key == kth and fewer
// than `need` keys == kth precede it. Its output slot is GT(j) + min(EQ(j), need), where GT/EQ
// count active keys > kth / == kth at global positions < j: that is exactly the number of
// taken elements before j, so the slots are 0..k-1 in ascending global position order.
// GT/EQ come from per-chunk counts (count kernel) -> exclusive CUB scans over the global
// chunk numbers (= position order, see above) -> per-round block scans (write kernel).

constexpr int kWalkThreads = 1024;
constexpr int kHistItems = 4;  // elements per thread per work unit in the stats / histogram passes
constexpr int kSelItems = 4;   // consecutive elements per thread per round in the select passes
constexpr int kSelRounds = 8;
constexpr int64_t kSelChunk = static_cast<int64_t>(kThreads) * kSelItems * kSelRounds;  // 8192
constexpr int64_t kUnit = static_cast<int64_t>(kThreads) * kHistItems;                  // 1024
constexpr int64_t kUnitsPerChunk = kSelChunk / kUnit;                                   // 8
static_assert(kSelChunk % kUnit == 0, "a chunk must split into whole stats/histogram units");
// Histogram blocks count in uint32 shared bins: the host gives no block more than
// kMaxUnitsPerBlock units, i.e. 2^30 elements, so no bin can overflow.
constexpr int64_t kMaxUnitsPerBlock = int64_t(1) << 20;

// ws layout (int64 words, read/written as unsigned long long)
enum : int { kWsActive = 0, kWsNaN = 1, kWsPrefix = 2, kWsMask = 3, kWsNeed = 4, kWsFound = 5, kWsHist = 8 };

// One non-empty segment of a top-k call (device table entry).
struct TopkSeg {
  const void* scores;     // contiguous scores, the op's one float dtype
  const uint8_t* active;  // contiguous bool bytes (0 = inactive), or null = all active
  int64_t n;              // elements, >= 1
  int64_t pos_off;        // global position of element 0 (numels of all earlier segments)
  int64_t first_tile;     // global number of this segment's first kSelChunk chunk
};
static_assert(sizeof(TopkSeg) % 8 == 0, "TopkSeg must keep 8-byte alignment in the packed table");

// Global chunk c resolved to its segment: elements [j0, min(n, j0 + kSelChunk)) of it.
template <typename T>
struct TopkChunk {
  const T* s;
  const uint8_t* act;
  int64_t n;
  int64_t pos_off;
  int64_t j0;  // first local element of the chunk
};

template <typename T>
__device__ __forceinline__ TopkChunk<T> topk_chunk(const TopkSeg* __restrict__ segs, int nseg, int64_t c) {
  const TopkSeg& sg = segs[find_seg(segs, nseg, c)];
  return {static_cast<const T*>(sg.scores), sg.active, sg.n, sg.pos_off, (c - sg.first_tile) * kSelChunk};
}

template <typename K>
struct KeyOf;
template <>
struct KeyOf<uint32_t> {
  template <typename T>
  __device__ __forceinline__ static uint32_t get(T v) {
    float x = static_cast<float>(v);
    if (x == 0.0f) x = 0.0f;
    const uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
};
template <>
struct KeyOf<uint64_t> {
  template <typename T>
  __device__ __forceinline__ static uint64_t get(T v) {
    double x = static_cast<double>(v);
    if (x == 0.0) x = 0.0;
    const uint64_t u = static_cast<uint64_t>(__double_as_longlong(x));
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  }
};

template <typename T>
using acc_of = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// ws[kWsActive] += #active scores, ws[kWsNaN] += #active scores that are NaN (like the CPU
// kernel, inactive scores are not inspected). Blocks loop grid-stride over units.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_stats_kernel(const TopkSeg* __restrict__ segs, int nseg, int64_t units, unsigned long long* ws) {
  using BR = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename BR::TempStorage tmp;
  unsigned long long cnt = 0, nan = 0;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const TopkChunk<T> ch = topk_chunk<T>(segs, nseg, u / kUnitsPerChunk);
    const int64_t base = ch.j0 + (u % kUnitsPerChunk) * kUnit;
#pragma unroll
    for (int i = 0; i < kHistItems; ++i) {
      const int64_t j = base + static_cast<int64_t>(i) * kThreads + threadIdx.x;  // coalesced
      if (j >= ch.n || (ch.act != nullptr && ch.act[j] == 0)) continue;
      const acc_of<T> v = static_cast<acc_of<T>>(ch.s[j]);
      nan += (v != v);
      ++cnt;
    }
  }
  const unsigned long long tot = BR(tmp).Sum(cnt);
  __syncthreads();  // tmp is reused
  const unsigned long long tot_nan = BR(tmp).Sum(nan);
  if (threadIdx.x == 0) {
    if (tot != 0) atomicAdd(&ws[kWsActive], tot);
    if (tot_nan != 0) atomicAdd(&ws[kWsNaN], tot_nan);
  }
}

template <typename T, typename K, int BITS>
__global__ void __launch_bounds__(kThreads)
    topk_hist_kernel(const TopkSeg* __restrict__ segs, int nseg, int64_t units,
                     const unsigned long long* __restrict__ ws, int shift, int width,
                     unsigned long long* __restrict__ hist) {
  constexpr int kBins = 1 << BITS;
  // uint32 bins: the host sizes the grid so that no block sees more than 2^30 elements.
  __shared__ unsigned int sh[kBins];
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  const K prefix = static_cast<K>(ws[kWsPrefix]);
  const K pmask = static_cast<K>(ws[kWsMask]);
  const K dmask = (static_cast<K>(1) << width) - 1;
  const int lane = threadIdx.x & 31;
  // Each warp owns 32*kHistItems consecutive elements of a unit; `base` is warp-uniform (u is
  // block-uniform), so the skip below and the __ballot_sync over the full warp are legal.
  const int64_t warp_off = static_cast<int64_t>(threadIdx.x >> 5) * 32 * kHistItems;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const TopkChunk<T> ch = topk_chunk<T>(segs, nseg, u / kUnitsPerChunk);
    const int64_t base = ch.j0 + (u % kUnitsPerChunk) * kUnit + warp_off;
    if (base >= ch.n) continue;  // past the segment's end: the whole warp skips
    K key[kHistItems];
    bool take[kHistItems];
#pragma unroll
    for (int i = 0; i < kHistItems; ++i) {
      const int64_t j = base + i * 32 + lane;
      take[i] = j < ch.n && (ch.act == nullptr || ch.act[j] != 0);
      key[i] = take[i] ? KeyOf<K>::get(ch.s[j]) : K(0);
      take[i] = take[i] && (key[i] & pmask) == prefix;
    }
#pragma unroll
    for (int i = 0; i < kHistItems; ++i) {
      const unsigned d = static_cast<unsigned>((key[i] >> shift) & dmask);
      const unsigned part = __ballot_sync(0xffffffffu, take[i]);
      if (take[i]) {
        // One shared atomic per distinct digit in the warp (skewed data hits few bins).
        const unsigned peers = __match_any_sync(part, d);
        if (lane == __ffs(peers) - 1) atomicAdd(&sh[d], static_cast<unsigned>(__popc(peers)));
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    if (sh[i] != 0) atomicAdd(&hist[i], static_cast<unsigned long long>(sh[i]));
  }
}

// Exactly kWalkThreads threads, one block. Thread t owns the P bins with descending rank
// t*P .. t*P+P-1 (bin = kBins-1-rank), so an exclusive block scan of per-thread sums gives,
// for each bin, the count of matching keys in larger bins.
template <int BITS>
__global__ void __launch_bounds__(kWalkThreads)
    topk_walk_kernel(unsigned long long* ws, unsigned long long* __restrict__ hist, int pass, int shift, int width,
                     unsigned long long k) {
  constexpr int kBins = 1 << BITS;
  constexpr int P = kBins / kWalkThreads;
  static_assert(kBins % kWalkThreads == 0, "bins must split evenly over the walk block");
  using BS = cub::BlockScan<unsigned long long, kWalkThreads>;
  __shared__ typename BS::TempStorage tmp;
  const unsigned long long need = pass == 0 ? k : ws[kWsNeed];
  const unsigned long long prefix = ws[kWsPrefix], pmask = ws[kWsMask];  // 0 before pass 0
  unsigned long long c[P];
  unsigned long long local = 0;
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int bin = kBins - 1 - (static_cast<int>(threadIdx.x) * P + i);
    c[i] = hist[bin];
    hist[bin] = 0;  // ready for the next pass (each bin is owned by exactly one thread)
    local += c[i];
  }
  unsigned long long above = 0;
  BS(tmp).ExclusiveSum(local, above);
  __syncthreads();  // every thread has read ws[] before the owner of the digit writes it
#pragma unroll
  for (int i = 0; i < P; ++i) {
    if (above < need && above + c[i] >= need) {  // exactly one bin satisfies this
      const unsigned long long bin = kBins - 1 - (static_cast<int>(threadIdx.x) * P + i);
      ws[kWsPrefix] = prefix | (bin << shift);
      ws[kWsMask] = pmask | (((1ull << width) - 1ull) << shift);
      ws[kWsNeed] = need - above;
      ws[kWsFound] += 1;
    }
    above += c[i];
  }
}

// gt[c], eq[c] = #active keys > kth / == kth in global chunk c.
template <typename T, typename K>
__global__ void __launch_bounds__(kThreads)
    topk_count_kernel(const TopkSeg* __restrict__ segs, int nseg, int64_t nchunks,
                      const unsigned long long* __restrict__ ws, int64_t* __restrict__ gt,
                      int64_t* __restrict__ eq) {
  using BR = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename BR::TempStorage tmp;
  const K kth = static_cast<K>(ws[kWsPrefix]);
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const TopkChunk<T> ch = topk_chunk<T>(segs, nseg, c);
    // (gt << 32) | eq: a chunk has 8192 elements, so neither half can carry.
    unsigned long long packed = 0;
    for (int i = 0; i < kSelItems * kSelRounds; ++i) {
      const int64_t j = ch.j0 + static_cast<int64_t>(i) * kThreads + threadIdx.x;  // coalesced
      if (j < ch.n && (ch.act == nullptr || ch.act[j] != 0)) {
        const K key = KeyOf<K>::get(ch.s[j]);
        packed += key > kth ? (1ull << 32) : (key == kth ? 1ull : 0ull);
      }
    }
    const unsigned long long tot = BR(tmp).Sum(packed);
    if (threadIdx.x == 0) {
      gt[c] = static_cast<int64_t>(tot >> 32);
      eq[c] = static_cast<int64_t>(tot & 0xffffffffull);
    }
    __syncthreads();  // tmp is reused by the next chunk
  }
}

// G[c], E[c]: exclusive prefix sums of gt/eq over global chunk numbers (= position order).
// Thread t of round r owns the kSelItems consecutive elements starting at local element
// j0 + r*kThreads*kSelItems + t*kSelItems of the chunk, so a block scan over threads follows
// position order; element j of the segment is written as global position pos_off + j.
template <typename T, typename K>
__global__ void __launch_bounds__(kThreads)
    topk_write_kernel(const TopkSeg* __restrict__ segs, int nseg, int64_t nchunks,
                      const unsigned long long* __restrict__ ws, const int64_t* __restrict__ G,
                      const int64_t* __restrict__ E, int64_t* __restrict__ out, int64_t k) {
  using BS = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename BS::TempStorage tmp;
  const K kth = static_cast<K>(ws[kWsPrefix]);
  const int64_t need = static_cast<int64_t>(ws[kWsNeed]);
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const TopkChunk<T> ch = topk_chunk<T>(segs, nseg, c);
    int64_t run_g = G[c], run_q = E[c];
    for (int r = 0; r < kSelRounds; ++r) {
      const int64_t jr = ch.j0 + static_cast<int64_t>(r) * kThreads * kSelItems;
      if (jr >= ch.n) break;  // block-uniform
      const int64_t jt = jr + static_cast<int64_t>(threadIdx.x) * kSelItems;
      int cls[kSelItems];  // 2: key > kth, 1: key == kth, 0: inactive / smaller / past n
      unsigned long long packed = 0;  // (gt << 32) | eq over this thread's items (<= 4 each)
#pragma unroll
      for (int i = 0; i < kSelItems; ++i) {
        const int64_t j = jt + i;
        cls[i] = 0;
        if (j < ch.n && (ch.act == nullptr || ch.act[j] != 0)) {
          const K key = KeyOf<K>::get(ch.s[j]);
          cls[i] = key > kth ? 2 : (key == kth ? 1 : 0);
        }
        packed += cls[i] == 2 ? (1ull << 32) : (cls[i] == 1 ? 1ull : 0ull);
      }
      unsigned long long pre = 0, agg = 0;  // round totals <= 1024 per half: no carry
      BS(tmp).ExclusiveSum(packed, pre, agg);
      int64_t gb = run_g + static_cast<int64_t>(pre >> 32);
      int64_t qb = run_q + static_cast<int64_t>(pre & 0xffffffffull);
#pragma unroll
      for (int i = 0; i < kSelItems; ++i) {
        if (cls[i] == 2) {
          const int64_t pos = gb + (qb < need ? qb : need);
          if (pos < k) out[pos] = ch.pos_off + jt + i;  // always true by the invariant; guards memory
          ++gb;
        } else if (cls[i] == 1) {
          if (qb < need && gb + qb < k) out[gb + qb] = ch.pos_off + jt + i;
          ++qb;
        }
      }
      run_g += static_cast<int64_t>(agg >> 32);
      run_q += static_cast<int64_t>(agg & 0xffffffffull);
      __syncthreads();  // tmp is reused by the next round
    }
  }
}

// Radix passes + stable select over the uploaded table; 1 <= k <= #active (checked on the host).
template <typename T, typename K>
void topk_run(const TopkSeg* segs, int nseg, int64_t nchunks, int64_t k, Tensor& ws, Tensor& out,
              const at::Device& dev, cudaStream_t stream) {
  constexpr int kKeyBits = static_cast<int>(sizeof(K) * 8);
  constexpr int kBits = sizeof(K) == 4 ? 11 : 13;
  constexpr int kPasses = (kKeyBits + kBits - 1) / kBits;
  unsigned long long* w = reinterpret_cast<unsigned long long*>(ws.data_ptr<int64_t>());
  unsigned long long* hist = w + kWsHist;
  const int di = dev.index();
  // Histogram grid: enough blocks to fill the GPU, and at least ceil(units / kMaxUnitsPerBlock)
  // so that a block (which gets at most ceil(units / grid) units) cannot overflow its uint32
  // shared bins.
  const int64_t units = nchunks * kUnitsPerChunk;
  const int64_t hist_grid =
      std::min(units, std::max(grid_for(units, di), (units + kMaxUnitsPerBlock - 1) / kMaxUnitsPerBlock));
  for (int p = 0; p < kPasses; ++p) {
    const int shift = std::max(0, kKeyBits - kBits * (p + 1));
    const int width = std::min(kBits, kKeyBits - kBits * p);
    GK_LAUNCH((topk_hist_kernel<T, K, kBits>), static_cast<unsigned>(hist_grid), kThreads, 0, stream, segs, nseg, units,
              w, shift, width, hist);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    GK_LAUNCH(topk_walk_kernel<kBits>, 1, kWalkThreads, 0, stream, w, hist, p, shift, width,
              static_cast<unsigned long long>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Tensor sel = at::empty({4 * nchunks}, at::TensorOptions().dtype(at::kLong).device(dev));
  int64_t* gt = sel.data_ptr<int64_t>();
  int64_t* eq = gt + nchunks;
  int64_t* G = gt + 2 * nchunks;
  int64_t* E = gt + 3 * nchunks;
  const unsigned grid = static_cast<unsigned>(grid_for(nchunks, di));
  GK_LAUNCH((topk_count_kernel<T, K>), grid, kThreads, 0, stream, segs, nseg, nchunks, w, gt, eq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  exclusive_sum(gt, G, nchunks, dev, stream);
  exclusive_sum(eq, E, nchunks, dev, stream);
  GK_LAUNCH((topk_write_kernel<T, K>), grid, kThreads, 0, stream, segs, nseg, nchunks, w, G, E, out.data_ptr<int64_t>(),
            k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One score tensor of a top-k call, already validated: contiguous, on the op's CUDA device,
// the op's one float dtype; `active` undefined (= all active) or a contiguous bool tensor of
// the same numel on the same device. The caller keeps these tensors alive for the call.
struct TopkPart {
  Tensor scores;
  Tensor active;
};

// Shared body of topk_select / topk_select_segments, after the op-specific argument checks
// (which include k >= 0 and the "no scores at all" bound). Does the NaN and k <= #active
// checks (one D2H sync) and the select; returns the ascending global positions.
Tensor topk_impl(const std::vector<TopkPart>& parts, at::ScalarType dtype, int64_t k, const at::Device& dev) {
  const c10::cuda::CUDAGuard guard(dev);
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(dev);
  // Table of the non-empty segments in list order (see the section comment).
  std::vector<TopkSeg> table;
  table.reserve(parts.size());
  int64_t pos = 0, nchunks = 0;
  for (const TopkPart& p : parts) {
    const int64_t n = p.scores.numel();
    if (n > 0) {
      const uint8_t* act =
          p.active.defined() ? reinterpret_cast<const uint8_t*>(p.active.data_ptr<bool>()) : nullptr;
      table.push_back(TopkSeg{p.scores.data_ptr(), act, n, pos, nchunks});
      nchunks += (n + kSelChunk - 1) / kSelChunk;
    }
    pos += n;
  }
  if (table.empty()) {
    TORCH_INTERNAL_ASSERT(k == 0, "topk_select: k=", k, " with no scores passed the argument checks");
    return at::empty({0}, long_opts);
  }
  TORCH_CHECK_VALUE(table.size() <= static_cast<size_t>(INT32_MAX), "scores: too many tensors");
  const int nseg = static_cast<int>(table.size());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Pinned source + non_blocking: one async H2D copy on the current stream; ATen records the
  // pinned block's use on that stream so it is not recycled before the copy ran. The device
  // copy (and the contiguous score/active tensors in `parts`) outlive every launch below in
  // stream order, which is all the caching allocator needs.
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(TopkSeg));
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(cuda::kPinnedStaging));
  std::memcpy(host.data_ptr<uint8_t>(), table.data(), static_cast<size_t>(bytes));
  Tensor tdev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(dev));
  tdev.copy_(host, /*non_blocking=*/true);
  const TopkSeg* segs = reinterpret_cast<const TopkSeg*>(tdev.data_ptr<uint8_t>());
  // ws: [n_active, n_nan, prefix, mask, need, found, -, -, histogram (8192 bins max)]
  Tensor ws = at::zeros({kWsHist + (1 << 13)}, long_opts);
  const int64_t units = nchunks * kUnitsPerChunk;
  GK_DISPATCH_FLOAT(dtype, "topk_select", [&] {
    const int64_t grid = grid_for(units, dev.index());
    GK_LAUNCH(topk_stats_kernel<scalar_t>, static_cast<unsigned>(grid), kThreads, 0, stream, segs, nseg, units,
              reinterpret_cast<unsigned long long*>(ws.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Check order and messages follow the CPU kernel: NaN among the active scores, then
  // k <= #active.
  const auto st = fetch_i64(ws.narrow(0, 0, 2));  // one D2H copy for both counts: the op's only sync
  const int64_t n_active = st[0], n_nan = st[1];
  TORCH_CHECK_VALUE(n_nan == 0, "scores: contains NaN (", n_nan, " active entries)");
  TORCH_CHECK_VALUE(k <= n_active, "k: must be in [0, ", n_active, "] (active scores), got ", k);
  Tensor out = at::empty({k}, long_opts);
  if (k == 0) return out;
  GK_DISPATCH_FLOAT(dtype, "topk_select", [&] {
    using K = typename std::conditional<std::is_same<scalar_t, double>::value, uint64_t, uint32_t>::type;
    topk_run<scalar_t, K>(segs, nseg, nchunks, k, ws, out, dev, stream);
  });
  return out;
}

Tensor topk_select_cuda(const Tensor& scores, const std::optional<Tensor>& active, int64_t k) {
  check_topk(scores, active, k);
  TopkPart part;
  part.scores = scores.contiguous();
  if (active.has_value()) part.active = active->contiguous();
  TORCH_CHECK_VALUE(cuda::on_device(part.scores.device()), "scores: expected a CUDA tensor, got one on ",
                    part.scores.device());
  // check_topk already rejected k > 0 with no scores; an empty input returns before any launch.
  if (part.scores.numel() == 0) return at::empty({0}, at::TensorOptions().dtype(at::kLong).device(scores.device()));
  return topk_impl({part}, part.scores.scalar_type(), k, part.scores.device());
}

Tensor topk_select_segments_cuda(at::TensorList scores, const c10::List<std::optional<Tensor>>& active,
                                 int64_t k) {
  // Shared with the CPU kernel (checks.h): list lengths, k >= 0, per-entry dtype / device /
  // active checks, the "no scores at all" bound on k. It hands back per-tensor flat contiguous
  // views: no copy for contiguous entries; a non-contiguous entry gets its own contiguous copy,
  // held for the whole call (the select reads the scores once per pass). The scores are never
  // concatenated.
  const auto [flat, acts] = check_topk_segments(scores, active, k);
  const at::Device dev = scores.empty() ? cuda::current_device() : scores[0].device();
  TORCH_CHECK_VALUE(cuda::on_device(dev), "scores: expected a CUDA tensor, got one on ", dev);
  std::vector<TopkPart> parts(flat.size());
  int64_t total = 0;
  for (const auto i : c10::irange(flat.size())) {
    parts[i].scores = flat[i];
    parts[i].active = acts[i];  // undefined = all active
    total += flat[i].numel();
  }
  // check_topk_segments already rejected k > 0 with no scores; nothing to launch.
  if (total == 0) return at::empty({0}, at::TensorOptions().dtype(at::kLong).device(dev));
  return topk_impl(parts, scores[0].scalar_type(), k, dev);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradkit, CUDA, m) {
  m.impl("gather_segments", &gather_segments_cuda);
  m.impl("gather_segments_out", &gather_segments_out_cuda);
  m.impl("scatter_segments", &scatter_segments_cuda);
  m.impl("scatter_segments_", &scatter_segments__cuda);
  m.impl("mask_to_indices", &mask_to_indices_cuda);
  m.impl("bitmask_to_indices", &bitmask_to_indices_cuda);
  m.impl("pack_bitmask", &pack_bitmask_cuda);
  m.impl("topk_select", &topk_select_cuda);
  m.impl("topk_select_segments", &topk_select_segments_cuda);
}

}  // namespace gradkit

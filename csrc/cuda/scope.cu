// CUDA kernels for the scope family: block norms, per-scope k-th largest block norm,
// structured (N:M / block) keep-masks, in-place hard and soft (group-lasso) thresholding.
// Semantics: python/gradkit/kernels/reference/scope.py; host-side layout and argument
// checks: csrc/scope_layout.h (shared with csrc/cpu/scope.cpp, same messages and kinds).
// In-place ops also reject an x with internal overlap (at::assert_no_internal_overlap, as
// torch's in-place ops do), and a values / conditioner / thresholds / block_mask tensor that
// shares x's storage is copied first (x is written while it is read).
//
// Headers: like parammap.cu, only c10/cuda/* (stream, guard, launch check); NOT
// ATen/cuda/CUDAContext.h (it needs cuSPARSE/cuBLAS headers the CPU wheel does not ship).
// at::cuda::getCurrentCUDAStream() resolves to c10::cuda's through `namespace at { using
// namespace c10; }`, so the same source builds in a CUDAExtension and in scripts/nvcc_check.sh.
//
// Layout (scope_layout.h). x is a three-level strided walk: level 0 = scope (g over the scope
// grid), level 1 = block inside the scope (j, row-major = in-scope index), level 2 = element
// inside the block (e). Every level keeps one stride per tensor set: kX (x), kV (values /
// conditioner; == x's strides when absent), kE (contiguous x-shaped bool mask), kB
// (contiguous grid-shaped tensor: block mask), kS (contiguous scope-grid tensor: per-scope
// output; for the scope-less layouts of block_norms / block_apply_mask_ /
// block_soft_threshold_ the scope grid IS the block grid, so kS addresses grid tensors).
// The kernels only ever see `Geo` (the three levels, copied into kernel parameters) and
// turn a linear position of a level into per-set offsets by peeling its dims innermost
// first: no division for a level of <= 1 dim, one 32-bit div/mod for 2 dims, a loop
// otherwise (64-bit div/mod only when the level has >= 2^32 positions).
//
// Ops and paths:
// * block_norms: score_kernel, one group of lanes per block (1..32 lanes of a warp, or a
//   whole CTA for huge blocks, optionally split into parts + combine_kernel), writes
//   score^(1/p) in x's dtype.
// * scope_kth / scope_mask / scope_hard_threshold_:
//   - small scopes (<= 32 blocks per scope), fused, ONE read of the scored tensor and ONE
//     write of the outputs:
//       nm_kernel: single-element blocks whose scope and in-scope levels are <= 1 dim
//         (N:M over rows, any row stride): one thread per scope, consecutive threads on
//         consecutive scopes, the next scope's load issued before the current one is
//         processed; 16-byte vector loads of the scope's NB elements and one packed
//         store of its NB mask bytes when the rows are contiguous and aligned; hard
//         threshold without `values` writes the scope back as one vector (kept values
//         bit-for-bit, dropped ones +0).
//       small_kernel: anything else; a group of lanes (power of two <= 32, one per element
//         of a block) per scope; block scores reduced with xor-butterflies (bitwise equal in
//         every lane, so every lane takes the same decisions).
//     Selection by rank counting over scores held in registers:
//       rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i} (NaN compares false: never counted,
//       never kept; exact mode keeps rank_i < nnz, keep_ties keeps #{j: s_j > s_i} < nnz,
//       scope_kth takes the NaN -> -inf filled scores at stable ranks k-1 and k).
//   - large scopes: scores first (score_kernel into a global scope-major scratch), then
//       select_cta_kernel: one CTA per scope (scores cached in shared memory when they fit):
//         valid count, exact k-th largest valid key by 8-bit radix passes over an
//         order-preserving unsigned key of the score (shared-memory histogram + block scan,
//         no sort), then ties at the k-th key taken lowest in-scope index first with a
//         block-wide exclusive scan + running carry;
//       or, for few huge scopes (fewer scopes than half the SMs, >= 64K blocks each), the same
//         algorithm spread over many CTAs per scope (multi_* kernels: 8192-score units,
//         global per-scope histograms and state, per-unit tie counts scanned per scope);
//     then fill_kernel expands the grid mask to elements / zeroes x's dropped blocks.
// * block_apply_mask_: fill_kernel.
// * block_soft_threshold_: soft_kernel, a group of lanes (or a CTA) per block; Euclidean
//   closed form, or per-block bisection with early stop for the diagonal metric.
//
// Conventions: kThreads = 256 threads per CTA for every kernel (shared arrays and the CTA
// reductions assume it); grids are capped at one wave of resident CTAs (occupancy x SMs, or 8
// per SM for the tiny bookkeeping kernels) and every kernel loops grid-stride; loops that
// contain __syncthreads have CTA-uniform trip counts; sub-warp groups only shuffle with
// their own lane mask and take group-uniform decisions. Accumulation in float (double for
// float64); products feeding sums use __fmul_rn / __dmul_rn so nvcc cannot contract them
// into FMAs (single-lane sums then round exactly like the CPU kernel's sequential loop).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "../scope_layout.h"

namespace gradkit {
namespace scope {
namespace {

using at::Tensor;

constexpr int kThreads = 256;           // CTA size of every kernel in this file
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;              // radix digit: 8 bits, one bin per thread
constexpr int64_t kSmallScope = 32;     // fused register path up to this many blocks per scope
constexpr int64_t kUnit = 8192;         // scores per CTA work unit of the multi-CTA select
constexpr int64_t kSplitChunk = 8192;   // elements per part when a huge block is split
constexpr int kCache = 8;               // soft threshold: elements cached per lane

// ---------------------------------------------------------------------------
// host helpers
// ---------------------------------------------------------------------------

using gradkit::cuda::sm_count;

// CTAs for `ctas` independent CTA-sized work slices: at most 8 resident per SM; kernels loop
// grid-stride over the rest.
unsigned grid_for(int64_t ctas, int dev) {
  const int64_t cap = static_cast<int64_t>(sm_count(dev)) * 8;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ctas, cap)));
}

// Grid of a grid-stride kernel over `ctas` CTA-sized slices: at most one full wave of
// resident CTAs (occupancy x SMs), so no partial last wave idles most of the GPU.
template <typename Kernel>
unsigned grid_occ(Kernel kernel, int64_t ctas, int dev, size_t smem = 0) {
  int occ = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kThreads, smem));
  const int64_t cap = static_cast<int64_t>(sm_count(dev)) * std::max(occ, 1);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ctas, cap)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Lanes of a sub-warp group for blocks of `ne` elements: the next power of two, at most 32.
int lanes_for(int64_t ne) {
  int l = 1;
  while (l < 32 && l < ne) l <<= 1;
  return l;
}

bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0; }

// The second tensor must not share memory with x when x is written in the same pass (the
// fused kernels read it while other threads write x); a copy makes that impossible.
Tensor detach_from(const Tensor& t, const Tensor& x) {
  if (t.numel() > 0 && t.has_storage() && x.has_storage() && t.storage().is_alias_of(x.storage())) {
    return t.clone(at::MemoryFormat::Contiguous);
  }
  return t;
}

#define GK_SCOPE_DISPATCH(T, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, __VA_ARGS__)

// Calls f(std::integral_constant<int, NB>) with the smallest NB in {2, 4, 8, 16, 32} >= nb.
template <typename F>
void dispatch_nb(int64_t nb, F&& f) {
  if (nb <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (nb <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (nb <= 8) {
    f(std::integral_constant<int, 8>{});
  } else if (nb <= 16) {
    f(std::integral_constant<int, 16>{});
  } else {
    f(std::integral_constant<int, 32>{});
  }
}

// ---------------------------------------------------------------------------
// layout in kernel parameters
// ---------------------------------------------------------------------------

struct DLevel {
  int nd;
  int wide;  // 1 when the level has >= 2^32 positions: 64-bit div/mod
  int64_t size[kMaxDims];
  int64_t st[kSets][kMaxDims];
};

struct Geo {
  DLevel lv[3];
  int64_t numscp, nb, ne;
};

Geo make_geo(const Layout& Y) {
  Geo G;
  std::memset(&G, 0, sizeof(G));
  for (int l = 0; l < 3; ++l) {
    const Level& L = Y.lv[l];
    G.lv[l].nd = L.nd;
    G.lv[l].wide = L.count > static_cast<int64_t>(UINT32_MAX) ? 1 : 0;
    for (int d = 0; d < L.nd; ++d) {
      G.lv[l].size[d] = L.size[d];
      for (int s = 0; s < kSets; ++s) G.lv[l].st[s][d] = L.st[s][d];
    }
  }
  G.numscp = Y.numscp;
  G.nb = Y.nb;
  G.ne = Y.ne;
  return G;
}

struct Offs {
  int64_t o[kSets];
};

// Linear position -> offset of every set (unused sets are dead code after inlining). Levels
// of <= 1 dim need no division and 2-dim levels one 32-bit div/mod (the common cases, inline);
// anything else walks the dims in a (not unrolled) loop, 64-bit when the level is wide.
template <typename U>
__device__ __forceinline__ void level_offs_loop(const DLevel& L, U pos, Offs& r) {
#pragma unroll 1
  for (int d = L.nd - 1; d >= 1; --d) {
    const U sz = static_cast<U>(L.size[d]);
    const U q = pos / sz;
    const int64_t i = static_cast<int64_t>(pos - q * sz);
#pragma unroll
    for (int s = 0; s < kSets; ++s) r.o[s] += i * L.st[s][d];
    pos = q;
  }
#pragma unroll
  for (int s = 0; s < kSets; ++s) r.o[s] += static_cast<int64_t>(pos) * L.st[s][0];
}

__device__ __forceinline__ Offs level_offs(const DLevel& L, int64_t pos) {
  Offs r;
  if (L.nd <= 1) {
#pragma unroll
    for (int s = 0; s < kSets; ++s) r.o[s] = L.nd == 1 ? pos * L.st[s][0] : 0;
  } else if (L.nd == 2 && !L.wide) {
    const uint32_t p = static_cast<uint32_t>(pos), sz = static_cast<uint32_t>(L.size[1]);
    const uint32_t q = p / sz;
    const int64_t i = static_cast<int64_t>(p - q * sz);
#pragma unroll
    for (int s = 0; s < kSets; ++s) r.o[s] = i * L.st[s][1] + static_cast<int64_t>(q) * L.st[s][0];
  } else {
#pragma unroll
    for (int s = 0; s < kSets; ++s) r.o[s] = 0;
    if (L.wide) {
      level_offs_loop<uint64_t>(L, static_cast<uint64_t>(pos), r);
    } else {
      level_offs_loop<uint32_t>(L, static_cast<uint32_t>(pos), r);
    }
  }
  return r;
}

// ---------------------------------------------------------------------------
// numeric helpers
// ---------------------------------------------------------------------------

template <typename T>
using acc_of = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename A>
__device__ __forceinline__ A nan_of() {
  if constexpr (std::is_same<A, double>::value) {
    return __longlong_as_double(0x7ff8000000000000ll);
  } else {
    return __int_as_float(0x7fc00000);
  }
}
template <typename A>
__device__ __forceinline__ A ninf_of() {
  if constexpr (std::is_same<A, double>::value) {
    return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
  } else {
    return __int_as_float(static_cast<int>(0xff800000u));
  }
}
template <typename A>
__device__ __forceinline__ A pinf_of() {
  if constexpr (std::is_same<A, double>::value) {
    return __longlong_as_double(0x7ff0000000000000ll);
  } else {
    return __int_as_float(0x7f800000);
  }
}
template <typename A>
__device__ __forceinline__ bool is_nan(A v) {
  return v != v;
}
template <typename A>
__device__ __forceinline__ A abs_of(A v) {
  if constexpr (std::is_same<A, double>::value) {
    return fabs(v);
  } else {
    return fabsf(v);
  }
}
template <typename A>
__device__ __forceinline__ A mul_rn(A a, A b) {
  if constexpr (std::is_same<A, double>::value) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
}
template <typename A>
__device__ __forceinline__ A sqrt_of(A v) {
  if constexpr (std::is_same<A, double>::value) {
    return sqrt(v);
  } else {
    return sqrtf(v);
  }
}
template <typename A>
__device__ __forceinline__ A pow_of(A a, A b) {
  if constexpr (std::is_same<A, double>::value) {
    return pow(a, b);
  } else {
    return powf(a, b);
  }
}
// max that propagates NaN (torch.amax semantics).
template <typename A>
__device__ __forceinline__ A max_nan(A a, A b) {
  return is_nan(a) ? a : (is_nan(b) ? b : (a > b ? a : b));
}

// (v + w * v1) / (1 + w), rounded step by step like the CPU kernel (no FMA), never NaN (MID_RULE of the
// reference): w = 0 gives v; an infinite v gives v, v1 = -inf below a finite v gives -inf; finite v, v1 whose
// formula overflows (or a w past A's range) take two products that cannot.
template <typename A>
__device__ __forceinline__ A mix_mid(A v, A v1, double w) {
  if (w == 0.0 || !(abs_of(v) < pinf_of<A>())) return v;
  if (!(abs_of(v1) < pinf_of<A>())) return v1;
  const A wf = static_cast<A>(w);
  const A den = static_cast<A>(1.0 + w);
  if constexpr (std::is_same<A, double>::value) {
    const A m = __ddiv_rn(__dadd_rn(v, __dmul_rn(wf, v1)), den);
    if (abs_of(m) < pinf_of<A>()) return m;
    return __dadd_rn(__dmul_rn(v, 1.0 / (1.0 + w)), __dmul_rn(v1, w / (1.0 + w)));
  } else {
    const A m = __fdiv_rn(__fadd_rn(v, __fmul_rn(wf, v1)), den);
    if (abs_of(m) < pinf_of<A>()) return m;
    const float a = static_cast<float>(1.0 / (1.0 + w)), b = static_cast<float>(w / (1.0 + w));
    return __fadd_rn(__fmul_rn(v, a), __fmul_rn(v1, b));
  }
}

// x * 0 with x's sign, also for an infinite x (inf * 0 would be NaN): the soft threshold's zero scale (SOFT_RULE)
template <typename A>
__device__ __forceinline__ A signed_zero(A x) {
  return abs_of(x) == pinf_of<A>() ? (x > A(0) ? A(0) : -A(0)) : x * A(0);
}

// Score kinds (the reference's block_scores): raw signed value, |x| of single-element blocks
// (whatever p), sum |x|, sum x^2, max |x|, sum |x|^p.
enum Kind : int { kRaw = 0, kAbs = 1, kP1 = 2, kP2 = 3, kPInf = 4, kPGen = 5 };

int score_kind(bool raw, int64_t ne, double p) {
  if (raw) return kRaw;
  if (ne == 1) return kAbs;
  if (p == 1.0) return kP1;
  if (p == 2.0) return kP2;
  if (std::isinf(p)) return kPInf;
  return kPGen;
}

template <typename A>
struct Scorer {
  int kind;
  A p;
  // -0.0 is the exact identity of IEEE addition (-0 + v == v for every v, signed zeros too).
  __device__ __forceinline__ A init() const { return kind == kPInf ? A(0) : A(-0.0); }
  __device__ __forceinline__ A add(A acc, A v) const {
    switch (kind) {
      case kRaw: return acc + v;
      case kP2: return acc + mul_rn(v, v);
      case kPInf: return max_nan(acc, abs_of(v));
      case kPGen: return acc + pow_of(abs_of(v), p);
      default: return acc + abs_of(v);  // kAbs, kP1
    }
  }
  __device__ __forceinline__ A combine(A a, A b) const { return kind == kPInf ? max_nan(a, b) : a + b; }
};

// Norm of a score: score^(1/p) (sqrt for p = 2); identity for raw / single / p in {1, inf}.
template <typename A>
__device__ __forceinline__ A to_norm(int kind, A s, A inv_p) {
  if (s < A(0)) return s;  // -inf: fewer than k valid scores in the scope
  if (kind == kP2) return sqrt_of(s);
  if (kind == kPGen) return pow_of(s, inv_p);
  return s;
}

// Order-preserving unsigned key of a (non-NaN) score; -0.0 and +0.0 share one key.
template <typename A>
struct KeyOf;
template <>
struct KeyOf<float> {
  using K = uint32_t;
  __device__ __forceinline__ static K enc(float v) {
    const uint32_t u = __float_as_uint(v == 0.0f ? 0.0f : v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  __device__ __forceinline__ static float dec(K k) {
    const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
  }
};
template <>
struct KeyOf<double> {
  using K = unsigned long long;
  __device__ __forceinline__ static K enc(double v) {
    const K u = static_cast<K>(__double_as_longlong(v == 0.0 ? 0.0 : v));
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  }
  __device__ __forceinline__ static double dec(K k) {
    const K u = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
    return __longlong_as_double(static_cast<long long>(u));
  }
};

struct AddOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a > b ? a : b;
  }
};
// NaN-propagating min / max of floats (torch.amin / amax): symmetric in NaN-ness, so group
// reductions stay identical in every lane even with NaN operands.
struct MinNanOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return is_nan(a) ? a : (is_nan(b) ? b : (a < b ? a : b));
  }
};
struct MaxNanOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return max_nan(a, b);
  }
};

// ---------------------------------------------------------------------------
// CTA / group primitives (blockDim.x == kThreads)
// ---------------------------------------------------------------------------

// Every thread gets the same value: warp xor-butterfly, then the warp results combined in
// warp order by every thread. sh: kWarps V's of shared memory.
template <typename V, typename Op>
__device__ __forceinline__ V cta_reduce(V v, Op op, V* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  V r = sh[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, sh[w]);
  __syncthreads();  // sh is reused by the next call
  return r;
}

// Exclusive prefix sum over threadIdx.x; `total` gets the CTA sum. sh: kWarps V's. V = unsigned, or
// unsigned long long where the counts may pass 2^32 (the multi-CTA select: a scope of >= 2^31 blocks).
template <typename V>
__device__ __forceinline__ V cta_excl_scan(V v, V* sh, V& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  V inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const V y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) sh[warp] = inc;
  __syncthreads();
  V before = 0, tot = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const V s = sh[w];
    before += w < warp ? s : V(0);
    tot += s;
  }
  __syncthreads();
  total = tot;
  return before + inc - v;
}

// A work group: `lanes` consecutive lanes of one warp (lanes a power of two <= 32), or the
// whole CTA. first/step: the group's grid-stride loop over work items. Reductions give every
// member the same bits (xor-butterflies combine the same operands in every lane, and
// IEEE + / max / min are commutative), so group members always take the same branches.
template <bool CTA>
struct Group {
  int size, rank;
  unsigned mask;
  int64_t first, step;
  __device__ __forceinline__ explicit Group(int lanes) {
    if constexpr (CTA) {
      size = kThreads;
      rank = threadIdx.x;
      mask = 0xffffffffu;
      first = blockIdx.x;
      step = gridDim.x;
    } else {
      const int lane = threadIdx.x & 31;
      size = lanes;
      rank = lane & (lanes - 1);
      mask = lanes == 32 ? 0xffffffffu : (((1u << lanes) - 1u) << (lane & ~(lanes - 1)));
      const int per = kThreads / lanes;
      first = static_cast<int64_t>(blockIdx.x) * per + threadIdx.x / lanes;
      step = static_cast<int64_t>(gridDim.x) * per;
    }
  }
  template <typename V, typename Op>
  __device__ __forceinline__ V reduce(V v, Op op, V* sh) const {
    if constexpr (CTA) {
      return cta_reduce<V>(v, op, sh);
    } else {
      for (int o = size >> 1; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(mask, v, o));
      return v;
    }
  }
};

// ---------------------------------------------------------------------------
// selection in registers (small scopes)
// ---------------------------------------------------------------------------

// Keep flags (bit i = block i) of the rules in the header comment. s[j] for j >= nb must be
// NaN (never counted, never kept). NB <= 8: fully unrolled; larger NB: the outer loop stays a
// loop (s[i] picked by an unrolled select) so the code is O(NB), not O(NB^2).
template <typename A, int NB>
__device__ __forceinline__ uint32_t rank_keep(const A (&s)[NB], int64_t nnz, bool ties) {
  uint32_t bits = 0;
  if constexpr (NB <= 8) {
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      int r = 0;
#pragma unroll
      for (int j = 0; j < NB; ++j) r += (s[j] > s[i] || (!ties && j < i && s[j] == s[i])) ? 1 : 0;
      if (!is_nan(s[i]) && r < nnz) bits |= 1u << i;
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < NB; ++i) {
      A si = s[0];
#pragma unroll
      for (int j = 1; j < NB; ++j) si = j == i ? s[j] : si;
      int r = 0;
#pragma unroll
      for (int j = 0; j < NB; ++j) r += (s[j] > si || (!ties && j < i && s[j] == si)) ? 1 : 0;
      if (!is_nan(si) && r < nnz) bits |= 1u << i;
    }
  }
  return bits;
}

// k-th and (k+1)-th largest of the NaN -> -inf filled scores s[0..nb): the filled entries at
// stable descending ranks k-1 and k (-inf where absent). Padding j >= nb (NaN, so -inf once
// filled) never ranks above a real entry and j > i never breaks a tie, so it does not move
// the ranks of the real entries.
template <typename A, int NB>
__device__ __forceinline__ void rank_kth(const A (&s)[NB], int nb, int64_t k, A& vk, A& vk1) {
  A f[NB];
#pragma unroll
  for (int j = 0; j < NB; ++j) f[j] = is_nan(s[j]) ? ninf_of<A>() : s[j];
  vk = ninf_of<A>();
  vk1 = ninf_of<A>();
  if constexpr (NB <= 8) {
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      int r = 0;
#pragma unroll
      for (int j = 0; j < NB; ++j) r += (f[j] > f[i] || (j < i && f[j] == f[i])) ? 1 : 0;
      if (i < nb) {
        if (r == k - 1) vk = f[i];
        if (r == k) vk1 = f[i];
      }
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < nb; ++i) {
      A fi = f[0];
#pragma unroll
      for (int j = 1; j < NB; ++j) fi = j == i ? f[j] : fi;
      int r = 0;
#pragma unroll
      for (int j = 0; j < NB; ++j) r += (f[j] > fi || (j < i && f[j] == fi)) ? 1 : 0;
      if (r == k - 1) vk = fi;
      if (r == k) vk1 = fi;
    }
  }
}

enum Op : int { kOpKth = 0, kOpMask = 1, kOpMaskElem = 2, kOpHard = 3 };
enum Status : int { kStSelect = 0, kStFew = 1, kStNone = 2 };

// ---------------------------------------------------------------------------
// nm_kernel: single-element blocks, scope / in-scope levels of <= 1 dim
// ---------------------------------------------------------------------------

template <int BYTES>
struct Bits;
template <>
struct Bits<2> {
  using type = uint16_t;
};
template <>
struct Bits<4> {
  using type = uint32_t;
};
template <>
struct Bits<8> {
  using type = uint2;
};
template <>
struct Bits<16> {
  using type = uint4;
};

// N elements from p (aligned to min(16, N * sizeof(T)) bytes) in 16-byte (or one smaller) loads.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kChunk = kBytes < 16 ? kBytes : 16;
  constexpr int kPer = kChunk / static_cast<int>(sizeof(T));
  using V = typename Bits<kChunk>::type;
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    const V b = reinterpret_cast<const V*>(p)[c];
    memcpy(&out[c * kPer], &b, kChunk);
  }
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kChunk = kBytes < 16 ? kBytes : 16;
  constexpr int kPer = kChunk / static_cast<int>(sizeof(T));
  using V = typename Bits<kChunk>::type;
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    V b;
    memcpy(&b, &in[c * kPer], kChunk);
    reinterpret_cast<V*>(p)[c] = b;
  }
}

template <typename T>
struct NmArgs {
  const T* v;  // scored tensor
  T* x;        // hard threshold: zeroed in place
  bool* mask;  // grid / element mask (identical for single-element blocks)
  T* out;      // scope_kth
  int64_t numscp, target;
  int64_t s0v, s1v, s0x, s1x, s0m, s1m, s0o;  // (scope, in-scope) strides per tensor
  double w;
  int nb, op, raw, ties, mid;
  int vec_v;  // v rows contiguous + aligned, nb == NB: vector loads
  int vec_m;  // mask rows contiguous + aligned, nb == NB: one packed store
  int vec_x;  // hard threshold scored on x itself with vec_v: write the scope back as one vector
};

// The scope's NB raw values (padding T(0) past nb).
template <typename T, int NB>
__device__ __forceinline__ void nm_load(const NmArgs<T>& a, int64_t g, T (&raw)[NB]) {
  if (a.vec_v) {
    load_vec<T, NB>(a.v + g * NB, raw);
  } else {
    const T* vp = a.v + g * a.s0v;
#pragma unroll
    for (int j = 0; j < NB; ++j) raw[j] = j < a.nb ? vp[j * a.s1v] : T(0);
  }
}

template <typename T, int NB>
__device__ __forceinline__ void nm_process(const NmArgs<T>& a, int64_t g, const T (&raw)[NB]) {
  using A = acc_of<T>;
  A s[NB];
#pragma unroll
  for (int j = 0; j < NB; ++j) {
    const A y = static_cast<A>(raw[j]);
    s[j] = j < a.nb ? (a.raw ? y : abs_of(y)) : nan_of<A>();
  }
  if (a.op == kOpKth) {  // single-element / raw scores: the norm is the score
    A vk, vk1;
    rank_kth<A, NB>(s, a.nb, a.target, vk, vk1);
    if (a.mid) vk = mix_mid<A>(vk, vk1, a.w);
    a.out[g * a.s0o] = static_cast<T>(vk);
    return;
  }
  const uint32_t keep = rank_keep<A, NB>(s, a.target, a.ties != 0);
  if (a.op == kOpHard) {
    if (a.vec_x) {  // kept values written back bit for bit, dropped ones +0
      T y[NB];
#pragma unroll
      for (int j = 0; j < NB; ++j) y[j] = ((keep >> j) & 1u) ? raw[j] : T(0);
      store_vec<T, NB>(a.x + g * NB, y);
    } else {
      T* xp = a.x + g * a.s0x;
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        if (j < a.nb && !((keep >> j) & 1u)) xp[j * a.s1x] = T(0);
      }
    }
  }
  if (a.vec_m) {
    uint8_t b[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) b[j] = static_cast<uint8_t>((keep >> j) & 1u);
    store_vec<uint8_t, NB>(reinterpret_cast<uint8_t*>(a.mask + g * NB), b);
  } else {
    bool* mp = a.mask + g * a.s0m;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (j < a.nb) mp[j * a.s1m] = ((keep >> j) & 1u) != 0;
    }
  }
}

// One thread per scope, consecutive threads on consecutive scopes, grid-stride; the next
// scope's load is issued before the current one is processed (two loads in flight per
// thread for the bandwidth-bound N:M case). NB <= 4: registers capped for >= 6 CTAs per SM.
template <typename T, int NB>
__global__ void __launch_bounds__(kThreads, NB <= 4 ? 6 : 1) nm_kernel(const NmArgs<T> a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= a.numscp) return;
  T cur[NB];
  nm_load<T, NB>(a, g, cur);
  for (;;) {
    const int64_t gn = g + stride;
    const bool more = gn < a.numscp;
    T nxt[NB];
    if (more) nm_load<T, NB>(a, gn, nxt);
    nm_process<T, NB>(a, g, cur);
    if (!more) break;
#pragma unroll
    for (int j = 0; j < NB; ++j) cur[j] = nxt[j];
    g = gn;
  }
}

// ---------------------------------------------------------------------------
// small_kernel: <= 32 blocks per scope, any layout; a group of lanes per scope
// ---------------------------------------------------------------------------

template <typename T>
struct SmallArgs {
  Geo G;
  int64_t boff_v[kSmallScope];  // in-scope block offsets (level 1) of the scored tensor
  int64_t boff_x[kSmallScope];  // ... of x (hard threshold)
  int64_t boff_m[kSmallScope];  // ... of the mask (set kB, or kE for the element mask)
  const T* v;
  T* x;
  bool* mask;
  T* out;
  double p, inv_p, w;
  int64_t target;
  int op, kind, lanes, ties, mid;
};

template <typename T, int NB>
__global__ void __launch_bounds__(kThreads) small_kernel(const SmallArgs<T> a) {
  using A = acc_of<T>;
  const Geo& G = a.G;
  const Group<false> grp(a.lanes);
  const Scorer<A> sc{a.kind, static_cast<A>(a.p)};
  const int nb = static_cast<int>(G.nb);
  const int64_t ne = G.ne;
  const DLevel& L2 = G.lv[2];
  const auto comb = [&sc](A u, A w) { return sc.combine(u, w); };
  for (int64_t g = grp.first; g < G.numscp; g += grp.step) {
    const Offs o0 = level_offs(G.lv[0], g);
    A s[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) s[j] = nan_of<A>();
#pragma unroll 1
    for (int j = 0; j < nb; ++j) {  // group-uniform trip count
      const T* bp = a.v + o0.o[kV] + a.boff_v[j];
      A acc = sc.init();
      for (int64_t e = grp.rank; e < ne; e += grp.size) {
        acc = sc.add(acc, static_cast<A>(bp[level_offs(L2, e).o[kV]]));
      }
      acc = grp.reduce(acc, comb, static_cast<A*>(nullptr));
#pragma unroll
      for (int jj = 0; jj < NB; ++jj) s[jj] = jj == j ? acc : s[jj];
    }
    if (a.op == kOpKth) {
      A vk, vk1;
      rank_kth<A, NB>(s, nb, a.target, vk, vk1);
      if (grp.rank == 0) {
        const A inv_p = static_cast<A>(a.inv_p);
        A r = to_norm<A>(a.kind, vk, inv_p);
        if (a.mid) r = mix_mid<A>(r, to_norm<A>(a.kind, vk1, inv_p), a.w);
        a.out[o0.o[kS]] = static_cast<T>(r);
      }
      continue;
    }
    const uint32_t keep = rank_keep<A, NB>(s, a.target, a.ties != 0);
    if (a.op == kOpMaskElem) {
#pragma unroll 1
      for (int j = 0; j < nb; ++j) {
        const bool kj = ((keep >> j) & 1u) != 0;
        bool* mp = a.mask + o0.o[kE] + a.boff_m[j];
        for (int64_t e = grp.rank; e < ne; e += grp.size) mp[level_offs(L2, e).o[kE]] = kj;
      }
      continue;
    }
    // grid mask (scope_mask without expand, scope_hard_threshold_): block j by lane j % lanes
    for (int j = grp.rank; j < nb; j += grp.size) a.mask[o0.o[kB] + a.boff_m[j]] = ((keep >> j) & 1u) != 0;
    if (a.op == kOpHard) {
#pragma unroll 1
      for (int j = 0; j < nb; ++j) {
        if (!((keep >> j) & 1u)) {
          T* xp = a.x + o0.o[kX] + a.boff_x[j];
          for (int64_t e = grp.rank; e < ne; e += grp.size) xp[level_offs(L2, e).o[kX]] = T(0);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// score_kernel / combine_kernel: one score per block (block_norms, large-scope scratch)
// ---------------------------------------------------------------------------

template <typename T>
struct ScoreArgs {
  Geo G;
  const T* v;     // scored tensor (set kV)
  void* dst;      // acc_of<T>: scores (scope-major, g * nb + j) or, when nsplit > 1, partials
  T* norm;        // block_norms: norms written at the block's kS offset (nsplit == 1 only)
  double p, inv_p;
  int64_t nitems;  // blocks * nsplit
  int64_t nsplit, chunk;
  int kind, lanes;
};

template <typename T, bool CTA>
__global__ void __launch_bounds__(kThreads) score_kernel(const ScoreArgs<T> a) {
  using A = acc_of<T>;
  __shared__ A sh[kWarps];
  const Geo& G = a.G;
  const Group<CTA> grp(a.lanes);
  const Scorer<A> sc{a.kind, static_cast<A>(a.p)};
  const auto comb = [&sc](A u, A w) { return sc.combine(u, w); };
  A* dst = static_cast<A*>(a.dst);
  for (int64_t it = grp.first; it < a.nitems; it += grp.step) {
    const int64_t blk = a.nsplit == 1 ? it : it / a.nsplit;
    const int64_t part = it - blk * a.nsplit;
    const int64_t g = G.nb == 1 ? blk : blk / G.nb;
    const int64_t j = blk - g * G.nb;
    const Offs o0 = level_offs(G.lv[0], g);
    const T* bp = a.v + o0.o[kV] + level_offs(G.lv[1], j).o[kV];
    const int64_t e0 = part * a.chunk;
    const int64_t e1 = e0 + a.chunk < G.ne ? e0 + a.chunk : G.ne;
    A acc = sc.init();
    for (int64_t e = e0 + grp.rank; e < e1; e += grp.size) {
      acc = sc.add(acc, static_cast<A>(bp[level_offs(G.lv[2], e).o[kV]]));
    }
    acc = grp.reduce(acc, comb, sh);
    if (grp.rank == 0) {
      if (a.norm != nullptr) {
        a.norm[o0.o[kS] + level_offs(G.lv[1], j).o[kS]] =
            static_cast<T>(to_norm<A>(a.kind, acc, static_cast<A>(a.inv_p)));
      } else {
        dst[it] = acc;
      }
    }
  }
}

// Partials of split blocks combined in part order (deterministic); one thread per block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const Geo G, const void* part, int64_t nblk, int64_t nsplit, void* dst, T* norm, int kind,
                   double p, double inv_p) {
  using A = acc_of<T>;
  const Scorer<A> sc{kind, static_cast<A>(p)};
  const A* pp = static_cast<const A*>(part);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; b < nblk;
       b += static_cast<int64_t>(gridDim.x) * kThreads) {
    A r = pp[b * nsplit];
    for (int64_t q = 1; q < nsplit; ++q) r = sc.combine(r, pp[b * nsplit + q]);
    if (norm != nullptr) {
      const int64_t g = G.nb == 1 ? b : b / G.nb;
      const int64_t j = b - g * G.nb;
      norm[level_offs(G.lv[0], g).o[kS] + level_offs(G.lv[1], j).o[kS]] =
          static_cast<T>(to_norm<A>(kind, r, static_cast<A>(inv_p)));
    } else {
      static_cast<A*>(dst)[b] = r;
    }
  }
}

// ---------------------------------------------------------------------------
// select_cta_kernel: one CTA per (large) scope over the score scratch
// ---------------------------------------------------------------------------

// Exact `need`-th largest key among the valid (non-NaN) src[0..nb) by 8-bit radix passes,
// MSB first. On return: the key, need_out = how many keys equal to it complete the top
// `need`, cnt_out = how many valid keys equal it. Requires 1 <= need <= #valid.
template <typename A>
__device__ typename KeyOf<A>::K cta_radix_select(const A* src, int64_t nb, unsigned need, unsigned* hist,
                                                 unsigned* scan_sh, unsigned* st, unsigned& need_out,
                                                 unsigned& cnt_out) {
  using KT = KeyOf<A>;
  using K = typename KT::K;
  constexpr int kKeyBits = static_cast<int>(sizeof(K)) * 8;
  const int t = threadIdx.x;
  K prefix = 0, kmask = 0;
  unsigned cnt = 0;
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    hist[t] = 0;
    __syncthreads();
    for (int64_t j0 = t; j0 < nb; j0 += 4 * kThreads) {
      A v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t j = j0 + static_cast<int64_t>(u) * kThreads;
        v[u] = j < nb ? src[j] : nan_of<A>();
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (!is_nan(v[u])) {
          const K key = KT::enc(v[u]);
          if ((key & kmask) == prefix) atomicAdd(&hist[static_cast<unsigned>(key >> shift) & 0xffu], 1u);
        }
      }
    }
    __syncthreads();
    // thread t owns bin 255 - t: the exclusive scan counts the keys in larger bins
    const unsigned c = hist[kBins - 1 - t];
    unsigned tot;
    const unsigned above = cta_excl_scan(c, scan_sh, tot);
    if (above < need && above + c >= need) {  // exactly one thread
      st[0] = static_cast<unsigned>(kBins - 1 - t);
      st[1] = need - above;
      st[2] = c;
    }
    __syncthreads();
    prefix |= static_cast<K>(st[0]) << shift;
    kmask |= static_cast<K>(0xffu) << shift;
    need = st[1];
    cnt = st[2];
    __syncthreads();  // st / hist are rewritten by the next pass
  }
  need_out = need;
  cnt_out = cnt;
  return prefix;
}

template <typename T>
struct SelArgs {
  Geo G;
  const void* scores;  // acc_of<T>, scope-major
  bool* mask;          // kOpMask: grid mask (set kB)
  T* out;              // kOpKth: per-scope value (set kS)
  double inv_p, w;
  int64_t target;      // nnz or k
  int op, kind, ties, mid, cache;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) select_cta_kernel(const SelArgs<T> a) {
  using A = acc_of<T>;
  using KT = KeyOf<A>;
  using K = typename KT::K;
  GK_DYNAMIC_SHARED(double, dyn_smem);  // nb scores when a.cache
  __shared__ unsigned hist[kBins];
  __shared__ unsigned scan_sh[kWarps];
  __shared__ unsigned long long red_sh[kWarps];
  __shared__ unsigned st[3];
  const Geo& G = a.G;
  const int64_t nb = G.nb;
  const int t = threadIdx.x;
  A* cache = reinterpret_cast<A*>(dyn_smem);
  for (int64_t g = blockIdx.x; g < G.numscp; g += gridDim.x) {
    const A* src = static_cast<const A*>(a.scores) + g * nb;
    if (a.cache) {
      for (int64_t j = t; j < nb; j += kThreads) cache[j] = src[j];
      __syncthreads();
      src = cache;
    }
    unsigned nv = 0;
    for (int64_t j = t; j < nb; j += kThreads) nv += is_nan(src[j]) ? 0u : 1u;
    nv = cta_reduce<unsigned>(nv, AddOp{}, reinterpret_cast<unsigned*>(red_sh));
    const Offs o0 = level_offs(G.lv[0], g);
    if (a.op == kOpKth) {
      A vk = ninf_of<A>(), vk1 = ninf_of<A>();
      if (static_cast<int64_t>(nv) >= a.target) {
        unsigned need, cnt;
        const K kth = cta_radix_select<A>(src, nb, static_cast<unsigned>(a.target), hist, scan_sh, st, need, cnt);
        vk = KT::dec(kth);
        if (a.mid && static_cast<int64_t>(nv) > a.target) {
          if (cnt > need) {
            vk1 = vk;  // another key equal to the k-th one is the (k+1)-th
          } else {      // the (k+1)-th is the largest valid key below the k-th
            K m = 0;
            for (int64_t j = t; j < nb; j += kThreads) {
              const A v = src[j];
              if (!is_nan(v)) {
                const K key = KT::enc(v);
                if (key < kth && key > m) m = key;
              }
            }
            m = cta_reduce<K>(m, MaxOp{}, reinterpret_cast<K*>(red_sh));
            vk1 = KT::dec(m);
          }
        }
      }
      if (t == 0) {
        const A inv_p = static_cast<A>(a.inv_p);
        A r = to_norm<A>(a.kind, vk, inv_p);
        if (a.mid) r = mix_mid<A>(r, to_norm<A>(a.kind, vk1, inv_p), a.w);
        a.out[o0.o[kS]] = static_cast<T>(r);
      }
    } else {
      const int status = a.target == 0 ? kStNone : (static_cast<int64_t>(nv) <= a.target ? kStFew : kStSelect);
      K kth = 0;
      unsigned need = 0;
      if (status == kStSelect) {
        unsigned cnt;
        kth = cta_radix_select<A>(src, nb, static_cast<unsigned>(a.target), hist, scan_sh, st, need, cnt);
      }
      unsigned carry = 0;  // keys == kth before this round, in in-scope index order
      for (int64_t base = 0; base < nb; base += kThreads) {
        const int64_t j = base + t;
        const A v = j < nb ? src[j] : nan_of<A>();
        const bool valid = !is_nan(v);
        bool keep;
        if (status == kStSelect) {
          const K key = valid ? KT::enc(v) : K(0);
          if (a.ties) {
            keep = valid && key >= kth;
          } else {
            const bool eq = valid && key == kth;
            unsigned tot;
            const unsigned r = cta_excl_scan(eq ? 1u : 0u, scan_sh, tot);
            keep = (valid && key > kth) || (eq && carry + r < need);
            carry += tot;
          }
        } else {
          keep = status == kStFew && valid;
        }
        if (j < nb) a.mask[o0.o[kB] + level_offs(G.lv[1], j).o[kB]] = keep;
      }
    }
    __syncthreads();  // the score cache and shared state are reused by the next scope
  }
}

// ---------------------------------------------------------------------------
// multi_* kernels: the same select spread over many CTAs per scope (few huge scopes)
// ---------------------------------------------------------------------------
// Unit u covers scores [c * kUnit, min(nb, (c + 1) * kUnit)) of scope g = u / nchunk,
// c = u % nchunk. Per-scope state ws[g * kWsN + ...] (uint64), histograms hist[g * kBins + b].

enum : int { kWsValid = 0, kWsPrefix = 1, kWsMask = 2, kWsNeed = 3, kWsCnt = 4, kWsStatus = 5, kWsBelow = 6, kWsN = 8 };

struct Units {
  int64_t nb, nchunk, units;
  __device__ __forceinline__ void at(int64_t u, int64_t& g, int64_t& j0, int64_t& j1) const {
    g = u / nchunk;
    j0 = (u - g * nchunk) * kUnit;
    j1 = j0 + kUnit < nb ? j0 + kUnit : nb;
  }
};

template <typename A>
__global__ void __launch_bounds__(kThreads)
    multi_count_kernel(const A* __restrict__ s, const Units U, unsigned long long* __restrict__ ws) {
  __shared__ unsigned sh[kWarps];
  for (int64_t u = blockIdx.x; u < U.units; u += gridDim.x) {
    int64_t g, j0, j1;
    U.at(u, g, j0, j1);
    const A* sp = s + g * U.nb;
    unsigned n = 0;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) n += is_nan(sp[j]) ? 0u : 1u;
    n = cta_reduce<unsigned>(n, AddOp{}, sh);
    if (threadIdx.x == 0 && n != 0) atomicAdd(&ws[g * kWsN + kWsValid], static_cast<unsigned long long>(n));
  }
}

__global__ void __launch_bounds__(kThreads)
    multi_init_kernel(int64_t numscp, unsigned long long* __restrict__ ws, int op, int64_t target) {
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < numscp;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    unsigned long long* w = ws + g * kWsN;
    const int64_t nv = static_cast<int64_t>(w[kWsValid]);
    int status;
    if (op == kOpKth) {
      status = target > nv ? kStFew : kStSelect;
    } else {
      status = target == 0 ? kStNone : (nv <= target ? kStFew : kStSelect);
    }
    w[kWsStatus] = static_cast<unsigned long long>(status);
    w[kWsNeed] = static_cast<unsigned long long>(target);
    w[kWsPrefix] = 0;
    w[kWsMask] = 0;
    w[kWsCnt] = 0;
    w[kWsBelow] = 0;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    multi_hist_kernel(const A* __restrict__ s, const Units U, const unsigned long long* __restrict__ ws,
                      unsigned long long* __restrict__ hist, int shift) {
  using KT = KeyOf<A>;
  using K = typename KT::K;
  __shared__ unsigned h[kBins];
  for (int64_t u = blockIdx.x; u < U.units; u += gridDim.x) {
    int64_t g, j0, j1;
    U.at(u, g, j0, j1);
    const unsigned long long* w = ws + g * kWsN;
    if (w[kWsStatus] != kStSelect) continue;  // CTA-uniform
    const K prefix = static_cast<K>(w[kWsPrefix]), kmask = static_cast<K>(w[kWsMask]);
    h[threadIdx.x] = 0;
    __syncthreads();
    const A* sp = s + g * U.nb;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) {
      const A v = sp[j];
      if (!is_nan(v)) {
        const K key = KT::enc(v);
        if ((key & kmask) == prefix) atomicAdd(&h[static_cast<unsigned>(key >> shift) & 0xffu], 1u);
      }
    }
    __syncthreads();
    const unsigned c = h[threadIdx.x];
    if (c != 0) atomicAdd(&hist[g * kBins + threadIdx.x], static_cast<unsigned long long>(c));
    __syncthreads();  // h is cleared by the next unit
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    multi_walk_kernel(int64_t numscp, unsigned long long* __restrict__ ws, unsigned long long* __restrict__ hist,
                      int shift) {
  using K = typename KeyOf<A>::K;
  // 64-bit counts: a scope may hold 2^31 blocks or more (one scope over a whole model), so a bin, `need`
  // and their sums can pass 2^32
  __shared__ unsigned long long sh[kWarps];
  for (int64_t g = blockIdx.x; g < numscp; g += gridDim.x) {
    unsigned long long* w = ws + g * kWsN;
    if (w[kWsStatus] != kStSelect) continue;  // CTA-uniform
    const unsigned long long need = w[kWsNeed];
    const int bin = kBins - 1 - static_cast<int>(threadIdx.x);
    const unsigned long long c = hist[g * kBins + bin];
    hist[g * kBins + bin] = 0;  // ready for the next pass
    unsigned long long tot;
    const unsigned long long above = cta_excl_scan(c, sh, tot);  // its syncs order every read of w before the write
    if (above < need && above + c >= need) {
      w[kWsPrefix] = static_cast<unsigned long long>(static_cast<K>(w[kWsPrefix]) | (static_cast<K>(bin) << shift));
      w[kWsMask] = static_cast<unsigned long long>(static_cast<K>(w[kWsMask]) | (static_cast<K>(0xffu) << shift));
      w[kWsNeed] = need - above;
      w[kWsCnt] = c;
    }
  }
}

// eqc[u] = #valid keys equal to the k-th key in unit u (0 for scopes that do not select).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    multi_eq_kernel(const A* __restrict__ s, const Units U, const unsigned long long* __restrict__ ws,
                    unsigned long long* __restrict__ eqc) {
  using KT = KeyOf<A>;
  using K = typename KT::K;
  __shared__ unsigned sh[kWarps];
  for (int64_t u = blockIdx.x; u < U.units; u += gridDim.x) {
    int64_t g, j0, j1;
    U.at(u, g, j0, j1);
    const unsigned long long* w = ws + g * kWsN;
    if (w[kWsStatus] != kStSelect) {
      if (threadIdx.x == 0) eqc[u] = 0;
      continue;
    }
    const K kth = static_cast<K>(w[kWsPrefix]);
    const A* sp = s + g * U.nb;
    unsigned n = 0;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) {
      const A v = sp[j];
      n += (!is_nan(v) && KT::enc(v) == kth) ? 1u : 0u;
    }
    n = cta_reduce<unsigned>(n, AddOp{}, sh);
    if (threadIdx.x == 0) eqc[u] = n;
  }
}

// In place: eqc[u] -> #keys equal to the k-th key in the scope's earlier units (64-bit: may pass 2^32).
__global__ void __launch_bounds__(kThreads)
    multi_eqscan_kernel(int64_t numscp, int64_t nchunk, unsigned long long* __restrict__ eqc) {
  __shared__ unsigned long long sh[kWarps];
  for (int64_t g = blockIdx.x; g < numscp; g += gridDim.x) {
    unsigned long long* e = eqc + g * nchunk;
    unsigned long long carry = 0;
    for (int64_t base = 0; base < nchunk; base += kThreads) {
      const int64_t c = base + threadIdx.x;
      const unsigned long long v = c < nchunk ? e[c] : 0ull;
      unsigned long long tot;
      const unsigned long long ex = cta_excl_scan(v, sh, tot);
      if (c < nchunk) e[c] = carry + ex;
      carry += tot;
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    multi_write_kernel(const Geo G, const A* __restrict__ s, const Units U, const unsigned long long* __restrict__ ws,
                       const unsigned long long* __restrict__ eqb, bool* __restrict__ mask, int ties) {
  using KT = KeyOf<A>;
  using K = typename KT::K;
  __shared__ unsigned sh[kWarps];
  for (int64_t u = blockIdx.x; u < U.units; u += gridDim.x) {
    int64_t g, j0, j1;
    U.at(u, g, j0, j1);
    const unsigned long long* w = ws + g * kWsN;
    const int status = static_cast<int>(w[kWsStatus]);
    const K kth = static_cast<K>(w[kWsPrefix]);
    const unsigned long long need = w[kWsNeed];  // 64-bit with the carry: a scope may hold >= 2^31 blocks
    unsigned long long carry = (status == kStSelect && !ties) ? eqb[u] : 0ull;
    const int64_t ob = level_offs(G.lv[0], g).o[kB];
    const A* sp = s + g * U.nb;
    for (int64_t base = j0; base < j1; base += kThreads) {
      const int64_t j = base + threadIdx.x;
      const A v = j < j1 ? sp[j] : nan_of<A>();
      const bool valid = !is_nan(v);
      bool keep;
      if (status == kStSelect) {
        const K key = valid ? KT::enc(v) : K(0);
        if (ties) {
          keep = valid && key >= kth;
        } else {
          const bool eq = valid && key == kth;
          unsigned tot;
          const unsigned r = cta_excl_scan(eq ? 1u : 0u, sh, tot);
          keep = (valid && key > kth) || (eq && carry + r < need);
          carry += tot;
        }
      } else {
        keep = status == kStFew && valid;
      }
      if (j < j1) mask[ob + level_offs(G.lv[1], j).o[kB]] = keep;
    }
  }
}

// scope_kth with mid, where the (k+1)-th key is below the k-th: its max over the scope.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    multi_below_kernel(const A* __restrict__ s, const Units U, unsigned long long* __restrict__ ws, int64_t k) {
  using KT = KeyOf<A>;
  using K = typename KT::K;
  __shared__ K sh[kWarps];
  for (int64_t u = blockIdx.x; u < U.units; u += gridDim.x) {
    int64_t g, j0, j1;
    U.at(u, g, j0, j1);
    unsigned long long* w = ws + g * kWsN;
    if (w[kWsStatus] != kStSelect || static_cast<int64_t>(w[kWsValid]) <= k || w[kWsCnt] > w[kWsNeed]) continue;
    const K kth = static_cast<K>(w[kWsPrefix]);
    const A* sp = s + g * U.nb;
    K m = 0;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) {
      const A v = sp[j];
      if (!is_nan(v)) {
        const K key = KT::enc(v);
        if (key < kth && key > m) m = key;
      }
    }
    m = cta_reduce<K>(m, MaxOp{}, sh);
    if (threadIdx.x == 0 && m != 0) atomicMax(&w[kWsBelow], static_cast<unsigned long long>(m));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    multi_kth_kernel(const Geo G, const unsigned long long* __restrict__ ws, T* __restrict__ out, int64_t k, int mid,
                     double w, int kind, double inv_p) {
  using A = acc_of<T>;
  using KT = KeyOf<A>;
  using K = typename KT::K;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < G.numscp;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const unsigned long long* st = ws + g * kWsN;
    A vk = ninf_of<A>(), vk1 = ninf_of<A>();
    if (st[kWsStatus] == kStSelect) {
      vk = KT::dec(static_cast<K>(st[kWsPrefix]));
      if (mid && static_cast<int64_t>(st[kWsValid]) > k) {
        vk1 = st[kWsCnt] > st[kWsNeed] ? vk : KT::dec(static_cast<K>(st[kWsBelow]));
      }
    }
    const A ip = static_cast<A>(inv_p);
    A r = to_norm<A>(kind, vk, ip);
    if (mid) r = mix_mid<A>(r, to_norm<A>(kind, vk1, ip), w);
    out[level_offs(G.lv[0], g).o[kS]] = static_cast<T>(r);
  }
}

// ---------------------------------------------------------------------------
// fill_kernel: grid mask -> element mask, or zero x's dropped blocks (scope-less layout)
// ---------------------------------------------------------------------------

template <typename T>
struct FillArgs {
  Geo G;
  T* x;
  const bool* bmask;  // contiguous grid mask (set kS of the scope-less layout)
  bool* emask;        // expand: contiguous element mask (set kE)
  int64_t nitems, nsplit, chunk;
  int lanes, expand;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) fill_kernel(const FillArgs<T> a) {
  const Geo& G = a.G;
  const Group<false> grp(a.lanes);
  for (int64_t it = grp.first; it < a.nitems; it += grp.step) {
    const int64_t blk = a.nsplit == 1 ? it : it / a.nsplit;
    const int64_t part = it - blk * a.nsplit;
    const Offs o0 = level_offs(G.lv[0], blk);
    const bool keep = a.bmask[o0.o[kS]];
    const int64_t e0 = part * a.chunk;
    const int64_t e1 = e0 + a.chunk < G.ne ? e0 + a.chunk : G.ne;
    if (a.expand) {
      bool* mp = a.emask + o0.o[kE];
      for (int64_t e = e0 + grp.rank; e < e1; e += grp.size) mp[level_offs(G.lv[2], e).o[kE]] = keep;
    } else if (!keep) {
      T* xp = a.x + o0.o[kX];
      for (int64_t e = e0 + grp.rank; e < e1; e += grp.size) xp[level_offs(G.lv[2], e).o[kX]] = T(0);
    }
  }
}

// ---------------------------------------------------------------------------
// soft_kernel: group-lasso proximal step per block (scope-less layout)
// ---------------------------------------------------------------------------

template <typename T>
struct SoftArgs {
  Geo G;
  T* x;
  const void* h;  // acc_of<T> conditioner (set kV) or null
  const void* t;  // acc_of<T> thresholds, contiguous grid (set kS)
  double atol, eps;
  int64_t max_iter;
  int lanes;
};

template <typename T, bool CTA>
__global__ void __launch_bounds__(kThreads) soft_kernel(const SoftArgs<T> a) {
  using A = acc_of<T>;
  __shared__ A sh[kWarps];
  const Geo& G = a.G;
  const Group<CTA> grp(a.lanes);
  const int64_t ne = G.ne;
  const A* h = static_cast<const A*>(a.h);
  const A* thr = static_cast<const A*>(a.t);
  const A eps = static_cast<A>(a.eps), atol = static_cast<A>(a.atol);
  // this lane's elements are e = rank + c * size; cached in registers when c < kCache covers them
  const bool cached = ne <= static_cast<int64_t>(grp.size) * kCache;
  const DLevel& L2 = G.lv[2];
  for (int64_t b = grp.first; b < G.numscp; b += grp.step) {
    const Offs o0 = level_offs(G.lv[0], b);
    T* xb = a.x + o0.o[kX];
    A tb = thr[o0.o[kS]];
    A xc[kCache], hc[kCache];
    int64_t ox[kCache], ov[kCache];  // offsets of the cached elements (x, conditioner)
    if (cached) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        const int64_t e = grp.rank + static_cast<int64_t>(c) * grp.size;
        const Offs oe = level_offs(L2, e < ne ? e : 0);
        ox[c] = oe.o[kX];
        ov[c] = oe.o[kV];
      }
    }
    if (h == nullptr || ne == 1) {
      if (h != nullptr) tb = tb / h[o0.o[kV]];  // single element: t / h
      A n2 = 0;
      if (cached) {
#pragma unroll
        for (int c = 0; c < kCache; ++c) {
          const int64_t e = grp.rank + static_cast<int64_t>(c) * grp.size;
          xc[c] = e < ne ? static_cast<A>(xb[ox[c]]) : A(0);
          if (e < ne) n2 = n2 + mul_rn(xc[c], xc[c]);
        }
      } else {
        for (int64_t e = grp.rank; e < ne; e += grp.size) {
          const A v = static_cast<A>(xb[level_offs(L2, e).o[kX]]);
          n2 = n2 + mul_rn(v, v);
        }
      }
      n2 = grp.reduce(n2, AddOp{}, sh);
      const A n = sqrt_of(n2);
      A scale = A(1) - tb / (n + eps);
      scale = scale > A(0) ? scale : A(0);  // clamp(min=0); a NaN scale (inf / inf, 0 / 0) counts as 0: SOFT_RULE
      const bool dead = is_nan(n), zero = !(scale > A(0));
      if (cached) {
#pragma unroll
        for (int c = 0; c < kCache; ++c) {
          const int64_t e = grp.rank + static_cast<int64_t>(c) * grp.size;
          if (e < ne) xb[ox[c]] = static_cast<T>(dead ? A(0) : zero ? signed_zero(xc[c]) : xc[c] * scale);
        }
      } else {
        for (int64_t e = grp.rank; e < ne; e += grp.size) {
          const int64_t off = level_offs(L2, e).o[kX];
          const A v = static_cast<A>(xb[off]);
          xb[off] = static_cast<T>(dead ? A(0) : zero ? signed_zero(v) : v * scale);
        }
      }
      continue;
    }
    // diagonal metric h: y = h x / (h + mu), mu by bisection on mu ||h x / (h + mu)|| = t
    const A* hb = h + o0.o[kV];
    A s2 = 0, hmin = pinf_of<A>(), hmax = ninf_of<A>();
    if (cached) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        const int64_t e = grp.rank + static_cast<int64_t>(c) * grp.size;
        xc[c] = A(0);  // h * x
        hc[c] = A(1);
        if (e < ne) {
          hc[c] = hb[ov[c]];
          xc[c] = mul_rn(static_cast<A>(xb[ox[c]]), hc[c]);
          s2 = s2 + mul_rn(xc[c], xc[c]);
          hmin = MinNanOp{}(hmin, hc[c]);
          hmax = max_nan(hmax, hc[c]);
        }
      }
    } else {
      for (int64_t e = grp.rank; e < ne; e += grp.size) {
        const Offs oe = level_offs(L2, e);
        const A hv = hb[oe.o[kV]];
        const A hw = mul_rn(static_cast<A>(xb[oe.o[kX]]), hv);
        s2 = s2 + mul_rn(hw, hw);
        hmin = MinNanOp{}(hmin, hv);
        hmax = max_nan(hmax, hv);
      }
    }
    s2 = grp.reduce(s2, AddOp{}, sh);
    hmin = grp.reduce(hmin, MinNanOp{}, sh);
    hmax = grp.reduce(hmax, MaxNanOp{}, sh);
    const A nhw = sqrt_of(s2);
    if (!(nhw > tb)) {  // dead block (NaN norm included)
      for (int64_t e = grp.rank; e < ne; e += grp.size) xb[level_offs(L2, e).o[kX]] = T(0);
      continue;
    }
    const A denom = (nhw - tb) + eps;
    A lo = tb * hmin / denom, hi = tb * hmax / denom;
    lo = lo < A(0) ? A(0) : lo;
    hi = hi < A(0) ? A(0) : hi;
    A mu = (lo + hi) / A(2);
    for (int64_t itr = 0; itr < a.max_iter; ++itr) {
      A z2 = 0;
      if (cached) {
#pragma unroll
        for (int c = 0; c < kCache; ++c) {
          const int64_t e = grp.rank + static_cast<int64_t>(c) * grp.size;
          if (e < ne) {
            const A z = xc[c] / (hc[c] + mu);
            z2 = z2 + mul_rn(z, z);
          }
        }
      } else {
        for (int64_t e = grp.rank; e < ne; e += grp.size) {
          const Offs oe = level_offs(L2, e);
          const A hv = hb[oe.o[kV]];
          const A z = mul_rn(static_cast<A>(xb[oe.o[kX]]), hv) / (hv + mu);
          z2 = z2 + mul_rn(z, z);
        }
      }
      z2 = grp.reduce(z2, AddOp{}, sh);
      const A zeta = mu * sqrt_of(z2);
      if (zeta < tb) {
        lo = mu;
      } else {
        hi = mu;
      }
      mu = (lo + hi) / A(2);
      if (abs_of(hi - lo) < atol) break;  // group-uniform
    }
    if (cached) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        const int64_t e = grp.rank + static_cast<int64_t>(c) * grp.size;
        if (e < ne) xb[ox[c]] = static_cast<T>(xc[c] / (hc[c] + mu));
      }
    } else {
      for (int64_t e = grp.rank; e < ne; e += grp.size) {
        const Offs oe = level_offs(L2, e);
        const A hv = hb[oe.o[kV]];
        xb[oe.o[kX]] = static_cast<T>(mul_rn(static_cast<A>(xb[oe.o[kX]]), hv) / (hv + mu));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// host: launches
// ---------------------------------------------------------------------------

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Group shape for per-block work over `nblk` blocks of `ne` elements: lanes (sub-warp) or a
// CTA per block, and a split of huge blocks into parts when there are too few blocks.
struct Plan {
  bool cta = false;
  int lanes = 1;
  int64_t nsplit = 1, chunk = 1;
};

Plan plan_blocks(int64_t nblk, int64_t ne, int dev, bool allow_split) {
  Plan P;
  const int64_t sms = sm_count(dev);
  P.chunk = ne;
  if (ne <= 32) {
    P.lanes = lanes_for(ne);
  } else if (ne <= 4096 || nblk >= sms * 64) {
    P.lanes = 32;
  } else {
    P.cta = true;
    P.lanes = kThreads;
  }
  if (allow_split && P.cta && nblk < sms * 4 && ne > 2 * kSplitChunk) {
    const int64_t want = ceil_div(sms * 8, nblk);
    P.nsplit = std::max<int64_t>(1, std::min(want, ceil_div(ne, kSplitChunk)));
    P.chunk = ceil_div(ne, P.nsplit);
    P.nsplit = ceil_div(ne, P.chunk);
  }
  return P;
}

int64_t ctas_for(int64_t nitems, const Plan& P) { return ceil_div(nitems, P.cta ? 1 : kThreads / P.lanes); }

// Block scores (dst, acc dtype, scope-major) or block norms (norm, set kS) of every block.
template <typename T>
void launch_scores(const Geo& G, const T* v, int kind, double p, void* dst, T* norm, const at::Device& dev,
                   cudaStream_t stream) {
  using A = acc_of<T>;
  const int di = dev.index();
  const int64_t nblk = G.numscp * G.nb;
  const Plan P = plan_blocks(nblk, G.ne, di, /*allow_split=*/true);
  ScoreArgs<T> a;
  a.G = G;
  a.v = v;
  a.p = p;
  a.inv_p = 1.0 / p;
  a.kind = kind;
  a.lanes = P.lanes;
  a.nsplit = P.nsplit;
  a.chunk = P.chunk;
  a.nitems = nblk * P.nsplit;
  Tensor part;
  if (P.nsplit > 1) {
    part = at::empty({a.nitems}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value).device(dev));
    a.dst = part.data_ptr();
    a.norm = nullptr;
  } else {
    a.dst = dst;
    a.norm = norm;
  }
  if (P.cta) {
    GK_LAUNCH((score_kernel<T, true>), grid_occ(score_kernel<T, true>, ctas_for(a.nitems, P), di), kThreads, 0, stream,
              a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    GK_LAUNCH((score_kernel<T, false>), grid_occ(score_kernel<T, false>, ctas_for(a.nitems, P), di), kThreads, 0,
              stream, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (P.nsplit > 1) {
    GK_LAUNCH(combine_kernel<T>, grid_for(ceil_div(nblk, kThreads), di), kThreads, 0, stream, G, part.data_ptr(), nblk,
              P.nsplit, dst, norm, kind, p, 1.0 / p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Grid mask -> element mask (expand) or zero x's dropped blocks; G: the scope-less layout.
template <typename T>
void launch_fill(const Geo& G, T* x, const bool* bmask, bool* emask, bool expand, const at::Device& dev,
                 cudaStream_t stream) {
  const int di = dev.index();
  FillArgs<T> a;
  a.G = G;
  a.x = x;
  a.bmask = bmask;
  a.emask = emask;
  a.expand = expand ? 1 : 0;
  a.lanes = lanes_for(G.ne);
  a.nsplit = G.ne > kSplitChunk ? ceil_div(G.ne, kSplitChunk) : 1;
  a.chunk = a.nsplit > 1 ? kSplitChunk : G.ne;
  a.nitems = G.numscp * a.nsplit;
  const unsigned grid = grid_occ(fill_kernel<T>, ceil_div(a.nitems, kThreads / a.lanes), di);
  GK_LAUNCH(fill_kernel<T>, grid, kThreads, 0, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void launch_multi_select(const Geo& G, const A* scores, int op, int64_t target, bool ties, Tensor& ws,
                         const at::Device& dev, cudaStream_t stream, bool* mask, int64_t k_for_below) {
  using K = typename KeyOf<A>::K;
  const int di = dev.index();
  Units U;
  U.nb = G.nb;
  U.nchunk = ceil_div(G.nb, kUnit);
  U.units = G.numscp * U.nchunk;
  const auto lopts = at::TensorOptions().dtype(at::kLong).device(dev);
  ws = at::zeros({G.numscp * kWsN}, lopts);
  Tensor hist = at::zeros({G.numscp * kBins}, lopts);
  auto* w = reinterpret_cast<unsigned long long*>(ws.data_ptr<int64_t>());
  auto* hp = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  const unsigned ugrid = grid_occ(multi_hist_kernel<A>, U.units, di);
  const unsigned sgrid = grid_occ(multi_walk_kernel<A>, G.numscp, di);
  GK_LAUNCH(multi_count_kernel<A>, ugrid, kThreads, 0, stream, scores, U, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  GK_LAUNCH(multi_init_kernel, grid_for(ceil_div(G.numscp, kThreads), di), kThreads, 0, stream, G.numscp, w, op,
            target);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr int kKeyBits = static_cast<int>(sizeof(K)) * 8;
  for (int shift = kKeyBits - 8; shift >= 0; shift -= 8) {
    GK_LAUNCH(multi_hist_kernel<A>, ugrid, kThreads, 0, stream, scores, U, w, hp, shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    GK_LAUNCH(multi_walk_kernel<A>, sgrid, kThreads, 0, stream, G.numscp, w, hp, shift);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (op == kOpKth) {
    if (k_for_below > 0) {
      GK_LAUNCH(multi_below_kernel<A>, ugrid, kThreads, 0, stream, scores, U, w, k_for_below);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }
  Tensor eq;
  const unsigned long long* eqb = nullptr;
  if (!ties) {
    eq = at::empty({U.units}, lopts);
    auto* ep = reinterpret_cast<unsigned long long*>(eq.data_ptr<int64_t>());
    GK_LAUNCH(multi_eq_kernel<A>, ugrid, kThreads, 0, stream, scores, U, w, ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    GK_LAUNCH(multi_eqscan_kernel, sgrid, kThreads, 0, stream, G.numscp, U.nchunk, ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    eqb = ep;
  }
  GK_LAUNCH(multi_write_kernel<A>, ugrid, kThreads, 0, stream, G, scores, U, w, eqb, mask, ties ? 1 : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One selection op (scope_kth / scope_mask / scope_hard_threshold_) after validation.
// v: the scored tensor (x, or `values`), Y: the scoped layout with v's strides as set kV.
// out: kth values (kOpKth), the element mask (kOpMaskElem) or the grid mask (others).
struct SelJob {
  int op = kOpMask;
  int kind = kP2;
  double p = 2.0, w = 0.0;
  int64_t target = 0;
  bool ties = false, mid = false;
  bool v_is_x = false;  // hard threshold scored on x itself (same pointer and strides)
};

template <typename T>
void run_select(const SelJob& J, const Tensor& x, const Tensor& v, const Layout& Y, c10::IntArrayRef block_shape,
                Tensor& out) {
  using A = acc_of<T>;
  const at::Device dev = x.device();
  const int di = dev.index();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Geo G = make_geo(Y);
  const int64_t numscp = Y.numscp, nb = Y.nb, ne = Y.ne;
  const int64_t sms = sm_count(di);
  const T* vp = v.data_ptr<T>();
  T* xp = J.op == kOpHard ? x.data_ptr<T>() : nullptr;
  bool* mp = J.op == kOpKth ? nullptr : out.data_ptr<bool>();
  T* kp = J.op == kOpKth ? out.data_ptr<T>() : nullptr;
  const int mset = J.op == kOpMaskElem ? kE : kB;
  const int lanes = lanes_for(ne);
  const bool fused = nb <= kSmallScope && (nb * ne <= 4096 || numscp * lanes >= sms * 512);

  if (fused && ne == 1 && Y.lv[0].nd <= 1 && Y.lv[1].nd <= 1) {
    NmArgs<T> a;
    a.v = vp;
    a.x = xp;
    a.mask = mp;
    a.out = kp;
    a.numscp = numscp;
    a.target = J.target;
    const Level& L0 = Y.lv[0];
    const Level& L1 = Y.lv[1];
    a.s0v = L0.nd ? L0.st[kV][0] : 0;
    a.s1v = L1.nd ? L1.st[kV][0] : 0;
    a.s0x = L0.nd ? L0.st[kX][0] : 0;
    a.s1x = L1.nd ? L1.st[kX][0] : 0;
    a.s0m = L0.nd ? L0.st[mset][0] : 0;
    a.s1m = L1.nd ? L1.st[mset][0] : 0;
    a.s0o = L0.nd ? L0.st[kS][0] : 0;
    a.w = J.w;
    a.nb = static_cast<int>(nb);
    a.op = J.op;
    a.raw = J.kind == kRaw ? 1 : 0;
    a.ties = J.ties ? 1 : 0;
    a.mid = J.mid ? 1 : 0;
    dispatch_nb(nb, [&](auto nbc) {
      constexpr int NB = decltype(nbc)::value;
      const bool rows_v = nb == NB && a.s1v == 1 && (numscp == 1 || a.s0v == NB);
      a.vec_v = rows_v && aligned_to(vp, std::min<int64_t>(16, NB * static_cast<int64_t>(sizeof(T)))) ? 1 : 0;
      a.vec_m = (mp != nullptr && nb == NB && a.s1m == 1 && (numscp == 1 || a.s0m == NB) &&
                 aligned_to(mp, std::min<int64_t>(16, NB)))
                    ? 1
                    : 0;
      a.vec_x = (J.op == kOpHard && J.v_is_x && a.vec_v) ? 1 : 0;
      GK_LAUNCH((nm_kernel<T, NB>), grid_occ(nm_kernel<T, NB>, ceil_div(numscp, kThreads), di), kThreads, 0, stream, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }

  if (fused) {
    SmallArgs<T> a;
    std::memset(a.boff_v, 0, sizeof(a.boff_v));
    std::memset(a.boff_x, 0, sizeof(a.boff_x));
    std::memset(a.boff_m, 0, sizeof(a.boff_m));
    const auto ov = level_offsets(Y.lv[1], kV), ox = level_offsets(Y.lv[1], kX), om = level_offsets(Y.lv[1], mset);
    for (int64_t j = 0; j < nb; ++j) {
      a.boff_v[j] = ov[static_cast<size_t>(j)];
      a.boff_x[j] = ox[static_cast<size_t>(j)];
      a.boff_m[j] = om[static_cast<size_t>(j)];
    }
    a.G = G;
    a.v = vp;
    a.x = xp;
    a.mask = mp;
    a.out = kp;
    a.p = J.p;
    a.inv_p = 1.0 / J.p;
    a.w = J.w;
    a.target = J.target;
    a.op = J.op;
    a.kind = J.kind;
    a.lanes = lanes;
    a.ties = J.ties ? 1 : 0;
    a.mid = J.mid ? 1 : 0;
    dispatch_nb(nb, [&](auto nbc) {
      constexpr int NB = decltype(nbc)::value;
      const unsigned grid = grid_occ(small_kernel<T, NB>, ceil_div(numscp, kThreads / lanes), di);
      GK_LAUNCH((small_kernel<T, NB>), grid, kThreads, 0, stream, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }

  // Large scopes: scores -> select (grid mask / kth) -> expand / apply.
  const auto aopts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value).device(dev);
  Tensor scores = at::empty({numscp * nb}, aopts);
  launch_scores<T>(G, vp, J.kind, J.p, scores.data_ptr(), nullptr, dev, stream);
  const A* sp = static_cast<const A*>(scores.data_ptr());

  Tensor gmask;
  bool* gm = mp;  // grid mask written by the select (set kB)
  if (J.op == kOpMaskElem && ne > 1) {
    gmask = at::empty(Y.grid, x.options().dtype(at::kBool));
    gm = gmask.data_ptr<bool>();
  }
  // (kOpMaskElem with single-element blocks: the element mask is the grid mask, same memory layout)
  const int sel_op = J.op == kOpKth ? kOpKth : kOpMask;
  // the multi-CTA select counts in 64 bits; the one-CTA select in 32 (a scope of >= 2^31 blocks, e.g. one scope
  // over a whole model, always takes the multi-CTA select)
  const bool multi = (numscp * 2 < sms && nb >= 65536) || nb > static_cast<int64_t>(INT32_MAX);
  if (multi) {
    Tensor ws;
    launch_multi_select<A>(G, sp, sel_op, J.target, J.ties, ws, dev, stream, gm,
                           (sel_op == kOpKth && J.mid) ? J.target : 0);
    if (sel_op == kOpKth) {
      GK_LAUNCH(multi_kth_kernel<T>, grid_for(ceil_div(numscp, kThreads), di), kThreads, 0, stream, G,
                reinterpret_cast<const unsigned long long*>(ws.data_ptr<int64_t>()), kp, J.target, J.mid ? 1 : 0, J.w,
                J.kind, 1.0 / J.p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    SelArgs<T> a;
    a.G = G;
    a.scores = sp;
    a.mask = gm;
    a.out = kp;
    a.inv_p = 1.0 / J.p;
    a.w = J.w;
    a.target = J.target;
    a.op = sel_op;
    a.kind = J.kind;
    a.ties = J.ties ? 1 : 0;
    a.mid = J.mid ? 1 : 0;
    const int64_t bytes = nb * static_cast<int64_t>(sizeof(A));
    a.cache = bytes <= 32 * 1024 ? 1 : 0;
    const size_t dyn = a.cache ? static_cast<size_t>(bytes) : 0;
    GK_LAUNCH(select_cta_kernel<T>, grid_occ(select_cta_kernel<T>, numscp, di, dyn), kThreads, dyn, stream, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if ((J.op == kOpMaskElem && ne > 1) || J.op == kOpHard) {
    const Layout Yg = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, {});
    const Geo Gg = make_geo(Yg);
    if (J.op == kOpHard) {
      launch_fill<T>(Gg, xp, mp, nullptr, /*expand=*/false, dev, stream);
    } else {
      launch_fill<T>(Gg, nullptr, gm, mp, /*expand=*/true, dev, stream);
    }
  }
}

// ---------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------

Tensor block_norms_cuda(const Tensor& x, c10::IntArrayRef block_shape, double p) {
  const char* op = "block_norms";
  check_layout(x, block_shape, c10::nullopt, op);
  check_p(p, op);
  Tensor out = at::empty(grid_shape(x, block_shape), x.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Layout Y = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, {});
  const Geo G = make_geo(Y);
  const int kind = score_kind(false, Y.ne, p);
  GK_SCOPE_DISPATCH(x.scalar_type(), "block_norms", [&] {
    launch_scores<scalar_t>(G, x.data_ptr<scalar_t>(), kind, p, nullptr, out.data_ptr<scalar_t>(), x.device(),
                            stream);
  });
  return out;
}

Tensor scope_kth_cuda(const Tensor& x, c10::IntArrayRef block_shape, c10::IntArrayRef scope_shape, int64_t k,
                      double p, bool raw, double k_weight, bool mid) {
  const char* op = "scope_kth";
  check_layout(x, block_shape, scope_shape, op);
  check_p(p, op);
  check_raw(raw, block_shape, op);
  const int64_t nb = prod(scope_shape);
  TORCH_CHECK_VALUE(k >= 1 && k <= (mid ? nb - 1 : nb), "scope_kth: k: expected 1 <= k <= ", mid ? nb - 1 : nb,
                    ", got ", k);
  TORCH_CHECK_VALUE(k_weight >= 0 && std::isfinite(k_weight), "scope_kth: k_weight: expected a finite number >= 0");
  const Layout Y = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, scope_shape);
  Tensor out = at::empty(Y.sgrid, x.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  SelJob J;
  J.op = kOpKth;
  J.kind = score_kind(raw, Y.ne, p);
  J.p = p;
  J.w = k_weight;
  J.target = k;
  J.mid = mid;
  GK_SCOPE_DISPATCH(x.scalar_type(), "scope_kth", [&] { run_select<scalar_t>(J, x, x, Y, block_shape, out); });
  return out;
}

Tensor scope_mask_cuda(const Tensor& x, c10::IntArrayRef block_shape, c10::IntArrayRef scope_shape, int64_t nnz,
                       double p, bool raw, bool keep_ties, bool expand) {
  const char* op = "scope_mask";
  check_layout(x, block_shape, scope_shape, op);
  check_p(p, op);
  check_raw(raw, block_shape, op);
  const int64_t nb = prod(scope_shape);
  TORCH_CHECK_VALUE(nnz >= 0 && nnz <= nb, "scope_mask: nnz: expected 0 <= nnz <= ", nb, ", got ", nnz);
  const Layout Y = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, scope_shape);
  Tensor out = expand ? at::empty(x.sizes(), x.options().dtype(at::kBool))
                      : at::empty(Y.grid, x.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  SelJob J;
  J.op = expand ? kOpMaskElem : kOpMask;
  J.kind = score_kind(raw, Y.ne, p);
  J.p = p;
  J.target = nnz;
  J.ties = keep_ties;
  GK_SCOPE_DISPATCH(x.scalar_type(), "scope_mask", [&] { run_select<scalar_t>(J, x, x, Y, block_shape, out); });
  return out;
}

Tensor scope_hard_threshold_cuda(Tensor& x, const std::optional<Tensor>& values, c10::IntArrayRef block_shape,
                                 c10::IntArrayRef scope_shape, int64_t nnz, double p, bool keep_ties) {
  const char* op = "scope_hard_threshold_";
  check_layout(x, block_shape, scope_shape, op);
  check_p(p, op);
  const int64_t nb = prod(scope_shape);
  TORCH_CHECK_VALUE(nnz >= 0 && nnz <= nb, "scope_hard_threshold_: nnz: expected 0 <= nnz <= ", nb, ", got ", nnz);
  Tensor v = x;
  bool v_is_x = true;
  if (values.has_value() && values->defined()) {
    v = *values;
    check_companion(v, x, x.sizes(), "values", op);
    TORCH_CHECK_TYPE(v.scalar_type() == x.scalar_type(), "scope_hard_threshold_: values: dtype ", v.scalar_type(),
                     " differs from x's ", x.scalar_type());
    v_is_x = v.data_ptr() == x.data_ptr() && v.strides() == x.strides();
  }
  at::assert_no_internal_overlap(x);
  if (!v_is_x) v = detach_from(v, x);  // x is zeroed while v is read
  const Layout Y = make_layout(x.sizes(), x.strides(), v.strides(), block_shape, scope_shape);
  Tensor out = at::empty(Y.grid, x.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  SelJob J;
  J.op = kOpHard;
  J.kind = score_kind(false, Y.ne, p);
  J.p = p;
  J.target = nnz;
  J.ties = keep_ties;
  J.v_is_x = v_is_x;
  GK_SCOPE_DISPATCH(x.scalar_type(), "scope_hard_threshold_",
                    [&] { run_select<scalar_t>(J, x, v, Y, block_shape, out); });
  return out;
}

void block_apply_mask_cuda(Tensor& x, c10::IntArrayRef block_shape, const Tensor& block_mask) {
  const char* op = "block_apply_mask_";
  check_layout(x, block_shape, c10::nullopt, op);
  const auto grid = grid_shape(x, block_shape);
  check_companion(block_mask, x, grid, "block_mask", op, /*want_bool=*/true);
  if (x.numel() == 0) return;
  at::assert_no_internal_overlap(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor m = detach_from(block_mask, x).contiguous();
  const Layout Y = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, {});
  const Geo G = make_geo(Y);
  GK_SCOPE_DISPATCH(x.scalar_type(), "block_apply_mask_", [&] {
    launch_fill<scalar_t>(G, x.data_ptr<scalar_t>(), m.data_ptr<bool>(), nullptr, /*expand=*/false, x.device(),
                          stream);
  });
}

void block_soft_threshold_cuda(Tensor& x, c10::IntArrayRef block_shape, const Tensor& thresholds,
                               const std::optional<Tensor>& conditioner, int64_t max_iter, double atol, double eps) {
  const char* op = "block_soft_threshold_";
  check_layout(x, block_shape, c10::nullopt, op);
  const auto grid = grid_shape(x, block_shape);
  check_companion(thresholds, x, grid, "thresholds", op);
  const bool has_h = conditioner.has_value() && conditioner->defined();
  if (has_h) check_companion(*conditioner, x, x.sizes(), "conditioner", op);
  TORCH_CHECK_VALUE(max_iter >= 0, op, ": max_iter: expected >= 0, got ", max_iter);
  TORCH_CHECK_VALUE(atol >= 0 && eps >= 0, op, ": atol and eps must be >= 0");
  if (x.numel() == 0) return;
  at::assert_no_internal_overlap(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType at_acc = acc_type(x.scalar_type());
  // Both are read while x is rewritten: never alias x's memory.
  const Tensor t = detach_from(thresholds.to(at_acc).contiguous(), x);
  const Tensor h = has_h ? detach_from(conditioner->to(at_acc), x) : Tensor();
  // thresholds >= 0, conditioner finite and > 0, before x is written (one D2H copy: the op's only sync)
  check_soft_values(t, h, op);
  const Layout Y = make_layout(x.sizes(), x.strides(), h.defined() ? h.strides() : x.strides(), block_shape, {});
  const Geo G = make_geo(Y);
  const int di = x.device().index();
  GK_SCOPE_DISPATCH(x.scalar_type(), "block_soft_threshold_", [&] {
    SoftArgs<scalar_t> a;
    a.G = G;
    a.x = x.data_ptr<scalar_t>();
    a.h = h.defined() ? h.data_ptr() : nullptr;
    a.t = t.data_ptr();
    a.atol = atol;
    a.eps = eps;
    a.max_iter = max_iter;
    const Plan P = plan_blocks(Y.numscp, Y.ne, di, /*allow_split=*/false);
    a.lanes = P.lanes;
    const int64_t ctas = ctas_for(Y.numscp, P);
    if (P.cta) {
      GK_LAUNCH((soft_kernel<scalar_t, true>), grid_occ(soft_kernel<scalar_t, true>, ctas, di), kThreads, 0, stream, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      GK_LAUNCH((soft_kernel<scalar_t, false>), grid_occ(soft_kernel<scalar_t, false>, ctas, di), kThreads, 0, stream,
                a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace
}  // namespace scope
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CUDA, m) {
  using namespace gradkit::scope;
  m.impl("block_norms", &block_norms_cuda);
  m.impl("scope_kth", &scope_kth_cuda);
  m.impl("scope_mask", &scope_mask_cuda);
  m.impl("scope_hard_threshold_", &scope_hard_threshold_cuda);
  m.impl("block_apply_mask_", &block_apply_mask_cuda);
  m.impl("block_soft_threshold_", &block_soft_threshold_cuda);
}

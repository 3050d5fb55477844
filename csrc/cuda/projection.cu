// CUDA kernels for the projection family: counter-based projection matrices generated inside the
// matrix-product tiles (never stored in global memory). Semantics, entry for entry:
// python/gradkit/kernels/reference/projection.py (the same splitmix64 words as the CPU kernel:
// Rademacher bit-identical, Gaussian Box-Muller in float64 rounded to fp32).
//
// project_flat: grid (k tiles of kBK, B tiles of kBB, D splits). A block of kThreads = 256 keeps a
// kBB x kBK fp32 accumulator (4 x 4 per thread) and walks its share of the D tiles of kBD = 64
// columns; tiles start on multiples of 64 of the GLOBAL column index, so each row of the R tile
// is exactly one 64-bit word: threads 0..kBK-1 hash one word each into shared memory, then every
// thread expands bits into the shared fp32 tile (Gaussian: one Box-Muller pair per entry pair).
// x is loaded (any float dtype -> fp32, masked to [col0, col0 + D)) into shared memory, and the
// tile product runs as register-blocked fp32 FMAs. D splits write partial sums to a
// (split, B, k) buffer reduced afterwards in a fixed order (deterministic).
//
// projection_matrix_: one thread per entry pair of columns (grid-stride), fp32 values cast to
// out's dtype.
//
// Headers and conventions as in the other csrc/cuda files: only c10/cuda/* (no
// ATen/cuda/CUDAContext.h), a CUDAGuard, launches on the current stream, int64 offsets.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <cuda_fp16.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "../factored_checks.h"
#include "../project_wide.h"

namespace gradkit {
namespace projection {
namespace {

constexpr int kThreads = 256;
constexpr int kBB = 64;  // batch rows per block
#ifndef GK_MAX_GRID_Y
#define GK_MAX_GRID_Y 65535  // gridDim.y's limit (tests/test_cuda_emulated.py builds with 1: slices of 64 rows)
#endif
constexpr int kBK = 64;  // output features (rows of R) per block
constexpr int kBD = 64;  // columns per tile: one 64-bit word per row of R

constexpr uint64_t kMixA = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kMixB = 0x94D049BB133111EBull;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kRowC = 0x632BE59BD9B4E019ull;

__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMixA;
  z = (z ^ (z >> 27)) * kMixB;
  return z ^ (z >> 31);
}
__host__ __device__ __forceinline__ uint64_t row_key(uint64_t seed, uint64_t row) {
  return mix64(seed ^ mix64(row + kRowC));
}
__host__ __device__ __forceinline__ uint64_t word_hash(uint64_t rk, uint64_t w) { return mix64(rk + (w + 1) * kGolden); }

// Box-Muller entry (cos for even col, sin for odd) in float64, correctly rounded intrinsics only
// for the conversions; log/sqrt/sin/cos are CUDA's float64 ones (<= 1-2 ulp of float64), so the
// fp32 result is within 1 ulp of every other backend's. __dmul_rn / __dadd_rn: no FMA contraction.
__device__ __forceinline__ float gauss_entry(uint64_t h, bool odd, double inv) {
  const double u1 = __dmul_rn(__dadd_rn(static_cast<double>(h >> 32), 0.5), 2.3283064365386963e-10);
  const double u2 = __dmul_rn(static_cast<double>(h & 0xffffffffull), 2.3283064365386963e-10);
  const double r = sqrt(__dmul_rn(-2.0, log(u1)));
  const double t = __dmul_rn(6.283185307179586, u2);
  const double z = __dmul_rn(r, odd ? sin(t) : cos(t));
  return __double2float_rn(__dmul_rn(z, inv));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) project_flat_kernel(const scalar_t* __restrict__ x, float* __restrict__ part,
                                                                int64_t B, int64_t D, int64_t K, int64_t sxb, int64_t sxd,
                                                                uint64_t seed, int64_t col0, int64_t ntiles, int64_t per,
                                                                int kind, double inv) {
  __shared__ float xs[kBD][kBB + 1];  // x tile, transposed: xs[d][b]
  __shared__ float rs[kBD][kBK + 1];  // R tile, transposed: rs[d][r]
  __shared__ uint64_t words[kBK];
  __shared__ uint64_t rkeys[kBK];
  const int tid = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBK;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kBB;
  const int64_t base = col0 - (col0 & 63);
  if (tid < kBK) rkeys[tid] = row_key(seed, static_cast<uint64_t>(r0 + tid));
  const float s = static_cast<float>(inv);
  // thread (ty, tx) owns outputs b = ty + 16 i, r = tx + 16 j (i, j < 4)
  const int tx = tid & 15, ty = tid >> 4;
  float acc[4][4] = {};
  const int64_t t0 = static_cast<int64_t>(blockIdx.z) * per;
  const int64_t t1 = std::min<int64_t>(t0 + per, ntiles);
  __syncthreads();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = base + t * kBD;  // global column of the tile's first column (multiple of 64)
    if (kind == 0 && tid < kBK) words[tid] = word_hash(rkeys[tid], static_cast<uint64_t>(c0) >> 6);
    // x tile: element e = (b, d), coalesced along d
    for (int e = tid; e < kBB * kBD; e += kThreads) {
      const int b = e / kBD, d = e % kBD;
      const int64_t gd = c0 + d - col0;
      float v = 0.f;
      if (b0 + b < B && gd >= 0 && gd < D) v = static_cast<float>(x[(b0 + b) * sxb + gd * sxd]);
      xs[d][b] = v;
    }
    __syncthreads();
    for (int e = tid; e < kBK * kBD; e += kThreads) {
      const int r = e / kBD, d = e % kBD;
      float v;
      if (kind == 0) {
        v = ((words[r] >> d) & 1ull) ? s : -s;
      } else {
        const uint64_t c = static_cast<uint64_t>(c0 + d);
        v = gauss_entry(word_hash(rkeys[r], c >> 1), (c & 1ull) != 0, inv);
      }
      rs[d][r] = v;
    }
    __syncthreads();
#pragma unroll 8
    for (int d = 0; d < kBD; ++d) {
      float xa[4], ra[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xa[i] = xs[d][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) ra[j] = rs[d][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xa[i], ra[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* out = part + static_cast<int64_t>(blockIdx.z) * B * K;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t b = b0 + ty + 16 * i;
    if (b >= B) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + tx + 16 * j;
      if (r < K) out[b * K + r] = acc[i][j];
    }
  }
}

template <typename out_t>
__global__ void matrix_kernel(out_t* __restrict__ out, int64_t rows, int64_t cols, int64_t so_r, int64_t so_c,
                              uint64_t seed, int64_t row0, int64_t col0, int kind, double inv) {
  const int64_t n = rows * cols;
  const float s = static_cast<float>(inv);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols, c = e % cols;
    const uint64_t rk = row_key(seed, static_cast<uint64_t>(row0 + r));
    const uint64_t gc = static_cast<uint64_t>(col0 + c);
    float v;
    if (kind == 0) {
      v = ((word_hash(rk, gc >> 6) >> (gc & 63)) & 1ull) ? s : -s;
    } else {
      v = gauss_entry(word_hash(rk, gc >> 1), (gc & 1ull) != 0, inv);
    }
    out[r * so_r + c * so_c] = static_cast<out_t>(v);
  }
}

void projection_matrix_cuda(const at::Tensor& out, int64_t seed, int64_t kind, int64_t k, int64_t row0, int64_t col0) {
  check_projection_matrix(out, seed, kind, k, row0, col0);
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const double inv = 1.0 / std::sqrt(static_cast<double>(k));
  const int dev = out.device().index();
  const int64_t blocks = std::min<int64_t>((rows * cols + kThreads - 1) / kThreads, 8LL * cuda::sm_count(dev));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "projection_matrix_cuda", [&] {
    GK_LAUNCH(matrix_kernel<scalar_t>, static_cast<unsigned>(blocks), kThreads, 0, stream, out.data_ptr<scalar_t>(),
              rows, cols, out.stride(0), out.stride(1), static_cast<uint64_t>(seed), row0, col0,
              static_cast<int>(kind), inv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor project_flat_cuda(const at::Tensor& x, int64_t k, int64_t seed, int64_t kind, int64_t col0) {
  check_project_flat(x, k, seed, kind, col0);
  const auto st = x.scalar_type();
  const c10::cuda::CUDAGuard guard(x.device());
  if (auto wide = project_flat_wide_rows(x, [&](const at::Tensor& xs) {  // float64 past float32's range
        return project_flat_cuda(xs, k, seed, kind, col0);
      }))
    return *wide;
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor out = at::zeros({B, k}, x.options().dtype(at::kFloat));
  if (B == 0 || D == 0) return out;
  const int64_t base = col0 - (col0 & 63);
  const int64_t ntiles = (col0 + D - base + kBD - 1) / kBD;
  const int64_t gk = (k + kBK - 1) / kBK, gb = (B + kBB - 1) / kBB;
  TORCH_CHECK_VALUE(gk <= 2147483647LL, "k: too large for one launch (k = ", k, ")");
  if (gb > GK_MAX_GRID_Y) {  // row tiles on grid axis y (at most 65535): slices of rows, each row's sums its own
    const int64_t step = static_cast<int64_t>(GK_MAX_GRID_Y) * kBB;
    for (int64_t b0 = 0; b0 < B; b0 += step) {
      const int64_t n = std::min(step, B - b0);
      out.narrow(0, b0, n).copy_(project_flat_cuda(x.narrow(0, b0, n), k, seed, kind, col0));
    }
    return out;
  }
  const int dev = x.device().index();
  const int64_t target = 4LL * cuda::sm_count(dev);
  int64_t split = std::max<int64_t>(1, std::min<int64_t>(ntiles, target / std::max<int64_t>(1, gk * gb)));
  split = std::min<int64_t>(split, 65535);
  const int64_t per = (ntiles + split - 1) / split;
  split = (ntiles + per - 1) / per;
  at::Tensor part = split == 1 ? out : at::empty({split, B, k}, out.options());
  const double inv = 1.0 / std::sqrt(static_cast<double>(k));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(gk), static_cast<unsigned>(gb), static_cast<unsigned>(split));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "project_flat_cuda", [&] {
    GK_LAUNCH(project_flat_kernel<scalar_t>, grid, kThreads, 0, stream, x.data_ptr<scalar_t>(), part.data_ptr<float>(),
              B, D, k, x.stride(0), x.stride(1), static_cast<uint64_t>(seed), col0, ntiles, per,
              static_cast<int>(kind), inv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (split > 1) at::sum_out(out, part, {0});
  return out;
}

// factored_project (csrc/cpu/projection.cpp has the semantics and the arithmetic order): one block per
// run of whole examples (T <= kFChunk; tiles span examples, so short sequences share each lt / rt pass) or
// per (example, chunk of kFChunk tokens), writing the p x p partials; chunk partials are added per example
// in chunk order afterwards (as on the CPU). Per tile of kFT tokens the
// block forms u = g_t lt and v = a_t rt (+ rb) as small shared-memory GEMMs: the token rows are staged
// kFKC features at a time (loads coalesced along the feature dimension), the matching kFKC rows of lt / rt
// beside them, and each thread keeps fmaf chains over the features ascending for the (token, output)
// pairs it owns -- the CPU kernel's fused multiply-adds in the CPU kernel's order, so the two agree bit
// for bit. Masked tokens are never read (u = v = 0, which leaves every partial unchanged, NaN or not).
// Then every thread adds the tile's outer products, tokens in order, into the p x p entries it owns:
// part[i, j] = fmaf(u_i, v_j, part[i, j]).
constexpr int kFT = 32;            // tokens per tile
constexpr int kFKC = 64;           // features staged per step
constexpr int64_t kFChunk = 256;   // tokens per work item (csrc/cpu/projection.cpp kTokChunk)
constexpr int64_t kFMaxP = 64;     // p x p <= 4096 entries: 16 per thread of 256
constexpr int kFPerUV = static_cast<int>(kFT * kFMaxP / kThreads);  // (token, output) pairs per thread: 8

// a / g elements widened exactly to float32 on load (read-only cache path for every dtype).
__device__ __forceinline__ float widen(const float* p) { return __ldg(p); }
__device__ __forceinline__ float widen(const c10::BFloat16* p) {  // the top half of a float32
  return __uint_as_float(static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}
__device__ __forceinline__ float widen(const c10::Half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

template <typename E>
__device__ __forceinline__ void factored_side(const E* __restrict__ x, int64_t ldx, int64_t K,
                                              const float* __restrict__ wt, int64_t p, int64_t n0, int64_t ntok,
                                              const bool* __restrict__ mask, float* xs, float* ws, float* dst) {
  float acc[kFPerUV];
#pragma unroll
  for (int q = 0; q < kFPerUV; ++q) acc[q] = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += kFKC) {
    const int64_t kc = std::min<int64_t>(kFKC, K - k0);
    for (int e = threadIdx.x; e < kFT * kFKC; e += kThreads) {  // token rows, coalesced along features
      const int tt = e / kFKC, kk = e % kFKC;
      float v = 0.0f;
      if (tt < ntok && kk < kc && (mask == nullptr || mask[n0 + tt])) v = widen(x + (n0 + tt) * ldx + k0 + kk);
      xs[tt * (kFKC + 1) + kk] = v;
    }
    for (int64_t e = threadIdx.x; e < kc * p; e += kThreads) ws[e] = __ldg(wt + k0 * p + e);  // rows k0.. of wt
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kFPerUV; ++q) {
      const int64_t e = threadIdx.x + static_cast<int64_t>(q) * kThreads;
      if (e < kFT * p) {
        const int64_t tt = e / p, j = e % p;
        float s = acc[q];
        for (int64_t kk = 0; kk < kc; ++kk) s = fmaf(xs[tt * (kFKC + 1) + kk], ws[kk * p + j], s);
        acc[q] = s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < kFPerUV; ++q) {
    const int64_t e = threadIdx.x + static_cast<int64_t>(q) * kThreads;
    if (e < kFT * p) dst[e] = acc[q];
  }
}

template <typename E>
__global__ void __launch_bounds__(kThreads)
    factored_kernel(const E* __restrict__ a, const E* __restrict__ g, const float* __restrict__ lt,
                    const float* __restrict__ rt, const float* __restrict__ rb, const bool* __restrict__ mask,
                    float* __restrict__ part, int64_t B, int64_t T, int64_t chunks, int64_t per, int64_t I,
                    int64_t O, int64_t p, int64_t lda, int64_t ldg) {
  GK_DYNAMIC_SHARED(float, sm);
  float* us = sm;                        // kFT x p
  float* vs = us + kFT * p;              // kFT x p
  float* xs = vs + kFT * p;              // kFT x (kFKC + 1)
  float* ws = xs + kFT * (kFKC + 1);     // kFKC x p
  const int64_t item = blockIdx.x;
  // chunks == 1: the block's tokens are whole examples [b_lo, b_lo + per), whose partials are the rows
  // part[b_lo ..]; chunks > 1: one 256-token chunk of one example, partial part[item]
  int64_t b_lo, n_lo, n_hi;
  float* o;
  if (chunks == 1) {
    b_lo = item * per;
    n_lo = b_lo * T;
    n_hi = std::min<int64_t>(B, b_lo + per) * T;
    o = part + b_lo * p * p;
  } else {
    b_lo = item / chunks;
    const int64_t c = item % chunks;
    n_lo = b_lo * T + c * kFChunk;
    n_hi = b_lo * T + std::min<int64_t>(T, (c + 1) * kFChunk);
    o = part + item * p * p;
  }
  constexpr int kPer = static_cast<int>(kFMaxP * kFMaxP / kThreads);
  float acc[kPer];
  int ui[kPer], vj[kPer];  // the (i, j) of each entry this thread owns (i < 0: none)
  const int pp = static_cast<int>(p);
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int idx = static_cast<int>(threadIdx.x) + e * kThreads;
    acc[e] = 0.0f;
    ui[e] = idx < pp * pp ? idx / pp : -1;
    vj[e] = idx < pp * pp ? idx % pp : 0;
  }
  const auto flush = [&](float* dst) {  // this thread's entries of one example's partial
#pragma unroll
    for (int e = 0; e < kPer; ++e)
      if (ui[e] >= 0) dst[ui[e] * p + vj[e]] = acc[e];
  };
  int64_t cur = 0;  // the example (relative to b_lo) whose partial acc holds
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += kFT) {  // tiles may span examples
    const int64_t ntok = std::min<int64_t>(kFT, n_hi - n0);
    factored_side(g, ldg, O, lt, p, n0, ntok, mask, xs, ws, us);
    factored_side(a, lda, I, rt, p, n0, ntok, mask, xs, ws, vs);
    if (rb != nullptr) {
      for (int64_t e = threadIdx.x; e < ntok * p; e += kThreads) {
        const int64_t tt = e / p;
        if (mask == nullptr || mask[n0 + tt]) vs[e] = __fadd_rn(vs[e], __ldg(rb + e % p));
      }
    }
    __syncthreads();
    // every thread walks the tile's tokens in order; when the example changes it writes its entries of
    // the finished example's partial and starts the next from zero (so each example's entries are its
    // tokens' fused multiply-adds in token order from 0, as on the CPU; fully masked examples get zeros)
    for (int64_t tt = 0; tt < ntok; ++tt) {
      const int64_t ex = (n0 + tt) / T - b_lo;
      if (ex != cur) {
        flush(o + cur * p * p);
#pragma unroll
        for (int e = 0; e < kPer; ++e) acc[e] = 0.0f;
        cur = ex;
      }
      if (mask != nullptr && !mask[n0 + tt]) continue;  // skipped, as on the CPU
      const float* ut = us + tt * p;
      const float* vt = vs + tt * p;
#pragma unroll
      for (int e = 0; e < kPer; ++e)
        if (ui[e] >= 0) acc[e] = fmaf(ut[ui[e]], vt[vj[e]], acc[e]);
    }
    __syncthreads();
  }
  flush(o + cur * p * p);
}

at::Tensor factored_project_cuda(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& lt_in,
                                 const at::Tensor& rt_in, const std::optional<at::Tensor>& rb_in,
                                 const std::optional<at::Tensor>& mask_in, int64_t T) {
  check_factored(a_in, g_in, lt_in, rt_in, rb_in, mask_in, T);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const int64_t N = a_in.size(0), p = lt_in.size(1), B = N / T;
  if (p > kFMaxP) {  // wide projections: the composite (two GEMMs and a batched product), same definition
    // float32 products whatever torch's TF32 setting: the auto backend sends CUDA work here exactly while
    // TF32 is on (ops.cublas_fp32_reduced), counting on these kernels to stay float32-exact
    const at::NoTF32Guard no_tf32;
    at::Tensor u = at::mm(g_in.to(at::kFloat), lt_in), v = at::mm(a_in.to(at::kFloat), rt_in);
    if (rb_in.has_value()) v = v.add(*rb_in);
    if (mask_in.has_value()) {
      const at::Tensor m = mask_in->unsqueeze(1);
      u = at::where(m, u, at::zeros({}, u.options()));
      v = at::where(m, v, at::zeros({}, v.options()));
    }
    return at::bmm(u.view({B, T, p}).transpose(1, 2), v.view({B, T, p}));
  }
  if (B == 0) return at::empty({B, p, p}, a_in.options().dtype(at::kFloat));
  const FactoredInputs in = prepare_factored(a_in, g_in, lt_in, rt_in, rb_in, mask_in);
  const int64_t chunks = (T + kFChunk - 1) / kFChunk;
  // chunks == 1: blocks of `per` whole examples (tiles of kFT tokens, ~4 blocks per SM where the batch allows)
  const int64_t per =
      chunks == 1 ? factored_examples_per_item(B, T, kFT, kFChunk, gradkit::cuda::sm_count(a_in.get_device())) : 1;
  const int64_t blocks = chunks == 1 ? (B + per - 1) / per : B * chunks;
  TORCH_CHECK_VALUE(blocks <= 2147483647LL, "a: too many examples for one launch (", B, ")");
  at::Tensor part = at::empty({B, chunks, p, p}, a_in.options().dtype(at::kFloat));
  const size_t smem = static_cast<size_t>(2 * kFT * p + kFT * (kFKC + 1) + kFKC * p) * sizeof(float);
  const auto launch = [&](auto* a_ptr, auto* g_ptr) {
    GK_LAUNCH(factored_kernel, static_cast<unsigned>(blocks), kThreads, smem, c10::cuda::getCurrentCUDAStream(), a_ptr,
              g_ptr, in.lt.data_ptr<float>(), in.rt.data_ptr<float>(), in.rb_ptr(), in.mask_ptr(),
              part.data_ptr<float>(), B, T, chunks, per, in.a.size(1), in.g.size(1), p,
              std::max<int64_t>(in.a.stride(0), 1), std::max<int64_t>(in.g.stride(0), 1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (in.a.scalar_type() == at::kBFloat16)
    launch(in.a.data_ptr<c10::BFloat16>(), in.g.data_ptr<c10::BFloat16>());
  else if (in.a.scalar_type() == at::kHalf)
    launch(in.a.data_ptr<c10::Half>(), in.g.data_ptr<c10::Half>());
  else
    launch(in.a.data_ptr<float>(), in.g.data_ptr<float>());
  if (chunks == 1) return part.view({B, p, p});
  at::Tensor out = part.select(1, 0).clone();  // chunk partials added in chunk order (the CPU's order)
  for (int64_t c = 1; c < chunks; ++c) out.add_(part.select(1, c));
  return out;
}

}  // namespace
}  // namespace projection
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CUDA, m) {
  using namespace gradkit::projection;
  m.impl("projection_matrix_", &projection_matrix_cuda);
  m.impl("project_flat", &project_flat_cuda);
  m.impl("factored_project", &factored_project_cuda);
}

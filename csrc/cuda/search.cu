// CUDA kernel of the search family: blocked inner-product scoring with a running top-k.
// Semantics: python/gradkit/kernels/reference/search.py (the definition); the same design as the
// Triton kernel (kernels/triton/search.py): fused tile scoring + per-tile top-k, then one merge.
//
// Headers and conventions as the other .cu files: only c10/cuda/* (no ATen/cuda/CUDAContext.h),
// a CUDAGuard, launches on the current stream, int64 element offsets.
//
// * tile_topk_kernel: block (tile t = blockIdx.x, query block qb = blockIdx.y) of kThreads = 256
//   threads computes the kTileQ x kTileN (32 x 128) scores of 32 queries against 128 keys: the
//   feature dimension is walked in slices of kSliceD = 32; each slice of queries and keys (keys
//   upcast from fp16/bf16/fp32 on load) is staged in shared memory and every thread accumulates
//   16 fp32 dot products (query row tid / 8, columns tid % 8 + 8 j) with fmaf in a fixed order (a chain per
//   128 features, the chain sums added in order, as on the CPU).
//   The scores (times key_scale, NaN -> -inf) go to shared memory; then each of the 8 warps takes
//   4 query rows and extracts the row's k best by k rounds of warp arg-max (a lane owns columns
//   lane + 32 i; ties: lowest column; taken columns are masked in registers). Only the k
//   candidates per (query, tile) reach global memory: (Q, tiles, k).
// * the host merges those candidates with the running top-k by the reference's ordering (valid
//   first, score descending, index ascending) using stable at::sort; every global winner is a
//   winner of its tile, so the result equals the reference's.
// * smallest runs as largest on negated queries (exact) and negates the scores back.
// * k > kMaxK: composite path (at::mm over chunks of keys + the same merge).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nan_to_num.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../search_checks.h"
#include "common.cuh"

namespace gradkit {
namespace search {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kTileQ = 32;
constexpr int kTileN = 128;
constexpr int kSliceD = 32;
constexpr int64_t kChain = 128;  // features per fmaf chain (a multiple of kSliceD)
constexpr int kMaxK = 64;
constexpr int kColsPerLane = kTileN / 32;  // 4
#ifndef GK_MAX_GRID_Y
#define GK_MAX_GRID_Y 65535  // gridDim.y's limit (tests/test_cuda_emulated.py builds with 1: slices of 32 queries)
#endif

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tile_topk_kernel(const float* __restrict__ q, const scalar_t* __restrict__ keys, const float* __restrict__ scale,
                     float* __restrict__ out_s, int64_t* __restrict__ out_i, int64_t Q, int64_t N, int64_t D,
                     int64_t ldq, int64_t ldk, int64_t n_tiles, int k) {
  __shared__ float qs[kTileQ][kSliceD + 1];
  __shared__ float ks[kTileN][kSliceD + 1];
  __shared__ float S[kTileQ][kTileN + 1];
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kTileQ;
  const int64_t n0 = tile * kTileN;
  const int row = tid / 8;  // 0..31
  const int c0 = tid % 8;   // columns c0 + 8 j, j < 16
  // the CPU kernels' summation order (csrc/cpu/search.cpp, kChain): an fmaf chain per chunk of kChain features,
  // the chunk sums added in order (tot), so the error falls with D as blocked sums' does
  float acc[kTileN / 8], tot[kTileN / 8];
#pragma unroll
  for (int j = 0; j < kTileN / 8; ++j) acc[j] = tot[j] = 0.f;

  for (int64_t d0 = 0; d0 < D; d0 += kSliceD) {
    if (d0 > 0 && d0 % kChain == 0) {
#pragma unroll
      for (int j = 0; j < kTileN / 8; ++j) {
        tot[j] = d0 == kChain ? acc[j] : tot[j] + acc[j];
        acc[j] = 0.f;
      }
    }
    // stage the slice: 32 x 32 queries (4 per thread), 128 x 32 keys (16 per thread)
    for (int e = tid; e < kTileQ * kSliceD; e += kThreads) {
      const int r = e / kSliceD, c = e % kSliceD;
      const int64_t gq = q0 + r, gd = d0 + c;
      qs[r][c] = (gq < Q && gd < D) ? q[gq * ldq + gd] : 0.f;
    }
    for (int e = tid; e < kTileN * kSliceD; e += kThreads) {
      const int r = e / kSliceD, c = e % kSliceD;
      const int64_t gn = n0 + r, gd = d0 + c;
      ks[r][c] = (gn < N && gd < D) ? to_f(keys[gn * ldk + gd]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < kSliceD; ++c) {
      const float a = qs[row][c];
#pragma unroll
      for (int j = 0; j < kTileN / 8; ++j) acc[j] = fmaf(a, ks[c0 + 8 * j][c], acc[j]);
    }
    __syncthreads();
  }
  const float ninf = -INFINITY;
#pragma unroll
  for (int j = 0; j < kTileN / 8; ++j) {
    const int col = c0 + 8 * j;
    const int64_t gn = n0 + col;
    float v = D > kChain ? tot[j] + acc[j] : acc[j];
    if (scale != nullptr && gn < N) v *= scale[gn];
    if (v != v) v = ninf;
    S[row][col] = v;
  }
  __syncthreads();

  const int warp = tid / 32, lane = tid % 32;
  for (int rr = 0; rr < kTileQ / (kThreads / 32); ++rr) {
    const int r = warp * (kTileQ / (kThreads / 32)) + rr;
    const int64_t gq = q0 + r;
    if (gq >= Q) continue;  // warp-uniform
    float v[kColsPerLane];
    bool taken[kColsPerLane];
#pragma unroll
    for (int i = 0; i < kColsPerLane; ++i) {
      const int col = lane + 32 * i;
      v[i] = S[r][col];
      taken[i] = n0 + col >= N;
    }
    float* os = out_s + (gq * n_tiles + tile) * k;
    int64_t* oi = out_i + (gq * n_tiles + tile) * k;
    for (int j = 0; j < k; ++j) {
      // best untaken (score desc, column asc) of this lane, then across the warp
      float bv = ninf;
      int bc = kTileN;
#pragma unroll
      for (int i = 0; i < kColsPerLane; ++i) {
        const int col = lane + 32 * i;
        if (!taken[i] && (bc == kTileN || v[i] > bv || (v[i] == bv && col < bc))) {
          bv = v[i];
          bc = col;
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oc = __shfl_xor_sync(0xffffffffu, bc, off);
        const bool take = oc != kTileN && (bc == kTileN || ov > bv || (ov == bv && oc < bc));
        if (take) {
          bv = ov;
          bc = oc;
        }
      }
      if (lane == 0) {
        os[j] = bc == kTileN ? ninf : bv;
        oi[j] = bc == kTileN ? int64_t(-1) : n0 + bc;
      }
      if (bc != kTileN && (bc % 32) == lane) taken[bc / 32] = true;
    }
  }
}

// The k best of candidate rows (largest sense) by (valid first, score desc, index asc).
std::tuple<Tensor, Tensor> select_topk(const Tensor& s_in, const Tensor& idx, int64_t k) {
  const int64_t Q = s_in.size(0), M = s_in.size(1);
  const float ninf = -std::numeric_limits<float>::infinity();
  Tensor s = at::nan_to_num(s_in, ninf, std::numeric_limits<float>::infinity(), ninf);
  Tensor valid = idx.ge(0);
  Tensor okey = at::where(valid, idx, at::full_like(idx, std::numeric_limits<int64_t>::max()));
  Tensor order = std::get<1>(at::sort(okey, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  Tensor so = s.gather(1, order);
  order = order.gather(1, std::get<1>(at::sort(so, /*stable=*/true, 1, /*descending=*/true)));
  Tensor inv = valid.gather(1, order).logical_not().to(at::kChar);
  order = order.gather(1, std::get<1>(at::sort(inv, /*stable=*/true, 1, false)));
  const int64_t m = std::min<int64_t>(k, M);
  Tensor out_s = at::full({Q, k}, ninf, s.options());
  Tensor out_i = at::full({Q, k}, -1, idx.options());
  if (m > 0) {
    Tensor top = order.narrow(1, 0, m);
    Tensor v = valid.gather(1, top);
    out_s.narrow(1, 0, m).copy_(at::where(v, s.gather(1, top), at::full_like(s.gather(1, top), ninf)));
    out_i.narrow(1, 0, m).copy_(at::where(v, idx.gather(1, top), at::full_like(top, -1)));
  }
  return {out_s, out_i};
}

std::tuple<Tensor, Tensor> merge(Tensor cs, Tensor ci, int64_t k, const std::optional<Tensor>& scores_in,
                                 const std::optional<Tensor>& idx_in, bool largest) {
  if (scores_in.has_value() && scores_in->size(1) > 0) {
    Tensor sin = largest ? scores_in->to(at::kFloat) : scores_in->to(at::kFloat).neg();
    cs = at::cat({sin, cs}, 1);
    ci = at::cat({*idx_in, ci}, 1);
  }
  auto [s, i] = select_topk(cs, ci, k);
  return {largest ? s : s.neg().add_(0.0), i};  // + 0: a zero score is +0.0, as q . k gives (session 40)
}

std::tuple<Tensor, Tensor> score_topk_cuda(const Tensor& queries, const Tensor& keys_in, int64_t k, bool largest,
                                           const std::optional<Tensor>& key_scale,
                                           const std::optional<Tensor>& scores_in,
                                           const std::optional<Tensor>& idx_in, int64_t base) {
  check_score_topk(queries, keys_in, k, key_scale, scores_in, idx_in, base);  // csrc/search_checks.h
  c10::cuda::CUDAGuard guard(queries.device());
  const int64_t Q = queries.size(0), D = queries.size(1), N = keys_in.size(0);
  auto fopt = queries.options().dtype(at::kFloat);
  auto lopt = queries.options().dtype(at::kLong);
  if (Q == 0 || k == 0) return {at::empty({Q, k}, fopt), at::empty({Q, k}, lopt)};
  const int64_t q_blocks = (Q + kTileQ - 1) / kTileQ;  // grid axis y of the tile kernel
  if (N > 0 && D > 0 && k <= kMaxK && q_blocks > GK_MAX_GRID_Y) {
    // query blocks on grid axis y (at most 65535): slices of queries, each query's top-k its own (the
    // composite path above had no such limit, and the auto backend routes here while TF32 is on)
    const int64_t step = static_cast<int64_t>(GK_MAX_GRID_Y) * kTileQ;
    Tensor out_s = at::empty({Q, k}, fopt), out_i = at::empty({Q, k}, lopt);
    for (int64_t q0 = 0; q0 < Q; q0 += step) {
      const int64_t n = std::min(step, Q - q0);
      std::optional<Tensor> si, ii;
      if (scores_in.has_value()) {
        si = scores_in->narrow(0, q0, n);
        ii = idx_in->narrow(0, q0, n);
      }
      auto [s, i] = score_topk_cuda(queries.narrow(0, q0, n), keys_in, k, largest, key_scale, si, ii, base);
      out_s.narrow(0, q0, n).copy_(s);
      out_i.narrow(0, q0, n).copy_(i);
    }
    return {out_s, out_i};
  }
  Tensor q = largest ? queries.contiguous() : queries.neg().contiguous();
  Tensor keys = (N == 0 || D == 0 || keys_in.stride(1) == 1) ? keys_in : keys_in.contiguous();
  if (N == 0) return merge(at::empty({Q, 0}, fopt), at::empty({Q, 0}, lopt), k, scores_in, idx_in, largest);
  if (k > kMaxK || D == 0) {
    // composite: GEMM per chunk of keys, merged in the largest sense (q is already negated for smallest).
    // float32 products whatever torch's TF32 setting: the auto backend sends CUDA work here exactly while
    // TF32 is on (ops.cublas_fp32_reduced), counting on this kernel to stay float32-exact
    const at::NoTF32Guard no_tf32;
    std::optional<Tensor> rs, ri;
    if (scores_in.has_value()) {
      rs = largest ? scores_in->to(at::kFloat) : scores_in->to(at::kFloat).neg();
      ri = *idx_in;
    }
    const int64_t step = 1 << 16;
    Tensor out_s, out_i;
    for (int64_t j0 = 0; j0 < N; j0 += step) {
      const int64_t nb = std::min(step, N - j0);
      Tensor s = at::mm(q, keys.narrow(0, j0, nb).to(at::kFloat).t());
      if (key_scale.has_value()) s = s.mul(key_scale->narrow(0, j0, nb).unsqueeze(0));
      Tensor idx = at::arange(base + j0, base + j0 + nb, lopt).unsqueeze(0).expand({Q, nb}).contiguous();
      std::tie(out_s, out_i) = merge(s, idx, k, rs, ri, true);
      rs = out_s;
      ri = out_i;
    }
    return {largest ? out_s : out_s.neg().add_(0.0), out_i};  // + 0: a zero score is +0.0 (session 40)
  }
  const int64_t n_tiles = (N + kTileN - 1) / kTileN;
  Tensor cs = at::empty({Q, n_tiles, k}, fopt);
  Tensor ci = at::empty({Q, n_tiles, k}, lopt);
  Tensor sc;
  if (key_scale.has_value()) sc = key_scale->contiguous();
  const float* scp = sc.defined() ? sc.data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(q_blocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "score_topk_cuda", [&] {
    GK_LAUNCH(tile_topk_kernel<scalar_t>, grid, kThreads, 0, stream,
        q.data_ptr<float>(), keys.data_ptr<scalar_t>(), scp, cs.data_ptr<float>(), ci.data_ptr<int64_t>(), Q, N, D,
        q.stride(0), keys.stride(0), n_tiles, static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  Tensor cs2 = cs.view({Q, n_tiles * k});
  Tensor ci2 = ci.view({Q, n_tiles * k});
  ci2 = at::where(ci2.ge(0), ci2.add(base), ci2);
  return merge(cs2, ci2, k, scores_in, idx_in, largest);
}

}  // namespace
}  // namespace search
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CUDA, m) {
  m.impl("score_topk", &gradkit::search::score_topk_cuda);
}

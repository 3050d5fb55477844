// CUDA kernel of the obs family: independent OBS scoring and selection of the pruned blocks.
// Semantics: python/gradkit/kernels/reference/obs.py::obs_select (the definition); the same ranking
// as the Triton kernel (kernels/triton/obs.py) and the CPU kernel (csrc/cpu/obs.cpp).
//
// Headers and conventions as the other .cu files: only c10/cuda/* (no ATen/cuda/CUDAContext.h),
// a CUDAGuard, launches on the current stream, int64 element offsets.
//
// The (row, scope) pairs are one flat range of S = n * nq scopes over contiguous inputs: scope s
// reads elements [s * E, (s + 1) * E), E = gs * bk, and owns the output slice [s * O, (s + 1) * O),
// O = num_prune * bk. Block cost: c = sum_j w^2 / (d + eps) in element order with explicitly
// rounded intrinsics (__fmul_rn / __fdiv_rn / __fadd_rn: no contraction, IEEE division), NaN -> +inf.
// rank(b) = #{b' : c[b'] < c[b] or (c[b'] == c[b] and b' < b)}; b is pruned iff rank < num_prune.
//
// * small_kernel<G> (gs <= 32): one thread per scope (grid-stride), costs in registers padded with
//   +inf up to G in {2, 4, 8, 16, 32} (a padding block ranks after every real block, so it never
//   changes a real rank and is never pruned); the pruned set is a G-bit mask whose set bits are
//   emitted in ascending order (__ffs), exactly num_prune of them.
// * large_kernel (32 < gs <= kMaxSmemGs): one thread block per scope (grid-stride): the gs costs go
//   to shared memory; each thread ranks its blocks against all of them (broadcast reads), writes a
//   pruned flag; a pruned block's slot is the count of pruned flags before it.
// * gs > kMaxSmemGs: composite ATen path (stable sort), the reference's algorithm.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <math_constants.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common.cuh"
#include "../obs_schur.h"
#include "../obs_sweep.h"
#include "../obs_select_checks.h"
#include "../obs_shared.h"

namespace gradkit {
namespace obs {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kMaxSmemGs = 8192;  // gs floats + gs flag bytes = 40 KiB of shared memory

__device__ __forceinline__ float term(float w, float d, float eps) {
  return __fdiv_rn(__fmul_rn(w, w), __fadd_rn(d, eps));
}

// Cost of the block starting at element e (bk elements), NaN -> +inf.
__device__ __forceinline__ float block_cost(const float* __restrict__ w, const float* __restrict__ d, int64_t e,
                                            int64_t bk, float eps) {
  float acc = term(w[e], d[e], eps);
  for (int64_t j = 1; j < bk; ++j) acc = __fadd_rn(acc, term(w[e + j], d[e + j], eps));
  return isnan(acc) ? CUDART_INF_F : acc;
}

template <int G>
__global__ void small_kernel(const float* __restrict__ w, const float* __restrict__ d, int64_t* __restrict__ out,
                             int64_t S, int64_t nq, int64_t gs, int64_t bk, int64_t np, float eps) {
  const int64_t E = gs * bk, O = np * bk;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < S;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = s * E;
    float c[G];
#pragma unroll
    for (int b = 0; b < G; ++b) c[b] = b < gs ? block_cost(w, d, e0 + b * bk, bk, eps) : CUDART_INF_F;
    uint32_t mask = 0;
#pragma unroll
    for (int b = 0; b < G; ++b) {
      int r = 0;
#pragma unroll
      for (int b2 = 0; b2 < G; ++b2) r += b2 < b ? (c[b2] <= c[b]) : (c[b2] < c[b]);
      mask |= static_cast<uint32_t>(r < np) << b;
    }
    int64_t* o = out + s * O;
    const int64_t base = (s % nq) * E;
    for (int64_t j = 0; j < np; ++j) {
      const int64_t p0 = base + static_cast<int64_t>(__ffs(mask) - 1) * bk;
      mask &= mask - 1;
      for (int64_t e = 0; e < bk; ++e) o[j * bk + e] = p0 + e;
    }
  }
}

__global__ void large_kernel(const float* __restrict__ w, const float* __restrict__ d, int64_t* __restrict__ out,
                             int64_t S, int64_t nq, int64_t gs, int64_t bk, int64_t np, float eps) {
  GK_DYNAMIC_SHARED(float, sc);                               // gs costs
  unsigned char* fl = reinterpret_cast<unsigned char*>(sc + gs);  // gs pruned flags
  const int64_t E = gs * bk, O = np * bk;
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t e0 = s * E;
    for (int64_t b = threadIdx.x; b < gs; b += blockDim.x) sc[b] = block_cost(w, d, e0 + b * bk, bk, eps);
    __syncthreads();
    for (int64_t b = threadIdx.x; b < gs; b += blockDim.x) {
      const float cb = sc[b];
      int64_t r = 0;
      for (int64_t b2 = 0; b2 < gs; ++b2) {
        const float x = sc[b2];
        r += (x < cb) | ((x == cb) & (b2 < b));
      }
      fl[b] = r < np;
    }
    __syncthreads();
    const int64_t base = (s % nq) * E;
    for (int64_t b = threadIdx.x; b < gs; b += blockDim.x) {
      if (!fl[b]) continue;
      int64_t slot = 0;
      for (int64_t b2 = 0; b2 < b; ++b2) slot += fl[b2];
      int64_t* o = out + s * O + slot * bk;
      for (int64_t e = 0; e < bk; ++e) o[e] = base + b * bk + e;
    }
    __syncthreads();  // the next scope reuses the shared memory
  }
}

// The reference's algorithm in ATen ops (stable sort), for scopes too large for shared memory.
Tensor composite(const Tensor& w, const Tensor& d, int64_t gs, int64_t bk, int64_t np, double eps) {
  const int64_t n = w.size(0), nb = w.size(1), nq = nb / (gs * bk);
  const Tensor t = w.mul(w).div(d.add(eps)).view({n, nq, gs, bk});
  Tensor c = t.select(3, 0);
  for (int64_t j = 1; j < bk; ++j) c = c.add(t.select(3, j));
  c = c.masked_fill(c.isnan(), std::numeric_limits<float>::infinity());
  const Tensor order = std::get<1>(c.sort(/*stable=*/true, /*dim=*/2, /*descending=*/false));
  const Tensor pruned = at::zeros({n, nq, gs}, c.options().dtype(at::kBool)).scatter_(2, order.narrow(2, 0, np), true);
  const Tensor mask = pruned.unsqueeze(3).expand({n, nq, gs, bk}).reshape({n, nb});
  const Tensor pos = at::arange(nb, w.options().dtype(at::kLong)).unsqueeze(0).expand({n, nb});
  return pos.masked_select(mask).view({n, nq * np * bk});
}

Tensor obs_select_cuda(const Tensor& w_in, const Tensor& d_in, int64_t gs, int64_t bk, int64_t num_prune,
                       double eps) {
  check_obs_select(w_in, d_in, gs, bk, num_prune, eps);
  c10::cuda::CUDAGuard guard(w_in.device());
  const int64_t n = w_in.size(0), nb = w_in.size(1), E = gs * bk, nq = nb / E, O = num_prune * bk;
  const int64_t S = n * nq;
  if (S == 0 || O == 0) return at::empty({n, nq * O}, w_in.options().dtype(at::kLong));
  const Tensor w = w_in.contiguous(), d = d_in.contiguous();
  if (gs > kMaxSmemGs) return composite(w, d, gs, bk, num_prune, eps);
  Tensor out = at::empty({n, nq * O}, w.options().dtype(at::kLong));
  const float epsf = static_cast<float>(eps);
  const int dev = w.get_device();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* wp = w.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  if (gs <= 32) {
    const int64_t blocks = std::min<int64_t>((S + kThreads - 1) / kThreads, int64_t{32} * cuda::sm_count(dev));
    const dim3 grid(static_cast<unsigned>(blocks));
    auto launch = [&](auto kernel) {
      GK_LAUNCH(kernel, grid, kThreads, 0, stream, wp, dp, op, S, nq, gs, bk, num_prune, epsf);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (gs <= 2) launch(small_kernel<2>);
    else if (gs <= 4) launch(small_kernel<4>);
    else if (gs <= 8) launch(small_kernel<8>);
    else if (gs <= 16) launch(small_kernel<16>);
    else launch(small_kernel<32>);
  } else {
    const int64_t blocks = std::min<int64_t>(S, int64_t{8} * cuda::sm_count(dev));
    const size_t smem = static_cast<size_t>(gs) * (sizeof(float) + 1);
    GK_LAUNCH(large_kernel, static_cast<unsigned>(blocks), kThreads, smem, stream, wp, dp, op, S, nq, gs, bk,
              num_prune, epsf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// obs_shared_prune: one thread per (row, scope) (grid-stride), the per-scope core of csrc/obs_shared.h
// (the CPU kernel's arithmetic, explicitly rounded: no contraction). The chosen subset's cinv block and C's
// diagonal block are read through the read-only cache; p <= 64 keeps the per-thread scratch in registers.
__global__ void shared_prune_kernel(const float* __restrict__ w, float* __restrict__ out, const float* __restrict__ c,
                                    const float* __restrict__ cinv, const int64_t* __restrict__ pidx, int64_t S,
                                    int64_t nq, int64_t ns, int64_t p, int64_t E, int64_t K, bool local,
                                    int64_t* __restrict__ sub) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < S;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = s % nq;
    shared_prune_scope(w + s * E, out + s * E, c + q * E * K + q * E, K, cinv + q * ns * p * p, pidx, ns, p, E, local,
                       sub + s);
  }
}

std::tuple<Tensor, Tensor> obs_shared_prune_cuda(const Tensor& w_in, const Tensor& c_in, const Tensor& cinv_in,
                                                 const Tensor& pidx_in, int64_t E, bool local) {
  GK_OBS_SHARED_CHECKS(w_in, c_in, cinv_in, pidx_in, E);
  const Tensor pidx_host = pidx_in.to(at::kCPU).contiguous();  // ns x p: validated before any launch
  GK_OBS_SHARED_CHECK_PIDX(pidx_host, E);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const int64_t n = w_in.size(0), K = w_in.size(1), nq = K / E, ns = pidx_in.size(0), p = pidx_in.size(1);
  const Tensor w = w_in.contiguous(), c = c_in.contiguous(), cinv = cinv_in.contiguous(), pidx = pidx_in.contiguous();
  Tensor out = at::empty({n, K}, w.options());
  Tensor sub = at::empty({n, nq}, w.options().dtype(at::kLong));
  const int64_t S = n * nq;
  if (S == 0) return {out, sub};
  const int64_t blocks = std::min<int64_t>((S + kThreads - 1) / kThreads, int64_t{32} * cuda::sm_count(w.get_device()));
  GK_LAUNCH(shared_prune_kernel, static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream(),
      w.data_ptr<float>(), out.data_ptr<float>(), c.data_ptr<float>(), cinv.data_ptr<float>(),
      pidx.data_ptr<int64_t>(), S, nq, ns, p, E, K, local, sub.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, sub};
}

// obs_schur_extend_ (csrc/obs_schur.h has the definition): one thread block per (row b, tile of kSchurBF
// columns of F). Phase 1 forms T = xf - round(up) @ U for all m rows of the tile, U = ut[b, :cnt, K-F:]:
// the contraction runs in chunks of kSchurKC, the up chunk (m x KC, rounded to the storage dtype) and the
// U chunk (KC x BF) staged in shared memory; thread (ty, tx) owns column tx and rows ty, ty + 8, ... (fp32
// accumulators in registers). Phase 2 stores T in shared memory (reusing the staging space) and forms
// linv @ T, linv read through the read-only cache (a warp reads one linv row: a broadcast), written to
// ut[b, cnt + i, K-F + j]. Rows read (< cnt) and written (>= cnt) are disjoint, so blocks never race.
// m above kSchurMaxM (the accumulators per thread) takes the composite cuBLAS path.
constexpr int kSchurBF = 32;
constexpr int kSchurRowsPerPass = kThreads / kSchurBF;  // 8
constexpr int kSchurKC = 16;
constexpr int kSchurMaxAcc = 32;
constexpr int64_t kSchurMaxM = int64_t{kSchurRowsPerPass} * kSchurMaxAcc;  // 256

struct Strides3 {
  int64_t b, i, j;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    schur_extend_kernel(scalar_t* __restrict__ ut, Strides3 su, const float* __restrict__ xf, Strides3 sx,
                        const float* __restrict__ up, Strides3 sp, const float* __restrict__ linv, Strides3 sl,
                        int64_t m, int64_t cnt, int64_t F, int64_t K) {
  GK_DYNAMIC_SHARED(float, smem);
  float* ups = smem;                         // m x (KC + 1)
  float* ufs = smem + m * (kSchurKC + 1);    // KC x BF
  float* ts = smem;                          // m x BF (phase 2, aliases the staging space)
  const int64_t b = blockIdx.y;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kSchurBF;
  const int tx = threadIdx.x % kSchurBF, ty = threadIdx.x / kSchurBF;
  const int64_t j = j0 + tx;
  const bool jok = j < F;
  float acc[kSchurMaxAcc];
#pragma unroll
  for (int r = 0; r < kSchurMaxAcc; ++r) acc[r] = 0.0f;
  const float* upb = up + b * sp.b;
  const scalar_t* ufb = ut + b * su.b + (K - F) * su.j;  // ut[b, 0, K - F]
  for (int64_t k0 = 0; k0 < cnt; k0 += kSchurKC) {
    for (int64_t e = threadIdx.x; e < m * kSchurKC; e += kThreads) {
      const int64_t i = e / kSchurKC, kk = e % kSchurKC;
      float v = 0.0f;
      if (k0 + kk < cnt) v = static_cast<float>(static_cast<scalar_t>(__ldg(upb + i * sp.i + (k0 + kk) * sp.j)));
      ups[i * (kSchurKC + 1) + kk] = v;
    }
    for (int e = threadIdx.x; e < kSchurKC * kSchurBF; e += kThreads) {
      const int kk = e / kSchurBF, jj = e % kSchurBF;
      float v = 0.0f;
      if (k0 + kk < cnt && j0 + jj < F) v = static_cast<float>(ufb[(k0 + kk) * su.i + (j0 + jj) * su.j]);
      ufs[kk * kSchurBF + jj] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSchurKC; ++kk) {
      const float u = ufs[kk * kSchurBF + tx];
#pragma unroll
      for (int r = 0; r < kSchurMaxAcc; ++r) {
        const int64_t i = ty + int64_t{kSchurRowsPerPass} * r;
        if (i < m) acc[r] = fmaf(ups[i * (kSchurKC + 1) + kk], u, acc[r]);
      }
    }
    __syncthreads();
  }
  const float* xfb = xf + b * sx.b;
#pragma unroll
  for (int r = 0; r < kSchurMaxAcc; ++r) {
    const int64_t i = ty + int64_t{kSchurRowsPerPass} * r;
    if (i < m) ts[i * kSchurBF + tx] = (jok ? __ldg(xfb + i * sx.i + j * sx.j) : 0.0f) - acc[r];
  }
  __syncthreads();
  const float* lb = linv + b * sl.b;
  scalar_t* ob = ut + b * su.b + cnt * su.i + (K - F) * su.j;  // ut[b, cnt, K - F]
#pragma unroll
  for (int r = 0; r < kSchurMaxAcc; ++r) {
    const int64_t i = ty + int64_t{kSchurRowsPerPass} * r;
    if (i < m) {
      float s = 0.0f;
      for (int64_t l = 0; l < m; ++l) s = fmaf(__ldg(lb + i * sl.i + l * sl.j), ts[l * kSchurBF + tx], s);
      if (jok) ob[i * su.i + j * su.j] = static_cast<scalar_t>(s);
    }
  }
}

void obs_schur_extend_cuda(const Tensor& ut, const Tensor& xf, const Tensor& up, const Tensor& linv, int64_t cnt) {
  GK_OBS_SCHUR_CHECKS(ut, xf, up, linv, cnt);
  const int64_t n = xf.size(0), m = xf.size(1), F = xf.size(2), K = ut.size(2);
  if (m > kSchurMaxM || n > 65535) {
    const at::NoTF32Guard no_tf32;  // float32 products, as the kernel's, whatever torch's TF32 setting
    return schur_extend_composite_(ut, xf, up, linv, cnt);
  }
  if (n == 0 || m == 0 || F == 0) return;
  const c10::cuda::CUDAGuard guard(ut.device());
  const auto st = [](const Tensor& t) { return Strides3{t.stride(0), t.stride(1), t.stride(2)}; };
  const size_t smem = sizeof(float) * static_cast<size_t>(std::max<int64_t>(m * kSchurBF,
                                                                             m * (kSchurKC + 1) + kSchurKC * kSchurBF));
  const dim3 grid(static_cast<unsigned>((F + kSchurBF - 1) / kSchurBF), static_cast<unsigned>(n));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ut.scalar_type(), "obs_schur_extend_", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      GK_LAUNCH(schur_extend_kernel<scalar_t>, grid, kThreads, smem, stream,
          ut.data_ptr<scalar_t>(), st(ut), xf.data_ptr<float>(), st(xf), up.data_ptr<float>(), st(up),
          linv.data_ptr<float>(), st(linv), m, cnt, F, K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// ---- obs_sweep_ (csrc/obs_sweep.h has the definition): one thread per column of w (a weight row), which it
// owns through every step, so no thread reads what another wrote and there is nothing to synchronise. Reads of
// u[i, j] are the same address across a warp (a broadcast); w's rows are read and written coalesced along m.
// Explicitly rounded intrinsics: the product rounded, then the difference (no contraction), IEEE division.
__device__ __forceinline__ float sweep_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double sweep_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sweep_step(float w, float u, float e) { return __fsub_rn(w, __fmul_rn(u, e)); }
__device__ __forceinline__ double sweep_step(double w, double u, double e) { return __dsub_rn(w, __dmul_rn(u, e)); }

template <typename T>
__global__ void sweep_kernel(T* w, int64_t ws, T* err, int64_t es, const T* u, int64_t u0, int64_t u1,
                             const bool* pr, int64_t p0, int64_t p1, int64_t n, int64_t m, int64_t start,
                             int64_t stop) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= m) return;
  for (int64_t i = start; i < stop; ++i) {
    const T d = u[i * u0 + i * u1];
    const T x = w[i * ws + c];
    const bool p = pr[i * p0 + c * p1];
    const T e = p ? sweep_div(x, d) : T(0);
    err[i * es + c] = e;
    w[i * ws + c] = p ? T(0) : x;
    for (int64_t j = i + 1; j < n; ++j) w[j * ws + c] = sweep_step(w[j * ws + c], u[i * u0 + j * u1], e);
  }
}

constexpr int kSweepThreads = 128;

void obs_sweep_cuda(const Tensor& w, const Tensor& err, const Tensor& u, const Tensor& prune, int64_t start,
                    int64_t stop) {
  obs_sweep_checks(w, err, u, prune, start, stop);
  const int64_t n = w.size(0), m = w.size(1);
  if (start == stop || m == 0) return;
  const c10::cuda::CUDAGuard guard(w.device());
  const dim3 grid(static_cast<unsigned>((m + kSweepThreads - 1) / kSweepThreads));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "obs_sweep_", [&] {
    GK_LAUNCH(sweep_kernel<scalar_t>, grid, kSweepThreads, 0, stream, w.data_ptr<scalar_t>(), w.stride(0),
              err.data_ptr<scalar_t>(), err.stride(0), u.data_ptr<scalar_t>(), u.stride(0), u.stride(1),
              prune.data_ptr<bool>(), prune.stride(0), prune.stride(1), n, m, start, stop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace obs
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CUDA, m) {
  m.impl("obs_sweep_", &gradkit::obs::obs_sweep_cuda);
  m.impl("obs_select", &gradkit::obs::obs_select_cuda);
  m.impl("obs_shared_prune", &gradkit::obs::obs_shared_prune_cuda);
  m.impl("obs_schur_extend_", &gradkit::obs::obs_schur_extend_cuda);
}

// obs_shared_prune: shared-inverse OBS subset selection + local compensation, one (row, scope) at a time.
// Semantics (the definition): python/gradkit/kernels/reference/obs.py::obs_shared_prune. Shared by the
// CPU kernel (csrc/cpu/obs.cpp) and the CUDA kernel (csrc/cuda/obs.cu), so both run the same arithmetic
// in the same order; on the device the products and sums are explicitly rounded (__fmul_rn /
// __fadd_rn: no FMA contraction), as on the host (-std=c++20: no contraction either).
//
//   w (n, K) fp32, K = nq * E: each row is nq consecutive scopes of E elements.
//   c (K, K) fp32: the shared inverse Hessian (only its within-scope diagonal blocks are read).
//   cinv (nq, ns, p, p) fp32: (C[P, P] + eps I)^-1 of every (scope slot, prune subset).
//   pidx (ns, p) int64: the in-scope element indices of each subset, strictly ascending, in [0, E).
//
//   t_i(s)     = sum_j cinv[q, s, i, j] * w_P[j]          (j ascending)
//   cost(s)    = sum_i w_P[i] * t_i(s)                    (i ascending; NaN -> +inf)
//   sub        = the lowest s of minimal cost
//   out[e]     = 0                                         e in P(sub)
//              = w[e] - sum_i c[qE + e, qE + P_i] * t_i    e kept, local
//              = w[e]                                      e kept, not local
#pragma once

#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace gradkit {
namespace obs {

constexpr int64_t kSharedMaxP = 64;  // pruned elements per subset (the per-scope scratch lives in registers)

GK_HD float sp_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GK_HD float sp_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// One (row, scope): w, out point at the scope's E elements; c at C[qE, qE] (row stride ldc); cinv_q at
// cinv[q] (ns * p * p); pidx (ns * p). Writes the chosen subset to *sub_out.
GK_HD void shared_prune_scope(const float* w, float* out, const float* c, int64_t ldc, const float* cinv_q,
                              const int64_t* pidx, int64_t ns, int64_t p, int64_t E, bool local, int64_t* sub_out) {
  float best = 0.0f;
  int64_t bs = -1;
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t* ps = pidx + s * p;
    const float* cs = cinv_q + s * p * p;
    float cost = 0.0f;
    for (int64_t i = 0; i < p; ++i) {
      float t = 0.0f;
      for (int64_t j = 0; j < p; ++j) t = sp_add(t, sp_mul(cs[i * p + j], w[ps[j]]));
      cost = sp_add(cost, sp_mul(w[ps[i]], t));
    }
    if (cost != cost) cost = std::numeric_limits<float>::infinity();
    if (bs < 0 || cost < best) {
      best = cost;
      bs = s;
    }
  }
  *sub_out = bs;
  const int64_t* ps = pidx + bs * p;
  const float* cs = cinv_q + bs * p * p;
  float y[kSharedMaxP];
  for (int64_t i = 0; i < p; ++i) {
    float t = 0.0f;
    for (int64_t j = 0; j < p; ++j) t = sp_add(t, sp_mul(cs[i * p + j], w[ps[j]]));
    y[i] = t;
  }
  int64_t cur = 0;  // P(sub) ascending: a cursor tells membership in one sweep
  for (int64_t e = 0; e < E; ++e) {
    if (cur < p && ps[cur] == e) {
      out[e] = 0.0f;
      ++cur;
      continue;
    }
    if (!local) {
      out[e] = w[e];
      continue;
    }
    const float* ce = c + e * ldc;
    float dl = 0.0f;
    for (int64_t i = 0; i < p; ++i) dl = sp_add(dl, sp_mul(ce[ps[i]], y[i]));
    out[e] = w[e] - dl;
  }
}

}  // namespace obs
}  // namespace gradkit

// Argument checks of obs_shared_prune, the same on every native backend (pidx values are checked by the
// caller on the host: see the kernels).
#define GK_OBS_SHARED_CHECKS(w, c, cinv, pidx, E)                                                                   \
  do {                                                                                                              \
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "w: expected a float32 tensor, got ", w.scalar_type());       \
    TORCH_CHECK_TYPE(c.scalar_type() == at::kFloat, "c: expected a float32 tensor, got ", c.scalar_type());       \
    TORCH_CHECK_TYPE(cinv.scalar_type() == at::kFloat, "cinv: expected a float32 tensor, got ",                   \
                     cinv.scalar_type());                                                                           \
    TORCH_CHECK_TYPE(pidx.scalar_type() == at::kLong, "pidx: expected an int64 tensor, got ", pidx.scalar_type()); \
    TORCH_CHECK_VALUE(w.dim() == 2, "w: expected a 2-D tensor (n, K), got shape ", w.sizes());                    \
    TORCH_CHECK_VALUE(E >= 1 && w.size(1) % E == 0, "E: expected >= 1 dividing the row length ", w.size(1),      \
                      ", got ", E);                                                                                 \
    TORCH_CHECK_VALUE(c.dim() == 2 && c.size(0) == w.size(1) && c.size(1) == w.size(1), "c: expected shape (",    \
                      w.size(1), ", ", w.size(1), "), got ", c.sizes());                                            \
    TORCH_CHECK_VALUE(pidx.dim() == 2 && pidx.size(0) >= 1 && pidx.size(1) >= 1 &&                                \
                          pidx.size(1) <= std::min<int64_t>(E, gradkit::obs::kSharedMaxP),                         \
                      "pidx: expected (ns >= 1, p) with 1 <= p <= min(E, 64), got ", pidx.sizes());                \
    TORCH_CHECK_VALUE(cinv.dim() == 4 && cinv.size(0) == w.size(1) / E && cinv.size(1) == pidx.size(0) &&         \
                          cinv.size(2) == pidx.size(1) && cinv.size(3) == pidx.size(1),                             \
                      "cinv: expected shape (", w.size(1) / E, ", ", pidx.size(0), ", ", pidx.size(1), ", ",        \
                      pidx.size(1), "), got ", cinv.sizes());                                                       \
    TORCH_CHECK_VALUE(c.device() == w.device() && cinv.device() == w.device() && pidx.device() == w.device(),     \
                      "c, cinv, pidx: expected on ", w.device(), " (that of w)");                                  \
  } while (0)

// pidx rows strictly ascending in [0, E) (a host copy: the table is ns x p, tiny).
#define GK_OBS_SHARED_CHECK_PIDX(pidx_host, E)                                                                      \
  do {                                                                                                              \
    const int64_t* pp_ = pidx_host.data_ptr<int64_t>();                                                            \
    const int64_t ns_ = pidx_host.size(0), p_ = pidx_host.size(1);                                                  \
    for (int64_t s_ = 0; s_ < ns_; ++s_)                                                                            \
      for (int64_t i_ = 0; i_ < p_; ++i_) {                                                                         \
        const int64_t v_ = pp_[s_ * p_ + i_];                                                                       \
        TORCH_CHECK_VALUE(v_ >= 0 && v_ < E && (i_ == 0 || v_ > pp_[s_ * p_ + i_ - 1]), "pidx: row ", s_,          \
                          " must be strictly ascending in [0, E=", E, "), got ", v_, " at column ", i_);           \
      }                                                                                                             \
  } while (0)

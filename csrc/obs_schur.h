// obs_schur_extend_: one step of the batched Schur-complement (left-looking Cholesky) factor extension
// of true OBS, in place in the factor buffer. Semantics (the definition):
// python/gradkit/kernels/reference/obs.py::obs_schur_extend_. Shared by the CPU kernel (csrc/cpu/obs.cpp)
// and the CUDA kernel (csrc/cuda/obs.cu): the argument checks (same error kind and message on every
// backend) and the composite ATen path (BLAS / cuBLAS).
//
//   ut   (n, cap, K) fp32/bf16/fp16, any strides: the factor, transposed (ut[:, j, f] = U[f, j]); its
//                            first cnt rows hold the columns so far; this call writes rows cnt .. cnt+m
//                            on the last F positions and touches nothing else;
//   xf   (n, m, F) fp32      C_row[P, F]: the rows of the row's inverse Hessian at the newly pruned
//                            positions P, on the F positions not yet decided (the last F of K);
//   up   (n, m, cnt) fp32    U[P, :cnt]: the factor's existing columns at P (cnt may be 0);
//   linv (n, m, m) fp32      L^-1, L the Cholesky factor of the downdated C_row[P, P].
//
//   ut[:, cnt:cnt+m, K-F:] = linv @ (xf - round_ut(up) @ ut[:, :cnt, K-F:])
//
// in fp32 (fp32 products and sums), rounded to ut's dtype: the factor's new rows on F (the Schur downdate
// C - C[:,P] C[P,P]^-1 C[P,:] restricted to F, in factored form). round_ut(up) rounds up to ut's dtype
// first (exact where up was read from the factor, as in true OBS), so a bf16 / fp16 factor runs its
// products exactly at the half-precision matrix rate with fp32 accumulation. The read rows [0, cnt) and
// the written rows [cnt, cnt + m) are disjoint by construction; xf, up and linv must not overlap ut, nor ut
// itself (refused: an expanded / stride-0 ut, torch's in-place rule).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>

namespace gradkit {
namespace obs {

#define GK_OBS_SCHUR_CHECKS(ut, xf, up, linv, cnt)                                                                  \
  do {                                                                                                              \
    TORCH_CHECK_TYPE(ut.scalar_type() == at::kFloat || ut.scalar_type() == at::kBFloat16 ||                        \
                         ut.scalar_type() == at::kHalf,                                                             \
                     "ut: expected a float32, bfloat16 or float16 tensor, got ", ut.scalar_type());                 \
    TORCH_CHECK_TYPE(xf.scalar_type() == at::kFloat, "xf: expected a float32 tensor, got ", xf.scalar_type());    \
    TORCH_CHECK_TYPE(up.scalar_type() == at::kFloat, "up: expected a float32 tensor, got ", up.scalar_type());    \
    TORCH_CHECK_TYPE(linv.scalar_type() == at::kFloat, "linv: expected a float32 tensor, got ",                    \
                     linv.scalar_type());                                                                           \
    TORCH_CHECK_VALUE(ut.dim() == 3, "ut: expected a 3-D tensor (n, cap, K), got shape ", ut.sizes());             \
    TORCH_CHECK_VALUE(xf.dim() == 3 && xf.size(0) == ut.size(0) && xf.size(2) <= ut.size(2),                       \
                      "xf: expected shape (", ut.size(0), ", m, F <= ", ut.size(2), "), got ", xf.sizes());        \
    TORCH_CHECK_VALUE(cnt >= 0 && cnt + xf.size(1) <= ut.size(1), "cnt: expected 0 <= cnt and cnt + m <= ",        \
                      ut.size(1), " (m = ", xf.size(1), "), got ", cnt);                                            \
    TORCH_CHECK_VALUE(up.dim() == 3 && up.size(0) == xf.size(0) && up.size(1) == xf.size(1) && up.size(2) == cnt,  \
                      "up: expected shape (", xf.size(0), ", ", xf.size(1), ", ", cnt, "), got ", up.sizes());      \
    TORCH_CHECK_VALUE(linv.dim() == 3 && linv.size(0) == xf.size(0) && linv.size(1) == xf.size(1) &&               \
                          linv.size(2) == xf.size(1),                                                               \
                      "linv: expected shape (", xf.size(0), ", ", xf.size(1), ", ", xf.size(1), "), got ",         \
                      linv.sizes());                                                                                \
    TORCH_CHECK_VALUE(xf.device() == ut.device() && up.device() == ut.device() && linv.device() == ut.device(),    \
                      "xf, up, linv: expected on ", ut.device(), " (that of ut)");                                 \
    /* torch's in-place rule (at::assert_no_internal_overlap), naming ut: an expanded / stride-0 factor */        \
    TORCH_CHECK(at::has_internal_overlap(ut) != at::MemOverlap::Yes,                                                \
                "ut: unsupported operation: more than one element of the written-to tensor refers to a single "    \
                "memory location. Please clone() the tensor before performing the operation.");                    \
  } while (0)

// The composite path: two batched GEMMs over BLAS (CPU) or cuBLAS (CUDA), fp32; an fp32 factor's rows
// are written by the second GEMM directly.
inline void schur_extend_composite_(const at::Tensor& ut, const at::Tensor& xf, const at::Tensor& up,
                                    const at::Tensor& linv, int64_t cnt) {
  const int64_t m = xf.size(1), F = xf.size(2), K = ut.size(2);
  const at::Tensor uf = ut.narrow(1, 0, cnt).narrow(2, K - F, F);
  at::Tensor dst = ut.narrow(1, cnt, m).narrow(2, K - F, F);
  const bool low = ut.scalar_type() != at::kFloat;
  at::Tensor t;
  if (cnt) {
    const at::Tensor ufl = low ? uf.to(at::kFloat) : uf;
    const at::Tensor upl = low ? up.to(ut.scalar_type()).to(at::kFloat) : up;
    t = at::baddbmm(xf, upl, ufl, 1.0, -1.0);
  } else {
    t = xf;
  }
  if (low) {
    dst.copy_(at::bmm(linv, t));
  } else {
    at::bmm_out(dst, linv, t);
  }
}

}  // namespace obs
}  // namespace gradkit

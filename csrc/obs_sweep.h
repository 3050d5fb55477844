// obs_sweep_: SparseGPT's column sweep over one lazy block, in place. Semantics (the definition):
// python/gradkit/kernels/reference/obs.py::obs_sweep_. Shared by the CPU kernel (csrc/cpu/obs.cpp) and the
// CUDA kernel (csrc/cuda/obs.cu): the argument checks (same error kind and message on every backend).
//
//   w     (n, m) fp32/fp64, unit stride along m: the block's weights, transposed (row i = weight column i of
//                           the lazy block, one entry per weight row), updated in place;
//   err   (n, m) w's dtype, unit stride along m: receives the scaled errors of rows start .. stop - 1;
//   u     (n, n) w's dtype, any strides: the block of the upper Cholesky factor of H^-1 (only u[i, i:] read);
//   prune (n, m) bool: which entries of each row are pruned.
//
//   for i in [start, stop):
//       e      = where(prune[i], w[i] / u[i, i], 0)        err[i] = e
//       w[i]   = where(prune[i], 0, w[i])
//       w[j]  -= u[i, j] * e      for every j in (i, n)   (the product rounded, then the difference: no FMA)
//
// Every backend rounds exactly so (the CPU kernel is built without FMA contraction, the CUDA kernel uses
// __fmul_rn / __fsub_rn, the Triton kernel launches with enable_fp_fusion=False): the same bits everywhere.
// Columns of w (the weight's rows) are independent: the kernels split m across threads. w and err must not
// overlap each other, themselves (an expanded / stride-0 tensor), u or prune.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <utility>

namespace gradkit {
namespace obs {

inline void obs_sweep_checks(const at::Tensor& w, const at::Tensor& err, const at::Tensor& u, const at::Tensor& prune,
                             int64_t start, int64_t stop) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
                   "w: expected a float32 or float64 tensor, got ", w.scalar_type());
  TORCH_CHECK_TYPE(err.scalar_type() == w.scalar_type(), "err: expected ", w.scalar_type(), " (w's dtype), got ",
                   err.scalar_type());
  TORCH_CHECK_TYPE(u.scalar_type() == w.scalar_type(), "u: expected ", w.scalar_type(), " (w's dtype), got ",
                   u.scalar_type());
  TORCH_CHECK_TYPE(prune.scalar_type() == at::kBool, "prune: expected a bool tensor, got ", prune.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2, "w: expected a 2-D tensor (n, m), got shape ", w.sizes());
  const int64_t n = w.size(0), m = w.size(1);
  TORCH_CHECK_VALUE(err.dim() == 2 && err.size(0) == n && err.size(1) == m, "err: expected shape (", n, ", ", m,
                    "), got ", err.sizes());
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) == n && u.size(1) == n, "u: expected shape (", n, ", ", n, "), got ",
                    u.sizes());
  TORCH_CHECK_VALUE(prune.dim() == 2 && prune.size(0) == n && prune.size(1) == m, "prune: expected shape (", n, ", ",
                    m, "), got ", prune.sizes());
  TORCH_CHECK_VALUE(start >= 0 && start <= stop && stop <= n, "start, stop: expected 0 <= start <= stop <= ", n,
                    ", got ", start, ", ", stop);
  TORCH_CHECK_VALUE(err.device() == w.device() && u.device() == w.device() && prune.device() == w.device(),
                    "err, u, prune: expected on ", w.device(), " (that of w)");
  TORCH_CHECK_VALUE(m <= 1 || w.stride(1) == 1, "w: expected unit stride along dim 1, got strides ", w.strides());
  TORCH_CHECK_VALUE(m <= 1 || err.stride(1) == 1, "err: expected unit stride along dim 1, got strides ",
                    err.strides());
  // torch's in-place rules, naming the argument: no written tensor with two elements at one address, and no
  // written tensor sharing memory with another argument
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{w, "w"}, {err, "err"}})
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                ": unsupported operation: more than one element of the written-to tensor refers to a single memory "
                "location. Please clone() the tensor before performing the operation.");
  const auto apart = [](const at::Tensor& a, const at::Tensor& b) {  // disjoint address ranges (a slice of a
    // larger matrix is fine: at::get_overlap_status gives up on tensors that are not dense)
    if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return true;
    const auto span = [](const at::Tensor& t) {
      int64_t last = 0;
      for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
      const char* p = static_cast<const char*>(t.data_ptr());
      return std::pair<const char*, const char*>{p, p + (last + 1) * t.element_size()};
    };
    const auto ra = span(a), rb = span(b);
    return ra.second <= rb.first || rb.second <= ra.first;
  };
  TORCH_CHECK(apart(w, err), "err: shares memory with w");
  TORCH_CHECK(apart(w, u) && apart(err, u), "u: shares memory with w or err");
  TORCH_CHECK(apart(w, prune) && apart(err, prune), "prune: shares memory with w or err");
}

}  // namespace obs
}  // namespace gradkit

// Argument checks of obs_select, shared by the CPU (csrc/cpu/obs.cpp) and CUDA (csrc/cuda/obs.cu) kernels:
// one set of messages, each naming the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

namespace gradkit {
namespace obs {

inline void check_obs_select(const at::Tensor& w, const at::Tensor& d, int64_t gs, int64_t bk, int64_t num_prune,
                             double eps) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "w: expected a float32 tensor, got ", w.scalar_type());
  TORCH_CHECK_TYPE(d.scalar_type() == at::kFloat, "d: expected a float32 tensor, got ", d.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2, "w: expected a 2-D tensor (n, nb), got shape ", w.sizes());
  TORCH_CHECK_VALUE(d.sizes() == w.sizes(), "d: expected shape ", w.sizes(), " (that of w), got ", d.sizes());
  TORCH_CHECK_VALUE(d.device() == w.device(), "d: on ", d.device(), " but w is on ", w.device());
  TORCH_CHECK_VALUE(gs >= 1, "gs: expected >= 1, got ", gs);
  TORCH_CHECK_VALUE(bk >= 1, "bk: expected >= 1, got ", bk);
  TORCH_CHECK_VALUE(num_prune >= 0 && num_prune <= gs, "num_prune: expected 0 <= num_prune <= gs = ", gs, ", got ",
                    num_prune);
  TORCH_CHECK_VALUE(gs <= (int64_t{1} << 31) && bk <= (int64_t{1} << 31) && w.size(1) % (gs * bk) == 0,
                    "w: the row length ", w.size(1), " is not a multiple of gs * bk = ", gs, " * ", bk);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps: expected a finite number >= 0, got ", eps);
}

}  // namespace obs
}  // namespace gradkit

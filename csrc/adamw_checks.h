// Argument checks of masked_adamw_, shared by the CPU and CUDA kernels so both reject the same
// bad input with the same message (before any tensor is touched).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <optional>

namespace gradkit {
namespace adamw {

inline void check_list(at::TensorList ts, const at::Tensor& p0, const char* what) {
  for (const auto i : c10::irange(ts.size())) {
    TORCH_CHECK_VALUE(ts[i].device() == p0.device(), what, "[", i, "]: on ", ts[i].device(), " but params[0] is on ",
                      p0.device());
    TORCH_CHECK_VALUE(ts[i].is_contiguous(), what, "[", i, "]: expected a contiguous tensor");
    TORCH_CHECK_TYPE(ts[i].scalar_type() == p0.scalar_type(), what, "[", i, "]: dtype ", ts[i].scalar_type(),
                     " differs from params[0]'s ", p0.scalar_type());
  }
}

// Returns false when there is nothing to do (no parameters).
inline bool check_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& bits,
                       at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2_sqrt) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && bits.size() == n &&
                        bias_correction1.size() == n && bias_correction2_sqrt.size() == n,
                    "masked_adamw_: grads, exp_avgs, exp_avg_sqs, bits and the bias corrections need one entry per "
                    "parameter (", n, ")");
  if (n == 0) return false;
  const at::Tensor& p0 = params[0];
  TORCH_CHECK_TYPE(p0.is_floating_point(), "params[0]: expected a floating tensor, got ", p0.scalar_type());
  check_list(params, p0, "params");
  check_list(grads, p0, "grads");
  check_list(exp_avgs, p0, "exp_avgs");
  check_list(exp_avg_sqs, p0, "exp_avg_sqs");
  for (const auto i : c10::irange(n)) {
    const int64_t numel = params[i].numel();
    TORCH_CHECK_VALUE(grads[i].numel() == numel && exp_avgs[i].numel() == numel && exp_avg_sqs[i].numel() == numel,
                      "grads[", i, "] / exp_avgs[", i, "] / exp_avg_sqs[", i, "]: expected ", numel,
                      " entries like params[", i, "]");
    const auto& b = bits.get(i);
    if (b.has_value()) {
      TORCH_CHECK_TYPE(b->scalar_type() == at::kByte, "bits[", i, "]: expected uint8, got ", b->scalar_type());
      TORCH_CHECK_VALUE(b->dim() == 1 && b->numel() == (numel + 7) / 8 && b->is_contiguous() &&
                            b->device() == p0.device(),
                        "bits[", i, "]: expected a contiguous uint8 tensor of ", (numel + 7) / 8, " bytes on ",
                        p0.device());
    }
    TORCH_CHECK_VALUE(bias_correction1[i] > 0 && bias_correction2_sqrt[i] > 0,
                      "bias_correction1 / bias_correction2_sqrt: must be > 0");
  }
  return true;
}

}  // namespace adamw
}  // namespace gradkit

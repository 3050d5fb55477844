// Argument checks of score_topk, shared by the CPU (csrc/cpu/search.cpp) and CUDA (csrc/cuda/search.cu)
// kernels: the dispatcher reaches either without the Python wrapper's checks, so both make the same ones, with
// one set of messages, each naming the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace gradkit {
namespace search {

inline void check_score_topk(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                             const std::optional<at::Tensor>& key_scale, const std::optional<at::Tensor>& scores_in,
                             const std::optional<at::Tensor>& idx_in, int64_t base) {
  TORCH_CHECK_TYPE(queries.scalar_type() == at::kFloat, "queries: expected float32, got ", queries.scalar_type());
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries: expected a 2-D tensor (Q, D), got shape ", queries.sizes());
  TORCH_CHECK_TYPE(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kHalf ||
                       keys.scalar_type() == at::kBFloat16,
                   "keys: expected float32, float16 or bfloat16, got ", keys.scalar_type());
  TORCH_CHECK_VALUE(keys.dim() == 2 && keys.size(1) == queries.size(1), "keys: expected shape (N, ",
                    queries.size(1), "), got ", keys.sizes());
  TORCH_CHECK_VALUE(keys.device() == queries.device(), "keys: on ", keys.device(), " but queries on ",
                    queries.device());
  TORCH_CHECK_VALUE(k >= 0, "k: must be non-negative, got ", k);
  TORCH_CHECK_VALUE(base >= 0, "base: must be non-negative, got ", base);
  TORCH_CHECK_VALUE(keys.size(0) <= 1 || base <= std::numeric_limits<int64_t>::max() - (keys.size(0) - 1),
                    "base: ", base, " + ", keys.size(0), " keys overflows the int64 row numbers");
  if (key_scale.has_value()) {
    TORCH_CHECK_TYPE(key_scale->scalar_type() == at::kFloat, "key_scale: expected float32, got ",
                     key_scale->scalar_type());
    TORCH_CHECK_VALUE(key_scale->dim() == 1 && key_scale->size(0) == keys.size(0),
                      "key_scale: expected shape (", keys.size(0), ",), got ", key_scale->sizes());
    TORCH_CHECK_VALUE(key_scale->device() == queries.device(), "key_scale: on the wrong device");
  }
  TORCH_CHECK_VALUE(scores_in.has_value() == idx_in.has_value(), "scores_in, idx_in: give both or neither");
  if (scores_in.has_value()) {
    TORCH_CHECK_TYPE(scores_in->scalar_type() == at::kFloat, "scores_in: expected float32, got ",
                     scores_in->scalar_type());
    TORCH_CHECK_TYPE(idx_in->scalar_type() == at::kLong, "idx_in: expected int64, got ", idx_in->scalar_type());
    TORCH_CHECK_VALUE(scores_in->dim() == 2 && scores_in->size(0) == queries.size(0),
                      "scores_in: expected shape (", queries.size(0), ", k_in), got ", scores_in->sizes());
    TORCH_CHECK_VALUE(idx_in->sizes() == scores_in->sizes(), "idx_in: expected shape ", scores_in->sizes(),
                      ", got ", idx_in->sizes());
    TORCH_CHECK_VALUE(scores_in->device() == queries.device() && idx_in->device() == queries.device(),
                      "scores_in, idx_in: on the wrong device");
  }
}

}  // namespace search
}  // namespace gradkit

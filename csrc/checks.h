// Host-side argument checks shared by every backend (CPU and CUDA), so the same bad input
// gets the same error kind and message whichever kernel would have run.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/promote_types.h>
#include <c10/util/irange.h>

#include <optional>
#include <utility>
#include <vector>

#include "segments.h"

namespace gradkit {

// Flat offset of every segment; returns the flat vector's length.
inline int64_t segment_offsets(const std::vector<Segment>& segs, std::vector<int64_t>* offs) {
  offs->assign(segs.size(), 0);
  int64_t total = 0;
  for (const auto s : c10::irange(segs.size())) {
    (*offs)[s] = total;
    total += segs[s].count;
  }
  return total;
}

// Result dtype (promoted over src unless given) and length of gather_segments.
inline at::ScalarType gather_dtype(at::TensorList src, std::optional<at::ScalarType> dtype) {
  if (dtype.has_value()) {
    // checked before the output is allocated (the kernels dispatch on the float dtypes only)
    TORCH_CHECK_TYPE(is_float_dtype(*dtype), "dtype: expected a floating dtype, got ", *dtype);
    return *dtype;
  }
  at::ScalarType dt = src.empty() ? at::kFloat : src[0].scalar_type();
  for (const auto& s : src) dt = at::promote_types(dt, s.scalar_type());
  return dt;
}
inline int64_t gather_total(at::TensorList src, const c10::List<std::optional<at::Tensor>>& index) {
  TORCH_CHECK_VALUE(src.size() == index.size(), "index: expected ", src.size(), " entries, got ", index.size());
  int64_t total = 0;
  for (const auto i : c10::irange(src.size())) {
    const auto ix = index.get(i);
    total += ix.has_value() ? ix->numel() : src[i].numel();
  }
  return total;
}

inline void check_gather_out(const at::Tensor& out, int64_t total) {
  TORCH_CHECK_TYPE(is_float_dtype(out.scalar_type()), "out: expected a floating dtype, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1 && out.numel() == total, "out: expected a 1-D tensor of ", total,
                    " elements, got shape ", out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: must be contiguous");
}

inline void check_flat_dtype(const at::Tensor& flat) {
  TORCH_CHECK_TYPE(is_float_dtype(flat.scalar_type()), "flat: expected a floating dtype, got ", flat.scalar_type());
}

inline void check_scatter_flat(const at::Tensor& flat, int64_t total) {
  check_flat_dtype(flat);
  TORCH_CHECK_VALUE(flat.dim() == 1, "flat: expected a 1-D tensor, got shape ", flat.sizes());
  TORCH_CHECK_VALUE(flat.numel() == total, "flat: expected ", total, " elements, got ", flat.numel());
}

inline void check_numel_list(c10::IntArrayRef numel, const c10::List<std::optional<at::Tensor>>& index) {
  TORCH_CHECK_VALUE(numel.size() == index.size(), "numel: expected ", index.size(), " entries, got ",
                    numel.size());
  for (const auto n : numel) TORCH_CHECK_VALUE(n >= 0, "numel: sizes must be non-negative");
}

inline void check_index_dtype(at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK_TYPE(dtype == at::kInt || dtype == at::kLong, "dtype: must be torch.int32 or torch.int64, got ",
                   dtype);
  TORCH_CHECK_VALUE(dtype == at::kLong || numel <= INT32_MAX, "dtype: int32 cannot address ", numel, " elements");
}

inline void check_bool_mask(const at::Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask: expected a bool tensor, got ", mask.scalar_type());
}

// Returns the number of bytes the bitmask must have.
inline int64_t check_bitmask(const at::Tensor& bits, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, "bits: expected a uint8 tensor, got ", bits.scalar_type());
  TORCH_CHECK_VALUE(numel >= 0, "numel: must be non-negative");
  check_index_dtype(dtype, numel);
  const int64_t nbytes = (numel + 7) / 8;
  TORCH_CHECK_VALUE(bits.dim() == 1 && bits.numel() == nbytes, "bits: expected ", nbytes, " bytes for numel=",
                    numel, ", got shape ", bits.sizes());
  return nbytes;
}

// Type/shape checks of topk_select; NaN and the upper bound of k need a pass over the data.
inline void check_topk(const at::Tensor& scores, const std::optional<at::Tensor>& active, int64_t k) {
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "scores: expected a floating tensor, got ",
                   scores.scalar_type());
  if (active.has_value()) {
    TORCH_CHECK_TYPE(active->scalar_type() == at::kBool, "active: expected a bool tensor, got ",
                     active->scalar_type());
    TORCH_CHECK_VALUE(active->numel() == scores.numel(), "active: expected ", scores.numel(), " elements, got ",
                      active->numel());
    TORCH_CHECK_VALUE(active->device() == scores.device(), "active: on ", active->device(), " but scores is on ",
                      scores.device());
  }
  TORCH_CHECK_VALUE(k >= 0, "k: must be non-negative, got ", k);
  TORCH_CHECK_VALUE(scores.numel() > 0 || k == 0, "k: must be in [0, 0] (active scores), got ", k);
}

// Checks of topk_select_segments; returns the scores and active flags as flat contiguous tensors
// (an undefined tensor where active[i] is None).
inline std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> check_topk_segments(
    at::TensorList scores, const c10::List<std::optional<at::Tensor>>& active, int64_t k) {
  TORCH_CHECK_VALUE(active.size() == scores.size(), "active: expected ", scores.size(), " entries, got ",
                    active.size());
  TORCH_CHECK_VALUE(k >= 0, "k: must be non-negative, got ", k);
  std::vector<at::Tensor> flat, acts;
  int64_t n = 0;
  for (const auto i : c10::irange(scores.size())) {
    const at::Tensor& s = scores[i];
    TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), "scores[", i, "]: expected a floating tensor, got ",
                     s.scalar_type());
    TORCH_CHECK_TYPE(s.scalar_type() == scores[0].scalar_type(), "scores[", i, "]: dtype ", s.scalar_type(),
                     " differs from scores[0]'s ", scores[0].scalar_type());
    TORCH_CHECK_VALUE(s.device() == scores[0].device(), "scores[", i, "]: on ", s.device(), " but scores[0] is on ",
                      scores[0].device());
    flat.push_back(s.contiguous().view(-1));
    const auto a = active.get(i);
    if (a.has_value() && a->defined()) {
      TORCH_CHECK_TYPE(a->scalar_type() == at::kBool, "active[", i, "]: expected a bool tensor, got ",
                       a->scalar_type());
      TORCH_CHECK_VALUE(a->numel() == s.numel(), "active[", i, "]: expected ", s.numel(), " elements, got ",
                        a->numel());
      TORCH_CHECK_VALUE(a->device() == s.device(), "active[", i, "]: on ", a->device(), " but scores[", i,
                        "] is on ", s.device());
      acts.push_back(a->contiguous().view(-1));
    } else {
      acts.emplace_back();
    }
    n += s.numel();
  }
  TORCH_CHECK_VALUE(n > 0 || k == 0, "k: must be in [0, 0] (active scores), got ", k);
  return {std::move(flat), std::move(acts)};
}

}  // namespace gradkit

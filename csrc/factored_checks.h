// Argument checks of the projection family (projection_matrix_, project_flat, factored_project), shared by the
// CPU (csrc/cpu/projection.cpp) and CUDA (csrc/cuda/projection.cu) kernels: one set of messages, each naming the
// argument.
#pragma once
#include <limits>

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

namespace gradkit {
namespace projection {

// The generator's arguments, common to projection_matrix_ and project_flat.
inline void check_generator(int64_t k, int64_t seed, int64_t kind) {
  TORCH_CHECK_VALUE(k > 0, "k: must be positive, got ", k);
  TORCH_CHECK_VALUE(seed >= 0, "seed: must be a non-negative 63-bit integer, got ", seed);
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, "kind: expected 0 (rademacher) or 1 (gaussian), got ", kind);
}

inline void check_projection_matrix(const at::Tensor& out, int64_t seed, int64_t kind, int64_t k, int64_t row0,
                                    int64_t col0) {
  check_generator(k, seed, kind);
  TORCH_CHECK_VALUE(out.dim() == 2, "out: expected a 2-D tensor (rows, cols), got shape ", out.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(out.scalar_type()), "out: expected a floating dtype, got ", out.scalar_type());
  TORCH_CHECK_VALUE(row0 >= 0, "row0: must be non-negative, got ", row0);
  TORCH_CHECK_VALUE(col0 >= 0, "col0: must be non-negative, got ", col0);
  // the generator's row / column counters (the Python wrapper's and the fake impl's rule too; session 42: the op
  // took a range past 2^63, where row0 + rows overflows int64)
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(row0 <= kMax - out.size(0) && col0 <= kMax - out.size(1),
                    "row0/col0: the range must stay below 2^63");
}

inline void check_project_flat(const at::Tensor& x, int64_t k, int64_t seed, int64_t kind, int64_t col0) {
  check_generator(k, seed, kind);
  TORCH_CHECK_VALUE(col0 >= 0, "col0: must be non-negative, got ", col0);
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor (B, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(col0 <= std::numeric_limits<int64_t>::max() - x.size(1), "col0: col0 + D must stay below 2^63");
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   "x: expected float32/float16/bfloat16/float64, got ", st);
}

inline void check_factored(const at::Tensor& a, const at::Tensor& g, const at::Tensor& lt, const at::Tensor& rt,
                    const std::optional<at::Tensor>& rb, const std::optional<at::Tensor>& mask, int64_t T) {
  // a and g: float32, or bfloat16 / float16 (a model's activations and gradients in half precision, widened
  // exactly to float32 as they are read: the same bits as passing a.float(), g.float()); g has a's dtype.
  const auto st = a.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "a: expected a float32, bfloat16 or float16 tensor, got ", st);
  TORCH_CHECK_TYPE(g.scalar_type() == st, "g: expected ", st, " (the dtype of a), got ", g.scalar_type());
  for (const auto& [t, nm] : {std::pair<const at::Tensor&, const char*>{a, "a"}, {g, "g"}, {lt, "lt"}, {rt, "rt"}}) {
    TORCH_CHECK_TYPE(&t == &a || &t == &g || t.scalar_type() == at::kFloat, nm, ": expected a float32 tensor, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2, nm, ": expected a 2-D tensor, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == a.device(), nm, ": on ", t.device(), " but a is on ", a.device());
  }
  TORCH_CHECK_VALUE(g.size(0) == a.size(0), "g: expected ", a.size(0), " rows (those of a), got ", g.size(0));
  TORCH_CHECK_VALUE(lt.size(0) == g.size(1), "lt: expected (", g.size(1), ", p), got ", lt.sizes());
  TORCH_CHECK_VALUE(rt.size(0) == a.size(1) && rt.size(1) == lt.size(1), "rt: expected (", a.size(1), ", ",
                    lt.size(1), "), got ", rt.sizes());
  TORCH_CHECK_VALUE(lt.size(1) >= 1, "lt: p must be >= 1");
  TORCH_CHECK_VALUE(T >= 1 && a.size(0) % T == 0, "T: expected >= 1 dividing the ", a.size(0), " rows, got ", T);
  if (rb.has_value()) {
    TORCH_CHECK_TYPE(rb->scalar_type() == at::kFloat, "rb: expected a float32 tensor, got ", rb->scalar_type());
    TORCH_CHECK_VALUE(rb->dim() == 1 && rb->size(0) == lt.size(1), "rb: expected shape (", lt.size(1), ",), got ",
                      rb->sizes());
    TORCH_CHECK_VALUE(rb->device() == a.device(), "rb: on the wrong device");
  }
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask: expected a bool tensor, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == a.size(0), "mask: expected shape (", a.size(0),
                      ",), got ", mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == a.device(), "mask: on the wrong device");
  }
}

// The kernels' view of the inputs: rows with unit column stride that do not overlap (a, g; their dtype kept),
// contiguous lt / rt / rb / mask.
struct FactoredInputs {
  at::Tensor a, g, lt, rt, rb, mask;  // rb / mask undefined when absent
  const float* rb_ptr() const { return rb.defined() ? rb.data_ptr<float>() : nullptr; }
  const bool* mask_ptr() const { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }
};

// True when the kernels can read t's rows in place as row * stride(0) + col: unit column stride and rows that
// do not overlap (or a single row). An expand()ed tensor has row stride 0, which a max(stride, 1) row step would
// turn into reading row r from element r; such tensors are copied first.
inline bool rows_readable_in_place(const at::Tensor& t) {
  return t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

inline FactoredInputs prepare_factored(const at::Tensor& a, const at::Tensor& g, const at::Tensor& lt,
                                       const at::Tensor& rt, const std::optional<at::Tensor>& rb,
                                       const std::optional<at::Tensor>& mask) {
  const auto rows = [](const at::Tensor& t) { return rows_readable_in_place(t) ? t : t.contiguous(); };
  FactoredInputs in{rows(a), rows(g), lt.contiguous(), rt.contiguous(), at::Tensor(), at::Tensor()};
  if (rb.has_value()) in.rb = rb->contiguous();
  if (mask.has_value()) in.mask = mask->contiguous();
  return in;
}

// Examples per work item when T fits one item (both kernels group whole examples; the grouping changes no
// result bit): at least one tile's worth of tokens (`tile`), at most about `chunk` tokens, and otherwise
// small enough for about 4 items per parallel unit (`units`: CPU threads, or SMs).
inline int64_t factored_examples_per_item(int64_t B, int64_t T, int64_t tile, int64_t chunk, int64_t units) {
  const int64_t want = 4 * std::max<int64_t>(1, units);
  const int64_t fill = (tile + T - 1) / T, spread = (B + want - 1) / want;
  return std::max<int64_t>(1, std::max(fill, std::min(chunk / T, spread)));
}

}  // namespace projection
}  // namespace gradkit

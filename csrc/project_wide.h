// project_flat of float64 rows whose values lie outside float32's normal range; shared by the CPU and CUDA kernels.
// Both kernels convert x to float32 before multiplying, so a finite value past float32's range would become
// +-inf, and a row holding +v and -v would give inf - inf = NaN where the exact projection is finite (0 for
// x = [v, -v] against signs [+, +]); and a row whose largest entry is under 2^-100 would lose its values to
// float32's subnormals or zero (2^-150 -> 0). Such rows are divided by a power of two (exact) that brings their
// largest entry to [2^63, 2^64), projected, and their outputs multiplied back in float64 (an output outside float32's
// range is then +-inf or rounds to a subnormal / 0, as any sum there does). Rows holding NaN or Inf are left as they
// are (they propagate), and so are all-zero rows and rows within range, so results for every other input keep their
// bits. Costs one min / max reduction over a float64 x (no full-size temporary); the scaled copy only when a row
// needs it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/any.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/frexp.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/where.h>

#include <cfloat>
#include <optional>
#include <tuple>

// nullopt when x is not float64 or no row needs the scaling; else project(x scaled) scaled back.
template <class Project>
std::optional<at::Tensor> project_flat_wide_rows(const at::Tensor& x, Project&& project) {
  if (x.scalar_type() != at::kDouble || x.numel() == 0) return std::nullopt;
  const auto mm = at::aminmax(x, 1);
  const at::Tensor amax = at::maximum(std::get<0>(mm).neg(), std::get<1>(mm));  // max |x| of each row (NaN: NaN)
  const at::Tensor wide = at::logical_and(
      at::logical_or(at::gt(amax, static_cast<double>(FLT_MAX)),
                     at::logical_and(at::lt(amax, 0x1p-100), at::gt(amax, 0.0))),
      at::isfinite(amax));
  if (!at::any(wide).item<bool>()) return std::nullopt;
  const at::Tensor ex = std::get<1>(at::frexp(amax)).to(at::kDouble);  // amax = m 2^ex, 0.5 <= m < 1
  const at::Tensor up = at::pow(2.0, at::where(wide, ex.sub(64.0), 0.0)).unsqueeze(1);
  const at::Tensor out = project(x.div(up));
  return out.to(at::kDouble).mul(up).to(at::kFloat);
}

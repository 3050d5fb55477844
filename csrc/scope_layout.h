// Host-side layout of the scope family, shared by the CPU and CUDA kernels.
//
// x (shape S, any strides) is cut into blocks of `block` (grid B = S / block) and the grid
// into scopes of `scope` blocks (scope grid G = B / scope). Element coordinate e_i of dim i
// decomposes as e_i = (g_i * scope_i + j_i) * block_i + k_i, so every tensor involved is a
// three-level strided walk:
//   level 0 "scope": g over G        (which scope)
//   level 1 "blk":   j over scope    (which block inside the scope; row-major = in-scope index)
//   level 2 "elem":  k over block    (which element inside the block)
// Each level keeps one stride per *set* (tensor the walk addresses):
//   kX: x, kV: a second x-shaped tensor (values / conditioner; == x when absent),
//   kE: a contiguous x-shaped output (element mask), kB: a contiguous grid-shaped tensor
//   (block mask / thresholds), kS: a contiguous scope-grid tensor (per-scope output).
// Size-1 dims are dropped and adjacent dims merged where every set allows, so common cases
// (N:M over contiguous rows, row blocks) become one or two flat strided loops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/min.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace gradkit {
namespace scope {

constexpr int kMaxDims = 8;
constexpr int kSets = 5;
enum Set { kX = 0, kV = 1, kE = 2, kB = 3, kS = 4 };

struct Level {
  int nd = 0;
  int64_t count = 1;
  int64_t size[kMaxDims] = {};
  int64_t st[kSets][kMaxDims] = {};
};

struct Layout {
  int64_t numscp = 0, nb = 0, ne = 0;  // scopes, blocks per scope, elements per block
  std::vector<int64_t> grid, sgrid;
  Level lv[3];
};

inline std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> st(shape.size(), 1);
  for (int i = (int)shape.size() - 2; i >= 0; --i) st[i] = st[i + 1] * std::max<int64_t>(shape[i + 1], 1);
  return st;
}

// Appends (size, strides[set]) as the new innermost dim of L, merging with the previous
// dim when possible. Dims are appended outermost first.
inline void level_push(Level& L, int64_t size, const int64_t (&st)[kSets]) {
  if (size == 1) return;
  if (L.nd > 0) {
    int o = L.nd - 1;
    bool merge = true;
    for (int s = 0; s < kSets; ++s)
      if (L.st[s][o] != st[s] * size) merge = false;
    if (merge) {
      L.size[o] *= size;
      for (int s = 0; s < kSets; ++s) L.st[s][o] = st[s];
      L.count *= size;
      return;
    }
  }
  TORCH_CHECK(L.nd < kMaxDims, "gradkit: scope layout has too many dims");
  L.size[L.nd] = size;
  for (int s = 0; s < kSets; ++s) L.st[s][L.nd] = st[s];
  L.nd++;
  L.count *= size;
}

// xstride / vstride: element strides of x and of the second tensor (pass x's for none).
inline Layout make_layout(c10::IntArrayRef shape, c10::IntArrayRef xstride, c10::IntArrayRef vstride,
                          c10::IntArrayRef block, c10::IntArrayRef scope) {
  const int nd = (int)shape.size();
  Layout Y;
  Y.grid.resize(nd);
  Y.sgrid.resize(nd);
  std::vector<int64_t> shp(shape.begin(), shape.end());
  for (int i = 0; i < nd; ++i) {
    Y.grid[i] = shape[i] / block[i];
    Y.sgrid[i] = scope.empty() ? Y.grid[i] : Y.grid[i] / scope[i];
  }
  auto est = contiguous_strides(shp), gst = contiguous_strides(Y.grid), sst = contiguous_strides(Y.sgrid);
  int64_t np = 1, nb = 1, ne = 1;
  for (int i = 0; i < nd; ++i) {
    const int64_t sc = scope.empty() ? 1 : scope[i], b = block[i];
    // level 0: g_i over sgrid[i]; one step moves sc*b elements / sc blocks / 1 scope
    int64_t s0[kSets] = {xstride[i] * sc * b, vstride[i] * sc * b, est[i] * sc * b, gst[i] * sc, sst[i]};
    level_push(Y.lv[0], Y.sgrid[i], s0);
    np *= Y.sgrid[i];
  }
  for (int i = 0; i < nd; ++i) {
    const int64_t sc = scope.empty() ? 1 : scope[i], b = block[i];
    int64_t s1[kSets] = {xstride[i] * b, vstride[i] * b, est[i] * b, gst[i], 0};
    level_push(Y.lv[1], sc, s1);
    nb *= sc;
  }
  for (int i = 0; i < nd; ++i) {
    const int64_t b = block[i];
    int64_t s2[kSets] = {xstride[i], vstride[i], est[i], 0, 0};
    level_push(Y.lv[2], b, s2);
    ne *= b;
  }
  Y.numscp = np;
  Y.nb = nb;
  Y.ne = ne;
  return Y;
}

// Row-major walk over one level: off[s] is the offset (per set) of the current position.
struct Odometer {
  const Level* L = nullptr;
  int64_t idx[kMaxDims] = {};
  int64_t off[kSets] = {};

  // Start at linear position `pos` of the level.
  inline void init(const Level& lv, int64_t pos) {
    L = &lv;
    for (int s = 0; s < kSets; ++s) off[s] = 0;
    for (int d = lv.nd - 1; d >= 0; --d) {
      idx[d] = pos % lv.size[d];
      pos /= lv.size[d];
      for (int s = 0; s < kSets; ++s) off[s] += idx[d] * lv.st[s][d];
    }
  }
  inline void next() {
    for (int d = L->nd - 1; d >= 0; --d) {
      if (++idx[d] < L->size[d]) {
        for (int s = 0; s < kSets; ++s) off[s] += L->st[s][d];
        return;
      }
      for (int s = 0; s < kSets; ++s) off[s] -= (L->size[d] - 1) * L->st[s][d];
      idx[d] = 0;
    }
  }
};

// Offsets of every position of a level for one set (small levels only).
inline std::vector<int64_t> level_offsets(const Level& lv, int set) {
  std::vector<int64_t> out((size_t)lv.count);
  Odometer o;
  o.init(lv, 0);
  for (int64_t i = 0; i < lv.count; ++i) {
    out[(size_t)i] = o.off[set];
    o.next();
  }
  return out;
}

// Validation shared by every backend's host code (same messages as gradkit.ops).
inline void check_layout(const at::Tensor& x, c10::IntArrayRef block, c10::OptionalIntArrayRef scope,
                         const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x: expected a floating tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.dim() <= kMaxDims, op, ": x: expected 1 to ", kMaxDims, " dims, got ",
                    x.dim());
  TORCH_CHECK_VALUE((int64_t)block.size() == x.dim(), op, ": block_shape: expected ", x.dim(), " entries, got ",
                    block.size());
  for (int64_t i = 0; i < x.dim(); ++i)
    TORCH_CHECK_VALUE(block[i] >= 1 && x.size(i) % block[i] == 0, op, ": block_shape[", i, "]=", block[i],
                      " does not divide x.shape[", i, "]=", x.size(i));
  if (scope.has_value()) {
    auto sc = *scope;
    TORCH_CHECK_VALUE((int64_t)sc.size() == x.dim(), op, ": scope_shape: expected ", x.dim(), " entries, got ",
                      sc.size());
    for (int64_t i = 0; i < x.dim(); ++i) {
      int64_t g = x.size(i) / block[i];
      TORCH_CHECK_VALUE(sc[i] >= 1 && g % sc[i] == 0, op, ": scope_shape[", i, "]=", sc[i],
                        " does not divide the block grid's dim ", i, " (", g, ")");
    }
  }
}

inline int64_t prod(c10::IntArrayRef v) {
  int64_t p = 1;
  for (auto a : v) p *= a;
  return p;
}

inline void check_p(double p, const char* op) {
  TORCH_CHECK_VALUE(p > 0, op, ": p: expected a positive number or inf, got ", p);
}

inline void check_raw(bool raw, c10::IntArrayRef block, const char* op) {
  TORCH_CHECK_VALUE(!raw || prod(block) == 1, op, ": raw: signed scores need single-element blocks");
}

inline void check_companion(const at::Tensor& t, const at::Tensor& x, c10::IntArrayRef shape, const char* what,
                            const char* op, bool want_bool = false) {
  if (want_bool) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, op, ": ", what, ": expected a bool tensor, got ",
                     t.scalar_type());
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", what, ": expected a floating tensor, got ",
                     t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", what, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", what, ": on ", t.device(), " but x is on ", x.device());
}

// The value domain of block_soft_threshold_ (python/gradkit/kernels/reference/scope.py check_soft_values,
// same rule and messages): thresholds >= 0 (a NaN one would zero or keep its block silently, a negative one
// scales it up; +inf zeroes it), the conditioner finite and > 0 everywhere (a positive diagonal metric: 0 can give
// 0/0 = NaN in t / h and h x / (h + mu), a negative entry a non-convex problem, inf gives inf * 0). t / h: the
// accumulation-dtype tensors the kernels read (h undefined: no conditioner), so values are judged as the
// kernels see them. One reduction over each (at::min / at::aminmax propagate NaN) and ONE copy of the 1-3
// results to the host, before x is written: for CUDA tensors that copy is the op's one host sync, which a
// synchronous error needs (a device-side flag could stop the write, but not raise before the call returns).
inline void check_soft_values(const at::Tensor& t, const at::Tensor& h, const char* op) {
  const bool has_t = t.numel() > 0, has_h = h.defined() && h.numel() > 0;
  std::vector<at::Tensor> parts;
  if (has_t) parts.push_back(at::min(t).reshape({1}));
  if (has_h) {
    const auto mm = at::aminmax(h);
    parts.push_back(std::get<0>(mm).reshape({1}));
    parts.push_back(std::get<1>(mm).reshape({1}));
  }
  if (parts.empty()) return;
  const at::Tensor v = at::cat(parts).to(at::kCPU, at::kDouble);  // CUDA: synchronises the current stream
  const double* p = v.const_data_ptr<double>();
  if (has_t) {
    TORCH_CHECK_VALUE(!std::isnan(p[0]), op, ": thresholds: NaN threshold(s)");
    TORCH_CHECK_VALUE(p[0] >= 0, op, ": thresholds: expected thresholds >= 0, got a minimum of ", p[0]);
    ++p;
  }
  if (has_h) {
    TORCH_CHECK_VALUE(!std::isnan(p[0]) && !std::isnan(p[1]), op,
                      ": conditioner: NaN value(s); expected finite values > 0 (a positive diagonal metric)");
    TORCH_CHECK_VALUE(p[0] > 0 && std::isfinite(p[1]), op,
                      ": conditioner: expected finite values > 0 (a positive diagonal metric), got a minimum of ",
                      p[0], " and a maximum of ", p[1]);
  }
}

inline std::vector<int64_t> grid_shape(const at::Tensor& x, c10::IntArrayRef block) {
  std::vector<int64_t> g(x.dim());
  for (int64_t i = 0; i < x.dim(); ++i) g[i] = x.size(i) / block[i];
  return g;
}

}  // namespace scope
}  // namespace gradkit

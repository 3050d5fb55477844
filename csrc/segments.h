// Host-side description of one segment of a multi-tensor gather/scatter, shared
// by the CPU and CUDA kernels. Validation lives here so every backend rejects the
// same bad input with the same message, before any kernel runs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <string>
#include <vector>

namespace gradkit {

constexpr int kMaxDims = 12;

struct SegView {
  void* data;
  at::ScalarType dtype;
  int64_t numel;
  bool contiguous;
  int ndim;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
};

struct Segment {
  SegView view;
  at::Tensor index;  // undefined = every element, in order
  int64_t count;     // how many entries this segment contributes to the flat vector
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// `what` names the tensor-list argument in error messages ("src" or "dst").
inline std::vector<Segment> make_segments(at::TensorList ts, const c10::List<std::optional<at::Tensor>>& index,
                                          const char* what) {
  TORCH_CHECK_VALUE(ts.size() == index.size(), "index: expected ", ts.size(), " entries (one per ", what,
                    " tensor), got ", index.size());
  std::vector<Segment> segs;
  segs.reserve(ts.size());
  for (const auto i : c10::irange(ts.size())) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), what, "[", i,
                     "]: expected float32/float64/float16/bfloat16, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() <= kMaxDims, what, "[", i, "]: at most ", kMaxDims, " dimensions are supported");
    if (i > 0) {
      TORCH_CHECK_VALUE(t.device() == ts[0].device(), what, "[", i, "]: on ", t.device(), " but ", what,
                        "[0] is on ", ts[0].device());
    }
    Segment s;
    s.view.data = t.data_ptr();
    s.view.dtype = t.scalar_type();
    s.view.numel = t.numel();
    s.view.contiguous = t.is_contiguous();
    s.view.ndim = static_cast<int>(t.dim());
    for (const auto d : c10::irange(t.dim())) {
      s.view.sizes[d] = t.size(d);
      s.view.strides[d] = t.stride(d);
    }
    const auto ix = index.get(i);
    if (ix.has_value() && ix->defined()) {
      const at::Tensor& x = *ix;
      TORCH_CHECK_TYPE(x.scalar_type() == at::kInt || x.scalar_type() == at::kLong, "index[", i,
                       "]: expected int32 or int64, got ", x.scalar_type());
      TORCH_CHECK_VALUE(x.dim() == 1, "index[", i, "]: expected a 1-D tensor, got shape ", x.sizes());
      TORCH_CHECK_VALUE(x.device() == t.device(), "index[", i, "]: on ", x.device(), " but ", what, "[", i,
                        "] is on ", t.device());
      s.index = x.contiguous();
      s.count = x.numel();
    } else {
      s.count = t.numel();
    }
    segs.push_back(s);
  }
  return segs;
}

}  // namespace gradkit

// gradkit operator schemas: every op is declared exactly once, here.
// CPU kernels live in csrc/cpu/<family>.cpp, CUDA kernels in csrc/cuda/<family>.cu,
// fake (meta) impls and autograd in python/gradkit/ops.py, references in
// python/gradkit/kernels/reference/<family>.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing gradkit._C loads this shared object, which runs the static
// TORCH_LIBRARY registrations below; the module itself has no Python members.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gradkit, m) {
  m.set_python_module("gradkit.ops");
  // ---- family 1: masked multi-tensor gather / scatter (param-map) ----
  // Segment s contributes src[s].flatten()[index[s]] (index None = every element, in order)
  // to one flat vector, segments concatenated in list order.
  m.def("gather_segments(Tensor[] src, Tensor?[] index, ScalarType? dtype) -> Tensor");
  m.def("gather_segments_out(Tensor[] src, Tensor?[] index, Tensor(a!) out, bool accumulate) -> ()");
  // Inverse: flat[offset_s : offset_s + count_s] goes to position index[s] of segment s.
  m.def("scatter_segments(Tensor flat, Tensor?[] index, SymInt[] numel, float scale) -> Tensor[]");
  m.def("scatter_segments_(Tensor flat, Tensor?[] index, Tensor(a!)[] dst, float scale, bool accumulate) -> ()");
  // Selection encodings: bool mask / packed little-endian bitmask -> ascending flat positions.
  m.def("mask_to_indices(Tensor mask, ScalarType dtype) -> Tensor");
  m.def("bitmask_to_indices(Tensor bits, SymInt numel, ScalarType dtype) -> Tensor");
  m.def("pack_bitmask(Tensor mask) -> Tensor");
  // Exact top-k select: ascending positions of the k largest scores among `active`
  // (all when None); equal scores are taken lowest position first; NaN is an error.
  m.def("topk_select(Tensor scores, Tensor? active, SymInt k) -> Tensor");
  // The same over many tensors without concatenating them: ascending int64 positions in the
  // concatenation of the flattened scores (list order); one float dtype for all scores.
  m.def("topk_select_segments(Tensor[] scores, Tensor?[] active, SymInt k) -> Tensor");

  // ---- family 2: block norms, per-scope k-th largest, structured masks (scope API) ----
  // x (any strides) is cut into blocks of `block_shape`; `scope_shape` (in blocks) groups the
  // block grid into scopes. Blocks are ranked by sum |x|^p (max |x| for p = inf), or by the
  // signed value when `raw` (single-element blocks). See kernels/reference/scope.py.
  m.def("block_norms(Tensor x, int[] block_shape, float p) -> Tensor");
  m.def("scope_kth(Tensor x, int[] block_shape, int[] scope_shape, int k, float p, bool raw, float k_weight, bool mid) -> Tensor");
  // Keep exactly nnz blocks per scope (ties: lowest in-scope index), or with keep_ties every block
  // scoring >= the nnz-th largest; NaN is never kept. expand: element-shaped mask, else grid-shaped.
  m.def("scope_mask(Tensor x, int[] block_shape, int[] scope_shape, int nnz, float p, bool raw, bool keep_ties, bool expand) -> Tensor");
  // In place: zero the blocks of x not selected (scores from `values` when given); returns the grid keep-mask.
  m.def("scope_hard_threshold_(Tensor(a!) x, Tensor? values, int[] block_shape, int[] scope_shape, int nnz, float p, bool keep_ties) -> Tensor");
  m.def("block_apply_mask_(Tensor(a!) x, int[] block_shape, Tensor block_mask) -> ()");
  // Group-lasso proximal step per block (Euclidean, or diagonal metric `conditioner` by bisection).
  m.def("block_soft_threshold_(Tensor(a!) x, int[] block_shape, Tensor thresholds, Tensor? conditioner, int max_iter, float atol, float eps) -> ()");
}

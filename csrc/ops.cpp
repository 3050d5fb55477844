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
}

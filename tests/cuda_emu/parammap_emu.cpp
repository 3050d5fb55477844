// csrc/cuda/parammap.cu, host code and kernels, compiled for the CPU emulator (emu.h; cub from
// shim/cub_emu.h) and registered as torch.ops.gradkit_cuda_emu_parammap.* on CPU tensors
// (tests/test_cuda_emulated.py). See projection_emu.cpp.
#include "emu_tu.h"

#include "parammap.cu"

TORCH_LIBRARY(gradkit_cuda_emu_parammap, m) {
  using namespace gradkit;
  m.def("gather_segments(Tensor[] src, Tensor?[] index, ScalarType? dtype) -> Tensor", &gather_segments_cuda);
  m.def("gather_segments_out(Tensor[] src, Tensor?[] index, Tensor(a!) out, bool accumulate) -> ()",
        &gather_segments_out_cuda);
  m.def("scatter_segments(Tensor flat, Tensor?[] index, int[] numel, float scale) -> Tensor[]",
        &scatter_segments_cuda);
  m.def("scatter_segments_(Tensor flat, Tensor?[] index, Tensor(a!)[] dst, float scale, bool accumulate) -> ()",
        &scatter_segments__cuda);
  m.def("mask_to_indices(Tensor mask, ScalarType dtype) -> Tensor", &mask_to_indices_cuda);
  m.def("bitmask_to_indices(Tensor bits, int numel, ScalarType dtype) -> Tensor", &bitmask_to_indices_cuda);
  m.def("pack_bitmask(Tensor mask) -> Tensor", &pack_bitmask_cuda);
  m.def("topk_select(Tensor scores, Tensor? active, int k) -> Tensor", &topk_select_cuda);
  m.def("topk_select_segments(Tensor[] scores, Tensor?[] active, int k) -> Tensor", &topk_select_segments_cuda);
}

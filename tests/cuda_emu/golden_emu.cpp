// csrc/cuda/golden.cu (with radix_select.cuh), host code and kernels, compiled for the CPU emulator (emu.h;
// cub from shim/cub_emu.h, warp collectives and atomics from emu.h) and registered as
// torch.ops.gradkit_cuda_emu_golden.* on CPU tensors (tests/test_cuda_emulated.py). See projection_emu.cpp.
#include "emu_tu.h"

#include "golden.cu"

TORCH_LIBRARY(gradkit_cuda_emu_golden, m) {
  m.def("golden_topk_and_(Tensor g, Tensor(a!) bits, Tensor(b!)? counts, int k, bool first) -> Tensor",
        &gradkit::golden::golden_topk_and_cuda);
  m.def("bitmask_binary(Tensor[] a, Tensor[] b, int op) -> Tensor[]", &gradkit::golden::bitmask_binary_cuda);
  m.def("bitmask_not(Tensor[] a, int[] numel) -> Tensor[]", &gradkit::golden::bitmask_not_cuda);
  m.def("bitmask_count(Tensor[] bits) -> Tensor", &gradkit::golden::bitmask_count_cuda);
}

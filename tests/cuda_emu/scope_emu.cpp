// csrc/cuda/scope.cu, host code and kernels, compiled for the CPU emulator (emu.h; its sub-warp
// collectives carry the small-block groups) and registered as torch.ops.gradkit_cuda_emu_scope.* on CPU
// tensors (tests/test_cuda_emulated.py). See projection_emu.cpp.
#include "emu_tu.h"

#include "scope.cu"

TORCH_LIBRARY(gradkit_cuda_emu_scope, m) {
  using namespace gradkit::scope;
  m.def("block_norms(Tensor x, int[] block_shape, float p) -> Tensor", &block_norms_cuda);
  m.def("scope_kth(Tensor x, int[] block_shape, int[] scope_shape, int k, float p, bool raw, float k_weight, "
        "bool mid) -> Tensor",
        &scope_kth_cuda);
  m.def("scope_mask(Tensor x, int[] block_shape, int[] scope_shape, int nnz, float p, bool raw, bool keep_ties, "
        "bool expand) -> Tensor",
        &scope_mask_cuda);
  m.def("scope_hard_threshold_(Tensor(a!) x, Tensor? values, int[] block_shape, int[] scope_shape, int nnz, "
        "float p, bool keep_ties) -> Tensor",
        &scope_hard_threshold_cuda);
  m.def("block_apply_mask_(Tensor(a!) x, int[] block_shape, Tensor block_mask) -> ()", &block_apply_mask_cuda);
  m.def("block_soft_threshold_(Tensor(a!) x, int[] block_shape, Tensor thresholds, Tensor? conditioner, "
        "int max_iter, float atol, float eps) -> ()",
        &block_soft_threshold_cuda);
}

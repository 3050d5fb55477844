// csrc/cuda/search.cu, host code and kernel, compiled for the CPU emulator (emu.h; its warp collectives
// carry the kernel's warp arg-max) and registered as torch.ops.gradkit_cuda_emu_search.score_topk on CPU
// tensors (tests/test_cuda_emulated.py). See projection_emu.cpp.
#include "emu_tu.h"

#include "search.cu"

TORCH_LIBRARY(gradkit_cuda_emu_search, m) {
  m.def("score_topk(Tensor queries, Tensor keys, int k, bool largest, Tensor? key_scale, Tensor? scores_in, "
        "Tensor? idx_in, int base) -> (Tensor, Tensor)",
        &gradkit::search::score_topk_cuda);
}

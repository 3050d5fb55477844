// csrc/cuda/search.cu, host code and kernel, compiled for the CPU emulator (emu.h; its warp collectives
// carry the kernel's warp arg-max) and registered as torch.ops.gradkit_cuda_emu_search.score_topk on CPU
// tensors (tests/test_cuda_emulated.py). See projection_emu.cpp.
#include <torch/library.h>

#include "emu.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void gk_emu_unregistered_##ns##_##key(torch::Library& m)

#include "search.cu"

namespace {
void emu_set_reverse(bool r) { gk_emu::set_reverse(r); }
}  // namespace

TORCH_LIBRARY(gradkit_cuda_emu_search, m) {
  m.def("score_topk(Tensor queries, Tensor keys, int k, bool largest, Tensor? key_scale, Tensor? scores_in, "
        "Tensor? idx_in, int base) -> (Tensor, Tensor)",
        &gradkit::search::score_topk_cuda);
  m.def("set_reverse(bool r) -> ()", &emu_set_reverse);
}

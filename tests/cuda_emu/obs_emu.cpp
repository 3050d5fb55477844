// csrc/cuda/obs.cu, host code and kernels, compiled for the CPU emulator (emu.h) and registered as
// torch.ops.gradkit_cuda_emu_obs.* on CPU tensors (tests/test_cuda_emulated.py). See projection_emu.cpp.
#include <torch/library.h>

#include "emu.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void gk_emu_unregistered_##ns##_##key(torch::Library& m)

#include "obs.cu"

namespace {
void emu_set_sms(int64_t n) { gk_emu::set_sm_count(static_cast<int>(n)); }
void emu_set_reverse(bool r) { gk_emu::set_reverse(r); }
}  // namespace

TORCH_LIBRARY(gradkit_cuda_emu_obs, m) {
  m.def("obs_select(Tensor w, Tensor d, int gs, int bk, int num_prune, float eps) -> Tensor",
        &gradkit::obs::obs_select_cuda);
  m.def("obs_shared_prune(Tensor w, Tensor c, Tensor cinv, Tensor pidx, int E, bool local) -> (Tensor, Tensor)",
        &gradkit::obs::obs_shared_prune_cuda);
  m.def("obs_schur_extend_(Tensor(a!) ut, Tensor xf, Tensor up, Tensor linv, int cnt) -> ()",
        &gradkit::obs::obs_schur_extend_cuda);
  m.def("set_sm_count(int n) -> ()", &emu_set_sms);
  m.def("set_reverse(bool r) -> ()", &emu_set_reverse);
}

// csrc/cuda/obs.cu, host code and kernels, compiled for the CPU emulator (emu.h) and registered as
// torch.ops.gradkit_cuda_emu_obs.* on CPU tensors (tests/test_cuda_emulated.py). See projection_emu.cpp.
#include "emu_tu.h"

#include "obs.cu"

TORCH_LIBRARY(gradkit_cuda_emu_obs, m) {
  m.def("obs_select(Tensor w, Tensor d, int gs, int bk, int num_prune, float eps) -> Tensor",
        &gradkit::obs::obs_select_cuda);
  m.def("obs_shared_prune(Tensor w, Tensor c, Tensor cinv, Tensor pidx, int E, bool local) -> (Tensor, Tensor)",
        &gradkit::obs::obs_shared_prune_cuda);
  m.def("obs_schur_extend_(Tensor(a!) ut, Tensor xf, Tensor up, Tensor linv, int cnt) -> ()",
        &gradkit::obs::obs_schur_extend_cuda);
  m.def("obs_sweep_(Tensor(a!) w, Tensor(b!) err, Tensor u, Tensor prune, int start, int stop) -> ()",
        &gradkit::obs::obs_sweep_cuda);
}

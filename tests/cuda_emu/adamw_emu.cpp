// csrc/cuda/adamw.cu, host code and kernel, compiled for the CPU emulator (emu.h) and registered as
// torch.ops.gradkit_cuda_emu_adamw.masked_adamw_ on CPU tensors (tests/test_cuda_emulated.py). See
// projection_emu.cpp.
#include <torch/library.h>

#include "emu.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void gk_emu_unregistered_##ns##_##key(torch::Library& m)

#include "adamw.cu"

namespace {
void emu_set_sms(int64_t n) { gk_emu::set_sm_count(static_cast<int>(n)); }
}  // namespace

TORCH_LIBRARY(gradkit_cuda_emu_adamw, m) {
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor?[] bits, float masked_lr, float unmasked_lr, float beta1, float beta2, float eps, "
        "float weight_decay, float[] bias_correction1, float[] bias_correction2_sqrt, bool maximize) -> ()",
        &gradkit::adamw_cuda::masked_adamw_cuda);
  m.def("set_sm_count(int n) -> ()", &emu_set_sms);
}

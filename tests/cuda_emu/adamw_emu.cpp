// csrc/cuda/adamw.cu, host code and kernel, compiled for the CPU emulator (emu.h) and registered as
// torch.ops.gradkit_cuda_emu_adamw.masked_adamw_ on CPU tensors (tests/test_cuda_emulated.py). See
// projection_emu.cpp.
#include "emu_tu.h"

#include "adamw.cu"

TORCH_LIBRARY(gradkit_cuda_emu_adamw, m) {
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor?[] bits, float masked_lr, float unmasked_lr, float beta1, float beta2, float eps, "
        "float weight_decay, float[] bias_correction1, float[] bias_correction2_sqrt, bool maximize, "
        "Tensor(d!)[]? max_exp_avg_sqs=None) -> ()",
        &gradkit::adamw_cuda::masked_adamw_cuda);
}

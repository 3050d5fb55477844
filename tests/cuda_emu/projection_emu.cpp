// csrc/cuda/projection.cu, host code and kernels, compiled for the CPU emulator (emu.h, via emu_tu.h) and
// registered as torch.ops.gradkit_cuda_emu.* on CPU tensors: tests/test_cuda_emulated.py runs them against
// the CPU kernels. Also the emulator's self-test kernel and its control ops, which act on the one emulator
// state every file's ops in the library share: set_sm_count(n) (the SM count the host code sees),
// set_reverse(r) (threads in descending order), stats(0 | 1 | 2) (launches, blocks, block barriers so far).
#include "emu_tu.h"

#include "projection.cu"

namespace {
// Self-checks of the emulator (tests/test_cuda_emulated.py): that it can fail. which = 0: every thread
// writes its shared slot, waits, reads its neighbour's (correct); 1: the same without the barrier (a race:
// the neighbour's slot is unwritten (NaN) or written depending on the thread order); 2: threads wait at
// two different barriers (divergence, reported as an error); 3, 4, 5: launches a GPU (or the stream rule) refuses
// (the legacy default stream, 65536 blocks on grid axis y, 48 KiB + 4 of dynamic shared memory).
__global__ void selftest_kernel(float* out, int which) {
  __shared__ float slot[64];
  const unsigned t = threadIdx.x, n = blockDim.x;
  slot[t] = static_cast<float>(t + 100 * blockIdx.x);
  if (which == 0) __syncthreads();
  if (which == 2) {
    if (t < 3) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  }
  out[blockIdx.x * n + t] = slot[(t + 1) % n];
}
at::Tensor emu_selftest(int64_t which) {  // the emulator's errors reach Python as RuntimeError
  at::Tensor out = at::zeros({2, 64}, at::kFloat);
  if (which == 3) {  // on the legacy default stream instead of the current one: refused
    GK_LAUNCH(selftest_kernel, 2u, 64u, 0, 0, out.data_ptr<float>(), 0);
  } else if (which == 4) {  // 65536 blocks on grid axis y: refused, as a GPU refuses it
    GK_LAUNCH(selftest_kernel, dim3(1u, 65536u), 64u, 0, c10::cuda::getCurrentCUDAStream(), out.data_ptr<float>(), 0);
  } else if (which == 5) {  // 48 KiB + 4 of dynamic shared memory without raising the kernel's limit: refused
    GK_LAUNCH(selftest_kernel, 2u, 64u, 48 * 1024 + 4, c10::cuda::getCurrentCUDAStream(), out.data_ptr<float>(), 0);
  } else {
    GK_LAUNCH(selftest_kernel, 2u, 64u, 0, c10::cuda::getCurrentCUDAStream(), out.data_ptr<float>(),
              static_cast<int>(which));
  }
  return out;
}
void emu_set_sms(int64_t n) { gk_emu::set_sm_count(static_cast<int>(n)); }
void emu_set_reverse(bool r) { gk_emu::set_reverse(r); }
int64_t emu_stats(int64_t which) {
  const auto& s = gk_emu::state();
  return which == 0 ? s.launches : which == 1 ? s.blocks : s.barriers;
}
}  // namespace

TORCH_LIBRARY(gradkit_cuda_emu, m) {
  m.def("set_sm_count(int n) -> ()", &emu_set_sms);
  m.def("set_reverse(bool r) -> ()", &emu_set_reverse);
  m.def("stats(int which) -> int", &emu_stats);
  m.def("projection_matrix_(Tensor(a!) out, int seed, int kind, int k, int row0, int col0) -> ()",
        &gradkit::projection::projection_matrix_cuda);
  m.def("project_flat(Tensor x, int k, int seed, int kind, int col0) -> Tensor", &gradkit::projection::project_flat_cuda);
  m.def("factored_project(Tensor a, Tensor g, Tensor lt, Tensor rt, Tensor? rb, Tensor? mask, int T) -> Tensor",
        &gradkit::projection::factored_project_cuda);
  m.def("selftest(int which) -> Tensor", &emu_selftest);
}

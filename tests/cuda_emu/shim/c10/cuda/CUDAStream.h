// tests/cuda_emu: one stream, the current one (gk_emu::kCurrentStream, not 0: a launch on the legacy default
// stream is an error there); launches run synchronously.
#pragma once
namespace c10 {
namespace cuda {
inline int getCurrentCUDAStream(int = -1) { return 0x5eed; }
}  // namespace cuda
}  // namespace c10
namespace at {
namespace cuda {
using c10::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace at

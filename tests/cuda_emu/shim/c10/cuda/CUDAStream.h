// tests/cuda_emu: one stream, which the emulator's launches ignore (they run synchronously).
#pragma once
namespace c10 {
namespace cuda {
inline int getCurrentCUDAStream(int = -1) { return 0; }
}  // namespace cuda
}  // namespace c10
namespace at {
namespace cuda {
using c10::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace at

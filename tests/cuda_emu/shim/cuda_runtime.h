// tests/cuda_emu: the parts of the CUDA runtime API the kernels' host code uses, on the emulator.
#pragma once
#include "../emu.h"
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef int cudaStream_t;  // c10::cuda::getCurrentCUDAStream() returns 0 here
// Occupancy: the emulator has no resource limits; 8 resident blocks per SM (its grid_for cap).
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, Kernel, int, size_t) {
  *n = 8;
  return cudaSuccess;
}

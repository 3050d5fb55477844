// tests/cuda_emu: device guards do nothing on the emulator (tensors are CPU tensors).
#pragma once
#include <c10/core/Device.h>
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(c10::Device) {}
  void set_index(c10::DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10

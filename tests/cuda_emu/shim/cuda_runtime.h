// tests/cuda_emu: the parts of the CUDA runtime API the kernels' host code uses, on the emulator.
#pragma once
#include "../emu.h"
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;

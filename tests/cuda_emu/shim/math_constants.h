// tests/cuda_emu: the CUDA math constants the kernels use, on the emulator.
#pragma once
#include <limits>
#define CUDART_INF_F (std::numeric_limits<float>::infinity())
#define CUDART_NAN_F (std::numeric_limits<float>::quiet_NaN())
#define CUDART_INF (std::numeric_limits<double>::infinity())

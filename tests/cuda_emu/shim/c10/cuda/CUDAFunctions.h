// tests/cuda_emu: nothing of c10/cuda/CUDAFunctions.h is needed on the emulator.
#pragma once

// What every tests/cuda_emu/<file>_emu.cpp needs before it includes csrc/cuda/<file>.cu: the emulator, and
// the .cu's own registration (TORCH_LIBRARY_IMPL(gradkit, CUDA, ...)) compiled into an unused function
// instead. The emulator's state is one for the whole library (gk_emu::state()); its control ops are in
// projection_emu.cpp.
#pragma once
#include <torch/library.h>

#include "emu.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void gk_emu_unregistered_##ns##_##key(torch::Library& m)

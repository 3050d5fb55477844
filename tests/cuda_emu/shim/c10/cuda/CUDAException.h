// tests/cuda_emu: launch and API checks are no-ops on the emulator (its errors are exceptions).
#pragma once
#include <c10/util/Exception.h>
#include "../../cuda_runtime.h"
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) ((void)(expr))
#ifndef C10_COMPILE_TIME_MAX_GPUS
#define C10_COMPILE_TIME_MAX_GPUS 16
#endif

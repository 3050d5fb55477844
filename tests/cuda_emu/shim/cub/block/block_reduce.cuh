// tests/cuda_emu: cub on the emulator.
#pragma once
#include "../../cub_emu.h"

// tests/cuda_emu: __half and its exact conversion to float (c10::Half's), on the emulator.
#pragma once
#include <c10/util/Half.h>
#include "../emu.h"
struct __half {
  unsigned short x;
};
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }

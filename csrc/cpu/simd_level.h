// The x86-64 SIMD level a CPU kernel family may use, shared by the projection and search kernels.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace gradkit {

// From cpuid, read once: 2 = AVX-512F, 1 = AVX2 + FMA + F16C, 0 = neither, or not an x86-64 GCC build (the
// families' portable / BLAS paths).
inline int cpu_simd_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const int level = __builtin_cpu_supports("avx512f") ? 2
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                              __builtin_cpu_supports("f16c"))
                               ? 1
                               : 0;
  return level;
#else
  return 0;
#endif
}

// True on an AMD CPU (cpuid vendor): Zen 2-5 have two FADD pipes beside their two FMA pipes, which the
// factored kernel's sign path (xor + add rows) uses; Intel's 512-bit adds, xors and FMAs share ports 0 and 5,
// where that path is 1.12-1.27x slower than the FMA kernel (session 26, an Emerald Rapids Xeon).
inline bool cpu_is_amd() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

// cpu_simd_level() capped by the environment, read per call (tests compare every level a CPU has):
// `var`=avx2 caps it at 1; `var`=`lowest` (the family's name for its level-0 path) or `legacy`=1 at 0.
inline int capped_simd_level(const char* var, const char* lowest, const char* legacy) {
  const char* v = std::getenv(var);
  const char* old = std::getenv(legacy);
  int cap = 2;
  if ((old && std::strcmp(old, "1") == 0) || (v && std::strcmp(v, lowest) == 0)) cap = 0;
  else if (v && std::strcmp(v, "avx2") == 0) cap = 1;
  return std::min(cpu_simd_level(), cap);
}

}  // namespace gradkit

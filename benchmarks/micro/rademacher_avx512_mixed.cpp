// Session 17: the FADD-pipe ("sign path") variant of the AVX-512 factored kernel (csrc/cpu/projection.cpp
// skinny_avx512), not built by setup.py:
//   g++ -O3 -std=c++17 benchmarks/micro/rademacher_avx512_mixed.cpp -o /tmp/m512 && /tmp/m512
// rademacher_avx2_mixed.cpp (session 12) tried the same idea on AVX2 (Zen 3): 1.15-1.2x in cache, not built.
// Idea: with a Rademacher W = +-s, s a power of two (p = 16: s = 0.25), fma(x, +-s, acc) == acc + (+-(s x)) bit
// for bit whenever s x is exact. Zen 4 has two FMA pipes and two separate FADD pipes, and the shipped kernel
// uses only the FMA pipes. So some tokens of a pass (NB "add rows") can take one xor and one add per feature from
// a prepared row xq = bits(s x) ^ bits(s): xq ^ w (w = +-s, the register the FMA rows use) is +-(s x).
// Each output is the same chain (features in ascending order, starting from +0), so the bits are the same.
// Variants, NA FMA rows + NB add rows, 48 token rows x K = 1000 features x p = 16, 192 KiB in L2, one core:
//   fma<NA, 0>  the shipped loop;
//   intr<NA,NB> the add rows in intrinsics: GCC emits vbroadcastss + vpxord + vaddps;
//   asm<NA,NB>  `vpxord m32{1to16}` (the broadcast folded into the xor) + `vaddps` in one asm statement.
//               The xor alone in asm let GCC hoist all 16 unrolled steps' xors ahead of the adds and spill them.
//               An `__m512&` accumulator operand kept the accumulator array on the stack; by value it stays in
//               registers.
// Result on session 17's VM (Zen 4: AMD EPYC family 25 model 17), GFLOP-equivalents/s, two runs of 5 rounds:
//   fma 8+0 114-117 (the core's FMA peak); intr 12+4 131-139 (1.19x); intr 8+4 119-133;
//   asm 8+4 141-174, mostly 164-174 (up to 1.48x: the pipes' bound is 1.5x); asm 10+6 150-169; asm 8+8 139-156;
//   asm 12+4 147-155.
// So a separate vbroadcastss takes an FP-pipe slot on Zen 4 and most of the gain goes with it.
// Built into the library (csrc/cpu/projection.cpp skinny_sign_avx512): 8 FMA rows + 4 add rows per pass, the add
// rows prepared 256 features at a time into an L1 scratch, and a chunk holding a nonzero |x| < 2^-126 / s or a
// non-finite value run by FMA instead. It gives the FMA kernel's bits on every input tried, NaN, inf, subnormals
// and -0 included. Timed through factored_project, 1000 x 1000, p = 16, in one process with the two paths
// alternated:
//   float32 a / g, one thread: 1.17x in L3 (4.77 -> 4.09 ms per 8192 tokens), 1.08-1.1x streamed from DRAM;
//   float32, two threads (the setting), per-round medians: 0.92-1.04x streamed and 0.92-1.03x in L3,
//   varying from run to run with the shared host's load; 4096 x 4096: 1.05-1.18x SLOWER (24-token tiles);
//   bf16 / fp16 a / g, two threads: 1.13-1.24x (half the bytes to stream; the rows are widened into L1 anyway).
// Under perf with two threads, a third of the float32 FMA kernel's samples fall on its prefetch loop: that op is
// bound by the DRAM stream (23-26 GB/s achieved, against 44-51 GB/s for torch's sum over the same a and g), not
// by the FMA pipes. So session 17 took this path for half-precision a and g only (12-token tiles).
// Session 18: float32 too, in another form: the FMA rows read where they lie (not copied into L1) and the add
// rows' next chunk prefetched into L1 a line per step; 1.02-1.18x at two threads (benchmarks/sign_ab.py,
// benchmarks/results/README.md). The copying form above measured 1.03-1.55x slower in session 18's re-run.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "micro_avx2.h"  // sign_inputs

constexpr int K = 1000;

__attribute__((target("avx512f"))) inline __m512 add_xor_bcast(__m512 acc, const float* q, __m512 w) {
  __m512 t;
  asm("vpxord %[q]%{1to16%}, %[w], %[t]\n\tvaddps %[t], %[acc], %[acc]"
      : [acc] "+v"(acc), [t] "=&v"(t)
      : [q] "m"(*q), [w] "v"(w));
  return acc;
}

// NA rows by FMA from x, NB rows by xor + add from their prepared rows xq; ASM picks the add rows' form.
template <int NA, int NB, bool ASM>
__attribute__((noinline, target("avx512f"))) void mixed(const float* x, const float* xq, const float* W, float* Y) {
  __m512 a[NA > 0 ? NA : 1], b[NB > 0 ? NB : 1];
#pragma GCC unroll 16
  for (int r = 0; r < NA; ++r) a[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r) b[r] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const __m512 w = _mm512_loadu_ps(W + k * 16);
#pragma GCC unroll 16
    for (int r = 0; r < NA; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, a[r]);
#pragma GCC unroll 16
    for (int r = 0; r < NB; ++r) {
      if constexpr (ASM) {
        b[r] = add_xor_bcast(b[r], xq + r * K + k, w);
      } else {
        const __m512i t = _mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(xq[r * K + k])), _mm512_castps_si512(w));
        b[r] = _mm512_add_ps(b[r], _mm512_castsi512_ps(t));
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NA; ++r) _mm512_storeu_ps(Y + r * 16, a[r]);
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r) _mm512_storeu_ps(Y + (NA + r) * 16, b[r]);
}

int main() {
  const int R = 48;
  const float s = 0.25f;
  std::vector<float> x, xq, W, Y(R * 16), Y2(R * 16);
  sign_inputs(R, K, s, x, xq, W);
  mixed<8, 0, false>(x.data(), xq.data(), W.data(), Y.data());
  mixed<5, 3, true>(x.data(), xq.data() + 5 * K, W.data(), Y2.data());
  const bool same_asm = std::memcmp(Y.data(), Y2.data(), 8 * 16 * sizeof(float)) == 0;
  mixed<5, 3, false>(x.data(), xq.data() + 5 * K, W.data(), Y2.data());
  const bool same_intr = std::memcmp(Y.data(), Y2.data(), 8 * 16 * sizeof(float)) == 0;
  std::printf("same bits as the FMA loop: asm %s, intrinsics %s\n", same_asm ? "yes" : "NO", same_intr ? "yes" : "NO");
  const int it = 4000;
  const double flops = 2.0 * R * K * 16 * it;
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
#define RUN(NA, NB, ASM, LABEL)                                                                             \
  {                                                                                                         \
    const auto t0 = std::chrono::steady_clock::now();                                                      \
    for (int i = 0; i < it; ++i)                                                                            \
      for (int t = 0; t + NA + NB <= R; t += NA + NB)                                                       \
        mixed<NA, NB, ASM>(x.data() + t * K, xq.data() + (t + NA) * K, W.data(), Y.data());                 \
    const auto t1 = std::chrono::steady_clock::now();                                                      \
    const int used = R / (NA + NB) * (NA + NB);                                                             \
    std::printf(" %s %d+%d %.1f", LABEL, NA, NB, flops * used / R / secs(t0, t1) / 1e9);                   \
  }
  for (int rep = 0; rep < 5; ++rep) {
    RUN(8, 0, false, "fma") RUN(12, 4, false, "intr") RUN(8, 4, false, "intr")
    RUN(8, 4, true, "asm") RUN(10, 6, true, "asm") RUN(8, 8, true, "asm") RUN(12, 4, true, "asm")
    std::printf("  GFLOP-eq/s\n");
  }
}

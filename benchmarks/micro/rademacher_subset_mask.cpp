// Session 42: a "subset" form of the AVX-512 sign path (csrc/cpu/projection.cpp skinny_sign_avx512), not built
// by setup.py:
//   g++ -O3 -std=c++17 benchmarks/micro/rademacher_subset_mask.cpp -o /tmp/sub && /tmp/sub
// Idea: with W = s * S (S in {+-1}), sum_j S_oj x_j = 2 A_o - X, where A_o sums the x_j whose sign is + and X sums
// all of them. A_o takes ONE op per feature and token on either pipe pair: on the FMA pipes fma(x, b_j, acc)
// with b_j in {0, 1} (exact: acc + x or acc), on the FADD pipes a merge-masked `vaddps acc{k_j}, acc, m32{1to16}`
// (the same bits), where the shipped add rows take two (xor + add). X, per token, costs a vector add per 16
// features and a horizontal sum per block; blocks of BL features (d = fma(2, A, -X) per block, then u += d)
// keep A's partial sums small, so the rounding error stays near the signed chain's when x has a large mean.
// On paper 6 FMA + 6 masked-add rows run 12 tokens in 6 cycles per feature against 8 for the shipped 8 + 4.
// Variants (48 tokens x K = 1000 x p = 16 in L2, one core, GFLOP-eq/s):
//   mix8+0: the FMA kernel; mix8+4: the shipped sign path (asm xor + add);
//   subNA+NB/BL: the subset form; "S" adds X and the per-block fix-up (without it the result is not the answer).
// Result on session 42's VM (Zen 4: AMD EPYC family 25 model 17), four runs of 4 rounds; the 12 rows agree with the FMA kernel to 5e-6 of |y| ~3:
//   mix8+0 112-116; mix8+4 137-174; sub6+6/128 (no X) 108-159, i.e. no faster than mix8+4 even without X;
//   sub6+6/128S 98-131, sub8+8/128S 99-129, sub6+6/64S 95-120: 0.7-0.85x of the shipped path.
// The merge-masked add does not issue faster than the xor + add pair it replaces, and X's horizontal sums
// cost the rest. (With the masked add in inline asm, GCC copied each accumulator through zmm0 and back: 62.)
// Not built.
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
  asm("vpxord %[q]%{1to16%}, %[w], %[t]\n\tvaddps %[t], %[acc], %[acc]" : [acc] "+v"(acc), [t] "=&v"(t) : [q] "m"(*q), [w] "v"(w));
  return acc;
}
// one merge-masked add from a broadcast (intrinsics: GCC folds the broadcast into the add)
__attribute__((target("avx512f"))) inline __m512 madd(__m512 acc, __mmask16 k, const float* q) {
  acc = _mm512_mask_add_ps(acc, k, acc, _mm512_set1_ps(*q));
  return acc;
}
template <int NA, int NB>
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
  for (int r = 0; r < NB; ++r) b[r] = add_xor_bcast(b[r], xq + r * K + k, w);
  }
#pragma GCC unroll 16
  for (int r = 0; r < NA; ++r) _mm512_storeu_ps(Y + r * 16, a[r]);
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r) _mm512_storeu_ps(Y + (NA + r) * 16, b[r]);
}
// subset: NA rows fma(x, B01, acc), NB rows masked add; blocks of BL features then d = fma(2,A,-S)
template <int NA, int NB, int BL, bool WITHS>
__attribute__((noinline, target("avx512f"))) void subset(const float* x, const float* B, const uint16_t* M, float* Y) {
  __m512 u[NA + NB];
#pragma GCC unroll 16
  for (int r = 0; r < NA + NB; ++r) u[r] = _mm512_setzero_ps();
  for (int k0 = 0; k0 < K; k0 += BL) {
    const int k1 = k0 + BL < K ? k0 + BL : K;
    __m512 a[NA > 0 ? NA : 1], b[NB > 0 ? NB : 1];
#pragma GCC unroll 16
  for (int r = 0; r < NA; ++r) a[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r) b[r] = _mm512_setzero_ps();
    for (int k = k0; k < k1; ++k) {
      const __m512 w = _mm512_loadu_ps(B + k * 16);
      const __mmask16 m = M[k];
#pragma GCC unroll 16
  for (int r = 0; r < NA; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, a[r]);
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r) b[r] = madd(b[r], m, x + (NA + r) * K + k);
    }
    if (WITHS) {
      const __m512 two = _mm512_set1_ps(2.0f);
#pragma GCC unroll 16
  for (int r = 0; r < NA + NB; ++r) {
        const float* xr = x + r * K + k0;
        __m512 s = _mm512_setzero_ps();
        int kk = 0;
        for (; kk + 16 <= k1 - k0; kk += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xr + kk));
        float S = _mm512_reduce_add_ps(s);
        for (; kk < k1 - k0; ++kk) S += xr[kk];
        const __m512 A = r < NA ? a[r < NA ? r : 0] : b[r >= NA ? r - NA : 0];
        u[r] = _mm512_add_ps(u[r], _mm512_fmsub_ps(two, A, _mm512_set1_ps(S)));
      }
    } else {
#pragma GCC unroll 16
  for (int r = 0; r < NA; ++r) u[r] = _mm512_add_ps(u[r], a[r]);
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r) u[NA + r] = _mm512_add_ps(u[NA + r], b[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NA + NB; ++r) _mm512_storeu_ps(Y + r * 16, u[r]);
}
int main() {
  const int R = 48;
  const float s = 0.25f;
  std::vector<float> x, xq, W, Y(R * 16), Y2(R * 16), B(K * 16);
  std::vector<uint16_t> M(K);
  sign_inputs(R, K, s, x, xq, W);
  for (int k = 0; k < K; ++k) { uint16_t m = 0; for (int o = 0; o < 16; ++o) { B[k*16+o] = W[k*16+o] > 0 ? 1.f : 0.f; if (W[k*16+o] > 0) m |= 1u << o; } M[k] = m; }
  mixed<8, 0>(x.data(), xq.data(), W.data(), Y.data());
  subset<6, 6, 128, true>(x.data(), B.data(), M.data(), Y2.data());
  double md = 0; for (int i = 0; i < 8 * 16; ++i) { double d = std::abs(Y[i] - 0.25 * Y2[i]); if (d > md) md = d; }
  std::printf("max diff %g (|y|~%g)\n", md, Y[0]);
  const int it = 4000;
  const double flops = 2.0 * R * K * 16 * it;
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
#define RUNM(NA, NB) { const auto t0 = std::chrono::steady_clock::now(); for (int i = 0; i < it; ++i) for (int t = 0; t + NA + NB <= R; t += NA + NB) mixed<NA, NB>(x.data() + t * K, xq.data() + (t + NA) * K, W.data(), Y.data()); const auto t1 = std::chrono::steady_clock::now(); const int used = R / (NA + NB) * (NA + NB); std::printf(" mix%d+%d %.0f", NA, NB, flops * used / R / secs(t0, t1) / 1e9); }
#define RUNS(NA, NB, BL, WS) { const auto t0 = std::chrono::steady_clock::now(); for (int i = 0; i < it; ++i) for (int t = 0; t + NA + NB <= R; t += NA + NB) subset<NA, NB, BL, WS>(x.data() + t * K, B.data(), M.data(), Y.data()); const auto t1 = std::chrono::steady_clock::now(); const int used = R / (NA + NB) * (NA + NB); std::printf(" sub%d+%d/%d%s %.0f", NA, NB, BL, WS ? "S" : "", flops * used / R / secs(t0, t1) / 1e9); }
  for (int rep = 0; rep < 4; ++rep) {
    RUNM(8, 0) RUNM(8, 4) RUNS(6, 6, 128, false) RUNS(6, 6, 128, true) RUNS(8, 8, 128, true) RUNS(6, 6, 64, true) RUNS(8,4,128,true) RUNS(6,10,128,true)
    std::printf("\n");
  }
}

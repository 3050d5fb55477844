// Session 16: the fixed-trip form of rademacher_sign_tables.cpp's sign tables (not built by setup.py):
//   g++ -O3 -std=c++17 benchmarks/micro/rademacher_sign_fma.cpp -o /tmp/sf && /tmp/sf
// A Rademacher W = s * S (S in {+-1}, K x 16). Tokens go 8 to a ymm (an 8 x 8 transpose of the row-major rows).
// Phase A, per group of 4 features and token vector: the 8 sums x0 +- x1 +- x2 +- x3 (12 adds on the FADD
// pipes), stored to an L1 table. Phase B, per output j and group: acc = fma(entry m(j, g), sign(j, g), acc)
// with sign = +-1.0 broadcast: exact (one rounding, as acc +- entry), a fixed trip count (no per-output +/- lists,
// whose loop exits mispredicted in the session-15 micro), and on the FMA pipes, so the table build's adds and
// the transposes' shuffles run beside it. One FMA per 4 inputs and output instead of 4.
// Variants: TV token vectors per tile (4: 32 tokens, 8: 64), GB groups per table block.
// -DNOB times phase A alone, -DNOA phase B alone (on a stale table: the diff is then meaningless).
// Result on session 16's VM, a Zen 4 (AMD EPYC family 25 model 17; this AVX2 code runs on the same two 256-bit FMA
// pipes as on Zen 3), one core, 192 tokens x 1000 features x p = 16 in cache, rows 1040 / 1000 / 1024 floats
// apart, best of 5; the shipped loop `fma6` at 93-114 GFLOP/s, the core's FMA peak:
//   whole: 0.84-1.24x of fma6 over six (TV, GB, JP) shapes, mostly 0.95-1.06x (same as the session-15 list form);
//   phase A alone 1.7-2.7x, phase B alone 1.8-2.5x: each costs 40-55% of the FMA kernel's time and the two do
//   not overlap (A: 8 loads, 24 shuffles, 24 adds, 16 256-bit stores per 8 tokens x 8 features; B: one 256-bit
//   load per FMA plus the offset and sign loads, so Zen 3's two 256-bit loads per cycle bound it at the FMA rate
//   it replaces 4:1, while the measured rate is about half of that).
// Error against fma6: max |diff| 1.1e-5 of |y| ~9 (another summation order). Not built: at best ~1.2x in cache,
// short of the 1.46x end to end that the 3x against bergson's 6.35 ms would need on the Zen 3 VM.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "micro_avx2.h"

constexpr int P = 16;

// Per (block, output, group): the table entry's offset within the block (in floats, token vector 0) and the
// sign of x0's coefficient. m = s1 * 4 + s2 * 2 + s3, signs relative to x0's.
struct Plan {
  int K, G, GB, TV, nblk;
  std::vector<int32_t> off;  // nblk x P x GB
  std::vector<float> sgn;    // nblk x P x GB
};
Plan make_plan(const float* W, int K, int GB, int TV) {
  Plan L{K, (K + 3) / 4, GB, TV, 0, {}, {}};
  L.nblk = (L.G + GB - 1) / GB;
  L.off.assign(static_cast<size_t>(L.nblk) * P * GB, 0);
  L.sgn.assign(static_cast<size_t>(L.nblk) * P * GB, 0.0f);
  auto w = [&](int k, int j) { return k < K ? W[k * P + j] : 1.0f; };  // padding features are zeros in x
  for (int b = 0; b < L.nblk; ++b)
    for (int j = 0; j < P; ++j)
      for (int q = 0; q < GB; ++q) {
        const int g = b * GB + q;
        if (g >= L.G) break;
        const bool s0 = w(4 * g, j) < 0;
        const int m = ((w(4 * g + 1, j) < 0) != s0) * 4 + ((w(4 * g + 2, j) < 0) != s0) * 2 + ((w(4 * g + 3, j) < 0) != s0);
        L.off[(b * P + j) * GB + q] = (q * 8 + m) * TV * 8;
        L.sgn[(b * P + j) * GB + q] = s0 ? -1.0f : 1.0f;
      }
  return L;
}


// 8 * TV tokens (rows x[r], K features, K % 8 == 0 here) -> Y[r][P], s the scale
template <int TV, int GB, int JP>
__attribute__((noinline, target("avx2,fma"))) void sign_fma_tile(const float* const* x, const Plan& L, float s,
                                                                 float* Y) {
  alignas(64) static thread_local float T[GB * 8 * TV * 8];
  alignas(64) float acc[P][TV * 8];
  for (int b = 0; b < L.nblk; ++b) {
    const int g0 = b * GB, g1 = std::min(L.G, g0 + GB), ng = g1 - g0;
#ifndef NOA
    for (int tv = 0; tv < TV; ++tv)
      for (int g = g0; g < g1; g += 2) {
        __m256 r[8];
        for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(x[tv * 8 + q] + 4 * g);
        tr8(r);
        combos<TV * 8>(r[0], r[1], r[2], r[3], T + ((g - g0) * 8 * TV + tv) * 8);
        combos<TV * 8>(r[4], r[5], r[6], r[7], T + ((g + 1 - g0) * 8 * TV + tv) * 8);
      }
#endif
#ifndef NOB
    for (int j0 = 0; j0 < P; j0 += JP) {  // JP outputs at once: JP * TV independent FMA chains
      __m256 a[JP][TV];
#pragma GCC unroll 8
      for (int jj = 0; jj < JP; ++jj)
#pragma GCC unroll 8
        for (int tv = 0; tv < TV; ++tv)
          a[jj][tv] = b == 0 ? _mm256_setzero_ps() : _mm256_load_ps(acc[j0 + jj] + tv * 8);
#define GK_STEP(q)                                                                                           \
  for (int jj = 0; jj < JP; ++jj) {                                                                         \
    const float* t = T + L.off[(b * P + j0 + jj) * GB + (q)];                                               \
    const __m256 sv = _mm256_broadcast_ss(&L.sgn[(b * P + j0 + jj) * GB + (q)]);                            \
    for (int tv = 0; tv < TV; ++tv) a[jj][tv] = _mm256_fmadd_ps(_mm256_load_ps(t + tv * 8), sv, a[jj][tv]); \
  }
      if (ng == GB) {
#pragma GCC unroll 32
        for (int q = 0; q < GB; ++q) { GK_STEP(q) }
      } else {
        for (int q = 0; q < ng; ++q) { GK_STEP(q) }
      }
#undef GK_STEP
#pragma GCC unroll 8
      for (int jj = 0; jj < JP; ++jj)
#pragma GCC unroll 8
        for (int tv = 0; tv < TV; ++tv) _mm256_store_ps(acc[j0 + jj] + tv * 8, a[jj][tv]);
    }
#endif
  }
  for (int j = 0; j < P; ++j)
    for (int t = 0; t < TV * 8; ++t) Y[t * P + j] = s * acc[j][t];
}

template <int TV, int GB, int JP>
void run(const char* name, int K, int ld) {
  const int R = 192;
  const float s = 0.25f;
  std::vector<float> x(static_cast<size_t>(R) * ld), W(K * 16), Y(R * 16), Y2(R * 16);
  std::srand(1);
  for (auto& v : x) v = std::rand() / static_cast<float>(RAND_MAX) - 0.5f;
  for (int i = 0; i < K * 16; ++i) W[i] = (std::rand() & 1) ? s : -s;
  std::vector<const float*> rows(R);
  for (int r = 0; r < R; ++r) rows[r] = x.data() + static_cast<size_t>(r) * ld;
  const Plan L = make_plan(W.data(), K, GB, TV);
  constexpr int TT = 8 * TV;
  for (int q = 0; q < R; q += 6) fma_rows<6>(PointerRows{rows.data() + q}, K, W.data(), Y.data() + q * 16);
  for (int q = 0; q < R; q += TT) sign_fma_tile<TV, GB, JP>(rows.data() + q, L, s, Y2.data() + q * 16);
  double md = 0, my = 0;
  for (int i = 0; i < R * 16; ++i) md = std::fmax(md, std::fabs(Y[i] - Y2[i])), my = std::fmax(my, std::fabs(Y[i]));
  const int it = 2000;
  const double flops = 2.0 * R * K * 16 * it;
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  double best_f = 0, best_s = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i)
      for (int q = 0; q < R; q += 6) fma_rows<6>(PointerRows{rows.data() + q}, K, W.data(), Y.data() + q * 16);
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i)
      for (int q = 0; q < R; q += TT) sign_fma_tile<TV, GB, JP>(rows.data() + q, L, s, Y2.data() + q * 16);
    auto t2 = std::chrono::steady_clock::now();
    best_f = std::max(best_f, flops / secs(t0, t1) / 1e9);
    best_s = std::max(best_s, flops / secs(t1, t2) / 1e9);
  }
  std::printf("%-22s K %4d ld %4d: fma6 %6.1f  sign-fma %6.1f GFLOP-eq/s (%.2fx)  max diff %.2g of |y| %.2g\n", name, K,
              ld, best_f, best_s, best_s / best_f, md, my);
}

int main() {
  for (int ld : {1040, 1000, 1024}) {
    run<4, 16, 1>("TV 4 GB 16 JP 1", 1000, ld);
    run<4, 16, 2>("TV 4 GB 16 JP 2", 1000, ld);
    run<4, 8, 2>("TV 4 GB 8 JP 2", 1000, ld);
    run<8, 8, 1>("TV 8 GB 8 JP 1", 1000, ld);
    run<2, 16, 4>("TV 2 GB 16 JP 4", 1000, ld);
    run<6, 8, 2>("TV 6 GB 8 JP 2", 1000, ld);
  }
}

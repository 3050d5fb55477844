// Microbenchmark behind the session-15 decision not to build a "sign table" variant of the AVX2 factored kernel
// (csrc/cpu/projection.cpp skinny_avx2); not built by setup.py:
//   g++ -O3 -std=c++17 benchmarks/micro/rademacher_sign_tables.cpp -o /tmp/st && /tmp/st
//   (add -DNOB to time phase A alone, -DNOB -DNOTR to time phase A without its transposes)
// Idea (the session-13 note's "sign tables over token lanes"): with a Rademacher W = s * S (S in {+-1}), each
// output is s times a signed sum of inputs. Take 32 tokens as 4 vectors of 8 lanes (an 8 x 8 transpose of the
// row-major rows), and for each group of 4 features build the 8 sums x0 +- x1 +- x2 +- x3 once (12 adds,
// 8 stores per token vector: phase A); every output then adds one table entry per group, + or - by the sign of
// x0 (phase B: one load + add per token vector, instead of 4 FMAs). Counted per 4 features x 32 tokens x 16
// outputs: 256 FMAs (128 cycles on the two FMA pipes) against 48 + 64 adds, 32 stores and 48 shuffles, about
// 2.5x fewer cycles on paper.
// Result on the Zen 3 VM (session 15, one core, rows 4160 B apart, 96 tokens x 1000 features x p = 16 in L2):
//   fma6 (the shipped kernel's loop) 83-92 GFLOP-eq/s; sign tables 97-105 (1.05-1.2x);
//   phase A alone 189-195, and 172-191 without the transposes: the table build (its stores and adds, not the
//   shuffles) costs as much as ~55% of the FMA kernel by itself, and phase B (offsets of variable-length
//   +/- lists per output, so a mispredicted loop exit per list) the rest. With rows 4096 B apart
//   it was 0.95-1.0x. A fixed-trip phase B (xor by the sign of x0, no lists) was not made correct in the
//   time given (the last block's padding); it would trade the mispredictions for an xor per entry.
// At p = 16 each table entry is used only twice (16 outputs / 8 entries), which is what sinks it: the gain grows
// with p (p = 64: 8 uses per entry), but the target and GradientCollector's default are p = 16. A 1.2x
// in cache is at most ~10% end to end (the op also streams a and g from DRAM), short of the 3x target
// (benchmarks/results/README.md, zen3-avx2), for a second kernel whose sums differ in order from every other
// backend's. Not built. benchmarks/micro/rademacher_vpermps.cpp is the other formulation tried.
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>

#include "micro_avx2.h"
constexpr int K = 1000, G = K / 4, P = 16, TV = 4, TT = 8 * TV, GB = 16;  // GB groups per block
constexpr int NBLK = (G + GB - 1) / GB;

struct Lists {  // per block, per output: offsets (in floats) into the block table, pos then neg
  std::vector<int32_t> off;   // NBLK x P x GB
  std::vector<int32_t> npos;  // NBLK x P
  std::vector<int32_t> ncnt;  // NBLK x P (total)
};
// table layout per block: [g][m][tv][8]
Lists make_lists(const float* W) {
  Lists L;
  L.off.assign(NBLK * P * GB, 0);
  L.npos.assign(NBLK * P, 0);
  L.ncnt.assign(NBLK * P, 0);
  for (int b = 0; b < NBLK; ++b)
    for (int j = 0; j < P; ++j) {
      int32_t* o = &L.off[(b * P + j) * GB];
      int n = 0;
      const int g1 = std::min(G, (b + 1) * GB);
      for (int pass = 0; pass < 2; ++pass)
        for (int g = b * GB; g < g1; ++g) {
          const bool s0 = W[(4 * g) * P + j] < 0;
          if (s0 != (pass == 1)) continue;
          const bool s1 = (W[(4 * g + 1) * P + j] < 0) != s0, s2 = (W[(4 * g + 2) * P + j] < 0) != s0,
                     s3 = (W[(4 * g + 3) * P + j] < 0) != s0;
          const int m = s1 * 4 + s2 * 2 + s3;
          o[n++] = ((g - b * GB) * 8 + m) * TV * 8;
          if (pass == 0) L.npos[b * P + j] = n;
        }
      L.ncnt[b * P + j] = n;
    }
  return L;
}


// 32 tokens (rows x[r], K features) -> Y[r][P] (token-major), with s the scale
__attribute__((noinline, target("avx2,fma"))) void lanes_tile(const float* const* x, const Lists& L, float s, float* Y) {
  alignas(64) static thread_local float T[GB * 8 * TV * 8];
  alignas(64) float acc[2][P][TV * 8];  // pos / neg partial sums, lanes = tokens
  for (int b = 0; b < NBLK; ++b) {
    const int g0 = b * GB, g1 = std::min(G, g0 + GB);
    // phase A: transpose 8 tokens x 8 features at a time, build combos
    for (int tv = 0; tv < TV; ++tv)
      for (int g = g0; g < g1; g += 2) {
        const int k = 4 * g;
        __m256 r[8];
        for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(x[tv * 8 + q] + k);  // (g1-g0 even assumed)
#ifndef NOTR
        tr8(r);
#endif
        combos<TV * 8>(r[0], r[1], r[2], r[3], T + ((g - g0) * 8 * TV + tv) * 8);
        combos<TV * 8>(r[4], r[5], r[6], r[7], T + ((g + 1 - g0) * 8 * TV + tv) * 8);
      }
#ifndef NOB
    // phase B
    for (int j = 0; j < P; ++j) {
      const int32_t* o = &L.off[(b * P + j) * GB];
      const int np = L.npos[b * P + j], nt = L.ncnt[b * P + j];
      __m256 a0, a1, a2, a3, n0, n1, n2, n3;
      if (b == 0) {
        a0 = a1 = a2 = a3 = n0 = n1 = n2 = n3 = _mm256_setzero_ps();
      } else {
        a0 = _mm256_load_ps(acc[0][j]); a1 = _mm256_load_ps(acc[0][j] + 8); a2 = _mm256_load_ps(acc[0][j] + 16); a3 = _mm256_load_ps(acc[0][j] + 24);
        n0 = _mm256_load_ps(acc[1][j]); n1 = _mm256_load_ps(acc[1][j] + 8); n2 = _mm256_load_ps(acc[1][j] + 16); n3 = _mm256_load_ps(acc[1][j] + 24);
      }
      int i = 0;
      for (; i < np; ++i) {
        const float* t = T + o[i];
        a0 = _mm256_add_ps(a0, _mm256_load_ps(t)); a1 = _mm256_add_ps(a1, _mm256_load_ps(t + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(t + 16)); a3 = _mm256_add_ps(a3, _mm256_load_ps(t + 24));
      }
      for (; i < nt; ++i) {
        const float* t = T + o[i];
        n0 = _mm256_add_ps(n0, _mm256_load_ps(t)); n1 = _mm256_add_ps(n1, _mm256_load_ps(t + 8));
        n2 = _mm256_add_ps(n2, _mm256_load_ps(t + 16)); n3 = _mm256_add_ps(n3, _mm256_load_ps(t + 24));
      }
      _mm256_store_ps(acc[0][j], a0); _mm256_store_ps(acc[0][j] + 8, a1); _mm256_store_ps(acc[0][j] + 16, a2); _mm256_store_ps(acc[0][j] + 24, a3);
      _mm256_store_ps(acc[1][j], n0); _mm256_store_ps(acc[1][j] + 8, n1); _mm256_store_ps(acc[1][j] + 16, n2); _mm256_store_ps(acc[1][j] + 24, n3);
    }
#endif
  }
  for (int j = 0; j < P; ++j)
    for (int t = 0; t < TT; ++t) Y[t * P + j] = s * (acc[0][j][t] - acc[1][j][t]);
}

int main() {
  const int R = 96;
  const float s = 0.25f;
  std::vector<float> x(R * 1040), W(K * 16), Y(R * 16), Y2(R * 16);
  for (auto& v : x) v = std::rand() / static_cast<float>(RAND_MAX) - 0.5f;
  for (int i = 0; i < K * 16; ++i) W[i] = (std::rand() & 1) ? s : -s;
  std::vector<const float*> rows(R);
  for (int r = 0; r < R; ++r) rows[r] = x.data() + r * 1040;
  Lists L = make_lists(W.data());
  for (int q = 0; q < R; q += 6) fma_rows<6>(PointerRows{rows.data() + q}, K, W.data(), Y.data() + q * 16);
  for (int q = 0; q < R; q += TT) lanes_tile(rows.data() + q, L, s, Y2.data() + q * 16);
  double md = 0; for (int i = 0; i < R * 16; ++i) md = std::fmax(md, std::fabs(Y[i] - Y2[i]));
  std::printf("max diff %.3g (|y|~%.3g)\n", md, std::fabs(Y[5]));
  const int it = 5000;
  const double flops = 2.0 * R * K * 16 * it;
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  for (int rep = 0; rep < 6; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) for (int q = 0; q < R; q += 6) fma_rows<6>(PointerRows{rows.data() + q}, K, W.data(), Y.data() + q * 16);
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) for (int q = 0; q < R; q += TT) lanes_tile(rows.data() + q, L, s, Y2.data() + q * 16);
    auto t2 = std::chrono::steady_clock::now();
    std::printf("fma6 %.1f  lanes %.1f GFLOP-eq/s\n", flops / secs(t0, t1) / 1e9, flops / secs(t1, t2) / 1e9);
  }
}

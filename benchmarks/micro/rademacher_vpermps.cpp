// Microbenchmark (session 15): a lane-permute formulation of the AVX2 factored kernel for a Rademacher W = s * S,
// not built by setup.py:
//   g++ -O3 benchmarks/micro/rademacher_vpermps.cpp -o /tmp/vp && /tmp/vp
// Outputs stay in lanes (as in skinny_avx2); per token and group of 3 features, one ymm holds all 8 signed sums
// +-x0 +-x1 +-x2 (a broadcast, an xor and two FMAs, or three xors and two adds: "xor"), and each output vector
// takes its lanes' sums with one vpermps by a per-(group, vector) index and one add. That is 7 ops per 3 features
// and 16 outputs against 6 FMAs, but spread over all four FP pipes instead of the two FMA pipes.
// Result on the Zen 3 VM (one core, 24 tokens x 999 features x p = 16, in cache): fma6 74-95 GFLOP-eq/s,
// vpermps 57-73 (4 or 6 tokens per pass), xor variant 40-73: 0.75-0.8x. Zen 3's lane-crossing vpermps
// does not keep up. Not built.
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>

#include "micro_avx2.h"
constexpr int K = 999;  // multiple of 3 for the prototype
constexpr int G = K / 3;

// idx: G x 2 x 8 int32
template <int MR, bool XOR>
__attribute__((noinline, target("avx2,fma"))) void perm_rows(const float* x, const int32_t* idx, float s, float* Y) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256 S1 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1), S2 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 M0 = _mm256_castsi256_ps(_mm256_setr_epi32(0,0,0,0,(int)0x80000000,(int)0x80000000,(int)0x80000000,(int)0x80000000));
  const __m256 M1 = _mm256_castsi256_ps(_mm256_setr_epi32(0,0,(int)0x80000000,(int)0x80000000,0,0,(int)0x80000000,(int)0x80000000));
  const __m256 M2 = _mm256_castsi256_ps(_mm256_setr_epi32(0,(int)0x80000000,0,(int)0x80000000,0,(int)0x80000000,0,(int)0x80000000));
  for (int g = 0; g < G; ++g) {
    const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + g * 16));
    const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + g * 16 + 8));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float* xr = x + r * K + 3 * g;
      __m256 c;
      if (XOR) {
        c = _mm256_add_ps(_mm256_xor_ps(_mm256_broadcast_ss(xr), M0), _mm256_xor_ps(_mm256_broadcast_ss(xr + 1), M1));
        c = _mm256_add_ps(c, _mm256_xor_ps(_mm256_broadcast_ss(xr + 2), M2));
      } else {
        c = _mm256_xor_ps(_mm256_broadcast_ss(xr), M0);
        c = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 1), S1, c);
        c = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + 2), S2, c);
      }
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_permutevar8x32_ps(c, i0));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_permutevar8x32_ps(c, i1));
    }
  }
  const __m256 sv = _mm256_set1_ps(s);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(Y + r * 16, _mm256_mul_ps(acc[r][0], sv));
    _mm256_storeu_ps(Y + r * 16 + 8, _mm256_mul_ps(acc[r][1], sv));
  }
}

int main() {
  const int R = 24;
  const float s = 0.25f;
  std::vector<float> x(R * K), W(K * 16), Y(R * 16), Y2(R * 16);
  std::vector<int32_t> idx(G * 16);
  for (auto& v : x) v = std::rand() / static_cast<float>(RAND_MAX) - 0.5f;
  for (int i = 0; i < K * 16; ++i) W[i] = (std::rand() & 1) ? s : -s;
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 16; ++j)
      idx[g * 16 + j] = (W[(3 * g) * 16 + j] < 0) * 4 + (W[(3 * g + 1) * 16 + j] < 0) * 2 + (W[(3 * g + 2) * 16 + j] < 0);
  fma_rows<6>(ContiguousRows{x.data(), K}, K, W.data(), Y.data());
  perm_rows<6, false>(x.data(), idx.data(), s, Y2.data());
  double md = 0; for (int i = 0; i < 96; ++i) md = std::fmax(md, std::fabs(Y[i] - Y2[i]));
  perm_rows<6, true>(x.data(), idx.data(), s, Y2.data());
  double md2 = 0; for (int i = 0; i < 96; ++i) md2 = std::fmax(md2, std::fabs(Y[i] - Y2[i]));
  std::printf("max diff fma vs perm %.3g, xor %.3g (|y|~%.3g)\n", md, md2, std::fabs(Y[0]));
  const int it = 20000;
  const double flops = 2.0 * R * K * 16 * it;
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  for (int rep = 0; rep < 6; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) for (int q = 0; q < R; q += 6) fma_rows<6>(ContiguousRows{x.data() + q * K, K}, K, W.data(), Y.data());
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) for (int q = 0; q < R; q += 4) perm_rows<4, false>(x.data() + q * K, idx.data(), s, Y.data());
    auto t2 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) for (int q = 0; q < R; q += 6) perm_rows<6, false>(x.data() + q * K, idx.data(), s, Y.data());
    auto t3 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) for (int q = 0; q < R; q += 4) perm_rows<4, true>(x.data() + q * K, idx.data(), s, Y.data());
    auto t4 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) for (int q = 0; q < R; q += 6) perm_rows<6, true>(x.data() + q * K, idx.data(), s, Y.data());
    auto t5 = std::chrono::steady_clock::now();
    std::printf("fma6 %.1f  perm4 %.1f perm6 %.1f  xor4 %.1f xor6 %.1f GFLOP-eq/s\n", flops / secs(t0, t1) / 1e9,
                flops / secs(t1, t2) / 1e9, flops / secs(t2, t3) / 1e9, flops / secs(t3, t4) / 1e9, flops / secs(t4, t5) / 1e9);
  }
}

// Microbenchmark behind the session-12 decision not to build an FADD-pipe variant of the AVX2 factored kernel
// (csrc/cpu/projection.cpp skinny_avx2), not built by setup.py:
//   g++ -O3 benchmarks/micro/rademacher_avx2_mixed.cpp -o /tmp/mixed && /tmp/mixed
// Zen 2-4 have two FMA pipes and two separate FADD pipes; skinny_avx2 (6 tokens x 16 outputs, one broadcast FMA
// per input and 8 outputs) leaves the FADD pipes idle. With a Rademacher W of +-s and s a power of two (p = 4^m:
// p = 16 gives s = 0.25), fma(x, +-s, acc) == acc + (+-(s x)) bit for bit whenever s x is exact (not for
// |x| < 2^-124 at p = 16, which would need a fallback). So some tokens can take the add path from a prepared row
// xq = bits(s x) ^ bits(s): xq ^ w (w = +-s, the register the FMA rows use) is +-(s x), one xor and one add,
// with no extra load. The variants below check that identity (same bits) and time 12 tokens x 16 outputs x
// K = 1000 in cache, in GFLOP-equivalents per second on one core.
// Result on the Zen 3 VM (session 12, 8 rounds): fma6 88-98, mixq 4+2 88-113, mixq 5+1 101-114, mixq 3+3 82-107:
// 1.15-1.2x in cache. The op spends ~70% of its time in skinny_avx2 (perf), so the gain would be ~10% of the
// hook work (4.4 -> ~4.0 ms; 3x bergson needs ~3.7 ms on this VM), for the cost of a second kernel, a prepared
// row per add-path token and a tiny-value fallback. Not built.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "micro_avx2.h"

constexpr int K = 1000;

// NA tokens by FMA from x, NB tokens by xor + add from their prepared rows xq.
template <int NA, int NB>
__attribute__((noinline, target("avx2,fma"))) void mixed(const float* x, const float* xq, const float* W, float* Y) {
  __m256 a[NA][2], b[NB][2];
#pragma GCC unroll 6
  for (int r = 0; r < NA; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < NB; ++r) b[r][0] = b[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(W + k * 16), w1 = _mm256_loadu_ps(W + k * 16 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < NA; ++r) {
      const __m256 v = _mm256_broadcast_ss(x + r * K + k);
      a[r][0] = _mm256_fmadd_ps(v, w0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(v, w1, a[r][1]);
    }
#pragma GCC unroll 6
    for (int r = 0; r < NB; ++r) {
      const __m256 v = _mm256_broadcast_ss(xq + r * K + k);
      b[r][0] = _mm256_add_ps(b[r][0], _mm256_xor_ps(v, w0));
      b[r][1] = _mm256_add_ps(b[r][1], _mm256_xor_ps(v, w1));
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < NA; ++r) {
    _mm256_storeu_ps(Y + r * 16, a[r][0]);
    _mm256_storeu_ps(Y + r * 16 + 8, a[r][1]);
  }
#pragma GCC unroll 6
  for (int r = 0; r < NB; ++r) {
    _mm256_storeu_ps(Y + (NA + r) * 16, b[r][0]);
    _mm256_storeu_ps(Y + (NA + r) * 16 + 8, b[r][1]);
  }
}

int main() {
  const int R = 12;
  const float s = 0.25f;
  std::vector<float> x, xq, W, Y(R * 16), Y2(R * 16);
  sign_inputs(R, K, s, x, xq, W);
  fma_rows<6>(ContiguousRows{x.data(), K}, K, W.data(), Y.data());
  mixed<4, 2>(x.data(), xq.data() + 4 * K, W.data(), Y2.data());
  std::printf("same bits: %s\n", std::memcmp(Y.data(), Y2.data(), 6 * 16 * sizeof(float)) == 0 ? "yes" : "NO");
  const int it = 40000;
  const double flops = 2.0 * R * K * 16 * it;
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  for (int rep = 0; rep < 8; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) {
      fma_rows<6>(ContiguousRows{x.data(), K}, K, W.data(), Y.data());
      fma_rows<6>(ContiguousRows{x.data() + 6 * K, K}, K, W.data(), Y.data());
    }
    const auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) {
      mixed<4, 2>(x.data(), xq.data() + 4 * K, W.data(), Y.data());
      mixed<4, 2>(x.data() + 6 * K, xq.data() + 10 * K, W.data(), Y.data());
    }
    const auto t2 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) {
      mixed<5, 1>(x.data(), xq.data() + 5 * K, W.data(), Y.data());
      mixed<5, 1>(x.data() + 6 * K, xq.data() + 11 * K, W.data(), Y.data());
    }
    const auto t3 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i) {
      mixed<3, 3>(x.data(), xq.data() + 3 * K, W.data(), Y.data());
      mixed<3, 3>(x.data() + 6 * K, xq.data() + 9 * K, W.data(), Y.data());
    }
    const auto t4 = std::chrono::steady_clock::now();
    std::printf("fma6 %.1f  mixq 4+2 %.1f  mixq 5+1 %.1f  mixq 3+3 %.1f GFLOP-eq/s\n", flops / secs(t0, t1) / 1e9,
                flops / secs(t1, t2) / 1e9, flops / secs(t2, t3) / 1e9, flops / secs(t3, t4) / 1e9);
  }
}

// Session 25: could the factored kernel run bfloat16 rows with vdpbf16ps (AVX512-BF16, two multiply-adds per
// float32 lane and instruction) instead of FMAs, bit for bit? Not built by setup.py:
//   g++ -O2 benchmarks/micro/bf16_dot.cpp -o /tmp/bd && /tmp/bd
// Part 1, the bits. vdpbf16ps(acc, a, b) does acc += a.hi * b.hi, then acc += a.lo * b.lo per lane, each an FMA
// rounded to nearest, with denormal inputs read as zero and denormal results flushed (Intel's definition). With
// the feature pair (k, k + 1) swapped into (hi, lo) on both sides, the chain is the FMA kernel's (k ascending
// from +0) as long as nothing denormal is read or made; W = +-s (s = 2^-2) and every nonzero |x| >= 2^-119 / s
// guarantee that (a product then has 8 significant bits and is >= 2^-119, so every partial sum is a multiple of
// 2^-126: zero or normal). Random pairs (any bits, wide exponents, tiny values, large ones), 16 outputs each.
// Part 2, the rate: 16 independent accumulators, the x pair as an embedded broadcast, against the same loop of
// FMAs (one multiply-add per lane).
// Result on the session-25 VM (AMD EPYC Zen 4, family 25 model 17, avx512_bf16): part 1, 0 mismatches in
// 1,732,992 outputs that meet the bound (91,688 of 200,000 cases did not and were skipped; without the swap
// 189,603 mismatches); part 2, vdpbf16ps 0.665 ns per instruction against 0.273 ns per FMA: 2.4x the time for
// 2x the work, so 1.2x slower per multiply-add (a /tmp variant: the register-operand zmm form 0.595 ns, the ymm
// form 0.279 ns for 8 lanes: at best the FMA's multiply-add rate). A factored kernel built on it (one pass of 16 rows, the rows'
// pairs swapped per 256-feature chunk into L1, the bound checked per chunk with an FMA fallback) matched the
// FMA kernel bit for bit and timed 2.37 vs 2.36 ms (1000 x 1000, 64 x 128 bf16 tokens, two threads): not
// kept. On CPUs whose vdpbf16ps issues at the FMA rate (Intel's Sapphire Rapids documents it so) the same
// kernel would halve the multiply-add count; it would need such a CPU to measure.
// Session 26, on such a CPU (Intel Xeon, Emerald Rapids, family 6 model 207): part 1 the same (0 mismatches
// swapped, 189,603 without); part 2, vdpbf16ps 0.570 ns per zmm instruction against 0.154 ns per FMA: 1.85x
// slower per multiply-add there too (the FMA issues on two ports, vdpbf16ps does not). The kernel stays unbuilt.
#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

static float bf2f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static uint16_t f2bf(float f) {  // truncation: any bfloat16 will do as a test input
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

__attribute__((target("avx512f,avx512bf16"))) static void dp_chain(const uint16_t* x, const uint16_t (*w)[16], int K,
                                                                  bool swap, float* out) {
  __m512 acc = _mm512_setzero_ps();
  alignas(64) uint32_t wp[16];
  for (int k = 0; k < K; k += 2) {
    const uint32_t xs = swap ? (uint32_t(x[k]) << 16) | x[k + 1] : (uint32_t(x[k + 1]) << 16) | x[k];
    for (int j = 0; j < 16; ++j)
      wp[j] = swap ? (uint32_t(w[k][j]) << 16) | w[k + 1][j] : (uint32_t(w[k + 1][j]) << 16) | w[k][j];
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(xs)),
                           (__m512bh)_mm512_load_si512(wp));
  }
  _mm512_storeu_ps(out, acc);
}

__attribute__((target("avx512f,avx512bf16"))) __attribute__((noinline)) static float dp_rate(const uint32_t* q,
                                                                                            long n) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512i w = _mm512_set1_epi32(0x3e80be80);
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r)
      asm("vdpbf16ps %[q]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc[r]) : [q] "m"(q[r]), [w] "v"(w));
  }
  __m512 s = acc[0];
  for (int r = 1; r < 16; ++r) s = _mm512_add_ps(s, acc[r]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f"))) __attribute__((noinline)) static float fma_rate(const float* q, long n) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512 w = _mm512_set1_ps(0.25f);
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r]), w, acc[r]);
  }
  __m512 s = acc[0];
  for (int r = 1; r < 16; ++r) s = _mm512_add_ps(s, acc[r]);
  return _mm512_reduce_add_ps(s);
}

int main() {
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("this CPU has no AVX512-BF16\n");
    return 0;
  }
  std::mt19937_64 rng(1);
  long outputs = 0, skipped = 0, bad_swapped = 0, bad_plain = 0;
  const float lo = std::ldexp(1.0f, -119) / 0.25f;
  for (int trial = 0; trial < 200000; ++trial) {
    const int K = 2 + 2 * static_cast<int>(rng() % 64);
    uint16_t x[128], w[128][16];
    const int mode = static_cast<int>(rng() % 4);
    for (int k = 0; k < K; ++k) {
      const float m = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) / 1000.0f;
      x[k] = mode == 0   ? static_cast<uint16_t>(rng())
             : mode == 1 ? f2bf(std::ldexp(m, static_cast<int>(rng() % 40) - 20))
             : mode == 2 ? f2bf(std::ldexp(m, -110 - static_cast<int>(rng() % 10)))
                         : f2bf(m * ((rng() & 1) ? 1e20f : 1.0f));
      for (int j = 0; j < 16; ++j) w[k][j] = (rng() & 1) ? 0x3e80 : 0xbe80;  // +-0.25
    }
    bool ok = true;
    for (int k = 0; k < K; ++k) {
      const float f = bf2f(x[k]);
      if (!std::isfinite(f) || (f != 0.0f && std::fabs(f) < lo)) ok = false;
    }
    if (!ok) {
      ++skipped;
      continue;
    }
    float ref[16], got[16], plain[16];
    for (int j = 0; j < 16; ++j) {
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) acc = std::fma(bf2f(x[k]), bf2f(w[k][j]), acc);
      ref[j] = acc;
    }
    dp_chain(x, w, K, true, got);
    dp_chain(x, w, K, false, plain);
    for (int j = 0; j < 16; ++j) {
      ++outputs;
      bad_swapped += std::memcmp(&ref[j], &got[j], 4) != 0;
      bad_plain += std::memcmp(&ref[j], &plain[j], 4) != 0;
    }
  }
  std::printf("bits: %ld outputs, %ld mismatches swapped, %ld without the swap (%ld cases skipped)\n", outputs,
              bad_swapped, bad_plain, skipped);
  alignas(64) uint32_t q[16] = {0};
  alignas(64) float f[16] = {0};
  const long n = 20000000;
  auto t = std::chrono::steady_clock::now();
  const float a = dp_rate(q, n);
  const double d1 = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  t = std::chrono::steady_clock::now();
  const float b = fma_rate(f, n);
  const double d2 = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  std::printf("rate: vdpbf16ps %.3f ns, vfmadd %.3f ns per zmm instruction (%g %g)\n", d1 / (n * 16.0) * 1e9,
              d2 / (n * 16.0) * 1e9, a, b);
}

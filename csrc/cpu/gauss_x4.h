// Float64 log and sin / cos, 4 lanes (AVX2 + FMA), for the Gaussian projection entries (projection.cpp's
// gauss_pairs_avx2): only the argument ranges that generator produces. Each result is within 1 ulp of float64
// of glibc's (tests/cpp/gauss_x4_check.cpp: 4M random arguments of the generator's form and the edge cases;
// tests/test_projection_ops.py runs it), so after the rounding to fp32 an entry differs from the scalar libm
// path's in about 1 of 10^8 cases, by 1 ulp (0 of 134M seen). Coefficients: Taylor series, exact up to the
// rounding of 1 / n! or 1 / n to float64. No torch dependency.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

namespace gradkit {
namespace projection {
namespace gauss {

__attribute__((target("avx2,fma"))) inline __m256d bcast(double v) { return _mm256_set1_pd(v); }

// log x for x in [2^-33, 1) (u1: positive and normal, so no special cases): x = 2^k m with m in
// [sqrt(2) / 2, sqrt(2)), f = m - 1, s = f / (2 + f), log m = 2 atanh s = 2 s + 2 s^3 / 3 + ... (|s| <= 0.172,
// terms to s^25), rearranged as f - (f^2 / 2 - s (f^2 / 2 + R)) so that the leading f is exact; k ln 2 in two
// parts (ln 2 rounded, then its remainder).
__attribute__((target("avx2,fma"))) inline __m256d log_unit_x4(__m256d x) {
  const __m256i bits = _mm256_castpd_si256(x);
  __m256d m = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFll)),
                                                  _mm256_set1_epi64x(0x3FF0000000000000ll)));  // [1, 2)
  __m256d k = _mm256_sub_pd(  // the biased exponent e as (2^52 + e) - 2^52, less the bias
      _mm256_castsi256_pd(_mm256_or_si256(_mm256_srli_epi64(bits, 52), _mm256_set1_epi64x(0x4330000000000000ll))),
      bcast(4503599627370496.0 + 1023.0));
  const __m256d big = _mm256_cmp_pd(m, bcast(1.4142135623730951), _CMP_GT_OQ);
  m = _mm256_blendv_pd(m, _mm256_mul_pd(m, bcast(0.5)), big);
  k = _mm256_add_pd(k, _mm256_and_pd(big, bcast(1.0)));
  const __m256d f = _mm256_sub_pd(m, bcast(1.0));
  const __m256d s = _mm256_div_pd(f, _mm256_add_pd(bcast(2.0), f));
  const __m256d z = _mm256_mul_pd(s, s);
  __m256d p = bcast(1.0 / 25);
#pragma GCC unroll 16
  for (int n = 23; n >= 3; n -= 2) p = _mm256_fmadd_pd(p, z, bcast(1.0 / n));
  const __m256d R = _mm256_mul_pd(_mm256_mul_pd(p, z), bcast(2.0));  // 2 atanh s = 2 s + s R
  const __m256d hfsq = _mm256_mul_pd(bcast(0.5), _mm256_mul_pd(f, f));  // and 2 s = f - s f
  const __m256d inner = _mm256_fmadd_pd(s, _mm256_add_pd(hfsq, R), _mm256_mul_pd(k, bcast(2.3190468138462996e-17)));
  return _mm256_fmadd_pd(k, bcast(0.6931471805599453), _mm256_sub_pd(f, _mm256_sub_pd(hfsq, inner)));
}

constexpr double factorial(int n) { return n <= 1 ? 1.0 : n * factorial(n - 1); }
constexpr double kSinC[9] = {-1 / factorial(19), 1 / factorial(17), -1 / factorial(15), 1 / factorial(13), -1 / factorial(11),
                             1 / factorial(9),   -1 / factorial(7), 1 / factorial(5),   -1 / factorial(3)};
constexpr double kCosC[8] = {-1 / factorial(18), 1 / factorial(16), -1 / factorial(14), 1 / factorial(12),
                             -1 / factorial(10), 1 / factorial(8),  -1 / factorial(6),  1 / factorial(4)};

// sin t and cos t for t in [0, 2 pi): j = nearest integer to t / (pi / 2), r = t - j pi / 2 with pi / 2 in three
// float64 parts (each FMA exact in its product; the first subtraction is exact), |r| <= pi / 4 + tiny, so even
// t next to a multiple of pi / 2 keeps its relative accuracy; Taylor polynomials in r^2 to r^19 / r^18 (the
// cosine's 1 - r^2 / 2 summed with its rounding error carried); the quadrant j mod 4 swaps and negates.
__attribute__((target("avx2,fma"))) inline void sincos_turn_x4(__m256d t, __m256d* sin_t, __m256d* cos_t) {
  const __m256d j = _mm256_round_pd(_mm256_mul_pd(t, bcast(0.6366197723675814)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(j, bcast(1.5707963267948966), t);
  r = _mm256_fnmadd_pd(j, bcast(6.123233995736766e-17), r);
  r = _mm256_fnmadd_pd(j, bcast(-1.4973849048591698e-33), r);
  const __m256d z = _mm256_mul_pd(r, r);
  __m256d ps = bcast(kSinC[0]), pc = bcast(kCosC[0]);
#pragma GCC unroll 16
  for (int i = 1; i < 9; ++i) ps = _mm256_fmadd_pd(ps, z, bcast(kSinC[i]));
#pragma GCC unroll 16
  for (int i = 1; i < 8; ++i) pc = _mm256_fmadd_pd(pc, z, bcast(kCosC[i]));
  const __m256d sr = _mm256_fmadd_pd(_mm256_mul_pd(r, z), ps, r);
  const __m256d hz = _mm256_mul_pd(bcast(0.5), z), w = _mm256_sub_pd(bcast(1.0), hz);
  const __m256d cr =
      _mm256_add_pd(w, _mm256_fmadd_pd(_mm256_mul_pd(z, z), pc, _mm256_sub_pd(_mm256_sub_pd(bcast(1.0), w), hz)));
  const __m256i q = _mm256_castpd_si256(_mm256_add_pd(j, bcast(4503599627370496.0)));  // j in the low bits
  const __m256i one = _mm256_set1_epi64x(1), two = _mm256_set1_epi64x(2);
  const __m256d odd = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(q, one), one));
  const __m256d sv = _mm256_blendv_pd(sr, cr, odd), cv = _mm256_blendv_pd(cr, sr, odd);
  // sin negative in quadrants 2, 3; cos in quadrants 1, 2
  *sin_t = _mm256_xor_pd(sv, _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_and_si256(q, two), 62)));
  *cos_t = _mm256_xor_pd(cv, _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_and_si256(_mm256_add_epi64(q, one), two), 62)));
}

}  // namespace gauss
}  // namespace projection
}  // namespace gradkit
#endif

// Shared by the programs in benchmarks/micro (each is still built by one `g++ -O3 file.cpp` command: the
// header is found beside the source). Not part of the library. All but sign_inputs are AVX2 code.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

// The mixed (FADD-pipe) programs' inputs: R x K token rows x in [-0.5, 0.5), their prepared rows
// xq = bits(s x) ^ bits(s), and a K x 16 Rademacher W of +-s.
inline void sign_inputs(int R, int K, float s, std::vector<float>& x, std::vector<float>& xq, std::vector<float>& W) {
  x.resize(R * K);
  xq.resize(R * K);
  W.resize(K * 16);
  for (auto& v : x) v = std::rand() / static_cast<float>(RAND_MAX) - 0.5f;
  uint32_t sbits;
  std::memcpy(&sbits, &s, 4);
  for (int i = 0; i < R * K; ++i) {
    const float sx = x[i] * s;
    uint32_t u;
    std::memcpy(&u, &sx, 4);
    u ^= sbits;
    std::memcpy(&xq[i], &u, 4);
  }
  for (int i = 0; i < K * 16; ++i) W[i] = (std::rand() & 1) ? s : -s;
}

// The shipped AVX2 factored kernel's inner loop (csrc/cpu/projection.cpp skinny_avx2 for fp32 and p = 16): MR
// token rows row(r), K features, W K x 16 row-major; per row and feature one broadcast and two FMAs.
template <int MR, typename Rows>
__attribute__((noinline, target("avx2,fma"))) void fma_rows(Rows row, int K, const float* W, float* Y) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(W + k * 16), w1 = _mm256_loadu_ps(W + k * 16 + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 b = _mm256_broadcast_ss(row(r) + k);
      acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(Y + r * 16, acc[r][0]);
    _mm256_storeu_ps(Y + r * 16 + 8, acc[r][1]);
  }
}
// fma_rows' row accessors: rows K apart from x, or given by pointers
struct ContiguousRows {
  const float* x;
  int K;
  const float* operator()(int r) const { return x + r * K; }
};
struct PointerRows {
  const float* const* x;
  const float* operator()(int r) const { return x[r]; }
};

// In-register transpose of 8 x 8 floats: r[i] lane j -> r[j] lane i.
__attribute__((target("avx2,fma"))) inline void tr8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]),
               t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]),
               t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]),
               t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// The 8 sums x0 +- x1 +- x2 +- x3 of a group of 4 features (token vectors), entry m = s1 * 4 + s2 * 2 + s3 (the
// signs of x1, x2, x3 relative to x0's) stored at t + m * STRIDE floats.
template <int STRIDE>
__attribute__((target("avx2,fma"))) inline void combos(__m256 x0, __m256 x1, __m256 x2, __m256 x3, float* t) {
  const __m256 tp = _mm256_add_ps(x0, x1), tm = _mm256_sub_ps(x0, x1), up = _mm256_add_ps(x2, x3),
               um = _mm256_sub_ps(x2, x3);
  _mm256_store_ps(t + 0 * STRIDE, _mm256_add_ps(tp, up));
  _mm256_store_ps(t + 1 * STRIDE, _mm256_add_ps(tp, um));
  _mm256_store_ps(t + 2 * STRIDE, _mm256_sub_ps(tp, um));
  _mm256_store_ps(t + 3 * STRIDE, _mm256_sub_ps(tp, up));
  _mm256_store_ps(t + 4 * STRIDE, _mm256_add_ps(tm, up));
  _mm256_store_ps(t + 5 * STRIDE, _mm256_add_ps(tm, um));
  _mm256_store_ps(t + 6 * STRIDE, _mm256_sub_ps(tm, um));
  _mm256_store_ps(t + 7 * STRIDE, _mm256_sub_ps(tm, up));
}

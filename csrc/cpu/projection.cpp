// CPU kernels of the projection family: counter-based random projection matrices and the flat
// projection x (B, D) -> x R^T (B, k) with R generated tile by tile in cache (never stored).
// Semantics (the definition of every entry): python/gradkit/kernels/reference/projection.py.
//
// Generator. Entry (row, col) of R is a pure function of (seed, row, col):
//   mix64(z)    = splitmix64's finaliser (Stafford "mix13"): a bijection of 64-bit words
//   rowkey      = mix64(seed ^ mix64(row + kRowC))
//   word(w)     = mix64(rowkey + (w + 1) * kGolden)           (a splitmix64 stream per row)
//   rademacher  = bit (col & 63) of word(col >> 6) ? +s : -s,  s = fp32(1 / sqrt(k))
//   gaussian    = fp32(z * (1 / sqrt(k))) with, in float64, h = word(col >> 1),
//                 u1 = (h >> 32 + 0.5) 2^-32, u2 = (h & 0xffffffff) 2^-32, r = sqrt(-2 log u1),
//                 t = 2 pi u2, z = r cos t (even col) or r sin t (odd col)       (Box-Muller)
// so R does not depend on tiling, chunking, shapes, thread count or device.
//
// Rademacher tiles: one hash per 64 entries of a row; a row's bits starting at an arbitrary
// column are assembled from two consecutive words with shifts (no per-entry branches), then each
// byte is expanded to 8 floats with one copy from a 256 x 8 table of +-s (8 KiB, L1-resident).
//
// project_flat, Rademacher on AVX-512 or AVX2 CPUs (B >= 4, k >= 32): sign tables, see project_flat_table
// below (8 table loads per 64 inputs instead of 64 multiply-adds). Otherwise:
// project_flat: out (B, k) fp32 = x (B, Dc) @ R[:, col0 : col0 + Dc]^T. R tiles of kKT x kDT
// (1 MiB fp32, L2-resident) are generated into a per-thread buffer and consumed at once by a
// single-threaded BLAS gemm (addmm_ on from_blob views: MKL sgemm) accumulating into out.
// Work is split over groups of k tiles (each group loops d tiles outer, its k tiles inner, so the
// x tile stays in cache); when there are fewer than 16 k tiles the D range is split too and
// the per-split partial outputs are added in a fixed order. The summation order therefore
// depends only on the shapes, never on the thread count or timing. fp16/bf16/fp64 x is converted to
// fp32 one (B x kDT) tile at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <optional>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../factored_checks.h"
#include "../project_wide.h"
#include "one_blas_thread.h"
#include "out_pool.h"
#include "simd_level.h"
#include "gauss_x4.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define GK_PROJ_X86 1  // AVX-512 and AVX2 kernels, each chosen at run time by what the CPU has
#endif

namespace gradkit {
namespace projection {
namespace {

constexpr uint64_t kMixA = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kMixB = 0x94D049BB133111EBull;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kRowC = 0x632BE59BD9B4E019ull;
constexpr double kTwoPi = 6.283185307179586;  // fp64(2 pi)
constexpr double kInv2p32 = 2.3283064365386963e-10;  // 2^-32, exact

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMixA;
  z = (z ^ (z >> 27)) * kMixB;
  return z ^ (z >> 31);
}
inline uint64_t row_key(uint64_t seed, uint64_t row) { return mix64(seed ^ mix64(row + kRowC)); }
inline uint64_t word_hash(uint64_t rk, uint64_t w) { return mix64(rk + (w + 1) * kGolden); }

// fp32(1 / sqrt(k)) computed in float64 (correctly rounded sqrt and division: the same on every backend).
inline double inv_sqrt_k(int64_t k) { return 1.0 / std::sqrt(static_cast<double>(k)); }

// Box-Muller pair (cos, sin branch) of hash h, scaled by inv (float64), rounded to fp32.
inline void gauss_pair(uint64_t h, double inv, float* z0, float* z1) {
  const double u1 = (static_cast<double>(h >> 32) + 0.5) * kInv2p32;
  const double u2 = static_cast<double>(h & 0xffffffffull) * kInv2p32;
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double t = kTwoPi * u2;
  *z0 = static_cast<float>(r * std::cos(t) * inv);
  *z1 = static_cast<float>(r * std::sin(t) * inv);
}

struct SignTable {
  alignas(64) float v[256][8];
  explicit SignTable(float s) {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = ((b >> j) & 1) ? s : -s;
  }
};

// Row `row` of R, columns [c0, c0 + n), into dst (fp32): Rademacher.
inline void rademacher_row(const SignTable& tab, uint64_t seed, uint64_t row, int64_t c0, int64_t n, float* dst) {
  if (n <= 0) return;
  const uint64_t rk = row_key(seed, row);
  const uint64_t w0 = static_cast<uint64_t>(c0) >> 6;
  const unsigned off = static_cast<unsigned>(c0 & 63);
  uint64_t cur = word_hash(rk, w0);
  int64_t j = 0;
  auto bits_at = [&](uint64_t m) -> uint64_t {  // 64 bits of the row starting at column c0 + 64 m
    const uint64_t nxt = word_hash(rk, w0 + m + 1);
    // off == 0: the shift by 64 is avoided by the mask (no per-entry branch, one per 64 entries)
    const uint64_t b = off ? ((cur >> off) | (nxt << ((64 - off) & 63))) : cur;
    cur = nxt;
    return b;
  };
  uint64_t m = 0;
  for (; j + 64 <= n; j += 64, ++m) {
    uint64_t b = bits_at(m);
    float* d = dst + j;
    for (int q = 0; q < 8; ++q) {
      std::memcpy(d + 8 * q, tab.v[(b >> (8 * q)) & 255u], 8 * sizeof(float));
    }
  }
  if (j < n) {
    uint64_t b = off ? ((cur >> off) | ((off + (n - j) > 64) ? (word_hash(rk, w0 + m + 1) << ((64 - off) & 63)) : 0))
                     : cur;
    float tmp[64];
    for (int q = 0; q < 8; ++q) std::memcpy(tmp + 8 * q, tab.v[(b >> (8 * q)) & 255u], 8 * sizeof(float));
    std::memcpy(dst + j, tmp, (n - j) * sizeof(float));
  }
}

// Row `row` of R, columns [c0, c0 + n), into dst (fp32): Gaussian.
inline void gaussian_row(uint64_t seed, uint64_t row, int64_t c0, int64_t n, double inv, float* dst) {
  if (n <= 0) return;
  const uint64_t rk = row_key(seed, row);
  int64_t j = 0;
  float z0, z1;
  if (c0 & 1) {  // odd start: the sin half of pair c0 >> 1
    gauss_pair(word_hash(rk, static_cast<uint64_t>(c0) >> 1), inv, &z0, &z1);
    dst[0] = z1;
    j = 1;
  }
  for (; j + 2 <= n; j += 2) {
    gauss_pair(word_hash(rk, static_cast<uint64_t>(c0 + j) >> 1), inv, &z0, &z1);
    dst[j] = z0;
    dst[j + 1] = z1;
  }
  if (j < n) {
    gauss_pair(word_hash(rk, static_cast<uint64_t>(c0 + j) >> 1), inv, &z0, &z1);
    dst[j] = z0;
  }
}

#ifdef GK_PROJ_X86
// ---- Gaussian entries, 4 pairs at a time in float64 lanes (AVX2 + FMA): gauss_pair's arithmetic in the same
// order, log and sin / cos from gauss_x4.h instead of libm (each within 1 ulp of float64 of glibc's: after the
// rounding to fp32 an entry differs from the scalar path's about once in 10^8, and then by 1 ulp).
// a * b mod 2^64 per 64-bit lane, b a constant (AVX2 has no 64-bit multiply): the low product plus the two
// cross products shifted up 32.
__attribute__((target("avx2,fma"))) inline __m256i mul64_x4(__m256i a, uint64_t b) {
  const __m256i bl = _mm256_set1_epi64x(static_cast<long long>(b & 0xffffffffull));
  const __m256i bh = _mm256_set1_epi64x(static_cast<long long>(b >> 32));
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), bl), _mm256_mul_epu32(a, bh));
  return _mm256_add_epi64(_mm256_mul_epu32(a, bl), _mm256_slli_epi64(cross, 32));
}
// mix64 of 4 lanes.
__attribute__((target("avx2,fma"))) inline __m256i mix64_x4(__m256i z) {
  z = mul64_x4(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), kMixA);
  z = mul64_x4(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), kMixB);
  return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

// Pairs q0 .. q0 + nq - 1 of row key rk into dst[0 .. 2 nq) (cos half, sin half per pair), 4 pairs per step,
// every entry through the same vector code (a short last step is computed in full and only its pairs are
// stored), so an entry's value does not depend on where a tile starts.
__attribute__((target("avx2,fma"))) void gauss_pairs_avx2(uint64_t rk, uint64_t q0, int64_t nq, double inv, float* dst) {
  const __m256d scale = _mm256_set1_pd(kInv2p32), half = _mm256_set1_pd(0.5), m2 = _mm256_set1_pd(-2.0),
                two_pi = _mm256_set1_pd(kTwoPi), vinv = _mm256_set1_pd(inv);
  // word_hash(rk, q) = mix64(rk + (q + 1) kGolden) for 4 consecutive q, in 64-bit lanes
  __m256i z = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(rk + (q0 + 1) * kGolden)),
                               _mm256_setr_epi64x(0, static_cast<long long>(kGolden), static_cast<long long>(2 * kGolden),
                                                  static_cast<long long>(3 * kGolden)));
  const __m256i step = _mm256_set1_epi64x(static_cast<long long>(4 * kGolden));
  const __m256i lo32 = _mm256_set1_epi64x(0xffffffffll);
  const __m256i magic = _mm256_set1_epi64x(0x4330000000000000ll);  // 2^52: a 32-bit integer in its low bits
  const __m256d two52 = _mm256_set1_pd(4503599627370496.0);
  for (int64_t i = 0; i < nq; i += 4, z = _mm256_add_epi64(z, step)) {
    const __m256i h = mix64_x4(z);
    // the two 32-bit halves as doubles, exactly: (2^52 + v) - 2^52
    const __m256d hi = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(_mm256_srli_epi64(h, 32), magic)), two52);
    const __m256d lo = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(h, lo32), magic)), two52);
    const __m256d u1 = _mm256_mul_pd(_mm256_add_pd(hi, half), scale);
    const __m256d u2 = _mm256_mul_pd(lo, scale);
    const __m256d r = _mm256_sqrt_pd(_mm256_mul_pd(m2, gauss::log_unit_x4(u1)));
    __m256d sin_t, cos_t;
    gauss::sincos_turn_x4(_mm256_mul_pd(two_pi, u2), &sin_t, &cos_t);
    const __m128 z0 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(r, cos_t), vinv));  // r cos t / sqrt(k)
    const __m128 z1 = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(r, sin_t), vinv));  // r sin t / sqrt(k)
    const __m128 a = _mm_unpacklo_ps(z0, z1), b = _mm_unpackhi_ps(z0, z1);
    if (nq - i >= 4) {
      _mm_storeu_ps(dst + 2 * i, a);
      _mm_storeu_ps(dst + 2 * i + 4, b);
    } else {
      alignas(16) float tmp[8];
      _mm_store_ps(tmp, a);
      _mm_store_ps(tmp + 4, b);
      std::memcpy(dst + 2 * i, tmp, static_cast<size_t>(2 * (nq - i)) * sizeof(float));
    }
  }
}

// gaussian_row through gauss_pairs_avx2.
void gaussian_row_avx2(uint64_t seed, uint64_t row, int64_t c0, int64_t n, double inv, float* dst) {
  if (n <= 0) return;
  const uint64_t rk = row_key(seed, row);
  float two[2];
  int64_t j = 0;
  if (c0 & 1) {  // odd start: the sin half of pair c0 >> 1
    gauss_pairs_avx2(rk, static_cast<uint64_t>(c0) >> 1, 1, inv, two);
    dst[0] = two[1];
    j = 1;
  }
  const int64_t np = (n - j) / 2;
  gauss_pairs_avx2(rk, static_cast<uint64_t>(c0 + j) >> 1, np, inv, dst + j);
  j += 2 * np;
  if (j < n) {  // odd end: the cos half of the last pair
    gauss_pairs_avx2(rk, static_cast<uint64_t>(c0 + j) >> 1, 1, inv, two);
    dst[j] = two[0];
  }
}
#endif

// The Gaussian generator's level, read per call: 1 = 4-lane float64 (AVX2 + FMA), 0 = scalar libm;
// GRADKIT_GAUSSIAN_ISA=portable forces 0 (tests compare both).
int gaussian_level() {
#ifdef GK_PROJ_X86
  return std::min(1, capped_simd_level("GRADKIT_GAUSSIAN_ISA", "portable", "GRADKIT_GAUSSIAN_PORTABLE"));
#else
  return 0;
#endif
}

// Tile R[r0 : r0 + nr, c0 : c0 + nc] into dst (row-major, leading dimension ld). glevel: gaussian_level().
void gen_tile(int kind, const SignTable& tab, uint64_t seed, double inv, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
              float* dst, int64_t ld, int glevel) {
  if (kind == 0) {
    for (int64_t i = 0; i < nr; ++i) rademacher_row(tab, seed, static_cast<uint64_t>(r0 + i), c0, nc, dst + i * ld);
    return;
  }
#ifdef GK_PROJ_X86
  if (glevel > 0) {
    for (int64_t i = 0; i < nr; ++i) gaussian_row_avx2(seed, static_cast<uint64_t>(r0 + i), c0, nc, inv, dst + i * ld);
    return;
  }
#endif
  for (int64_t i = 0; i < nr; ++i) gaussian_row(seed, static_cast<uint64_t>(r0 + i), c0, nc, inv, dst + i * ld);
}

void projection_matrix_cpu(const at::Tensor& out, int64_t seed, int64_t kind, int64_t k, int64_t row0, int64_t col0) {
  check_projection_matrix(out, seed, kind, k, row0, col0);
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const bool direct = out.scalar_type() == at::kFloat && out.is_contiguous();
  at::Tensor buf = direct ? out : at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  const double inv = inv_sqrt_k(k);
  const SignTable tab(static_cast<float>(inv));
  float* o = buf.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / cols);
  const int glevel = gaussian_level();
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    gen_tile(static_cast<int>(kind), tab, static_cast<uint64_t>(seed), inv, row0 + b, e - b, col0, cols, o + b * cols,
             cols, glevel);
  });
  if (!direct) const_cast<at::Tensor&>(out).copy_(buf);
}

constexpr int64_t kKT = 256;   // rows of R per tile (output features)
constexpr int64_t kDT = 1024;  // columns of R per tile (input features)

#ifdef GK_PROJ_X86
// ---- Rademacher flat projection by sign tables ("four Russians"), AVX-512 and AVX2 CPUs.
// Output j of a row is s * sum over columns c of (bit c of R's row j ? +x_c : -x_c). The 64 bits of one
// word cover 64 consecutive absolute columns, one byte per 8 columns, so for each word and a tile of 16
// rows the 8 tables T_g[p] = sum_{t<8} (bit t of p ? +x_{8g+t} : -x_{8g+t}) (256 entries x 16 rows each,
// built by doubling: 255 vector add/sub per table, each entry a sum of exactly 8 terms in column order)
// turn 64 multiply-adds per (row, output) into 8 table loads: acc_j = ((T0[b0] + T1[b1]) + (T2[b2] +
// T3[b3])) + ((T4[b4] + T5[b5]) + (T6[b6] + T7[b7])) with b_g = byte g of word_hash(rowkey_j, w), added to
// a float32 block sum of output j word by word in ascending order; every kTabBlockWords words (and after the last)
// the block sum is added to a float64 total, which is scaled by s and rounded to float32 once at the end. (One
// float32 running sum over every word lost accuracy with D: at D = 2^24 its error was ~33x the GEMM path's, about
// 8.5e-6 |x|; a float32 sum of at most 64 words plus a float64 total keeps it at the GEMM path's level at any D,
// for one float64 add per output per 64 words.) Outputs are split
// over threads; each output's sum has one order whatever the thread count. Columns outside [col0, col0 +
// D) enter as zeros. GRADKIT_PROJECT_GEMM=1 selects the GEMM path instead.
// CPUs without AVX-512F but with AVX2 run the same tables as two ymm halves of 8 rows (same sums in the same
// order: the same bits).
// 2: AVX-512 tables, 1: AVX2 tables, 0: the GEMM path.
int table_path_isa() {
  const char* env = std::getenv("GRADKIT_PROJECT_GEMM");
  if (env && std::strcmp(env, "1") == 0) return 0;
  return cpu_simd_level();
}

constexpr int64_t kTabRows = 16;
constexpr int64_t kTabBlockWords = 64;  // words (of 64 columns) per float32 block sum; blocks counted from w0

// x rows [0, nr) (nr <= 16), the 64 absolute columns of word w -> xs[t][16] fp32, zeros outside.
template <typename T>
void stage_word(const T* x, int64_t ldx, int64_t nr, int64_t D, int64_t col0, int64_t w, float* xs) {
  const int64_t c_lo = 64 * w - col0;
  for (int64_t t = 0; t < 64; ++t) {
    const int64_t c = c_lo + t;
    float* dst = xs + t * kTabRows;
    if (c < 0 || c >= D) {
      for (int64_t r = 0; r < kTabRows; ++r) dst[r] = 0.0f;
      continue;
    }
    int64_t r = 0;
    for (; r < nr; ++r) dst[r] = static_cast<float>(x[r * ldx + c]);
    for (; r < kTabRows; ++r) dst[r] = 0.0f;
  }
}

__attribute__((target("avx512f"))) void build_tables(const float* xs, float* tb) {
  for (int g = 0; g < 8; ++g) {
    float* T = tb + g * 256 * kTabRows;
    const float* xg = xs + g * 8 * kTabRows;
    const __m512 x0 = _mm512_loadu_ps(xg);
    _mm512_store_ps(T, _mm512_sub_ps(_mm512_setzero_ps(), x0));
    _mm512_store_ps(T + kTabRows, x0);
    for (int t = 1; t < 8; ++t) {
      const __m512 xt = _mm512_loadu_ps(xg + t * kTabRows);
      const int half = 1 << t;
      for (int q = 0; q < half; ++q) {
        const __m512 a = _mm512_load_ps(T + q * kTabRows);
        _mm512_store_ps(T + (q + half) * kTabRows, _mm512_add_ps(a, xt));
        _mm512_store_ps(T + q * kTabRows, _mm512_sub_ps(a, xt));
      }
    }
  }
}

__attribute__((target("avx512f"))) inline __m512 tab_at(const float* tb, uint64_t h, int g) {
  return _mm512_load_ps(tb + (g * 256 + ((h >> (8 * g)) & 255u)) * kTabRows);
}

__attribute__((target("avx512f"))) void word_accumulate(const float* tb, const uint64_t* rk, int64_t nj, uint64_t w,
                                                       float* yT) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint64_t h = word_hash(rk[j], w);
    const __m512 a01 = _mm512_add_ps(tab_at(tb, h, 0), tab_at(tb, h, 1));
    const __m512 a23 = _mm512_add_ps(tab_at(tb, h, 2), tab_at(tb, h, 3));
    const __m512 a45 = _mm512_add_ps(tab_at(tb, h, 4), tab_at(tb, h, 5));
    const __m512 a67 = _mm512_add_ps(tab_at(tb, h, 6), tab_at(tb, h, 7));
    const __m512 acc = _mm512_add_ps(_mm512_add_ps(a01, a23), _mm512_add_ps(a45, a67));
    float* y = yT + j * kTabRows;
    _mm512_store_ps(y, _mm512_add_ps(_mm512_load_ps(y), acc));
  }
}

__attribute__((target("avx2,fma,f16c"))) void build_tables_avx2(const float* xs, float* tb) {
  for (int g = 0; g < 8; ++g) {
    float* T = tb + g * 256 * kTabRows;
    const float* xg = xs + g * 8 * kTabRows;
    for (int h = 0; h < kTabRows; h += 8) {
      const __m256 x0 = _mm256_loadu_ps(xg + h);
      _mm256_store_ps(T + h, _mm256_sub_ps(_mm256_setzero_ps(), x0));
      _mm256_store_ps(T + kTabRows + h, x0);
    }
    for (int t = 1; t < 8; ++t) {
      const __m256 xt0 = _mm256_loadu_ps(xg + t * kTabRows), xt1 = _mm256_loadu_ps(xg + t * kTabRows + 8);
      const int half = 1 << t;
      for (int q = 0; q < half; ++q) {
        const __m256 a0 = _mm256_load_ps(T + q * kTabRows), a1 = _mm256_load_ps(T + q * kTabRows + 8);
        _mm256_store_ps(T + (q + half) * kTabRows, _mm256_add_ps(a0, xt0));
        _mm256_store_ps(T + (q + half) * kTabRows + 8, _mm256_add_ps(a1, xt1));
        _mm256_store_ps(T + q * kTabRows, _mm256_sub_ps(a0, xt0));
        _mm256_store_ps(T + q * kTabRows + 8, _mm256_sub_ps(a1, xt1));
      }
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) void word_accumulate_avx2(const float* tb, const uint64_t* rk, int64_t nj,
                                                                  uint64_t w, float* yT) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint64_t h = word_hash(rk[j], w);
    const float* e[8];
    for (int g = 0; g < 8; ++g) e[g] = tb + (g * 256 + ((h >> (8 * g)) & 255u)) * kTabRows;
    float* y = yT + j * kTabRows;
    for (int o = 0; o < kTabRows; o += 8) {
      const __m256 a01 = _mm256_add_ps(_mm256_load_ps(e[0] + o), _mm256_load_ps(e[1] + o));
      const __m256 a23 = _mm256_add_ps(_mm256_load_ps(e[2] + o), _mm256_load_ps(e[3] + o));
      const __m256 a45 = _mm256_add_ps(_mm256_load_ps(e[4] + o), _mm256_load_ps(e[5] + o));
      const __m256 a67 = _mm256_add_ps(_mm256_load_ps(e[6] + o), _mm256_load_ps(e[7] + o));
      const __m256 acc = _mm256_add_ps(_mm256_add_ps(a01, a23), _mm256_add_ps(a45, a67));
      _mm256_store_ps(y + o, _mm256_add_ps(_mm256_load_ps(y + o), acc));
    }
  }
}

// A 64-byte aligned float scratch of n entries, freed when it goes out of scope (an exception from another
// allocation, or from the parallel region, frees it too); a failed allocation is an error, never a null write.
struct FreeFloats {
  void operator()(float* q) const { std::free(q); }
};
using AlignedFloats = std::unique_ptr<float[], FreeFloats>;
inline AlignedFloats aligned_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64 * 64;
  void* q = std::aligned_alloc(64, bytes);
  TORCH_CHECK(q != nullptr, "project: could not allocate ", bytes, " bytes of scratch");
  return AlignedFloats(static_cast<float*>(q));
}

template <typename T>
void project_flat_table(int isa, const T* x, int64_t ldx, int64_t B, int64_t D, int64_t k, uint64_t seed, int64_t col0,
                        float s, float* out) {
  const int64_t w0 = col0 >> 6, w1 = (col0 + D - 1) >> 6;
  const int64_t rtiles = (B + kTabRows - 1) / kTabRows;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t jsplit = std::max<int64_t>(1, std::min<int64_t>((k + 63) / 64, (nthreads + rtiles - 1) / rtiles));
  at::parallel_for(0, rtiles * jsplit, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint64_t> rk;
    std::vector<double> total;  // nj x kTabRows float64 totals of the block sums
    const AlignedFloats xs_buf = aligned_floats(64 * kTabRows), tb_buf = aligned_floats(8 * 256 * kTabRows);
    float* const xs = xs_buf.get();
    float* const tb = tb_buf.get();
    AlignedFloats yT_buf;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t rt = task / jsplit, js = task % jsplit;
      const int64_t ja = js * k / jsplit, jb = (js + 1) * k / jsplit, nj = jb - ja;
      const int64_t r0 = rt * kTabRows, nr = std::min(kTabRows, B - r0);
      if (nj <= 0) continue;
      rk.resize(nj);
      for (int64_t j = 0; j < nj; ++j) rk[j] = row_key(seed, static_cast<uint64_t>(ja + j));
      yT_buf.reset();  // the previous task's first
      yT_buf = aligned_floats(nj * kTabRows);
      float* const yT = yT_buf.get();
      std::fill(yT, yT + nj * kTabRows, 0.0f);
      total.assign(static_cast<size_t>(nj * kTabRows), 0.0);
      for (int64_t w = w0; w <= w1; ++w) {
        stage_word(x + r0 * ldx, ldx, nr, D, col0, w, xs);
        if (isa == 2) {
          build_tables(xs, tb);
          word_accumulate(tb, rk.data(), nj, static_cast<uint64_t>(w), yT);
        } else {
          build_tables_avx2(xs, tb);
          word_accumulate_avx2(tb, rk.data(), nj, static_cast<uint64_t>(w), yT);
        }
        if ((w - w0 + 1) % kTabBlockWords == 0 || w == w1) {  // the block's float32 sums into the float64 totals
          for (int64_t i = 0; i < nj * kTabRows; ++i) {
            total[i] += static_cast<double>(yT[i]);
            yT[i] = 0.0f;
          }
        }
      }
      const double sd = static_cast<double>(s);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < nj; ++j)
          out[(r0 + r) * k + ja + j] = static_cast<float>(sd * total[j * kTabRows + r]);
    }
  });
}
#endif

at::Tensor project_flat_gemm(const at::Tensor& x_in, int64_t k, int64_t seed, int64_t kind, int64_t col0);

at::Tensor project_flat_cpu(const at::Tensor& x_in, int64_t k, int64_t seed, int64_t kind, int64_t col0) {
  check_project_flat(x_in, k, seed, kind, col0);
  if (auto wide = project_flat_wide_rows(x_in, [&](const at::Tensor& xs) {
        return project_flat_cpu(xs, k, seed, kind, col0);
      }))
    return *wide;
#ifdef GK_PROJ_X86
  const int64_t B = x_in.size(0), D = x_in.size(1);
  const int tisa = kind == 0 && B >= 4 && k >= 32 && D > 0 ? table_path_isa() : 0;
  if (tisa > 0) {
    const auto st = x_in.scalar_type();
    at::Tensor out = at::zeros({B, k}, at::TensorOptions().dtype(at::kFloat));
    // x is only read (stage_word: x[r * ldx + c]), so any row stride is fine in place -- 0 for an expand()ed x,
    // overlapping rows; only a non-unit column stride needs the copy (a contiguous copy of a stride-0 x of D ~ 1e9
    // columns would be B x D floats)
    const at::Tensor xc = x_in.stride(1) == 1 || D == 1 ? x_in : x_in.contiguous();  // B >= 4 rows here
    const float s = static_cast<float>(inv_sqrt_k(k));
    const int64_t ldx = xc.stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "project_flat_table", [&] {
      project_flat_table(tisa, xc.data_ptr<scalar_t>(), ldx, B, D, k, static_cast<uint64_t>(seed), col0, s,
                         out.data_ptr<float>());
    });
    // The tables sum +-x and scale by 1/sqrt(k) once at the end, so finite x near float32's limit can reach
    // +-inf there where the scaled products do not: rows with a non-finite output are projected again by the
    // GEMM path (which multiplies by the scaled entries, as the reference does), so whether a row overflows does
    // not depend on its batch. Rows holding NaN / Inf go the same way and give the GEMM path's propagation.
    const at::Tensor bad = out.isfinite().all(1).logical_not();
    if (bad.any().item<bool>()) {
      const at::Tensor rows = bad.nonzero().squeeze(1);
      out.index_copy_(0, rows, project_flat_gemm(x_in.index_select(0, rows), k, seed, kind, col0));
    }
    return out;
  }
#endif
  return project_flat_gemm(x_in, k, seed, kind, col0);
}

// The GEMM path (any kind, any CPU): R tiles generated into cache, consumed by sgemm (see the header comment).
at::Tensor project_flat_gemm(const at::Tensor& x_in, int64_t k, int64_t seed, int64_t kind, int64_t col0) {
  const auto st = x_in.scalar_type();
  const int64_t B = x_in.size(0), D = x_in.size(1);
  at::Tensor out = at::zeros({B, k}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0 || D == 0) return out;
  // fp32 x is read in place when its rows are unit-stride, 64-byte aligned and a multiple of 16 floats apart, as in
  // the per-tile float32 copy that anything else gets: MKL's sgemm rounds rows of other alignments differently, so a
  // slice x[:, :293] of a (B, 300) x gave other bits than its .contiguous() copy (session 43 audit)
  const bool direct = st == at::kFloat && x_in.stride(1) == 1 && x_in.stride(0) >= std::max<int64_t>(D, 1) &&
                      x_in.stride(0) % 16 == 0 && reinterpret_cast<uintptr_t>(x_in.data_ptr()) % 64 == 0;
  const at::Tensor x = x_in.detach();  // copied from inside parallel_for workers below (their grad mode is on)

  const double inv = inv_sqrt_k(k);
  const SignTable tab(static_cast<float>(inv));
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nk = (k + kKT - 1) / kKT, nd = (D + kDT - 1) / kDT;
  // Groups: contiguous k-tile ranges; with fewer than kSplitTarget k tiles, D is split as well, into a number
  // of ranges that depends on the shapes only (not the thread count: the summation order, hence the bits,
  // are the same at any thread count; up to 16 threads all get work).
  constexpr int64_t kSplitTarget = 16;
  constexpr int64_t kRowBlock = 64;  // rows per product where the tiles alone give fewer groups than threads
  int64_t kgroups = std::min(nk, nthreads);
  int64_t dsplit = nk >= kSplitTarget ? 1 : std::min(nd, (kSplitTarget + nk - 1) / nk);
  // Tiny problems: not worth the threads.
  const bool tiny = B * D * k < (int64_t(1) << 22);
  if (tiny) {
    kgroups = 1;
    dsplit = 1;
  }
  const int64_t ngroups = kgroups * dsplit;
  std::vector<at::Tensor> partial(dsplit);
  for (int64_t s = 0; s < dsplit; ++s) partial[s] = s == 0 ? out : at::zeros({B, k}, out.options());

  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  const int glevel = gaussian_level();
  if (!tiny && nk * dsplit < kSplitTarget && B >= 2 * kRowBlock) {  // shapes only, like every choice here
    // Few tiles, many rows: each tile of R generated once (its rows split over the threads), then its products
    // in blocks of kRowBlock rows over the threads (shape-only blocks, one BLAS thread each: the same bits at any
    // thread count). Without it, one group ran on one core.
    std::vector<float> rt(static_cast<size_t>(kKT * kDT));
    // blocks of kRowBlock rows, the last one taking the remainder (64-127 rows): a block of 1-3 rows took another
    // MKL kernel, so equal rows there got other bits (session 42 review)
    const int64_t nrb = B / kRowBlock;
    const int64_t xw = std::min(kDT, (D + 15) / 16 * 16);
    for (int64_t dt = 0; dt < nd; ++dt) {
      const int64_t d0 = dt * kDT, dn = std::min(kDT, D - d0);
      for (int64_t kt = 0; kt < nk; ++kt) {
        const int64_t r0 = kt * kKT, rn = std::min(kKT, k - r0);
        at::parallel_for(0, rn, 16, [&](int64_t a, int64_t e) {
          gen_tile(static_cast<int>(kind), tab, static_cast<uint64_t>(seed), inv, r0 + a, e - a, col0 + d0, dn,
                   rt.data() + a * dn, dn, glevel);
        });
        at::parallel_for(0, nrb, 1, [&](int64_t rb0, int64_t rb1) {
          const OneBlasThread one_blas_thread;
          // x's rows, where x is not read in place, copied block by block into this task's buffer (rows 64-byte
          // aligned, xw floats apart, as every copy here) just before their product reads them from cache: a copy
          // of the whole B x dn tile first cost as much memory traffic as the product at small k (session 43:
          // 2000 x 1000 -> 16 took 1.8x the in-place time)
          at::Tensor tbuf;
          if (!direct) tbuf = at::empty({2 * kRowBlock, xw}, fopt);  // the last block holds up to 127 rows
          for (int64_t rb = rb0; rb < rb1; ++rb) {
            const int64_t b0 = rb * kRowBlock, nb = rb == nrb - 1 ? B - b0 : kRowBlock;
            const float* xrow;
            int64_t ld;
            if (direct) {
              xrow = x.data_ptr<float>() + d0 + b0 * x.stride(0);
              ld = x.stride(0);
            } else {
              tbuf.narrow(0, 0, nb).narrow(1, 0, dn).copy_(x.narrow(0, b0, nb).narrow(1, d0, dn));
              xrow = tbuf.data_ptr<float>();
              ld = xw;
            }
            at::Tensor ov = at::from_blob(out.data_ptr<float>() + b0 * k + r0, {nb, rn}, {k, 1}, fopt);
            at::Tensor xv = at::from_blob(const_cast<float*>(xrow), {nb, dn}, {ld, 1}, fopt);
            at::Tensor rv = at::from_blob(rt.data(), {rn, dn}, {dn, 1}, fopt);
            ov.addmm_(xv, rv.t());
          }
        });
      }
    }
    return out;
  }
  at::parallel_for(0, ngroups, 1, [&](int64_t gb, int64_t ge) {
    const OneBlasThread one_blas_thread;
    std::vector<float> rt(static_cast<size_t>(kKT * kDT));
    at::Tensor xbuf;
    // float32 copies of x's tiles where x cannot be read in place; no wider than x (project() cuts a tall x
    // into narrow column chunks, and a B x 1024 buffer per group would dwarf them), rounded up to 16 floats so that
    // every row starts 64-byte aligned: the BLAS product's rounding depends on a row's alignment, and equal rows
    // (an expand()ed x) must give equal outputs
    const int64_t xw = std::min(kDT, (D + 15) / 16 * 16);
    if (!direct) xbuf = at::empty({B, xw}, at::TensorOptions().dtype(at::kFloat));
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t kg = g / dsplit, ds = g % dsplit;
      const int64_t kt0 = kg * nk / kgroups, kt1 = (kg + 1) * nk / kgroups;
      const int64_t dt0 = ds * nd / dsplit, dt1 = (ds + 1) * nd / dsplit;
      float* o = partial[ds].data_ptr<float>();
      for (int64_t dt = dt0; dt < dt1; ++dt) {
        const int64_t d0 = dt * kDT, dn = std::min(kDT, D - d0);
        const float* xp;
        int64_t ldx;
        if (direct) {
          xp = x.data_ptr<float>() + d0;
          ldx = x.stride(0);
        } else {
          at::Tensor xv = xbuf.narrow(1, 0, dn);
          xv.copy_(x.narrow(1, d0, dn));
          xp = xbuf.data_ptr<float>();
          ldx = xw;
        }
        for (int64_t kt = kt0; kt < kt1; ++kt) {
          const int64_t r0 = kt * kKT, rn = std::min(kKT, k - r0);
          gen_tile(static_cast<int>(kind), tab, static_cast<uint64_t>(seed), inv, r0, rn, col0 + d0, dn, rt.data(), dn,
                   glevel);
          // out[:, r0 : r0 + rn] (B x rn, row stride k) += x tile (B x dn) @ R tile (rn x dn)^T
          at::Tensor ov = at::from_blob(o + r0, {B, rn}, {k, 1}, fopt);
          at::Tensor xv = at::from_blob(const_cast<float*>(xp), {B, dn}, {ldx, 1}, fopt);
          at::Tensor rv = at::from_blob(rt.data(), {rn, dn}, {dn, 1}, fopt);
          ov.addmm_(xv, rv.t());
        }
      }
    }
  });
  for (int64_t s = 1; s < dsplit; ++s) out.add_(partial[s]);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// factored_project(a (N, I), g (N, O), lt (O, p), rt (I, p), rb (p,)?, mask (N,)?, T) -> (N / T, p, p)
//   out[b] = sum over the unmasked tokens n of example b (n = b T + t, t ascending) of u_n v_n^T,
//   u_n = g_n lt (sum over o ascending), v_n = a_n rt (+ rb): the projected per-example gradient
//   L G_b R^T of a Linear layer without forming G (kernels/reference/projection.py::factored_project).
// Work items are runs of whole examples of about kTokChunk tokens (T <= kTokChunk) or (example, chunk of
// kTokChunk tokens): each item projects its tokens MR at a time (tiles may span examples) with a
// register-blocked kernel that keeps MR x 16 outputs in zmm registers (one FMA per input element and 16
// outputs, rows of lt / rt loaded once per MR = 8 tokens: kSkinnyMR) and accumulates the outer products
// into its examples' p x p partials; chunk partials are added per example in chunk order. Every sum has a
// fixed order that depends on neither the thread count nor the batch: results are bitwise reproducible.
// CPUs without AVX-512F run AVX2 kernels of the same arithmetic order (8 outputs per ymm), CPUs without AVX2
// + FMA portable loops of that order.
constexpr int64_t kTokChunk = 256;
constexpr int kFMR = 16;
constexpr int kAmxTile = 32;  // tokens per tile where every side takes the bfloat16 AMX path (skinny_amx2)

struct FArgs {
  const void* a;  // float, c10::BFloat16 or c10::Half: factored_item's E
  const void* g;
  const float* lt;
  const float* rt;
  const float* rb;
  const bool* mask;
  int64_t lda, ldg, I, O, p;
  int64_t N;  // rows of a / g (prefetches stay inside)
  int isa;  // factored_isa(): the AVX-512 or AVX2 kernels, or the portable loops (same arithmetic, same order, same bits)
  float ls = 0.0f, rs = 0.0f;  // the sign path's s for lt / rt (AVX-512), or 0: not taken
  int tile = kFMR;             // tokens per tile: kSignTile when a side takes the sign path, kAmxTile on AMX
  const uint16_t* lw_amx = nullptr;  // the AMX path (bfloat16 a / g, p = 16, 32, 64): lt / rt's signs packed
  // (or null: not taken)
  const uint16_t* rw_amx = nullptr;
  float lsa = 0.0f, rsa = 0.0f;  // the AMX sides' scales s
  bool lpf_amx = false, rpf_amx = false;  // the AMX sides that prefetch the next tile's rows (see amx_prefetch)
};

// Y[r][0..p) = X[r] . W (K x p, row-major), r < mr; rows X[r] given by pointers; sums over k ascending.
void skinny_portable(const float* const* X, int mr, int64_t K, const float* W, int64_t p, float* Y) {
  for (int r = 0; r < mr; ++r) {
    float* y = Y + r * p;
    for (int64_t j = 0; j < p; ++j) y[j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float x = X[r][k];
      const float* w = W + k * p;
      for (int64_t j = 0; j < p; ++j) y[j] = std::fma(x, w[j], y[j]);
    }
  }
}

#ifdef GK_PROJ_X86
// A row's 16 bfloat16 / float16 values from x, widened exactly to float32.
__attribute__((target("avx512f"))) inline __m512 widen16(const c10::BFloat16* x) {  // the top half of a float32
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}
__attribute__((target("avx512f"))) inline __m512 widen16(const float* x) { return _mm512_loadu_ps(x); }
__attribute__((target("avx512f"))) inline __m512 widen16(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// The region a skinny kernel's caller reads next, prefetched (into L2) one slice per step of 16 k. The
// AVX-512 kernels spread a float32 slice of at most 16 lines (always, for rows read whole: 8-12 rows x 64
// bytes per step) over the step, one prefetch per feature (lines() of them from cur(), then advance());
// otherwise step() issues the slice at the step's start. Session 19, each variant in its own process,
// alternated, medians of the per-pair ratios (benchmarks/pair_ab.py; 1000 x 1000, 64 x 128 tokens, two
// threads): spread / at the start 0.92x and 0.97x for the float32 sign path (two runs of 10 pairs, pairs
// 0.91-1.02) and 0.95-0.98x for the float32 FMA kernel, but 1.02x for the bf16 sign path and 1.06x for the
// bf16 FMA kernel (their rows are widened into L1 a chunk at a time anyway), and 0.99x for the AVX2 float32
// kernel on the Zen 4 (GRADKIT_FACTORED_ISA=avx2), which keeps step(): on a Zen 3 (session 20) the spread form
// measured 0.995x (1000 x 1000), 1.024x (one-token examples) and 0.999x (4096 x 4096) against it.
struct PrefetchStream {
  const char* pf;
  int64_t bytes, per, off = 0;
  PrefetchStream(const char* p, int64_t b, int64_t K) : pf(p), bytes(b) {
    const int64_t steps = std::max<int64_t>(1, K / 16);
    per = ((b + steps - 1) / steps + 63) / 64 * 64;
  }
  bool spread() const { return per <= 16 * 64; }
  // the current slice's lines (0 once the region is done)
  int lines() const { return off < bytes ? static_cast<int>((std::min(per, bytes - off) + 63) / 64) : 0; }
  const char* cur() const { return pf + off; }
  void advance() { off += per; }
  inline void step() {
    if (off >= bytes) return;
    for (int64_t b = 0; b < per && off + b < bytes; b += 64) _mm_prefetch(pf + off + b, _MM_HINT_T2);
    off += per;
  }
};

template <int MR, int kP, typename E>
// pf / pf_bytes: a region the caller reads next (the other operand's rows, or the next tile), prefetched a
// slice per step of 16 k so that the DRAM stream overlaps the FMAs (rows are 4 KiB-ish, too short for the
// hardware prefetchers to ramp up on their own). kP > 0: p == kP, a multiple of 16 (the common projection
// sizes), compiled with a constant W stride and column-block count and no masks; kP == 0: any p.
// E = bfloat16 / float16: every 256 features the rows' next 256 values are widened into an 8 KiB L1 scratch
// (exact, so the FMAs see the float32 values they would see after a.float()); no widened copy of the tile
// is written to L2 (that pass was 14% of the profile). A 16-value scratch per step was slower: 4.1-4.5 ms vs
// 2.8 ms for the hook-work benchmark, the broadcasts waiting on the vector just stored.
__attribute__((target("avx512f"))) void skinny_avx512(const E* const* X, int64_t K, const float* W,
                                                     int64_t p_arg, float* Y, const char* pf, int64_t pf_bytes) {
  constexpr bool kNarrow = !std::is_same_v<E, float>;
  constexpr int64_t kWideChunk = 256;
  alignas(64) float sx[kNarrow ? MR : 1][kNarrow ? kWideChunk : 1];
  const int64_t p = kP ? kP : p_arg;
  PrefetchStream pfs(pf, pf_bytes, K);
  const bool spread = !kNarrow && pfs.spread();  // float32 rows (bf16 / fp16: all at the step's start)
  for (int64_t j0 = 0; j0 < p; j0 += 16) {
    const __mmask16 m = kP || p - j0 >= 16 ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (p - j0)) - 1u);
    __m512 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    const float* w = W + j0;
    const E* xr[MR];
    for (int r = 0; r < MR; ++r) xr[r] = X[r];
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {  // one cache line of every row per step
      if (!spread && j0 == 0) pfs.step();
      const int64_t c = k % kWideChunk;  // narrow E: the step's place in the widened chunk
      if constexpr (kNarrow) {
        if (c == 0) {  // widen the rows' next chunk (whole 16-value groups) into the L1 scratch
          const int64_t nc = std::min<int64_t>(kWideChunk, (K - k) / 16 * 16);
          for (int r = 0; r < MR; ++r)
            for (int64_t q = 0; q < nc; q += 16) _mm512_store_ps(sx[r] + q, widen16(xr[r] + k + q));
        }
      }
      const auto x_at = [&](int r, int kk) -> float {  // feature k + kk of row r, as float32
        if constexpr (kNarrow) return sx[r][c + kk];
        else return xr[r][k + kk];
      };
      const int nl = spread ? pfs.lines() : 0;  // the step's prefetches, one per feature (the slice ends
      const char* const pl = pfs.cur();         // within the j0 = 0 pass)
#pragma GCC unroll 16
      for (int kk = 0; kk < 16; ++kk) {
        if (kk < nl) _mm_prefetch(pl + kk * 64, _MM_HINT_T2);
        const __m512 wk = _mm512_maskz_loadu_ps(m, w + (k + kk) * p);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x_at(r, kk)), wk, acc[r]);
      }
      if (spread) pfs.advance();
    }
    for (; k < K; ++k) {
      const __m512 wk = _mm512_maskz_loadu_ps(m, w + k * p);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(xr[r][k])), wk, acc[r]);
    }
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(Y + r * p + j0, m, acc[r]);
  }
}
template <typename E>
using SkinnyFn = void (*)(const E* const*, int64_t, const float*, int64_t, float*, const char*, int64_t);
template <typename E, int kP, int... I>
constexpr std::array<SkinnyFn<E>, sizeof...(I)> skinny_table(std::integer_sequence<int, I...>) {
  return {&skinny_avx512<I + 1, kP, E>...};
}
// Tokens per register-blocked pass: 8 rows of one side (a 16-token tile takes two passes per side). Not 16: a
// pass reads its rows in lockstep, one line of each at a time, and rows a multiple of 4 KiB apart (1024, 2048,
// 4096 features: most transformers) put all those lines in one set of the 8-way, 64-set L1, where 16 of them
// evict each other before their 16 uses (Zen 4, in cache: 48 instead of 115 GFLOP/s per core;
// benchmarks/micro/rademacher.cpp `aliasing`); 8 fit. At other widths 8-row passes measured as fast as 16-row
// ones (interleaved in one process, 1000 features: 0.97-1.04x), though they load lt / rt rows twice as often.
// The pass size changes no result bit.
constexpr int kSkinnyMR = 8;
constexpr auto kMRs = std::make_integer_sequence<int, kSkinnyMR>{};
template <typename E>  // [p: any, 16, 32, 64][rows - 1], for rows of E
constexpr std::array<std::array<SkinnyFn<E>, kSkinnyMR>, 4> kSkinny = {
    skinny_table<E, 0>(kMRs), skinny_table<E, 16>(kMRs), skinny_table<E, 32>(kMRs), skinny_table<E, 64>(kMRs)};

// ---- The sign path (AVX-512): when W = +-s with s a power of two (a Rademacher matrix at p = 4, 16, 64, 256:
// s = 1 / sqrt(p)), fma(x, +-s, acc) == acc + (+-(s x)) bit for bit whenever s x is exact. Zen 4 (like Zen 2-3)
// has two FMA pipes and two separate FADD pipes, and skinny_avx512 uses only the FMA pipes. A pass of 8 + NB
// tokens runs its first 8 rows as skinny_avx512 does and its last NB rows with one xor and one add per feature:
// each 256 features, every add row is prepared once into an L1 scratch as xq = bits(s x) ^ bits(s), and xq ^ w
// (w = +-s, the register the FMA rows use) is +-(s x). The xor takes xq broadcast from memory
// (`vpxord m32{1to16}`): a separate vbroadcastss costs Zen 4 an FP-pipe slot, and in
// benchmarks/micro/rademacher_avx512_mixed.cpp it cut the gain in L2 from 1.48x to 1.19x. Each output is the same
// chain (k ascending, from +0), so the bits are skinny_avx512's. A 256-feature chunk of an add row holding a value
// whose s x is not exact (|x| < 2^-126 / s, nonzero) or not finite (a NaN's sign would differ) is run by FMA from
// its plain widened values instead.
// Rows: bfloat16 / float16 FMA rows are widened into an L1 scratch per chunk as in skinny_avx512; float32 FMA
// rows are read where they lie, and the float32 add rows' next chunk is prefetched into L1 a line per step (a
// copy of the FMA rows, or the add rows read in a burst at each chunk start, left the float32 path 1.03-1.55x
// slower than the FMA kernel: 4096-wide rows, 16 KiB apart, were the worst). Measured against
// GRADKIT_FACTORED_SIGN=0 at two threads, per-round medians (benchmarks/results/README.md, sessions 17-18):
// bf16 / fp16 1.1-1.24x faster; float32 1.08-1.18x at 1000 wide, 1.02-1.15x at 1024 and at 4096, 1.06-1.12x
// with one-token examples (the range is the shared host's load). On an Intel Xeon (Emerald Rapids, session 26)
// the path is 1.12-1.27x SLOWER than the FMA kernel (512-bit xor, add and FMA all issue on ports 0 and 5, so an
// add row costs two slots per feature where an FMA row costs one): it is the default on AMD CPUs only.
//
// acc + (bits(*q broadcast) ^ bits(w)), in one asm statement: with the xor alone in asm, GCC hoisted all 16
// unrolled steps' xors ahead of the adds and spilled their results; acc goes by value (an __m512& operand kept the
// accumulators on the stack).
__attribute__((target("avx512f"))) inline __m512 add_xor_bcast(__m512 acc, const float* q, __m512 w) {
  __m512 t;
  asm("vpxord %[q]%{1to16%}, %[w], %[t]\n\tvaddps %[t], %[acc], %[acc]"
      : [acc] "+v"(acc), [t] "=&v"(t)
      : [q] "m"(*q), [w] "v"(w));
  return acc;
}

constexpr int kSignNB = 4;  // add rows per pass: 8 + 4 measured best in the micro program
constexpr int kSignTile = kSkinnyMR + kSignNB;  // tokens per tile on the sign path (one pass per side)

template <int NB, int kP, typename E>
__attribute__((target("avx512f"))) void skinny_sign_avx512(const E* const* X, int64_t K, const float* W,
                                                          int64_t p_arg, float* Y, const char* pf, int64_t pf_bytes,
                                                          float s) {
  constexpr int NA = kSkinnyMR;
  constexpr int64_t kChunk = 256;
  constexpr bool kNarrow = !std::is_same_v<E, float>;  // else float32: the FMA rows are read where they lie
  alignas(64) float sx[kNarrow ? NA : 1][kNarrow ? kChunk : 1];
  alignas(64) float sq[NB][kChunk];
  const int64_t p = kP ? kP : p_arg;
  uint32_t sbits, lo;
  std::memcpy(&sbits, &s, 4);
  const float lo_f = std::numeric_limits<float>::min() / s;  // |x| >= lo_f: s x is a normal float, exact
  std::memcpy(&lo, &lo_f, 4);
  const __m512i vlo1 = _mm512_set1_epi32(static_cast<int32_t>(lo - 1)), vone = _mm512_set1_epi32(1),
                vinf = _mm512_set1_epi32(0x7f800000), vabs = _mm512_set1_epi32(0x7fffffff),
                vsb = _mm512_set1_epi32(static_cast<int32_t>(sbits));
  const __m512 vs = _mm512_set1_ps(s);
  PrefetchStream pfs(pf, pf_bytes, K);
  const bool spread = !kNarrow && pfs.spread();  // float32 rows (bf16 / fp16: all at the step's start)
  for (int64_t j0 = 0; j0 < p; j0 += 16) {
    const __mmask16 m = kP || p - j0 >= 16 ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (p - j0)) - 1u);
    __m512 acc[NA], bcc[NB];
    for (int r = 0; r < NA; ++r) acc[r] = _mm512_setzero_ps();
    for (int r = 0; r < NB; ++r) bcc[r] = _mm512_setzero_ps();
    const float* w = W + j0;
    const E* xr[NA + NB];
    for (int r = 0; r < NA + NB; ++r) xr[r] = X[r];
    bool sign = true;  // the current chunk's add rows hold xq (else their plain widened values)
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if (!spread && j0 == 0) pfs.step();
      const int64_t c = k % kChunk;
      if (c == 0) {  // the rows' next chunk (whole 16-value groups) into the L1 scratch
        const int64_t nc = std::min<int64_t>(kChunk, (K - k) / 16 * 16);
        if constexpr (kNarrow)
          for (int r = 0; r < NA; ++r)
            for (int64_t q = 0; q < nc; q += 16) _mm512_store_ps(sx[r] + q, widen16(xr[r] + k + q));
        // per lane, the least |x| bits minus 1 (a zero wraps to the largest: exact) and the largest |x| bits
        __m512i lmin = _mm512_set1_epi32(-1), lmax = _mm512_setzero_si512();
        for (int r = 0; r < NB; ++r)
          for (int64_t q = 0; q < nc; q += 16) {
            const __m512 v = widen16(xr[NA + r] + k + q);
            const __m512i u = _mm512_and_si512(_mm512_castps_si512(v), vabs);
            lmin = _mm512_min_epu32(lmin, _mm512_sub_epi32(u, vone));
            lmax = _mm512_max_epu32(lmax, u);
            _mm512_store_si512(sq[r] + q, _mm512_xor_si512(_mm512_castps_si512(_mm512_mul_ps(v, vs)), vsb));
          }
        sign = _mm512_cmplt_epu32_mask(lmin, vlo1) == 0 && _mm512_cmpge_epu32_mask(lmax, vinf) == 0;
        if (!sign)
          for (int r = 0; r < NB; ++r)
            for (int64_t q = 0; q < nc; q += 16) _mm512_store_ps(sq[r] + q, widen16(xr[NA + r] + k + q));
      }
      if constexpr (!kNarrow)  // float32: the add rows' next chunk into L1 a line per step, not all at its start
        if (k + kChunk < K)
          for (int r = 0; r < NB; ++r)
            _mm_prefetch(reinterpret_cast<const char*>(xr[NA + r] + k + kChunk), _MM_HINT_T0);
      const auto x_at = [&](int r, int kk) -> float {  // feature k + kk of FMA row r, as float32
        if constexpr (kNarrow) return sx[r][c + kk];
        else return xr[r][k + kk];
      };
      // the step, compiled once per kind of add row (kSign: xor + add from xq, else FMA from the plain values):
      // with `sign ? xor-add : fma` inside one loop GCC did not unswitch it, leaving a branch and a jump per
      // feature and add row
      const int nl = spread ? pfs.lines() : 0;  // the step's prefetches, one per feature
      const char* const pl = pfs.cur();
      const auto step = [&](auto sign_kind) __attribute__((target("avx512f"))) {
        constexpr bool kSign = decltype(sign_kind)::value;
#pragma GCC unroll 16
        for (int kk = 0; kk < 16; ++kk) {
          if (kk < nl) _mm_prefetch(pl + kk * 64, _MM_HINT_T2);
          const __m512 wk = _mm512_maskz_loadu_ps(m, w + (k + kk) * p);
#pragma GCC unroll 8
          for (int r = 0; r < NA; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x_at(r, kk)), wk, acc[r]);
#pragma GCC unroll 4
          for (int r = 0; r < NB; ++r) {
            if constexpr (kSign) bcc[r] = add_xor_bcast(bcc[r], sq[r] + c + kk, wk);
            else bcc[r] = _mm512_fmadd_ps(_mm512_set1_ps(sq[r][c + kk]), wk, bcc[r]);
          }
        }
      };
      if (sign) step(std::true_type{});
      else step(std::false_type{});
      if (spread) pfs.advance();
    }
    for (; k < K; ++k) {  // the last K % 16 features, by FMA (the same bits either way)
      const __m512 wk = _mm512_maskz_loadu_ps(m, w + k * p);
#pragma GCC unroll 8
      for (int r = 0; r < NA; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(xr[r][k])), wk, acc[r]);
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r)
        bcc[r] = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(xr[NA + r][k])), wk, bcc[r]);
    }
    for (int r = 0; r < NA; ++r) _mm512_mask_storeu_ps(Y + r * p + j0, m, acc[r]);
    for (int r = 0; r < NB; ++r) _mm512_mask_storeu_ps(Y + (NA + r) * p + j0, m, bcc[r]);
  }
}
template <typename E>
using SignFn = void (*)(const E* const*, int64_t, const float*, int64_t, float*, const char*, int64_t, float);
template <typename E, int kP, int... I>
constexpr std::array<SignFn<E>, sizeof...(I)> sign_table(std::integer_sequence<int, I...>) {
  return {&skinny_sign_avx512<I + 1, kP, E>...};
}
template <typename E>  // [p: any, 16, 64][add rows - 1] (p = 32: 1 / sqrt(32) is not a power of two)
constexpr std::array<std::array<SignFn<E>, kSignNB>, 3> kSkinnySign = {
    sign_table<E, 0>(std::make_integer_sequence<int, kSignNB>{}),
    sign_table<E, 16>(std::make_integer_sequence<int, kSignNB>{}),
    sign_table<E, 64>(std::make_integer_sequence<int, kSignNB>{})};

// part[i, j] = fma(U[r, i], V[r, j], part[i, j]) for r = 0 .. mr-1 in order (the portable loop's rounding and
// order), with a 16 x 16 block of part held in registers across the mr tokens.
__attribute__((target("avx512f"))) void outer_tile_avx512(const float* U, const float* V, int mr, int64_t p,
                                                         float* part) {
  for (int64_t j0 = 0; j0 < p; j0 += 16) {
    const __mmask16 m = p - j0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (p - j0)) - 1u);
    for (int64_t i0 = 0; i0 < p; i0 += 16) {
      const int64_t ni = std::min<int64_t>(16, p - i0);
      __m512 acc[16];
#pragma GCC unroll 16
      for (int ii = 0; ii < 16; ++ii)
        if (ii < ni) acc[ii] = _mm512_maskz_loadu_ps(m, part + (i0 + ii) * p + j0);
      for (int r = 0; r < mr; ++r) {
        const __m512 vj = _mm512_maskz_loadu_ps(m, V + r * p + j0);
        const float* u = U + r * p + i0;
#pragma GCC unroll 16
        for (int ii = 0; ii < 16; ++ii)
          if (ii < ni) acc[ii] = _mm512_fmadd_ps(_mm512_set1_ps(u[ii]), vj, acc[ii]);
      }
#pragma GCC unroll 16
      for (int ii = 0; ii < 16; ++ii)
        if (ii < ni) _mm512_mask_storeu_ps(part + (i0 + ii) * p + j0, m, acc[ii]);
    }
  }
}

// ---- AVX2 + FMA (+ F16C) kernels: CPUs without AVX-512 (AMD Zen 1-3, Intel Haswell to Alder Lake client
// parts). The same multiply-adds in the same order as skinny_avx512 / outer_tile_avx512 (each output a
// chain of fma over k ascending, one lane per output), 8 outputs per ymm instead of 16: the same bits.
// Without them those CPUs ran the portable loops, whose std::fma is a libm call when the file is compiled
// for baseline x86-64: 270 ms instead of ~3 ms for the 1000 x 1000 hook-work benchmark on a Zen 3.
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8(const c10::BFloat16* x) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

// Lanes [0, n) of a ymm (n may be <= 0 or >= 8) as a maskload / maskstore mask.
__attribute__((target("avx2,fma,f16c"))) inline __m256i lanes8(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int c = static_cast<int>(std::clamp<int64_t>(n, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), idx);
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 wload8(const float* src, bool full, __m256i m) {
  return full ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, m);
}

// Y[r][0..p) = X[r] . W for r < MR (MR <= 6: 12 accumulators + 2 W vectors + 1 broadcast fit the 16 ymm
// registers), columns 16 at a time (two ymm); prefetch and half-precision widening as in skinny_avx512.
template <int MR, int kP, typename E>
__attribute__((target("avx2,fma,f16c"))) void skinny_avx2(const E* const* X, int64_t K, const float* W,
                                                          int64_t p_arg, float* Y, const char* pf, int64_t pf_bytes) {
  constexpr bool kNarrow = !std::is_same_v<E, float>;
  constexpr int64_t kWideChunk = 256;
  alignas(32) float sx[kNarrow ? MR : 1][kNarrow ? kWideChunk : 1];
  const int64_t p = kP ? kP : p_arg;
  PrefetchStream pfs(pf, pf_bytes, K);
  for (int64_t j0 = 0; j0 < p; j0 += 16) {
    const bool full = kP || p - j0 >= 16;
    const __m256i m0 = lanes8(p - j0), m1 = lanes8(p - j0 - 8);
    const float* w = W + j0;
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const E* xr[MR];
    for (int r = 0; r < MR; ++r) xr[r] = X[r];
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if (j0 == 0) pfs.step();
      const int64_t c = k % kWideChunk;
      if constexpr (kNarrow) {
        if (c == 0) {
          const int64_t nc = std::min<int64_t>(kWideChunk, (K - k) / 16 * 16);
          for (int r = 0; r < MR; ++r)
            for (int64_t q = 0; q < nc; q += 8) _mm256_store_ps(sx[r] + q, widen8(xr[r] + k + q));
        }
      }
      const auto x_at = [&](int r, int kk) -> const float* {
        if constexpr (kNarrow) return &sx[r][c + kk];
        else return xr[r] + k + kk;
      };
#pragma GCC unroll 16
      for (int kk = 0; kk < 16; ++kk) {
        const __m256 w0 = wload8(w + (k + kk) * p, full, m0), w1 = wload8(w + (k + kk) * p + 8, full, m1);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          const __m256 xb = _mm256_broadcast_ss(x_at(r, kk));
          acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
        }
      }
    }
    for (; k < K; ++k) {
      const __m256 w0 = wload8(w + k * p, full, m0), w1 = wload8(w + k * p + 8, full, m1);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m256 xb = _mm256_set1_ps(static_cast<float>(xr[r][k]));
        acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      float* y = Y + r * p + j0;
      if (full) {
        _mm256_storeu_ps(y, acc[r][0]);
        _mm256_storeu_ps(y + 8, acc[r][1]);
      } else {
        _mm256_maskstore_ps(y, m0, acc[r][0]);
        _mm256_maskstore_ps(y + 8, m1, acc[r][1]);
      }
    }
  }
}
template <typename E, int kP, int... I>
constexpr std::array<SkinnyFn<E>, sizeof...(I)> skinny_table_avx2(std::integer_sequence<int, I...>) {
  return {&skinny_avx2<I + 1, kP, E>...};
}
constexpr int kSkinnyMR2 = 6;  // tokens per AVX2 pass (register file: see skinny_avx2)
constexpr auto kMRs2 = std::make_integer_sequence<int, kSkinnyMR2>{};
template <typename E>  // [p: any, 16, 32, 64][rows - 1]
constexpr std::array<std::array<SkinnyFn<E>, kSkinnyMR2>, 4> kSkinny2 = {
    skinny_table_avx2<E, 0>(kMRs2), skinny_table_avx2<E, 16>(kMRs2), skinny_table_avx2<E, 32>(kMRs2),
    skinny_table_avx2<E, 64>(kMRs2)};

// outer_tile_avx512's updates (part[i, j] = fma(U[r, i], V[r, j], part[i, j]), r ascending), 8 x 8 blocks.
// kFull: all 8 columns of the block exist (plain loads / stores; AMD's masked stores are slow, ~10% of the
// one-token-per-example case on a Zen 3 when every block went through them); else lanes m only.
// fresh: the partial has not been written yet and is taken as +0 (what zero-filling it and loading would give).
template <bool kFull>
__attribute__((target("avx2,fma,f16c"))) inline void outer_block_avx2(const float* U, const float* V, int mr,
                                                                     int64_t p, int64_t i0, int64_t j0,
                                                                     __m256i m, bool fresh, float* part) {
  const int64_t ni = std::min<int64_t>(8, p - i0);
  __m256 acc[8];
#pragma GCC unroll 8
  for (int ii = 0; ii < 8; ++ii)
    if (ii < ni) acc[ii] = fresh ? _mm256_setzero_ps() : wload8(part + (i0 + ii) * p + j0, kFull, m);
  for (int r = 0; r < mr; ++r) {
    const __m256 vj = wload8(V + r * p + j0, kFull, m);
    const float* u = U + r * p + i0;
#pragma GCC unroll 8
    for (int ii = 0; ii < 8; ++ii)
      if (ii < ni) acc[ii] = _mm256_fmadd_ps(_mm256_broadcast_ss(u + ii), vj, acc[ii]);
  }
#pragma GCC unroll 8
  for (int ii = 0; ii < 8; ++ii) {
    if (ii >= ni) continue;
    if constexpr (kFull)
      _mm256_storeu_ps(part + (i0 + ii) * p + j0, acc[ii]);
    else
      _mm256_maskstore_ps(part + (i0 + ii) * p + j0, m, acc[ii]);
  }
}

__attribute__((target("avx2,fma,f16c"))) void outer_tile_avx2(const float* U, const float* V, int mr, int64_t p,
                                                             bool fresh, float* part) {
  for (int64_t j0 = 0; j0 < p; j0 += 8) {
    const __m256i m = lanes8(p - j0);
    for (int64_t i0 = 0; i0 < p; i0 += 8) {
      if (p - j0 >= 8)
        outer_block_avx2<true>(U, V, mr, p, i0, j0, m, fresh, part);
      else
        outer_block_avx2<false>(U, V, mr, p, i0, j0, m, fresh, part);
    }
  }
}
#endif

// The factored kernel's instruction set: 2 = AVX-512F, 1 = AVX2 + FMA + F16C, 0 = the portable loops. The
// best the CPU has, capped by GRADKIT_FACTORED_ISA=avx2|portable (or GRADKIT_FACTORED_PORTABLE=1), read per
// call: tests compare every level the CPU has, bit for bit.
int factored_isa() { return capped_simd_level("GRADKIT_FACTORED_ISA", "portable", "GRADKIT_FACTORED_PORTABLE"); }

// One side's n projection entries w: s when every entry is +-s with s in [2^-100, 1] (a Rademacher matrix at any
// p), else 0. The AMX path's condition: its tiles multiply by the signs (+-1, exact in bfloat16) and the sums are
// scaled by s once, for s a power of two (p = 16, 64) the same bits as multiplying by +-s.
float uniform_scale(const float* w, int64_t n) {
  if (n == 0) return 0.0f;
  const float s = std::fabs(w[0]);
  if (!(s <= 1.0f && s >= 0x1p-100f)) return 0.0f;
  uint32_t sb, diff = 0;
  std::memcpy(&sb, &s, 4);
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {  // |w|'s bits against s's, 4096 at a time (vectorised; early exit)
    const int64_t i1 = std::min(n, i0 + 4096);
    for (int64_t i = i0; i < i1; ++i) {
      uint32_t u;
      std::memcpy(&u, w + i, 4);
      diff |= (u & 0x7fffffffu) ^ sb;
    }
    if (diff) return 0.0f;
  }
  return s;
}

// The sign path's condition: uniform_scale's s when it is a power of two (a Rademacher matrix at p = 4^m), else 0.
float sign_scale(const float* w, int64_t n) {
  const float s = uniform_scale(w, n);
  int e = 0;
  return s > 0.0f && std::frexp(s, &e) == 0.5f ? s : 0.0f;
}

// dst[0..n) = src[0..n) widened to float32 (exact for bfloat16 and float16, subnormals included).
template <typename E>
void widen_row(const E* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#ifdef GK_PROJ_X86
// ---- AMX path (the default where it applies; GRADKIT_FACTORED_AMX=0 turns it off): bfloat16 rows, p = 16, 32 or 64, a
// side whose matrix is +-s (uniform_scale). One tile of up to 16 tokens is multiplied with TDPBF16PS by the signs (+-1,
// packed per block of 16 outputs) into p / 16 float32 tiles of 16 x 16 (skinny_amx: the rows where they lie, or a
// zero-padded copy), and the sums are scaled by s once (for p = 16 / 64, s a power of two: the bits of multiplying by
// +-s; p = 32 from session 28, as 64). The products are exact and the sums float32, but TDPBF16PS does not round after
// every product as the FMA chain does (benchmarks/micro/amx_bf16.cpp: ~2% of outputs differ by an ulp), it reads
// denormal inputs as zero and flushes denormal sums: this path has its own bits, within float32 summation error of the
// others (the same largest relative error against float64 in the tests); rows where a flush could matter (every output
// below 2^-60) and non-finite rows are recomputed with the FMA kernel (amx_scale_rows, from session 28). A float32 path
// (three bfloat16 parts per value) was no faster than the FMA kernel: benchmarks/micro/amx_f32.cpp. Opt-in in session
// 26; the default from session 27, because on bfloat16 models the FMA kernel took ~1.9x bergson's time on an AMX CPU
// (bergson's bfloat16 matmuls run on AMX through oneDNN) and the GPU defaults (cuBLAS composites) keep no bitwise
// promise either; GRADKIT_FACTORED_AMX=0 restores the bits the other CPU kernels and the CUDA C++ kernel share. Session
// 26, Intel Emerald Rapids, bfloat16 hook work at two threads against the FMA kernel, per-round medians (`python
// benchmarks/amx_ab.py --bergson`): 1000 x 1000, 64 x 128 tokens 0.95 vs 2.01 ms (0.43x); 1024 x 1024 0.36x; 4096 x
// 4096 0.39x; 8192 one-token examples 0.43x; bergson's bfloat16 hooks 1.28 ms (1.41x).
struct AmxTileConfig {  // LDTILECFG's 64-byte palette-1 layout
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool amx_ready() {  // the CPU has AMX-BF16 and the kernel grants this process tile data (Linux >= 5.16)
#if defined(__linux__)
  static const bool ok = [] {
    if (!__builtin_cpu_supports("avx512f")) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
    if (!amx_bf16 || !amx_tile) return false;
    constexpr long kReqPerm = 0x1023, kXTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPerm, kXTileData) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// The signs of W (K x p float32, p = 16 q, every entry +-s) as TDPBF16PS's B operands: per block of 16 outputs j,
// [kpad / 2][16][2] bfloat16 +-1 (at out + j kpad 16), zero past K. Pair i of a block of 32 features kb holds
// features kb + 2i, kb + 2i + 1 (split = false: the layout of bfloat16 rows read as they lie), or kb + i, kb + i + 16
// (split = true: the float32 path's, whose parts are packed from two vectors of 16 features, see amx_split).
__attribute__((target("avx512f"))) std::vector<uint16_t> amx_pack(const float* W, int64_t K, int64_t p,
                                                                bool split = false) {
  const int64_t kpad = (K + 31) / 32 * 32;
  std::vector<uint16_t> out(static_cast<size_t>(kpad * p), 0);
  // per call (the hooks' matrices change with the module), so kept cheap: features k, k' of 16 outputs give 16
  // pairs (+-1.0 with W's signs) in one 64-byte store
  const __m512i sign_lo = _mm512_set1_epi32(0x8000), one_lo = _mm512_set1_epi32(0x3F80);
  const __m512i sign_hi = _mm512_set1_epi32(static_cast<int>(0x80000000u)), one_hi = _mm512_set1_epi32(0x3F800000);
  for (int64_t i = 0; i < kpad / 2; ++i) {
    const int64_t k = split ? i / 16 * 32 + i % 16 : 2 * i, k2 = split ? k + 16 : k + 1;
    if (k >= K) continue;  // zeros
    for (int64_t j = 0; j < p / 16; ++j) {
      const __m512i u0 = _mm512_loadu_si512(W + k * p + j * 16);
      const __m512i u1 = k2 < K ? _mm512_loadu_si512(W + k2 * p + j * 16) : _mm512_setzero_si512();
      const __m512i lo = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u0, 16), sign_lo), one_lo);
      const __m512i hi = k2 < K ? _mm512_or_si512(_mm512_and_si512(u1, sign_hi), one_hi) : _mm512_setzero_si512();
      _mm512_storeu_si512(out.data() + j * kpad * 16 + i * 32, _mm512_or_si512(lo, hi));
    }
  }
  return out;
}

// p = 16: tiles 0: the 16 x 16 float32 sums; 1: 16 tokens x 32 features; 2: 16 feature pairs x 16 outputs; for
// each side whose feature count K has an even tail K % 32, 16 tokens x that tail (3 left, 5 right) and its pairs
// (4, 6). p = 32 / 64 (q = p / 16 blocks of 16 outputs): sums in 0, 5 (, 6, 7), pairs in 2, 3 (, 4), every tile
// 16 x 64 bytes (the tails go through a zero-padded copy). Items of 32-token tiles (skinny_amx2, any p): all 8
// tiles 16 x 64 bytes, tails through a zero-padded copy.
// Loaded once per work item (amx_begin) and released at its end (amx_end): nothing else runs on the thread in
// between. The configuration is a thread_local object, not a stack one: built on the stack, GCC dropped some of
// its zeroing stores (it does not see LDTILECFG read them), and the instruction faulted on nonzero reserved bytes.
// two: the item's tiles are 32 tokens (skinny_amx2: all 8 tiles 16 x 64 bytes, no tail tiles at any p).
__attribute__((target("amx-tile,amx-bf16"))) void amx_begin(int64_t k_left, int64_t k_right, int64_t q, bool two) {
  alignas(64) thread_local AmxTileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  const bool full = q > 1 || two;
  for (int t = 0; t < (full ? 8 : 3); ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  if (full) k_left = k_right = 0;  // no tail tiles
  const int64_t tails[2] = {k_left % 32, k_right % 32};
  for (int side = 0; side < 2; ++side)
    if (tails[side] > 0 && tails[side] % 2 == 0) {
      cfg.colsb[3 + 2 * side] = static_cast<uint16_t>(tails[side] * 2);
      cfg.rows[3 + 2 * side] = 16;
      cfg.colsb[4 + 2 * side] = 64;
      cfg.rows[4 + 2 * side] = static_cast<uint8_t>(tails[side] / 2);
    }
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}
__attribute__((target("amx-tile,amx-bf16"))) void amx_end() { _tile_release(); }

// Y[r][0..16) = X[r] . W for r < mr (mr <= 16), X bfloat16 rows by pointer, W packed by amx_pack; between amx_begin and
// amx_end. Sixteen equally spaced rows are read where they lie, an even tail K % 32 through tiles 3 / 4 (left) or 5 / 6
// (right), sized by amx_begin, an odd one through a zero-padded copy; otherwise (masked tokens, a short last tile) the
// rows are copied into a padded scratch. Padding is +0 times +0 products: the sums (never -0, they start from +0) are
// unchanged, and no padded feature is a copy of an inf or a NaN. amx_scale_rows: the rows an AMX result may not stand
// for: one with a non-finite output (an inf or a NaN among the inputs, or an overflow) or whose largest magnitude is
// below 2^-60 (zero rows included). factored_item recomputes them with the FMA kernel, one row at a time (its bits in
// any tile), so such rows come out exactly as with GRADKIT_FACTORED_AMX=0: its inf / NaN pattern, and no input read as
// zero where it decides the result. In any other row every quantity TDPBF16PS flushes (a denormal input, product or
// sum) is below 2^-126, an output sums fewer than 2^30 of them and is then scaled by s <= 1: less than 2^-96, against
// half an ulp of 2^-60 or more. Also writes the rows: Y[r][0..p) = s y[r][0..p) for r < mr (y: 16 rows of p sums, p a
// multiple of 16).
__attribute__((target("avx512f"))) uint32_t amx_scale_rows(const float* y, int mr, int64_t p, float s, float* Y) {
  uint32_t bad = 0;
  const __m512i absm = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i tiny = _mm512_set1_epi32(67 << 23);  // 2^-60
  const __m512i inf = _mm512_set1_epi32(0x7F800000);
  const __m512 sv = _mm512_set1_ps(s);
  for (int r = 0; r < mr; ++r) {
    __mmask16 nonfinite = 0, big = 0;
    for (int64_t c = 0; c < p; c += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(y + r * p + c), sv);
      _mm512_storeu_ps(Y + r * p + c, v);
      const __m512i a = _mm512_and_si512(_mm512_castps_si512(v), absm);
      nonfinite |= _mm512_cmpge_epu32_mask(a, inf);
      big |= _mm512_cmpge_epu32_mask(a, tiny);
    }
    if (nonfinite || !big) bad |= 1u << r;
  }
  return bad;
}

// The bfloat16 AMX paths' row handling (skinny_amx, skinny_amx2). amx_row_stride: the stride (in elements) of 16
// equally spaced rows X[0..16), which a tile then reads where they lie; 0 when there are fewer rows (n < 16), the
// spacing varies (masked tokens) or it is not positive. amx_pad_rows: xs = 16 rows of `width` entries, row r holding
// features [k0, K) of X[r] for r < n, zeros after them and in the rows below.
inline int64_t amx_row_stride(const c10::BFloat16* const* X, int n) {
  if (n != 16) return 0;
  const int64_t ld = X[1] - X[0];
  for (int r = 2; r < 16; ++r)
    if (X[r] - X[r - 1] != ld) return 0;
  return ld > 0 ? ld : 0;
}
inline void amx_pad_rows(const c10::BFloat16* const* X, int n, int64_t k0, int64_t K, int64_t width,
                         std::vector<uint16_t>& xs) {
  xs.resize(static_cast<size_t>(16 * width));
  for (int r = 0; r < 16; ++r) {
    uint16_t* row = xs.data() + r * width;
    const int64_t len = r < n ? K - k0 : 0;
    if (len) std::memcpy(row, reinterpret_cast<const uint16_t*>(X[r]) + k0, static_cast<size_t>(len) * 2);
    std::fill(row + len, row + width, uint16_t{0});
  }
}

// Y[r][0..p) = X[r] . W for r < mr, 16 < mr <= 32: skinny_amx on two tiles of 16 tokens at once (session 30), so
// that each sign tile loaded serves both; per block of 32 outputs (16 at p = 16), the 2 x 2 products of the two
// token tiles (4, 5) and two sign tiles (6, 7) into four sums (0, 1: outputs [0, 16) of tiles 4, 5; 2, 3: the next
// 16). TDPBF16PS computes each row alone, so every sum has skinny_amx's bits. Where the time went on a 16-token
// tile at p = 64: the 4 sign tiles (128 KiB a side at 1000 features, in L2) loaded per 32 features for one x tile,
// 5 tile loads for 4 TDPBF16PS; here 4 for 4 (p = 16: 3 for 2). One side, 8208 bfloat16 tokens x 1000 features, one
// thread (a micro program as skinny_amx's loop without its prefetch): p = 16 0.82 -> 0.66 ms, p = 32 1.19 -> 0.85,
// p = 64 2.01 -> 1.52. In the whole op the 16-token path's next-tile prefetch had hidden part of that (its x tile
// loads wait on L2), so the gain there is smaller, and p = 64 does not gain (see A.tile in factored_project_cpu).
// The loop is bound by tile loads, not TDPBF16PS: on this VM a TDPBF16PS alone issues every 6.2 ns and a 1 KiB tile
// load from L2 every 4.7 ns, but mixed as here a step costs about 17 ns per tile load with x in L2. Tried and not
// kept: an L1 prefetch of the next step's rows (0.97-1.06x in the op), double-buffered sources (one token tile, two
// accumulators, two sets of x / sign tiles: 1.3x slower in the micro program, more loads per product), and the
// 16-token path's L2 prefetch of the next tile (amx_prefetch: off with 32-token tiles). Session 31, p = 64 on
// 16-token tiles: copying the x tile into an L1 scratch with AVX-512 two steps ahead (the same bits) took 1.17-1.66x
// as long, and an L1 prefetch of the rows 1-8 steps ahead 0.99-1.04x; at p = 16, even and odd steps in separate sums
// 0.97-0.98x (other bits; not kept). A tile whose 16 rows are not equally spaced, or tile 5 when mr < 32, is copied
// first (kpad features, zeros after K); a tail K % 32 of rows read where they lie goes through a 32-feature
// zero-padded copy. Returns amx_scale_rows's mask of the rows the FMA kernel must redo.
template <int kQ>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw"))) uint32_t skinny_amx2(
    const c10::BFloat16* const* X, int mr, int64_t K, const uint16_t* Wp, float s, float* Y, const char* pf,
    int64_t pf_bytes) {
  constexpr int64_t p = 16 * kQ;
  const int64_t kmain = K / 32 * 32, kpad = (K + 31) / 32 * 32, tail = K - kmain;
  thread_local std::vector<uint16_t> xs[2];
  alignas(64) uint16_t xt[2][16 * 32];  // the tails of tiles read where they lie
  const uint16_t* base[2];
  int64_t ld[2];  // in bytes
  bool direct[2];
  for (int h = 0; h < 2; ++h) {
    const int r0 = 16 * h, n = std::min(16, mr - r0);
    const int64_t l = amx_row_stride(X + r0, n);
    direct[h] = l > 0;
    if (direct[h]) {
      base[h] = reinterpret_cast<const uint16_t*>(X[r0]);
      ld[h] = l * 2;
      if (tail > 0) {
        const __mmask32 m = static_cast<__mmask32>((1ull << tail) - 1u);
        for (int r = 0; r < 16; ++r)
          _mm512_store_si512(xt[h] + r * 32, _mm512_maskz_loadu_epi16(m, X[r0 + r] + kmain));
      }
    } else {
      amx_pad_rows(X + r0, n, 0, K, kpad, xs[h]);
      base[h] = xs[h].data();
      ld[h] = kpad * 2;
    }
  }
  alignas(64) float y[32 * p];
  PrefetchStream pfs(pf, pf_bytes, K / 2);
  for (int64_t c = 0; c < p; c += 32) {
    const uint16_t* w0 = Wp + (c / 16) * kpad * 16;
    const uint16_t* w1 = w0 + kpad * 16;
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (kQ >= 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
    const auto step = [&](const uint16_t* xa, int64_t la, const uint16_t* xb, int64_t lb, int64_t k)
                          __attribute__((target("amx-tile,amx-bf16"))) {
                            _tile_loadd(4, xa, la);
                            _tile_loadd(6, w0 + k * 16, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            if constexpr (kQ >= 2) {
                              _tile_loadd(7, w1 + k * 16, 64);
                              _tile_dpbf16ps(2, 4, 7);
                            }
                            _tile_loadd(5, xb, lb);
                            _tile_dpbf16ps(1, 5, 6);
                            if constexpr (kQ >= 2) _tile_dpbf16ps(3, 5, 7);
                          };
    for (int64_t k = 0; k < kmain; k += 32) {
      step(base[0] + k, ld[0], base[1] + k, ld[1], k);
      if (c == 0) pfs.step();
    }
    if (tail > 0)
      step(direct[0] ? xt[0] : base[0] + kmain, direct[0] ? 64 : ld[0], direct[1] ? xt[1] : base[1] + kmain,
           direct[1] ? 64 : ld[1], kmain);
    _tile_stored(0, y + c, p * 4);
    _tile_stored(1, y + 16 * p + c, p * 4);
    if constexpr (kQ >= 2) {
      _tile_stored(2, y + c + 16, p * 4);
      _tile_stored(3, y + 16 * p + c + 16, p * 4);
    }
  }
  return amx_scale_rows(y, mr, p, s, Y);
}

// x tile 1 times every block of outputs' pairs at feature k into its sums (p = 16: tile 2 into 0; p = 32 / 64: the
// pair tiles rotate over 2, 3, 4 so a load does not wait on the previous product's read of the same tile)
template <int kQ>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_dp(const uint16_t* Wp, int64_t k, int64_t kpad) {
  _tile_loadd(2, Wp + k * 16, 64);
  _tile_dpbf16ps(0, 1, 2);
  if constexpr (kQ >= 2) {
    _tile_loadd(3, Wp + kpad * 16 + k * 16, 64);
    _tile_dpbf16ps(5, 1, 3);
  }
  if constexpr (kQ == 4) {
    _tile_loadd(4, Wp + 2 * kpad * 16 + k * 16, 64);
    _tile_dpbf16ps(6, 1, 4);
    _tile_loadd(2, Wp + 3 * kpad * 16 + k * 16, 64);
    _tile_dpbf16ps(7, 1, 2);
  }
}

template <bool kLeft, int kQ>
__attribute__((target("amx-tile,amx-bf16"))) uint32_t skinny_amx(const c10::BFloat16* const* X, int mr, int64_t K,
                                                                 const uint16_t* Wp, float s, float* Y,
                                                                 const char* pf, int64_t pf_bytes, bool tails) {
  constexpr int64_t p = 16 * kQ;
  const int64_t kmain = K / 32 * 32, kpad = (K + 31) / 32 * 32, tail = K - kmain;
  const int64_t ld = amx_row_stride(X, mr);  // 0: the rows go through a padded copy
  thread_local std::vector<uint16_t> xs;
  _tile_zero(0);
  if constexpr (kQ >= 2) _tile_zero(5);
  if constexpr (kQ == 4) {
    _tile_zero(6);
    _tile_zero(7);
  }
  if (ld > 0) {
    const auto* x0 = reinterpret_cast<const uint16_t*>(X[0]);
    // pf / pf_bytes: a region read next (the next tile's rows), into L2 a slice per step of 32 features (none:
    // pf_bytes = 0; amx_prefetch decides)
    PrefetchStream pfs(pf, pf_bytes, K / 2);
    for (int64_t k = 0; k < kmain; k += 32) {
      _tile_loadd(1, x0 + k, ld * 2);
      pfs.step();
      amx_dp<kQ>(Wp, k, kpad);
    }
    // tile numbers are literals in the instructions (the macros paste them)
    if (kQ == 1 && tails && tail > 0 && tail % 2 == 0) {
      if constexpr (kLeft) {
        _tile_loadd(3, x0 + kmain, ld * 2);
        _tile_loadd(4, Wp + kmain * 16, 64);
        _tile_dpbf16ps(0, 3, 4);
      } else {
        _tile_loadd(5, x0 + kmain, ld * 2);
        _tile_loadd(6, Wp + kmain * 16, 64);
        _tile_dpbf16ps(0, 5, 6);
      }
    } else if (tail > 0) {
      amx_pad_rows(X, mr, kmain, K, 32, xs);
      _tile_loadd(1, xs.data(), 64);
      amx_dp<kQ>(Wp, kmain, kpad);
    }
  } else {
    amx_pad_rows(X, mr, 0, K, kpad, xs);
    for (int64_t k = 0; k < kpad; k += 32) {
      _tile_loadd(1, xs.data() + k, kpad * 2);
      amx_dp<kQ>(Wp, k, kpad);
    }
  }
  alignas(64) float y[16 * p];
  _tile_stored(0, y, p * 4);
  if constexpr (kQ >= 2) _tile_stored(5, y + 16, p * 4);
  if constexpr (kQ == 4) {
    _tile_stored(6, y + 32, p * 4);
    _tile_stored(7, y + 48, p * 4);
  }
  return amx_scale_rows(y, mr, p, s, Y);
}

// float32 rows on AMX (p = 32, 64; session 29; float16 rows likewise in two parts from session 30, at p = 16 too:
// skinny_amx_split below): each x is split exactly into three bfloat16 parts, x = hi + mid +
// lo (hi: x with its low 16 bits cleared; mid likewise of x - hi; lo the rest, at most 8 significant bits; both
// subtractions exact), and the three part tiles go through TDPBF16PS against the same sign tiles, so the sums are
// those of the float32 values (the products are exact; only TDPBF16PS's float32 accumulation rounds). The split
// of 16 rows x 32 features goes to an L1 scratch (three buffers, written two steps ahead of their tile loads),
// pair i of a step holding features k + i and k + i + 16 (amx_pack(split = true) matches it). Tiles: 0, 1 the
// sums of a block of 32 outputs; 2, 3, 4 hi, mid, lo; 5, 6 the two blocks' signs. p = 64: two passes of 32
// outputs, each splitting x again, until session 30 (now one pass, skinny_amx_split64). The next
// step's sign tiles are prefetched into L1 (the packed matrices, 64 / 128 KiB a side at 1000 features, live in
// L2; session 29, 1000 x 1000: p = 32 2.6 against 2.7-2.8 ms, p = 64 4.9 against 5.3-5.5 ms); a prefetch of the
// next tile's rows, as the bfloat16 path has, measured 0.98-1.05x here and is left out. Rows where
// amx_scale_rows says an AMX result may not stand (a part below 2^-126 is read as zero, an inf splits into NaN)
// are recomputed by the FMA kernel as on the bfloat16 path. The split (benchmarks/micro/amx_f32.cpp, session 28)
// did not pay at p = 16, where the FMA kernel needs one FMA per value and side (0.84-1.03x its time, session 28).
// Session 30 measured this kernel (three rotating buffers, sign tiles prefetched into L1) at p = 16: AMX / FMA per
// round 0.98 / 1.03 (1000 features), 0.93 / 0.96 (1024), 0.81 / 0.84 (4096), 0.95 / 1.00 (8192 one-token
// examples) in two runs, with half the error against float64 (4e-7 against 8e-7 at 1000): the default at p = 16
// too since then, as at 32 and 64. Session 31 took p = 16 apart with temporary patches: the splits alone about 1.09
// ms, the tile loads and products alone 0.63, the rest 0.47, the whole 2.0 (reading a and g: 1.26). The parts add
// up, so reading and tile work barely overlap. None of these helped: a sum tile per part (1.00x); splitting 1, 3, 5
// or 7 steps ahead instead of 2 (0.97-1.09x); an L1 prefetch of the rows (1.06-1.16x worse); no sign-tile prefetch
// (1.00-1.06x worse); the next tile's L2 prefetch (1.06-1.19x worse); splitting a group of 1, 2 or 4 steps ahead of
// the group's tile work (0.99-1.13x). Figures:
// benchmarks/results/intel-emr-avx512/amx-experiments-session31.txt.

// 16 values of row x from feature k (n of them, the rest zero) as float32; float16: widened exactly
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i amx_load16(const float* x, int64_t n) {
  return _mm512_castps_si512(n >= 16 ? _mm512_loadu_ps(x)
                                     : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), x));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i amx_load16(const c10::Half* x, int64_t n) {
  const __m256i h = n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))
                            : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), x);
  return _mm512_castps_si512(_mm512_cvtph_ps(h));
}

// The parts of 16 rows x 32 features from k into buf (kParts x 256 words): float32 three (hi, mid, lo), float16 two
// (hi, lo: a float16 has 11 significant bits, hi takes 8, lo the other 3, exact in bfloat16 and never below 2^-24,
// so no part is a bfloat16 denormal).
template <int kParts, typename E>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void amx_split(const E* const* X, int mr, int64_t k,
                                                                           int64_t K, uint32_t* buf) {
  const __m512i keep = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t n0 = std::clamp<int64_t>(K - k, 0, 16), n1 = std::clamp<int64_t>(K - k - 16, 0, 16);
  for (int r = 0; r < mr; ++r) {
    __m512i v0 = amx_load16(X[r] + k, n0), v1 = amx_load16(X[r] + k + 16, n1);
    for (int q = 0; q < kParts; ++q) {
      // pair i = (feature k + i: the low half, k + i + 16: the high half): (v1 & keep) | (v0 >> 16)
      _mm512_store_si512(buf + q * 256 + r * 16, _mm512_ternarylogic_epi32(v1, keep, _mm512_srli_epi32(v0, 16), 0xEA));
      if (q + 1 < kParts) {  // the rest, exact: x minus its leading 8 significant bits
        const auto rest = [keep](__m512i v) __attribute__((target("avx512f"))) {
          const __m512 lead = _mm512_castsi512_ps(_mm512_and_si512(v, keep));
          return _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(v), lead));
        };
        v0 = rest(v0);
        v1 = rest(v1);
      }
    }
  }
}

// The split paths' scratch: three steps' parts (16 rows x 16 pairs per part, up to three parts), rows past mr
// zeroed (their sums are not read, but no stale NaN or denormal goes in).
inline uint32_t (&split_scratch(int mr))[3][3 * 256] {
  alignas(64) thread_local uint32_t buf[3][3 * 256];
  if (mr < 16)
    for (auto& b : buf) std::fill(b, b + 3 * 256, 0u);
  return buf;
}

// The split paths' step loop: step(k, b) for each step of 32 features k, scratch b (of three) holding that step's
// parts, which split(k, b) wrote two steps ahead (a step's tile loads would otherwise wait on the stores just made,
// while the TDPBF16PS of the step before run); then the next step's sign tiles of the first nsign blocks of Wp are
// prefetched into L1 (1 KiB a block; the packed matrices live in L2).
template <typename Split, typename Step>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl"))) inline void split_steps(
    int64_t kpad, const uint16_t* Wp, int nsign, const Split& split, const Step& step) {
  split(0, 0);
  if (kpad > 32) split(32, 1);
  int cur = 0;
  for (int64_t k = 0; k < kpad; k += 32, cur = cur == 2 ? 0 : cur + 1) {
    step(k, cur);
    if (k + 64 < kpad) split(k + 64, cur == 0 ? 2 : cur - 1);
    if (k + 32 < kpad)
      for (int j = 0; j < nsign; ++j)
        for (int b = 0; b < 1024; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(Wp + (j * kpad + k + 32) * 16) + b, _MM_HINT_T0);
  }
}

// Split rows on AMX (float32 three parts, float16 two; p = 16, 32 here, 64 in skinny_amx_split64): amx_split's
// parts, each multiplied by TDPBF16PS against the same sign tiles into one sum per block, so the sums are those of
// the input values (products exact; only TDPBF16PS's float32 accumulation rounds). Tiles: 0, 1 the sums of the
// blocks of 16 outputs (p = 16: 0 alone); 2, 3 (, 4) the parts; 5, 6 the blocks' signs (p = 16: 5).
template <int kParts, int kQ, typename E>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl"))) uint32_t skinny_amx_split(
    const E* const* X, int mr, int64_t K, const uint16_t* Wp, float s, float* Y) {
  static_assert(kQ == 1 || kQ == 2, "p = 16 or 32");
  constexpr int64_t p = 16 * kQ;
  const int64_t kpad = (K + 31) / 32 * 32;
  auto& buf = split_scratch(mr);
  alignas(64) float y[16 * p];
  const uint16_t* w1 = Wp + kpad * 16;
  _tile_zero(0);
  if constexpr (kQ == 2) _tile_zero(1);
  split_steps(
      kpad, Wp, kQ, [&](int64_t k, int b) { amx_split<kParts>(X, mr, k, K, buf[b]); },
      [&](int64_t k, int b) __attribute__((target("amx-tile,amx-bf16"))) {
        _tile_loadd(2, buf[b], 64);
        _tile_loadd(3, buf[b] + 256, 64);
        if constexpr (kParts == 3) _tile_loadd(4, buf[b] + 512, 64);
        _tile_loadd(5, Wp + k * 16, 64);
        if constexpr (kQ == 2) _tile_loadd(6, w1 + k * 16, 64);
        _tile_dpbf16ps(0, 2, 5);
        if constexpr (kQ == 2) _tile_dpbf16ps(1, 2, 6);
        _tile_dpbf16ps(0, 3, 5);
        if constexpr (kQ == 2) _tile_dpbf16ps(1, 3, 6);
        if constexpr (kParts == 3) {
          _tile_dpbf16ps(0, 4, 5);
          if constexpr (kQ == 2) _tile_dpbf16ps(1, 4, 6);
        }
      });
  _tile_stored(0, y, p * 4);
  if constexpr (kQ == 2) _tile_stored(1, y + 16, p * 4);
  return amx_scale_rows(y, mr, p, s, Y);
}

// float16 at p = 16 on 32-token tiles (16 < mr <= 32; session 30), as skinny_amx2 for bfloat16: the two token tiles'
// parts (2, 3 and 6, 7) share each sign tile (5), 5 tile loads per 4 TDPBF16PS instead of 6; sums in 0 (rows 0-15)
// and 1 (rows 16-31). Each row's sum gets the same products in the same order as in skinny_amx_split<2, 1>: the
// same bits. (float32's three parts a tile would need 9 tiles.)
template <typename E>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl"))) uint32_t skinny_amx_split2(
    const E* const* X, int mr, int64_t K, const uint16_t* Wp, float s, float* Y) {
  constexpr int64_t p = 16;
  const int64_t kpad = (K + 31) / 32 * 32;
  const int mb = mr - 16;  // rows of the second token tile
  alignas(64) thread_local uint32_t buf[3][2][2 * 256];  // step, token tile, parts
  if (mb < 16)
    for (auto& b : buf) std::fill(b[1], b[1] + 2 * 256, 0u);
  alignas(64) float y[32 * p];
  _tile_zero(0);
  _tile_zero(1);
  split_steps(
      kpad, Wp, 1,
      [&](int64_t k, int b) {
        amx_split<2>(X, 16, k, K, buf[b][0]);
        amx_split<2>(X + 16, mb, k, K, buf[b][1]);
      },
      [&](int64_t k, int b) __attribute__((target("amx-tile,amx-bf16"))) {
        _tile_loadd(2, buf[b][0], 64);
        _tile_loadd(3, buf[b][0] + 256, 64);
        _tile_loadd(5, Wp + k * 16, 64);
        _tile_dpbf16ps(0, 2, 5);
        _tile_dpbf16ps(0, 3, 5);
        _tile_loadd(6, buf[b][1], 64);
        _tile_loadd(7, buf[b][1] + 256, 64);
        _tile_dpbf16ps(1, 6, 5);
        _tile_dpbf16ps(1, 7, 5);
      });
  _tile_stored(0, y, p * 4);
  _tile_stored(1, y + 16 * p, p * 4);
  return amx_scale_rows(y, mr, p, s, Y);
}

// p = 64 in one pass (session 30): the four blocks' sums in 0, 1, 6, 7, the parts in 2, 3 (, 4) split once per step,
// each block's sign tile loaded in turn (float32: into 5 alone; float16: 4 and 5 alternating). Until then p = 64 ran
// skinny_amx_split's loop twice, 32 outputs a pass, splitting every row twice and loading the parts twice (10 tile
// loads per 12 TDPBF16PS against 7): this one took 0.77-0.89x its time (float32) and 0.79-0.87x (float16) per round
// over amx_ab.py's four shapes, with the same bits (each sum gets the same products in the same order).
template <int kParts, typename E>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl"))) uint32_t skinny_amx_split64(
    const E* const* X, int mr, int64_t K, const uint16_t* Wp, float s, float* Y) {
  constexpr int64_t p = 64;
  const int64_t kpad = (K + 31) / 32 * 32;
  auto& buf = split_scratch(mr);
  alignas(64) float y[16 * p];
  const uint16_t* w0 = Wp;
  const uint16_t* w1 = w0 + kpad * 16;
  const uint16_t* w2 = w1 + kpad * 16;
  const uint16_t* w3 = w2 + kpad * 16;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(6);
  _tile_zero(7);
  split_steps(
      kpad, Wp, 4, [&](int64_t k, int b) { amx_split<kParts>(X, mr, k, K, buf[b]); },
      [&](int64_t k, int b) __attribute__((target("amx-tile,amx-bf16"))) {
        _tile_loadd(2, buf[b], 64);
        _tile_loadd(3, buf[b] + 256, 64);
        if constexpr (kParts == 3) {
          _tile_loadd(4, buf[b] + 512, 64);
// block W's signs into tile 5, then its three parts' products into sum tile C (tile numbers must be literals)
#define GK_SPLIT3_BLOCK(C, W)       \
  _tile_loadd(5, W + k * 16, 64); \
  _tile_dpbf16ps(C, 2, 5);          \
  _tile_dpbf16ps(C, 3, 5);          \
  _tile_dpbf16ps(C, 4, 5)
          GK_SPLIT3_BLOCK(0, w0);
          GK_SPLIT3_BLOCK(1, w1);
          GK_SPLIT3_BLOCK(6, w2);
          GK_SPLIT3_BLOCK(7, w3);
#undef GK_SPLIT3_BLOCK
        } else {
// blocks WA, WB's signs into tiles 4, 5, then their two parts' products into sum tiles CA, CB
#define GK_SPLIT2_BLOCKS(CA, WA, CB, WB) \
  _tile_loadd(4, WA + k * 16, 64);       \
  _tile_loadd(5, WB + k * 16, 64);       \
  _tile_dpbf16ps(CA, 2, 4);              \
  _tile_dpbf16ps(CA, 3, 4);              \
  _tile_dpbf16ps(CB, 2, 5);              \
  _tile_dpbf16ps(CB, 3, 5)
          GK_SPLIT2_BLOCKS(0, w0, 1, w1);
          GK_SPLIT2_BLOCKS(6, w2, 7, w3);
#undef GK_SPLIT2_BLOCKS
        }
      });
  _tile_stored(0, y, p * 4);
  _tile_stored(1, y + 16, p * 4);
  _tile_stored(6, y + 32, p * 4);
  _tile_stored(7, y + 48, p * 4);
  return amx_scale_rows(y, mr, p, s, Y);
}

#endif

// One work item: tokens [n0, n1), either whole examples n0 / T .. (n1 - 1) / T (short sequences: several
// examples per item) or one chunk of one example; part holds the p x p partial of each example the item
// touches (zeroed first). Tiles of up to 16 unmasked tokens may span examples, so one-token examples still
// share each load of lt / rt among 16 tokens; each tile's outer products go to their examples' partials in
// token order (the same arithmetic per token and per partial entry whatever the tiling). E: the element
// type of a and g; half-precision rows are widened exactly as the AVX-512 kernel reads them (256 values of
// each row of a pass at a time, into L1), or into a float32 tile first on the portable path, so the
// arithmetic is the float32 kernel's on the same values.
template <typename E>
void factored_item(const FArgs& A, int64_t n0, int64_t n1, int64_t T, float* part) {
  constexpr bool kWiden = !std::is_same_v<E, float>;
  const E* ga = static_cast<const E*>(A.a);
  const E* gg = static_cast<const E*>(A.g);
  const int64_t p = A.p, b0 = n0 / T, nb = (n1 - 1) / T - b0 + 1;
  // partials are zeroed when their example's first unmasked token comes (in L1, just before use; the AVX2
  // kernel starts such a partial from +0 in registers instead), and those of examples with no unmasked
  // token at the end: partials [0, ready) are initialised. Tokens come in order, so an example before the
  // current one gets no more tokens.
  int64_t ready = 0;
  thread_local std::vector<float> U, V, wide;  // per-thread scratch, kept across calls
  U.resize(static_cast<size_t>(kAmxTile * p));
  V.resize(static_cast<size_t>(kAmxTile * p));
  const E* rg[kAmxTile];  // the tile's rows of g and a (A.tile <= kAmxTile)
  const E* ra[kAmxTile];
  int64_t tok_b[kAmxTile];  // each tile row's example, relative to b0
  int64_t n = n0;
#ifdef GK_PROJ_X86
  const bool amx = A.lw_amx || A.rw_amx;
  if (amx) amx_begin(A.O, A.I, p / 16, A.tile == kAmxTile || !std::is_same_v<E, c10::BFloat16>);  // split: all 8 tiles
#endif
  while (n < n1) {
    int mr = 0;
    for (; n < n1 && mr < A.tile; ++n) {
      if (A.mask && !A.mask[n]) continue;
      rg[mr] = gg + n * A.ldg;
      ra[mr] = ga + n * A.lda;
      tok_b[mr] = n / T - b0;
      ++mr;
    }
    if (mr == 0) break;
#ifdef GK_PROJ_X86
    if (A.isa > 0) {
      // one tile ahead: while this tile's g rows are used, the next tile's g rows stream into L2; likewise a.
      // The next tile may lie past this item: a thread's items are consecutive examples, so it is usually
      // the thread's next item's first tile (without it, one tile per item would start cold).
      const int64_t nn = std::min(A.N, n + static_cast<int64_t>(A.tile));
      const char* g_lo = reinterpret_cast<const char*>(gg + n * A.ldg);
      const int64_t g_len = n < nn ? reinterpret_cast<const char*>(gg + (nn - 1) * A.ldg + A.O) - g_lo : 0;
      const char* a_lo = reinterpret_cast<const char*>(ga + n * A.lda);
      const int64_t a_len = n < nn ? reinterpret_cast<const char*>(ga + (nn - 1) * A.lda + A.I) - a_lo : 0;
      // each side in passes of up to kSkinnyMR tokens, sharing the prefetch of that side's next-tile rows
      const int pi = p == 16 ? 1 : p == 32 ? 2 : p == 64 ? 3 : 0;
      const SkinnyFn<E>* table = A.isa == 2 ? kSkinny<E>[pi].data() : kSkinny2<E>[pi].data();
      const int pass = A.isa == 2 ? kSkinnyMR : kSkinnyMR2;
      const int np = (mr + pass - 1) / pass;
      const auto side = [&](const E* const* x, int64_t K, const float* w, float s, float* Y, const char* lo,
                            int64_t len) {
        if (s > 0.0f && pi != 2 && mr > kSkinnyMR) {  // the sign path: one pass of 8 FMA rows + the rest
          kSkinnySign<E>[pi == 3 ? 2 : pi][mr - kSkinnyMR - 1](x, K, w, p, Y, lo, len, s);
          return;
        }
        for (int q = 0; q < np; ++q) {
          const int h = q * pass, n = std::min(pass, mr - h);
          table[n - 1](x + h, K, w, p, Y + h * p, lo + len * q / np, len * (q + 1) / np - len * q / np);
        }
      };
      if constexpr (std::is_same_v<E, c10::BFloat16> || std::is_same_v<E, float> || std::is_same_v<E, c10::Half>) {
        // AMX sides; the rows amx_scale_rows names again through the FMA kernel, one at a time (the same bits
        // as in any tile)
        const auto amx_side = [&](const E* const* x, int64_t K, const uint16_t* wp, float sa, const float* w,
                                  float* Y, const char* lo, int64_t len, auto left) {
          constexpr bool kL = decltype(left)::value;
          uint32_t bad;
          if constexpr (std::is_same_v<E, float>)  // p = 16, 32 or 64
            bad = p == 16   ? skinny_amx_split<3, 1>(x, mr, K, wp, sa, Y)
                  : p == 32 ? skinny_amx_split<3, 2>(x, mr, K, wp, sa, Y)
                            : skinny_amx_split64<3>(x, mr, K, wp, sa, Y);
          else if constexpr (std::is_same_v<E, c10::Half>)  // p = 16, 32 or 64
            bad = p == 16   ? (mr > 16 ? skinny_amx_split2(x, mr, K, wp, sa, Y)
                                       : skinny_amx_split<2, 1>(x, mr, K, wp, sa, Y))
                  : p == 32 ? skinny_amx_split<2, 2>(x, mr, K, wp, sa, Y)
                            : skinny_amx_split64<2>(x, mr, K, wp, sa, Y);
          else
            bad = mr > 16 ? (p == 16   ? skinny_amx2<1>(x, mr, K, wp, sa, Y, lo, len)
                             : p == 32 ? skinny_amx2<2>(x, mr, K, wp, sa, Y, lo, len)
                                       : skinny_amx2<4>(x, mr, K, wp, sa, Y, lo, len))
                  : p == 16   ? skinny_amx<kL, 1>(x, mr, K, wp, sa, Y, lo, len, A.tile != kAmxTile)
                  : p == 32 ? skinny_amx<kL, 2>(x, mr, K, wp, sa, Y, lo, len, false)
                            : skinny_amx<kL, 4>(x, mr, K, wp, sa, Y, lo, len, false);
          for (; bad; bad &= bad - 1) {
            const int r = __builtin_ctz(bad);
            table[0](x + r, K, w, p, Y + r * p, nullptr, 0);
          }
        };
        if (A.lw_amx) amx_side(rg, A.O, A.lw_amx, A.lsa, A.lt, U.data(), g_lo, A.lpf_amx ? g_len : 0, std::true_type{});
        else side(rg, A.O, A.lt, A.ls, U.data(), g_lo, g_len);
        if (A.rw_amx)
          amx_side(ra, A.I, A.rw_amx, A.rsa, A.rt, V.data(), a_lo, A.rpf_amx ? a_len : 0, std::false_type{});
        else side(ra, A.I, A.rt, A.rs, V.data(), a_lo, a_len);
      } else {
        side(rg, A.O, A.lt, A.ls, U.data(), g_lo, g_len);
        side(ra, A.I, A.rt, A.rs, V.data(), a_lo, a_len);
      }
    } else
#endif
    {
      const float* xg[kFMR];
      const float* xa[kFMR];
      if constexpr (kWiden) {  // half-precision rows widened into a float32 tile first
        wide.resize(static_cast<size_t>(kFMR * (A.O + A.I)));
        for (int r = 0; r < mr; ++r) {
          float* wg = wide.data() + r * A.O;
          float* wa = wide.data() + kFMR * A.O + r * A.I;
          widen_row(rg[r], A.O, wg);
          widen_row(ra[r], A.I, wa);
          xg[r] = wg;
          xa[r] = wa;
        }
      } else {
        std::copy(rg, rg + mr, xg);
        std::copy(ra, ra + mr, xa);
      }
      skinny_portable(xg, mr, A.O, A.lt, p, U.data());
      skinny_portable(xa, mr, A.I, A.rt, p, V.data());
    }
    if (A.rb)
      for (int r = 0; r < mr; ++r)
        for (int64_t j = 0; j < p; ++j) V[r * p + j] += A.rb[j];
    for (int r = 0; r < mr;) {  // runs of tokens of one example, in order
      int r1 = r + 1;
      while (r1 < mr && tok_b[r1] == tok_b[r]) ++r1;
      float* pb = part + tok_b[r] * p * p;
      const bool fresh = tok_b[r] >= ready;
      if (fresh) {
        std::fill(part + ready * p * p, pb, 0.0f);  // examples without unmasked tokens
        ready = tok_b[r] + 1;
      }
#ifdef GK_PROJ_X86
      if (A.isa == 1) {
        outer_tile_avx2(U.data() + r * p, V.data() + r * p, r1 - r, p, fresh, pb);
        r = r1;
        continue;
      }
#endif
      if (fresh) std::fill(pb, pb + p * p, 0.0f);
#ifdef GK_PROJ_X86
      if (A.isa == 2) {
        outer_tile_avx512(U.data() + r * p, V.data() + r * p, r1 - r, p, pb);
        r = r1;
        continue;
      }
#endif
      for (; r < r1; ++r) {  // part[i, j] = fma(u_i, v_j, part[i, j])
        const float* u = U.data() + r * p;
        const float* v = V.data() + r * p;
        for (int64_t i = 0; i < p; ++i) {
          float* row = pb + i * p;
          const float ui = u[i];
          for (int64_t j = 0; j < p; ++j) row[j] = std::fma(ui, v[j], row[j]);
        }
      }
    }
  }
  std::fill(part + ready * p * p, part + nb * p * p, 0.0f);
#ifdef GK_PROJ_X86
  if (amx) amx_end();
#endif
}

#ifdef GK_PROJ_X86
// Whether an AMX side prefetches the next tile's rows into L2 while it multiplies the current ones (skinny_amx's
// pf): for rows under 4 KiB (K < 2048) at p = 64, or whose stride is not a multiple of 64 bytes (then each tile row
// is two cache lines). Session 29, Intel Xeon (Emerald Rapids): benchmarks/amx_ab.py --prefetch (one process, on /
// off alternated, medians of the per-round ratios; bfloat16, 8192 tokens); the host drifts between runs, so two
// to three runs per size: p = 64: 768 0.94-0.95x, 1000 0.83-0.84x, 1024 0.95-0.96x, 2048 0.94-1.00x, 4096
// 0.98-1.02x; 1000 (misaligned rows) at p = 16 0.77-1.03x, p = 32 0.84-1.02x; aligned rows at p = 16 / 32 (768,
// 1024, 1536): 1.02-1.09x in 8 of 10 runs (one step of 32 features is one or two TDPBF16PS, and the prefetches
// crowd its tile loads); 4096 at p = 16 / 32: 1.05-1.10x (rows of 8 KiB: the hardware prefetchers keep up on
// their own). With 32-token tiles (skinny_amx2, session 30) off: one interleaved run over amx_ab.py's four shapes
// at p = 16, 32 and 64, median time without it / with it 0.91-1.04 (4096 features: 0.74-0.78).
// GRADKIT_AMX_PREFETCH=0 / 1 overrides the rule.
bool amx_prefetch(int64_t K, int64_t ld, int64_t p, int tile) {
  const char* env = std::getenv("GRADKIT_AMX_PREFETCH");
  if (env && std::strcmp(env, "0") == 0) return false;
  if (env && std::strcmp(env, "1") == 0) return true;
  return tile < kAmxTile && K < 2048 && (p == 64 || ld * 2 % 64 != 0);
}
#endif

at::Tensor factored_project_cpu(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& lt_in,
                                const at::Tensor& rt_in, const std::optional<at::Tensor>& rb_in,
                                const std::optional<at::Tensor>& mask_in, int64_t T) {
  check_factored(a_in, g_in, lt_in, rt_in, rb_in, mask_in, T);
  const int64_t N = a_in.size(0), p = lt_in.size(1), B = N / T;
  // large outputs (one-token examples, large p) from out_pool.h, on huge pages, reused once freed
  at::Tensor out = pooled_empty({B, p, p}, a_in.options().dtype(at::kFloat), /*huge=*/true);
  if (B == 0) return out;
  const FactoredInputs in = prepare_factored(a_in, g_in, lt_in, rt_in, rb_in, mask_in);
  FArgs A{in.a.data_ptr(), in.g.data_ptr(), in.lt.data_ptr<float>(), in.rt.data_ptr<float>(),
                in.rb_ptr(), in.mask_ptr(), std::max<int64_t>(in.a.stride(0), 1), std::max<int64_t>(in.g.stride(0), 1),
                in.a.size(1), in.g.size(1), p, N, factored_isa()};
  // The sign path is the default on AMD CPUs only (cpu_is_amd); GRADKIT_FACTORED_SIGN=0 turns it off, =1 on
  // (read per call: the tests compare both, bit for bit, on every host)
  const char* sign_env = std::getenv("GRADKIT_FACTORED_SIGN");
  const bool sign_on = sign_env && std::strcmp(sign_env, "0") == 0   ? false
                       : sign_env && std::strcmp(sign_env, "1") == 0 ? true
                                                                      : cpu_is_amd();
  // The AMX path (its own bits, see skinny_amx): bfloat16 a / g, p = 16, 32 or 64, on an AMX CPU, for each side
  // whose matrix is +-s (uniform_scale), in place of the sign path. The default where it applies (p = 16 from session
  // 27, 32 / 64 from session 28; float32 at 32 / 64 from session 29, float16 at 16 / 32 / 64 and float32 at 16 from
  // session 30, split into bfloat16 parts); GRADKIT_FACTORED_AMX=0 keeps the FMA kernel and its bits (those of the
  // same call on a.float(), g.float()).
  const char* amx_env = std::getenv("GRADKIT_FACTORED_AMX");
  bool amx_on = false;
#ifdef GK_PROJ_X86
  // skinny_amx_split: float32 (three parts) and float16 (two) at p = 16 / 32 / 64
  const bool split_amx = (in.a.scalar_type() == at::kFloat || in.a.scalar_type() == at::kHalf) &&
                         (p == 16 || p == 32 || p == 64);
  amx_on = !(amx_env && std::strcmp(amx_env, "0") == 0) && A.isa == 2 &&
           ((in.a.scalar_type() == at::kBFloat16 && (p == 16 || p == 32 || p == 64)) || split_amx) && amx_ready();
#endif
  const float ls = A.isa == 2 && sign_on ? sign_scale(A.lt, in.lt.numel()) : 0.0f;
  const float rs = A.isa == 2 && sign_on ? sign_scale(A.rt, in.rt.numel()) : 0.0f;
  std::vector<uint16_t> lw_amx, rw_amx;
#ifdef GK_PROJ_X86
  if (amx_on) {
    A.lsa = uniform_scale(A.lt, in.lt.numel());
    A.rsa = uniform_scale(A.rt, in.rt.numel());
  }
  if (A.lsa > 0.0f) {
    lw_amx = amx_pack(A.lt, A.O, p, split_amx);
    A.lw_amx = lw_amx.data();
  }
  if (A.rsa > 0.0f) {
    rw_amx = amx_pack(A.rt, A.I, p, split_amx);
    A.rw_amx = rw_amx.data();
  }
#endif
  if (sign_on) {  // the sides AMX does not take
    A.ls = A.lw_amx ? 0.0f : ls;
    A.rs = A.rw_amx ? 0.0f : rs;
    if (A.ls > 0.0f || A.rs > 0.0f) A.tile = kSignTile;
  }
#ifdef GK_PROJ_X86
  // bfloat16 rows on AMX, no side on the sign path, p = 16 or 32: 32-token tiles (skinny_amx2, the same bits as 16;
  // GRADKIT_AMX_TILE=16 / 32 forces either, at any p, for benchmarks/amx_ab.py --tile). Session 30 (Intel EMR,
  // amx_ab.py --tile --rounds 9, per-round median 32 / 16, against 16-token tiles with their amx_prefetch rule):
  // p = 16 0.92-0.97, p = 32 0.91-0.97 over the four A/B shapes; p = 64 0.99-1.06 (0.93-1.01 in another run):
  // there each 32-token pass reads its 32 rows again (64 KiB at 1000 features, past L1), which costs what the
  // sign loads saved, so p = 64 keeps 16-token tiles. float16 at p = 16 likewise (skinny_amx_split2); the other split
  // paths have no room in the 8 tiles for two token tiles.
  const char* tile_env = std::getenv("GRADKIT_AMX_TILE");
  const bool tile32 = tile_env && std::strcmp(tile_env, "32") == 0   ? true
                      : tile_env && std::strcmp(tile_env, "16") == 0 ? false
                                                                      : p <= 32;
  const bool half16 = in.a.scalar_type() == at::kHalf && p == 16;  // skinny_amx_split2
  if ((A.lw_amx || A.rw_amx) && (!split_amx || half16) && A.tile == kFMR && tile32) A.tile = kAmxTile;
  A.lpf_amx = A.lw_amx && !split_amx && amx_prefetch(A.O, A.ldg, p, A.tile);  // bfloat16 rows only
  A.rpf_amx = A.rw_amx && !split_amx && amx_prefetch(A.I, A.lda, p, A.tile);
#endif
  const auto item = in.a.scalar_type() == at::kBFloat16 ? &factored_item<c10::BFloat16>
                    : in.a.scalar_type() == at::kHalf   ? &factored_item<c10::Half>
                                                        : &factored_item<float>;
  const int64_t chunks = (T + kTokChunk - 1) / kTokChunk;
  float* o = out.data_ptr<float>();
  if (chunks == 1) {
    const int64_t per = factored_examples_per_item(B, T, A.tile, kTokChunk, at::get_num_threads());
    const int64_t items = (B + per - 1) / per;
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t lo = i * per, hi = std::min(B, lo + per);
        item(A, lo * T, hi * T, T, o + lo * p * p);
      }
    });
    return out;
  }
  std::vector<float> parts(static_cast<size_t>(B * chunks * p * p));
  at::parallel_for(0, B * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / chunks, c = i % chunks;
      item(A, b * T + c * kTokChunk, b * T + std::min(T, (c + 1) * kTokChunk), T, parts.data() + i * p * p);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    float* ob = o + b * p * p;
    std::copy(parts.data() + b * chunks * p * p, parts.data() + (b * chunks + 1) * p * p, ob);
    for (int64_t c = 1; c < chunks; ++c) {
      const float* pc = parts.data() + (b * chunks + c) * p * p;
      for (int64_t e = 0; e < p * p; ++e) ob[e] += pc[e];
    }
  }
  return out;
}

}  // namespace
}  // namespace projection
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CPU, m) {
  using namespace gradkit::projection;
  m.impl("projection_matrix_", &projection_matrix_cpu);
  m.impl("project_flat", &project_flat_cpu);
  m.impl("factored_project", &factored_project_cpu);
}

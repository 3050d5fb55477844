// CPU kernel of the search family: blocked inner-product scoring of queries against keys with a
// running top-k. Semantics: python/gradkit/kernels/reference/search.py (the definition).
//
// score_topk(queries (Q, D) fp32, keys (N, D) fp16/bf16/fp32 with unit column stride, k, largest,
//            key_scale (N,) fp32 or None, scores_in/idx_in (Q, k_in) or None, base)
//   score[q, j] = (queries[q] . keys[j]) * key_scale[j], candidate index base + j; the candidates
//   are merged with the running top-k (scores_in, idx_in; idx -1 marks an empty slot) and the k
//   best are returned sorted best first (ties: lowest index first). NaN scores rank as -inf
//   (largest) / +inf (smallest) and are reported so; missing candidates are (-inf|+inf, -1).
//
// Layout of the work:
//  * smallest is largest on negated queries (the GEMM of -q is exactly the negated GEMM of q);
//    scores are negated back at the end.
//  * the (query group x key chunk) grid is spread over at::parallel_for: key chunks when N is
//    large (each thread reads its own rows once), query groups when N is small (streamed blocks).
//  * per task, keys are walked in blocks of kBlockKeys rows, and for each tile of kTileQ queries the
//    kTileQ x kBlockKeys scores are written into a thread-local, cache-sized buffer by
//    - on x86-64 CPUs with AVX-512F or AVX2 + FMA (packed_isa): the register-blocked kernel below
//      (keys packed a 32-key panel at a time; every score the same fp32 FMA chain at both levels), or
//    - otherwise (or GRADKIT_SEARCH_ISA=blas): one single-threaded GEMM (at::mm_out, MKL/OpenBLAS)
//      on the block, upcast first into a thread-local fp32 buffer when it is not fp32; its scores only
//      bound, and every key that may enter the top-k is scored again as the same FMA chain
//      (scan_row_bounds, rescore_candidates), so every level gives the same bits.
//  * selection: each query keeps a bounded heap of k (score, index) pairs with the worst on top;
//    the row of scores is scanned 8 at a time against the heap's worst score with SSE compares
//    (one movemask per 8 scores; after warm-up almost every group is rejected), and only a score
//    strictly better than the worst enters. Within a task indices grow, so a later equal score
//    never displaces an earlier one: ties keep the lowest index.
//  * merge: per query, the task heaps and the running top-k are merged with the full comparator
//    (score desc, index asc; empty slots last) and the k best written out.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#define GK_SEARCH_SSE 1
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define GK_SEARCH_X86 1
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdlib>

#include "../search_checks.h"
#include "simd_level.h"

namespace gradkit {
namespace search {
namespace {

using at::Tensor;

constexpr int64_t kBlockKeys = 512;  // keys per GEMM block (fp32 buffer 512 x D)
constexpr int64_t kTileQ = 256;      // queries per GEMM tile: 256 x 512 x 4 B = 512 KiB of scores

struct Cand {
  float s;
  int64_t i;
};

// a ranks before b: higher score, then lower index; empty slots (i < 0) last.
inline bool better(const Cand& a, const Cand& b) {
  if ((a.i < 0) != (b.i < 0)) return b.i < 0;
  if (a.s != b.s) return a.s > b.s;
  return a.i < b.i;
}

inline float clean(float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; }

// Bounded heap of the k best candidates of one query (worst on top under `better`).
struct Heap {
  Cand* h;
  int64_t n;
  int64_t k;
  inline void offer_fill(float v, int64_t i) {
    h[n++] = Cand{clean(v), i};
    std::push_heap(h, h + n, better);
  }
  inline void replace_top(float v, int64_t i) {
    std::pop_heap(h, h + n, better);
    h[n - 1] = Cand{v, i};
    std::push_heap(h, h + n, better);
  }
  // one candidate: fills the heap, then replaces the worst only when strictly better (NaN never does)
  inline void offer(float v, int64_t i) {
    if (n < k)
      offer_fill(v, i);
    else if (v > h[0].s)
      replace_top(v, i);
  }
};

// Offer scores s[0..n) with indices idx0 + j (increasing) to the heap.
void scan_row(const float* s, int64_t n, int64_t idx0, Heap& hp) {
  int64_t j = 0;
  if (hp.k == 0) return;
  while (hp.n < hp.k && j < n) {
    hp.offer_fill(s[j], idx0 + j);
    ++j;
  }
  float thr = hp.h[0].s;
#ifdef GK_SEARCH_SSE
  for (; j + 8 <= n; j += 8) {
    const __m128 t = _mm_set1_ps(thr);
    const int m = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(s + j), t)) |
                  (_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(s + j + 4), t)) << 4);
    if (m == 0) continue;
    for (int b = 0; b < 8; ++b) {
      const float v = s[j + b];
      if (v > thr) {  // NaN never passes
        hp.replace_top(v, idx0 + j + b);
        thr = hp.h[0].s;
      }
    }
  }
#endif
  for (; j < n; ++j) {
    const float v = s[j];
    if (v > thr) {
      hp.replace_top(v, idx0 + j);
      thr = hp.h[0].s;
    }
  }
}

// ---- The BLAS blocks (CPUs without AVX2, non-x86 ones, GRADKIT_SEARCH_ISA=blas). A BLAS product's sums depend
// on its shape: MKL sums a one-query product (GEMV) in an order set by the key's position mod 4, and products
// narrower than 4 keys, or shorter than ~16 queries at large D, in other orders again. A key's score would then
// depend on the blocking, the thread count and the other queries of the call (identical keys stop tying; the
// top-k changes with batch_rows). So BLAS scores only bound: both a BLAS score a and the exact score e (the fp32
// FMA chain over d ascending: the packed kernels' bits) are sums of the D products q_d x_d, each within
// gamma_D sum |q_d x_d| <= gamma_D |q| |x| of the exact sum (gamma_D = D u / (1 - D u), u = 2^-24; any order,
// with or without FMA), so e lies in [a - m, a + m] with m = 2 gamma_D |q| |x| (+ 2^-126 per product for
// subnormal underflow; scaled keys: times |scale|, plus the product's rounding). Per query, a task keeps the k
// best lower bounds a - m in a heap, and every key whose upper bound a + m reaches the heap's worst lower bound
// as a candidate (index ascending): at least k keys score at least that lower bound, so no key left out can be
// among the k best. After its last block the task scores its candidates exactly and keeps the k best (ties:
// lowest index), the same result, bit for bit, as the packed kernels'. Candidates are few (about k plus the
// keys within 2m of the k-th score), so the exact chains cost little next to the products.
// f(typed pointer to keys row 0) for the three key dtypes score_topk takes.
template <typename F>
decltype(auto) with_keys(const Tensor& keys, F&& f) {
  if (keys.scalar_type() == at::kFloat) return f(keys.data_ptr<float>());
  if (keys.scalar_type() == at::kHalf) return f(keys.data_ptr<at::Half>());
  return f(keys.data_ptr<at::BFloat16>());
}

// The score's summation order (every CPU path, bit for bit): the features in chunks of kChain (d ascending), each
// chunk one fp32 FMA chain from 0, the chunk sums added in order: s = c_0, then s = s + c_j. Until session 44 the
// whole of d was one chain, whose error relative to |q| |x| stays ~3-4 u at every D (each step rounds a partial sum
// as large as the score); restarting per chunk bounds each product's roundings by kChain + D / kChain, so the error
// falls with D as BLAS's blocked sums do (2048 features: ~4x smaller; 16384: ~10x), and costs nothing (the packed
// kernels already walk d in chunks of kChain: they add instead of continuing the chain).
constexpr int64_t kChain = 128;

#ifdef GK_SEARCH_X86
// The exact fp32 score of one (query, key): the micro-kernels' chunked FMA chains, one score at a time.
template <typename T>
__attribute__((target("fma"))) float exact_dot(const float* q, const T* x, int64_t D) {
  float tot = 0.0f;
  for (int64_t d0 = 0; d0 < D; d0 += kChain) {
    const int64_t d1 = std::min<int64_t>(D, d0 + kChain);
    float acc = 0.0f;
    for (int64_t d = d0; d < d1; ++d) acc = __builtin_fmaf(q[d], static_cast<float>(x[d]), acc);
    tot = d0 ? tot + acc : acc;
  }
  return tot;
}
#endif

// exact_dot wherever the CPU has FMA instructions, else the same chains through std::fma (exact in software).
template <typename T>
float fma_chain(const float* q, const T* x, int64_t D) {
#ifdef GK_SEARCH_X86
  static const bool hw = __builtin_cpu_supports("fma");
  if (hw) return exact_dot(q, x, D);
#endif
  float tot = 0.0f;
  for (int64_t d0 = 0; d0 < D; d0 += kChain) {
    const int64_t d1 = std::min<int64_t>(D, d0 + kChain);
    float acc = 0.0f;
    for (int64_t d = d0; d < d1; ++d) acc = std::fma(q[d], static_cast<float>(x[d]), acc);
    tot = d0 ? tot + acc : acc;
  }
  return tot;
}

// Per query: cq = 2.02 gamma_D |q| (rounded up; inf when |q| is, NaN keeps every key); tiny = the underflow
// allowance (D only).
struct BlasBounds {
  std::vector<float> cq;
  float tiny = 0.0f;
  void init(const float* q, int64_t Q, int64_t D) {
    const double u = std::ldexp(1.0, -24), g = static_cast<double>(D) * u / std::max(1e-300, 1.0 - D * u);
    cq.resize(static_cast<size_t>(Q));
    for (int64_t r = 0; r < Q; ++r) {
      double ss = 0.0;
      for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(q[r * D + d]) * q[r * D + d];
      cq[r] = static_cast<float>(2.02 * g * std::sqrt(ss) * 1.000001);
    }
    tiny = static_cast<float>(std::ldexp(1.0, -126) * (2.0 * D + 2.0) + 1e-37);
  }
};

// kn[j] >= |x_j|. Sums of squares in float32, 32 lanes (8 independent vector chains), each within (D / 32 + 32) u
// of its value, rounded up by twice that. A sum under 1e-20 or not finite is done again in float64: float32
// squares of keys under ~1e-19 underflow (a key of 1e-30 would get norm 0, and its scores no error bound), and
// above ~1.8e19 overflow; at 1e-20 and more, the squares lost to underflow (under 1e-38 each) do not matter.
inline void key_norms(const float* x, int64_t ldx, int64_t nb, int64_t D, float* kn) {
  constexpr int kL = 32;
  const float up = static_cast<float>(1.0 + (static_cast<double>(D) / kL + 2 * kL) * std::ldexp(1.0, -23));
  for (int64_t j = 0; j < nb; ++j) {
    const float* r = x + j * ldx;
    float acc[kL] = {};
    int64_t d = 0;
    for (; d + kL <= D; d += kL)
      for (int l = 0; l < kL; ++l) acc[l] += r[d + l] * r[d + l];
    for (int l = 0; d < D; ++d, ++l) acc[l] += r[d] * r[d];
    float ss = 0.0f;
    for (int l = 0; l < kL; ++l) ss += acc[l];
    if (ss >= 1e-20f && ss <= std::numeric_limits<float>::max()) {
      kn[j] = std::sqrt(ss * up) * 1.000001f;
      continue;
    }
    double sd = 0.0;
    for (int64_t e = 0; e < D; ++e) sd += static_cast<double>(r[e]) * r[e];
    kn[j] = static_cast<float>(std::sqrt(sd) * (1.0 + 1e-6));  // inf beyond float32; NaN stays NaN
  }
}

// One query's state in a task of the BLAS path: the heap of the k best lower bounds, and the candidates
// (upper bound, key index), index ascending.
struct BlasQuery {
  std::vector<Cand> lo;
  int64_t nlo = 0;
  std::vector<Cand> cand;
};

// Bounds of one row of BLAS scores a[0..nb) (keys idx0 + j): lower bounds into the heap, keys whose upper bound
// reaches its worst into the candidates.
void scan_row_bounds(const float* a, int64_t nb, const float* kn, float cq, float tiny, const float* sc,
                     int64_t idx0, int64_t k, BlasQuery& st) {
  if (k == 0) return;
  Heap hp{st.lo.data(), st.nlo, k};
  float thr = hp.n < k ? -std::numeric_limits<float>::infinity() : hp.h[0].s;
  constexpr int kG = 16;  // bounds computed and tested a group at a time (vectorised loops): almost all rejected
  float lo[kG], hi[kG];
  auto bounds = [&](int64_t j, int n) {
    if (!sc) {
      for (int i = 0; i < n; ++i) {
        const float m = cq * kn[j + i] + tiny;
        lo[i] = a[j + i] - m;
        hi[i] = a[j + i] + m;
      }
    } else {  // |e sc - a sc| <= m |sc| (1 + u) + the two products' rounding
      for (int i = 0; i < n; ++i) {
        const float t = a[j + i] * sc[j + i];
        const float m = (cq * kn[j + i] + tiny) * std::fabs(sc[j + i]) * 1.000001f + std::fabs(t) * 2.5e-7f;
        lo[i] = t - m;
        hi[i] = t + m;
      }
    }
  };
  auto consider = [&](int64_t j, float l, float h) {
    if (!(h < thr)) st.cand.push_back(Cand{h, idx0 + j});  // NaN: a candidate (its exact score decides)
    hp.offer(l, idx0 + j);
    if (hp.n == k) thr = hp.h[0].s;
  };
  int64_t j = 0;
  for (; j + kG <= nb; j += kG) {
#ifdef GK_SEARCH_SSE
    // the same bounds as bounds(), 4 at a time (the compiler leaves the scalar loops unvectorised)
    const __m128 cqv = _mm_set1_ps(cq), tv = _mm_set1_ps(tiny), th = _mm_set1_ps(thr);
    const __m128 absm = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    int any = 0;
    for (int i = 0; i < kG; i += 4) {
      const __m128 av = _mm_loadu_ps(a + j + i);
      __m128 m = _mm_add_ps(_mm_mul_ps(cqv, _mm_loadu_ps(kn + j + i)), tv), t = av;
      if (sc) {
        const __m128 sv = _mm_loadu_ps(sc + j + i);
        t = _mm_mul_ps(av, sv);
        m = _mm_add_ps(_mm_mul_ps(_mm_mul_ps(m, _mm_and_ps(sv, absm)), _mm_set1_ps(1.000001f)),
                       _mm_mul_ps(_mm_and_ps(t, absm), _mm_set1_ps(2.5e-7f)));
      }
      const __m128 h = _mm_add_ps(t, m);
      _mm_storeu_ps(lo + i, _mm_sub_ps(t, m));
      _mm_storeu_ps(hi + i, h);
      any |= _mm_movemask_ps(_mm_cmpnlt_ps(h, th));  // !(h < thr): NaN counts
    }
#else
    bounds(j, kG);
    int any = 0;
    for (int i = 0; i < kG; ++i) any |= !(hi[i] < thr);
#endif
    if (!any) continue;
    for (int i = 0; i < kG; ++i) consider(j + i, lo[i], hi[i]);
  }
  if (j < nb) {
    const int n = static_cast<int>(nb - j);
    bounds(j, n);
    for (int i = 0; i < n; ++i) consider(j + i, lo[i], hi[i]);
  }
  st.nlo = hp.n;
  if (hp.n == k && st.cand.size() > static_cast<size_t>(4 * k + 256)) {  // drop those the heap has passed
    size_t w = 0;
    for (const Cand& cd : st.cand)
      if (!(cd.s < thr)) st.cand[w++] = cd;
    st.cand.resize(w);
  }
}

// After a task's last block: its candidates scored exactly into its heap (index ascending, as scan_row offers).
template <typename T>
void rescore_candidates(const BlasQuery& st, int64_t k, const float* qrow, const T* keys, int64_t ldk, int64_t D,
                        const float* sc, int64_t base, Heap& hp) {
  const float lthr = st.nlo < k ? -std::numeric_limits<float>::infinity() : st.lo[0].s;
  for (const Cand& cd : st.cand) {
    if (cd.s < lthr) continue;  // passed by the heap after it was added
    const int64_t j = cd.i - base;
    float v = fma_chain(qrow, keys + j * ldk, D);
    if (sc) v *= sc[j];
    hp.offer(v, cd.i);
  }
}

#ifdef GK_SEARCH_X86
// ---- Register-blocked scoring: an fp32 GEMM on keys packed into panels of kNR keys ([d][kNR], fp16/bf16 upcast
// while packing, zero-padded; one panel at a time, just before it is scored), the contraction split in chunks of
// kKC so that a panel chunk (kKC x kNR floats = 16 KiB) stays in L1 while the query rows stream from L2. Every
// score is fp32 FMA chains over d ascending, one per chunk of kKC = kChain features, added into the score buffer
// in order (the summation order above), so a score does not depend on the tiling, the thread count, which other
// queries and keys are in the call, or the instruction set:
//  * AVX-512F: kMR = 14 queries x kNR = 32 keys per micro-tile (28 zmm accumulators). Measured on the project's
//    Zen 4 machine: ~1.6x MKL's sgemm on these shapes.
//  * AVX2 + FMA (CPUs without AVX-512: AMD Zen 1-3, Intel client parts): kMRAvx2 = 6 queries x 16 keys (half a
//    panel: 12 ymm accumulators + 2 key vectors + 1 broadcast of the 16 registers), the same FMAs in the same
//    order, so the same bits.
// Otherwise, or with GRADKIT_SEARCH_ISA=blas (GRADKIT_SEARCH_BLAS=1), BLAS blocks (at::mm_out) score the keys;
// GRADKIT_SEARCH_ISA=avx2 caps an AVX-512 CPU at the AVX2 kernel. Both are read per call (tests compare levels).
constexpr int kMR = 14;
constexpr int kMRAvx2 = 6;
constexpr int kNR = 32;
constexpr int64_t kKC = kChain;  // a contraction chunk is a chain (see kChain)

// 2: AVX-512 micro-kernel, 1: AVX2 micro-kernel, 0: BLAS blocks.
int packed_isa() { return capped_simd_level("GRADKIT_SEARCH_ISA", "blas", "GRADKIT_SEARCH_BLAS"); }

template <int MR>
__attribute__((target("avx512f"))) void micro(const float* __restrict__ A, int64_t lda, const float* __restrict__ Bp,
                                              int64_t kc, float* __restrict__ C, int64_t ldc, bool acc) {
  __m512 c0[MR], c1[MR];  // this chunk's chains, from 0; added to C's sums (acc) at the end
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm512_setzero_ps();
    c1[r] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < kc; ++d) {
    const __m512 b0 = _mm512_loadu_ps(Bp + d * kNR), b1 = _mm512_loadu_ps(Bp + d * kNR + 16);
#pragma GCC unroll 14
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + d]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * ldc, acc ? _mm512_add_ps(_mm512_loadu_ps(C + r * ldc), c0[r]) : c0[r]);
    _mm512_storeu_ps(C + r * ldc + 16, acc ? _mm512_add_ps(_mm512_loadu_ps(C + r * ldc + 16), c1[r]) : c1[r]);
  }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

// {make(1), ..., make(R)}: a micro-kernel's instances for 1 .. R rows, indexed by rows - 1.
template <int R, typename Make, int... I>
constexpr auto rows_table(Make make, std::integer_sequence<int, I...>) {
  return std::array{make(std::integral_constant<int, I + 1>{})...};
}
template <int R, typename Make>
constexpr auto rows_table(Make make) {
  return rows_table<R>(make, std::make_integer_sequence<int, R>{});
}
const auto kMicro = rows_table<kMR>([](auto r) -> MicroFn { return &micro<decltype(r)::value>; });

// C[r, 0..16) (+)= A[r] . B[:, half of a panel] for r < MR: the AVX-512 micro-kernel's FMA chain, 8 keys per ymm.
// A is a packed query panel: A[d * lda + r] (lda = kMRAvx2), so the broadcasts walk one stream.
template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2(const float* __restrict__ A, int64_t lda,
                                                    const float* __restrict__ Bp, int64_t kc, float* __restrict__ C,
                                                    int64_t ldc, bool acc) {
  __m256 c0[MR], c1[MR];  // every loop over r fully unrolled: GCC keeps the arrays in registers only then
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {  // this chunk's chains, from 0; added to C's sums (acc) at the end
    c0[r] = _mm256_setzero_ps();
    c1[r] = _mm256_setzero_ps();
  }
  for (int64_t d = 0; d < kc; ++d) {
    const __m256 b0 = _mm256_loadu_ps(Bp + d * kNR), b1 = _mm256_loadu_ps(Bp + d * kNR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + d * lda + r);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(C + r * ldc, acc ? _mm256_add_ps(_mm256_loadu_ps(C + r * ldc), c0[r]) : c0[r]);
    _mm256_storeu_ps(C + r * ldc + 8, acc ? _mm256_add_ps(_mm256_loadu_ps(C + r * ldc + 8), c1[r]) : c1[r]);
  }
}

const auto kMicroAvx2 = rows_table<kMRAvx2>([](auto r) -> MicroFn { return &micro_avx2<decltype(r)::value>; });

// 8 consecutive key values widened exactly to fp32 (F16C for float16; bfloat16 is the high half of an fp32).
__attribute__((target("avx2,f16c"))) inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
__attribute__((target("avx2,f16c"))) inline __m256 load8(const at::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
__attribute__((target("avx2,f16c"))) inline __m256 load8(const at::BFloat16* x) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// r[i] = 8 values of row i  ->  r[i] = value i of rows 0 .. 7 (an in-register 8 x 8 transpose).
__attribute__((target("avx2"))) inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // r[i] (i < 4): value i of rows 0-3 (low half) and value i + 4 of rows 0-3 (high half); r[4 + i]: rows 4-7
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// Keys rows [0, jn) (jn <= kNR; row stride ldk, D columns, dtype T) -> one panel dst[D][kNR] fp32, zero-padded.
// 8 keys x 8 features at a time through transpose8 (a scalar loop's one strided store per value cost as much as
// the scoring for a few queries). Only called on CPUs with AVX2 (both packed levels).
template <typename T>
__attribute__((target("avx2,f16c"))) void pack_panel(const T* keys, int64_t ldk, int64_t jn, int64_t D, float* dst) {
  int64_t j8 = 0;
  for (; j8 + 8 <= jn; j8 += 8) {
    const T* src = keys + j8 * ldk;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(src + i * ldk + d);
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (d + i) * kNR + j8, r[i]);
    }
    for (int64_t jj = j8; jj < j8 + 8; ++jj)
      for (int64_t dd = d; dd < D; ++dd) dst[dd * kNR + jj] = static_cast<float>(keys[jj * ldk + dd]);
  }
  for (int64_t jj = j8; jj < jn; ++jj)
    for (int64_t d = 0; d < D; ++d) dst[d * kNR + jj] = static_cast<float>(keys[jj * ldk + d]);
  for (int64_t jj = jn; jj < kNR; ++jj)
    for (int64_t d = 0; d < D; ++d) dst[d * kNR + jj] = 0.0f;
}

// Fewer queries than an AVX2 micro-tile (NQ < kMRAvx2): packing a panel would cost as much as scoring it, so
// keys are transposed 8 x 8 in registers and scored at once, S[r, j] = the same fp32 FMA chain over d
// ascending as the packed kernels (the same bits), 8 keys per ymm; the last nb % 8 keys one chain at a time.
template <int NQ, typename T>
__attribute__((target("avx2,fma,f16c"))) void score_direct(const float* q, int64_t ldq, const T* keys, int64_t ldk,
                                                           int64_t nb, int64_t D, float* S, int64_t lds) {
  int64_t j8 = 0;
  for (; j8 + 8 <= nb; j8 += 8) {
    const T* src = keys + j8 * ldk;
    __m256 tot[NQ], acc[NQ];
    for (int64_t d0 = 0; d0 < D; d0 += kChain) {  // kChain is a multiple of 8: only the last chunk has a tail
      const int64_t d1 = std::min<int64_t>(D, d0 + kChain);
#pragma GCC unroll 8
      for (int r = 0; r < NQ; ++r) acc[r] = _mm256_setzero_ps();
      int64_t d = d0;
      for (; d + 8 <= d1; d += 8) {
        __m256 v[8];
        for (int i = 0; i < 8; ++i) v[i] = load8(src + i * ldk + d);
        transpose8(v);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i)
#pragma GCC unroll 8
          for (int r = 0; r < NQ; ++r)
            acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + r * ldq + d + i), v[i], acc[r]);
      }
      for (; d < d1; ++d) {
        alignas(32) float col[8];
        for (int i = 0; i < 8; ++i) col[i] = static_cast<float>(src[i * ldk + d]);
        const __m256 v = _mm256_load_ps(col);
#pragma GCC unroll 8
        for (int r = 0; r < NQ; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + r * ldq + d), v, acc[r]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < NQ; ++r) tot[r] = d0 ? _mm256_add_ps(tot[r], acc[r]) : acc[r];
    }
    if (D == 0)
      for (int r = 0; r < NQ; ++r) tot[r] = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < NQ; ++r) _mm256_storeu_ps(S + r * lds + j8, tot[r]);
  }
  for (; j8 < nb; ++j8)
    for (int r = 0; r < NQ; ++r) S[r * lds + j8] = exact_dot(q + r * ldq, keys + j8 * ldk, D);
}

// S[r, j] (row stride lds, columns rounded up to kNR) = q[r] . key[j] for r < nq, j < nb (keys rows of dtype T,
// stride ldk). Fewer than kMRAvx2 queries: score_direct. Otherwise each panel of kNR keys is packed into `panel`
// (D x kNR fp32, L1/L2-resident) just before its micro-tiles run; isa 2: AVX-512 micro-tiles (kMR x kNR),
// 1: AVX2 (kMRAvx2 x kNR / 2, a panel as two halves, queries packed into `qpack` panels of kMRAvx2).
template <typename T>
void score_packed(int isa, const float* q, int64_t ldq, int64_t nq, const T* keys, int64_t ldk, int64_t nb,
                  int64_t D, float* S, int64_t lds, float* panel, float* qpack) {
  using DirectFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, int64_t, float*, int64_t);
  static const auto direct =
      rows_table<kMRAvx2 - 1>([](auto r) -> DirectFn { return &score_direct<decltype(r)::value, T>; });
  if (nq < kMRAvx2) {
    direct[nq - 1](q, ldq, keys, ldk, nb, D, S, lds);
    return;
  }
  if (isa == 1) {  // queries -> panels of kMRAvx2: qpack[g][d][kMRAvx2] (zero-padded)
    const int64_t ng = (nq + kMRAvx2 - 1) / kMRAvx2;
    for (int64_t g = 0; g < ng; ++g)
      for (int64_t r = 0; r < kMRAvx2; ++r) {
        float* dst = qpack + g * D * kMRAvx2 + r;
        if (g * kMRAvx2 + r < nq) {
          const float* src = q + (g * kMRAvx2 + r) * ldq;
          for (int64_t d = 0; d < D; ++d) dst[d * kMRAvx2] = src[d];
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d * kMRAvx2] = 0.0f;
        }
      }
  }
  const int64_t np = (nb + kNR - 1) / kNR;
  for (int64_t p = 0; p < np; ++p) {
    pack_panel(keys + p * kNR * ldk, ldk, std::min<int64_t>(kNR, nb - p * kNR), D, panel);
    for (int64_t d0 = 0; d0 < D; d0 += kKC) {
      const int64_t kc = std::min<int64_t>(kKC, D - d0);
      const float* B = panel + d0 * kNR;
      if (isa == 2) {
        for (int64_t r0 = 0; r0 < nq; r0 += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, nq - r0));
          kMicro[mr - 1](q + r0 * ldq + d0, ldq, B, kc, S + r0 * lds + p * kNR, lds, d0 > 0);
        }
        continue;
      }
      for (int64_t h = 0; h < kNR; h += 16)
        for (int64_t r0 = 0; r0 < nq; r0 += kMRAvx2) {
          const int mr = static_cast<int>(std::min<int64_t>(kMRAvx2, nq - r0));
          kMicroAvx2[mr - 1](qpack + r0 * D + d0 * kMRAvx2, kMRAvx2, B + h, kc, S + r0 * lds + p * kNR + h, lds,
                             d0 > 0);
        }
    }
  }
}

// ---- bf16 screening (CPUs with AVX512-BF16): approximate scores a from bf16-rounded queries and keys
// (vdpbf16ps: twice the fp32 FMA rate), then the exact fp32 score only for keys that can still enter the
// heap. With u = 2^-8 (bf16 rounding: 8-bit significand), g = D 2^-24 (fp32 accumulation, either side):
//     |exact - a| <= m = kappa ||q|| ||x||,   kappa = (2u + u^2 + 2 g (1 + u)^2) * 1.01   (+ a tiny
// absolute term for flushed subnormal products), so a key whose a + m is below the heap's worst exact
// score cannot enter and is skipped. Every score that reaches the heap is the exact fp32 score, computed
// by the same FMA chain (d ascending from 0) as the fp32 micro-kernel, and keys are offered in index
// order: the result is bitwise that of the fp32 path. Blocks with non-finite or huge values (|q| |x| >
// 1e36: bf16 partial sums could overflow) and calls with non-finite queries take the fp32 path.
// GRADKIT_SEARCH_EXACT=1 disables the screen.
// Whether a call of N keys keeping k per query screens: on CPUs with AVX512-BF16, unless GRADKIT_SEARCH_EXACT=1,
// where the keys are many per kept score (N >= 1500 k, see the call site), or always with GRADKIT_SEARCH_SCREEN=1
// (tests: the screen on small calls). Both read per call: tests compare the paths.
bool use_bf16_screen(int64_t N, int64_t k) {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  if (!cpu) return false;
  const char* env = std::getenv("GRADKIT_SEARCH_EXACT");
  if (env && std::strcmp(env, "1") == 0) return false;
  const char* force = std::getenv("GRADKIT_SEARCH_SCREEN");
  return (force && std::strcmp(force, "1") == 0) || N >= 1500 * k;
}

inline uint16_t to_bf16(float v) {  // round to nearest even (finite inputs)
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

constexpr double kHuge = 1e18;  // per side: |q| |x| <= 1e36, so bf16 partial sums never overflow

template <int MR>
__attribute__((target("avx512f,avx512bf16"))) void micro_bf16(const uint32_t* __restrict__ A, int64_t lda,
                                                              const uint32_t* __restrict__ Bh, int64_t kp,
                                                              float* __restrict__ C, int64_t ldc) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < kp; ++d) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bh + d * kNR), b1 = (__m512bh)_mm512_loadu_si512(Bh + d * kNR + 16);
#pragma GCC unroll 14
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * lda + d]));
      c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(C + r * ldc, c0[r]);
    _mm512_storeu_ps(C + r * ldc + 16, c1[r]);
  }
}

using MicroBf16Fn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t);
const auto kMicroBf16 = rows_table<kMR>([](auto r) -> MicroBf16Fn { return &micro_bf16<decltype(r)::value>; });

// One row of D floats -> (D + 1) / 2 bf16 pairs at dst[d * stride] (a zero pads odd D); returns an upper
// bound of its 2-norm (fp32 sum of squares inflated by its rounding bound, then sqrt rounded up).
__attribute__((target("avx512f,avx512bf16"))) double pack_row_bf16(const float* x, int64_t D, uint32_t* dst,
                                                                  int64_t stride) {
  const int64_t D2 = (D + 1) / 2;
  __m512 acc = _mm512_setzero_ps();
  alignas(64) uint32_t tmp[16];
  int64_t d = 0;
  for (; d + 32 <= 2 * D2 && d + 32 <= D; d += 32) {
    const __m512 lo = _mm512_loadu_ps(x + d), hi = _mm512_loadu_ps(x + d + 16);
    acc = _mm512_fmadd_ps(lo, lo, acc);
    acc = _mm512_fmadd_ps(hi, hi, acc);
    _mm512_store_si512(tmp, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    for (int t = 0; t < 16; ++t) dst[(d / 2 + t) * stride] = tmp[t];
  }
  double n2 = static_cast<double>(_mm512_reduce_add_ps(acc));
  for (; d < 2 * D2; d += 2) {
    const float v0 = x[d], v1 = d + 1 < D ? x[d + 1] : 0.0f;
    n2 += static_cast<double>(v0) * v0 + static_cast<double>(v1) * v1;
    dst[(d / 2) * stride] = static_cast<uint32_t>(to_bf16(v0)) | (static_cast<uint32_t>(to_bf16(v1)) << 16);
  }
  // fp32 partial sums: relative error <= (D + 16) 2^-24 (generous); sqrt and the cast rounded up
  n2 *= 1.0 + static_cast<double>(D + 32) * std::ldexp(1.0, -23);
  return std::sqrt(n2) * (1.0 + std::ldexp(1.0, -40));
}

// keys rows [0, nb) -> bf16 pair panels [ceil(nb / kNR)][Dp / 2][kNR] (uint32 = 2 bf16, d even in the low
// half), zero-padded, and their norms (rounded up). Returns false when a key is non-finite or huge.
template <typename T>
bool pack_keys_bf16(const T* keys, int64_t ldk, int64_t nb, int64_t D, uint32_t* Bh, float* norms) {
  const int64_t np = (nb + kNR - 1) / kNR, D2 = (D + 1) / 2;
  bool ok = true;
  std::vector<float> row(static_cast<size_t>(2 * D2 + 32), 0.0f);
  for (int64_t p = 0; p < np; ++p) {
    uint32_t* dst = Bh + p * D2 * kNR;
    for (int64_t jj = 0; jj < kNR; ++jj) {
      const int64_t j = p * kNR + jj;
      if (j >= nb) {
        for (int64_t d = 0; d < D2; ++d) dst[d * kNR + jj] = 0u;
        continue;
      }
      const T* src = keys + j * ldk;
      const float* fr;
      if constexpr (std::is_same_v<T, float>) {
        if (D % 2 == 0) {
          fr = src;
        } else {
          std::memcpy(row.data(), src, D * sizeof(float));
          fr = row.data();
        }
      } else {
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d]);
        fr = row.data();
      }
      const double nrm = pack_row_bf16(fr, D, dst + jj, kNR);
      if (!(nrm <= kHuge)) ok = false;  // NaN / inf / huge
      norms[j] = static_cast<float>(std::min(nrm, kHuge));
    }
  }
  return ok;
}

// Offer the keys of one row whose approximate score a[j] (+ margin cq kn[j] + tiny) can reach the heap,
// scored exactly. The margin already carries 1% slack, far above the rounding of the sums below.
template <typename T>
__attribute__((target("avx512f,fma"))) void scan_row_screened(const float* a, int64_t nb, const float* kn, float cq,
                                                          const float* sc, const float* qrow, const T* keys,
                                                          int64_t ldk, int64_t D, float tiny, int64_t idx0,
                                                          Heap& hp) {
  if (hp.k == 0) return;
  auto exact = [&](int64_t j) {
    float v = exact_dot(qrow, keys + j * ldk, D);
    if (sc) v *= sc[j];
    return v;
  };
  int64_t j = 0;
  for (; hp.n < hp.k && j < nb; ++j) hp.offer_fill(exact(j), idx0 + j);
  if (j >= nb) return;
  float thr = hp.h[0].s;
  auto consider = [&](int64_t jj) {
    const float v = exact(jj);
    if (v > thr) {  // NaN never passes
      hp.replace_top(v, idx0 + jj);
      thr = hp.h[0].s;
    }
  };
  if (sc) {  // scaled scores: |exact - a| sc <= m |sc|, plus the product's rounding
    for (; j < nb; ++j) {
      const float t = a[j] * sc[j];
      const float m = (cq * kn[j] + tiny) * std::fabs(sc[j]) * 1.000001f + std::fabs(t) * 2.5e-7f;
      // skipped only when the bound is below the threshold: a huge or infinite scale can overflow a * sc to
      // -inf (the approximation of the wrong sign) and the margin to +inf, and -inf + inf is NaN
      if (!(t + m < thr)) consider(j);
    }
    return;
  }
  for (; j < nb && (j & 15); ++j)
    if (a[j] + (cq * kn[j] + tiny) >= thr) consider(j);
  const __m512 cqv = _mm512_set1_ps(cq), tv = _mm512_set1_ps(tiny);
  for (; j + 16 <= nb; j += 16) {
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(a + j), _mm512_fmadd_ps(cqv, _mm512_loadu_ps(kn + j), tv));
    __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_GE_OQ);
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      const float before = thr;
      consider(j + b);
      if (thr != before) {  // the threshold rose: re-test the rest of this group
        const __mmask16 rest = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_GE_OQ);
        m &= rest;
      }
    }
  }
  for (; j < nb; ++j)
    if (a[j] + (cq * kn[j] + tiny) >= thr) consider(j);
}
#endif

std::tuple<Tensor, Tensor> score_topk_cpu(const Tensor& queries_in, const Tensor& keys_in, int64_t k, bool largest,
                                          const std::optional<Tensor>& key_scale_in,
                                          const std::optional<Tensor>& scores_in,
                                          const std::optional<Tensor>& idx_in, int64_t base) {
  check_score_topk(queries_in, keys_in, k, key_scale_in, scores_in, idx_in, base);
  const int64_t Q = queries_in.size(0), D = queries_in.size(1), N = keys_in.size(0);
  const float pad = largest ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  Tensor out_s = at::empty({Q, k}, queries_in.options().dtype(at::kFloat));
  Tensor out_i = at::empty({Q, k}, queries_in.options().dtype(at::kLong));
  if (Q == 0 || k == 0) return {out_s, out_i};

  // smallest == largest of the negated scores
  // detached: the BLAS path's at::mm_out runs in at::parallel_for's workers, whose grad mode is on whatever the
  // caller's, and refused inputs that require grad ("functions with out=... arguments don't support automatic
  // differentiation"; session 43 review: every BLAS-path call with queries or keys requiring grad, even under no_grad)
  Tensor q = (largest ? queries_in.contiguous() : queries_in.neg().contiguous()).detach();  // neg() keeps the strides
  Tensor keys = ((keys_in.stride(1) == 1 || N == 0 || D == 0) ? keys_in : keys_in.contiguous()).detach();
  Tensor scale;
  if (key_scale_in.has_value()) scale = key_scale_in->contiguous().detach();
  const float* sc = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const bool f32 = keys.scalar_type() == at::kFloat;

  const int nthreads = std::max(1, at::get_num_threads());
  const int64_t nblocks = (N + kBlockKeys - 1) / kBlockKeys;
  // grid of about nthreads tasks: key chunks first (each task reads its keys once), then query groups
  int64_t kchunks = std::max<int64_t>(1, std::min<int64_t>(nthreads, nblocks));
  const int64_t blocks_per_chunk = std::max<int64_t>(1, (nblocks + kchunks - 1) / kchunks);
  kchunks = std::max<int64_t>(1, (nblocks + blocks_per_chunk - 1) / blocks_per_chunk);
  const int64_t qgroups = std::max<int64_t>(1, std::min<int64_t>(Q, (nthreads + kchunks - 1) / kchunks));
  const int64_t qper = (Q + qgroups - 1) / qgroups;

  // heaps[chunk][query][k]
  std::vector<Cand> heaps((size_t)(kchunks * Q * k));
  std::vector<int64_t> counts((size_t)(kchunks * Q), 0);

#ifdef GK_SEARCH_X86
  const int isa = D > 0 ? packed_isa() : 0;
  const bool packed = isa > 0;
  // bf16 screening (AVX-512 level only): worth it from a few dozen features on, and where the call's keys are many
  // per kept score (session 44, Zen 4, D = 256, 2 threads: with fewer than ~1500 keys per k, the keys that pass the
  // screen while the heaps fill are rescored one at a time: 64 queries x 10^4 keys took 4.0 / 14.8 / 71 ms screened
  // at k = 10 / 100 / 1000 against 2.7 / 5.9 / 20.5 exact; 10^5 keys at k = 10: 200 screened, 293 exact). Either
  // way the same bits; queries converted once
  bool screen = isa == 2 && D >= 16 && use_bf16_screen(N, k);
  const int64_t D2 = (D + 1) / 2;
  std::vector<uint32_t> qh;
  std::vector<float> qcq, qtiny;  // per query: margin = qcq * |x| + qtiny
  if (screen) {
    const float* qp = q.data_ptr<float>();
    qh.resize(static_cast<size_t>(Q * D2));
    qcq.resize(static_cast<size_t>(Q));
    qtiny.resize(static_cast<size_t>(Q));
    const double u = 1.0 / 256.0, g = static_cast<double>(D) * std::ldexp(1.0, -24);
    const double kappa = (2 * u + u * u + 2 * g * (1 + u) * (1 + u)) * 1.01;
    // + flushed subnormal inputs / products: 2^-126 (sqrt(D) (|q| + |x|) + 2D)
    const double sub = std::ldexp(1.0, -126), rd = std::sqrt(static_cast<double>(D));
    for (int64_t r = 0; r < Q && screen; ++r) {
      const double nrm = pack_row_bf16(qp + r * D, D, qh.data() + r * D2, 1);
      if (!(nrm <= kHuge)) screen = false;
      qcq[r] = static_cast<float>(kappa * nrm + sub * rd);
      qtiny[r] = static_cast<float>(sub * (rd * nrm + 2.0 * D) + 1e-37);
    }
  }
#else
  const bool packed = false;
  const bool screen = false;
#endif
  BlasBounds bounds;
  if (N > 0 && !packed) bounds.init(q.data_ptr<float>(), Q, D);
  if (N > 0) {
    at::parallel_for(0, kchunks * qgroups, 1, [&](int64_t t0, int64_t t1) {
      Tensor buf = (f32 || packed) ? Tensor() : at::empty({kBlockKeys, D}, q.options());
      Tensor sbuf = at::empty({std::min(kTileQ, qper), kBlockKeys}, q.options());
      std::vector<float> knb(packed ? 0 : static_cast<size_t>(kBlockKeys));  // BLAS blocks: key norms
#ifdef GK_SEARCH_X86
      Tensor pbuf = packed ? at::empty({kNR * D}, q.options()) : Tensor();
      Tensor qbuf = isa == 1 ? at::empty({(kTileQ + kMRAvx2) * D}, q.options()) : Tensor();
      std::vector<uint32_t> hbuf(screen ? static_cast<size_t>(kBlockKeys * D2) : 0);
      std::vector<float> knorm(screen ? static_cast<size_t>(kBlockKeys) : 0);
#endif
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t c = task / qgroups, g = task % qgroups;
        const int64_t q0 = g * qper, q1 = std::min(Q, q0 + qper);
        const int64_t b0 = c * blocks_per_chunk, b1 = std::min(nblocks, b0 + blocks_per_chunk);
        if (q0 >= q1) continue;
        std::vector<BlasQuery> bq(packed ? 0 : static_cast<size_t>(q1 - q0));
        for (auto& st : bq) st.lo.resize(static_cast<size_t>(k));
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t j0 = b * kBlockKeys, nb = std::min(kBlockKeys, N - j0);
#ifdef GK_SEARCH_X86
          const int64_t ldk = keys.stride(0);
          bool block_screen = false;
          if (screen)  // bf16 panels + norms; a block with non-finite / huge keys falls back to fp32
            block_screen = with_keys(keys, [&](auto kp) {
              return pack_keys_bf16(kp + j0 * ldk, ldk, nb, D, hbuf.data(), knorm.data());
            });
          if (block_screen) {
            for (int64_t qt = q0; qt < q1; qt += kTileQ) {
              const int64_t nq = std::min(kTileQ, q1 - qt);
              float* S = sbuf.data_ptr<float>();
              const int64_t lds = sbuf.stride(0);
              const int64_t np = (nb + kNR - 1) / kNR;
              for (int64_t p = 0; p < np; ++p)
                for (int64_t r0 = 0; r0 < nq; r0 += kMR) {
                  const int mr = static_cast<int>(std::min<int64_t>(kMR, nq - r0));
                  kMicroBf16[mr - 1](qh.data() + (qt + r0) * D2, D2, hbuf.data() + p * D2 * kNR, D2,
                                     S + r0 * lds + p * kNR, lds);
                }
              const float* qp = q.data_ptr<float>();
              for (int64_t r = 0; r < nq; ++r) {
                const int64_t qi = qt + r;
                Heap hp{heaps.data() + (c * Q + qi) * k, counts[c * Q + qi], k};
                const float* s2 = sc ? sc + j0 : nullptr;
                with_keys(keys, [&](auto kp) {
                  scan_row_screened(S + r * lds, nb, knorm.data(), qcq[qi], s2, qp + qi * D, kp + j0 * ldk, ldk, D,
                                    qtiny[qi], base + j0, hp);
                });
                counts[c * Q + qi] = hp.n;
              }
            }
            continue;
          }
#endif
          Tensor kb = keys.narrow(0, j0, nb);
          if (!f32 && !packed) {
            Tensor dst = buf.narrow(0, 0, nb);
            dst.copy_(kb);
            kb = dst;
          }
          Tensor kbt = kb.t();
          for (int64_t qt = q0; qt < q1; qt += kTileQ) {
            const int64_t nq = std::min(kTileQ, q1 - qt);
            float* S = sbuf.data_ptr<float>();
            const int64_t lds = sbuf.stride(0);
#ifdef GK_SEARCH_X86
            if (packed) {
              with_keys(keys, [&](auto kp) {
                score_packed(isa, q.data_ptr<float>() + qt * D, D, nq, kp + j0 * ldk, ldk, nb, D, S, lds,
                             pbuf.data_ptr<float>(), isa == 1 ? qbuf.data_ptr<float>() : nullptr);
              });
              for (int64_t r = 0; r < nq; ++r) {
                float* row = S + r * lds;
                if (sc) {
                  const float* s2 = sc + j0;
                  for (int64_t j = 0; j < nb; ++j) row[j] *= s2[j];
                }
                const int64_t qi = qt + r;
                Heap hp{heaps.data() + (c * Q + qi) * k, counts[c * Q + qi], k};
                scan_row(row, nb, base + j0, hp);
                counts[c * Q + qi] = hp.n;
              }
              continue;
            }
#endif
            Tensor sv = sbuf.narrow(0, 0, nq).narrow(1, 0, nb);
            at::mm_out(sv, q.narrow(0, qt, nq), kbt);
            // the block's key norms, after its first product has brought it into cache (a memory-bound product
            // of few queries would otherwise wait for memory twice)
            if (qt == q0) key_norms(kb.data_ptr<float>(), kb.stride(0), nb, D, knb.data());
            for (int64_t r = 0; r < nq; ++r) {
              const int64_t qi = qt + r;
              scan_row_bounds(S + r * lds, nb, knb.data(), bounds.cq[qi], bounds.tiny, sc ? sc + j0 : nullptr,
                              base + j0, k, bq[qi - q0]);
            }
          }
        }
        if (!packed) {  // the BLAS path: this task's candidates, scored exactly
          const float* qp = q.data_ptr<float>();
          const int64_t ldk_all = keys.stride(0);
          for (int64_t qi = q0; qi < q1; ++qi) {
            Heap hp{heaps.data() + (c * Q + qi) * k, counts[c * Q + qi], k};
            with_keys(keys, [&](auto kp) {
              rescore_candidates(bq[qi - q0], k, qp + qi * D, kp, ldk_all, D, sc, base, hp);
            });
            counts[c * Q + qi] = hp.n;
          }
        }
      }
    });
  }

  // merge the task heaps and the running top-k, per query
  const int64_t kin = scores_in.has_value() ? scores_in->size(1) : 0;
  Tensor sin, iin;
  if (kin > 0) {
    sin = scores_in->contiguous();
    iin = idx_in->contiguous();
  }
  float* os = out_s.data_ptr<float>();
  int64_t* oi = out_i.data_ptr<int64_t>();
  at::parallel_for(0, Q, 16, [&](int64_t a, int64_t e) {
    std::vector<Cand> cand;
    cand.reserve((size_t)(kchunks * k + kin));
    for (int64_t qi = a; qi < e; ++qi) {
      cand.clear();
      for (int64_t c = 0; c < kchunks; ++c) {
        const Cand* h = heaps.data() + (c * Q + qi) * k;
        cand.insert(cand.end(), h, h + counts[c * Q + qi]);
      }
      if (kin > 0) {
        const float* s = sin.data_ptr<float>() + qi * kin;
        const int64_t* ix = iin.data_ptr<int64_t>() + qi * kin;
        for (int64_t j = 0; j < kin; ++j) {
          if (ix[j] < 0) continue;
          cand.push_back(Cand{clean(largest ? s[j] : -s[j]), ix[j]});
        }
      }
      const int64_t m = std::min<int64_t>(k, (int64_t)cand.size());
      std::partial_sort(cand.begin(), cand.begin() + m, cand.end(), better);
      for (int64_t j = 0; j < k; ++j) {
        if (j < m) {
          // 0 - s, not -s: the negated GEMM sums from +0, so a zero score of -q is +0 and -(+0) would report
          // -0.0 where q . k (and the reference) give +0.0 (session 40); every nonzero score is the same
          os[qi * k + j] = largest ? cand[j].s : 0.0f - cand[j].s;
          oi[qi * k + j] = cand[j].i;
        } else {
          os[qi * k + j] = pad;
          oi[qi * k + j] = -1;
        }
      }
    }
  });
  return {out_s, out_i};
}

}  // namespace
}  // namespace search
}  // namespace gradkit

#ifndef GK_SEARCH_NO_REGISTER
TORCH_LIBRARY_IMPL(gradkit, CPU, m) {
  m.impl("score_topk", &gradkit::search::score_topk_cpu);
}
#else
// standalone prototype builds register the same function themselves
namespace gradkit_search_proto {
using gradkit::search::score_topk_cpu;
}
#endif

// CPU kernel of the obs family: independent OBS scoring and selection of the pruned blocks.
// Semantics: python/gradkit/kernels/reference/obs.py::obs_select (the definition).
//
// obs_select(w (n, nb) fp32, d (n, nb) fp32, gs, bk, num_prune, eps) -> int64 (n, nq * num_prune * bk)
//   nb = nq * gs * bk; block cost c = sum over the block's bk elements, in element order, of
//   w^2 / (d + eps) in fp32 (eps rounded to fp32, as torch does with a Python scalar); per
//   (row, scope) the num_prune blocks of lowest cost are pruned (equal costs: lower block index
//   first; a NaN cost ranks as +inf); the result lists, per row, the local positions of every
//   element of every pruned block, ascending.
//
// Layout of the work:
//  * every scope prunes exactly num_prune blocks, so scope s = row * nq + q owns the fixed output
//    slice [s * O, (s + 1) * O), O = num_prune * bk, and the input slice [s * E, (s + 1) * E),
//    E = gs * bk (inputs made contiguous). The problem is one flat range of n * nq scopes, split
//    over at::parallel_for; positions ascend within a row because scopes and, inside a scope,
//    blocks are emitted in order.
//  * per batch of scopes, the element terms w^2 / (d + eps) are computed in one straight loop the
//    compiler vectorises (no FMA contraction: -std=c++20, and no product feeds an addition). For
//    bk == 1 they are the costs; otherwise each block sums its terms in element order. NaN -> +inf.
//  * rank of block b = #{b' : c[b'] < c[b] or (c[b'] == c[b] and b' < b)}; pruned iff rank < num_prune.
//  * AVX2 path (x86-64 with AVX2, gs <= 32): tiles of 8 scopes. The tile's costs are transposed so
//    that one 8-lane vector holds block b of the 8 scopes (in-register shuffles for gs = 2, 4, 8;
//    a small copy otherwise, padded with +inf blocks up to G = 2, 4, 8, 16 or 32: a padding block
//    ranks after every real one, so real ranks are unchanged and padding is never pruned). The
//    ranks come from G (G - 1) / 2 vector compares (c_i <= c_j: i ranks before j), the pruned set
//    of each scope is a G-bit mask, and its np positions are written by count-trailing-zeros (a
//    loop of exactly np iterations: no data-dependent branch).
//  * portable path (other CPUs, or GRADKIT_OBS_SCALAR=1, read once): gs <= 16 the same ranks by
//    branch-free scalar compares, unrolled for gs in {2, 4, 8, 16}, and a branch-free emission (the
//    position is stored at the write cursor, which advances only for pruned blocks; stores are
//    bounded by the end of the task's own output range).
//  * gs > 32 (both paths): std::nth_element on (cost, index) pairs, O(gs) per scope.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../obs_schur.h"
#include "../obs_select_checks.h"
#include "../obs_shared.h"
#include "../obs_sweep.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define GK_OBS_AVX2 1
#endif

namespace gradkit {
namespace obs {
namespace {

using at::Tensor;

constexpr int64_t kBuf = 2048;            // costs per batch (floats)
constexpr int64_t kGrainElems = 1 << 15;  // elements per parallel task at least
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Args {
  const float* w;
  const float* d;
  int64_t* out;
  int64_t nq, gs, bk, np;
  float eps;
};

// Scratch of one task: the costs of a batch of scopes (natural layout) and, for bk > 1, their terms.
struct Scratch {
  int64_t per;  // scopes per batch
  std::vector<float> c, t;
  std::vector<int> pr;
  std::vector<int32_t> idx;
  Scratch(const Args& A, int64_t align) {
    const int64_t E = A.gs * A.bk;
    per = std::max<int64_t>(align, (kBuf / E) / align * align);
    c.resize(per * A.gs);
    if (A.bk > 1) t.resize(per * E);
    pr.resize(A.gs);
  }
};

// Costs of scopes [sb, sb + ns) into S.c (natural layout: scope-major, gs per scope), NaN -> +inf.
__attribute__((always_inline)) inline void batch_costs(const Args& A, Scratch& S, int64_t sb, int64_t ns) {
  const int64_t gs = A.gs, bk = A.bk, E = gs * bk;
  const float* __restrict__ w = A.w + sb * E;
  const float* __restrict__ d = A.d + sb * E;
  const float eps = A.eps;
  float* __restrict__ c = S.c.data();
  if (bk == 1) {
    for (int64_t i = 0; i < ns * gs; ++i) {
      const float v = w[i] * w[i] / (d[i] + eps);
      c[i] = v != v ? kInf : v;
    }
    return;
  }
  float* __restrict__ t = S.t.data();
  for (int64_t i = 0; i < ns * E; ++i) t[i] = w[i] * w[i] / (d[i] + eps);
  for (int64_t b = 0; b < ns * gs; ++b) {
    const float* tb = t + b * bk;
    float acc = tb[0];
    for (int64_t j = 1; j < bk; ++j) acc = acc + tb[j];
    c[b] = acc != acc ? kInf : acc;
  }
}

// ----------------------------------------------------------------------------- selection, portable

template <int GS>
inline void flags_fixed(const float* c, int64_t np, int* pr) {
#pragma GCC unroll 16
  for (int b = 0; b < GS; ++b) {
    int r = 0;
#pragma GCC unroll 16
    for (int b2 = 0; b2 < GS; ++b2) r += b2 < b ? (c[b2] <= c[b]) : (c[b2] < c[b]);
    pr[b] = r < np;
  }
}

inline void flags_small(const float* c, int64_t gs, int64_t np, int* pr) {
  for (int64_t b = 0; b < gs; ++b) {
    int r = 0;
    for (int64_t b2 = 0; b2 < b; ++b2) r += c[b2] <= c[b];
    for (int64_t b2 = b + 1; b2 < gs; ++b2) r += c[b2] < c[b];
    pr[b] = r < np;
  }
}

inline void flags_large(const float* c, int64_t gs, int64_t np, int* pr, std::vector<int32_t>& idx) {
  std::fill(pr, pr + gs, 0);
  idx.resize(gs);
  for (int64_t b = 0; b < gs; ++b) idx[b] = static_cast<int32_t>(b);
  if (np < gs) {
    std::nth_element(idx.begin(), idx.begin() + (np - 1), idx.end(), [c](int32_t a, int32_t b) {
      return c[a] < c[b] || (c[a] == c[b] && a < b);
    });
  }
  for (int64_t j = 0; j < np; ++j) pr[idx[j]] = 1;
}

// Scopes [s0, s1) of the flat (row, scope) range, one scope at a time. GS > 0: gs == GS.
template <int GS>
void run_range_scalar(const Args& A, int64_t s0, int64_t s1) {
  const int64_t gs = GS > 0 ? GS : A.gs;
  const int64_t bk = A.bk, np = A.np, E = gs * bk, O = np * bk;
  Scratch S(A, 1);
  int* pr = S.pr.data();
  int64_t* o = A.out + s0 * O;
  const int64_t kend = (s1 - s0) * O;
  int64_t k = 0;
  int64_t q = s0 % A.nq;
  for (int64_t sb = s0; sb < s1; sb += S.per) {
    const int64_t ns = std::min(S.per, s1 - sb);
    batch_costs(A, S, sb, ns);
    for (int64_t s = 0; s < ns; ++s) {
      const float* c = S.c.data() + s * gs;
      if constexpr (GS > 0) {
        flags_fixed<GS>(c, np, pr);
      } else if (gs <= 16) {
        flags_small(c, gs, np, pr);
      } else {
        flags_large(c, gs, np, pr, S.idx);
      }
      const int64_t base = q * E;
      if (bk == 1) {
        for (int64_t b = 0; b < gs; ++b) {
          if (k < kend) o[k] = base + b;
          k += pr[b];
        }
      } else {
        for (int64_t b = 0; b < gs; ++b) {
          if (pr[b]) {
            for (int64_t j = 0; j < bk; ++j) o[k + j] = base + b * bk + j;
            k += bk;
          }
        }
      }
      if (++q == A.nq) q = 0;
    }
  }
  TORCH_INTERNAL_ASSERT(k == kend, "obs_select: emitted ", k, " positions, expected ", kend);
}

// ----------------------------------------------------------------------------- selection, AVX2

#ifdef GK_OBS_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")

// Block columns of a tile of 8 scopes (costs c, natural layout, gs == G): col[b] lane l holds block
// b of scope lane_scope(l). Returns the permutation index that puts lanes back in scope order.
template <int G>
inline __m256i transpose_tile(const float* c, __m256* col) {
  if constexpr (G == 2) {
    const __m256 r0 = _mm256_loadu_ps(c), r1 = _mm256_loadu_ps(c + 8);
    col[0] = _mm256_shuffle_ps(r0, r1, _MM_SHUFFLE(2, 0, 2, 0));  // scopes 0 1 4 5 | 2 3 6 7
    col[1] = _mm256_shuffle_ps(r0, r1, _MM_SHUFFLE(3, 1, 3, 1));
    return _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  } else if constexpr (G == 4) {
    const __m256 r0 = _mm256_loadu_ps(c), r1 = _mm256_loadu_ps(c + 8), r2 = _mm256_loadu_ps(c + 16),
                 r3 = _mm256_loadu_ps(c + 24);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    col[0] = _mm256_shuffle_ps(t0, t2, 0x44);  // scopes 0 2 4 6 | 1 3 5 7
    col[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    col[2] = _mm256_shuffle_ps(t1, t3, 0x44);
    col[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
    return _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  } else {
    static_assert(G == 8, "in-register transposes exist for G = 2, 4, 8");
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(c + 8 * i);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int h = 0; h < 8; h += 4) {
      u[h + 0] = _mm256_shuffle_ps(t[h + 0], t[h + 2], 0x44);
      u[h + 1] = _mm256_shuffle_ps(t[h + 0], t[h + 2], 0xEE);
      u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
      u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      col[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      col[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
    return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  }
}

// Scopes [s0, s1), tiles of 8 scopes, blocks padded to G (gs <= G <= 32).
template <int G>
void run_range_avx2(const Args& A, int64_t s0, int64_t s1) {
  const int64_t gs = A.gs, bk = A.bk, np = A.np, E = gs * bk;
  const bool shuffled = gs == G && G <= 8;
  Scratch S(A, 8);
  int64_t* o = A.out + s0 * np * bk;
  int64_t q = s0 % A.nq;
  const __m256i npv = _mm256_set1_epi32(static_cast<int>(np));
  alignas(32) float tmp[G][8];
  alignas(32) uint32_t m[8];
  for (int64_t sb = s0; sb < s1; sb += S.per) {
    const int64_t ns = std::min(S.per, s1 - sb);
    batch_costs(A, S, sb, ns);
    const int64_t ns8 = (ns + 7) / 8 * 8;
    std::fill(S.c.data() + ns * gs, S.c.data() + ns8 * gs, kInf);  // padding scopes (never emitted)
    for (int64_t t0 = 0; t0 < ns; t0 += 8) {
      const float* c = S.c.data() + t0 * gs;
      __m256 col[G];
      __m256i perm;
      if constexpr (G <= 8) {
        if (shuffled) {
          perm = transpose_tile<G>(c, col);
        }
      }
      if (!shuffled) {
        for (int b = 0; b < G; ++b)
          for (int l = 0; l < 8; ++l) tmp[b][l] = b < gs ? c[l * gs + b] : kInf;
        for (int b = 0; b < G; ++b) col[b] = _mm256_load_ps(tmp[b]);
        perm = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      }
      __m256i rank[G];
#pragma GCC unroll 32
      for (int b = 0; b < G; ++b) rank[b] = _mm256_set1_epi32(G - 1 - b);
#pragma GCC unroll 32
      for (int i = 0; i < G; ++i) {
#pragma GCC unroll 32
        for (int j = i + 1; j < G; ++j) {
          // x = -1 where c_i <= c_j: i ranks before j (NaN is +inf already, so ordered compares)
          const __m256i x = _mm256_castps_si256(_mm256_cmp_ps(col[i], col[j], _CMP_LE_OQ));
          rank[i] = _mm256_add_epi32(rank[i], x);
          rank[j] = _mm256_sub_epi32(rank[j], x);
        }
      }
      __m256i mask = _mm256_setzero_si256();
#pragma GCC unroll 32
      for (int b = 0; b < G; ++b) {
        const __m256i p = _mm256_cmpgt_epi32(npv, rank[b]);
        mask = _mm256_or_si256(mask, _mm256_and_si256(p, _mm256_set1_epi32(static_cast<int>(1u << b))));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(m), _mm256_permutevar8x32_epi32(mask, perm));
      const int64_t nl = std::min<int64_t>(8, ns - t0);
      for (int64_t l = 0; l < nl; ++l) {
        uint32_t mm = m[l];
        const int64_t base = q * E;
        if (bk == 1) {
          for (int64_t j = 0; j < np; ++j) {
            o[j] = base + __builtin_ctz(mm);
            mm &= mm - 1;
          }
        } else {
          for (int64_t j = 0; j < np; ++j) {
            const int64_t p0 = base + static_cast<int64_t>(__builtin_ctz(mm)) * bk;
            for (int64_t e = 0; e < bk; ++e) o[j * bk + e] = p0 + e;
            mm &= mm - 1;
          }
        }
        o += np * bk;
        if (++q == A.nq) q = 0;
      }
    }
  }
}

#pragma GCC pop_options

bool use_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && !(std::getenv("GRADKIT_OBS_SCALAR") &&
                                                            std::strcmp(std::getenv("GRADKIT_OBS_SCALAR"), "1") == 0);
  return ok;
}
#endif

using RangeFn = void (*)(const Args&, int64_t, int64_t);

RangeFn pick(int64_t gs) {
#ifdef GK_OBS_AVX2
  if (use_avx2() && gs <= 32) {
    if (gs <= 2) return run_range_avx2<2>;
    if (gs <= 4) return run_range_avx2<4>;
    if (gs <= 8) return run_range_avx2<8>;
    if (gs <= 16) return run_range_avx2<16>;
    return run_range_avx2<32>;
  }
#endif
  switch (gs) {
    case 2: return run_range_scalar<2>;
    case 4: return run_range_scalar<4>;
    case 8: return run_range_scalar<8>;
    case 16: return run_range_scalar<16>;
    default: return run_range_scalar<0>;
  }
}

Tensor obs_select_cpu(const Tensor& w_in, const Tensor& d_in, int64_t gs, int64_t bk, int64_t num_prune,
                      double eps) {
  check_obs_select(w_in, d_in, gs, bk, num_prune, eps);
  const int64_t n = w_in.size(0), nb = w_in.size(1), E = gs * bk, nq = nb / E, O = num_prune * bk;
  Tensor out = at::empty({n, nq * O}, w_in.options().dtype(at::kLong));
  const int64_t S = n * nq;
  if (S == 0 || O == 0) return out;
  const Tensor w = w_in.contiguous(), d = d_in.contiguous();
  const Args A{w.data_ptr<float>(), d.data_ptr<float>(), out.data_ptr<int64_t>(), nq, gs, bk, num_prune,
               static_cast<float>(eps)};
  const RangeFn fn = pick(gs);
  at::parallel_for(0, S, std::max<int64_t>(1, kGrainElems / E), [&](int64_t s0, int64_t s1) { fn(A, s0, s1); });
  return out;
}

// obs_shared_prune (csrc/obs_shared.h has the definition): the (row, scope) pairs are one flat range
// over at::parallel_for, each computed by the shared per-scope core; results do not depend on threads.
std::tuple<Tensor, Tensor> obs_shared_prune_cpu(const Tensor& w_in, const Tensor& c_in, const Tensor& cinv_in,
                                                const Tensor& pidx_in, int64_t E, bool local) {
  GK_OBS_SHARED_CHECKS(w_in, c_in, cinv_in, pidx_in, E);
  const Tensor pidx = pidx_in.contiguous();
  GK_OBS_SHARED_CHECK_PIDX(pidx, E);
  const int64_t n = w_in.size(0), K = w_in.size(1), nq = K / E, ns = pidx.size(0), p = pidx.size(1);
  const Tensor w = w_in.contiguous(), c = c_in.contiguous(), cinv = cinv_in.contiguous();
  Tensor out = at::empty({n, K}, w.options());
  Tensor sub = at::empty({n, nq}, w.options().dtype(at::kLong));
  const int64_t S = n * nq;
  if (S == 0) return {out, sub};
  const float* wp = w.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* ip = cinv.data_ptr<float>();
  const int64_t* pp = pidx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  int64_t* sp = sub.data_ptr<int64_t>();
  const int64_t work = std::max<int64_t>(1, ns * p * p + E * (local ? p : 1));
  at::parallel_for(0, S, std::max<int64_t>(1, kGrainElems / work), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t q = s % nq;
      shared_prune_scope(wp + s * E, op + s * E, cp + q * E * K + q * E, K, ip + q * ns * p * p, pp, ns, p, E, local,
                         sp + s);
    }
  });
  return {out, sub};
}

// obs_schur_extend_: two batched GEMMs over BLAS (csrc/obs_schur.h). The products are large (m x cnt x F
// per row) and BLAS runs them near the FMA peak; a hand-written kernel would not add to that.
void obs_schur_extend_cpu(const Tensor& ut, const Tensor& xf, const Tensor& up, const Tensor& linv, int64_t cnt) {
  GK_OBS_SCHUR_CHECKS(ut, xf, up, linv, cnt);
  schur_extend_composite_(ut, xf, up, linv, cnt);
}

// obs_sweep_ (csrc/obs_sweep.h has the definition): the weight rows (w's columns) are independent, so m is cut
// into slices of kSweepCols that one thread sweeps through every step i: a slice of the block (n x 64 floats,
// 32 KiB at n = 128) stays in L1 across the steps, and each row update is one loop the compiler vectorises
// (-std=c++20: no FMA contraction, so w - u * e rounds the product, as the reference does).
constexpr int64_t kSweepCols = 64;

template <typename T>
void sweep_slice(T* w, int64_t ws, T* err, int64_t es, const T* u, int64_t u0, int64_t u1, const bool* pr, int64_t ps,
                 int64_t n, int64_t start, int64_t stop, int64_t c0, int64_t c1) {
  for (int64_t i = start; i < stop; ++i) {
    const T d = u[i * u0 + i * u1];
    T* __restrict__ wi = w + i * ws;
    T* __restrict__ ei = err + i * es;
    const bool* __restrict__ pi = pr + i * ps;
    for (int64_t c = c0; c < c1; ++c) {
      const T x = wi[c];
      const bool p = pi[c];
      ei[c] = p ? x / d : T(0);
      wi[c] = p ? T(0) : x;
    }
    for (int64_t j = i + 1; j < n; ++j) {
      const T uij = u[i * u0 + j * u1];
      T* __restrict__ wj = w + j * ws;
      for (int64_t c = c0; c < c1; ++c) wj[c] = wj[c] - uij * ei[c];
    }
  }
}

void obs_sweep_cpu(const Tensor& w, const Tensor& err, const Tensor& u, const Tensor& prune, int64_t start,
                   int64_t stop) {
  obs_sweep_checks(w, err, u, prune, start, stop);
  const int64_t n = w.size(0), m = w.size(1);
  if (start == stop || m == 0) return;
  const Tensor pr = prune.contiguous();
  const int64_t slices = (m + kSweepCols - 1) / kSweepCols;
  const int64_t work = std::max<int64_t>(1, (stop - start) * (n - start) * kSweepCols);  // element updates per slice
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "obs_sweep_", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* ep = err.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    const bool* pp = pr.data_ptr<bool>();
    at::parallel_for(0, slices, std::max<int64_t>(1, kGrainElems * 4 / work), [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s)
        sweep_slice<scalar_t>(wp, w.stride(0), ep, err.stride(0), up, u.stride(0), u.stride(1), pp, m, n, start,
                              stop, s * kSweepCols, std::min(m, (s + 1) * kSweepCols));
    });
  });
}

}  // namespace
}  // namespace obs
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CPU, m) {
  m.impl("obs_sweep_", &gradkit::obs::obs_sweep_cpu);
  m.impl("obs_select", &gradkit::obs::obs_select_cpu);
  m.impl("obs_shared_prune", &gradkit::obs::obs_shared_prune_cpu);
  m.impl("obs_schur_extend_", &gradkit::obs::obs_schur_extend_cpu);
}

// CPU kernels of the scope family: block norms, per-scope k-th largest, structured masks,
// in-place hard / soft thresholding. Semantics: python/gradkit/kernels/reference/scope.py.
//
// Every op walks the three-level layout of csrc/scope_layout.h (scope -> block -> element),
// parallel over scopes; each scope's block scores are computed once (one read of x), the
// selection runs on them in place (rank counting for small scopes, nth_element for large
// ones), and the result is written straight out (mask, zeroed blocks, per-scope value).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../scope_layout.h"
#include "out_pool.h"

#if defined(__SSE3__)
#include <pmmintrin.h>
#define GK_SSE3 1
#endif

namespace gradkit {
namespace scope {
namespace {

constexpr int64_t kSmallScope = 32;
constexpr bool kPrefetch = true;

enum class Score { Raw, Abs, P1, P2, PInf, PGen };

Score score_kind(bool raw, int64_t ne, double p) {
  if (raw) return Score::Raw;
  if (ne == 1) return Score::Abs;
  if (p == 1.0) return Score::P1;
  if (p == 2.0) return Score::P2;
  if (std::isinf(p)) return Score::PInf;
  return Score::PGen;
}

template <typename acc_t>
inline acc_t finalize(Score k, acc_t s, acc_t inv_p) {
  if (s < acc_t(0) && k != Score::Raw) return s;  // -inf: fewer than k valid scores in the scope
  switch (k) {
    case Score::P2: return std::sqrt(s);
    case Score::PGen: return std::pow(s, inv_p);
    default: return s;
  }
}

// Offsets of one level for one set: i * stride when the level is (at most) one dim, else a table.
struct Walk {
  bool flat = true;
  int64_t stride = 0;
  std::vector<int64_t> tab;
  Walk() = default;
  Walk(const Level& L, int set) {
    if (L.nd <= 1) {
      flat = true;
      stride = L.nd ? L.st[set][0] : 0;
    } else {
      flat = false;
      tab = level_offsets(L, set);
    }
  }
  inline int64_t operator[](int64_t i) const { return flat ? i * stride : tab[(size_t)i]; }
};

template <typename scalar_t, typename acc_t>
struct Scorer {
  Score kind;
  acc_t p, inv_p;
  int64_t ne;
  const Walk* elem;  // element offsets (set of the scored tensor)

  inline acc_t operator()(const scalar_t* b) const {
    const Walk& w = *elem;
    switch (kind) {
      case Score::Raw: return static_cast<acc_t>(b[0]);
      case Score::Abs: return std::abs(static_cast<acc_t>(b[0]));
      case Score::P1: {
        acc_t s = 0;
        for (int64_t e = 0; e < ne; ++e) s += std::abs(static_cast<acc_t>(b[w[e]]));
        return s;
      }
      case Score::P2: {
        acc_t s = 0;
        for (int64_t e = 0; e < ne; ++e) {
          acc_t v = static_cast<acc_t>(b[w[e]]);
          s += v * v;
        }
        return s;
      }
      case Score::PInf: {
        acc_t m = 0;
        bool nan = false;
        for (int64_t e = 0; e < ne; ++e) {
          acc_t v = std::abs(static_cast<acc_t>(b[w[e]]));
          nan |= std::isnan(v);
          m = v > m ? v : m;
        }
        return nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
      }
      case Score::PGen: {
        acc_t s = 0;
        for (int64_t e = 0; e < ne; ++e) s += std::pow(std::abs(static_cast<acc_t>(b[w[e]])), p);
        return s;
      }
    }
    return 0;
  }
};

// ---------------------------------------------------------------- selection on one scope

// Scope-local selection state, reused across the scopes a thread handles.
template <typename acc_t>
struct Selector {
  std::vector<acc_t> s;
  std::vector<uint8_t> keep;
  std::vector<int64_t> idx;  // block positions in the scope: a single scope may hold 2^31 blocks or more
  explicit Selector(int64_t nb) : s((size_t)nb), keep((size_t)nb) {}

  // better(a, b): a ranks before b (valid scores only).
  inline bool better(int64_t a, int64_t b) const { return s[a] > s[b] || (s[a] == s[b] && a < b); }

  void collect_valid(int64_t nb) {
    idx.clear();
    for (int64_t i = 0; i < nb; ++i)
      if (!std::isnan(s[i])) idx.push_back(i);
  }

  // keep[i] for the selection rules of the reference.
  void select(int64_t nb, int64_t nnz, bool keep_ties) {
    if (nb <= kSmallScope) {
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t si = s[i];
        if (std::isnan(si) || nnz == 0) {
          keep[i] = 0;
          continue;
        }
        int64_t r = 0;
        if (keep_ties) {
          for (int64_t j = 0; j < nb; ++j) r += s[j] > si;  // NaN compares false
        } else {
          for (int64_t j = 0; j < nb; ++j) r += (s[j] > si) | ((s[j] == si) & (j < i));
        }
        keep[i] = r < nnz;
      }
      return;
    }
    collect_valid(nb);
    std::fill(keep.begin(), keep.begin() + nb, (uint8_t)0);
    const int64_t nv = (int64_t)idx.size();
    if (nnz == 0) return;
    if (nnz >= nv) {
      for (auto i : idx) keep[i] = 1;
      return;
    }
    auto cmp = [this](int64_t a, int64_t b) { return better(a, b); };
    std::nth_element(idx.begin(), idx.begin() + (nnz - 1), idx.end(), cmp);
    if (keep_ties) {
      const acc_t kth = s[idx[nnz - 1]];
      for (int64_t i = 0; i < nb; ++i) keep[i] = s[i] >= kth;  // NaN compares false
    } else {
      for (int64_t r = 0; r < nnz; ++r) keep[idx[r]] = 1;
    }
  }

  // (v_k, v_{k+1}) among valid scores, -inf where missing.
  std::pair<acc_t, acc_t> kth(int64_t nb, int64_t k, bool want_next) {
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    collect_valid(nb);
    const int64_t nv = (int64_t)idx.size();
    acc_t vk = ninf, vk1 = ninf;
    if (nv >= k) {
      auto cmp = [this](int64_t a, int64_t b) { return better(a, b); };
      std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), cmp);
      vk = s[idx[k - 1]];
      if (want_next && nv > k) {
        vk1 = s[idx[k]];
        for (int64_t r = k + 1; r < nv; ++r) vk1 = std::max(vk1, s[idx[r]]);
      }
    }
    return {vk, vk1};
  }
};

template <typename F>
void for_scopes(const Layout& Y, int64_t work_per_scope, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_scope));
  at::parallel_for(0, Y.numscp, grain, [&](int64_t b, int64_t e) {
    Odometer o;
    o.init(Y.lv[0], b);
    f(b, e, o);
  });
}

std::vector<int64_t> to_vec(c10::IntArrayRef a) { return std::vector<int64_t>(a.begin(), a.end()); }

// A read-side tensor that shares x's storage, copied before x is written (scopes run in parallel and
// in tiles: a scope would otherwise score values another scope has already zeroed). Same rule as the
// CUDA host code (csrc/cuda/scope.cu).
at::Tensor detach_from(const at::Tensor& t, const at::Tensor& x) {
  if (t.numel() > 0 && t.has_storage() && x.has_storage() && t.storage().is_alias_of(x.storage()))
    return t.clone(at::MemoryFormat::Contiguous);
  return t;
}

// ---------------------------------------------------------------- small flat scopes (N:M and friends)
//
// The hot patterns (2:4, 4:8, coupled 2:4, row-pair coupling) have a handful of blocks per
// scope (NB a compile-time constant), blocks and elements that are each one strided dim, and
// norm scores. Scores stay in registers; NaN maps to -1 (below every |x|-based score, which is
// >= 0) and is then never kept, so the rank count needs no NaN branches.
struct FlatPlan {
  int64_t b1[kSets];  // block stride per set (level 1, one dim)
  int64_t e1[kSets];  // element stride per set (level 2, one dim)
  int64_t ne;
};

inline bool flat_ok(const Layout& Y) { return Y.lv[1].nd <= 1 && Y.lv[2].nd <= 1; }

inline FlatPlan flat_plan(const Layout& Y) {
  FlatPlan P;
  for (int s = 0; s < kSets; ++s) {
    P.b1[s] = Y.lv[1].nd ? Y.lv[1].st[s][0] : 0;
    P.e1[s] = Y.lv[2].nd ? Y.lv[2].st[s][0] : 0;
  }
  P.ne = Y.ne;
  return P;
}

template <typename scalar_t, int NB, int KIND>  // KIND: 0 abs, 1 p1, 2 p2, 3 pinf
inline void flat_scores(const scalar_t* v, int64_t bs, int64_t es, int64_t ne, float* s) {
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) {
    const scalar_t* b = v + j * bs;
    float acc = 0.f;
    bool nan = false;
    if constexpr (KIND == 0) {
      acc = std::abs(static_cast<float>(b[0]));
      nan = acc != acc;
    } else {
      for (int64_t q = 0; q < ne; ++q) {
        const float a = std::abs(static_cast<float>(b[q * es]));
        if constexpr (KIND == 1) acc += a;
        if constexpr (KIND == 2) acc += a * a;
        if constexpr (KIND == 3) acc = a > acc ? a : acc;
        if constexpr (KIND == 3) nan |= a != a;
      }
      if constexpr (KIND != 3) nan = acc != acc;
    }
    s[j] = nan ? -1.f : acc;
  }
}

// mode 0: mask out (bool at `set` offsets, expanded over elements when expand && ne > 1);
// mode 1: hard threshold (scores from kV, zero kX, grid mask at kB).
// Scopes go in tiles of kTile with scores laid out [block][scope], so the rank count below is a
// set of straight vector loops across scopes (the compiler vectorises them).
constexpr int kTile = 64;

template <int NB>
inline void tile_rank(float (&sc)[NB][kTile], uint8_t (&kp)[NB][kTile], int n, int64_t nnz, bool keep_ties) {
  const int nz = (int)nnz;
  for (int i = 0; i < NB; ++i) {
    uint8_t r[kTile] = {};
    if (keep_ties) {
      for (int j = 0; j < NB; ++j) {
        if (j == i) continue;
        for (int c = 0; c < kTile; ++c) r[c] += sc[j][c] > sc[i][c];
      }
    } else {
      for (int j = 0; j < i; ++j)
        for (int c = 0; c < kTile; ++c) r[c] += sc[j][c] >= sc[i][c];
      for (int j = i + 1; j < NB; ++j)
        for (int c = 0; c < kTile; ++c) r[c] += sc[j][c] > sc[i][c];
    }
    for (int c = 0; c < kTile; ++c) kp[i][c] = (r[c] < nz) & (sc[i][c] >= 0.f);
  }
  (void)n;
}

template <typename scalar_t, int NB, int KIND>
void flat_small(const Layout& Y, int mode, const scalar_t* vp, scalar_t* xp, bool* op, int set, bool expand,
                int64_t nnz, bool keep_ties) {
  const FlatPlan P = flat_plan(Y);
  const int vset = mode == 1 ? kV : kX;
  const int oset = mode == 1 ? kB : set;
  const bool per_elem = mode == 0 && expand && P.ne > 1;
  for_scopes(Y, NB * P.ne, [&](int64_t b, int64_t e, Odometer& o) {
    alignas(64) float sc[NB][kTile];
    alignas(64) uint8_t kp[NB][kTile];
    // offsets of the current tile and of the next one (double buffer: the next tile's lines are
    // prefetched while this one is scored, since the blocks of a scope sit far apart in memory)
    int64_t offs[2][3][kTile];
    const int64_t bv = P.b1[vset], bx = P.b1[kX], bo = P.b1[oset], ev = P.e1[vset], ex = P.e1[kX],
                  eo = P.e1[kE];
    const Level& L0 = Y.lv[0];
    // dense: scopes of NB adjacent single elements, one after another, in every tensor involved
    // (2:4 / 4:8 on contiguous rows) -> constant-stride loops the compiler vectorises.
    const bool dense = KIND == 0 && L0.nd == 1 && bv == 1 && bo == 1 && L0.st[vset][0] == NB &&
                       L0.st[oset][0] == NB && (mode == 0 || (bx == 1 && L0.st[kX][0] == NB));
    auto fill = [&](int slot, int nn) {
      for (int c = 0; c < nn; ++c) {
        offs[slot][0][c] = o.off[vset];
        offs[slot][1][c] = o.off[kX];
        offs[slot][2][c] = o.off[oset];
        o.next();
      }
    };
    // lines of one block to prefetch: its first 4 (hardware prefetch covers long contiguous ones)
    const int64_t esz = ev * (int64_t)sizeof(scalar_t);
    const int64_t pf_step = esz <= 64 ? 64 : esz;
    const int64_t pf_bytes = esz <= 64 ? (P.ne - 1) * esz + (int64_t)sizeof(scalar_t) : P.ne * esz;
    const int64_t span = std::min<int64_t>(4 * pf_step, pf_bytes);
    int cur = 0;
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int n = (int)std::min<int64_t>(kTile, e - t0);
      if (dense && n == kTile) {
        const scalar_t* v0 = vp + o.off[vset] + (t0 - b) * NB;
        for (int c = 0; c < kTile; ++c)
          for (int j = 0; j < NB; ++j) {
            const float a = std::abs(static_cast<float>(v0[c * NB + j]));
            sc[j][c] = a != a ? -1.f : a;
          }
        tile_rank<NB>(sc, kp, n, nnz, keep_ties);
        bool* o0 = op + o.off[oset] + (t0 - b) * NB;
        if (mode == 0) {
          for (int c = 0; c < kTile; ++c)
            for (int j = 0; j < NB; ++j) o0[c * NB + j] = kp[j][c];
        } else {
          scalar_t* x0 = xp + o.off[kX] + (t0 - b) * NB;
          for (int c = 0; c < kTile; ++c)
            for (int j = 0; j < NB; ++j) {
              o0[c * NB + j] = kp[j][c];
              x0[c * NB + j] = kp[j][c] ? x0[c * NB + j] : scalar_t(0);
            }
        }
        continue;
      }
      if (dense || t0 == b) {  // first generic tile (or tail of a dense range): fill its offsets
        if (dense) o.init(L0, t0);
        fill(0, n);
        cur = 0;
      } else {
        cur ^= 1;
      }
      const int64_t* ov = offs[cur][0];
      const int64_t* ox = offs[cur][1];
      const int64_t* oo = offs[cur][2];
      if (!dense && t0 + kTile < e) {
        const int nn = (int)std::min<int64_t>(kTile, e - t0 - kTile);
        fill(cur ^ 1, nn);
        for (int c = 0; c < nn; ++c)
          for (int j = 0; j < NB; ++j) {
            const char* pb = reinterpret_cast<const char*>(vp + offs[cur ^ 1][0][c] + j * bv);
            for (int64_t l = 0; l < span && kPrefetch; l += pf_step) __builtin_prefetch(pb + l, 0, 1);
          }
      }
      if constexpr (KIND == 0) {
        for (int c = 0; c < n; ++c) {
          float tmp[NB];
          flat_scores<scalar_t, NB, KIND>(vp + ov[c], bv, ev, P.ne, tmp);
          for (int j = 0; j < NB; ++j) sc[j][c] = tmp[j];
        }
      } else {
        // element loop outermost: NB * n independent accumulators instead of one dependent chain
        // per block (same summation order per block as the scalar loop, so the same rounding).
        alignas(64) uint8_t nanf[NB][kTile];
        for (int j = 0; j < NB; ++j)
          for (int c = 0; c < kTile; ++c) {
            sc[j][c] = 0.f;
            nanf[j][c] = 0;
          }
#ifdef GK_SSE3
        if (std::is_same_v<scalar_t, float> && KIND != 3 && ev == 1 && P.ne % 4 == 0) {
          // contiguous fp32 blocks, a multiple of 4 long: one 4-lane accumulator per block, and
          // four blocks reduced together with two horizontal adds (fixed order, deterministic)
          const __m128 absm = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
          for (int j = 0; j < NB; ++j)
            for (int c0 = 0; c0 < n; c0 += 4) {
              __m128 a[4];
              for (int u = 0; u < 4; ++u) {
                a[u] = _mm_setzero_ps();
                if (c0 + u >= n) continue;
                const float* pb = reinterpret_cast<const float*>(vp + ov[c0 + u] + j * bv);
                for (int64_t q = 0; q < P.ne; q += 4) {
                  const __m128 v = _mm_loadu_ps(pb + q);
                  a[u] = _mm_add_ps(a[u], KIND == 1 ? _mm_and_ps(v, absm) : _mm_mul_ps(v, v));
                }
              }
              _mm_store_ps(&sc[j][c0], _mm_hadd_ps(_mm_hadd_ps(a[0], a[1]), _mm_hadd_ps(a[2], a[3])));
            }
        } else
#endif
        if (KIND != 3 && ev == 1 && P.ne >= 8) {
          // contiguous blocks: a SIMD reduction per block (fixed lane order, deterministic)
          for (int c = 0; c < n; ++c)
            for (int j = 0; j < NB; ++j) {
              const scalar_t* pb = vp + ov[c] + j * bv;
              float acc = 0.f;
#pragma omp simd reduction(+ : acc)
              for (int64_t q = 0; q < P.ne; ++q) {
                const float a = std::abs(static_cast<float>(pb[q]));
                acc += KIND == 1 ? a : a * a;
              }
              sc[j][c] = acc;
            }
        } else
        for (int64_t q = 0; q < P.ne; ++q) {
          for (int c = 0; c < n; ++c) {
            const scalar_t* pq = vp + ov[c] + q * ev;
            for (int j = 0; j < NB; ++j) {
              const float a = std::abs(static_cast<float>(pq[j * bv]));
              if constexpr (KIND == 1) sc[j][c] += a;
              if constexpr (KIND == 2) sc[j][c] += a * a;
              if constexpr (KIND == 3) {
                sc[j][c] = a > sc[j][c] ? a : sc[j][c];
                nanf[j][c] |= a != a;
              }
            }
          }
        }
        for (int j = 0; j < NB; ++j)
          for (int c = 0; c < n; ++c) {
            const float v = sc[j][c];
            sc[j][c] = (nanf[j][c] | (v != v)) ? -1.f : v;
          }
      }
      for (int c = n; c < kTile; ++c)
        for (int j = 0; j < NB; ++j) sc[j][c] = -1.f;
      tile_rank<NB>(sc, kp, n, nnz, keep_ties);
      if (mode == 0) {
        for (int c = 0; c < n; ++c) {
          bool* ob = op + oo[c];
          if (!per_elem) {
            for (int j = 0; j < NB; ++j) ob[j * bo] = kp[j][c];
          } else if (eo == 1) {  // contiguous element runs: one memset per block
            for (int j = 0; j < NB; ++j) std::memset(ob + j * bo, kp[j][c], (size_t)P.ne);
          } else {
            for (int j = 0; j < NB; ++j)
              for (int64_t q = 0; q < P.ne; ++q) ob[j * bo + q * eo] = kp[j][c];
          }
        }
      } else {
        for (int c = 0; c < n; ++c) {
          bool* ob = op + oo[c];
          scalar_t* xb = xp + ox[c];
          for (int j = 0; j < NB; ++j) {
            const bool k = kp[j][c];
            ob[j * bo] = k;
            scalar_t* xj = xb + j * bx;
            if (P.ne == 1) {
              xj[0] = k ? xj[0] : scalar_t(0);  // branch-free: the keep pattern is random
            } else if (!k && ex == 1) {
              std::memset(static_cast<void*>(xj), 0, sizeof(scalar_t) * (size_t)P.ne);  // +0.0 is all-zero bits
            } else if (!k) {
              for (int64_t q = 0; q < P.ne; ++q) xj[q * ex] = scalar_t(0);
            }
          }
        }
      }
    }
  });
}

#ifdef GK_SSE3
// Runs of fp32 scopes along the innermost scope-grid dim, with contiguous blocks a multiple of 4
// long and p in {1, 2} (16-column blocks with row coupling, 1x16 block N:M, ...): the blocks of
// scope c sit at base + c * stride + j * block_stride, so the walk is pointer arithmetic (no
// per-scope odometer), four blocks are reduced together with two horizontal adds (fixed order,
// deterministic), and the masks / zeros are written with 16-byte stores.
constexpr int64_t kAhead = 16;       // scopes to prefetch ahead in flat_runs
constexpr int64_t kSinkFloats = 64;  // blocks up to this long are zeroed branch-free in flat_runs
constexpr bool kStreamMask = true;

template <int NB, int KIND>
void flat_runs(const Layout& Y, int mode, const float* vp, float* xp, bool* op, int set, bool expand,
               int64_t nnz, bool keep_ties) {
  const FlatPlan P = flat_plan(Y);
  const int vset = mode == 1 ? kV : kX;
  const int oset = mode == 1 ? kB : set;
  const bool per_elem = mode == 0 && expand;
  const Level& L0 = Y.lv[0];
  const int d = L0.nd - 1;
  const int64_t run = L0.size[d], sv = L0.st[vset][d], sx = L0.st[kX][d], so = L0.st[oset][d];
  Level outer = L0;
  outer.nd = d;
  outer.count = L0.count / run;
  const int64_t chunks = (run + kTile - 1) / kTile, ne = P.ne;
  const int64_t bv = P.b1[vset], bx = P.b1[kX], bo = P.b1[oset], ex = P.e1[kX], eo = P.e1[kE];
  const int64_t grain = std::max<int64_t>(1, 16384 / (NB * ne * kTile));
  at::parallel_for(0, outer.count * chunks, grain, [&](int64_t b, int64_t e) {
    alignas(64) float sc[NB][kTile];
    alignas(64) uint8_t kp[NB][kTile];
    alignas(64) float sink[kSinkFloats];
    const __m128 absm = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    Odometer o;
    int64_t at_outer = -1;
    for (int64_t u = b; u < e; ++u) {
      const int64_t oi = u / chunks, c0 = (u % chunks) * kTile;
      if (oi != at_outer) {
        o.init(outer, oi);
        at_outer = oi;
      }
      const int n = (int)std::min<int64_t>(kTile, run - c0);
      const float* v0 = vp + o.off[vset] + c0 * sv;
      const bool full = n == kTile;  // no tail
      auto term = [&](const float* q) {
        const __m128 t = _mm_loadu_ps(q);
        return KIND == 1 ? _mm_and_ps(t, absm) : _mm_mul_ps(t, t);
      };
      for (int j = 0; j < NB; ++j) {
        if (full && ne == 16) {  // the 16-column case: fixed trip counts, a two-level sum per block
          const float* pj = v0 + j * bv;
          for (int c = 0; c < kTile; c += 4) {
            __m128 a[4];
            for (int w = 0; w < 4; ++w) {
              const float* pb = pj + (c + w) * sv;
              // software prefetch (the blocks of a scope sit far apart), kept inside the run
              __builtin_prefetch(c0 + c + w + kAhead < run ? pb + kAhead * sv : pb, 0, 3);
              a[w] = _mm_add_ps(_mm_add_ps(term(pb), term(pb + 4)), _mm_add_ps(term(pb + 8), term(pb + 12)));
            }
            _mm_store_ps(&sc[j][c], _mm_hadd_ps(_mm_hadd_ps(a[0], a[1]), _mm_hadd_ps(a[2], a[3])));
          }
          continue;
        }
        for (int c = 0; c < n; c += 4) {
          __m128 a[4];
          for (int w = 0; w < 4; ++w) {
            a[w] = _mm_setzero_ps();
            if (c + w >= n) continue;
            const float* pb = v0 + (c + w) * sv + j * bv;
            if (c0 + c + w + kAhead < run)  // software prefetch: the blocks of a scope sit far apart
              for (int64_t q = 0; q < ne; q += 16) __builtin_prefetch(pb + kAhead * sv + q, 0, 3);
            for (int64_t q = 0; q < ne; q += 4) a[w] = _mm_add_ps(a[w], term(pb + q));
          }
          _mm_store_ps(&sc[j][c], _mm_hadd_ps(_mm_hadd_ps(a[0], a[1]), _mm_hadd_ps(a[2], a[3])));
        }
      }
      for (int j = 0; j < NB; ++j) {
        for (int c = 0; c < kTile; ++c) {  // NaN -> -1 (never kept), padding -> -1
          const float t = sc[j][c];
          sc[j][c] = (c >= n || t != t) ? -1.f : t;
        }
      }
      tile_rank<NB>(sc, kp, n, nnz, keep_ties);
      bool* o0 = op + o.off[oset] + c0 * so;
      if (mode == 0) {
        for (int c = 0; c < n; ++c)
          for (int j = 0; j < NB; ++j) {
            bool* ob = o0 + c * so + j * bo;
            if (!per_elem) {
              ob[0] = kp[j][c];
            } else if (eo == 1 && ne % 16 == 0) {
              // non-temporal 16-byte stores: the mask is write-only here, so skip the read-for-
              // ownership of every output line and keep the cache for x
              const __m128i k16 = _mm_set1_epi8((char)kp[j][c]);
              if (kStreamMask && (reinterpret_cast<uintptr_t>(ob) & 15) == 0) {
                for (int64_t q = 0; q < ne; q += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(ob + q), k16);
              } else {
                for (int64_t q = 0; q < ne; q += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(ob + q), k16);
              }
            } else {
              for (int64_t q = 0; q < ne; ++q) ob[q * eo] = kp[j][c];
            }
          }
      } else {
        float* x0 = xp + o.off[kX] + c0 * sx;
        if (ex == 1 && ne <= kSinkFloats) {
          // Branch-free: a kept block's zeros go to an L1-resident sink instead of x (the keep
          // pattern is random, so a branch here mispredicts on every other block).
          for (int c = 0; c < n; ++c)
            for (int j = 0; j < NB; ++j) {
              o0[c * so + j * bo] = kp[j][c];
              const uintptr_t keep = uintptr_t(0) - uintptr_t(kp[j][c]);  // all ones when kept
              float* dst = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sink) & keep) |
                                                    (reinterpret_cast<uintptr_t>(x0 + c * sx + j * bx) & ~keep));
              for (int64_t q = 0; q < ne; q += 4) _mm_storeu_ps(dst + q, _mm_setzero_ps());
            }
          continue;
        }
        for (int c = 0; c < n; ++c)
          for (int j = 0; j < NB; ++j) {
            o0[c * so + j * bo] = kp[j][c];
            if (kp[j][c]) continue;
            float* xb = x0 + c * sx + j * bx;
            if (ex == 1) {
              for (int64_t q = 0; q < ne; q += 4) _mm_storeu_ps(xb + q, _mm_setzero_ps());
            } else {
              for (int64_t q = 0; q < ne; ++q) xb[q * ex] = 0.f;
            }
          }
      }
    }
    _mm_sfence();  // order the non-temporal mask stores before the region ends
  });
}
#endif

// Dispatches to flat_small when the layout and score kind allow; false otherwise.
template <typename scalar_t>
bool try_flat_small(const Layout& Y, Score kind, int mode, const scalar_t* vp, scalar_t* xp, bool* op, int set,
                    bool expand, int64_t nnz, bool keep_ties) {
  if (!flat_ok(Y) || std::is_same_v<scalar_t, double>) return false;
#ifdef GK_SSE3
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int vset = mode == 1 ? kV : kX;
    const bool runs = (kind == Score::P1 || kind == Score::P2) && Y.lv[2].nd == 1 && Y.lv[2].st[vset][0] == 1 &&
                      Y.ne % 4 == 0 && Y.lv[0].nd >= 1 && Y.lv[0].size[Y.lv[0].nd - 1] >= 16;
#define GK_RUNS(NB_)                                                                                            \
    if (runs && Y.nb == NB_) {                                                                                  \
      if (kind == Score::P1) flat_runs<NB_, 1>(Y, mode, vp, xp, op, set, expand, nnz, keep_ties);               \
      else flat_runs<NB_, 2>(Y, mode, vp, xp, op, set, expand, nnz, keep_ties);                                 \
      return true;                                                                                              \
    }
    GK_RUNS(2)
    GK_RUNS(4)
    GK_RUNS(8)
    GK_RUNS(16)
#undef GK_RUNS
  }
#endif
  int k;
  switch (kind) {
    case Score::Abs: k = 0; break;
    case Score::P1: k = 1; break;
    case Score::P2: k = 2; break;
    case Score::PInf: k = 3; break;
    default: return false;
  }
#define GK_FLAT(NB_)                                                                                            \
  if (Y.nb == NB_) {                                                                                            \
    switch (k) {                                                                                                \
      case 0: flat_small<scalar_t, NB_, 0>(Y, mode, vp, xp, op, set, expand, nnz, keep_ties); break;            \
      case 1: flat_small<scalar_t, NB_, 1>(Y, mode, vp, xp, op, set, expand, nnz, keep_ties); break;            \
      case 2: flat_small<scalar_t, NB_, 2>(Y, mode, vp, xp, op, set, expand, nnz, keep_ties); break;            \
      default: flat_small<scalar_t, NB_, 3>(Y, mode, vp, xp, op, set, expand, nnz, keep_ties); break;           \
    }                                                                                                           \
    return true;                                                                                                \
  }
  GK_FLAT(2)
  GK_FLAT(4)
  GK_FLAT(8)
  GK_FLAT(16)
#undef GK_FLAT
  return false;
}

// ---------------------------------------------------------------- ops

at::Tensor block_norms_cpu(const at::Tensor& x, c10::IntArrayRef block_shape, double p) {
  check_layout(x, block_shape, c10::nullopt, "block_norms");
  check_p(p, "block_norms");
  auto grid = grid_shape(x, block_shape);
  at::Tensor out = at::empty(grid, x.options());
  if (out.numel() == 0) return out;
  Layout Y = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, {});
  if (Y.ne == 1 && x.is_contiguous()) {
    // One-entry blocks (unstructured selection): every norm is |x| (Score::Abs), entry by entry in one flat loop;
    // the generic walk below paid its odometer per entry, 30 ms for 2048^2 float32 against torch.abs's 0.3
    // (session 44). The same formula, so the same bits.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_norms", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) op[i] = static_cast<scalar_t>(std::abs(static_cast<acc_t>(xp[i])));
      });
    });
    return out;
  }
  Walk we(Y.lv[2], kX);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_norms", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    Scorer<scalar_t, acc_t> sc{score_kind(false, Y.ne, p), (acc_t)p, (acc_t)(1.0 / p), Y.ne, &we};
    for_scopes(Y, Y.ne, [&](int64_t b, int64_t e, Odometer& o) {
      for (int64_t s = b; s < e; ++s, o.next())
        op[o.off[kS]] = static_cast<scalar_t>(finalize<acc_t>(sc.kind, sc(xp + o.off[kX]), sc.inv_p));
    });
  });
  return out;
}

// (v + w v1) / (1 + w), rounded step by step, never NaN: the reference's mid_value (MID_RULE in
// kernels/reference/scope.py): w = 0 gives v; an infinite v gives v, v1 = -inf below a finite v gives -inf; finite
// v, v1 whose formula overflows (or a w past acc_t's range) take two products that cannot.
template <typename acc_t>
inline acc_t mid_value(acc_t v, acc_t v1, double w) {
  if (w == 0) return v;
  if (!std::isfinite(v)) return v;
  if (!std::isfinite(v1)) return v1;
  acc_t m = (v + (acc_t)w * v1) / (acc_t)(1.0 + w);
  if (!std::isfinite(m)) m = v * (acc_t)(1.0 / (1.0 + w)) + v1 * (acc_t)(w / (1.0 + w));
  return m;
}

at::Tensor scope_kth_cpu(const at::Tensor& x, c10::IntArrayRef block_shape, c10::IntArrayRef scope_shape, int64_t k,
                         double p, bool raw, double k_weight, bool mid) {
  check_layout(x, block_shape, scope_shape, "scope_kth");
  check_p(p, "scope_kth");
  check_raw(raw, block_shape, "scope_kth");
  const int64_t nb = prod(scope_shape);
  TORCH_CHECK_VALUE(k >= 1 && k <= (mid ? nb - 1 : nb), "scope_kth: k: expected 1 <= k <= ", mid ? nb - 1 : nb,
                    ", got ", k);
  TORCH_CHECK_VALUE(k_weight >= 0 && std::isfinite(k_weight), "scope_kth: k_weight: expected a finite number >= 0");
  Layout Y = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, scope_shape);
  at::Tensor out = at::empty(Y.sgrid, x.options());
  if (out.numel() == 0) return out;
  Walk wb(Y.lv[1], kX), we(Y.lv[2], kX);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scope_kth", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    Scorer<scalar_t, acc_t> sc{score_kind(raw, Y.ne, p), (acc_t)p, (acc_t)(1.0 / p), Y.ne, &we};
    for_scopes(Y, Y.nb * Y.ne, [&](int64_t b, int64_t e, Odometer& o) {
      Selector<acc_t> sel(Y.nb);
      for (int64_t s = b; s < e; ++s, o.next()) {
        const scalar_t* base = xp + o.off[kX];
        for (int64_t j = 0; j < Y.nb; ++j) sel.s[j] = sc(base + wb[j]);
        auto [vk, vk1] = sel.kth(Y.nb, k, mid);
        acc_t v = finalize<acc_t>(sc.kind, vk, sc.inv_p);
        if (mid) v = mid_value<acc_t>(v, finalize<acc_t>(sc.kind, vk1, sc.inv_p), k_weight);
        op[o.off[kS]] = static_cast<scalar_t>(v);
      }
    });
  });
  return out;
}

at::Tensor scope_mask_cpu(const at::Tensor& x, c10::IntArrayRef block_shape, c10::IntArrayRef scope_shape, int64_t nnz,
                          double p, bool raw, bool keep_ties, bool expand) {
  check_layout(x, block_shape, scope_shape, "scope_mask");
  check_p(p, "scope_mask");
  check_raw(raw, block_shape, "scope_mask");
  const int64_t nb = prod(scope_shape);
  TORCH_CHECK_VALUE(nnz >= 0 && nnz <= nb, "scope_mask: nnz: expected 0 <= nnz <= ", nb, ", got ", nnz);
  Layout Y = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, scope_shape);
  at::Tensor out = expand ? pooled_empty(x.sizes(), x.options().dtype(at::kBool))
                          : at::empty(Y.grid, x.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  const int set = expand ? kE : kB;
  Walk wb(Y.lv[1], kX), we(Y.lv[2], kX), wbo(Y.lv[1], set), weo(Y.lv[2], kE);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scope_mask", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    bool* op = out.data_ptr<bool>();
    Scorer<scalar_t, acc_t> sc{score_kind(raw, Y.ne, p), (acc_t)p, (acc_t)(1.0 / p), Y.ne, &we};
    if (try_flat_small<scalar_t>(Y, sc.kind, 0, xp, nullptr, op, set, expand, nnz, keep_ties)) return;
    const bool per_elem = expand && Y.ne > 1;
    for_scopes(Y, Y.nb * Y.ne, [&](int64_t b, int64_t e, Odometer& o) {
      Selector<acc_t> sel(Y.nb);
      for (int64_t s = b; s < e; ++s, o.next()) {
        const scalar_t* base = xp + o.off[kX];
        for (int64_t j = 0; j < Y.nb; ++j) sel.s[j] = sc(base + wb[j]);
        sel.select(Y.nb, nnz, keep_ties);
        bool* ob = op + o.off[set];
        if (!per_elem) {
          for (int64_t j = 0; j < Y.nb; ++j) ob[wbo[j]] = sel.keep[j];
        } else {
          for (int64_t j = 0; j < Y.nb; ++j) {
            bool* oj = ob + wbo[j];
            const bool kj = sel.keep[j];
            for (int64_t q = 0; q < Y.ne; ++q) oj[weo[q]] = kj;
          }
        }
      }
    });
  });
  return out;
}

at::Tensor scope_hard_threshold_cpu(at::Tensor& x, const std::optional<at::Tensor>& values, c10::IntArrayRef block_shape,
                                    c10::IntArrayRef scope_shape, int64_t nnz, double p, bool keep_ties) {
  check_layout(x, block_shape, scope_shape, "scope_hard_threshold_");
  check_p(p, "scope_hard_threshold_");
  const int64_t nb = prod(scope_shape);
  TORCH_CHECK_VALUE(nnz >= 0 && nnz <= nb, "scope_hard_threshold_: nnz: expected 0 <= nnz <= ", nb, ", got ", nnz);
  at::Tensor v = values.has_value() ? *values : x;
  bool v_is_x = true;
  if (values.has_value()) {
    check_companion(v, x, x.sizes(), "values", "scope_hard_threshold_");
    TORCH_CHECK_TYPE(v.scalar_type() == x.scalar_type(), "scope_hard_threshold_: values: dtype ", v.scalar_type(),
                     " differs from x's ", x.scalar_type());
    v_is_x = v.data_ptr() == x.data_ptr() && v.strides() == x.strides();
  }
  // an x that covers an element twice would be zeroed by one scope while another scores it (as torch's
  // in-place ops and the CUDA / Triton backends, refuse it)
  at::assert_no_internal_overlap(x);
  if (!v_is_x) v = detach_from(v, x);  // x is zeroed while v is read
  Layout Y = make_layout(x.sizes(), x.strides(), v.strides(), block_shape, scope_shape);
  at::Tensor out = at::empty(Y.grid, x.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  Walk wbv(Y.lv[1], kV), wev(Y.lv[2], kV), wbx(Y.lv[1], kX), wex(Y.lv[2], kX), wbo(Y.lv[1], kB);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scope_hard_threshold_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* xp = x.data_ptr<scalar_t>();
    bool* op = out.data_ptr<bool>();
    Scorer<scalar_t, acc_t> sc{score_kind(false, Y.ne, p), (acc_t)p, (acc_t)(1.0 / p), Y.ne, &wev};
    if (try_flat_small<scalar_t>(Y, sc.kind, 1, vp, xp, op, kB, false, nnz, keep_ties)) return;
    for_scopes(Y, Y.nb * Y.ne, [&](int64_t b, int64_t e, Odometer& o) {
      Selector<acc_t> sel(Y.nb);
      for (int64_t s = b; s < e; ++s, o.next()) {
        const scalar_t* vb = vp + o.off[kV];
        for (int64_t j = 0; j < Y.nb; ++j) sel.s[j] = sc(vb + wbv[j]);
        sel.select(Y.nb, nnz, keep_ties);
        scalar_t* xb = xp + o.off[kX];
        bool* ob = op + o.off[kB];
        for (int64_t j = 0; j < Y.nb; ++j) {
          ob[wbo[j]] = sel.keep[j];
          if (!sel.keep[j]) {
            scalar_t* xj = xb + wbx[j];
            for (int64_t q = 0; q < Y.ne; ++q) xj[wex[q]] = scalar_t(0);
          }
        }
      }
    });
  });
  return out;
}

void block_apply_mask_cpu(at::Tensor& x, c10::IntArrayRef block_shape, const at::Tensor& block_mask) {
  check_layout(x, block_shape, c10::nullopt, "block_apply_mask_");
  auto grid = grid_shape(x, block_shape);
  check_companion(block_mask, x, grid, "block_mask", "block_apply_mask_", true);
  at::assert_no_internal_overlap(x);
  if (x.numel() == 0) return;
  at::Tensor m = detach_from(block_mask, x).contiguous();
  Layout Y = make_layout(x.sizes(), x.strides(), x.strides(), block_shape, {});
  Walk wex(Y.lv[2], kX);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_apply_mask_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const bool* mp = m.const_data_ptr<bool>();
    for_scopes(Y, Y.ne, [&](int64_t b, int64_t e, Odometer& o) {
      for (int64_t s = b; s < e; ++s, o.next()) {
        if (mp[o.off[kS]]) continue;
        scalar_t* xb = xp + o.off[kX];
        for (int64_t q = 0; q < Y.ne; ++q) xb[wex[q]] = scalar_t(0);
      }
    });
  });
}

void block_soft_threshold_cpu(at::Tensor& x, c10::IntArrayRef block_shape, const at::Tensor& thresholds,
                              const std::optional<at::Tensor>& conditioner, int64_t max_iter, double atol, double eps) {
  const char* op = "block_soft_threshold_";
  check_layout(x, block_shape, c10::nullopt, op);
  auto grid = grid_shape(x, block_shape);
  check_companion(thresholds, x, grid, "thresholds", op);
  if (conditioner.has_value()) check_companion(*conditioner, x, x.sizes(), "conditioner", op);
  TORCH_CHECK_VALUE(max_iter >= 0, op, ": max_iter: expected >= 0, got ", max_iter);
  TORCH_CHECK_VALUE(atol >= 0 && eps >= 0, op, ": atol and eps must be >= 0");
  at::assert_no_internal_overlap(x);
  if (x.numel() == 0) return;
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor t = detach_from(thresholds.to(acc_type).contiguous(), x);
  at::Tensor h = conditioner.has_value() ? detach_from(conditioner->to(acc_type), x) : at::Tensor();
  check_soft_values(t, h, op);  // thresholds >= 0, conditioner finite and > 0: before x is written
  Layout Y = make_layout(x.sizes(), x.strides(), h.defined() ? h.strides() : x.strides(), block_shape, {});
  Walk wex(Y.lv[2], kX), wev(Y.lv[2], kV);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_soft_threshold_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* tp = t.const_data_ptr<acc_t>();
    const acc_t* hp = h.defined() ? h.const_data_ptr<acc_t>() : nullptr;
    const acc_t ep = (acc_t)eps;
    const int64_t ne = Y.ne;
    for_scopes(Y, ne * (hp ? max_iter + 2 : 2), [&](int64_t b, int64_t e, Odometer& o) {
      std::vector<acc_t> w((size_t)ne), hh((size_t)ne);
      for (int64_t s = b; s < e; ++s, o.next()) {
        scalar_t* xb = xp + o.off[kX];
        acc_t tb = tp[o.off[kS]];
        for (int64_t q = 0; q < ne; ++q) w[q] = static_cast<acc_t>(xb[wex[q]]);
        if (hp == nullptr || ne == 1) {
          if (hp) tb = tb / hp[o.off[kV] + wev[0]];
          acc_t n2 = 0;
          for (int64_t q = 0; q < ne; ++q) n2 += w[q] * w[q];
          const acc_t n = std::sqrt(n2);
          acc_t scale = 1 - tb / (n + ep);
          scale = scale > 0 ? scale : acc_t(0);  // a NaN scale (inf / inf, 0 / 0) counts as 0: SOFT_RULE
          if (std::isnan(n)) {
            for (int64_t q = 0; q < ne; ++q) xb[wex[q]] = scalar_t(0);
          } else if (scale > 0) {
            for (int64_t q = 0; q < ne; ++q) xb[wex[q]] = static_cast<scalar_t>(w[q] * scale);
          } else {  // x * 0 with x's sign, also for an infinite x (inf * 0 would be NaN)
            for (int64_t q = 0; q < ne; ++q) xb[wex[q]] = static_cast<scalar_t>(std::copysign(acc_t(0), w[q]));
          }
          continue;
        }
        const acc_t* hb = hp + o.off[kV];
        acc_t hmin = std::numeric_limits<acc_t>::infinity(), hmax = -hmin, nhw2 = 0;
        for (int64_t q = 0; q < ne; ++q) {
          hh[q] = hb[wev[q]];
          hmin = std::min(hmin, hh[q]);
          hmax = std::max(hmax, hh[q]);
          w[q] *= hh[q];  // w := h * x
          nhw2 += w[q] * w[q];
        }
        const acc_t nhw = std::sqrt(nhw2);
        if (!(nhw > tb)) {
          for (int64_t q = 0; q < ne; ++q) xb[wex[q]] = scalar_t(0);
          continue;
        }
        const acc_t denom = (nhw - tb) + ep;
        acc_t lo = std::max(acc_t(0), tb * hmin / denom), hi = std::max(acc_t(0), tb * hmax / denom);
        acc_t mu = (lo + hi) / 2;
        for (int64_t it = 0; it < max_iter; ++it) {
          acc_t z2 = 0;
          for (int64_t q = 0; q < ne; ++q) {
            acc_t z = w[q] / (hh[q] + mu);
            z2 += z * z;
          }
          const acc_t zeta = mu * std::sqrt(z2);
          if (zeta < tb) lo = mu; else hi = mu;
          mu = (lo + hi) / 2;
          if (std::abs(hi - lo) < (acc_t)atol) break;
        }
        for (int64_t q = 0; q < ne; ++q) xb[wex[q]] = static_cast<scalar_t>(w[q] / (hh[q] + mu));
      }
    });
  });
}

}  // namespace
}  // namespace scope
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CPU, m) {
  using namespace gradkit::scope;
  m.impl("block_norms", &block_norms_cpu);
  m.impl("scope_kth", &scope_kth_cpu);
  m.impl("scope_mask", &scope_mask_cpu);
  m.impl("scope_hard_threshold_", &scope_hard_threshold_cpu);
  m.impl("block_apply_mask_", &block_apply_mask_cpu);
  m.impl("block_soft_threshold_", &block_soft_threshold_cpu);
}

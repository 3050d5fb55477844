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
//  * per task, keys are walked in blocks of kBlockKeys rows: a block that is not fp32 is upcast
//    once into a thread-local fp32 buffer (ATen's vectorised copy); then for each tile of
//    kTileQ queries one single-threaded GEMM (at::mm_out, MKL/OpenBLAS) writes the
//    kTileQ x kBlockKeys scores into a thread-local, cache-sized buffer.
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
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#define GK_SEARCH_SSE 1
#endif

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

void check_args(const Tensor& queries, const Tensor& keys, int64_t k, const std::optional<Tensor>& key_scale,
                const std::optional<Tensor>& scores_in, const std::optional<Tensor>& idx_in, int64_t base) {
  TORCH_CHECK_TYPE(queries.scalar_type() == at::kFloat, "queries: expected float32, got ", queries.scalar_type());
  TORCH_CHECK_VALUE(queries.dim() == 2, "queries: expected a 2-D tensor (Q, D), got shape ", queries.sizes());
  TORCH_CHECK_TYPE(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kHalf ||
                       keys.scalar_type() == at::kBFloat16,
                   "keys: expected float32, float16 or bfloat16, got ", keys.scalar_type());
  TORCH_CHECK_VALUE(keys.dim() == 2 && keys.size(1) == queries.size(1), "keys: expected shape (N, ",
                    queries.size(1), "), got ", keys.sizes());
  TORCH_CHECK_VALUE(keys.device() == queries.device(), "keys: on ", keys.device(), " but queries on ",
                    queries.device());
  TORCH_CHECK_VALUE(k >= 0, "k: must be non-negative, got ", k);
  TORCH_CHECK_VALUE(base >= 0, "base: must be non-negative, got ", base);
  if (key_scale.has_value()) {
    TORCH_CHECK_TYPE(key_scale->scalar_type() == at::kFloat, "key_scale: expected float32, got ",
                     key_scale->scalar_type());
    TORCH_CHECK_VALUE(key_scale->dim() == 1 && key_scale->size(0) == keys.size(0),
                      "key_scale: expected shape (", keys.size(0), ",), got ", key_scale->sizes());
    TORCH_CHECK_VALUE(key_scale->device() == queries.device(), "key_scale: on the wrong device");
  }
  TORCH_CHECK_VALUE(scores_in.has_value() == idx_in.has_value(), "scores_in, idx_in: give both or neither");
  if (scores_in.has_value()) {
    TORCH_CHECK_TYPE(scores_in->scalar_type() == at::kFloat, "scores_in: expected float32, got ",
                     scores_in->scalar_type());
    TORCH_CHECK_TYPE(idx_in->scalar_type() == at::kLong, "idx_in: expected int64, got ", idx_in->scalar_type());
    TORCH_CHECK_VALUE(scores_in->dim() == 2 && scores_in->size(0) == queries.size(0),
                      "scores_in: expected shape (", queries.size(0), ", k_in), got ", scores_in->sizes());
    TORCH_CHECK_VALUE(idx_in->sizes() == scores_in->sizes(), "idx_in: expected shape ", scores_in->sizes(),
                      ", got ", idx_in->sizes());
    TORCH_CHECK_VALUE(scores_in->device() == queries.device() && idx_in->device() == queries.device(),
                      "scores_in, idx_in: on the wrong device");
  }
}

std::tuple<Tensor, Tensor> score_topk_cpu(const Tensor& queries_in, const Tensor& keys_in, int64_t k, bool largest,
                                          const std::optional<Tensor>& key_scale_in,
                                          const std::optional<Tensor>& scores_in,
                                          const std::optional<Tensor>& idx_in, int64_t base) {
  check_args(queries_in, keys_in, k, key_scale_in, scores_in, idx_in, base);
  const int64_t Q = queries_in.size(0), D = queries_in.size(1), N = keys_in.size(0);
  const float pad = largest ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  Tensor out_s = at::empty({Q, k}, queries_in.options().dtype(at::kFloat));
  Tensor out_i = at::empty({Q, k}, queries_in.options().dtype(at::kLong));
  if (Q == 0 || k == 0) return {out_s, out_i};

  // smallest == largest of the negated scores
  Tensor q = largest ? queries_in.contiguous() : queries_in.neg();
  Tensor keys = (keys_in.stride(1) == 1 || N == 0 || D == 0) ? keys_in : keys_in.contiguous();
  Tensor scale;
  if (key_scale_in.has_value()) scale = key_scale_in->contiguous();
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

  if (N > 0) {
    at::parallel_for(0, kchunks * qgroups, 1, [&](int64_t t0, int64_t t1) {
      Tensor buf = f32 ? Tensor() : at::empty({kBlockKeys, D}, q.options());
      Tensor sbuf = at::empty({std::min(kTileQ, qper), kBlockKeys}, q.options());
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t c = task / qgroups, g = task % qgroups;
        const int64_t q0 = g * qper, q1 = std::min(Q, q0 + qper);
        const int64_t b0 = c * blocks_per_chunk, b1 = std::min(nblocks, b0 + blocks_per_chunk);
        if (q0 >= q1) continue;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t j0 = b * kBlockKeys, nb = std::min(kBlockKeys, N - j0);
          Tensor kb = keys.narrow(0, j0, nb);
          if (!f32) {
            Tensor dst = buf.narrow(0, 0, nb);
            dst.copy_(kb);
            kb = dst;
          }
          Tensor kbt = kb.t();
          for (int64_t qt = q0; qt < q1; qt += kTileQ) {
            const int64_t nq = std::min(kTileQ, q1 - qt);
            Tensor sv = sbuf.narrow(0, 0, nq).narrow(1, 0, nb);
            at::mm_out(sv, q.narrow(0, qt, nq), kbt);
            float* S = sbuf.data_ptr<float>();
            const int64_t lds = sbuf.stride(0);
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
          os[qi * k + j] = largest ? cand[j].s : -cand[j].s;
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

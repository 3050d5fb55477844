// CPU kernels of the golden family: the per-sample golden update (exact top-k of |g| fused with
// the running AND into a packed bitmask, selection counts and popcount) and packed-bitmask
// algebra. Semantics: python/gradkit/kernels/reference/golden.py.
//
// golden_topk_and_ on n entries:
//  A. one parallel pass: per block, a histogram of the top 16 bits of an order-preserving key of
//     |g| (NaN gets key 0, below every |g|, whose keys start at 1);
//  B. the bins walked from the top give the bucket holding the k-th largest key; that bucket's
//     keys are compacted (one more pass) and nth_element gives the exact k-th key, plus per-block
//     counts of keys above / equal to it; when ties fill that bucket (over n/4 entries: the zeros of a
//     sparse gradient), its remaining key bits are found by 11-bit radix passes over g instead (no copy);
//  C. one parallel pass writes 64 entries per step: selected = key > kth, or key == kth while
//     the block's share of the ties lasts (ties go lowest position first: shares are assigned to
//     blocks in order); the word is ANDed with the old bits (unless `first`), counts get +1 per
//     selected entry, and the set bits are counted.
// Blocks are multiples of 64 entries, so each block owns whole 8-byte words of the bitmask.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#define GK_SSE 1
#endif

namespace gradkit {
namespace golden {
namespace {

// key(|x|) + 1, or 0 for NaN: integer order = order of |x|, NaN lowest.
inline uint32_t abs_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u &= 0x7fffffffu;
  return u > 0x7f800000u ? 0u : u + 1u;
}
inline uint64_t abs_key(double x) {
  uint64_t u;
  std::memcpy(&u, &x, 8);
  u &= 0x7fffffffffffffffull;
  return u > 0x7ff0000000000000ull ? 0ull : u + 1ull;
}

template <typename scalar_t>
struct KeyT {
  using type = uint32_t;
  static inline uint32_t get(scalar_t v) { return abs_key(static_cast<float>(v)); }
};
template <>
struct KeyT<double> {
  using type = uint64_t;
  static inline uint64_t get(double v) { return abs_key(v); }
};

constexpr int kDigitBits = 12;  // 4096-bin histograms: 16 KiB, L1-resident

// 64 selection bits starting at g: gt = key > kth, eq = key == kth (scalar, any dtype).
template <typename scalar_t, typename K>
inline void words64(const scalar_t* g, int len, K kk, uint64_t& gt, uint64_t& eq) {
  gt = 0;
  eq = 0;
  for (int j = 0; j < len; ++j) {
    const K key = KeyT<scalar_t>::get(g[j]);
    gt |= uint64_t(key > kk) << j;
    eq |= uint64_t(key == kk) << j;
  }
}

#ifdef GK_SSE
// fp32 with SSE2: |x| bits u (< 2^31, so signed compares are exact); key = u + 1 for u <= inf.
inline void words64_f32(const float* g, int len, uint32_t kk, uint64_t& gt, uint64_t& eq) {
  if (len < 64) return words64<float, uint32_t>(g, len, kk, gt, eq);
  if (kk > 0x7f800001u) {  // above every key (k == 0): nothing selected
    gt = eq = 0;
    return;
  }
  const __m128i absm = _mm_set1_epi32(0x7fffffff), lim = _mm_set1_epi32(0x7f800001);
  const __m128i t = _mm_set1_epi32((int32_t)kk - 1);  // key > kk <=> u > kk - 1 (kk = 0: every valid u)
  const __m128i te = _mm_set1_epi32(kk == 0 ? -1 : (int32_t)kk - 1);
  gt = 0;
  eq = 0;
  for (int j = 0; j < 64; j += 4) {
    const __m128i u = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + j)), absm);
    const __m128i valid = _mm_cmpgt_epi32(lim, u);
    const __m128i mg = _mm_and_si128(_mm_cmpgt_epi32(u, t), valid);
    const __m128i me = _mm_and_si128(_mm_cmpeq_epi32(u, te), valid);
    gt |= uint64_t(_mm_movemask_ps(_mm_castsi128_ps(mg))) << j;
    eq |= uint64_t(_mm_movemask_ps(_mm_castsi128_ps(me))) << j;
  }
}
#endif

template <typename scalar_t>
at::Tensor golden_topk_and_impl(const scalar_t* g, int64_t n, uint8_t* bits, int32_t* counts, int64_t k,
                                bool first) {
  using K = typename KeyT<scalar_t>::type;
  // keys are < 2^(bits-1) (the sign bit is cleared), so the top digit starts one bit lower
  constexpr int kShift = (int)sizeof(K) * 8 - 1 - kDigitBits;
  constexpr int kBins = 1 << kDigitBits;
  constexpr int kSubShift = kShift > kDigitBits ? kShift - kDigitBits : 0;
  constexpr int kSubBins = 1 << (kShift - kSubShift);
  const int nthreads = std::max(1, at::get_num_threads());
  // at most 2^30 entries per block: the per-block histograms count in uint32 (one bin may hold every entry)
  int64_t grain = std::min<int64_t>(int64_t(1) << 30,
                                    std::max<int64_t>(int64_t(1) << 16, (n + 2 * nthreads - 1) / (2 * nthreads)));
  grain = (grain + 63) / 64 * 64;
  const int64_t nblocks = std::max<int64_t>(1, (n + grain - 1) / grain);
  auto range = [&](int64_t blk) { return std::make_pair(blk * grain, std::min(n, (blk + 1) * grain)); };
  constexpr int kChunk = 256;

  // ---- A + B: the k-th largest key (kth) and, per block, how many keys are above / equal to it
  std::vector<int64_t> n_gt(nblocks, 0), n_eq(nblocks, 0);
  K kth = std::numeric_limits<K>::max();  // k == 0: nothing selected
  if (k > 0) {
    std::vector<std::vector<uint32_t>> hist(nblocks, std::vector<uint32_t>(kBins));
    at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
      std::vector<uint32_t> sub(4 * kBins);  // four interleaved sub-histograms: no serial store chains
      uint16_t dig[kChunk];
      for (int64_t blk = b; blk < e; ++blk) {
        std::fill(sub.begin(), sub.end(), 0);
        uint32_t* h0 = sub.data();
        const auto [lo, hi] = range(blk);
        int64_t i = lo;
        for (; i + kChunk <= hi; i += kChunk) {
          for (int j = 0; j < kChunk; ++j) dig[j] = (uint16_t)(KeyT<scalar_t>::get(g[i + j]) >> kShift);
          for (int j = 0; j < kChunk; j += 4) {
            h0[dig[j]]++;
            h0[kBins + dig[j + 1]]++;
            h0[2 * kBins + dig[j + 2]]++;
            h0[3 * kBins + dig[j + 3]]++;
          }
        }
        for (; i < hi; ++i) h0[KeyT<scalar_t>::get(g[i]) >> kShift]++;
        uint32_t* h = hist[blk].data();
        for (int d = 0; d < kBins; ++d) h[d] = h0[d] + h0[kBins + d] + h0[2 * kBins + d] + h0[3 * kBins + d];
      }
    });
    auto walk = [&](const std::vector<std::vector<uint32_t>>& hs, int nb, int64_t* need) {
      int d = nb - 1;
      for (; d > 0; --d) {
        int64_t c = 0;
        for (const auto& h : hs) c += h[d];
        if (c >= *need) break;
        *need -= c;
      }
      return d;
    };
    int64_t need = k;
    const int d1 = walk(hist, kBins, &need);
    std::vector<int64_t> cand_off(nblocks + 1, 0);
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      for (int d = d1 + 1; d < kBins; ++d) n_gt[blk] += hist[blk][d];
      cand_off[blk + 1] = cand_off[blk] + hist[blk][d1];
    }
    hist.clear();
    // Bucket d1's keys are copied (cand, then the sub-bucket's into `bucket`) only while they are few; when ties
    // fill it (the exact zeros of a sparse gradient, or any value repeated) that copy took up to 8 bytes per entry
    // (16 for float64): 512 MiB for 2^26 fp32 zeros, 16 GiB at 2^31 entries (an OOM kill where the input itself
    // was 4 GiB of bfloat16). Then the rest of the key bits are resolved by radix passes over the input instead,
    // with per-block histograms and no buffer (topk_select's rule, csrc/cpu/parammap.cpp).
    if (cand_off[nblocks] <= std::max<int64_t>(n / 4, int64_t(1) << 16)) {
      std::vector<K> cand(cand_off[nblocks]);
      at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
        uint16_t dig[kChunk];
        for (int64_t blk = b; blk < e; ++blk) {
          int64_t q = cand_off[blk];
          const auto [lo, hi] = range(blk);
          for (int64_t i = lo; i < hi; i += kChunk) {
            const int len = (int)std::min<int64_t>(kChunk, hi - i);
            for (int j = 0; j < len; ++j) dig[j] = (uint16_t)(KeyT<scalar_t>::get(g[i + j]) >> kShift);
            for (int j = 0; j < len; ++j)
              if (dig[j] == d1) cand[q++] = KeyT<scalar_t>::get(g[i + j]);
          }
        }
      });
      // the sub-bucket (next 12 key bits) holding the k-th key, then nth_element within it
      std::vector<std::vector<uint32_t>> sub(nblocks, std::vector<uint32_t>(kSubBins));
      at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
        for (int64_t blk = b; blk < e; ++blk)
          for (int64_t i = cand_off[blk]; i < cand_off[blk + 1]; ++i)
            sub[blk][(cand[i] >> kSubShift) & (kSubBins - 1)]++;
      });
      int64_t need2 = need;
      const int d2 = walk(sub, kSubBins, &need2);
      std::vector<K> bucket;
      for (const K key : cand)
        if ((int)((key >> kSubShift) & (kSubBins - 1)) == d2) bucket.push_back(key);
      std::nth_element(bucket.begin(), bucket.begin() + (need2 - 1), bucket.end(), std::greater<K>());
      kth = bucket[need2 - 1];
      at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
        for (int64_t blk = b; blk < e; ++blk) {
          int64_t gt = 0, eq = 0;
          for (int64_t i = cand_off[blk]; i < cand_off[blk + 1]; ++i) {
            gt += cand[i] > kth;
            eq += cand[i] == kth;
          }
          n_gt[blk] += gt;
          n_eq[blk] = eq;
        }
      });
    } else {
      constexpr int kRBits = 11, kRBins = 1 << kRBits;
      std::vector<std::vector<uint32_t>> h2(nblocks, std::vector<uint32_t>(kRBins));  // blocks <= 2^30 entries
      K prefix = static_cast<K>(d1) << kShift, pmask = static_cast<K>(kBins - 1) << kShift;
      for (int hi_bit = kShift; hi_bit > 0; hi_bit -= kRBits) {
        const int lo_bit = std::max(0, hi_bit - kRBits);
        const K dmask = static_cast<K>((K(1) << (hi_bit - lo_bit)) - 1);
        const K pf = prefix, pm = pmask;
        at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
          for (int64_t blk = b; blk < e; ++blk) {
            uint32_t* h = h2[blk].data();
            std::fill(h, h + kRBins, 0u);
            const auto [lo, hi] = range(blk);
            for (int64_t i = lo; i < hi; ++i) {
              const K key = KeyT<scalar_t>::get(g[i]);
              if ((key & pm) == pf) h[(key >> lo_bit) & dmask]++;
            }
          }
        });
        const int digit = walk(h2, static_cast<int>(dmask) + 1, &need);
        for (int64_t blk = 0; blk < nblocks; ++blk) {
          for (int d = digit + 1; d <= static_cast<int>(dmask); ++d) n_gt[blk] += h2[blk][d];
          if (lo_bit == 0) n_eq[blk] = h2[blk][digit];
        }
        prefix |= static_cast<K>(digit) << lo_bit;
        pmask |= dmask << lo_bit;
      }
      kth = prefix;
    }
    if (kth == 0) std::fill(n_eq.begin(), n_eq.end(), 0);  // fewer than k non-NaN: every non-NaN, never a NaN
  }
  int64_t gt_all = 0;
  for (int64_t blk = 0; blk < nblocks; ++blk) gt_all += n_gt[blk];
  std::vector<int64_t> take(nblocks, 0);
  int64_t eq_left = kth == 0 ? 0 : std::max<int64_t>(0, k - gt_all);
  for (int64_t blk = 0; blk < nblocks; ++blk) {  // ties: lowest positions first, so blocks in order
    take[blk] = std::min(eq_left, n_eq[blk]);
    eq_left -= take[blk];
  }

  // ---- C: fused select -> AND -> counts -> popcount, 64 entries (8 mask bytes) at a time
  std::vector<int64_t> pop(nblocks, 0);
  const K kk = kth;
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const auto [lo, hi] = range(blk);
      int64_t left = take[blk], pc = 0;
      for (int64_t w = lo; w < hi; w += 64) {
        const int len = (int)std::min<int64_t>(64, hi - w);
        uint64_t gt, eq;
#ifdef GK_SSE
        if constexpr (std::is_same_v<scalar_t, float>) words64_f32(g + w, len, kk, gt, eq);
        else
#endif
          words64<scalar_t, K>(g + w, len, kk, gt, eq);
        uint64_t sel = gt;
        while (eq && left > 0) {  // ties: lowest positions first
          sel |= eq & (~eq + 1);
          eq &= eq - 1;
          --left;
        }
        uint8_t* out = bits + (w >> 3);
        uint64_t word;
        if (len == 64) {
          uint64_t old = 0;
          if (!first) std::memcpy(&old, out, 8);
          word = first ? sel : (old & sel);
          std::memcpy(out, &word, 8);
        } else {
          const int nbytes = (len + 7) / 8;
          uint64_t old = 0;
          if (!first) std::memcpy(&old, out, nbytes);
          word = first ? sel : (old & sel);
          std::memcpy(out, &word, nbytes);
        }
        pc += __builtin_popcountll(word);
        if (counts && sel) {
          int32_t* c = counts + w;
          for (int j = 0; j < len; ++j) c[j] += (int32_t)((sel >> j) & 1);
        }
      }
      pop[blk] = pc;
    }
  });
  int64_t total = 0;
  for (auto v : pop) total += v;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kLong));
}

at::Tensor golden_topk_and_cpu(const at::Tensor& g, at::Tensor& bits, const std::optional<at::Tensor>& counts,
                               int64_t k, bool first) {
  TORCH_CHECK_TYPE(g.is_floating_point(), "g: expected a floating tensor, got ", g.scalar_type());
  TORCH_CHECK_VALUE(g.is_contiguous(), "g: expected a contiguous tensor");
  const int64_t n = g.numel();
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, "bits: expected uint8, got ", bits.scalar_type());
  TORCH_CHECK_VALUE(bits.dim() == 1 && bits.numel() == (n + 7) / 8 && bits.is_contiguous(),
                    "bits: expected a contiguous uint8 tensor of ", (n + 7) / 8, " bytes for ", n, " entries");
  int32_t* cp = nullptr;
  if (counts.has_value()) {
    TORCH_CHECK_VALUE(counts->scalar_type() == at::kInt && counts->numel() == n && counts->is_contiguous(),
                      "counts: expected a contiguous int32 tensor of ", n, " entries");
    cp = counts->data_ptr<int32_t>();
  }
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "k: must be in [0, ", n, "], got ", k);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "golden_topk_and_cpu", [&] {
    out = golden_topk_and_impl<scalar_t>(g.data_ptr<scalar_t>(), n, bits.data_ptr<uint8_t>(), cp, k, first);
  });
  return out;
}

// ---------------------------------------------------------------- packed-bitmask algebra

void check_bits(at::TensorList a, const char* what) {
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK_TYPE(a[i].scalar_type() == at::kByte, what, "[", i, "]: expected uint8, got ", a[i].scalar_type());
    TORCH_CHECK_VALUE(a[i].dim() == 1 && a[i].is_contiguous(), what, "[", i, "]: expected a contiguous 1-D tensor");
  }
}

struct Piece {
  int64_t t, lo, hi;  // tensor, byte range
};

std::vector<Piece> pieces(at::TensorList a) {
  constexpr int64_t kBytes = 1 << 18;
  std::vector<Piece> out;
  for (size_t t = 0; t < a.size(); ++t)
    for (int64_t lo = 0; lo < a[t].numel(); lo += kBytes) out.push_back({(int64_t)t, lo, std::min(a[t].numel(), lo + kBytes)});
  return out;
}

std::vector<at::Tensor> bitmask_binary_cpu(at::TensorList a, at::TensorList b, int64_t op) {
  TORCH_CHECK_VALUE(a.size() == b.size(), "b: expected ", a.size(), " masks (one per mask of a), got ", b.size());
  TORCH_CHECK_VALUE(op >= 0 && op <= 3, "op: expected 0 (and), 1 (or), 2 (xor) or 3 (andnot), got ", op);
  check_bits(a, "a");
  check_bits(b, "b");
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK_VALUE(a[i].numel() == b[i].numel(), "b[", i, "]: ", b[i].numel(), " bytes, a[", i, "] has ",
                      a[i].numel());
    out.push_back(at::empty_like(a[i]));
  }
  const auto work = pieces(a);
  at::parallel_for(0, (int64_t)work.size(), 1, [&](int64_t s, int64_t e) {
    for (int64_t w = s; w < e; ++w) {
      const Piece& P = work[w];
      const uint8_t* x = a[P.t].data_ptr<uint8_t>();
      const uint8_t* y = b[P.t].data_ptr<uint8_t>();
      uint8_t* o = out[P.t].data_ptr<uint8_t>();
      switch (op) {
        case 0: for (int64_t i = P.lo; i < P.hi; ++i) o[i] = x[i] & y[i]; break;
        case 1: for (int64_t i = P.lo; i < P.hi; ++i) o[i] = x[i] | y[i]; break;
        case 2: for (int64_t i = P.lo; i < P.hi; ++i) o[i] = x[i] ^ y[i]; break;
        default: for (int64_t i = P.lo; i < P.hi; ++i) o[i] = x[i] & (uint8_t)~y[i]; break;
      }
    }
  });
  return out;
}

std::vector<at::Tensor> bitmask_not_cpu(at::TensorList a, at::IntArrayRef numel_sym) {
  TORCH_CHECK_VALUE(numel_sym.size() == a.size(), "numel: expected ", a.size(), " entries, got ", numel_sym.size());
  check_bits(a, "a");
  std::vector<int64_t> numel;
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < a.size(); ++i) {
    numel.push_back(numel_sym[i]);
    TORCH_CHECK_VALUE(numel[i] >= 0 && a[i].numel() == (numel[i] + 7) / 8, "a[", i, "]: ", a[i].numel(),
                      " bytes cannot hold numel[", i, "]=", numel[i], " bits");
    out.push_back(at::empty_like(a[i]));
  }
  const auto work = pieces(a);
  at::parallel_for(0, (int64_t)work.size(), 1, [&](int64_t s, int64_t e) {
    for (int64_t w = s; w < e; ++w) {
      const Piece& P = work[w];
      const uint8_t* x = a[P.t].data_ptr<uint8_t>();
      uint8_t* o = out[P.t].data_ptr<uint8_t>();
      for (int64_t i = P.lo; i < P.hi; ++i) o[i] = (uint8_t)~x[i];
      const int rem = (int)(numel[P.t] & 7);
      if (P.hi == a[P.t].numel() && rem) o[P.hi - 1] &= (uint8_t)((1u << rem) - 1);  // padding bits stay 0
    }
  });
  return out;
}

at::Tensor bitmask_count_cpu(at::TensorList bits) {
  check_bits(bits, "bits");
  const auto work = pieces(bits);
  std::vector<int64_t> part(work.size(), 0);
  at::parallel_for(0, (int64_t)work.size(), 1, [&](int64_t s, int64_t e) {
    for (int64_t w = s; w < e; ++w) {
      const Piece& P = work[w];
      const uint8_t* x = bits[P.t].data_ptr<uint8_t>();
      int64_t c = 0, i = P.lo;
      for (; i + 8 <= P.hi; i += 8) {
        uint64_t v;
        std::memcpy(&v, x + i, 8);
        c += __builtin_popcountll(v);
      }
      for (; i < P.hi; ++i) c += __builtin_popcount(x[i]);
      part[w] = c;
    }
  });
  at::Tensor out = at::zeros({(int64_t)bits.size()}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t w = 0; w < work.size(); ++w) o[work[w].t] += part[w];
  return out;
}

}  // namespace
}  // namespace golden
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CPU, m) {
  using namespace gradkit::golden;
  m.impl("golden_topk_and_", &golden_topk_and_cpu);
  m.impl("bitmask_binary", &bitmask_binary_cpu);
  m.impl("bitmask_not", &bitmask_not_cpu);
  m.impl("bitmask_count", &bitmask_count_cpu);
}

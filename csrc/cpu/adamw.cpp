// CPU kernel of the fused masked AdamW step. Semantics: python/gradkit/kernels/reference/adamw.py.
//
// All tensors of the call are cut into chunks of kChunk entries (a multiple of 64, so a chunk
// starts on a mask byte) and the chunks of every tensor run in ONE parallel region: param, grad,
// exp_avg, exp_avg_sq and the mask bits are each read once and written once per entry. The op
// order per entry follows torch.optim.AdamW's single-tensor path (decay, lerp, mul + addcmul,
// sqrt / bc2 + eps, addcdiv), so with equal rates the result matches torch to rounding. AMSGrad
// (max_exp_avg_sqs given): the denominator takes max(max_exp_avg_sq, the new exp_avg_sq), as torch's
// torch.maximum(..., out=max_exp_avg_sq) (NaN propagates), and the maximum is stored.
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../adamw_checks.h"

namespace gradkit {
namespace adamw {
namespace {

constexpr int64_t kChunk = 1 << 15;

struct Item {
  int64_t t, lo, hi;  // tensor index, entry range
};

// Per-tensor constants for the two rates (index 1: masked, 0: unmasked), in the compute type.
template <typename acc_t>
struct Rates {
  acc_t decay[2];     // 1 - lr * weight_decay
  acc_t neg_step[2];  // -lr / bias_correction1
  bool frozen[2];     // lr == 0: the entry keeps its exact value
  acc_t bc2sqrt;
};

// One mask byte (8 entries) at a time, branch-free inside, so the compiler vectorises the
// 8-entry loop (sqrt and division included); the rate constants are selected per lane.
// torch.maximum(a, b): NaN when either is NaN
template <typename acc_t>
__attribute__((always_inline)) inline acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

template <typename scalar_t, typename acc_t, bool kLerpHigh, bool kMaximize, bool kAms>
__attribute__((always_inline)) inline void step_range(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
                scalar_t* __restrict__ v, scalar_t* __restrict__ vmax, const uint8_t* bits, int64_t lo, int64_t hi,
                const Rates<acc_t>& R, acc_t w1, acc_t beta2, acc_t w2, acc_t eps) {
  const acc_t one_m_w1 = acc_t(1) - w1, bc2 = R.bc2sqrt;
  const acc_t d0 = R.decay[0], d1 = R.decay[1], s0 = R.neg_step[0], s1 = R.neg_step[1];
  const int f0 = R.frozen[0], f1 = R.frozen[1];
  for (int64_t i0 = lo; i0 < hi; i0 += 8) {
    const int len = (int)std::min<int64_t>(8, hi - i0);
    const unsigned byte = bits ? bits[i0 >> 3] : 0u;
    if (len == 8) {
      // The mask bit of lane j is taken in the vector loop itself (a variable shift per lane): a lane[8]
      // array of 8 scalar stores then read as one vector stalled on store forwarding every 8 entries, which
      // made the step 2.2x slower (70 vs 32 ms per 38.9M entries on one Zen 4 thread; /tmp micro-benchmark).
#pragma omp simd
      for (int j = 0; j < 8; ++j) {
        const int64_t i = i0 + j;
        const int b = (int)((byte >> j) & 1u);
        acc_t gi = static_cast<acc_t>(g[i]);
        if constexpr (kMaximize) gi = -gi;
        acc_t mi = static_cast<acc_t>(m[i]);
        // lerp(m, g, w1) as torch computes it: from the nearer end
        mi = kLerpHigh ? gi - (gi - mi) * one_m_w1 : mi + w1 * (gi - mi);
        const acc_t vi = static_cast<acc_t>(v[i]) * beta2 + w2 * gi * gi;  // mul_ then addcmul
        m[i] = static_cast<scalar_t>(mi);
        v[i] = static_cast<scalar_t>(vi);
        acc_t vd = vi;
        if constexpr (kAms) {
          vd = nan_max(static_cast<acc_t>(vmax[i]), vi);
          vmax[i] = static_cast<scalar_t>(vd);
        }
        const scalar_t praw = p[i];
        const acc_t denom = std::sqrt(vd) / bc2 + eps;
        const acc_t dd = b ? d1 : d0, ss = b ? s1 : s0;
        const int fz = b ? f1 : f0;
        const scalar_t pn = static_cast<scalar_t>(static_cast<acc_t>(praw) * dd + ss * mi / denom);
        p[i] = fz ? praw : pn;  // rate 0: the exact old value
      }
    } else {
      for (int j = 0; j < len; ++j) {
        const int64_t i = i0 + j;
        const int b = (byte >> j) & 1u;
        acc_t gi = static_cast<acc_t>(g[i]);
        if constexpr (kMaximize) gi = -gi;
        acc_t mi = static_cast<acc_t>(m[i]);
        mi = kLerpHigh ? gi - (gi - mi) * one_m_w1 : mi + w1 * (gi - mi);
        const acc_t vi = static_cast<acc_t>(v[i]) * beta2 + w2 * gi * gi;
        m[i] = static_cast<scalar_t>(mi);
        v[i] = static_cast<scalar_t>(vi);
        acc_t vd = vi;
        if constexpr (kAms) {
          vd = nan_max(static_cast<acc_t>(vmax[i]), vi);
          vmax[i] = static_cast<scalar_t>(vd);
        }
        if (R.frozen[b]) continue;
        const acc_t denom = std::sqrt(vd) / bc2 + eps;
        p[i] = static_cast<scalar_t>(static_cast<acc_t>(p[i]) * R.decay[b] + R.neg_step[b] * mi / denom);
      }
    }
  }
}

// The same loop compiled twice: for the build's baseline ISA and, on x86-64, for AVX2 (8 fp32
// lanes; chosen at run time). No FMA: contraction would change the rounding against torch.
template <typename scalar_t, typename acc_t, bool kLerpHigh, bool kMaximize, bool kAms>
void step_base(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax, const uint8_t* bits,
               int64_t lo, int64_t hi, const Rates<acc_t>& R, acc_t w1, acc_t beta2, acc_t w2, acc_t eps) {
  step_range<scalar_t, acc_t, kLerpHigh, kMaximize, kAms>(p, g, m, v, vmax, bits, lo, hi, R, w1, beta2, w2, eps);
}
#if defined(__x86_64__) && defined(__GNUC__)
#define GK_AVX2_CLONE 1

// ---- float16 / bfloat16 on AVX2 + F16C (session 44). The generic loop converts each entry through c10's scalar
// conversions (the build targets x86-64-v2: no F16C, so float16 goes through bit tricks), which kept the compiler
// from vectorising it: 21 ms (bf16) / 41 ms (fp16) a step for 4 x 1024^2 entries at 2 threads, against 3.2 ms for
// float32 and torch's fused AdamW's 2.3-2.7 ms. Here 8 entries at a time are widened exactly into float arrays
// (VCVTPH2PS; bfloat16 is the high half of a float), run through the same float lane math as the generic loop
// (step_half_avx2's inner loop: the same operations in the same order, so the same float values), and narrowed as
// c10 narrows:
// round to nearest even, NaN -> 0x7FC0 (bfloat16) / sign | 0x7E00 (float16; VCVTPS2PH keeps NaN payloads, c10's
// software conversion does not); frozen entries keep their exact old bits.
__attribute__((target("avx2,f16c"))) inline __m256 widen8(const c10::BFloat16* x) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
__attribute__((target("avx2,f16c"))) inline __m256 widen8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
__attribute__((target("avx2,f16c"))) inline __m128i narrow8(__m256 v, const c10::BFloat16*) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
__attribute__((target("avx2,f16c"))) inline __m128i narrow8(__m256 v, const c10::Half*) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i nan = _mm_and_si128(
      _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7C00)), _mm_set1_epi16(0x7C00)),
      _mm_xor_si128(_mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x03FF)), _mm_setzero_si128()),
                    _mm_set1_epi16(-1)));
  const __m128i canon = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))),
                                     _mm_set1_epi16(0x7E00));
  return _mm_blendv_epi8(h, canon, nan);
}

template <typename scalar_t, typename acc_t, bool kLerpHigh, bool kMaximize, bool kAms>
__attribute__((target("avx2,f16c"))) void step_half_avx2(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                                                         scalar_t* __restrict__ m, scalar_t* __restrict__ v,
                                                         scalar_t* __restrict__ vmax, const uint8_t* bits, int64_t lo,
                                                         int64_t hi, const Rates<acc_t>& R, acc_t w1, acc_t beta2,
                                                         acc_t w2, acc_t eps) {
  static_assert(std::is_same_v<acc_t, float>);
  const acc_t one_m_w1 = acc_t(1) - w1, bc2 = R.bc2sqrt;
  const acc_t d0 = R.decay[0], d1 = R.decay[1], s0 = R.neg_step[0], s1 = R.neg_step[1];
  const int f0 = R.frozen[0], f1 = R.frozen[1];
  int64_t i0 = lo;
  for (; i0 + 8 <= hi; i0 += 8) {
    const unsigned byte = bits ? bits[i0 >> 3] : 0u;
    alignas(32) float gf[8], mf[8], vf[8], pf[8], xf[8], mo[8], vo[8], po[8], xo[8];
    _mm256_store_ps(gf, widen8(g + i0));
    _mm256_store_ps(mf, widen8(m + i0));
    _mm256_store_ps(vf, widen8(v + i0));
    _mm256_store_ps(pf, widen8(p + i0));
    if constexpr (kAms) _mm256_store_ps(xf, widen8(vmax + i0));
#pragma omp simd
    for (int j = 0; j < 8; ++j) {  // the generic loop's lane math, on the widened values
      const int b = (int)((byte >> j) & 1u);
      acc_t gi = gf[j];
      if constexpr (kMaximize) gi = -gi;
      acc_t mi = mf[j];
      mi = kLerpHigh ? gi - (gi - mi) * one_m_w1 : mi + w1 * (gi - mi);
      const acc_t vi = vf[j] * beta2 + w2 * gi * gi;
      mo[j] = mi;
      vo[j] = vi;
      acc_t vd = vi;
      if constexpr (kAms) {
        vd = nan_max(xf[j], vi);
        xo[j] = vd;
      }
      const acc_t denom = std::sqrt(vd) / bc2 + eps;
      const acc_t dd = b ? d1 : d0, ss = b ? s1 : s0;
      po[j] = pf[j] * dd + ss * mi / denom;
    }
    const scalar_t* tag = nullptr;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(m + i0), narrow8(_mm256_load_ps(mo), tag));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v + i0), narrow8(_mm256_load_ps(vo), tag));
    if constexpr (kAms) _mm_storeu_si128(reinterpret_cast<__m128i*>(vmax + i0), narrow8(_mm256_load_ps(xo), tag));
    alignas(16) uint16_t pn[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(pn), narrow8(_mm256_load_ps(po), tag));
    uint16_t* pr = reinterpret_cast<uint16_t*>(p + i0);
    for (int j = 0; j < 8; ++j)  // rate 0: the exact old value
      if (!(((byte >> j) & 1u) ? f1 : f0)) pr[j] = pn[j];
  }
  if (i0 < hi)  // the last < 8 entries: the generic loop's tail
    step_range<scalar_t, acc_t, kLerpHigh, kMaximize, kAms>(p, g, m, v, vmax, bits, i0, hi, R, w1, beta2, w2, eps);
}

template <typename scalar_t, typename acc_t, bool kLerpHigh, bool kMaximize, bool kAms>
__attribute__((target("avx2"))) void step_avx2(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v,
                                               scalar_t* vmax, const uint8_t* bits, int64_t lo, int64_t hi,
                                               const Rates<acc_t>& R, acc_t w1, acc_t beta2, acc_t w2, acc_t eps) {
  step_range<scalar_t, acc_t, kLerpHigh, kMaximize, kAms>(p, g, m, v, vmax, bits, lo, hi, R, w1, beta2, w2, eps);
}
#endif

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& bits, double masked_lr,
                      double unmasked_lr, double beta1, double beta2, double eps, double weight_decay,
                      at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2_sqrt,
                      bool maximize, std::optional<at::TensorList> max_exp_avg_sqs) {
  if (!check_args(params, grads, exp_avgs, exp_avg_sqs, bits, masked_lr, unmasked_lr, beta1, beta2, eps,
                  weight_decay, bias_correction1, bias_correction2_sqrt, max_exp_avg_sqs)) {
    return;
  }
  const bool ams = max_exp_avg_sqs.has_value();
  const size_t n = params.size();
  const at::Tensor& p0 = params[0];
  std::vector<Item> work;
  for (size_t t = 0; t < n; ++t)
    for (int64_t lo = 0; lo < params[t].numel(); lo += kChunk)
      work.push_back({(int64_t)t, lo, std::min<int64_t>(params[t].numel(), lo + kChunk)});
  const double lr[2] = {unmasked_lr, masked_lr};
#ifdef GK_AVX2_CLONE
  static const bool avx2 = __builtin_cpu_supports("avx2");
  static const bool f16c = avx2 && __builtin_cpu_supports("f16c");
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p0.scalar_type(), "masked_adamw_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<Rates<acc_t>> rates(n);
    std::vector<scalar_t*> P(n), M(n), V(n), VM(n, nullptr);
    std::vector<const scalar_t*> G(n);
    std::vector<const uint8_t*> B(n);
    for (size_t t = 0; t < n; ++t) {
      for (int r = 0; r < 2; ++r) {
        rates[t].decay[r] = static_cast<acc_t>(1.0 - lr[r] * weight_decay);
        rates[t].neg_step[r] = static_cast<acc_t>(-(lr[r] / bias_correction1[t]));
        rates[t].frozen[r] = lr[r] == 0.0;
      }
      rates[t].bc2sqrt = static_cast<acc_t>(bias_correction2_sqrt[t]);
      P[t] = params[t].data_ptr<scalar_t>();
      G[t] = grads[t].data_ptr<scalar_t>();
      M[t] = exp_avgs[t].data_ptr<scalar_t>();
      V[t] = exp_avg_sqs[t].data_ptr<scalar_t>();
      if (ams) VM[t] = (*max_exp_avg_sqs)[t].data_ptr<scalar_t>();
      B[t] = bits.get(t).has_value() ? bits.get(t)->data_ptr<uint8_t>() : nullptr;
    }
    const acc_t w1 = static_cast<acc_t>(1.0 - beta1), b2 = static_cast<acc_t>(beta2),
                w2 = static_cast<acc_t>(1.0 - beta2), ep = static_cast<acc_t>(eps);
    at::parallel_for(0, (int64_t)work.size(), 1, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) {
        const Item& it = work[w];
        auto run = [&](auto hi_lerp, auto maxim, auto amsgrad) {
          constexpr bool kH = decltype(hi_lerp)::value, kM = decltype(maxim)::value,
                         kA = decltype(amsgrad)::value;
#ifdef GK_AVX2_CLONE
          if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
            if (f16c) {
              step_half_avx2<scalar_t, acc_t, kH, kM, kA>(P[it.t], G[it.t], M[it.t], V[it.t], VM[it.t], B[it.t],
                                                          it.lo, it.hi, rates[it.t], w1, b2, w2, ep);
              return;
            }
          }
          if (avx2) {
            step_avx2<scalar_t, acc_t, kH, kM, kA>(P[it.t], G[it.t], M[it.t], V[it.t], VM[it.t], B[it.t], it.lo,
                                                   it.hi, rates[it.t], w1, b2, w2, ep);
            return;
          }
#endif
          step_base<scalar_t, acc_t, kH, kM, kA>(P[it.t], G[it.t], M[it.t], V[it.t], VM[it.t], B[it.t], it.lo, it.hi,
                                                 rates[it.t], w1, b2, w2, ep);
        };
        using T = std::true_type;
        using F = std::false_type;
        const bool hl = w1 >= acc_t(0.5);
        auto with_ams = [&](auto hi_lerp, auto maxim) { ams ? run(hi_lerp, maxim, T{}) : run(hi_lerp, maxim, F{}); };
        if (hl) maximize ? with_ams(T{}, T{}) : with_ams(T{}, F{});
        else maximize ? with_ams(F{}, T{}) : with_ams(F{}, F{});
      }
    });
  });
}

}  // namespace
}  // namespace adamw
}  // namespace gradkit

TORCH_LIBRARY_IMPL(gradkit, CPU, m) { m.impl("masked_adamw_", &gradkit::adamw::masked_adamw_cpu); }

// CUDA kernel of the fused masked AdamW step. Semantics: python/gradkit/kernels/reference/adamw.py;
// the op mirrors csrc/cpu/adamw.cpp (same checks, same messages, same per-entry op order).
//
// Headers: only c10/cuda/* (as in parammap.cu: no ATen/cuda/CUDAContext.h, so the source also
// compiles in scripts/nvcc_check.sh against the CPU wheel's headers).
//
// ONE launch updates every tensor of the call (multi-tensor apply): the host packs one AdamTensor
// row per non-empty tensor into a pinned buffer and uploads it with one async H2D copy. Work is cut
// into tiles of kTile entries; tiles are numbered globally in tensor order (AdamTensor::first_tile
// is the exclusive prefix of the per-tensor tile counts) and a block owning tile t finds its tensor
// by binary search. Blocks loop grid-stride over tiles.
//
// Within a tile a thread handles "units" of 8 consecutive entries = one mask byte: param, grad,
// exp_avg, exp_avg_sq are each read once and written once, the mask byte read once. When the four
// tensors are 16-byte aligned (then every unit is, since 8 entries are >= 16 bytes) a full unit
// moves as 16-byte vector accesses; the tail unit and unaligned tensors go entry by entry.
//
// Arithmetic: float32 (float64 for float64 tensors) with explicitly rounded intrinsics
// (__fmul_rn, __fdiv_rn, __fsqrt_rn, ...), so nvcc contracts nothing into an FMA and every step
// rounds like the CPU kernel's. An entry whose rate is 0 keeps its bits (a vector unit writes
// them back as read).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../adamw_checks.h"
#include "common.cuh"

namespace gradkit {
namespace adamw_cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kTileUnits = kThreads * 2;  // units (mask bytes) per tile
constexpr int64_t kTile = kTileUnits * 8;     // 4096 entries per tile

using gradkit::cuda::sm_count;

// At most 8 resident 256-thread blocks per SM; the kernel loops grid-stride over the rest.
int64_t grid_for(int64_t work, int dev) {
  return std::max<int64_t>(1, std::min(work, static_cast<int64_t>(sm_count(dev)) * 8));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct AdamTensor {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;           // AMSGrad's running maximum of v; null: no AMSGrad
  const uint8_t* bits;  // null: no entry is masked
  int64_t numel;
  int64_t first_tile;
  double neg_step[2];   // -(lr / bias_correction1) for [unmasked, masked]
  double bc2sqrt;
  int32_t vec_ok;       // p, g, m, v (and vmax) all 16-byte aligned
  int32_t pad;
};
static_assert(sizeof(AdamTensor) % 8 == 0, "AdamTensor must keep 8-byte alignment in the packed table");

// Per-call constants in the compute type A (index 0: unmasked rate, 1: masked rate).
template <typename A>
struct Consts {
  A decay[2];  // 1 - lr * weight_decay (formed in double, then rounded, like torch's scalar)
  A w1;        // 1 - beta1, the lerp weight
  A omw1;      // 1 - w1 in A (torch.lerp's large-weight formula)
  A beta2;
  A w2;        // 1 - beta2
  A eps;
  bool frozen[2];  // lr == 0: the entry keeps its exact value
  bool small;      // |w1| < 0.5: lerp's m + w (g - m) formula
  bool maximize;
};

// Correctly rounded scalar ops that nvcc will not contract.
template <typename A>
struct RN;
template <>
struct RN<float> {
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
  static __device__ __forceinline__ float sqrt(float a) { return __fsqrt_rn(a); }
};
template <>
struct RN<double> {
  static __device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
  static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
  static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
  static __device__ __forceinline__ double sqrt(double a) { return __dsqrt_rn(a); }
};

// One entry, torch.optim.AdamW's single-tensor op order. `sel` picks the rate (1: masked).
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {  // torch.maximum: NaN when either is NaN
  return (a > b || a != a) ? a : b;
}

// vmax: AMSGrad's running maximum (nullptr: none); the denominator takes max(vmax, the new v), which is stored.
template <typename T, typename A>
__device__ __forceinline__ void adam_entry(T& p, T g_in, T& m, T& v, T* vmax, int sel, const Consts<A>& c,
                                           const A (&neg_step)[2], A bc2sqrt) {
  using R = RN<A>;
  A g = static_cast<A>(g_in);
  if (c.maximize) g = -g;
  A mi = static_cast<A>(m);
  mi = c.small ? R::add(mi, R::mul(c.w1, R::sub(g, mi))) : R::sub(g, R::mul(R::sub(g, mi), c.omw1));
  const A vi = R::add(R::mul(static_cast<A>(v), c.beta2), R::mul(R::mul(c.w2, g), g));
  m = static_cast<T>(mi);
  v = static_cast<T>(vi);
  A vd = vi;
  if (vmax != nullptr) {
    vd = nan_max(static_cast<A>(*vmax), vi);
    *vmax = static_cast<T>(vd);
  }
  if (c.frozen[sel]) return;
  const A pi = R::mul(static_cast<A>(p), c.decay[sel]);
  const A denom = R::add(R::div(R::sqrt(vd), bc2sqrt), c.eps);
  p = static_cast<T>(R::add(pi, R::div(R::mul(neg_step[sel], mi), denom)));
}

// 8 entries (one mask byte) as sizeof(T) / 2 16-byte vectors.
template <typename T>
struct alignas(16) Unit {
  T v[8];
};
constexpr int vecs_per_unit(int elem_size) { return elem_size / 2; }

template <typename T>
__device__ __forceinline__ Unit<T> load_unit(const T* base, int64_t q) {
  Unit<T> u;
  const uint4* src = reinterpret_cast<const uint4*>(base + q * 8);
  uint4* dst = reinterpret_cast<uint4*>(&u);
#pragma unroll
  for (int k = 0; k < vecs_per_unit(sizeof(T)); ++k) dst[k] = src[k];
  return u;
}

template <typename T>
__device__ __forceinline__ Unit<T> load_unit_ro(const T* base, int64_t q) {
  Unit<T> u;
  const uint4* src = reinterpret_cast<const uint4*>(base + q * 8);
  uint4* dst = reinterpret_cast<uint4*>(&u);
#pragma unroll
  for (int k = 0; k < vecs_per_unit(sizeof(T)); ++k) dst[k] = __ldg(src + k);
  return u;
}

template <typename T>
__device__ __forceinline__ void store_unit(T* base, int64_t q, const Unit<T>& u) {
  uint4* dst = reinterpret_cast<uint4*>(base + q * 8);
  const uint4* src = reinterpret_cast<const uint4*>(&u);
#pragma unroll
  for (int k = 0; k < vecs_per_unit(sizeof(T)); ++k) dst[k] = src[k];
}

using gradkit::cuda::find_seg;

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    masked_adamw_kernel(const AdamTensor* __restrict__ ts, int nt, int64_t tiles, Consts<A> c) {
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const AdamTensor& t = ts[find_seg(ts, nt, tile)];
    const A neg_step[2] = {static_cast<A>(t.neg_step[0]), static_cast<A>(t.neg_step[1])};
    const A bc2sqrt = static_cast<A>(t.bc2sqrt);
    T* __restrict__ p = static_cast<T*>(t.p);
    const T* __restrict__ g = static_cast<const T*>(t.g);
    T* __restrict__ m = static_cast<T*>(t.m);
    T* __restrict__ v = static_cast<T*>(t.v);
    T* __restrict__ vmax = static_cast<T*>(t.vmax);
    const uint8_t* __restrict__ bits = t.bits;
    const int64_t numel = t.numel;
    const int64_t u0 = (tile - t.first_tile) * kTileUnits;
    const int64_t u1 = std::min<int64_t>((numel + 7) / 8, u0 + kTileUnits);
    for (int64_t q = u0 + threadIdx.x; q < u1; q += blockDim.x) {
      const unsigned byte = bits ? static_cast<unsigned>(bits[q]) : 0u;
      const int64_t e0 = q * 8;
      if (t.vec_ok && e0 + 8 <= numel) {
        Unit<T> P = load_unit(p, q), M = load_unit(m, q), V = load_unit(v, q), VM;
        if (vmax != nullptr) VM = load_unit(vmax, q);
        const Unit<T> G = load_unit_ro(g, q);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          adam_entry<T, A>(P.v[j], G.v[j], M.v[j], V.v[j], vmax != nullptr ? &VM.v[j] : nullptr, (byte >> j) & 1u, c,
                           neg_step, bc2sqrt);
        }
        store_unit(p, q, P);  // frozen entries were not touched: their bits are written back as read
        store_unit(m, q, M);
        store_unit(v, q, V);
        if (vmax != nullptr) store_unit(vmax, q, VM);
      } else {
        const int64_t e1 = std::min<int64_t>(e0 + 8, numel);
        for (int64_t e = e0; e < e1; ++e) {
          adam_entry<T, A>(p[e], g[e], m[e], v[e], vmax != nullptr ? vmax + e : nullptr, (byte >> (e - e0)) & 1u, c,
                           neg_step, bc2sqrt);
        }
      }
    }
  }
}

// The checks of csrc/cpu/adamw.cpp, with its messages.
using gradkit::adamw::check_args;

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const c10::List<std::optional<Tensor>>& bits, double masked_lr,
                       double unmasked_lr, double beta1, double beta2, double eps, double weight_decay,
                       at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2_sqrt,
                       bool maximize, std::optional<at::TensorList> max_exp_avg_sqs) {
  if (!check_args(params, grads, exp_avgs, exp_avg_sqs, bits, masked_lr, unmasked_lr, beta1, beta2, eps,
                  weight_decay, bias_correction1, bias_correction2_sqrt, max_exp_avg_sqs)) {
    return;
  }
  const at::Device device = params[0].device();
  TORCH_CHECK_VALUE(cuda::on_device(device), "params[0]: expected a CUDA tensor, got one on ", device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const double lr[2] = {unmasked_lr, masked_lr};
  std::vector<int64_t> live;
  for (const auto i : c10::irange(params.size())) {
    if (params[i].numel() > 0) live.push_back(static_cast<int64_t>(i));
  }
  if (live.empty()) return;
  const int64_t bytes = static_cast<int64_t>(live.size() * sizeof(AdamTensor));
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(cuda::kPinnedStaging));
  std::memset(host.data_ptr(), 0, bytes);  // struct padding deterministic
  AdamTensor* rows = reinterpret_cast<AdamTensor*>(host.data_ptr<uint8_t>());
  int64_t tiles = 0;
  for (const auto k : c10::irange(live.size())) {
    const int64_t i = live[k];
    AdamTensor& r = rows[k];
    r.p = params[i].data_ptr();
    r.g = grads[i].data_ptr();
    r.m = exp_avgs[i].data_ptr();
    r.v = exp_avg_sqs[i].data_ptr();
    r.vmax = max_exp_avg_sqs.has_value() ? (*max_exp_avg_sqs)[i].data_ptr() : nullptr;
    const auto& b = bits.get(i);
    r.bits = b.has_value() ? b->data_ptr<uint8_t>() : nullptr;
    r.numel = params[i].numel();
    r.first_tile = tiles;
    tiles += (r.numel + kTile - 1) / kTile;
    for (int s = 0; s < 2; ++s) r.neg_step[s] = -(lr[s] / bias_correction1[i]);
    r.bc2sqrt = bias_correction2_sqrt[i];
    r.vec_ok = aligned16(r.p) && aligned16(r.g) && aligned16(r.m) && aligned16(r.v) &&
               (r.vmax == nullptr || aligned16(r.vmax));
  }
  // Pinned source + non_blocking: one async H2D copy on the current stream; ATen records the
  // pinned block's use on that stream so it is not recycled before the copy ran.
  const Tensor table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  table.copy_(host, /*non_blocking=*/true);
  const AdamTensor* dev_rows = reinterpret_cast<const AdamTensor*>(table.data_ptr<uint8_t>());
  const int64_t grid = grid_for(tiles, device.index());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "masked_adamw_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Consts<A> c;
    for (int s = 0; s < 2; ++s) {
      c.decay[s] = static_cast<A>(1.0 - lr[s] * weight_decay);
      c.frozen[s] = lr[s] == 0.0;
    }
    c.w1 = static_cast<A>(1.0 - beta1);
    c.omw1 = static_cast<A>(1) - c.w1;
    c.beta2 = static_cast<A>(beta2);
    c.w2 = static_cast<A>(1.0 - beta2);
    c.eps = static_cast<A>(eps);
    c.small = std::abs(c.w1) < static_cast<A>(0.5);
    c.maximize = maximize;
    GK_LAUNCH((masked_adamw_kernel<scalar_t, A>), static_cast<unsigned>(grid), kThreads, 0, stream, dev_rows,
              static_cast<int>(live.size()), tiles, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace adamw_cuda

TORCH_LIBRARY_IMPL(gradkit, CUDA, m) { m.impl("masked_adamw_", &adamw_cuda::masked_adamw_cuda); }

}  // namespace gradkit

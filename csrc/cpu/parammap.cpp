// CPU kernels for the param-map family (masked multi-tensor gather/scatter,
// selection encodings, exact top-k select). Semantics: python/gradkit/kernels/reference/parammap.py.
//
// Every multi-tensor op runs as ONE parallel region over a work list of
// (segment, chunk) items, so a map of 52 tensors with very different sizes keeps
// both cores busy and no per-tensor temporary or torch.cat is ever made.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "../segments.h"

namespace gradkit {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// gather / scatter
// ---------------------------------------------------------------------------

template <typename I>
inline int64_t strided_offset(I flat, const SegView& v) {
  int64_t f = static_cast<int64_t>(flat), off = 0;
  for (int d = v.ndim - 1; d >= 0; --d) {
    const int64_t s = v.sizes[d];
    off += (f % s) * v.strides[d];
    f /= s;
  }
  return off;
}

// out[j] (+)= cast(src[idx[j]]) for j in [lo, hi) of one segment.
template <typename S, typename D, typename I>
void gather_chunk(const SegView& v, const I* idx, D* out, int64_t lo, int64_t hi, bool acc,
                  std::atomic<bool>& bad) {
  const S* src = static_cast<const S*>(v.data);
  if (idx == nullptr) {
    if (v.contiguous) {
      if (!acc && std::is_same<S, D>::value) {
        std::memcpy(out + lo, src + lo, sizeof(D) * (hi - lo));
      } else if (acc) {
        for (int64_t j = lo; j < hi; ++j) out[j] = static_cast<D>(out[j] + static_cast<D>(src[j]));
      } else {
        for (int64_t j = lo; j < hi; ++j) out[j] = static_cast<D>(src[j]);
      }
    } else {
      for (int64_t j = lo; j < hi; ++j) {
        const D x = static_cast<D>(src[strided_offset(j, v)]);
        out[j] = acc ? static_cast<D>(out[j] + x) : x;
      }
    }
    return;
  }
  const uint64_t n = static_cast<uint64_t>(v.numel);
  bool oob = false;
  if (v.contiguous) {
    for (int64_t j = lo; j < hi; ++j) {
      uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(idx[j]));
      oob |= (k >= n);
      k = k < n ? k : 0;  // never read out of bounds; the error is raised after the region
      const D x = static_cast<D>(src[k]);
      out[j] = acc ? static_cast<D>(out[j] + x) : x;
    }
  } else {
    for (int64_t j = lo; j < hi; ++j) {
      uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(idx[j]));
      oob |= (k >= n);
      k = k < n ? k : 0;
      const D x = static_cast<D>(src[strided_offset(k, v)]);
      out[j] = acc ? static_cast<D>(out[j] + x) : x;
    }
  }
  if (oob) bad.store(true, std::memory_order_relaxed);
}

// dst[idx[j]] (+)= cast(scale * flat[j]) for j in [lo, hi) of one segment.
template <typename F, typename D, typename I>
void scatter_chunk(const F* flat, const I* idx, const SegView& v, int64_t lo, int64_t hi, double scale,
                   bool acc, std::atomic<bool>& bad) {
  D* dst = static_cast<D*>(v.data);
  const bool unit = scale == 1.0;
  auto val = [&](int64_t j) -> D {
    if (unit) return static_cast<D>(flat[j]);
    return static_cast<D>(static_cast<float>(static_cast<double>(flat[j]) * scale));
  };
  auto val_exact = [&](int64_t j) -> double { return static_cast<double>(flat[j]) * scale; };
  const uint64_t n = static_cast<uint64_t>(v.numel);
  bool oob = false;
  for (int64_t j = lo; j < hi; ++j) {
    int64_t off;
    if (idx == nullptr) {
      off = v.contiguous ? j : strided_offset(j, v);
    } else {
      const uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(idx[j]));
      if (k >= n) {
        oob = true;
        continue;
      }
      off = v.contiguous ? static_cast<int64_t>(k) : strided_offset(k, v);
    }
    if (acc) {
      dst[off] = static_cast<D>(static_cast<double>(dst[off]) + val_exact(j));
    } else if (std::is_same<D, double>::value) {
      dst[off] = static_cast<D>(val_exact(j));
    } else {
      dst[off] = val(j);
    }
  }
  if (oob) bad.store(true, std::memory_order_relaxed);
}

constexpr int64_t kGrain = 1 << 15;  // elements per work item

struct WorkItem {
  int32_t seg;
  int64_t lo, hi;  // range inside the segment's selection
};

std::vector<WorkItem> make_work(const std::vector<int64_t>& counts) {
  std::vector<WorkItem> w;
  for (const auto s : c10::irange(counts.size())) {
    for (int64_t lo = 0; lo < counts[s]; lo += kGrain) {
      w.push_back({static_cast<int32_t>(s), lo, std::min(counts[s], lo + kGrain)});
    }
  }
  return w;
}

#define GK_DISPATCH_FLOAT(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, __VA_ARGS__)

void gather_impl(at::TensorList src, const c10::List<std::optional<Tensor>>& index, Tensor& out,
                 bool accumulate) {
  const auto segs = make_segments(src, index, "src");
  std::vector<int64_t> counts(segs.size()), offs(segs.size());
  int64_t total = 0;
  for (const auto s : c10::irange(segs.size())) {
    counts[s] = segs[s].count;
    offs[s] = total;
    total += counts[s];
  }
  TORCH_CHECK_VALUE(out.dim() == 1 && out.numel() == total, "out: expected a 1-D tensor of ", total,
                    " elements, got shape ", out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: must be contiguous");
  if (total == 0) return;
  const auto work = make_work(counts);
  std::atomic<bool> bad{false};
  at::ScalarType dt = out.scalar_type();
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const auto& it = work[w];
      const SegView& v = segs[it.seg].view;
      const Tensor& idx = segs[it.seg].index;
      GK_DISPATCH_FLOAT(v.dtype, "gather_src", [&] {
        using S = scalar_t;
        GK_DISPATCH_FLOAT(dt, "gather_out", [&] {
          using D = scalar_t;
          D* o = out.data_ptr<D>() + offs[it.seg];
          if (!idx.defined()) {
            gather_chunk<S, D, int32_t>(v, nullptr, o, it.lo, it.hi, accumulate, bad);
          } else if (idx.scalar_type() == at::kInt) {
            gather_chunk<S, D, int32_t>(v, idx.data_ptr<int32_t>(), o, it.lo, it.hi, accumulate, bad);
          } else {
            gather_chunk<S, D, int64_t>(v, idx.data_ptr<int64_t>(), o, it.lo, it.hi, accumulate, bad);
          }
        });
      });
    }
  });
  TORCH_CHECK_INDEX(!bad.load(), "index: a position is out of range for its segment");
}

Tensor gather_segments_cpu(at::TensorList src, const c10::List<std::optional<Tensor>>& index,
                           std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(src.size() == index.size(), "index: expected ", src.size(), " entries, got ",
                    index.size());
  at::ScalarType dt = dtype.has_value() ? *dtype : (src.empty() ? at::kFloat : src[0].scalar_type());
  if (!dtype.has_value()) {
    for (const auto& s : src) dt = at::promote_types(dt, s.scalar_type());
  }
  int64_t total = 0;
  for (const auto i : c10::irange(src.size())) {
    const auto ix = index.get(i);
    total += ix.has_value() ? ix->numel() : src[i].numel();
  }
  Tensor out = at::empty({total}, at::TensorOptions().dtype(dt).device(at::kCPU));
  gather_impl(src, index, out, false);
  return out;
}

void gather_segments_out_cpu(at::TensorList src, const c10::List<std::optional<Tensor>>& index,
                             const Tensor& out, bool accumulate) {
  Tensor o = out;
  gather_impl(src, index, o, accumulate);
}

void scatter_impl(const Tensor& flat, const c10::List<std::optional<Tensor>>& index,
                  at::TensorList dst, double scale, bool accumulate) {
  const auto segs = make_segments(dst, index, "dst");
  TORCH_CHECK_VALUE(flat.dim() == 1, "flat: expected a 1-D tensor, got shape ", flat.sizes());
  std::vector<int64_t> counts(segs.size()), offs(segs.size());
  int64_t total = 0;
  for (const auto s : c10::irange(segs.size())) {
    counts[s] = segs[s].count;
    offs[s] = total;
    total += counts[s];
  }
  TORCH_CHECK_VALUE(flat.numel() == total, "flat: expected ", total, " elements, got ", flat.numel());
  if (total == 0) return;
  const Tensor f = flat.contiguous();
  const auto work = make_work(counts);
  std::atomic<bool> bad{false};
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const auto& it = work[w];
      const SegView& v = segs[it.seg].view;
      const Tensor& idx = segs[it.seg].index;
      GK_DISPATCH_FLOAT(f.scalar_type(), "scatter_flat", [&] {
        using F = scalar_t;
        GK_DISPATCH_FLOAT(v.dtype, "scatter_dst", [&] {
          using D = scalar_t;
          const F* fp = f.data_ptr<F>() + offs[it.seg];
          if (!idx.defined()) {
            scatter_chunk<F, D, int32_t>(fp, nullptr, v, it.lo, it.hi, scale, accumulate, bad);
          } else if (idx.scalar_type() == at::kInt) {
            scatter_chunk<F, D, int32_t>(fp, idx.data_ptr<int32_t>(), v, it.lo, it.hi, scale, accumulate, bad);
          } else {
            scatter_chunk<F, D, int64_t>(fp, idx.data_ptr<int64_t>(), v, it.lo, it.hi, scale, accumulate, bad);
          }
        });
      });
    }
  });
  TORCH_CHECK_INDEX(!bad.load(), "index: a position is out of range for its segment");
}

std::vector<Tensor> scatter_segments_cpu(const Tensor& flat, const c10::List<std::optional<Tensor>>& index,
                                         c10::IntArrayRef numel, double scale) {
  TORCH_CHECK_VALUE(numel.size() == index.size(), "numel: expected ", index.size(), " entries, got ",
                    numel.size());
  std::vector<Tensor> outs;
  outs.reserve(numel.size());
  for (const auto n : numel) {
    TORCH_CHECK_VALUE(n >= 0, "numel: sizes must be non-negative");
    outs.push_back(at::zeros({n}, flat.options()));
  }
  scatter_impl(flat, index, outs, scale, false);
  return outs;
}

void scatter_segments__cpu(const Tensor& flat, const c10::List<std::optional<Tensor>>& index,
                           at::TensorList dst, double scale, bool accumulate) {
  scatter_impl(flat, index, dst, scale, accumulate);
}

// ---------------------------------------------------------------------------
// selection encodings
// ---------------------------------------------------------------------------

constexpr int64_t kScanChunk = 1 << 16;

template <typename I>
void mask_to_indices_kernel(const uint8_t* m, int64_t n, I* out, const std::vector<int64_t>& starts) {
  const int64_t nchunks = static_cast<int64_t>(starts.size());
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t lo = c * kScanChunk, hi = std::min(n, lo + kScanChunk);
      int64_t p = starts[c];
      for (int64_t j = lo; j < hi; ++j) {
        if (m[j]) out[p++] = static_cast<I>(j);
      }
    }
  });
}

// Exclusive prefix sum of per-chunk counts computed in parallel by `count(c)`.
template <typename CountFn>
std::vector<int64_t> chunk_starts(int64_t nchunks, CountFn count, int64_t* total) {
  std::vector<int64_t> cnt(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) cnt[c] = count(c);
  });
  std::vector<int64_t> starts(nchunks);
  int64_t acc = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    starts[c] = acc;
    acc += cnt[c];
  }
  *total = acc;
  return starts;
}

void check_index_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kInt || dtype == at::kLong, "dtype: must be torch.int32 or torch.int64, got ",
                   dtype);
}

Tensor mask_to_indices_cpu(const Tensor& mask, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask: expected a bool tensor, got ", mask.scalar_type());
  check_index_dtype(dtype);
  const Tensor m = mask.contiguous();
  const int64_t n = m.numel();
  TORCH_CHECK_VALUE(dtype == at::kLong || n <= INT32_MAX, "dtype: int32 cannot address ", n, " elements");
  const uint8_t* p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const int64_t nchunks = (n + kScanChunk - 1) / kScanChunk;
  int64_t total = 0;
  auto starts = chunk_starts(
      nchunks,
      [&](int64_t c) {
        const int64_t lo = c * kScanChunk, hi = std::min(n, lo + kScanChunk);
        int64_t s = 0;
        for (int64_t j = lo; j < hi; ++j) s += (p[j] != 0);
        return s;
      },
      &total);
  Tensor out = at::empty({total}, at::TensorOptions().dtype(dtype));
  if (dtype == at::kInt) {
    mask_to_indices_kernel<int32_t>(p, n, out.data_ptr<int32_t>(), starts);
  } else {
    mask_to_indices_kernel<int64_t>(p, n, out.data_ptr<int64_t>(), starts);
  }
  return out;
}

Tensor bitmask_to_indices_cpu(const Tensor& bits, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, "bits: expected a uint8 tensor, got ", bits.scalar_type());
  check_index_dtype(dtype);
  TORCH_CHECK_VALUE(numel >= 0, "numel: must be non-negative");
  const int64_t nbytes = (numel + 7) / 8;
  TORCH_CHECK_VALUE(bits.dim() == 1 && bits.numel() == nbytes, "bits: expected ", nbytes,
                    " bytes for numel=", numel, ", got shape ", bits.sizes());
  TORCH_CHECK_VALUE(dtype == at::kLong || numel <= INT32_MAX, "dtype: int32 cannot address ", numel, " elements");
  const Tensor b = bits.contiguous();
  const uint8_t* p = b.data_ptr<uint8_t>();
  if (numel % 8 != 0) {
    const uint8_t tail = p[nbytes - 1] >> (numel % 8);
    TORCH_CHECK_VALUE(tail == 0, "bits: bits are set beyond numel=", numel);
  }
  constexpr int64_t kBytes = kScanChunk / 8;
  const int64_t nchunks = (nbytes + kBytes - 1) / kBytes;
  int64_t total = 0;
  auto starts = chunk_starts(
      nchunks,
      [&](int64_t c) {
        const int64_t lo = c * kBytes, hi = std::min(nbytes, lo + kBytes);
        int64_t s = 0;
        for (int64_t j = lo; j < hi; ++j) s += __builtin_popcount(p[j]);
        return s;
      },
      &total);
  Tensor out = at::empty({total}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_INDEX_TYPES(dtype, "bitmask_to_indices", [&] {
    index_t* o = out.data_ptr<index_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t lo = c * kBytes, hi = std::min(nbytes, lo + kBytes);
        int64_t q = starts[c];
        for (int64_t j = lo; j < hi; ++j) {
          unsigned x = p[j];
          while (x) {
            o[q++] = static_cast<index_t>(j * 8 + __builtin_ctz(x));
            x &= x - 1;
          }
        }
      }
    });
  });
  return out;
}

Tensor pack_bitmask_cpu(const Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask: expected a bool tensor, got ", mask.scalar_type());
  const Tensor m = mask.contiguous();
  const int64_t n = m.numel(), nbytes = (n + 7) / 8;
  Tensor out = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
  const uint8_t* p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, nbytes, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t base = i * 8, lim = std::min<int64_t>(8, n - base);
      uint8_t x = 0;
      for (int64_t j = 0; j < lim; ++j) x |= static_cast<uint8_t>((p[base + j] != 0) << j);
      o[i] = x;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// exact top-k select (radix select on order-preserving integer keys)
// ---------------------------------------------------------------------------

// Maps a float to an unsigned key whose integer order is the float order (+0 and -0 equal).
inline uint32_t f32_key(float x) {
  if (x == 0.0f) x = 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t f64_key(double x) {
  if (x == 0.0) x = 0.0;
  uint64_t u;
  std::memcpy(&u, &x, 8);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

template <typename K>
struct KeyOf;
template <>
struct KeyOf<uint32_t> {
  template <typename T>
  static uint32_t get(T v) { return f32_key(static_cast<float>(v)); }
};
template <>
struct KeyOf<uint64_t> {
  template <typename T>
  static uint64_t get(T v) { return f64_key(static_cast<double>(v)); }
};

template <typename T, typename K>
Tensor topk_select_impl(const T* s, const bool* act, int64_t n, int64_t k) {
  constexpr int kBits = 16, kBins = 1 << kBits;
  constexpr int kPasses = static_cast<int>(sizeof(K) * 8 / kBits);
  const int nthreads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(1 << 16, (n + nthreads - 1) / nthreads);
  const int64_t nblocks = (n + grain - 1) / grain;
  K prefix = 0, prefix_mask = 0;  // bits of the k-th largest key fixed so far
  int64_t need = k;               // how many of the elements matching `prefix` are still to take
  std::vector<std::vector<int64_t>> hist(nblocks, std::vector<int64_t>(kBins));
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = static_cast<int>(sizeof(K) * 8) - kBits * (pass + 1);
    at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        auto& h = hist[blk];
        std::fill(h.begin(), h.end(), 0);
        const int64_t lo = blk * grain, hi = std::min(n, lo + grain);
        for (int64_t j = lo; j < hi; ++j) {
          if (act && !act[j]) continue;
          const K key = KeyOf<K>::get(s[j]);
          if ((key & prefix_mask) != prefix) continue;
          h[(key >> shift) & (kBins - 1)]++;
        }
      }
    });
    // Walk bins from the largest digit down until `need` is reached.
    int64_t above = 0;
    int digit = kBins - 1;
    for (; digit >= 0; --digit) {
      int64_t c = 0;
      for (int64_t blk = 0; blk < nblocks; ++blk) c += hist[blk][digit];
      if (above + c >= need) break;
      above += c;
    }
    TORCH_INTERNAL_ASSERT(digit >= 0, "topk_select: radix walk ran off the histogram");
    need -= above;
    prefix |= static_cast<K>(digit) << shift;
    prefix_mask |= static_cast<K>(kBins - 1) << shift;
  }
  const K kth = prefix;  // the exact key of the k-th largest element
  // Select: every key > kth, then the first `need` keys == kth in position order.
  std::vector<int64_t> n_gt(nblocks), n_eq(nblocks);
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t lo = blk * grain, hi = std::min(n, lo + grain);
      int64_t g = 0, q = 0;
      for (int64_t j = lo; j < hi; ++j) {
        if (act && !act[j]) continue;
        const K key = KeyOf<K>::get(s[j]);
        g += key > kth;
        q += key == kth;
      }
      n_gt[blk] = g;
      n_eq[blk] = q;
    }
  });
  std::vector<int64_t> out_start(nblocks), eq_take(nblocks);
  int64_t pos = 0, eq_left = need;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    eq_take[blk] = std::min(eq_left, n_eq[blk]);
    eq_left -= eq_take[blk];
    out_start[blk] = pos;
    pos += n_gt[blk] + eq_take[blk];
  }
  TORCH_INTERNAL_ASSERT(pos == k && eq_left == 0, "topk_select: selection count mismatch");
  Tensor out = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t lo = blk * grain, hi = std::min(n, lo + grain);
      int64_t q = out_start[blk], take = eq_take[blk];
      for (int64_t j = lo; j < hi; ++j) {
        if (act && !act[j]) continue;
        const K key = KeyOf<K>::get(s[j]);
        if (key > kth) {
          o[q++] = j;
        } else if (key == kth && take > 0) {
          o[q++] = j;
          --take;
        }
      }
    }
  });
  return out;
}

Tensor topk_select_cpu(const Tensor& scores, const std::optional<Tensor>& active, int64_t k) {
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), "scores: expected a floating tensor, got ",
                   scores.scalar_type());
  const Tensor s = scores.contiguous().view(-1);
  const int64_t n = s.numel();
  Tensor a;
  const bool* ap = nullptr;
  int64_t n_active = n;
  if (active.has_value()) {
    TORCH_CHECK_TYPE(active->scalar_type() == at::kBool, "active: expected a bool tensor, got ",
                     active->scalar_type());
    TORCH_CHECK_VALUE(active->numel() == n, "active: expected ", n, " elements, got ", active->numel());
    a = active->contiguous().view(-1);
    ap = a.data_ptr<bool>();
    n_active = a.sum().item<int64_t>();
  }
  TORCH_CHECK_VALUE(k >= 0 && k <= n_active, "k: must be in [0, ", n_active, "] (active scores), got ", k);
  TORCH_CHECK_VALUE(!at::isnan(s).any().item<bool>(), "scores: contains NaN");
  if (k == 0) return at::empty({0}, at::TensorOptions().dtype(at::kLong));
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "topk_select", [&] {
    if (s.scalar_type() == at::kDouble) {
      out = topk_select_impl<scalar_t, uint64_t>(s.data_ptr<scalar_t>(), ap, n, k);
    } else {
      out = topk_select_impl<scalar_t, uint32_t>(s.data_ptr<scalar_t>(), ap, n, k);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradkit, CPU, m) {
  m.impl("gather_segments", &gather_segments_cpu);
  m.impl("gather_segments_out", &gather_segments_out_cpu);
  m.impl("scatter_segments", &scatter_segments_cpu);
  m.impl("scatter_segments_", &scatter_segments__cpu);
  m.impl("mask_to_indices", &mask_to_indices_cpu);
  m.impl("bitmask_to_indices", &bitmask_to_indices_cpu);
  m.impl("pack_bitmask", &pack_bitmask_cpu);
  m.impl("topk_select", &topk_select_cpu);
}

}  // namespace gradkit

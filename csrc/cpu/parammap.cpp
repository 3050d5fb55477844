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

#include <sys/mman.h>

#include <algorithm>
#include <functional>
#include <atomic>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../overlap.h"
#include "../segments.h"

namespace gradkit {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// gather / scatter
// ---------------------------------------------------------------------------

// A large 1-D CPU tensor straight from the kernel: anonymous mappings read as zero and are
// zero-filled on first touch, so a zeros() needs no memset pass of its own. `huge` asks for
// transparent huge pages, which cut page faults ~500x. Measured on the GPT-2 4x512 workload,
// 2 threads: on an Intel Xeon VM gather "all" 49 -> 21 ms with them, but a 5% sparse scatter
// 44 ms with 4 KiB pages against 52 with huge ones (each small page zeroed cache-hot right before
// the ascending writes landing in it); on a Zen 4 (session 23, THP "madvise") the sparse scatter
// took 56 ms with 4 KiB pages and 12-13 ms with huge ones (torch's zeros + index_copy_: 38 ms),
// so every output asks for huge pages now.
// Below 32 MiB the ordinary allocator is better: glibc serves those sizes from its heap once
// the dynamic mmap threshold has grown, so repeated calls reuse pages that are already mapped.
constexpr size_t kKernelBackedMin = size_t(32) << 20;
Tensor kernel_backed(int64_t numel, const at::TensorOptions& opt, bool zero, bool huge) {
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  if (bytes < kKernelBackedMin) return zero ? at::zeros({numel}, opt) : at::empty({numel}, opt);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return zero ? at::zeros({numel}, opt) : at::empty({numel}, opt);
#ifdef MADV_HUGEPAGE
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return at::from_blob(p, {numel}, [bytes](void* q) { munmap(q, bytes); }, opt.device(at::kCPU));
}

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
  if (idx != nullptr && v.contiguous && !acc && unit) {
    // the common case (a masked write into contiguous tensors) without the general loop's per-entry branches
    // on loop-invariant conditions: scatter_into of GPT-2 4x512 at 5% went 9.5 -> 8.0 ms (2 threads, Zen 4;
    // torch's index_copy_ per tensor 6.2 ms)
    for (int64_t j = lo; j < hi; ++j) {
      const uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(idx[j]));
      if (k >= n) {
        oob = true;
        continue;
      }
      dst[k] = static_cast<D>(flat[j]);
    }
    if (oob) bad.store(true, std::memory_order_relaxed);
    return;
  }
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

// Work items of `grain(s)` selected positions each, over every segment.
template <typename GrainFn>
std::vector<WorkItem> make_work(const std::vector<Segment>& segs, GrainFn grain) {
  std::vector<WorkItem> w;
  for (const auto s : c10::irange(segs.size())) {
    const int64_t g = grain(s), c = segs[s].count;
    for (int64_t lo = 0; lo < c; lo += g) w.push_back({static_cast<int32_t>(s), lo, std::min(c, lo + g)});
  }
  return w;
}
std::vector<WorkItem> make_work(const std::vector<Segment>& segs) {
  return make_work(segs, [](size_t) { return kGrain; });
}

// fn(w) for w in [0, n) in one parallel region, each thread taking the next unclaimed item (an atomic
// counter): items differ in size (a segment's last one is short, small tensors have one short item), and the
// static split of at::parallel_for gave one thread the long items: scatter_into of GPT-2 4x512 at 5% took 7.1
// ms against 5.1 ms so (two threads, Zen 4, session 25; torch's index_copy_ per tensor 5.7 ms). Every item
// writes its own positions (scatter positions are distinct, gather outputs are), so the result does not
// depend on which thread runs which item.
template <typename Fn>
void for_each_item(int64_t n, Fn fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t w; (w = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(w);
  });
}

// Runs fn(item, view, index, bad) over every work item in one parallel region; positions out of
// range are never touched, only flagged, and reported once the region is over.
template <typename Fn>
void run_work(const std::vector<WorkItem>& work, const std::vector<Segment>& segs, Fn fn) {
  std::atomic<bool> bad{false};
  for_each_item(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const auto& it = work[w];
    fn(it, segs[it.seg].view, segs[it.seg].index, bad);
  });
  TORCH_CHECK_INDEX(!bad.load(), "index: a position is out of range for its segment");
}

// Checks of positions p[lo, hi) of a segment of `count` positions into a tensor of n elements: bit 1, one lies
// outside [0, n); bit 2, they are not strictly ascending at some j in [lo, hi) (p[j] >= p[j + 1], the item's
// last one compared with the next item's first). Signed min / max and neighbour compares, which the compiler
// vectorises (pminsd / pmaxsd, pcmpgtq at x86-64-v2); the per-entry unsigned compare this replaces did not
// vectorise and was 2.3 of 14.8 ms of scatter_into on GPT-2 4x512 at 5% (one thread, Zen 4, session 25).
template <typename T>
int position_flags(const T* p, int64_t lo, int64_t hi, int64_t count, int64_t n) {
  if (hi <= lo) return 0;
  T mn = p[lo], mx = p[lo];
  for (int64_t j = lo + 1; j < hi; ++j) {
    mn = std::min(mn, p[j]);
    mx = std::max(mx, p[j]);
  }
  bool down = false;
  const int64_t e = std::min(hi, count - 1);
  for (int64_t j = lo; j < e; ++j) down |= p[j] >= p[j + 1];
  return (mn < 0 || static_cast<int64_t>(mx) >= n ? 1 : 0) | (down ? 2 : 0);
}

// True when a position occurs twice in idx (every one in [0, n)): a bitmap of n bits, or a sorted copy of the
// positions where that is smaller. Only run on segments whose positions are not strictly ascending.
bool has_duplicates(const at::Tensor& idx, int64_t n) {
  const int64_t c = idx.numel();
  if (c < 2) return false;
  if (n / 8 > c * 8) {
    at::Tensor s = std::get<0>(idx.to(at::kLong).sort());
    const int64_t* q = s.data_ptr<int64_t>();
    for (int64_t j = 1; j < c; ++j)
      if (q[j] == q[j - 1]) return true;
    return false;
  }
  std::vector<uint64_t> seen(static_cast<size_t>(n / 64 + 1), 0);
  bool dup = false;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "has_duplicates", [&] {
    const index_t* p = idx.data_ptr<index_t>();
    for (int64_t j = 0; j < c && !dup; ++j) {
      const uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(p[j]));
      const uint64_t b = uint64_t(1) << (k % 64);
      dup = (seen[k / 64] & b) != 0;
      seen[k / 64] |= b;
    }
  });
  return dup;
}

// The segments among `which` whose positions repeat one, checked in parallel over segments.
void check_distinct(const std::vector<Segment>& segs, const std::vector<int64_t>& which) {
  std::atomic<bool> dup{false};
  for_each_item(static_cast<int64_t>(which.size()), [&](int64_t w) {
    const Segment& sg = segs[which[w]];
    if (has_duplicates(sg.index, sg.view.numel)) dup.store(true, std::memory_order_relaxed);
  });
  TORCH_CHECK_VALUE(!dup.load(), "index: a position occurs more than once in a segment; scatter positions must "
                    "be distinct");
}

// Every position of every indexed segment checked against its tensor in one parallel pass (over the same
// work items as the kernel) before anything is written, so an in-place scatter / gather(out=) that raises
// leaves its destination untouched (the kernels' own flags, reported after the parallel region, came after
// the in-range entries had been written). distinct (scatter): a segment whose positions are not strictly
// ascending is then checked for a repeated position (its writes would race, and its += would lose updates).
void check_positions(const std::vector<WorkItem>& work, const std::vector<Segment>& segs, bool distinct) {
  std::vector<uint8_t> flags(work.size(), 0);
  for_each_item(static_cast<int64_t>(work.size()), [&](int64_t w) {
    const auto& it = work[w];
    const Segment& sg = segs[it.seg];
    if (!sg.index.defined()) return;
    AT_DISPATCH_INDEX_TYPES(sg.index.scalar_type(), "check_positions", [&] {
      flags[w] = static_cast<uint8_t>(
          position_flags(sg.index.data_ptr<index_t>(), it.lo, it.hi, sg.count, sg.view.numel));
    });
  });
  int all = 0;
  std::vector<int64_t> unsorted;
  for (size_t w = 0; w < work.size(); ++w) {
    all |= flags[w];
    if ((flags[w] & 2) && (unsorted.empty() || unsorted.back() != work[w].seg)) unsorted.push_back(work[w].seg);
  }
  TORCH_CHECK_INDEX(!(all & 1), "index: a position is out of range for its segment");
  if (distinct && !unsorted.empty()) check_distinct(segs, unsorted);
}

#define GK_DISPATCH_FLOAT(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, __VA_ARGS__)

// precheck: positions checked before any write (into a caller's `out`; a new output is dropped on error).
void gather_impl(at::TensorList src_in, const c10::List<std::optional<Tensor>>& index, Tensor& out,
                 bool accumulate, bool precheck) {
  // A caller's out that shares memory with a source (out=x with src=[x], out a view of a gradient being read):
  // the sources are read as they were before the call, as the reference (every value gathered, then written),
  // so such a source is read from a copy (a new output never overlaps).
  std::vector<Tensor> src_copy;
  at::TensorList src = src_in;
  if (precheck) {
    for (const auto i : c10::irange(src_in.size())) {
      if (spans_meet(src_in[i], {out})) {
        if (src_copy.empty()) src_copy.assign(src_in.begin(), src_in.end());
        src_copy[i] = src_in[i].clone(at::MemoryFormat::Contiguous);
      }
    }
    if (!src_copy.empty()) src = src_copy;
  }
  const auto segs = make_segments(src, index, "src");
  std::vector<int64_t> offs;
  const int64_t total = segment_offsets(segs, &offs);
  check_gather_out(out, total);
  if (total == 0) return;
  const auto work = make_work(segs);
  if (precheck) check_positions(work, segs, false);
  const at::ScalarType dt = out.scalar_type();
  run_work(work, segs, [&](const WorkItem& it, const SegView& v, const Tensor& idx, std::atomic<bool>& bad) {
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
  });
}

Tensor gather_segments_cpu(at::TensorList src, const c10::List<std::optional<Tensor>>& index,
                           std::optional<at::ScalarType> dtype) {
  const int64_t total = gather_total(src, index);
  const at::ScalarType dt = gather_dtype(src, dtype);
  Tensor out = kernel_backed(total, at::TensorOptions().dtype(dt).device(at::kCPU), false, true);
  gather_impl(src, index, out, false, false);
  return out;
}

void gather_segments_out_cpu(at::TensorList src, const c10::List<std::optional<Tensor>>& index,
                             const Tensor& out, bool accumulate) {
  Tensor o = out;
  gather_impl(src, index, o, accumulate, true);
}

void scatter_impl(const Tensor& flat, const c10::List<std::optional<Tensor>>& index,
                  at::TensorList dst, double scale, bool accumulate) {
  const auto segs = make_segments(dst, index, "dst");
  std::vector<int64_t> offs;
  check_scatter_flat(flat, segment_offsets(segs, &offs));
  TORCH_CHECK_VALUE(dst.empty() || flat.device() == dst[0].device(), "flat: on ", flat.device(), " but dst is on ",
                    dst[0].device());
  if (flat.numel() == 0) return;
  // Two destinations sharing an element (the same tensor twice, overlapping views, an expand()ed one) would be
  // written by two threads at once: refused, naming them, before anything is written.
  {
    std::vector<NamedTensor> named;
    for (const auto i : c10::irange(dst.size())) named.push_back({&dst[i], "dst", static_cast<int64_t>(i), true});
    check_no_overlap(named);
  }
  const auto work = make_work(segs);
  check_positions(work, segs, true);
  // flat is read as it was before the call (the reference reads every value first) when it shares memory
  // with a destination
  const Tensor f = spans_meet(flat, dst) ? flat.clone(at::MemoryFormat::Contiguous) : flat.contiguous();
  run_work(work, segs, [&](const WorkItem& it, const SegView& v, const Tensor& idx, std::atomic<bool>& bad) {
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
  });
}

// True when the (int32/int64) positions are strictly increasing.
bool strictly_ascending(const Tensor& idx) {
  const int64_t n = idx.numel();
  if (n < 2) return true;
  std::atomic<bool> ok{true};
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "ascending", [&] {
    const index_t* p = idx.data_ptr<index_t>();
    at::parallel_for(1, n, 1 << 16, [&](int64_t b, int64_t e) {
      bool local = true;
      for (int64_t j = b; j < e; ++j) local &= p[j - 1] < p[j];
      if (!local) ok.store(false, std::memory_order_relaxed);
    });
  });
  return ok.load();
}

// Functional scatter into NEW zero-filled tensors, in one pass over memory: for a segment with
// ascending positions, the work item covering positions [lo, hi) zeroes exactly the destination
// range [idx[lo], idx[hi]) (from 0 for the first item, to numel for the last: the items tile the
// tensor) and then writes its values into it while it is cache-hot; "all" segments are only
// written; unsorted position lists fall back to zero-fill then scatter. Each output has its own
// storage (outputs never alias).
std::vector<Tensor> scatter_segments_cpu(const Tensor& flat, const c10::List<std::optional<Tensor>>& index,
                                         c10::IntArrayRef numel, double scale) {
  check_flat_dtype(flat);  // before the outputs are made in flat's dtype (their check would name dst)
  check_numel_list(numel, index);
  std::vector<Tensor> outs;
  outs.reserve(numel.size());
  std::vector<char> fused(numel.size(), 0);
  for (const auto i : c10::irange(numel.size())) {
    const int64_t n = numel[i];
    // mmap'd (kernel-zeroed) storage only for very large outputs, with huge pages (see kernel_backed)
    outs.push_back(kernel_backed(n, flat.options(), false, true));
  }
  const auto segs = make_segments(outs, index, "dst");
  std::vector<int64_t> offs;
  const int64_t total = segment_offsets(segs, &offs);
  check_scatter_flat(flat, total);
  bool any_unsorted = false;
  for (const auto i : c10::irange(segs.size())) {
    const Tensor& idx = segs[i].index;
    if (!idx.defined()) continue;  // every element is written
    if (segs[i].count > 0 && strictly_ascending(idx)) {
      fused[i] = 1;
    } else {
      outs[i].zero_();
      any_unsorted = true;
    }
  }
  // a repeated position would make the output depend on which thread wrote last: the in-place ops' check
  // (positions out of range first, in any segment, then repeats in the unsorted segments)
  if (any_unsorted) check_positions(make_work(segs), segs, true);
  if (total == 0) return outs;
  const Tensor f = flat.contiguous();
  // `flat * scale` as torch computes it: in flat's opmath type (float32 for float32 / float16 /
  // bfloat16, with the scale rounded to float32), the reference's definition. The product of two
  // floats is exact in double, so scatter_chunk's double multiply then float rounding gives exactly
  // the float32 product.
  const double fscale = f.scalar_type() == at::kDouble ? scale : static_cast<double>(static_cast<float>(scale));
  constexpr int64_t kFusedGrain = 1 << 13;  // positions per item: its zeroed range stays cache-sized
  const auto work = make_work(segs, [&](size_t i) { return fused[i] ? kFusedGrain : kGrain; });
  run_work(work, segs, [&](const WorkItem& it, const SegView& v, const Tensor& idx, std::atomic<bool>& bad) {
      GK_DISPATCH_FLOAT(f.scalar_type(), "scatter_new", [&] {
        using F = scalar_t;
        const F* fp = f.data_ptr<F>() + offs[it.seg];
        if (!idx.defined()) {
          scatter_chunk<F, F, int32_t>(fp, nullptr, v, it.lo, it.hi, fscale, false, bad);
          return;
        }
        AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "scatter_new_idx", [&] {
          const index_t* ip = idx.data_ptr<index_t>();
          if (fused[it.seg]) {
            const int64_t z_lo = it.lo == 0 ? 0 : static_cast<int64_t>(ip[it.lo]);
            const int64_t z_hi = it.hi == segs[it.seg].count ? v.numel : static_cast<int64_t>(ip[it.hi]);
            if (z_lo >= 0 && z_hi <= v.numel && z_lo <= z_hi) {
              std::memset(static_cast<F*>(v.data) + z_lo, 0, sizeof(F) * (z_hi - z_lo));
            }
          }
          scatter_chunk<F, F, index_t>(fp, ip, v, it.lo, it.hi, fscale, false, bad);
        });
      });
  });
  return outs;
}

void scatter_segments__cpu(const Tensor& flat, const c10::List<std::optional<Tensor>>& index,
                           at::TensorList dst, double scale, bool accumulate) {
  scatter_impl(flat, index, dst, scale, accumulate);
}

// ---------------------------------------------------------------------------
// selection encodings
// ---------------------------------------------------------------------------

constexpr int64_t kScanChunk = 1 << 16;  // multiple of 8: chunks start on word boundaries

// 0x01 in every byte of `w` that is non-zero (bool storage is 0/1, but be robust to any byte).
inline uint64_t nz_bytes(uint64_t w) {
  w |= w >> 4;
  w |= w >> 2;
  w |= w >> 1;
  return w & 0x0101010101010101ull;
}
inline uint64_t load8(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);  // unaligned-safe; compiles to one load
  return w;
}

int64_t count_nonzero_bytes(const uint8_t* m, int64_t lo, int64_t hi) {
  int64_t s = 0, j = lo;
  for (; j + 8 <= hi; j += 8) s += __builtin_popcountll(nz_bytes(load8(m + j)));
  for (; j < hi; ++j) s += (m[j] != 0);
  return s;
}

template <typename I>
void mask_to_indices_kernel(const uint8_t* m, int64_t n, I* out, const std::vector<int64_t>& starts) {
  const int64_t nchunks = static_cast<int64_t>(starts.size());
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t lo = c * kScanChunk, hi = std::min(n, lo + kScanChunk);
      int64_t p = starts[c], j = lo;
      for (; j + 8 <= hi; j += 8) {
        uint64_t bits = nz_bytes(load8(m + j));
        while (bits) {  // one iteration per selected element; zero words cost one test
          out[p++] = static_cast<I>(j + (__builtin_ctzll(bits) >> 3));
          bits &= bits - 1;
        }
      }
      for (; j < hi; ++j) {
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

Tensor mask_to_indices_cpu(const Tensor& mask, at::ScalarType dtype) {
  check_bool_mask(mask);
  check_index_dtype(dtype, mask.numel());
  const Tensor m = mask.contiguous();
  const int64_t n = m.numel();
  const uint8_t* p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const int64_t nchunks = (n + kScanChunk - 1) / kScanChunk;
  int64_t total = 0;
  auto starts = chunk_starts(
      nchunks,
      [&](int64_t c) { return count_nonzero_bytes(p, c * kScanChunk, std::min(n, (c + 1) * kScanChunk)); },
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
  const int64_t nbytes = check_bitmask(bits, numel, dtype);
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
  check_bool_mask(mask);
  const Tensor m = mask.contiguous();
  const int64_t n = m.numel(), nbytes = (n + 7) / 8;
  Tensor out = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
  const uint8_t* p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, nbytes, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t base = i * 8;
      if (base + 8 <= n) {
        // byte j of the word (0/1) lands on bit j: the eight shifted copies never overlap
        o[i] = static_cast<uint8_t>((nz_bytes(load8(p + base)) * 0x0102040810204080ull) >> 56);
      } else {
        uint8_t x = 0;
        for (int64_t j = 0; j < n - base; ++j) x |= static_cast<uint8_t>((p[base + j] != 0) << j);
        o[i] = x;
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// exact top-k select (radix select on order-preserving integer keys)
// ---------------------------------------------------------------------------

// Maps a float to an unsigned key whose integer order is the float order (+0 and -0 equal:
// x + 0 turns -0 into +0 under round-to-nearest; gradkit is never built with fast-math).
inline uint32_t f32_key(float x) {
  x = x + 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t flip = static_cast<uint32_t>(-static_cast<int32_t>(u >> 31)) | 0x80000000u;
  return u ^ flip;
}
inline uint64_t f64_key(double x) {
  x = x + 0.0;
  uint64_t u;
  std::memcpy(&u, &x, 8);
  const uint64_t flip = static_cast<uint64_t>(-static_cast<int64_t>(u >> 63)) | 0x8000000000000000ull;
  return u ^ flip;
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

// Walks the bins of per-block histograms from the top; returns the bin holding the
// `*need`-th largest element and leaves in `*need` its rank within that bin.
template <typename C>
int walk_bins(const std::vector<std::vector<C>>& hist, int nbins, int64_t* need) {
  int64_t above = 0;
  for (int d = nbins - 1; d >= 0; --d) {
    int64_t c = 0;
    for (const auto& h : hist) c += h[d];
    if (above + c >= *need) {
      *need -= above;
      return d;
    }
    above += c;
  }
  TORCH_INTERNAL_ASSERT(false, "topk_select: radix walk ran off the histogram");
}

// Bit i of the result = pred(key of s[i]) for 64 consecutive elements, AND the active flags
// when given. The key/compare loop has no branches (it vectorises); callers then visit only the
// set bits, in position order.
template <typename T, typename K, typename Pred>
inline uint64_t flags64(const T* s, const bool* act, Pred pred) {
  uint8_t f[64];
  for (int i = 0; i < 64; ++i) f[i] = static_cast<uint8_t>(pred(KeyOf<K>::get(s[i])));
  uint64_t m = 0;
  for (int w = 0; w < 8; ++w) {
    m |= ((load8(f + 8 * w) * 0x0102040810204080ull) >> 56) << (8 * w);
  }
  if (act != nullptr) {
    uint64_t a = 0;
    const uint8_t* ab = reinterpret_cast<const uint8_t*>(act);
    for (int w = 0; w < 8; ++w) a |= ((nz_bytes(load8(ab + 8 * w)) * 0x0102040810204080ull) >> 56) << (8 * w);
    m &= a;
  }
  return m;
}

// One tensor of a (multi-tensor) top-k: its data, optional active flags, length, and the
// position of its first element in the concatenation of all of them.
template <typename T>
struct TopkSeg {
  const T* s;
  const bool* act;
  int64_t n;
  int64_t base;
};

// Calls fn(segment, lo, hi) for the pieces of the global range [glo, ghi) in order; `starts`
// holds each segment's base plus a final total.
template <typename T, typename Fn>
inline void for_pieces(const std::vector<TopkSeg<T>>& segs, const std::vector<int64_t>& starts, int64_t glo,
                       int64_t ghi, Fn fn) {
  size_t i = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), glo) - starts.begin()) - 1;
  for (; i < segs.size() && starts[i] < ghi; ++i) {
    const int64_t lo = std::max<int64_t>(glo - starts[i], 0), hi = std::min<int64_t>(ghi - starts[i], segs[i].n);
    if (lo < hi) fn(segs[i], lo, hi);
  }
}

// Exact top-k select over order-preserving keys, over one or many tensors (never concatenated).
// The global index space (tensors back to back) is cut into a few blocks per thread; a block
// walks the pieces of the tensors it overlaps.
//  A. one pass: histogram of the top 12 key bits per block (16 KiB, L1-resident), NaN and
//     active counts (errors are raised here, before any output exists); walking the bins
//     from the top finds the bucket d1 holding the k-th largest key; every key in a higher
//     bucket is selected, and per-block counts of those come straight from the histograms.
//  B. one pass compacts the keys of bucket d1 (the candidates; for smooth data a few percent
//     of n); a histogram of their next 12 bits and nth_element within the one sub-bucket
//     that holds it give the exact k-th key, then per-block counts of candidates above /
//     equal to it.
//     When ties make the bucket huge (> n/4), the remaining key bits are resolved with
//     11-bit radix passes over the full input instead (no large buffer).
//  C. one pass writes, per block in position order, every key above the k-th plus the
//     first `need` keys equal to it (lowest positions first), so the output is ascending.
template <typename T, typename K>
Tensor topk_select_impl(const std::vector<TopkSeg<T>>& segs, int64_t k) {
  constexpr int kKeyBits = static_cast<int>(sizeof(K) * 8);
  constexpr int kTop = 12, kTopBins = 1 << kTop, kTopShift = kKeyBits - kTop;
  std::vector<int64_t> starts(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) starts[i + 1] = starts[i] + segs[i].n;
  const int64_t n = starts.back();
  const int nthreads = std::max(1, at::get_num_threads());
  const int64_t grain = std::min<int64_t>(int64_t(1) << 30, std::max<int64_t>(1 << 16, (n + nthreads - 1) / nthreads));
  const int64_t nblocks = std::max<int64_t>(1, (n + grain - 1) / grain);
  auto block_range = [&](int64_t blk) { return std::make_pair(blk * grain, std::min(n, (blk + 1) * grain)); };
  std::vector<std::vector<uint32_t>> hist(nblocks, std::vector<uint32_t>(kTopBins));
  std::vector<int64_t> n_gt(nblocks, 0), n_eq(nblocks, 0), n_nan(nblocks, 0), n_act(nblocks, 0);

  // ---- A. Four interleaved sub-histograms: smooth data puts long runs of elements in the same
  // top bucket, and one counter would serialise every increment on its own store.
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    std::vector<uint32_t> sub(4 * kTopBins);
    for (int64_t blk = b; blk < e; ++blk) {
      std::fill(sub.begin(), sub.end(), 0);
      uint32_t* h0 = sub.data();
      int64_t nan = 0, na = 0;
      const auto [glo, ghi] = block_range(blk);
      for_pieces(segs, starts, glo, ghi, [&](const TopkSeg<T>& sg, int64_t lo, int64_t hi) {
        const T* s = sg.s;
        if (sg.act == nullptr) {
          // Digits of 256 elements first (a branch-free loop that vectorises), then nothing but
          // the increments, spread over the four sub-histograms.
          constexpr int kChunk = 256;
          uint16_t dig[kChunk];
          int64_t j = lo;
          for (; j + kChunk <= hi; j += kChunk) {
            int64_t nanc = 0;
            for (int i = 0; i < kChunk; ++i) {
              const T v = s[j + i];
              nanc += (v != v);
              dig[i] = static_cast<uint16_t>(KeyOf<K>::get(v) >> kTopShift);
            }
            nan += nanc;
            for (int i = 0; i < kChunk; i += 4) {
              h0[dig[i]]++;
              h0[kTopBins + dig[i + 1]]++;
              h0[2 * kTopBins + dig[i + 2]]++;
              h0[3 * kTopBins + dig[i + 3]]++;
            }
          }
          for (; j < hi; ++j) {
            const T v = s[j];
            nan += (v != v);
            h0[KeyOf<K>::get(v) >> kTopShift]++;
          }
          na += hi - lo;
        } else {
          int r = 0;
          for (int64_t j = lo; j < hi; ++j) {
            if (!sg.act[j]) continue;
            const T v = s[j];
            nan += (v != v);
            ++na;
            h0[r * kTopBins + (KeyOf<K>::get(v) >> kTopShift)]++;
            r = (r + 1) & 3;
          }
        }
      });
      uint32_t* h = hist[blk].data();
      for (int d = 0; d < kTopBins; ++d) h[d] = h0[d] + h0[kTopBins + d] + h0[2 * kTopBins + d] + h0[3 * kTopBins + d];
      n_nan[blk] = nan;
      n_act[blk] = na;
    }
  });
  int64_t nan = 0, na = 0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    nan += n_nan[blk];
    na += n_act[blk];
  }
  TORCH_CHECK_VALUE(nan == 0, "scores: contains NaN (", nan, " active entries)");
  TORCH_CHECK_VALUE(k <= na, "k: must be in [0, ", na, "] (active scores), got ", k);
  if (k == 0) return at::empty({0}, at::TensorOptions().dtype(at::kLong));
  int64_t need = k;
  const int d1 = walk_bins(hist, kTopBins, &need);
  std::vector<int64_t> cand_off(nblocks + 1, 0);
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    for (int d = d1 + 1; d < kTopBins; ++d) n_gt[blk] += hist[blk][d];
    cand_off[blk + 1] = cand_off[blk] + hist[blk][d1];
  }
  const int64_t ncand = cand_off[nblocks];
  const K top = static_cast<K>(d1);
  K kth;
  if (ncand <= std::max<int64_t>(n / 4, 1 << 16)) {
    // ---- B (compaction)
    std::vector<K> ckey(ncand);
    at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        int64_t q = cand_off[blk];
        const auto [glo, ghi] = block_range(blk);
        for_pieces(segs, starts, glo, ghi, [&](const TopkSeg<T>& sg, int64_t lo, int64_t hi) {
          int64_t j = lo;
          for (; j + 64 <= hi; j += 64) {
            uint64_t m = flags64<T, K>(sg.s + j, sg.act ? sg.act + j : nullptr,
                                       [&](K key) { return (key >> kTopShift) == top; });
            while (m) {
              ckey[q++] = KeyOf<K>::get(sg.s[j + __builtin_ctzll(m)]);
              m &= m - 1;
            }
          }
          for (; j < hi; ++j) {
            if (sg.act && !sg.act[j]) continue;
            const K key = KeyOf<K>::get(sg.s[j]);
            if ((key >> kTopShift) == top) ckey[q++] = key;
          }
        });
      }
    });
    // The k-th key among the candidates: a histogram of their next 12 key bits (per block, in
    // parallel) finds its sub-bucket; only that sub-bucket's keys are gathered for nth_element.
    constexpr int kSubShift = kTopShift > 12 ? kTopShift - 12 : 0;
    constexpr int kSubBins = 1 << (kTopShift - kSubShift);
    std::vector<std::vector<uint32_t>> sub(nblocks, std::vector<uint32_t>(kSubBins));
    at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        uint32_t* h = sub[blk].data();
        for (int64_t i = cand_off[blk]; i < cand_off[blk + 1]; ++i) h[(ckey[i] >> kSubShift) & (kSubBins - 1)]++;
      }
    });
    int64_t need_sub = need;
    const int d2 = walk_bins(sub, kSubBins, &need_sub);
    std::vector<int64_t> sub_off(nblocks + 1, 0);
    for (int64_t blk = 0; blk < nblocks; ++blk) sub_off[blk + 1] = sub_off[blk] + sub[blk][d2];
    std::vector<K> bucket(sub_off[nblocks]);
    at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        int64_t q = sub_off[blk];
        for (int64_t i = cand_off[blk]; i < cand_off[blk + 1]; ++i) {
          if (((ckey[i] >> kSubShift) & (kSubBins - 1)) == static_cast<K>(d2)) bucket[q++] = ckey[i];
        }
      }
    });
    std::nth_element(bucket.begin(), bucket.begin() + (need_sub - 1), bucket.end(), std::greater<K>());
    kth = bucket[need_sub - 1];
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      int64_t g = 0, q = 0;
      for (int64_t i = cand_off[blk]; i < cand_off[blk + 1]; ++i) {
        g += ckey[i] > kth;
        q += ckey[i] == kth;
      }
      n_gt[blk] += g;
      n_eq[blk] = q;
    }
    int64_t g_all = 0;
    for (int64_t blk = 0; blk < nblocks; ++blk) g_all += n_gt[blk];
    need = k - g_all;  // how many keys equal to kth are taken
  } else {
    // ---- B' (heavy ties): 11-bit radix passes over the remaining bits of the full input
    constexpr int kBits = 11, kBins = 1 << kBits;
    std::vector<std::vector<int64_t>> h2(nblocks, std::vector<int64_t>(kBins));
    K prefix = top << kTopShift, prefix_mask = static_cast<K>(kTopBins - 1) << kTopShift;
    for (int hi_bit = kTopShift; hi_bit > 0; hi_bit -= kBits) {
      const int lo_bit = std::max(0, hi_bit - kBits);
      const K dmask = static_cast<K>((K(1) << (hi_bit - lo_bit)) - 1);
      const K pf = prefix, pm = prefix_mask;
      at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
        for (int64_t blk = b; blk < e; ++blk) {
          int64_t* h = h2[blk].data();
          std::fill(h, h + kBins, 0);
          const auto [glo, ghi] = block_range(blk);
          for_pieces(segs, starts, glo, ghi, [&](const TopkSeg<T>& sg, int64_t lo, int64_t hi) {
            for (int64_t j = lo; j < hi; ++j) {
              if (sg.act && !sg.act[j]) continue;
              const K key = KeyOf<K>::get(sg.s[j]);
              if ((key & pm) == pf) h[(key >> lo_bit) & dmask]++;
            }
          });
        }
      });
      const int digit = walk_bins(h2, static_cast<int>(dmask) + 1, &need);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        for (int d = digit + 1; d <= static_cast<int>(dmask); ++d) n_gt[blk] += h2[blk][d];
        if (lo_bit == 0) n_eq[blk] = h2[blk][digit];
      }
      prefix |= static_cast<K>(digit) << lo_bit;
      prefix_mask |= dmask << lo_bit;
    }
    kth = prefix;
  }

  // ---- C (write)
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
  const K kk = kth;
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      int64_t q = out_start[blk], take = eq_take[blk];
      const int64_t end = out_start[blk] + n_gt[blk] + eq_take[blk];
      const auto [glo, ghi] = block_range(blk);
      for_pieces(segs, starts, glo, ghi, [&](const TopkSeg<T>& sg, int64_t lo, int64_t hi) {
        auto visit = [&](int64_t j) {  // a key >= kth: all above it are taken, equal ones while `take` lasts
          const K key = KeyOf<K>::get(sg.s[j]);
          if (key > kk || take > 0) {
            take -= (key == kk);
            o[q++] = sg.base + j;
          }
        };
        int64_t j = lo;
        for (; j + 64 <= hi && q < end; j += 64) {
          uint64_t m = flags64<T, K>(sg.s + j, sg.act ? sg.act + j : nullptr, [&](K key) { return key >= kk; });
          while (m && q < end) {
            visit(j + __builtin_ctzll(m));
            m &= m - 1;
          }
        }
        for (; j < hi && q < end; ++j) {
          if (sg.act && !sg.act[j]) continue;
          if (KeyOf<K>::get(sg.s[j]) >= kk) visit(j);
        }
      });
    }
  });
  return out;
}

// Shared by topk_select (one tensor) and topk_select_segments: validated, contiguous inputs.
Tensor topk_select_many(const std::vector<Tensor>& scores, const std::vector<Tensor>& active, int64_t k) {
  int64_t n = 0;
  for (const auto& s : scores) n += s.numel();
  if (n == 0) return at::empty({0}, at::TensorOptions().dtype(at::kLong));
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores[0].scalar_type(), "topk_select", [&] {
    std::vector<TopkSeg<scalar_t>> segs;
    int64_t base = 0;
    for (size_t i = 0; i < scores.size(); ++i) {
      segs.push_back({scores[i].data_ptr<scalar_t>(), active[i].defined() ? active[i].data_ptr<bool>() : nullptr,
                      scores[i].numel(), base});
      base += scores[i].numel();
    }
    if (scores[0].scalar_type() == at::kDouble) {
      out = topk_select_impl<scalar_t, uint64_t>(segs, k);
    } else {
      out = topk_select_impl<scalar_t, uint32_t>(segs, k);
    }
  });
  return out;
}

Tensor topk_select_cpu(const Tensor& scores, const std::optional<Tensor>& active, int64_t k) {
  check_topk(scores, active, k);
  return topk_select_many({scores.contiguous().view(-1)},
                          {active.has_value() ? active->contiguous().view(-1) : Tensor()}, k);
}

Tensor topk_select_segments_cpu(at::TensorList scores, const c10::List<std::optional<Tensor>>& active, int64_t k) {
  const auto [flat, acts] = check_topk_segments(scores, active, k);
  return topk_select_many(flat, acts, k);
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
  m.impl("topk_select_segments", &topk_select_segments_cpu);
}

}  // namespace gradkit

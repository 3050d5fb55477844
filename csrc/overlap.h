// Memory-overlap checks of the in-place ops' tensor lists (host side, shared by the CPU and CUDA kernels: only
// addresses are compared, no data is read).
//
// The kernels write many tensors in one parallel region, so two written tensors that share an element (the same
// tensor twice in a list, two views of one buffer, an expand()ed tensor) race: the result depends on which thread
// wrote last, and += loses updates. torch's in-place ops refuse such arguments; these checks do the same, naming
// the arguments, before anything is written. Tensors are compared by address (views of one storage, and
// from_blob tensors over another's memory, alike); distinct elements of one buffer (rows, columns, strided slices
// of a weight) are fine: byte ranges that overlap are resolved exactly, element by element, when a tensor is not
// dense (only then, so the common case costs one sort of the byte ranges).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace gradkit {

struct NamedTensor {
  const at::Tensor* t;
  const char* list;  // the argument's name
  int64_t index;     // position in that list argument, or -1 for a single-tensor argument
  bool write;        // written by the op (false: only read, must not share memory with a written tensor)
  std::string name() const { return index < 0 ? std::string(list) : std::string(list) + "[" + std::to_string(index) + "]"; }
};

namespace overlap_detail {

struct Entry {
  uintptr_t lo, hi;  // byte range [lo, hi) spanned by the tensor's elements
  size_t i;          // position in the caller's list
};

inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (const auto d : c10::irange(t.dim())) last += (t.size(d) - 1) * t.stride(d);
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {p, p + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))};
}

// No two elements of t at one address: the dims sorted by stride, each stride exceeds the extent of the
// smaller ones (a sufficient test; every view torch makes by slicing, transposing or selecting passes it).
inline bool surely_self_disjoint(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (const auto d : c10::irange(t.dim()))
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t extent = 0;  // elements spanned by the dims so far, minus one
  for (const auto& [st, sz] : dims) {
    if (st <= extent) return false;
    extent += (sz - 1) * st;
  }
  return true;
}

// Calls f(byte offset from the tensor's first element) for every element, in row-major order; stops when f
// returns true (and returns true).
template <typename F>
bool any_element(const at::Tensor& t, F f) {
  const int64_t nd = t.dim(), n = t.numel(), es = static_cast<int64_t>(t.element_size());
  if (n == 0) return false;
  std::vector<int64_t> idx(static_cast<size_t>(nd), 0);
  int64_t off = 0;
  for (int64_t e = 0; e < n; ++e) {
    if (f(off * es)) return true;
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < t.size(d)) {
        off += t.stride(d);
        break;
      }
      off -= (t.size(d) - 1) * t.stride(d);
      idx[d] = 0;
    }
  }
  return false;
}

// The members of one cluster (byte ranges that overlap, transitively), checked element by element on a bitmap
// of the cluster's range in units of g bytes (the gcd of every element's address offset and size). Returns the
// pair (earlier member, member) found to share an element, or (-1, -1).
inline std::pair<int64_t, int64_t> exact_conflict(const std::vector<NamedTensor>& ts, const std::vector<Entry>& cl) {
  uintptr_t lo = cl[0].lo, hi = cl[0].hi;
  for (const auto& e : cl) {
    lo = std::min(lo, e.lo);
    hi = std::max(hi, e.hi);
  }
  uint64_t g = 0;
  for (const auto& e : cl) {
    const at::Tensor& t = *ts[e.i].t;
    g = std::gcd(g, static_cast<uint64_t>(e.lo - lo));
    g = std::gcd(g, static_cast<uint64_t>(t.element_size()));
    for (const auto d : c10::irange(t.dim()))
      if (t.size(d) > 1) g = std::gcd(g, static_cast<uint64_t>(t.stride(d) * t.element_size()));
  }
  const uint64_t units = (hi - lo) / g;
  std::vector<uint64_t> wr(units / 64 + 1, 0), rd(units / 64 + 1, 0);  // units written / read so far
  auto test = [](const std::vector<uint64_t>& b, uint64_t u) { return (b[u >> 6] >> (u & 63)) & 1; };
  for (size_t m = 0; m < cl.size(); ++m) {
    const NamedTensor& nt = ts[cl[m].i];
    const uint64_t base = (cl[m].lo - lo) / g, per = static_cast<uint64_t>(nt.t->element_size()) / g;
    uint64_t hit = 0;
    const bool found = any_element(*nt.t, [&](int64_t off) {
      const uint64_t u0 = base + static_cast<uint64_t>(off) / g;
      for (uint64_t u = u0; u < u0 + per; ++u) {
        // a written unit seen before (in this tensor too: an internal overlap), or a read unit under a write
        if (test(wr, u) || (nt.write && test(rd, u))) {
          hit = u;
          return true;
        }
      }
      auto& bm = nt.write ? wr : rd;
      for (uint64_t u = u0; u < u0 + per; ++u) bm[u >> 6] |= uint64_t(1) << (u & 63);
      return false;
    });
    if (!found) continue;
    // which member owns the unit (the error path only): the first one whose elements cover it
    for (size_t o = 0; o <= m; ++o) {
      const NamedTensor& ot = ts[cl[o].i];
      if (!ot.write && !nt.write) continue;
      const uint64_t ob = (cl[o].lo - lo) / g, op = static_cast<uint64_t>(ot.t->element_size()) / g;
      int64_t seen = 0;
      const bool covers = any_element(*ot.t, [&](int64_t off) {
        const uint64_t u0 = ob + static_cast<uint64_t>(off) / g;
        if (hit >= u0 && hit < u0 + op) ++seen;
        return o < m ? seen > 0 : seen > 1;  // in the member itself: a second element at the unit
      });
      if (covers) return {static_cast<int64_t>(cl[o].i), static_cast<int64_t>(cl[m].i)};
    }
    return {static_cast<int64_t>(cl[m].i), static_cast<int64_t>(cl[m].i)};
  }
  return {-1, -1};
}

}  // namespace overlap_detail

// ValueError when an element of a written tensor is also an element of another listed tensor (written or read),
// or of itself (an expand()ed tensor). Tensors without elements never conflict.
inline void check_no_overlap(const std::vector<NamedTensor>& ts) {
  using overlap_detail::Entry;
  std::vector<Entry> es;
  for (const auto i : c10::irange(ts.size())) {
    const at::Tensor& t = *ts[i].t;
    if (!t.defined() || t.numel() == 0 || !t.has_storage() || t.data_ptr() == nullptr) continue;
    const auto [lo, hi] = overlap_detail::byte_span(t);
    es.push_back({lo, hi, i});
  }
  std::sort(es.begin(), es.end(), [](const Entry& a, const Entry& b) { return a.lo < b.lo || (a.lo == b.lo && a.i < b.i); });
  auto fail = [&](int64_t a, int64_t b) {
    if (a == b) {
      TORCH_CHECK_VALUE(false, ts[b].name(), ": more than one element of the written-to tensor refers to a single "
                        "memory location (an expand()ed or overlapping view); clone() it first");
    }
    if (!ts[b].write) std::swap(a, b);  // name the written one first
    TORCH_CHECK_VALUE(false, ts[b].name(), ": shares memory with ", ts[a].name(),
                      "; the op writes it in place and would race (clone() one of them first)");
  };
  size_t c0 = 0;
  while (c0 < es.size()) {
    // one cluster: ranges overlapping, transitively
    size_t c1 = c0 + 1;
    uintptr_t end = es[c0].hi;
    while (c1 < es.size() && es[c1].lo < end) end = std::max(end, es[c1++].hi);
    std::vector<Entry> cl(es.begin() + static_cast<std::ptrdiff_t>(c0), es.begin() + static_cast<std::ptrdiff_t>(c1));
    c0 = c1;
    bool any_write = false, all_surely = true, all_dense = true;
    for (const auto& e : cl) {
      const at::Tensor& t = *ts[e.i].t;
      any_write |= ts[e.i].write;
      if (!ts[e.i].write) continue;
      all_dense &= t.is_non_overlapping_and_dense();
      all_surely &= overlap_detail::surely_self_disjoint(t);
    }
    if (!any_write) continue;  // only reads here
    if (cl.size() == 1 && all_surely) continue;
    if (cl.size() > 1 && all_dense) {
      // dense tensors cover every byte of their range: two written ones whose ranges meet (or a read range
      // meeting a written one) share an element
      for (size_t a = 0; a < cl.size(); ++a)
        for (size_t b = a + 1; b < cl.size(); ++b)
          if ((ts[cl[a].i].write || ts[cl[b].i].write) && cl[b].lo < cl[a].hi && cl[a].lo < cl[b].hi &&
              (ts[cl[a].i].t->is_non_overlapping_and_dense() && ts[cl[b].i].t->is_non_overlapping_and_dense()))
            fail(static_cast<int64_t>(std::min(cl[a].i, cl[b].i)), static_cast<int64_t>(std::max(cl[a].i, cl[b].i)));
    }
    std::sort(cl.begin(), cl.end(), [](const Entry& a, const Entry& b) { return a.i < b.i; });  // list order
    const auto [a, b] = overlap_detail::exact_conflict(ts, cl);
    if (a >= 0) fail(a, b);
  }
}

// True when t's byte range meets that of any tensor of `others` (a conservative test: callers copy t then).
inline bool spans_meet(const at::Tensor& t, at::TensorList others) {
  if (!t.defined() || t.numel() == 0 || !t.has_storage()) return false;
  const auto [lo, hi] = overlap_detail::byte_span(t);
  for (const auto& o : others) {
    if (!o.defined() || o.numel() == 0 || !o.has_storage()) continue;
    const auto [olo, ohi] = overlap_detail::byte_span(o);
    if (lo < ohi && olo < hi) return true;
  }
  return false;
}

}  // namespace gradkit

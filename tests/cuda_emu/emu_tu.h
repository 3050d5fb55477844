// What every tests/cuda_emu/<file>_emu.cpp needs before it includes csrc/cuda/<file>.cu: the emulator, and
// the .cu's own registration (TORCH_LIBRARY_IMPL(gradkit, CUDA, ...)) compiled into an unused function
// instead; then gk_emu_def_controls(m) adds the emulator's control ops to the file's TORCH_LIBRARY.
#pragma once
#include <torch/library.h>

#include "emu.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void gk_emu_unregistered_##ns##_##key(torch::Library& m)

namespace gk_emu {
inline void emu_set_sms(int64_t n) { set_sm_count(static_cast<int>(n)); }
inline void emu_set_reverse(bool r) { set_reverse(r); }
inline int64_t emu_stats(int64_t which) {
  const auto& s = state();
  return which == 0 ? s.launches : which == 1 ? s.blocks : s.barriers;
}
}  // namespace gk_emu

// set_sm_count(n): the SM count the host code sees; set_reverse(r): run threads in descending order;
// stats(0 | 1 | 2): launches, blocks, block barriers so far.
inline void gk_emu_def_controls(torch::Library& m) {
  m.def("set_sm_count(int n) -> ()", &gk_emu::emu_set_sms);
  m.def("set_reverse(bool r) -> ()", &gk_emu::emu_set_reverse);
  m.def("stats(int which) -> int", &gk_emu::emu_stats);
}

// csrc/cuda/scope.cu, host code and kernels, compiled for the CPU emulator (emu.h; its sub-warp
// collectives carry the small-block groups) and registered as torch.ops.gradkit_cuda_emu_scope.* on CPU
// tensors (tests/test_cuda_emulated.py). See projection_emu.cpp.
#include "emu_tu.h"

#include "scope.cu"

TORCH_LIBRARY(gradkit_cuda_emu_scope, m) {
  using namespace gradkit::scope;
  m.def("block_norms(Tensor x, int[] block_shape, float p) -> Tensor", &block_norms_cuda);
  m.def("scope_kth(Tensor x, int[] block_shape, int[] scope_shape, int k, float p, bool raw, float k_weight, "
        "bool mid) -> Tensor",
        &scope_kth_cuda);
  m.def("scope_mask(Tensor x, int[] block_shape, int[] scope_shape, int nnz, float p, bool raw, bool keep_ties, "
        "bool expand) -> Tensor",
        &scope_mask_cuda);
  m.def("scope_hard_threshold_(Tensor(a!) x, Tensor? values, int[] block_shape, int[] scope_shape, int nnz, "
        "float p, bool keep_ties) -> Tensor",
        &scope_hard_threshold_cuda);
  m.def("block_apply_mask_(Tensor(a!) x, int[] block_shape, Tensor block_mask) -> ()", &block_apply_mask_cuda);
  m.def("block_soft_threshold_(Tensor(a!) x, int[] block_shape, Tensor thresholds, Tensor? conditioner, "
        "int max_iter, float atol, float eps) -> ()",
        &block_soft_threshold_cuda);
}

// Test hooks (tests/test_audit_s35_cuda.py): the multi-CTA select's kernels on a hand-made state, so that the
// 64-bit counts of scopes of >= 2^31 blocks (bins, `need`, tie carries past 2^32) are checked without such a
// tensor. ws: (numscp * kWsN) int64 state, hist: (numscp * kBins) int64, eqc: (units) int64, s: (numscp, nb)
// float32 scores of one unit per scope (nb <= kUnit).
namespace gradkit {
namespace scope {
namespace {
void emu_multi_walk(const at::Tensor& ws, const at::Tensor& hist, int64_t shift) {
  const int64_t numscp = ws.numel() / kWsN;
  GK_LAUNCH(multi_walk_kernel<float>, 1u, kThreads, 0, at::cuda::getCurrentCUDAStream(), numscp,
            reinterpret_cast<unsigned long long*>(ws.data_ptr<int64_t>()),
            reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), static_cast<int>(shift));
}
void emu_multi_eqscan(const at::Tensor& eqc, int64_t numscp) {
  GK_LAUNCH(multi_eqscan_kernel, 1u, kThreads, 0, at::cuda::getCurrentCUDAStream(), numscp, eqc.numel() / numscp,
            reinterpret_cast<unsigned long long*>(eqc.data_ptr<int64_t>()));
}
at::Tensor emu_multi_write(const at::Tensor& s, const at::Tensor& ws, const at::Tensor& eqc, bool ties) {
  const int64_t numscp = s.size(0), nb = s.size(1);
  TORCH_CHECK(nb <= kUnit && ws.numel() == numscp * kWsN && eqc.numel() == numscp, "emu_multi_write: bad shapes");
  const Layout Y = make_layout(s.sizes(), s.strides(), s.strides(), {1, 1}, {1, nb});
  const Geo G = make_geo(Y);
  Units U;
  U.nb = nb;
  U.nchunk = 1;
  U.units = numscp;
  at::Tensor mask = at::empty(Y.grid, s.options().dtype(at::kBool));
  GK_LAUNCH(multi_write_kernel<float>, 1u, kThreads, 0, at::cuda::getCurrentCUDAStream(), G, s.data_ptr<float>(), U,
            reinterpret_cast<const unsigned long long*>(ws.data_ptr<int64_t>()),
            reinterpret_cast<const unsigned long long*>(eqc.data_ptr<int64_t>()), mask.data_ptr<bool>(),
            ties ? 1 : 0);
  return mask;
}
}  // namespace
}  // namespace scope
}  // namespace gradkit

TORCH_LIBRARY(gradkit_cuda_emu_scope_hooks, m) {
  using namespace gradkit::scope;
  m.def("multi_walk(Tensor(a!) ws, Tensor(b!) hist, int shift) -> ()", &emu_multi_walk);
  m.def("multi_eqscan(Tensor(a!) eqc, int numscp) -> ()", &emu_multi_eqscan);
  m.def("multi_write(Tensor s, Tensor ws, Tensor eqc, bool ties) -> Tensor", &emu_multi_write);
}

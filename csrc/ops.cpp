// gradkit operator schemas: every op is declared exactly once, here.
// CPU kernels live in csrc/cpu/<family>.cpp, CUDA kernels in csrc/cuda/<family>.cu,
// fake (meta) impls and autograd in python/gradkit/ops.py, references in
// python/gradkit/kernels/reference/<family>.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing gradkit._C loads this shared object, which runs the static
// TORCH_LIBRARY registrations below; the module itself has no Python members.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gradkit, m) {
  m.set_python_module("gradkit.ops");
  // ---- family 1: masked multi-tensor gather / scatter (param-map) ----
  // Segment s contributes src[s].flatten()[index[s]] (index None = every element, in order)
  // to one flat vector, segments concatenated in list order.
  m.def("gather_segments(Tensor[] src, Tensor?[] index, ScalarType? dtype) -> Tensor");
  m.def("gather_segments_out(Tensor[] src, Tensor?[] index, Tensor(a!) out, bool accumulate) -> ()");
  // Inverse: flat[offset_s : offset_s + count_s] goes to position index[s] of segment s.
  m.def("scatter_segments(Tensor flat, Tensor?[] index, SymInt[] numel, float scale) -> Tensor[]");
  m.def("scatter_segments_(Tensor flat, Tensor?[] index, Tensor(a!)[] dst, float scale, bool accumulate) -> ()");
  // Selection encodings: bool mask / packed little-endian bitmask -> ascending flat positions.
  m.def("mask_to_indices(Tensor mask, ScalarType dtype) -> Tensor");
  m.def("bitmask_to_indices(Tensor bits, SymInt numel, ScalarType dtype) -> Tensor");
  m.def("pack_bitmask(Tensor mask) -> Tensor");
  // Exact top-k select: ascending positions of the k largest scores among `active`
  // (all when None); equal scores are taken lowest position first; NaN is an error.
  m.def("topk_select(Tensor scores, Tensor? active, SymInt k) -> Tensor");
  // The same over many tensors without concatenating them: ascending int64 positions in the
  // concatenation of the flattened scores (list order); one float dtype for all scores.
  m.def("topk_select_segments(Tensor[] scores, Tensor?[] active, SymInt k) -> Tensor");

  // ---- family 2: block norms, per-scope k-th largest, structured masks (scope API) ----
  // x (any strides) is cut into blocks of `block_shape`; `scope_shape` (in blocks) groups the
  // block grid into scopes. Blocks are ranked by sum |x|^p (max |x| for p = inf), or by the
  // signed value when `raw` (single-element blocks). See kernels/reference/scope.py.
  m.def("block_norms(Tensor x, int[] block_shape, float p) -> Tensor");
  m.def("scope_kth(Tensor x, int[] block_shape, int[] scope_shape, int k, float p, bool raw, float k_weight, bool mid) -> Tensor");
  // Keep exactly nnz blocks per scope (ties: lowest in-scope index), or with keep_ties every block
  // scoring >= the nnz-th largest; NaN is never kept. expand: element-shaped mask, else grid-shaped.
  m.def("scope_mask(Tensor x, int[] block_shape, int[] scope_shape, int nnz, float p, bool raw, bool keep_ties, bool expand) -> Tensor");
  // In place: zero the blocks of x not selected (scores from `values` when given); returns the grid keep-mask.
  m.def("scope_hard_threshold_(Tensor(a!) x, Tensor? values, int[] block_shape, int[] scope_shape, int nnz, float p, bool keep_ties) -> Tensor");
  m.def("block_apply_mask_(Tensor(a!) x, int[] block_shape, Tensor block_mask) -> ()");
  // Group-lasso proximal step per block (Euclidean, or diagonal metric `conditioner` by bisection).
  m.def("block_soft_threshold_(Tensor(a!) x, int[] block_shape, Tensor thresholds, Tensor? conditioner, int max_iter, float atol, float eps) -> ()");

  // ---- family 3: golden masks, packed-bitmask algebra (kernels/reference/golden.py) ----
  // One per-sample golden update of one tensor: sel = the k largest |g| over g flattened (ties:
  // lowest position first; NaN never selected). bits (uint8, ceil(numel/8), bit j of byte i =
  // element 8i+j, padding bits 0) = pack(sel) when `first`, else bits & pack(sel); counts (int32,
  // numel) += sel when given. Returns the popcount of the new bits (int64, 0-dim).
  m.def("golden_topk_and_(Tensor g, Tensor(a!) bits, Tensor(b!)? counts, SymInt k, bool first) -> Tensor");
  // Packed-bitmask algebra over lists (one parallel pass): op 0 and, 1 or, 2 xor, 3 andnot (a & ~b).
  m.def("bitmask_binary(Tensor[] a, Tensor[] b, int op) -> Tensor[]");
  // Complement over numel[i] elements (padding bits stay 0).
  m.def("bitmask_not(Tensor[] a, SymInt[] numel) -> Tensor[]");
  // Set bits per mask (int64, (len(bits),)); padding bits are assumed 0.
  m.def("bitmask_count(Tensor[] bits) -> Tensor");

  // ---- family 4: fused masked AdamW (kernels/reference/adamw.py) ----
  // One AdamW step over every tensor of the lists, in one pass over param, grad, exp_avg,
  // exp_avg_sq and the mask bits: the per-entry rate is masked_lr where bits[i] has the entry's
  // bit set and unmasked_lr elsewhere (bits[i] None: unmasked_lr everywhere); decoupled weight
  // decay uses the same per-entry rate; an entry whose rate is 0 keeps its value exactly.
  // bias_correction1[i] = 1 - beta1^step_i, bias_correction2_sqrt[i] = sqrt(1 - beta2^step_i).
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor?[] bits, float masked_lr, float unmasked_lr, float beta1, float beta2, float eps, float weight_decay, float[] bias_correction1, float[] bias_correction2_sqrt, bool maximize, Tensor(d!)[]? max_exp_avg_sqs=None) -> ()");

  // ---- family 5: OBS pruning (issue 5): batched Schur-complement kernels ----
  // (obs schemas go here)
  // Independent OBS scoring + selection (kernels/reference/obs.py::obs_select): w, d (n, nb) fp32,
  // nb = nq * gs * bk (per row nq scopes of gs blocks of bk elements). Block cost = sum over its
  // elements, in order, of w^2 / (d + eps) (fp32); per (row, scope) the num_prune lowest-cost blocks
  // are pruned (ties: lower block index; NaN cost ranks as +inf). Returns int64 (n, nq*num_prune*bk):
  // per row the ascending local positions of every element of every pruned block.
  m.def("obs_select(Tensor w, Tensor d, int gs, int bk, int num_prune, float eps) -> Tensor");
  // Shared-inverse OBS (one C for every row; kernels/reference/obs.py::obs_shared_prune): w (n, K) fp32,
  // K = nq * E (per row nq scopes of E elements); c (K, K); cinv (nq, ns, p, p) = (C[P,P] + eps I)^-1 of
  // every (slot, subset); pidx (ns, p) ascending in-scope element indices of each subset. Per (row,
  // scope) the subset of lowest cost w_P^T cinv w_P (ties: lowest subset; NaN = +inf) is pruned (set to
  // 0) and, with local, the scope's kept elements are compensated: w_e -= C[e, P] cinv w_P. Returns
  // (w' (n, K) fp32, chosen subset (n, nq) int64).
  m.def("obs_shared_prune(Tensor w, Tensor c, Tensor cinv, Tensor pidx, int E, bool local) -> (Tensor, Tensor)");
  // True-OBS factor extension in place (the batched Schur downdate in factored form; csrc/obs_schur.h,
  // kernels/reference/obs.py::obs_schur_extend_): ut (n, cap, K) fp32/bf16/fp16 (any strides) the
  // transposed factor; xf (n, m, F) fp32 = C_row[P, F] (F = the last F of K positions); up (n, m, cnt) fp32 =
  // U[P, :cnt]; linv (n, m, m) fp32 = L^-1 of the downdated C_row[P, P]. Writes
  // ut[:, cnt:cnt+m, K-F:] = linv @ (xf - round_ut(up) @ ut[:, :cnt, K-F:]) (fp32 math, rounded to ut's dtype).
  m.def("obs_schur_extend_(Tensor(a!) ut, Tensor xf, Tensor up, Tensor linv, int cnt) -> ()");
  // SparseGPT's column sweep over one lazy block, in place (csrc/obs_sweep.h, kernels/reference/obs.py::obs_sweep_):
  // w (n, m) fp32/fp64 the block transposed, err (n, m), u (n, n) the block of H^-1's upper Cholesky factor,
  // prune (n, m) bool; for i in [start, stop): err[i] = where(prune[i], w[i] / u[i,i], 0), w[i] zeroed where
  // pruned, w[j] -= u[i,j] * err[i] for j > i (no FMA: the same bits on every backend).
  m.def("obs_sweep_(Tensor(a!) w, Tensor(b!) err, Tensor u, Tensor prune, int start, int stop) -> ()");

  // ---- family 6: random projections and attribution search (issue 6) ----
  // (projection schemas go here)
  // Counter-based projection matrices (kernels/reference/projection.py): entry (row, col) of R is a
  // pure function of (seed, row, col); kind 0 = Rademacher +-1/sqrt(k) (bit-identical on every
  // backend), 1 = Gaussian N(0,1)/sqrt(k) (Box-Muller in float64, rounded to fp32). The scale
  // depends only on k (the full output dimension), so sub-ranges of rows/columns are exact slices.
  // Fills out (rows, cols), any float dtype, with R[row0 : row0 + rows, col0 : col0 + cols] (fp32
  // values, then cast to out's dtype). An out-variant so that it dispatches on out's device.
  m.def("projection_matrix_(Tensor(a!) out, int seed, int kind, int k, int row0, int col0) -> ()");
  // Flat projection: x (B, Dc) fp32/fp16/bf16/fp64 -> x @ R[:, col0 : col0 + Dc]^T (B, k) fp32 (fp32
  // accumulation), R generated in tiles inside the matrix product, never stored.
  m.def("project_flat(Tensor x, SymInt k, int seed, int kind, int col0) -> Tensor");
  // Factored per-example projection of a Linear layer (kernels/reference/projection.py::factored_project):
  // a (N, I), g (N, O) fp32 (N = B * T tokens, example-major), lt = L^T (O, p), rt = R^T (I, p), rb (p,)
  // or None (the bias column's projection, added to every token's a R^T), mask (N,) bool or None (False
  // tokens contribute nothing). out[b] (p, p) = sum over unmasked tokens t of (g_t lt)^T (a_t rt + rb):
  // L G_b R^T with G_b = sum_t g_t a_t^T never formed. Returns (B, p, p) fp32.
  m.def("factored_project(Tensor a, Tensor g, Tensor lt, Tensor rt, Tensor? rb, Tensor? mask, int T) -> Tensor");

  // ---- family 7: blocked scoring with a running top-k (attribution search, issue 6) ----
  // (search schemas go here)
  // score[q, j] = (queries[q] . keys[j]) * key_scale[j] (fp32 accumulate; keys fp16/bf16/fp32) with
  // index base + j, merged with the running top-k (scores_in, idx_in; idx -1 = empty slot): the k
  // best per query, best first (largest: highest; else lowest), ties lowest index first; NaN ranks
  // as -inf (largest) / +inf; missing slots are (-+inf, -1). See kernels/reference/search.py.
  m.def("score_topk(Tensor queries, Tensor keys, int k, bool largest, Tensor? key_scale, Tensor? scores_in, Tensor? idx_in, int base) -> (Tensor, Tensor)");
}

"""The CUDA C++ kernels of every csrc/cuda/*.cu file (projection, obs, search, adamw, golden, parammap,
scope), host code included, run on the
CPU under the emulator of tests/cuda_emu (each block's threads as fibers, __syncthreads a barrier; see
emu.h for what it checks and what it cannot): CI has no GPU, and these kernels had never run before.
Each file is compiled as plain C++ with GRADKIT_CUDA_EMU (the GK_LAUNCH / GK_DYNAMIC_SHARED macros of
common.cuh) into torch.ops.gradkit_cuda_emu[_<file>].* taking CPU tensors. The checks are the GPU tests'
(test_factored_ops, test_obs_*_ops), so they run in CI instead of skipping:

* factored_project: the same bits as the CPU kernel (the claim test_factored_ops' GPU tests make), for
  blocks of one or several whole examples (the emulated SM count changes how many), 256-token chunks,
  masks (a fully masked example), bias, strided rows, the three input dtypes, both thread orders;
* project_flat: against the explicit-matrix reference, for several D splits (SM counts), col0 offsets
  off the 64-column grid, every input dtype, batches sliced past the grid limit (built with a limit of 1);
* projection_matrix_: Rademacher bit for bit with the CPU kernel, Gaussian within 1 ulp;
* obs_select (small and large kernels), obs_shared_prune: the reference's exact results;
  obs_schur_extend_ (CUDA C++ kernel, three dtypes): within the fp32 bound of test_obs_schur_ops;
  obs_sweep_ (SparseGPT's column sweep): the reference's bits, NaN / inf / -0.0 included;
* score_topk (tile scoring, warp arg-max over __shfl_xor_sync, host merge): the reference's scores and
  indices exactly, ties and NaN included;
* masked_adamw_ (one multi-tensor launch, tiles found by binary search, 16-byte vector units or the
  entry-wise tail): bit for bit the CPU kernel's parameters and moments, four dtypes;
* golden_topk_and_ (radix select: histogram with warp-aggregated atomics and __match_any_sync on a
  partial mask, a one-block walk with a block scan, tie counts, a device scan, the bitmask write) and
  bitmask_binary / _not / _count: the reference's bits, counts and popcounts, four dtypes, ties and NaN;
* parammap: gather / scatter segments (functional and in place), mask / bitmask encodings, topk_select
  and topk_select_segments (radix passes, compaction, the heavy-bucket fallback): the reference's exact
  results;
* scope: block norms, scope masks / kth / hard threshold (small-block sub-warp groups, CTA selection with
  dynamic shared memory, the multi-pass radix path, dense N:M tiles), block masks, soft threshold:
  against the reference as test_scope_ops compares the CPU kernels;
* the emulator itself: a missing barrier and a divergent barrier are caught.
"""
import contextlib
import functools
import importlib.util
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradkit import _ext, ops
from gradkit.kernels.reference import projection as ref
from test_factored_ops import DTYPES, close, make

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EMU = os.path.join(HERE, "cuda_emu")

pytestmark = [pytest.mark.skipif(not _ext.has_op("factored_project"), reason="compiled extension not built"),
              pytest.mark.cuda_emu]


@functools.lru_cache(maxsize=None)
def _build_all():
    """The library of every tests/cuda_emu/<stem>_emu.cpp (tests/cuda_emu/build.py), once per session: built in
    the background since collection (conftest.py) when this run selected a `cuda_emu` test, so this waits for
    that job and loads what it built; otherwise compiled now (ninja, the seven translation units in parallel)."""
    import conftest

    spec = importlib.util.spec_from_file_location("gradkit_cuda_emu_build", os.path.join(EMU, "build.py"))
    emu_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu_build)
    if conftest.cuda_emu_job_started():
        rc, out = conftest.background_result("cuda_emu", timeout=1800)
        assert rc == 0, f"tests/cuda_emu/build.py failed (rc={rc}):\n{out[-20000:]}"
        emu_build.build(conftest.CUDA_EMU_BUILD_DIR)
    else:
        emu_build.build(tempfile.mkdtemp(prefix="gradkit_cuda_emu_"))


def emu(stem="projection"):
    """torch.ops.gradkit_cuda_emu[_<stem>]: the ops of csrc/cuda/<stem>.cu under the emulator."""
    _build_all()
    return getattr(torch.ops, "gradkit_cuda_emu" + ("" if stem == "projection" else "_" + stem))


@contextlib.contextmanager
def emulated(sms=132, reverse=False):
    """The emulated device for the body: `sms` SMs (what the host code sizes grids by) and threads run in
    descending order if `reverse`; restored afterwards. One emulator state serves every file's ops."""
    E = emu()
    E.set_sm_count(sms)
    E.set_reverse(reverse)
    try:
        yield
    finally:
        E.set_sm_count(132)
        E.set_reverse(False)


def test_emulator_catches_a_missing_and_a_divergent_barrier():
    E = emu()
    want = torch.tensor([[float((t + 1) % 64) for t in range(64)], [100.0 + (t + 1) % 64 for t in range(64)]])
    got = {}
    for reverse in (False, True):
        with emulated(reverse=reverse):
            assert torch.equal(E.selftest(0), want)  # with the barrier: right in either order
            got[reverse] = E.selftest(1)
    # without it, some thread reads its neighbour's slot before this block wrote it, in one order or the other
    assert not all(torch.equal(g, want) for g in got.values())
    with pytest.raises(RuntimeError, match="barrier divergence"):
        E.selftest(2)
    assert torch.equal(E.selftest(0), want)  # and it recovers


@pytest.mark.parametrize("sms", [132, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_factored_blocks_of_several_examples_bitwise_equal_cpu(sms, reverse):
    """test_factored_ops' GPU test, emulated: short sequences in blocks of several whole examples (few SMs:
    more per block), tiles spanning examples, a fully masked example, long ones in 256-token chunks."""
    E = emu()
    blocks = E.stats(1)
    for dtype in DTYPES:
        for B, T in ((100, 1), (50, 7), (9, 100), (3, 700)):
            a, g, lt, rt, rb, m = make(B, T, 90, 70, 16, 13, rb=True, mask=True, dtype=dtype)
            m[T:2 * T] = False
            cpu = ops.factored_project(a, g, lt, rt, rb, m, T)
            with emulated(sms, reverse):
                got = E.factored_project(a, g, lt, rt, rb, m, T)
            assert torch.equal(got, cpu), (dtype, B, T)
            assert torch.equal(got[1], torch.zeros(16, 16))
    assert E.stats(1) > blocks  # blocks did run


@pytest.mark.parametrize("T", [1, 3, 40])
def test_factored_non_finite_stays_in_its_example(T):
    """A NaN or inf in one example's a / g (blocks of several whole examples share a tile at short T), and a
    NaN in lt with a fully masked example: the CPU kernel's bits, so the other examples stay finite."""
    B, I, O, p = 6, 20, 12, 16
    for bad in (float("nan"), float("inf")):
        for which in (0, 1):
            a, g, lt, rt, rb, m = make(B, T, I, O, p, 11, rb=True, mask=False)
            (a if which == 0 else g)[0, 3] = bad
            cpu = ops.factored_project(a, g, lt, rt, rb, m, T)
            with emulated(2):
                got = emu().factored_project(a, g, lt, rt, rb, m, T)
            assert torch.equal(got[1:], cpu[1:]) and torch.isfinite(got[1:]).all(), (bad, which)
    a, g, lt, rt, rb, m = make(B, T, I, O, p, 12, rb=True, mask=True)
    m[T:2 * T] = False
    lt[0, 0] = float("nan")
    cpu = ops.factored_project(a, g, lt, rt, rb, m, T)
    with emulated(2):
        got = emu().factored_project(a, g, lt, rt, rb, m, T)
    assert torch.equal(got[1], torch.zeros(p, p)) and torch.equal(cpu[1], torch.zeros(p, p))


def test_factored_overlapping_rows_bitwise_equal_cpu():
    """An expand()ed a (row stride 0) and g rows that overlap: the CUDA host code reads them as given (not
    with a zero stride stepped as 1), the CPU kernel's bits on their contiguous copies."""
    a, g, lt, rt, rb, m = make(2, 9, 50, 30, 16, 6, rb=True, mask=True)
    r0 = int(m.nonzero()[0])  # an unmasked token (masked ones hold NaN, which expand() would spread)
    ea = a[r0:r0 + 1].expand(18, 50)
    og = torch.randn(18 * 15 + 30, generator=torch.Generator().manual_seed(3)).as_strided((18, 30), (15, 1))
    want = ops.factored_project(ea.contiguous(), og.contiguous(), lt, rt, rb, m, 9)
    with emulated(3):
        got = emu().factored_project(ea, og, lt, rt, rb, m, 9)
    assert torch.equal(got, want)


@settings(deadline=None)
@given(B=st.integers(0, 4), T=st.sampled_from([1, 7, 33, 256, 300]), I=st.integers(1, 130), O=st.integers(1, 130),
       p=st.sampled_from([1, 16, 17, 64, 65]), seed=st.integers(0, 2**31 - 1), rb=st.booleans(), mask=st.booleans(),
       strided=st.booleans(), dtype=st.sampled_from(DTYPES), sms=st.sampled_from([1, 3, 132]))
def test_factored_bitwise_equals_cpu(B, T, I, O, p, seed, rb, mask, strided, dtype, sms):
    """test_factored_ops.test_cuda_bitwise_equals_cpu, emulated: p <= 64 the same bits as the CPU kernel;
    p = 65 the composite path, against the reference."""
    args = make(B, T, I, O, p, seed, rb, mask, strided, dtype)
    cpu = ops.factored_project(*args, T)
    with emulated(sms):
        got = emu().factored_project(*args, T)
    assert got.shape == cpu.shape and got.dtype == torch.float32
    if p <= 64:
        assert torch.equal(got, cpu)
    else:
        close(got, ref.factored_project(*args, T))


@pytest.mark.parametrize("B", [64, 65, 150])
def test_project_flat_slices_rows_past_the_grid_limit(B):
    """More row tiles than grid axis y allows (65535 on a GPU; the emulator build sets the limit to 1 tile
    of 64 rows): the host code runs slices of rows, each its own launch, with the one-launch result."""
    E = emu()
    x = torch.randn(B, 200, generator=torch.Generator().manual_seed(B))
    with emulated(4):
        got = E.project_flat(x, 40, 7, 0, 3)
    R = torch.empty(40, 203)
    ops.projection_matrix_(R, 7, 0, 40, 0, 0)
    want = x.double() @ R[:, 3:].double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("kind", [0, 1])
def test_project_flat_float64_rows_past_float32_range(kind):
    """Session 33 (csrc/project_wide.h, shared with the CPU kernel): float64 rows holding finite values past
    float32's range are scaled by a power of two before the kernel's float32 conversion, so +v and -v cancel
    instead of meeting as inf - inf = NaN; other rows keep their bits."""
    E = emu()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 70, generator=g, dtype=torch.float64)
    x[1] *= 1e40
    x[3, :2] = torch.tensor([1e39, -1e39], dtype=torch.float64)
    with emulated(4):
        got = E.project_flat(x, 9, 11, kind, 3)
        plain = E.project_flat(x[[0, 2, 4]], 9, 11, kind, 3)
    R = torch.empty(9, 73)
    ops.projection_matrix_(R, 11, kind, 9, 0, 0)
    want = x @ R[:, 3:].double().T
    bound = 1e-5 * (x.abs() @ R[:, 3:].double().abs().T)  # fp32 sums: a few ulp of the sum of |terms|
    assert torch.isfinite(got[[0, 2, 4]]).all() and not torch.isnan(got).any()
    assert torch.equal(got[[0, 2, 4]], plain)
    big = want.abs() > torch.finfo(torch.float32).max
    assert big.any() and (~big[3]).any()  # row 3 has cancelling outputs within range, and some past it
    assert torch.equal(got[big], torch.sign(want[big]).float() * float("inf"))
    assert ((got.double() - want).abs() <= bound)[~big].all()


def test_factored_validation_names_the_argument():
    E = emu()
    a, g, lt, rt, rb, m = make(2, 3, 8, 6, 4, 0, rb=True, mask=True)
    with pytest.raises(TypeError, match="g: expected"):
        E.factored_project(a, g.double(), lt, rt, rb, m, 3)
    with pytest.raises(ValueError, match="lt: expected"):
        E.factored_project(a, g, lt[:-1], rt, rb, m, 3)


@settings(deadline=None)
@given(B=st.integers(1, 70), D=st.integers(1, 300), k=st.integers(1, 130), col0=st.sampled_from([0, 5, 64, 131]),
       kind=st.sampled_from([0, 1]), seed=st.integers(0, 2**40), dtype=st.sampled_from(
           [torch.float32, torch.bfloat16, torch.float16, torch.float64]), sms=st.sampled_from([1, 4, 132]))
def test_project_flat_matches_reference(B, D, k, col0, kind, seed, dtype, sms):
    """Tiles of the projection matrix generated in shared memory (one 64-bit word per row per 64 columns of
    the GLOBAL column index, so col0 off the grid shifts bits), several B / k tiles, D split across blocks
    by SM count: x R^T with R built explicitly."""
    E = emu()
    with emulated(sms):
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed % 1000)).to(dtype)
        got = E.project_flat(x, k, seed, kind, col0)
    R = torch.empty(k, col0 + D)
    ops.projection_matrix_(R, seed, kind, k, 0, 0)
    want = x.double() @ R[:, col0:].double().T
    assert got.shape == (B, k) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("kind", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_projection_matrix_equals_cpu(kind, dtype):
    """Rademacher entries bit for bit, Gaussian within 1 ulp of fp32 (the issue's contract), at row / column
    offsets, through a transposed output (strides)."""
    E = emu()
    for rows, cols, row0, col0 in ((7, 200, 0, 0), (33, 65, 12, 63), (1, 1, 5, 1000)):
        cpu = torch.empty(rows, cols, dtype=dtype)
        ops.projection_matrix_(cpu, 42, kind, 16, row0, col0)
        got = torch.empty(cols, rows, dtype=dtype).T
        E.projection_matrix_(got, 42, kind, 16, row0, col0)
        if kind == 0:
            assert torch.equal(got, cpu)
        else:
            bits = lambda t: t.float().contiguous().view(torch.int32).long()  # noqa: E731 (same-sign values)
            ulp = 1 << 16 if dtype == torch.bfloat16 else 1  # one ulp of the output dtype, in float32 bits
            assert (bits(got) - bits(cpu)).abs().max().item() <= ulp, (rows, cols)


# ---------------------------------------------------------------------------------------------- obs.cu
import test_obs_ops as t_sel  # noqa: E402
import test_obs_schur_ops as t_schur  # noqa: E402
import test_obs_shared_ops as t_shared  # noqa: E402
from gradkit.kernels.reference import obs as obs_ref  # noqa: E402


@settings(deadline=None)
@given(t_sel.problems(max_gs=40), st.sampled_from([1, 132]), st.booleans())
def test_obs_select_matches_reference(p, sms, reverse):
    """One thread per (row, group) for gs <= 32 (small_kernel<G>), one block per group with the costs in
    dynamic shared memory beyond (large_kernel): the reference's indices, ties, NaN and inf included."""
    w, d, gs, bk, num_prune, eps = p
    E = emu("obs")
    with emulated(sms, reverse):
        got = E.obs_select(w, d, gs, bk, num_prune, eps)
    assert torch.equal(got, obs_ref.obs_select(w, d, gs, bk, num_prune, eps))


@pytest.mark.parametrize("gs,bk", [(4, 1), (13, 2), (32, 1), (40, 1), (300, 1), (9000, 1)])
def test_obs_select_large(gs, bk):
    nq = max(1, 9000 // (gs * bk))
    w, d = t_sel._mixed(33, nq * gs * bk, gs)
    for num_prune in sorted({1, gs // 2, gs}):
        got = emu("obs").obs_select(w, d, gs, bk, num_prune, 1e-8)
        assert torch.equal(got, obs_ref.obs_select(w, d, gs, bk, num_prune, 1e-8)), num_prune


@settings(deadline=None)
@given(t_shared.problems(), st.booleans(), st.sampled_from([1, 132]))
def test_obs_shared_prune_matches_reference(prob, local, sms):
    n, nq, E_, ns, p, seed, nan, spd = prob
    w, c, cinv, pidx = t_shared.make(n, nq, E_, ns, p, seed, nan=nan, spd=spd)
    E = emu("obs")
    with emulated(sms):
        got_w, got_s = E.obs_shared_prune(w, c, cinv, pidx, E_, local)
    exp_w, exp_s = obs_ref.obs_shared_prune(w, c, cinv, pidx, E_, local)
    assert torch.equal(got_s, exp_s)
    torch.testing.assert_close(got_w, exp_w, rtol=0, atol=0, equal_nan=True)


@settings(deadline=None)
@given(shape=t_schur.shapes, dt=st.sampled_from(t_schur.DTYPES), seed=st.integers(0, 2 ** 16),
       strided=st.booleans(), reverse=st.booleans())
def test_obs_schur_extend_within_fp32_bound(shape, dt, seed, strided, reverse):
    """The CUDA C++ Schur-extension kernel (what GRADKIT_SCHUR_CUDA_CPP=1 and fp32 factors select on a GPU):
    within the fp32 bound, nothing written outside its window."""
    n, m, c, F = shape
    args = t_schur.schur_make(n, m, c, F, dt, seed, strided, representable=True)
    E = emu("obs")
    with emulated(reverse=reverse):
        t_schur.schur_check(E.obs_schur_extend_, args)


@pytest.mark.parametrize("m", [128, 256, 300])
def test_obs_schur_extend_large_m(m):
    """Past kSchurMaxM the composite path; at and below it the kernel with the largest shared tiles."""
    t_schur.schur_check(emu("obs").obs_schur_extend_, t_schur.schur_make(2, m, 200, 260, torch.bfloat16, m))


@pytest.mark.parametrize("m", [2, 300])  # the kernel, the composite path
def test_obs_schur_extend_refuses_an_internally_overlapping_ut(m):
    """An expanded ut (rows sharing one factor) is refused before anything is written (csrc/obs_schur.h)."""
    base = torch.randn(1, m + 1, 5, generator=torch.Generator().manual_seed(0))
    before = base.clone()
    ut = base.expand(3, m + 1, 5)
    xf, up, linv = torch.randn(3, m, 4), torch.randn(3, m, 1), torch.randn(3, m, m)
    with pytest.raises(RuntimeError, match=r"^ut: unsupported operation: more than one element"):
        emu("obs").obs_schur_extend_(ut, xf, up, linv, 1)
    assert torch.equal(base, before)


import test_obs_sweep_ops as t_sweep  # noqa: E402


@settings(deadline=None)
@given(n=st.integers(0, 30), m=st.integers(0, 300), a=st.integers(0, 30), b=st.integers(0, 30),
       dt=st.sampled_from(t_sweep.DTYPES), seed=st.integers(0, 2 ** 16), special=st.booleans(),
       reverse=st.booleans())
def test_obs_sweep_matches_reference_bitwise(n, m, a, b, dt, seed, special, reverse):
    """The CUDA C++ sweep (one thread per weight row, __fmul_rn / __fsub_rn / IEEE division): the reference's
    bits, NaN / inf / -0.0 included, on strided blocks; rows before start and err outside [start, stop) untouched."""
    start, stop = sorted((min(a, n), min(b, n)))
    w, err, u, prune = t_sweep.make(n, m, dt, seed, 0.5, special)
    want = t_sweep.run(obs_ref.obs_sweep_, w, err, u, prune, start, stop)
    with emulated(reverse=reverse):
        got = t_sweep.run(emu("obs").obs_sweep_, w, err, u, prune, start, stop)
    assert t_sweep.same(got[0], want[0]) and t_sweep.same(got[1], want[1])


@pytest.mark.parametrize("case", range(16))
def test_obs_sweep_checks_name_the_argument(case):
    name, exc, args = t_sweep._bad_cases()[case]
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises((exc, RuntimeError), match=f"^{name}"):
        emu("obs").obs_sweep_(*args)
    assert all(torch.equal(a, b) for a, b in zip(args, before) if isinstance(a, torch.Tensor))


# ------------------------------------------------------------------------------------------- search.cu
import test_search_ops as t_search  # noqa: E402
from gradkit.kernels.reference import search as search_ref  # noqa: E402


@settings(deadline=None)
@given(t_search.problems(max_n=700), st.booleans())
def test_score_topk_matches_reference(p, reverse):
    """test_search_ops.test_cuda_matches_reference, emulated: integer-valued data (exact products), so the
    tie rule (lowest index) decides; several 128-key tiles, running input, key scales, both thread orders."""
    q, keys, k, largest, scale, s_in, i_in, base = p
    E = emu("search")
    with emulated(reverse=reverse):
        got = E.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    want = search_ref.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_score_topk_many_ties_and_nan():
    """Every score equal within a tile (the warp arg-max must take columns in ascending order) and NaN
    scores (rank last), over several tiles and query blocks."""
    E = emu("search")
    q = torch.ones(40, 8)
    keys = torch.ones(300, 8, dtype=torch.bfloat16)
    keys[7] = float("nan")
    for largest in (True, False):
        got = E.score_topk(q, keys, 20, largest, None, None, None, 0)
        want = search_ref.score_topk(q, keys, 20, largest, None, None, None, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert 7 not in got[1][0].tolist()


# -------------------------------------------------------------------------------------------- adamw.cu
import test_masked_adamw as t_adamw  # noqa: E402


@settings(deadline=None)
@given(st.data(), st.sampled_from([1, 132]))
def test_masked_adamw_bitwise_equals_cpu(data, sms):
    """test_masked_adamw.test_op_matches_reference's cases (1-4 tensors of 0-40 x 0-40 entries, masks or
    none, frozen rates, maximize, four dtypes): the emulated CUDA kernel's parameters and moments equal the
    CPU kernel's bit for bit (both round every step like torch's AdamW), so also within the reference's
    tolerance; gradients untouched. One SM: one block walks every tile."""
    dtype, (p, g, m, v), bits, kw = t_adamw._op_case(data, "cpu")
    cpu = [[t.clone() for t in x] for x in (p, m, v)]
    ops.masked_adamw_(cpu[0], g, cpu[1], cpu[2], bits, **kw)
    g_before = [t.clone() for t in g]
    E = emu("adamw")
    with emulated(sms):
        E.masked_adamw_(p, g, m, v, bits, kw["masked_lr"], kw["unmasked_lr"], kw["beta1"], kw["beta2"], kw["eps"],
                        kw["weight_decay"], kw["bias_correction1"], kw["bias_correction2_sqrt"], kw["maximize"])
    for got, want in zip((p, m, v), cpu):
        for a, b in zip(got, want):
            assert t_adamw._bits_equal(a, b), dtype
    assert all(torch.equal(a, b) for a, b in zip(g, g_before))


def test_masked_adamw_vector_units_and_tails():
    """Tensors past one 4096-entry tile, aligned (16-byte units) and not (a view one element in: the
    entry-wise path), with a partial last unit: bit for bit the CPU kernel."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        base = [torch.randn(n + 1, generator=gen).to(dtype) for n in (9000, 4103, 17)]
        views = [base[0][:9000], base[1][1:], base[2][1:]]  # aligned, misaligned, misaligned tail-only
        grads = [torch.randn(t.shape, generator=gen).to(dtype) for t in views]
        ms = [torch.randn(t.shape, generator=gen).to(dtype) * 0.1 for t in views]
        vs = [torch.rand(t.shape, generator=gen).to(dtype) * 0.01 for t in views]
        bits = [ops.pack_bitmask(torch.rand(t.shape, generator=gen) < 0.5) for t in views]
        kw = dict(masked_lr=1e-3, unmasked_lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                  bias_correction1=[0.1] * 3, bias_correction2_sqrt=[0.05] * 3, maximize=False)
        want = [[t.clone() for t in x] for x in (views, ms, vs)]
        ops.masked_adamw_(want[0], grads, want[1], want[2], bits, **kw)
        emu("adamw").masked_adamw_(views, grads, ms, vs, bits, *kw.values())
        for got, exp in zip((views, ms, vs), want):
            for a, b in zip(got, exp):
                assert t_adamw._bits_equal(a, b), dtype


def test_masked_adamw_refuses_bad_scalars_like_the_wrapper():
    """The CUDA C++ op's scalar checks (csrc/adamw_checks.h, shared with the CPU kernel): the wrapper's ranges
    and messages, the bias correction's index named, nothing written."""
    p, g, m, v = ([torch.randn(9, generator=torch.Generator().manual_seed(i + 4 * k)) for i in range(2)]
                  for k in range(4))
    v = [t.abs() for t in v]
    kw = dict(masked_lr=1e-2, unmasked_lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
              bias_correction1=[0.1, 0.2], bias_correction2_sqrt=[0.03, 0.05], maximize=False)
    before = [[t.clone() for t in ts] for ts in (p, m, v)]
    for bad, msg in ((dict(masked_lr=float("nan")), "masked_lr: expected a finite number >= 0, got nan"),
                     (dict(weight_decay=-1.0), "weight_decay: expected a finite number >= 0, got -1.0"),
                     (dict(eps=float("inf")), "eps: expected a finite number >= 0, got inf"),
                     (dict(beta2=1.0), "beta2: expected a number in [0, 1), got 1.0"),
                     (dict(bias_correction1=[0.1, 0.0]), "bias_correction1[1]: expected a number in (0, 1], got 0.0"),
                     (dict(bias_correction2_sqrt=[2.0, 0.05]),
                      "bias_correction2_sqrt[0]: expected a number in (0, 1], got 2.0")):
        with pytest.raises(ValueError) as err:
            emu("adamw").masked_adamw_(p, g, m, v, [None, None], *{**kw, **bad}.values())
        assert str(err.value).splitlines()[0] == msg
        with pytest.raises(ValueError) as py:  # the wrapper's message, character for character
            ops.masked_adamw_(p, g, m, v, [None, None], **{**kw, **bad})
        assert str(py.value) == msg
        for ts, bs in zip((p, m, v), before):
            assert all(torch.equal(a, b) for a, b in zip(ts, bs))


# ------------------------------------------------------------------------------------------- golden.cu
import test_golden as t_golden  # noqa: E402
from gradkit.kernels.reference import golden as golden_ref  # noqa: E402


@settings(deadline=None)
@given(t_golden.grads(), st.data(), st.sampled_from([1, 132]), st.booleans())
def test_golden_topk_and_matches_reference(g, data, sms, reverse):
    """test_golden.test_golden_topk_and_matches_reference, emulated: a running AND over two samples, with
    and without counts, many ties (integer values) and NaN."""
    with emulated(sms, reverse):
        t_golden.check_running_and(emu("golden").golden_topk_and_, g, data)


@pytest.mark.parametrize("dtype", t_golden.FLOATS)
def test_golden_topk_multiblock_ties(dtype):
    """Several 8192-element chunks and histogram blocks (2 SMs: fewer blocks than units, so blocks loop),
    thresholds inside runs of ties that span chunks, NaN, zeros."""
    gen = torch.Generator().manual_seed(1)
    n = 40_007
    g = torch.randint(-3, 4, (n,), generator=gen).to(dtype)
    g[torch.rand(n, generator=gen) < 0.01] = float("nan")
    E = emu("golden")
    for sms in (2, 132):
        with emulated(sms):
            for k in (0, 1, 5, 6_000, 20_000, 33_000, n - 500, n):
                sel = golden_ref.topk_abs_mask(g, k)
                b = torch.zeros((n + 7) // 8, dtype=torch.uint8)
                c = torch.zeros(n, dtype=torch.int32)
                p = E.golden_topk_and_(g, b, c, k, True)
                assert torch.equal(golden_ref.unpack_bitmask(b, n), sel), (sms, k)
                assert torch.equal(c, sel.int()) and int(p) == int(sel.sum())


@settings(deadline=None)
@given(st.lists(st.integers(0, 70), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_bitmask_ops_match_reference(sizes, seed):
    ms, ns, a, b = t_golden.bitmask_case(sizes, seed)
    E = emu("golden")
    for op in ("and", "or", "xor", "andnot"):
        out = E.bitmask_binary(a, b, ops.BITMASK_OPS[op])
        assert all(torch.equal(o, r) for o, r in zip(out, golden_ref.bitmask_binary(a, b, ops.BITMASK_OPS[op])))
    nots = E.bitmask_not(a, sizes)
    assert all(torch.equal(o, ops.pack_bitmask(~m)) for o, m in zip(nots, ms))  # padding bits stay 0
    assert E.bitmask_count(a).tolist() == [int(m.sum()) for m in ms]


def test_bitmask_ops_multi_tile():
    """Pieces over several 16 KB tiles (vector path) and a misaligned one (byte path)."""
    gen = torch.Generator().manual_seed(3)
    ms = [torch.rand(n, generator=gen) < 0.3 for n in (300_001, 17, 250_000)]
    a = [ops.pack_bitmask(m) for m in ms]
    a[2] = torch.cat([torch.zeros(1, dtype=torch.uint8), a[2]])[1:]  # a view one byte into its buffer
    E = emu("golden")
    assert E.bitmask_count(a).tolist() == [int(m.sum()) for m in ms]
    nots = E.bitmask_not(a, [m.numel() for m in ms])
    assert E.bitmask_count(nots).tolist() == [int((~m).sum()) for m in ms]
    out = E.bitmask_binary(a, nots, ops.BITMASK_OPS["or"])
    assert E.bitmask_count(out).tolist() == [m.numel() for m in ms]


# ----------------------------------------------------------------------------------------- parammap.cu
import test_parammap_ops as t_pm  # noqa: E402
from gradkit.kernels.reference import parammap as pm_ref  # noqa: E402


@settings(deadline=None)
@given(segs=t_pm.segment_lists(), out_dtype=st.sampled_from([None] + t_pm.FLOATS), accumulate=st.booleans(),
       scale=st.sampled_from([1.0, -0.5, 3.0]))
def test_parammap_gather_scatter_match_reference(segs, out_dtype, accumulate, scale):
    """test_parammap_ops' gather / gather_out / scatter / scatter_ cases on the emulated kernels."""
    E = emu("parammap")
    src, index = segs
    got = E.gather_segments(src, index, out_dtype)
    want = pm_ref.gather_segments(src, index, dtype=out_dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    total = got.numel()
    start = torch.randn(total).to(out_dtype or torch.float32)
    a, b = start.clone(), start.clone()
    E.gather_segments_out(src, index, a, accumulate)
    pm_ref.gather_segments_out(src, index, b, accumulate)
    assert torch.equal(a, b)
    flat = pm_ref.gather_segments(src, index, dtype=torch.float32) if src else torch.empty(0)
    numel = [t.numel() for t in src]
    for g, w in zip(E.scatter_segments(flat, index, numel, scale), pm_ref.scatter_segments(flat, index, numel, scale)):
        assert g.dtype == w.dtype and torch.equal(g, w)
    got_d = [torch.empty_strided(d.size(), d.stride(), dtype=d.dtype).copy_(d) for d in src]
    want_d = [d.clone() for d in src]
    E.scatter_segments_(flat, index, got_d, scale, accumulate)
    pm_ref.scatter_segments_(flat, index, want_d, scale, accumulate)
    for g, w in zip(got_d, want_d):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("bad", [torch.tensor([0, 12]), torch.tensor([-1]), torch.tensor([5, 2, 99], dtype=torch.int32)])
def test_parammap_out_of_range_position_leaves_every_destination_untouched(bad, sms):
    """In-place scatter / gather(out=) on the emulated device: check_kernel runs first and the gated kernel
    writes nothing, so a whole in-range earlier segment (two 4096-entry tiles, one block or many) stays as it
    was. The functional ops still raise."""
    E = emu("parammap")
    good = torch.arange(5000) % 12
    n = good.numel() + bad.numel()
    with emulated(sms=sms):
        for accumulate in (False, True):
            dst = [torch.zeros(4, 3), torch.zeros(3, 4).t()]
            with pytest.raises(IndexError, match="^index: a position is out of range for its segment$"):
                E.scatter_segments_(torch.ones(n), [good, bad], dst, 1.0, accumulate)
            assert not dst[0].any() and not dst[1].any()
            out = torch.full((n,), 7.0)
            with pytest.raises(IndexError, match="^index: a position is out of range for its segment$"):
                E.gather_segments_out([torch.randn(4, 3), torch.randn(4, 3)], [good, bad], out, accumulate)
            assert torch.equal(out, torch.full((n,), 7.0))
        with pytest.raises(IndexError, match="^index: a position is out of range for its segment$"):
            E.scatter_segments(torch.ones(n), [good, bad], [12, 12], 1.0)
        with pytest.raises(IndexError, match="^index: a position is out of range for its segment$"):
            E.gather_segments([torch.randn(4, 3), torch.randn(4, 3)], [good, bad], None)


@pytest.mark.parametrize("sms", [1, 132])
def test_parammap_scatter_refuses_a_repeated_position(sms):
    """check_kernel also flags positions that are not strictly ascending (a tile's last one against the next
    tile's first); the host then sorts the segments' positions: a repeat raises ValueError with the in-place
    destination untouched (the gated writer skipped), distinct unsorted positions are written by a second,
    ungated launch; the functional scatter raises too. An out-of-range position is reported first."""
    E = emu("parammap")
    g = torch.Generator().manual_seed(4)
    n, numel = 9000, 12_000  # three 4096-entry tiles
    distinct = torch.randperm(numel, generator=g)[:n]
    flat = torch.randn(n, generator=g)
    with emulated(sms=sms):
        for where in ((0, 1), (4095, 4096), (10, 8999)):
            for pos in (distinct.clone(), distinct.sort().values):
                pos[where[1]] = pos[where[0]]
                for accumulate in (False, True):
                    dst = [torch.zeros(numel)]
                    with pytest.raises(ValueError, match="^index: a position occurs more than once"):
                        E.scatter_segments_(flat, [pos], dst, 1.0, accumulate)
                    assert not dst[0].any()
                with pytest.raises(ValueError, match="^index: a position occurs more than once"):
                    E.scatter_segments(flat, [pos], [numel], 1.0)
                with pytest.raises(IndexError, match="^index: a position is out of range"):
                    E.scatter_segments_(torch.cat([flat, torch.ones(1)]), [pos, torch.tensor([7])],
                                        [torch.zeros(numel), torch.zeros(7)], 1.0, False)
        for pos in (distinct, distinct.sort().values):
            for accumulate in (False, True):
                dst = [torch.full((numel,), 2.0)]
                want = [torch.full((numel,), 2.0)]
                E.scatter_segments_(flat, [pos], dst, 1.0, accumulate)
                pm_ref.scatter_segments_(flat, [pos], want, 1.0, accumulate)
                assert torch.equal(dst[0], want[0])
            (got,) = E.scatter_segments(flat, [pos], [numel], 0.5)
            assert torch.equal(got, pm_ref.scatter_segments(flat, [pos], [numel], 0.5)[0])


@settings(deadline=None)
@given(shape=st.lists(st.integers(0, 40), max_size=3), p=st.floats(0, 1), dtype=st.sampled_from(t_pm.IDX),
       seed=st.integers(0, 2**31 - 1))
def test_parammap_mask_encodings_match_reference(shape, p, dtype, seed):
    E = emu("parammap")
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p
    assert torch.equal(E.mask_to_indices(mask, dtype), pm_ref.mask_to_indices(mask, dtype))
    bits = E.pack_bitmask(mask)
    assert torch.equal(bits, pm_ref.pack_bitmask(mask))
    assert torch.equal(E.bitmask_to_indices(bits, mask.numel(), dtype), pm_ref.bitmask_to_indices(bits, mask.numel(),
                                                                                                    dtype))


def test_parammap_large_multi_chunk():
    """Several scan chunks and blocks: mask encodings and a scatter with many work items per segment."""
    E = emu("parammap")
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(100_003, generator=g) < 0.05
    assert torch.equal(E.mask_to_indices(mask, torch.int64), mask.nonzero().reshape(-1))
    bits = E.pack_bitmask(mask)
    assert torch.equal(E.bitmask_to_indices(bits, mask.numel(), torch.int32), mask.nonzero().reshape(-1).int())
    n = 60_001
    pos = (torch.rand(n, generator=g) < 0.3).nonzero().reshape(-1)
    pos = pos[torch.randperm(pos.numel(), generator=g)]
    index = [pos.int(), None, torch.empty(0, dtype=torch.int64), pos]
    numel = [n, 5, 17, n]
    flat = torch.randn(2 * pos.numel() + 5, generator=g)
    for a, b in zip(E.scatter_segments(flat, index, numel, 0.5), pm_ref.scatter_segments(flat, index, numel, 0.5)):
        assert torch.equal(a, b)


@settings(deadline=None)
@given(case=t_pm.score_vectors(), sms=st.sampled_from([1, 132]), reverse=st.booleans())
def test_parammap_topk_select_matches_reference(case, sms, reverse):
    s, active, k = case
    E = emu("parammap")
    with emulated(sms, reverse):
        got = E.topk_select(s, active, k)
    assert got.dtype == torch.int64 and torch.equal(got, pm_ref.topk_select(s, active, k))


@settings(deadline=None)
@given(case=t_pm.score_lists())
def test_parammap_topk_select_segments_matches_reference(case):
    scores, active, k = case
    got = emu("parammap").topk_select_segments(scores, active or [None] * len(scores), k)
    assert torch.equal(got, pm_ref.topk_select_segments(scores, active or [None] * len(scores), k))


@pytest.mark.parametrize("dtype", t_pm.FLOATS)
def test_parammap_topk_heavy_ties_and_bucket_fallback(dtype):
    """Heavy ties (lowest position wins) and scores in one narrow range (one top-12-bit bucket: radix passes
    instead of compaction), over several blocks."""
    E = emu("parammap")
    g = torch.Generator().manual_seed(3)
    n = 60_000
    ties = torch.randint(0, 100, (n,), generator=g).to(dtype)
    narrow = (0.5 + torch.rand(n, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
    active = torch.rand(n, generator=g) < 0.7
    for s, act in ((ties, None), (narrow, None), (narrow, active)):
        n_act = n if act is None else int(act.sum())
        for k in (1, n_act // 3, n_act - 1):
            assert torch.equal(E.topk_select(s, act, k), pm_ref.topk_select(s, act, k)), (dtype, k)


# -------------------------------------------------------------------------------------------- scope.cu
import math  # noqa: E402

import test_scope_ops as t_scope  # noqa: E402
from gradkit.kernels.reference import scope as scope_ref  # noqa: E402


@settings(deadline=None)
@given(t_scope.layouts(), st.sampled_from([1.0, 2.0, math.inf]), st.data())
def test_scope_mask_kth_norms_match_reference(case, p, data):
    """test_scope_ops' mask / kth / block-norm properties on the emulated kernels (strided views, NaN,
    ties, every block / scope layout the strategy draws)."""
    E = emu("scope")
    x, block, scope = case
    nb = t_scope._nb(scope)
    nnz = data.draw(st.integers(0, nb))
    keep_ties, expand = data.draw(st.booleans()), data.draw(st.booleans())
    raw = all(b == 1 for b in block) and data.draw(st.booleans())
    t_scope._same(E.scope_mask(x, block, scope, nnz, p, raw, keep_ties, expand),
                  scope_ref.scope_mask(x, block, scope, nnz, p, raw, keep_ties, expand))
    t_scope._same(E.block_norms(x, block, p), scope_ref.block_norms(x, block, p))
    mid = nb >= 2 and data.draw(st.booleans())
    k = data.draw(st.integers(1, nb - 1 if mid else nb))
    w = data.draw(st.sampled_from([0.0, 1.0, 0.5]))
    t_scope._same(E.scope_kth(x, block, scope, k, p, raw, w, mid), scope_ref.scope_kth(x, block, scope, k, p, raw, w,
                                                                                      mid))


@settings(deadline=None)
@given(t_scope.layouts(), st.sampled_from([1.0, 2.0, math.inf]), st.data())
def test_scope_hard_threshold_and_block_mask_match_reference(case, p, data):
    E = emu("scope")
    x, block, scope = case
    nnz = data.draw(st.integers(0, t_scope._nb(scope)))
    keep_ties = data.draw(st.booleans())
    values = None
    if data.draw(st.booleans()):
        values = torch.randint(-8, 9, x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    a, b = x.clone(), x.clone()
    bm_ref = scope_ref.scope_hard_threshold_(a, None if values is None else values.clone(), block, scope, nnz, p,
                                             keep_ties)
    t_scope._same(E.scope_hard_threshold_(b, values, block, scope, nnz, p, keep_ties), bm_ref)
    t_scope._same(b, a)
    grid = [n // s_ for n, s_ in zip(x.shape, block)]
    m = torch.rand(grid, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))) < 0.5
    a, b = x.clone(), x.clone()
    scope_ref.block_apply_mask_(a, block, m)
    E.block_apply_mask_(b, block, m)
    t_scope._same(b, a)


@settings(deadline=None)
@given(t_scope.layouts(nan=True), st.data())
def test_block_soft_threshold_matches_reference(case, data):
    E = emu("scope")
    x, block, _ = case
    x = x / 4
    grid = [n // b for n, b in zip(x.shape, block)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    t = torch.rand(grid, generator=g).to(x.dtype) * 2
    cond = (torch.rand(x.shape, generator=g) + 0.25).to(x.dtype) if data.draw(st.booleans()) else None
    eps = float(torch.finfo(x.dtype).eps)
    a, b = x.clone(), x.clone()
    scope_ref.block_soft_threshold_(a, block, t, cond, 30, 1e-9, eps)
    E.block_soft_threshold_(b, block, t, cond, 30, 1e-9, eps)
    tol = t_scope.SOFT_TOL[x.dtype]  # see test_scope_ops: measured bit for bit (fp16 / bf16), 1.2e-7 (fp32)
    torch.testing.assert_close(b, a, equal_nan=True, **tol)


@pytest.mark.parametrize("block", [[1, 4], [1, 1], [4, 8]])
def test_block_soft_threshold_refuses_bad_values(block):
    """NaN / negative thresholds, a conditioner not finite and > 0: refused before x is written
    (csrc/scope_layout.h check_soft_values, shared with the CPU kernel; the reference's messages)."""
    E = emu("scope")
    grid = [4 // block[0], 8 // block[1]]
    t = torch.full(grid, 0.3)
    h = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) + 0.5
    nan = float("nan")
    for tt, hh, msg in ((t.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(nan)), None,
                         r"^block_soft_threshold_: thresholds: NaN threshold"),
                        (t - 0.5, h, r"^block_soft_threshold_: thresholds: expected thresholds >= 0, got a minimum "
                                     r"of -0\.2"),
                        (t, h.index_put((torch.tensor([3]), torch.tensor([7])), torch.tensor(0.0)),
                         r"^block_soft_threshold_: conditioner: expected finite values > 0"),
                        (t, -h, r"^block_soft_threshold_: conditioner: expected finite values > 0"),
                        (t, h.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("inf"))),
                         r"^block_soft_threshold_: conditioner: expected finite values > 0 .* maximum of inf"),
                        (t, h.index_put((torch.tensor([2]), torch.tensor([2])), torch.tensor(nan)),
                         r"^block_soft_threshold_: conditioner: NaN value")):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
        before = x.clone()
        with pytest.raises(ValueError, match=msg):
            E.block_soft_threshold_(x, block, tt, hh, 20, 1e-8, 1e-7)
        assert torch.equal(x, before)


@pytest.mark.parametrize("sms", [2, 132])
def test_scope_large_paths_match_reference(sms):
    """Scopes over 32 blocks (CTA selection, dynamic shared memory cache, multi-pass radix), whole-tensor
    scopes, and dense N:M tiles with ragged tails, ties and NaN; few SMs make blocks loop."""
    E = emu("scope")
    with emulated(sms):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(-8, 9, (37, 300), generator=g).float()
        x[3, 5] = float("nan")
        for scope, nnz in (([1, 300], 31), ([37, 300], 1000), ([1, 300], 300), ([1, 300], 0), ([37, 60], 7)):
            for kt in (False, True):
                t_scope._same(E.scope_mask(x, [1, 1], scope, nnz, 2.0, False, kt, True),
                              scope_ref.scope_mask(x, [1, 1], scope, nnz, 2.0, False, kt, True))
            k = max(1, min(nnz, math.prod(scope) - 1))
            t_scope._same(E.scope_kth(x, [1, 1], scope, k, 2.0, False, 1.0, True),
                          scope_ref.scope_kth(x, [1, 1], scope, k, 2.0, False, 1.0, True))
        xb = torch.randn(64, 512, generator=g)
        t_scope._same(E.scope_mask(xb, [1, 16], [2, 32], 20, 2.0, False, False, True),
                      scope_ref.scope_mask(xb, [1, 16], [2, 32], 20, 2.0, False, False, True))
        for m in (2, 4, 16):
            y = torch.randint(-3, 4, (37, 16 * 67), generator=g).to(torch.bfloat16)
            y[torch.rand(y.shape, generator=g) < 0.02] = float("nan")
            for nnz in sorted({0, 1, m // 2, m}):
                t_scope._same(E.scope_mask(y, [1, 1], [1, m], nnz, 2.0, False, False, True),
                              scope_ref.scope_mask(y, [1, 1], [1, m], nnz, 2.0, False, False, True))
                a, b = y.clone(), y.clone()
                t_scope._same(E.scope_hard_threshold_(a, None, [1, 1], [1, m], nnz, 1.0, True),
                              scope_ref.scope_hard_threshold_(b, None, [1, 1], [1, m], nnz, 1.0, True))
                t_scope._same(a, b)

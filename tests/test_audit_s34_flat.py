"""Audit (session 34) of the flat projection ``gradkit.projection.project`` at its edges and of the ops under it
(``gradkit.ops.project_flat`` / ``projection_matrix``: csrc/cpu/projection.cpp, csrc/project_wide.h, the Triton
kernels in gradkit/kernels/triton/projection.py under TRITON_INTERPRET=1).

Every test compares against an explicit reference: the Python generator (gradkit.kernels.reference.projection,
the documented definition of every entry), a float64 product with an explicitly generated matrix, or a closed
form. Tests of correct behaviour pass; each test marked ``# DEFECT:`` asserts the correct behaviour and fails on
the code at the time of the audit.

Memory: one test maps 8.6 GB of *untouched* virtual memory (zero pages; its resident memory stays under 50 MB);
every other test stays under 0.5 GB."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton launchers run on CPU tensors (before triton's import)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from gradkit import _ext, ops  # noqa: E402
from gradkit import projection as P  # noqa: E402
from gradkit.kernels.reference import projection as ref  # noqa: E402

needs_ext = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")
F32_MIN = 2.0 ** -126  # float32's smallest normal number


def _ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place (sign-magnitude bits)."""
    ia = a.float().contiguous().view(torch.int32).long()
    ib = b.float().contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def _triton():
    """The Triton launchers under the interpreter, or skip."""
    pytest.importorskip("triton")
    from gradkit.kernels.triton import interpreting
    from gradkit.kernels.triton import projection as T

    if not interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)")
    return T


def _largest_allocation(fn):
    """The largest single CPU allocation (bytes) any op made while fn() ran, and fn's result."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        res = fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0]), res


def _ref_stream(x_row: torch.Tensor, k: int, seed: int, kind: int, step: int = 1 << 18) -> torch.Tensor:
    """x_row (D,) @ R^T in float64, R generated chunk by chunk (never the whole k x D matrix)."""
    D = x_row.shape[0]
    acc = torch.zeros(k, dtype=torch.float64)
    for c in range(0, D, step):
        n = min(step, D - c)
        acc += ops.projection_matrix(k, n, seed, kind, k, 0, c).double() @ x_row[c:c + n].double()
    return acc


# =========================================================================== defects


@needs_ext
@pytest.mark.parametrize("case", ["fp16", "bf16", "fp32-transposed"])
def test_gemm_path_scratch_is_not_wider_than_x(case):
    # DEFECT: the CPU GEMM path (every Gaussian projection; Rademacher with B < 4 or k < 32) converts x that it
    # cannot read in place (fp16 / bf16 / fp64, or a non-unit column stride) into a per-thread fp32 scratch
    # allocated as at::empty({B, kDT}) with kDT = 1024 (csrc/cpu/projection.cpp:528), whatever D is. For the narrow
    # chunks project() itself makes of a tall array (~64 MiB: 64 columns once B > 512K fp16 rows) the scratch is
    # 1024 / D times the tile it holds: here a 2.5 MB fp16 x (20000 x 64) allocates 82 MB, per thread. Correct:
    # the scratch holds min(D, kDT) columns.
    B, D, k = 20000, 64, 8
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(B, D, generator=gen)
    x = {"fp16": base.half(), "bf16": base.bfloat16(), "fp32-transposed": base.T.contiguous().T}[case]
    assert x.shape == (B, D)
    for kind in (1, 0):
        big, got = _largest_allocation(lambda: ops.project_flat(x, k, 5, kind, 0))
        want = x.double() @ P.projection_matrix(k, D, seed=5, kind=kind, dtype=torch.float64).T
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        bound = 2 * B * D * 4 + B * k * 4  # twice x as fp32, plus the output
        assert big <= bound, f"kind {kind}: largest allocation {big} bytes; x is {x.nbytes}, bound {bound}"


@needs_ext
@pytest.mark.parametrize("B,k,kind", [(2, 8, 0), (4, 32, 0), (1, 8, 1)])
def test_float64_input_makes_no_full_size_temporary(B, k, kind):
    # DEFECT: every float64 call of project_flat (GEMM path, sign-table path, any kind) first materialises |x| in
    # full: csrc/project_wide.h:30 is at::amax(at::abs(x), {1}), a B x D float64 temporary, although the header
    # says the rule "costs one reduction over a float64 x; the copy only when a row needs it", and no row needs it
    # here (all values are within float32's range). For the flat projection's D ~ 1e9 that doubles the memory of
    # the call (8 GB more per row). Correct: a reduction without a full-size temporary (e.g. at::aminmax(x, 1),
    # or linalg_vector_norm(x, inf, 1)), so the largest allocation is a per-tile scratch.
    D = 1 << 20
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    big, got = _largest_allocation(lambda: ops.project_flat(x, k, 3, kind, 0))
    want = torch.stack([_ref_stream(x[b], k, 3, kind) for b in range(B)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6 * math.sqrt(D))
    assert big <= x.nbytes // 8, f"largest allocation {big} bytes for a float64 x of {x.nbytes} bytes"


def test_triton_float64_input_makes_no_full_size_temporary():
    # DEFECT: the Triton launcher's copy of the rule (gradkit/kernels/triton/projection.py:251,
    # ``x.abs().amax(dim=1)``) likewise materialises |x| (B x D float64) on every float64 call.
    T = _triton()
    x = torch.randn(2, 1 << 14, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    T.project_flat(x, 4, 1, 0, 0)  # compile / warm the interpreter first
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = T.project_flat(x, 4, 1, 0, 0)
    torch.testing.assert_close(got, ref.project_flat(x, 4, 1, 0, 0), rtol=1e-5, atol=1e-4)
    abs_bytes = max([e.cpu_memory_usage for e in prof.events() if e.name == "aten::abs"] + [0])
    assert abs_bytes < x.nbytes, f"aten::abs allocated {abs_bytes} bytes (x is {x.nbytes})"


@needs_ext
def test_chunked_float64_rows_past_float32_range_do_not_turn_nan():
    # DEFECT: project() sums per-chunk float32 partials (python/gradkit/projection.py:222, acc.add_(part)). A
    # float64 row holding finite values past float32's range projects to its exact value whole (csrc/project_wide.h
    # scales the row), but chunked each chunk's partial is past float32's range, comes back +-inf, and the partials
    # meet as inf - inf = NaN: x = [[1e39 s0, -1e39 s1]] (s = R's signs) gives 0 whole and NaN with chunk=1, for a
    # tensor and for a numpy array alike (arrays are chunked by default, ~64 MiB at a time). The docstring says "The
    # result does not depend on chunk", and NaN comes only from NaN / Inf inputs. Correct: the whole-row result
    # (the reference's float64 value, 0).
    R = P.projection_matrix(1, 2, dtype=torch.float64)
    x = torch.tensor([[1e39, -1e39]], dtype=torch.float64) * R.sign()
    assert (x @ R.T).item() == 0.0 and ref.project_flat(x, 1, 0, 0, 0).item() == 0.0
    assert P.project(x, 1).item() == 0.0  # whole: right
    for src in (x, x.numpy()):
        got = P.project(src, 1, chunk=1)
        assert not torch.isnan(got).any(), f"chunked projection of finite float64 input is NaN ({type(src).__name__})"
        assert got.item() == 0.0


@needs_ext
def test_float64_values_below_float32_range_are_not_flushed():
    # DEFECT: float64 x is rounded to float32 before it is multiplied (GEMM tile copy, sign-table stage_word,
    # Triton's x.float() / .to(tl.float32)); csrc/project_wide.h rescues rows past float32's range but not rows
    # below it, so entries under 2^-150 become 0 and the projection of a row of them is 0 even when the exact
    # result is a normal float32. x = sign(R) * 2^-150 with D = 2^24, k = 1: exactly 2^-126 (FLT_MIN, what the
    # reference gives), got 0.0. The Triton launcher says fp64 values are "fp32-accurate anyway"; they are not
    # below 2^-126. Correct: the reference's value (scale such rows up by a power of two, as wide rows are
    # scaled down).
    D = 1 << 24
    R = P.projection_matrix(1, D, seed=0, dtype=torch.float64)
    x = R.sign() * 2.0 ** -150
    assert (x @ R.T).item() == F32_MIN
    got = P.project(x, 1)
    del R, x
    assert got.item() == F32_MIN, f"got {got.item()!r}, exact {F32_MIN!r}"


def test_triton_float64_values_below_float32_range_are_not_flushed():
    # DEFECT: the same flush in the Triton kernel: sign(R) * 2^-150 over 4096 columns is exactly 2^-138 (a float32
    # subnormal the reference returns), the kernel gives 0.
    T = _triton()
    D = 4096
    R = P.projection_matrix(1, D, seed=0, dtype=torch.float64)
    x = R.sign() * 2.0 ** -150
    want = ref.project_flat(x, 1, 0, 0, 0)
    assert want.item() == 2.0 ** -138
    assert T.project_flat(x, 1, 0, 0, 0).item() == 2.0 ** -138


# =========================================================================== 64-bit columns and offsets


@needs_ext
def test_columns_past_2_31_in_a_real_row():
    """x of shape (1, 2^31 + 97), float32, read in place by the GEMM path (pointer + column offsets past 2^31):
    five nonzero entries, two of them past 2^31; the result equals the sum of those entries times R's columns from
    the Python reference. > 2 GB: maps 8.6 GB of virtual memory that is never written (fresh zero pages), so its
    resident memory stays small; skipped where the allocation is refused."""
    D = (1 << 31) + 97
    try:
        # an allocation this size is a fresh anonymous mmap (glibc), whose pages read as zeros without becoming
        # resident; were it not zero-filled the sum below would differ (a spurious failure, not a wrong pass)
        x = torch.empty(1, D, dtype=torch.float32)
    except RuntimeError:
        pytest.skip("cannot map 8.6 GB of virtual memory here")
    cols = [5, (1 << 31) - 1, 1 << 31, (1 << 31) + 33, D - 1]
    vals = [1.5, -2.0, 0.75, 3.0, -1.25]
    for c, v in zip(cols, vals):
        x[0, c] = v
    seed = 2 ** 63 - 1
    got = P.project(x, 1, seed=seed)
    del x
    want = sum(v * ref.matrix_values(1, 1, seed, 0, 1, 0, c)[0, 0].double() for c, v in zip(cols, vals))
    assert got.item() == want.item()  # +-1 entries, values exact in float32: the sum is exact


@needs_ext
@pytest.mark.parametrize("kind", [0, 1])
def test_column_offsets_around_2_31_and_2_32_on_every_path(kind):
    """ops.project_flat with col0 just below 2^31, 2^32 and 2^63 (the chunk offsets project() passes for a long
    row), on the GEMM path (B < 4 or k < 32), the sign-table path (B >= 4, k >= 32) and the Triton kernel, against
    the Python reference."""
    gen = torch.Generator().manual_seed(4)
    tri = None
    try:
        tri = _triton()
    except pytest.skip.Exception:
        pass
    for col0 in ((1 << 31) - 37, (1 << 32) - 64, (1 << 32) + 1, 2 ** 63 - 300):
        for B, k in ((1, 5), (5, 40), (6, 3)):
            x = torch.randn(B, 200, generator=gen)
            want = ref.project_flat(x, k, 2 ** 63 - 1, kind, col0)
            got = ops.project_flat(x, k, 2 ** 63 - 1, kind, col0)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
            if tri is not None and B != 6:
                torch.testing.assert_close(tri.project_flat(x, k, 2 ** 63 - 1, kind, col0), want, rtol=1e-5,
                                           atol=2e-6)


# =========================================================================== seeds


def test_seed_edges():
    """Seeds 0, 1, 2^62, 2^63 - 1 and numpy integers: the same matrix on the C++ CPU kernel, the Python reference
    and the Triton kernel (Rademacher bit for bit, Gaussian within 1 ulp), and project() equal to x R^T; seeds
    outside [0, 2^63) refused with ValueError, bools and floats with TypeError."""
    tri = None
    try:
        tri = _triton()
    except pytest.skip.Exception:
        pass
    x = torch.randn(5, 150, generator=torch.Generator().manual_seed(5))
    for seed in (0, 1, 2 ** 62, 2 ** 63 - 1):
        for kind in (0, 1):
            want = ref.matrix_values(7, 150, seed, kind, 7)
            cpu = P.projection_matrix(7, 150, seed=seed, kind=kind)
            if kind == 0:
                assert torch.equal(cpu, want)
            else:
                assert _ulp(cpu, want) <= 1
            if tri is not None:
                out = torch.empty(7, 150)
                tri.projection_matrix_(out, seed, kind, 7, 0, 0)
                assert (torch.equal(out, cpu) if kind == 0 else _ulp(out, cpu) <= 1)
            got = P.project(x, 7, seed=seed, kind=kind)
            torch.testing.assert_close(got.double(), x.double() @ want.double().T, rtol=1e-5, atol=1e-5)
    assert torch.equal(P.project(x, 7, seed=np.uint64(2 ** 63 - 1)), P.project(x, 7, seed=2 ** 63 - 1))
    assert torch.equal(P.project(x, 7, seed=np.int32(-0)), P.project(x, 7, seed=0))
    for bad in (-1, -(2 ** 63), 2 ** 63, 2 ** 64 - 1, np.uint64(2 ** 64 - 1)):
        with pytest.raises(ValueError, match=r"^seed: "):
            P.project(x, 7, seed=bad)
    for bad in (True, np.bool_(False), 0.0, "0"):
        with pytest.raises(TypeError, match=r"^seed: "):
            P.project(x, 7, seed=bad)


# =========================================================================== the generator's distribution


@needs_ext
def test_gaussian_entries_are_standard_normal():
    """2^20 Gaussian entries (k = 1: N(0, 1) unscaled) of 64 rows: Kolmogorov-Smirnov against N(0, 1) at a false
    alarm probability of 1e-6 (critical value sqrt(ln(2 / 1e-6) / (2 n))), mean / variance / skewness / kurtosis
    within 6 standard errors, tail counts |z| > 2, 3, 4 within 6 Poisson standard deviations, |z| at most Box-
    Muller's bound sqrt(-2 ln(2^-33)) (u1 >= 2^-33), the cos / sin halves of a pair uncorrelated (and their
    squares: a pair is independent), and 1/sqrt(k) scaling exact."""
    n_rows, n_cols = 64, 1 << 14
    z = ops.projection_matrix(n_rows, n_cols, 12345, 1, 1).double()
    f = z.flatten()
    n = f.numel()
    zs, _ = f.sort()
    cdf = torch.special.ndtr(zs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < math.sqrt(math.log(2 / 1e-6) / (2 * n)), ks
    m, v = f.mean().item(), f.var().item()
    assert abs(m) < 6 / math.sqrt(n)
    assert abs(v - 1) < 6 * math.sqrt(2 / n)
    assert abs(((f - m) ** 3).mean().item() / v ** 1.5) < 6 * math.sqrt(6 / n)
    assert abs(((f - m) ** 4).mean().item() / v ** 2 - 3) < 6 * math.sqrt(24 / n)
    for a in (2.0, 3.0, 4.0):
        expect = n * math.erfc(a / math.sqrt(2))
        assert abs((f.abs() > a).sum().item() - expect) < 6 * math.sqrt(expect) + 1
    assert f.abs().max().item() <= math.sqrt(-2 * math.log(0.5 * 2.0 ** -32)) + 1e-6
    even, odd = z[:, 0::2].flatten(), z[:, 1::2].flatten()
    for u, w in ((even, odd), (even ** 2, odd ** 2)):
        assert abs(torch.corrcoef(torch.stack([u, w]))[0, 1].item()) < 6 / math.sqrt(u.numel())
    # the scale: entries at k are the k = 1 values times fp32(1/sqrt(k)), within 1 ulp of fp32
    zk = ops.projection_matrix(3, 500, 12345, 1, 37)
    assert _ulp(zk, (z[:3, :500] / math.sqrt(37)).float()) <= 1


@needs_ext
def test_rademacher_signs_are_balanced():
    """Signs of 2^22 entries: the fraction of + within 6 standard errors of 1/2 overall, and per column position
    mod 64 (the bit of the generator word) and per row; |entries| exactly fp32(1/sqrt(k))."""
    M = ops.projection_matrix(64, 1 << 16, 999, 0, 5)
    s = torch.tensor(1 / math.sqrt(5), dtype=torch.float64).float()
    assert torch.all(M.abs() == s)
    pos = (M > 0).double()
    n = pos.numel()
    assert abs(pos.mean().item() - 0.5) < 6 * 0.5 / math.sqrt(n)
    by_bit = pos.view(64, -1, 64).mean((0, 1))  # (64,): column position mod 64
    assert (by_bit - 0.5).abs().max().item() < 6 * 0.5 / math.sqrt(n / 64)
    by_row = pos.mean(1)
    assert (by_row - 0.5).abs().max().item() < 6 * 0.5 / math.sqrt(1 << 16)


def test_triton_interpreter_generator_matches_cpu():
    """The Triton kernel's matrices against the C++ CPU kernel's directly (not only each against the reference):
    bit for bit for Rademacher, within 1 ulp for Gaussian, on 64 x 4096 and 16 x 4096 blocks at far offsets."""
    T = _triton()
    for kind in (0, 1):
        for rows, cols, row0, col0, seed in ((64, 4096, 0, 0, 0), (16, 4096, 2 ** 40, 2 ** 62 + 5, 2 ** 63 - 1)):
            out = torch.empty(rows, cols)
            T.projection_matrix_(out, seed, kind, 77, row0, col0)
            cpu = ops.projection_matrix(rows, cols, seed, kind, 77, row0, col0)
            if kind == 0:
                assert torch.equal(out, cpu)
            else:
                assert _ulp(out, cpu) <= 1


def test_triton_project_flat_edges():
    """The Triton flat projection at its edges against the reference: B = 0 and D = 0 (zeros), k = 1, D = 1,
    k > D, k not a multiple of its 64-row tile, col0 unaligned, bf16 / fp16 / fp64 x, an expand()ed x."""
    T = _triton()
    gen = torch.Generator().manual_seed(6)
    assert torch.equal(T.project_flat(torch.zeros(0, 9), 3, 1, 0, 0), torch.zeros(0, 3))
    assert torch.equal(T.project_flat(torch.zeros(4, 0), 3, 1, 1, 0), torch.zeros(4, 3))
    for (B, D, k, col0) in ((1, 1, 1, 0), (3, 1, 70, 63), (2, 5, 100, 1), (17, 129, 65, 64), (5, 200, 1, 3)):
        for kind in (0, 1):
            for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                x = torch.randn(B, D, generator=gen).to(dt)
                got = T.project_flat(x, k, 9, kind, col0)
                assert got.dtype == torch.float32 and got.shape == (B, k)
                torch.testing.assert_close(got, ref.project_flat(x, k, 9, kind, col0), rtol=1e-5, atol=2e-6)
    x = torch.randn(1, 300, generator=gen).expand(5, 300)
    torch.testing.assert_close(T.project_flat(x, 33, 2, 1, 7), ref.project_flat(x, 33, 2, 1, 7), rtol=1e-5,
                               atol=2e-6)


# =========================================================================== determinism and accuracy


@needs_ext
def test_thread_count_does_not_change_bits_on_more_paths():
    """torch.set_num_threads(1) and (2) give the same bits: the GEMM path with several k tiles and D splits (and
    MKL inside), with one tile; the sign-table path with B not a multiple of its 16-row tile and several output
    splits; Gaussian and Rademacher."""
    gen = torch.Generator().manual_seed(7)
    old = torch.get_num_threads()
    try:
        for B, D, k, kind in [(5000, 1000, 200, 1), (3000, 1000, 16, 0), (64, 700, 300, 1), (3, 20000, 100, 1),
                              (17, 3000, 33, 0), (33, 5000, 700, 0), (2, 3000, 600, 0)]:
            x = torch.randn(B, D, generator=gen)
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                outs.append(P.project(x, k, seed=1, kind=kind))
            assert torch.equal(outs[0], outs[1]), (B, D, k, kind)
    finally:
        torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("kind", [0, 1])
def test_chunking_batch_and_source_agree_within_fp32_rounding(kind):
    """The same rows projected whole, row by row, chunked (aligned and unaligned to the 64-column words and
    1024-column tiles), as a numpy array and as a stream of chunks agree within float32 summation error of the
    float64 product (they are not bitwise equal: each call sums in its own order, and chunks' float32 partials are
    added, so "the result does not depend on chunk" holds up to rounding only)."""
    gen = torch.Generator().manual_seed(8)
    for B, D, k in ((8, 3000, 64), (8, 3000, 16), (5, 4100, 40)):
        x = torch.randn(B, D, generator=gen)
        want = x.double() @ P.projection_matrix(k, D, seed=3, kind=kind, dtype=torch.float64).T
        tol = 4e-7 * math.sqrt(D) * x.abs().max().item() + 1e-6
        results = [P.project(x, k, seed=3, kind=kind),
                   torch.cat([P.project(x[i:i + 1], k, seed=3, kind=kind) for i in range(B)]),
                   P.project(x.numpy(), k, seed=3, kind=kind),
                   P.project(x.numpy(), k, seed=3, kind=kind, chunk=100),
                   P.project(iter([x[:, :7], x[:, 7:1500].numpy(), x[:, 1500:]]), k, seed=3, kind=kind)]
        results += [P.project(x, k, seed=3, kind=kind, chunk=c) for c in (1, 64, 1000, 1024)]
        for r in results:
            assert r.dtype == torch.float32 and r.shape == (B, k)
            torch.testing.assert_close(r.double(), want, rtol=0, atol=tol)


@needs_ext
@pytest.mark.parametrize("kind", [0, 1])
def test_float64_and_half_inputs(kind):
    """float64 x: the result is float32 (documented) and within float32 rounding of the float64 product; bf16 /
    fp16 x: widened exactly, so the result equals the float64 product of their values within float32 summation
    error; on the GEMM (B < 4) and sign-table (B >= 4, k >= 32) paths."""
    gen = torch.Generator().manual_seed(9)
    for B, D, k in ((2, 777, 5), (6, 1500, 48)):
        base = torch.randn(B, D, generator=gen, dtype=torch.float64) * 1e-3
        R = P.projection_matrix(k, D, seed=4, kind=kind, dtype=torch.float64)
        for dt in (torch.float64, torch.bfloat16, torch.float16):
            x = base.to(dt)
            got = P.project(x, k, seed=4, kind=kind)
            assert got.dtype == torch.float32
            want = x.double() @ R.T
            scale = (x.double().abs() @ R.abs().T).max().item()  # sum |x| |R|: the conditioning
            assert (got.double() - want).abs().max().item() <= 2e-6 * scale


@needs_ext
def test_long_row_accuracy_against_a_streamed_float64_reference():
    """D = 2^22 columns against x R^T computed in float64 from R generated 2^18 columns at a time: the GEMM path
    (B = 1, Rademacher and Gaussian) and the sign-table path (4 expand()ed rows, read in place). Measured (this
    audit, D = 2^24): the GEMM path's error is 2.6e-7 |x|, the sign-table path's 8.5e-6 |x| (33x: it adds the
    2^18 word sums of an output one after the other in float32); both within the bound here."""
    D, k = 1 << 22, 32
    v = torch.randn(1, D, generator=torch.Generator().manual_seed(10))
    norm = v.double().norm().item()
    for kind, x in ((0, v), (1, v), (0, v.expand(4, D))):
        want = _ref_stream(v[0], k, 9, kind)
        got = P.project(x, k, seed=9, kind=kind)
        err = (got.double() - want[None]).abs().max().item()
        assert err <= 2e-5 * norm, (kind, x.shape, err / norm)


@needs_ext
def test_projection_does_not_depend_on_the_matrix_cache(monkeypatch):
    """project() keeps no matrices: its results are the same bits whatever MATRIX_CACHE_BYTES is, and it adds
    nothing to factored_project's cache."""
    x = torch.randn(6, 900, generator=torch.Generator().manual_seed(11))
    want = [P.project(x, k, seed=2, kind=kd) for k in (7, 40) for kd in (0, 1)]
    P.clear_matrix_cache()
    for limit in (0, 1, 1 << 30):
        monkeypatch.setattr(P, "MATRIX_CACHE_BYTES", limit)
        got = [P.project(x, k, seed=2, kind=kd) for k in (7, 40) for kd in (0, 1)]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert len(P._MATRICES) == 0


@needs_ext
@pytest.mark.parametrize("kind", [0, 1])
def test_rows_do_not_depend_on_k_beyond_the_scale(kind):
    """Entry (row, col) depends on k only through the 1/sqrt(k) scale: the first 10 rows at k = 10 are those at
    k = 300 times fp32(1/sqrt(10)) / fp32(1/sqrt(300)) (sign for sign; Gaussian within 1 ulp), and project()'s
    first outputs scale likewise."""
    big = P.projection_matrix(300, 500, seed=5, kind=kind, dtype=torch.float64)
    small = P.projection_matrix(10, 500, seed=5, kind=kind, dtype=torch.float64)
    if kind == 0:
        assert torch.equal(small.sign(), big[:10].sign())
    else:
        assert _ulp(small, (big[:10] * math.sqrt(300) / math.sqrt(10)).float()) <= 1
    x = torch.randn(4, 500, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(P.project(x, 10, seed=5, kind=kind).double() * math.sqrt(10),
                               P.project(x, 300, seed=5, kind=kind)[:, :10].double() * math.sqrt(300),
                               rtol=1e-5, atol=1e-4)


# =========================================================================== API edges


@needs_ext
def test_meta_fake_and_compiled_chunked_projection():
    """A meta-device x (whole, chunked, with out=), a FakeTensor x with chunk, and torch.compile(fullgraph=True,
    dynamic=True) of a chunked projection and of a backward: shapes / dtypes, and the compiled values equal the
    eager ones and x R^T."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for kw in ({}, {"chunk": 7}, {"out": torch.empty(3, 4, device="meta")}):
        y = P.project(torch.empty(3, 20, device="meta"), 4, **kw)
        assert y.shape == (3, 4) and y.dtype == torch.float32 and y.device.type == "meta"
    with FakeTensorMode():
        y = P.project(torch.empty(3, 20, dtype=torch.bfloat16), 4, chunk=6, kind="gaussian")
        assert y.shape == (3, 4) and y.dtype == torch.float32
    f = torch.compile(lambda t: P.project(t, 5, seed=3, chunk=7), fullgraph=True, backend="aot_eager", dynamic=True)
    for D in (30, 41):
        x = torch.randn(4, D, generator=torch.Generator().manual_seed(D))
        got = f(x)
        assert torch.equal(got, P.project(x, 5, seed=3, chunk=7))
        torch.testing.assert_close(got.double(), x.double() @ P.projection_matrix(5, D, seed=3, dtype=torch.float64).T,
                                   rtol=1e-5, atol=1e-5)
    g = torch.compile(lambda t: P.project(t, 5, seed=3, kind="gaussian"), fullgraph=True, backend="aot_eager",
                      dynamic=True)
    for B, D in ((4, 30), (3, 47)):
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(B), requires_grad=True)
        w = torch.randn(B, 5, generator=torch.Generator().manual_seed(D))
        (g(x) * w).sum().backward()
        want = w.double() @ P.projection_matrix(5, D, seed=3, kind="gaussian", dtype=torch.float64)
        torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
def test_out_argument_layouts_and_aliasing():
    """out= may be non-contiguous, and may alias x (whole and chunked: every chunk is read before out is
    written); a wrong dtype, width, row count or device is refused before any work."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(6, 50, generator=gen)
    want = x.double() @ P.projection_matrix(5, 50, seed=0, dtype=torch.float64).T
    out = torch.empty(5, 6).T
    assert P.project(x, 5, out=out) is out
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for chunk in (None, 2):
        xa = torch.randn(5, 5, generator=gen)
        w = xa.double() @ P.projection_matrix(5, 5, seed=0, dtype=torch.float64).T
        y = P.project(xa, 5, out=xa, chunk=chunk)
        assert y is xa
        torch.testing.assert_close(y.double(), w, rtol=1e-5, atol=1e-5)
    for bad in (torch.empty(6, 5, dtype=torch.float64), torch.empty(6, 4), torch.empty(5, 5),
                torch.empty(6, 5, device="meta"), torch.empty(6, 5, dtype=torch.float16)):
        with pytest.raises(ValueError, match=r"^out: "):
            P.project(x, 5, out=bad)


def test_sign_table_path_accuracy_does_not_grow_with_d():
    """The CPU Rademacher sign-table path (B >= 4, k >= 32) kept one float32 running sum per output over every
    64-column word: at D = 2^22 its error was ~2.4e-6 |x| (2^24: 6.4e-6), growing with D, where the GEMM path's is
    ~4e-7. Float32 sums of 64 words and a float64 total keep it at the level of a float32 product."""
    from gradkit.ops import projection as OP
    D, k = 1 << 22, 32
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    y = OP.project_flat(x, k, 11, 0, 0)
    ref = torch.zeros(4, k, dtype=torch.float64)
    for c0 in range(0, D, 1 << 20):
        ref += x[:, c0:c0 + (1 << 20)].double() @ OP.projection_matrix(k, 1 << 20, 11, 0, k, 0, c0,
                                                                         dtype=torch.float64).T
    e = float(((y.double() - ref).abs().amax(1) / x.double().norm(dim=1)).max())
    assert e < 5e-7, e

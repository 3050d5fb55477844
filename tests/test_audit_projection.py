"""Audit of the random-projection family at large sizes and unusual layouts (see the audit report): the
fixes' regression tests, each failing on the code before its fix."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton launchers run on CPU tensors (before any triton import)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from gradkit import _ext, ops  # noqa: E402
from gradkit import projection as P  # noqa: E402
from gradkit.kernels.reference import projection as ref  # noqa: E402

needs_ext = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")


# ---- projection_matrix: numpy-integer rows / row0 skipped the "row0 + rows <= k" check --------------------------
def test_projection_matrix_numpy_int_rows_are_checked_against_k():
    """``projection_matrix(np.int64(10), 5, k=4)`` returned 10 rows of a 4-row matrix (rows 4..9 do not exist;
    the check ran for Python ints only); with row0 a numpy int likewise. Now the same error as for ints."""
    with pytest.raises(ValueError, match=r"^rows: row0 \+ rows = 0 \+ 10 exceeds k = 4"):
        P.projection_matrix(np.int64(10), 5, k=4)
    with pytest.raises(ValueError, match=r"^rows: row0 \+ rows = 3 \+ 3 exceeds k = 4"):
        P.projection_matrix(3, 5, k=4, row0=np.int64(3))
    with pytest.raises(ValueError, match=r"^rows: row0 \+ rows = 3 \+ 3 exceeds k = 4"):
        P.projection_matrix(np.int32(3), 5, k=np.int64(4), row0=3)
    # numpy integers that fit are taken as ints: the same matrix (k defaults to rows, the error names rows)
    got = P.projection_matrix(np.int64(4), np.uint16(70), seed=np.int64(9), row0=np.int8(0), col0=np.int64(3))
    assert torch.equal(got, P.projection_matrix(4, 70, seed=9, col0=3))
    with pytest.raises(TypeError, match=r"^rows: expected an int, got bool$"):
        P.projection_matrix(True, 5)
    with pytest.raises(TypeError, match=r"^cols: expected an int, got float$"):
        P.projection_matrix(2, 5.0)
    with pytest.raises(ValueError, match=r"^rows: must be non-negative, got -1$"):
        P.projection_matrix(-1, 5, k=4)


# ---- project: a non-float numpy array with no columns gave zeros; others were named "x chunk" -------------------
def test_project_rejects_non_float_arrays_up_front():
    for D in (0, 10):
        with pytest.raises(TypeError, match=r"^x: expected a float16/float32/float64 array, got int32$"):
            P.project(np.zeros((3, D), dtype=np.int32), 4)
    with pytest.raises(TypeError, match=r"^x: expected a float16/float32/float64 array, got bool$"):
        P.project(np.zeros((3, 5), dtype=bool), 4, chunk=2)
    z = P.project(np.zeros((3, 0), dtype=np.float32), 4)  # a float array with no columns: zeros, as before
    assert z.shape == (3, 4) and not z.any()


def test_seed_and_sizes_accept_numpy_integers_but_not_bools():
    """The ops accepted numpy integers while the public functions raised TypeError for them; both now take them
    (bools, numpy's included, stay refused)."""
    x = torch.randn(3, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = P.project(x, 8, seed=5)
    assert torch.equal(P.project(x, np.int64(8), seed=np.uint32(5), chunk=np.int16(64)),
                       P.project(x, 8, seed=5, chunk=64))
    torch.testing.assert_close(want, ref.project_flat(x, 8, 5, 0, 0), rtol=1e-5, atol=1e-5)
    for bad in (True, np.bool_(True)):
        with pytest.raises(TypeError, match=r"^seed: expected an int, got bool"):
            P.project(x, 8, seed=bad)
    with pytest.raises(ValueError, match=r"^seed: must be a non-negative 63-bit integer"):
        P.project(x, 8, seed=np.uint64(2 ** 63))
    with pytest.raises(ValueError, match=r"^seed: must be a non-negative 63-bit integer"):
        P.project(x, 8, seed=np.int64(-1))
    assert P.derive_seed(np.int64(-7), "m", "left") == P.derive_seed(-7, "m", "left")
    gen = torch.Generator().manual_seed(2)
    a, g = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 4, generator=gen)
    assert torch.equal(P.factored_project(a, g, np.int64(4), seed=np.int64(3), name="m"),
                       P.factored_project(a, g, 4, seed=3, name="m"))
    with pytest.raises(TypeError, match=r"^seed: expected an int, got bool$"):
        P.factored_project(a, g, 4, seed=np.bool_(True))


# ---- CPU sign-table path: an expand()ed (stride-0) x was copied whole (B x D floats) -----------------------------
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_path_reads_expanded_rows_in_place(dtype):
    """project_flat on the sign-table path (Rademacher, B >= 4, k >= 32) made a contiguous copy of any x whose
    rows are not disjoint: for ``v.expand(B, D)`` with D ~ 1e9 that is B x D floats (tens of GB) for a tensor
    that holds D. Rows are only read, so any row stride is read in place: no allocation beyond the output, and
    the bits of the contiguous copy's projection."""
    B, D, k = 8, 4096, 32
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(1, D, generator=gen).to(dtype)
    x = v.expand(B, D)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = ops.project_flat(x, k, 7, 0, 130)
    biggest = max([e.cpu_memory_usage for e in prof.events()] + [0])
    assert biggest <= B * k * 4, f"allocated {biggest} bytes (a copy of x is {B * D * x.element_size()})"
    assert torch.equal(got, ops.project_flat(x.contiguous(), k, 7, 0, 130))
    assert torch.equal(got, got[:1].expand(B, k))
    torch.testing.assert_close(got, ref.project_flat(x, k, 7, 0, 130), rtol=1e-5, atol=1e-4)
    # a non-unit column stride (a transposed x) is still copied, and still right
    xt = torch.randn(D, B, generator=gen).to(dtype).T
    torch.testing.assert_close(ops.project_flat(xt, k, 7, 0, 5), ref.project_flat(xt, k, 7, 0, 5), rtol=1e-5,
                               atol=1e-4)


# ---- Triton launchers: grid axis 1 past CUDA's 65535 -----------------------------------------------------------
class _GridSpy:
    """Stands in for a @triton.jit kernel: records every launch grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.fixture
def triton_proj(monkeypatch):
    pytest.importorskip("triton")
    from gradkit.kernels.triton import interpreting
    from gradkit.kernels.triton import projection as T

    if not interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 before triton is imported)")
    monkeypatch.setattr(T, "_MAX_GRID_YZ", 2, raising=False)  # CUDA: 65535 (gridDim.y / .z), shrunk for the CPU
    return T


def test_triton_matrix_slices_columns_past_the_grid_limit(triton_proj, monkeypatch):
    """projection_matrix_ put the column tiles on grid axis 1: more than 65535 * 128 columns (8.4M, e.g. one row
    of R for D = 1e8) is a launch CUDA refuses. Now sliced; every launch within the limit, the same entries."""
    T = triton_proj
    spy = _GridSpy(T._matrix_kernel)
    monkeypatch.setattr(T, "_matrix_kernel", spy)
    for kind in (0, 1):
        out = torch.empty(5, 64 * 5 + 17)  # 6 column tiles of 64 (interpreter tiles): 3 slices of 2
        T.projection_matrix_(out, 2 ** 62 + 3, kind, 9, 2 ** 32 - 2, 2 ** 32 - 70)
        want = ref.matrix_values(5, out.shape[1], 2 ** 62 + 3, kind, 9, 2 ** 32 - 2, 2 ** 32 - 70)
        if kind == 0:
            assert torch.equal(out, want)
        else:
            assert (out.view(torch.int32).long() - want.view(torch.int32).long()).abs().max() <= 1
    assert spy.grids and all(g[1] <= 2 for g in spy.grids), spy.grids
    assert len(spy.grids) == 6


def test_triton_project_flat_slices_rows_past_the_grid_limit(triton_proj, monkeypatch):
    """project_flat put the B tiles on grid axis 1: more than 65535 * 64 rows (4.2M) is a launch CUDA refuses
    (the default path for Rademacher x on a GPU). Now sliced by rows; the same result as the reference."""
    T = triton_proj
    spy = _GridSpy(T._project_flat_kernel)
    monkeypatch.setattr(T, "_project_flat_kernel", spy)
    B = 5 * T.BLOCKS["b"] + 3  # 6 B tiles of 16: 3 slices of 2
    gen = torch.Generator().manual_seed(4)
    for kind, dt in ((0, torch.float32), (1, torch.float64), (0, torch.bfloat16)):
        x = torch.randn(B, 150, dtype=torch.float64, generator=gen).to(dt)
        got = T.project_flat(x, 20, 11, kind, 2 ** 32 + 3)
        want = ref.project_flat(x, 20, 11, kind, 2 ** 32 + 3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert spy.grids and all(g[1] <= 2 and g[2] <= 2 for g in spy.grids), spy.grids

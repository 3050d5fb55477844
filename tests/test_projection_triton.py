"""The Triton projection kernels against the plain-PyTorch reference, on CPU tensors through the
Triton interpreter (small grids): generated matrices bit for bit (Rademacher) / within 1 ulp
(Gaussian) at arbitrary row/column offsets, and the in-tile flat projection with default and
tiny tiles, several D splits and unaligned col0 (tiles start on 64-column word boundaries)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import contextlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from conftest import use_backend  # noqa: E402
from gradkit import ops  # noqa: E402
from gradkit.kernels.reference import projection as R  # noqa: E402
from gradkit.kernels.triton import projection as T  # noqa: E402
from test_projection_ops import ulp_diff  # noqa: E402

_EX = max(10, settings.default.max_examples // 2)
FEW = settings(deadline=None, max_examples=_EX)


@contextlib.contextmanager
def blocks(**kw):
    saved = dict(T.BLOCKS)
    T.BLOCKS.update(kw)
    try:
        yield
    finally:
        T.BLOCKS.clear()
        T.BLOCKS.update(saved)


@FEW
@given(rows=st.integers(1, 20), cols=st.integers(1, 150), row0=st.one_of(st.integers(0, 50), st.integers(0, 2 ** 48)),
       col0=st.one_of(st.integers(0, 130), st.integers(0, 2 ** 48)), seed=st.integers(0, 2 ** 63 - 1),
       k=st.integers(1, 999), kind=st.sampled_from([0, 1]))
def test_triton_matrix_matches_reference(rows, cols, row0, col0, seed, k, kind):
    out = torch.empty(rows, cols)
    T.projection_matrix_(out, seed, kind, k, row0, col0)
    want = R.matrix_values(rows, cols, seed, kind, k, row0, col0)
    if kind == 0:
        assert torch.equal(out, want)
    else:
        assert ulp_diff(out, want) <= 1


def test_triton_matrix_through_backend_override():
    with use_backend("triton"):
        got = ops.projection_matrix(9, 70, 3, 0, 9, 2, 61, dtype=torch.float64)
    assert torch.equal(got, R.matrix_values(9, 70, 3, 0, 9, 2, 61).double())


@FEW
@given(B=st.integers(1, 20), D=st.integers(1, 300), k=st.integers(1, 90), col0=st.integers(0, 300),
       seed=st.integers(0, 2 ** 63 - 1), kind=st.sampled_from([0, 1]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), tiny=st.booleans(),
       split=st.sampled_from([0, 3]))
def test_triton_project_flat_matches_reference(B, D, k, col0, seed, kind, dtype, tiny, split):
    g = torch.Generator().manual_seed(seed % 997)
    x = torch.randn(B, D, generator=g).to(dtype)
    cfg = {"k": 16, "b": 16, "d": 64} if tiny else {}
    with blocks(split_target=split, **cfg):
        got = T.project_flat(x, k, seed, kind, col0)
    want = R.project_flat(x, k, seed, kind, col0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * math.sqrt(D) * 4 / math.sqrt(k) + 1e-6)


def test_triton_project_flat_strided_input_and_offsets():
    x = torch.randn(5, 400)[:, ::2]  # (5, 200), column stride 2
    for col0 in (0, 1, 63, 64, 1000):
        got = T.project_flat(x, 40, 17, 0, col0)
        torch.testing.assert_close(got, R.project_flat(x, 40, 17, 0, col0), rtol=1e-5, atol=1e-5)


def test_triton_bad_inputs():
    """The kernels registered for CUDA (the launchers behind the ops' checks: tests/test_triton_checks.py)."""
    from gradkit.kernels.triton import cuda_kernel

    with pytest.raises(ValueError, match="^k: "):
        cuda_kernel("projection", "project_flat")(torch.randn(2, 3), 0, 1, 0, 0)
    with pytest.raises(ValueError, match="^seed: "):
        cuda_kernel("projection", "projection_matrix_")(torch.empty(2, 2), -1, 0, 3, 0, 0)


def _odd_layouts(n, w, seed):
    """(strided, contiguous copy) pairs: an expanded (row stride 0) and an overlapping (0 < row stride < w)
    (n, w) tensor."""
    g = torch.Generator().manual_seed(seed)
    expanded = torch.randn(1, w, generator=g).expand(n, w)
    base = torch.randn(n * 2 + w, generator=g)
    overlap = base.as_strided((n, w), (2, 1))
    return [(expanded, expanded.contiguous()), (overlap, overlap.contiguous())]


@pytest.mark.parametrize("T_", [2, 40])  # the short-sequence kernel and the per-example one
@pytest.mark.parametrize("which", ["a", "g", "both"])
def test_triton_factored_expanded_and_overlapping_rows(T_, which):
    B, I, O, p = 2, 5, 6, 3
    N = B * T_
    gen = torch.Generator().manual_seed(T_)
    lt, rt = torch.randn(O, p, generator=gen), torch.randn(I, p, generator=gen)
    a0, g0 = torch.randn(N, I, generator=gen), torch.randn(N, O, generator=gen)
    for (ao, ac), (go, gc) in zip(_odd_layouts(N, I, 1), _odd_layouts(N, O, 2)):
        a, ac = (ao, ac) if which in ("a", "both") else (a0, a0)
        g, gc = (go, gc) if which in ("g", "both") else (g0, g0)
        got = T.factored_project(a, g, lt, rt, None, None, T_)
        want = T.factored_project(ac, gc, lt, rt, None, None, T_)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, R.factored_project(ac, gc, lt, rt, None, None, T_), rtol=1e-4, atol=1e-4)


def test_triton_project_flat_expanded_and_overlapping_rows():
    for xs, xc in _odd_layouts(6, 70, 3):
        for kind in (0, 1):
            got = T.project_flat(xs, 12, 5, kind, 3)
            torch.testing.assert_close(got, T.project_flat(xc, 12, 5, kind, 3), rtol=1e-5, atol=1e-5)


def test_triton_backend_gradients():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 70, generator=gen, requires_grad=True)
    a, g = torch.randn(4, 5, generator=gen, requires_grad=True), torch.randn(4, 6, generator=gen, requires_grad=True)
    lt, rt = torch.randn(6, 3, generator=gen), torch.randn(5, 3, generator=gen)
    with use_backend("triton"):
        ops.project_flat(x, 7, 3, 0, 2).sum().backward()
        ops.factored_project(a, g, lt, rt, None, None, 2).sum().backward()
    Rm = R.matrix_values(7, 70, 3, 0, 7, 0, 2)
    torch.testing.assert_close(x.grad, torch.ones(3, 7) @ Rm)
    u, v = g.detach() @ lt, a.detach() @ rt
    ga = (torch.ones(2, 3, 3) @ u.view(2, 2, 3).transpose(1, 2)).transpose(1, 2).reshape(4, 3) @ rt.T
    torch.testing.assert_close(a.grad, ga)
    assert g.grad is not None and torch.isfinite(g.grad).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's NaN
@pytest.mark.parametrize("T_", [1, 2, 4, 40])  # examples sharing a tile (short kernel) and one per program
def test_triton_factored_non_finite_stays_in_its_example(T_):
    """A NaN or inf in one example's a / g, or a NaN in lt with a fully masked example, changes only the
    examples the reference changes: examples sharing a tile were separated by zeroing V alone, so
    NaN * 0 in U spread one example's NaN to the others."""
    B, I, O, p = 3, 5, 6, 3
    N = B * T_
    gen = torch.Generator().manual_seed(7 + T_)
    lt, rt = torch.randn(O, p, generator=gen), torch.randn(I, p, generator=gen)
    a, g = torch.randn(N, I, generator=gen), torch.randn(N, O, generator=gen)
    for bad in (float("nan"), float("inf")):
        for which in ("a", "g"):
            a_, g_ = a.clone(), g.clone()
            (a_ if which == "a" else g_)[0, 0] = bad
            got = T.factored_project(a_, g_, lt, rt, None, None, T_)
            want = R.factored_project(a_, g_, lt, rt, None, None, T_)
            assert not torch.isfinite(got[0]).all()
            torch.testing.assert_close(got[1:], want[1:], rtol=1e-5, atol=1e-5)  # untouched examples
            assert torch.isfinite(got[1:]).all(), (bad, which)
    lt_nan = lt.clone()
    lt_nan[0, 0] = float("nan")
    mask = torch.ones(N, dtype=torch.bool)
    mask[T_:2 * T_] = False  # example 1 fully masked
    got = T.factored_project(a, g, lt_nan, rt, None, mask, T_)
    want = R.factored_project(a, g, lt_nan, rt, None, mask, T_)
    assert torch.equal(got[1], torch.zeros(p, p)) and torch.equal(want[1], torch.zeros(p, p))

"""Audit s35: gradkit.obs.metrics (output_error, resolve, damped_hessian) and the baselines that share its
Hessian conventions, against plain float64 recomputations on small inputs; bad input refused by name before
any work; no float64 copy of the calibration inputs larger than the documented chunk; a progress bar on
resolve's long solve loop."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from gradkit.obs import NotPositiveDefiniteError, damped_hessian, output_error, resolve

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- resolve


# DEFECT: metrics.resolve put rows with a full support among the prune-side rows, so any mask with a fully kept
# row factored the whole damped H first: with a rank-deficient H and the default damp=0 (fewer calibration tokens
# than inputs, or output-row pruning where every row is either fully kept or empty) it raised
# NotPositiveDefiniteError although the documented answer, "rows with a full support are returned unchanged",
# needs no solve at all (and it spent an O(K^3) factorisation on it when it did not raise).
def test_resolve_full_and_empty_rows_need_no_factorisation_of_a_singular_H():
    g = _gen(0)
    W = torch.randn(6, 16, generator=g, dtype=F64)
    X = torch.randn(4, 16, generator=g, dtype=F64)  # rank 4 < K = 16: H is singular
    H = X.T @ X
    mask = torch.zeros(6, 16, dtype=torch.bool)
    mask[[0, 2, 5]] = True  # output-row pruning: rows 0, 2, 5 kept whole, the others removed
    for dtype in (torch.float32, F64):
        got = resolve(W, H, mask, damp=0.0, dtype=dtype)
        assert torch.equal(got[[0, 2, 5]], W[[0, 2, 5]].to(dtype).to(F64))  # unchanged in the compute dtype
        assert bool((got[[1, 3, 4]] == 0).all())
    # a partial support on the same singular H still needs the factorisation and is still refused
    mask[1, :15] = True
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        resolve(W, H, mask, damp=0.0, dtype=F64)


# DEFECT: resolve had no progress output: an exact re-solve costs ~M K^3 / 24 multiply-adds at 50 % (128 rows of
# K = 1024 took 5 s here; a 4096 x 4096 layer runs for many minutes) with no sign of life, unlike sparsegpt and
# prune_model. Now resolve(..., progress=True) shows a tqdm bar over the rows solved (off by default).
def test_resolve_progress_bar_and_its_argument(capfd):
    g = _gen(1)
    W = torch.randn(5, 12, generator=g, dtype=F64)
    X = torch.randn(40, 12, generator=g, dtype=F64)
    H = X.T @ X
    mask = torch.arange(12).expand(5, 12) < torch.tensor([[0], [3], [6], [9], [12]])  # empty/keep/prune/full
    quiet = resolve(W, H, mask, dtype=F64)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    loud = resolve(W, H, mask, dtype=F64, progress=True)
    out, err = capfd.readouterr()
    assert "resolve" in err and "/3 " in err  # the rows that need a solve: 3, 6 and 9 kept columns
    assert torch.equal(loud, quiet)
    with pytest.raises(TypeError, match="progress"):
        resolve(W, H, mask, progress=1)


# ---------------------------------------------------------------------------------------------- damped_hessian


# DEFECT: the public damped_hessian (exported from gradkit.obs) checked only damp: a non-square matrix came back
# as a non-square "damped Hessian" with its leading diagonal damped, NaN went through into the result, an int
# matrix was silently converted, a non-tensor failed with AttributeError, and dtype=float16 returned an fp16
# matrix although every solve in gradkit runs in float32/float64.
def test_damped_hessian_refuses_bad_input_by_name():
    H = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    hd, lam = damped_hessian(H, 0.5)
    assert lam == 1.5 and torch.equal(hd, torch.tensor([[3.5, 1.0], [1.0, 5.5]], dtype=F64))
    with pytest.raises(ValueError, match="hessian: must be square"):
        damped_hessian(torch.ones(3, 5), 0.01)
    with pytest.raises(ValueError, match="hessian: expected a 2-D"):
        damped_hessian(torch.ones(2, 2, 2), 0.01)
    bad = H.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="hessian: contains NaN"):
        damped_hessian(bad, 0.01)
    with pytest.raises(TypeError, match="hessian: expected a floating"):
        damped_hessian(torch.eye(2, dtype=torch.int64), 0.01)
    with pytest.raises(TypeError, match="hessian: expected a tensor"):
        damped_hessian([[1.0, 0.0], [0.0, 1.0]], 0.01)
    with pytest.raises(ValueError, match="dtype"):
        damped_hessian(H, 0.01, torch.float16)
    with pytest.raises(ValueError, match="damp"):
        damped_hessian(H, -1.0)


# ---------------------------------------------------------------------------------------------- output_error


# DEFECT: output_error(W, W', H=...) trusted H to be a Gram matrix: a symmetric indefinite H (or -H) returned a
# negative "relative error" (-0.33 for diag(1, -1, 1, 1)) or a positive ratio of two negative forms, silently.
# Now a negative diagonal entry, or a quadratic form negative beyond round-off, is refused naming H, while the
# round-off negatives of an fp32 X^T X of low rank still count as 0.
def test_output_error_refuses_an_H_that_is_not_a_gram_matrix():
    W = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    Wp = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="H: has a negative diagonal"):
        output_error(W, Wp, H=torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match="H: has a negative diagonal"):
        output_error(W, Wp, H=-torch.eye(4))
    Hi = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1, positive diagonal
    with pytest.raises(ValueError, match="H: not positive semi-definite"):
        output_error(torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2), H=Hi)  # (1, -1) Hi (1, -1)^T = -2
    # a low-rank fp32 Gram matrix, the difference in its null space: exactly 0 error, never negative, not refused
    g = _gen(2)
    X = torch.randn(3, 8, generator=g)
    null = torch.linalg.svd(X.double(), full_matrices=True).Vh[3:]  # (5, 8) orthonormal, X null^T = 0
    W = torch.randn(5, 8, generator=g, dtype=F64)
    Wp = W - null
    for H in (X.T @ X, (X.T @ X).half()):
        e = output_error(W, Wp, H=H)
        assert 0.0 <= e < 1e-3
    assert output_error(W, Wp, X=X) == pytest.approx(0.0, abs=1e-12)


class _LargestF64(TorchFunctionMode):
    """Records the largest float64 tensor any torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == F64:
                self.largest = max(self.largest, t.numel())
        return out


# DEFECT: output_error(..., X=X) converted the whole of X to float64 at once (X.to(float64): n x K x 8 bytes)
# although its docstring bounds the float64 intermediates by chunk_elems: 2 GiB of fp16 calibration activations
# (262144 tokens x 4096) meant an 8 GiB copy and an out-of-memory error. It now converts X chunk_elems at a time.
def test_output_error_float64_copies_of_X_stay_within_chunk_elems():
    g = _gen(3)
    W = torch.randn(6, 8, generator=g)
    Wp = W * (torch.rand(6, 8, generator=g) < 0.5)
    X = torch.randn(300, 8, generator=g).half()
    Wd, Wpd, Xd = W.double(), Wp.double(), X.double()
    want = float(((Wd - Wpd) @ Xd.T).square().sum() / (Wd @ Xd.T).square().sum())
    for chunk in (64, 100, 1 << 22):
        with _LargestF64() as mode:
            got = output_error(W, Wp, X=X, chunk_elems=chunk)
        assert got == pytest.approx(want, rel=1e-12)
        assert 0 < mode.largest <= max(chunk, 8)  # the documented bound, max(chunk_elems, K)


# DEFECT: chunk_elems was passed through int(): "64" or 2.7 were accepted, a non-number raised int()'s own message
# ("invalid literal for int()") without naming the argument, and 0 or negatives were taken as 1.
def test_output_error_chunk_elems_checked_by_name():
    W = torch.randn(2, 3)
    X = torch.randn(4, 3)
    for bad in ("64", 2.7, None, True):
        with pytest.raises(TypeError, match="chunk_elems"):
            output_error(W, W, X=X, chunk_elems=bad)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="chunk_elems"):
            output_error(W, W, X=X, chunk_elems=bad)

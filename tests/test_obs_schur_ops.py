"""obs_schur_extend_ (obs family): the batched Schur-complement factor extension of true OBS, in place.

``ut[:, cnt:cnt+m, K-F:] = linv @ (xf - round(up) @ ut[:, :cnt, K-F:])`` in fp32, rounded to ut's dtype.
The native kernel (and the reference) against a float64 oracle under hypothesis, with an error bound
derived from fp32 rounding (products and sums of any order) plus one rounding to the output dtype: a
wrong index, a missing term or a product in the wrong precision breaks it (test_bound_catches_a_wrong_kernel).
Every call also checks that nothing of ut outside the written window changed. Strided factor windows
(as true OBS passes them), cnt = 0, empty shapes, validation naming the argument (ut untouched), opcheck. The Triton kernel is
tested in test_obs_triton.py against the same oracle and bound (schur_bound).
"""
import os

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import DEVICES
from gradkit import _ext, ops
from gradkit.kernels.reference import obs as ref

pytestmark = pytest.mark.skipif(not _ext.has_op("obs_schur_extend_"), reason="compiled extension not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# relative rounding of one conversion to the output dtype (round to nearest: half an ulp); the Triton
# interpreter truncates bf16 / fp16 stores, so its tests pass trunc=True (a whole ulp)
_OUT_U = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def schur_make(n, m, c, F, dt, seed, strided=True, representable=True, scale=1.0, extra=3):
    """Inputs as true OBS builds them: ut a factor buffer with spare rows and extra leading positions
    (strided: a window of a wider, taller buffer), up read from it (representable in its dtype)."""
    g = torch.Generator().manual_seed(seed)
    K = F + extra
    if strided:
        ut = torch.randn(n, c + m + 4, K + 5, generator=g).to(dt)[:, 1:c + m + 3, 2:K + 2]
    else:
        ut = torch.randn(n, c + m + 2, K, generator=g).to(dt)
    xf = torch.randn(n, m, F, generator=g) * scale
    up = torch.randn(n, m, c, generator=g)
    if representable:
        up = up.to(dt).float()
    linv = torch.randn(n, m, m, generator=g) / max(1, m) ** 0.5
    return ut, xf, up, linv, c


def schur_oracle(ut, xf, up, linv, cnt):
    """float64 value of the contract (up rounded to ut's dtype) and the magnitude that bounds fp32 error."""
    F = xf.shape[2]
    U = ut[:, :cnt, ut.shape[2] - F:].double()
    upr = up.to(ut.dtype).double() if ut.dtype != torch.float32 else up.double()
    X, L = xf.double(), linv.double()
    T = X - upr @ U
    O = L @ T
    m = xf.shape[1]
    eps = 2.0 ** -24
    err = 1.05 * ((cnt + 2) * eps * (L.abs() @ (X.abs() + upr.abs() @ U.abs())) + (m + 1) * eps * (L.abs() @ T.abs()))
    return O, err


def schur_run(fn, args):
    """Runs fn on a copy of ut; returns (written window, violation of the bound, untouched-elsewhere)."""
    ut, xf, up, linv, cnt = args
    work = ut.clone()
    before = work.clone()
    fn(work, xf, up, linv, cnt)
    m, F, K = xf.shape[1], xf.shape[2], ut.shape[2]
    out = work[:, cnt:cnt + m, K - F:]
    same = work.clone()
    same[:, cnt:cnt + m, K - F:] = before[:, cnt:cnt + m, K - F:]
    untouched = bool(torch.equal(same, before))
    return out, untouched


def schur_bound(out, ut, xf, up, linv, cnt, trunc=False):
    """max violation of |out - O| <= err + rounding to out's dtype (<= 0 means within the bound)."""
    O, err = schur_oracle(ut, xf, up, linv, cnt)
    u = _OUT_U[ut.dtype] * (2.0 if trunc else 1.0)
    tol = err + u * (O.abs() + err) + 1e-30
    diff = (out.double() - O).abs()
    return float((diff - tol).max()) if out.numel() else -1.0


def schur_check(fn, args, trunc=False):
    out, untouched = schur_run(fn, args)
    assert untouched, "wrote outside ut[:, cnt:cnt+m, K-F:]"
    assert out.dtype == args[0].dtype
    assert schur_bound(out, *args, trunc=trunc) <= 0
    return out


shapes = st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 50), st.integers(0, 70))


@given(shape=shapes, dt=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16), strided=st.booleans(),
       representable=st.booleans())
def test_native_and_reference_within_fp32_bound(shape, dt, seed, strided, representable):
    n, m, c, F = shape
    args = schur_make(n, m, c, F, dt, seed, strided, representable)
    schur_check(ops.obs_schur_extend_, args)
    schur_check(ref.obs_schur_extend_, args)


def test_bound_catches_a_wrong_kernel():
    """The bound is tight enough to fail: dropping the last factor column, rounding xf to bf16,
    transposing linv, or one part in 2^14 off all break it."""
    args = schur_make(2, 24, 30, 40, torch.float32, 3)
    ut, xf, up, linv, cnt = args
    good, _ = schur_run(ref.obs_schur_extend_, args)
    assert schur_bound(good, *args) <= 0

    def drop_last(u, x, p, li, c):
        F = x.shape[2]
        win = u[:, :, u.shape[2] - F:]
        win[:, c:c + x.shape[1]] = torch.bmm(li, torch.baddbmm(x, p[:, :, :c - 1], win[:, :c - 1], alpha=-1.0))

    bad = [schur_run(drop_last, args)[0],
           schur_run(ref.obs_schur_extend_, (ut, xf.bfloat16().float(), up, linv, cnt))[0],
           schur_run(ref.obs_schur_extend_, (ut, xf, up, linv.transpose(1, 2), cnt))[0],
           good * (1 + 2.0 ** -14)]
    for b in bad:
        assert schur_bound(b, *args) > 0


def test_true_obs_shapes_and_half_storage():
    """The shapes true OBS runs (m = 128 pruned positions per batch, hundreds of factor columns),
    each storage dtype, against the oracle."""
    for dt in DTYPES:
        schur_check(ops.obs_schur_extend_, schur_make(3, 128, 256, 300, dt, 11))


def test_up_is_rounded_to_the_storage_dtype():
    """The contract rounds up to ut's dtype: an up that is not representable gives the result of its
    rounding (not of the fp32 value)."""
    ut, xf, up, linv, cnt = schur_make(1, 16, 8, 16, torch.bfloat16, 5, representable=False)
    a, _ = schur_run(ops.obs_schur_extend_, (ut, xf, up, linv, cnt))
    b, _ = schur_run(ops.obs_schur_extend_, (ut, xf, up.bfloat16().float(), linv, cnt))
    assert torch.equal(a, b)


def test_nan_propagates():
    ut, xf, up, linv, cnt = schur_make(1, 4, 3, 5, torch.float32, 1)
    xf[0, 2, 1] = float("nan")
    out, _ = schur_run(ops.obs_schur_extend_, (ut, xf, up, linv, cnt))
    assert torch.isnan(out[0, :, 1]).all() and torch.isfinite(out[0, :, 0]).all()


def _good():
    return list(schur_make(2, 4, 3, 5, torch.float32, 0, strided=False))


def _with(i, v):
    def mk(a):
        a = list(a)
        a[i] = v(a[i]) if callable(v) else v
        return a
    return mk


BAD = [
    ("ut", _with(0, lambda t: t.double()), TypeError),
    ("xf", _with(1, lambda t: t.double()), TypeError),
    ("up", _with(2, lambda t: t.half()), TypeError),
    ("linv", _with(3, lambda t: t.bfloat16()), TypeError),
    ("ut", _with(0, lambda t: t[0]), ValueError),
    ("xf", _with(1, lambda t: t[:1]), ValueError),
    ("xf", _with(1, lambda t: torch.zeros(2, 4, 99)), ValueError),
    ("cnt", _with(4, 6), ValueError),
    ("cnt", _with(4, -1), ValueError),
    ("up", _with(2, lambda t: t[:, :3]), ValueError),
    ("up", _with(2, lambda t: t[:, :, :2]), ValueError),
    ("linv", _with(3, lambda t: t[:, :, :3]), ValueError),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    name, mk, exc = BAD[case]
    args = mk(_good())
    before = args[0].clone()
    with pytest.raises(exc, match=name):
        ops.obs_schur_extend_(*args)
    assert torch.equal(args[0], before)  # nothing written before the error


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs_direct_dispatch(case):
    """The compiled kernel checks the same things itself (the schema path bypasses the wrapper)."""
    name, mk, exc = BAD[case]
    with pytest.raises((exc, RuntimeError), match=name):
        torch.ops.gradkit.obs_schur_extend_(*mk(_good()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt", DTYPES)
def test_opcheck(device, dt):
    ut, xf, up, linv, cnt = schur_make(2, 5, 3, 7, dt, 2, strided=False)
    args = (ut.to(device), xf.to(device), up.to(device), linv.to(device), cnt)
    torch.library.opcheck(torch.ops.gradkit.obs_schur_extend_, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@given(shape=shapes, dt=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16), strided=st.booleans(),
       cpp=st.booleans())
def test_cuda_within_fp32_bound(shape, dt, seed, strided, cpp):
    """Half-precision factors go to the Triton (tensor-core) kernel unless GRADKIT_SCHUR_CUDA_CPP=1
    selects the CUDA C++ one; fp32 factors to the CUDA C++ kernel. Both ways against the oracle."""
    n, m, c, F = shape
    args = schur_make(n, m, c, F, dt, seed, strided, representable=True)
    os.environ["GRADKIT_SCHUR_CUDA_CPP"] = "1" if cpp else "0"

    def on_cuda(ut, xf, up, linv, cnt):
        u = ut.cuda()
        ops.obs_schur_extend_(u, xf.cuda(), up.cuda(), linv.cuda(), cnt)
        ut.copy_(u.cpu())

    try:
        schur_check(on_cuda, args)
    finally:
        os.environ.pop("GRADKIT_SCHUR_CUDA_CPP", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m", [128, 256, 300])
def test_cuda_large_m(m):
    args = schur_make(2, m, 200, 260, torch.bfloat16, m)

    def on_cuda(ut, xf, up, linv, cnt):
        u = ut.cuda()
        ops.obs_schur_extend_(u, xf.cuda(), up.cuda(), linv.cuda(), cnt)
        ut.copy_(u.cpu())

    schur_check(on_cuda, args)

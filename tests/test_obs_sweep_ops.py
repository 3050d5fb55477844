"""obs_sweep_ (obs family): SparseGPT's column sweep over one lazy block, in place.

For i in [start, stop): ``err[i] = where(prune[i], w[i] / u[i, i], 0)``, ``w[i]`` zeroed where pruned,
``w[j] -= u[i, j] * err[i]`` for every later row j (the product rounded, then the difference). Every backend
promises the reference's bits: the native CPU kernel (several thread counts), the Triton kernel (interpreter,
tiny tiles so that programs and row tiles split the block) and the CUDA C++ kernel (tests/test_cuda_emulated.py)
are compared bit for bit under hypothesis, NaN / inf and signed zeros included, on strided views as sparsegpt
passes them (a block of a larger factor, a window of a wider weight). Rows before start and every row's err
outside [start, stop) stay untouched. Validation names the argument and writes nothing; opcheck.
"""
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import DEVICES
from gradkit import _ext, ops
from gradkit.kernels.reference import obs as ref

pytestmark = pytest.mark.skipif(not _ext.has_op("obs_sweep_"), reason="compiled extension not built")

DTYPES = (torch.float32, torch.float64)
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def bits(t):
    return t.contiguous().view(_INT[t.dtype])


def same(a, b):
    """Bitwise equal, except that any NaN equals any NaN (payloads are not part of the contract)."""
    an, bn = torch.isnan(a), torch.isnan(b)
    return torch.equal(an, bn) and torch.equal(bits(a.masked_fill(an, 0)), bits(b.masked_fill(bn, 0)))


def make(n, m, dt, seed, density=0.5, special=False, strided=True, device="cpu"):
    """w a window of a wider buffer (row stride > m), u a block of a larger upper factor, as sparsegpt slices
    them; special: some NaN / inf / -0.0 weights and a zero diagonal entry's neighbour rows."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        w = torch.randn(n, m + 5, generator=g, dtype=dt)[:, 2:m + 2]
        big = torch.randn(n + 7, n + 7, generator=g, dtype=dt).triu_()
        big.diagonal().abs_().add_(0.5)
        u = big[3:n + 3, 3:n + 3]
    else:
        w = torch.randn(n, m, generator=g, dtype=dt)
        u = torch.randn(n, n, generator=g, dtype=dt).triu_()
        u.diagonal().abs_().add_(0.5)
    prune = torch.rand(n, m, generator=g) < density
    if special and n * m:
        flat = w.reshape(-1) if w.is_contiguous() else None
        for v in (float("nan"), float("inf"), -float("inf"), -0.0):
            i, j = int(torch.randint(n, (1,), generator=g)), int(torch.randint(m, (1,), generator=g))
            w[i, j] = v
        del flat
    err = torch.full((n, m), 7.0, dtype=dt)
    return w.to(device), err.to(device), u.to(device), prune.to(device)


def run(fn, w, err, u, prune, start, stop):
    w2, e2 = w.clone(), err.clone()
    fn(w2, e2, u, prune, start, stop)
    return w2, e2


@given(n=st.integers(0, 40), m=st.integers(0, 150), a=st.integers(0, 40), b=st.integers(0, 40),
       dt=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 20), density=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       special=st.booleans(), strided=st.booleans())
def test_native_matches_reference_bitwise(n, m, a, b, dt, seed, density, special, strided):
    start, stop = sorted((min(a, n), min(b, n)))
    w, err, u, prune = make(n, m, dt, seed, density, special, strided)
    want_w, want_e = w.clone(), err.clone()
    ref.obs_sweep_(want_w, want_e, u, prune, start, stop)
    got_w, got_e = run(ops.obs_sweep_, w, err, u, prune, start, stop)
    assert same(got_w, want_w) and same(got_e, want_e)
    # what the op promises not to touch: rows before start; err outside [start, stop)
    assert same(got_w[:start], w[:start])
    assert same(got_e[:start], err[:start]) and same(got_e[stop:], err[stop:])


def test_reference_is_the_sequential_sweep():
    """The reference against a scalar loop in float64 (the definition written out once more)."""
    n, m = 9, 5
    w, err, u, prune = make(n, m, torch.float64, 3, strided=False)
    want = w.clone()
    we = torch.zeros(n, m, dtype=torch.float64)
    for i in range(2, 7):
        for c in range(m):
            if prune[i, c]:
                we[i, c] = want[i, c] / u[i, i]
                want[i, c] = 0.0
            for j in range(i + 1, n):
                want[j, c] = want[j, c] - u[i, j] * we[i, c]
    got_w, got_e = run(ref.obs_sweep_, w, err, u, prune, 2, 7)
    assert torch.equal(got_w, want) and torch.equal(got_e[2:7], we[2:7])
    assert (got_w[2:7][prune[2:7]] == 0).all() and (got_e[2:7][~prune[2:7]] == 0).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_bits_do_not_depend_on_threads(threads):
    w, err, u, prune = make(128, 1000, torch.float32, 11)
    want = run(ref.obs_sweep_, w, err, u, prune, 0, 128)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run(ops.obs_sweep_, w, err, u, prune, 0, 128)
    finally:
        torch.set_num_threads(old)
    assert same(got[0], want[0]) and same(got[1], want[1])


@given(n=st.integers(0, 12), m=st.integers(0, 20), a=st.integers(0, 12), b=st.integers(0, 12),
       dt=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 20), special=st.booleans(),
       bm=st.sampled_from([4, 16]), bj=st.sampled_from([2, 8]))
def test_triton_matches_reference_bitwise(n, m, a, b, dt, seed, special, bm, bj):
    from gradkit.kernels.triton import obs as tri

    start, stop = sorted((min(a, n), min(b, n)))
    w, err, u, prune = make(n, m, dt, seed, 0.5, special)
    want = run(ref.obs_sweep_, w, err, u, prune, start, stop)
    old = dict(tri.SWEEP_BLOCKS)
    tri.SWEEP_BLOCKS.update(m=bm, j=bj)
    try:
        got = run(tri.obs_sweep_, w, err, u, prune, start, stop)
    finally:
        tri.SWEEP_BLOCKS.update(old)
    assert same(got[0], want[0]) and same(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt", DTYPES)
def test_opcheck(device, dt):
    w, err, u, prune = make(6, 9, dt, 1, device=device)
    torch.library.opcheck(torch.ops.gradkit.obs_sweep_, (w.contiguous(), err, u, prune, 1, 5))


def _bad_cases():
    w, err, u, prune = make(5, 4, torch.float32, 0, strided=False)
    big = torch.zeros(5, 8)
    return [
        ("w", TypeError, (w.half(), err, u, prune, 0, 5)),
        ("err", TypeError, (w, err.double(), u, prune, 0, 5)),
        ("u", TypeError, (w, err, u.double(), prune, 0, 5)),
        ("prune", TypeError, (w, err, u, prune.float(), 0, 5)),
        ("w", ValueError, (w[0], err, u, prune, 0, 5)),
        ("err", ValueError, (w, err[:4], u, prune, 0, 5)),
        ("u", ValueError, (w, err, u[:4], prune, 0, 5)),
        ("prune", ValueError, (w, err, u, prune[:, :3], 0, 5)),
        ("start, stop", ValueError, (w, err, u, prune, 3, 2)),
        ("start, stop", ValueError, (w, err, u, prune, 0, 6)),
        ("start, stop", ValueError, (w, err, u, prune, -1, 2)),
        ("w", ValueError, (big[:, ::2], err, u, prune, 0, 5)),  # not unit stride along m
        ("err", ValueError, (w, torch.zeros(4, 5).T, u, prune, 0, 5)),
        ("w", RuntimeError, (torch.zeros(1, 4).expand(5, 4), err, u, prune, 0, 5)),  # rows at one address
        ("err", ValueError, (big[:, :4], big[:, 2:6], u, prune, 0, 5)),  # err overlaps w
        ("u", ValueError, (big[:, :4], err, big[:, 3:8], prune, 0, 5)),
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_input_names_the_argument_and_writes_nothing(case):
    name, exc, args = _bad_cases()[case]
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(exc, match=f"^{name}"):
        ops.obs_sweep_(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def _triton_launcher():
    from gradkit.kernels.triton import cuda_kernel

    return cuda_kernel("obs", "obs_sweep_")  # what register_triton_for_cuda registers


@pytest.mark.parametrize("impl", ["op", "triton"])
@pytest.mark.parametrize("case", range(16))
def test_direct_kernel_calls_check_too(case, impl):
    """Past the wrapper: a direct torch.ops.gradkit.obs_sweep_ call (the C++ checks, csrc/obs_sweep.h) and the
    Triton launcher (the CUDA kernel where the extension has no CUDA C++) name the argument as well, before
    anything is written."""
    name, exc, args = _bad_cases()[case]
    fn = torch.ops.gradkit.obs_sweep_ if impl == "op" else _triton_launcher()
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises((exc, RuntimeError), match=f"^{name}"):
        fn(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_sparsegpt_calls_the_sweep_and_matches_the_reference_backend():
    """sparsegpt's lazy blocks run through obs_sweep_: the reference backend (the same sweep in plain torch)
    gives the same weights and mask bit for bit."""
    from conftest import use_backend
    from gradkit.obs import sparsegpt
    from gradkit.scope import BlockSpec, ScopeSpec

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=g)
    X = torch.randn(512, 256, generator=g)
    H = X.T @ X
    got, keep = sparsegpt(ScopeSpec(BlockSpec(W, (1, 1)), (1, 4)), H, 2, return_mask=True)
    with use_backend("reference"):
        want, want_keep = sparsegpt(ScopeSpec(BlockSpec(W, (1, 1)), (1, 4)), H, 2, return_mask=True)
    assert torch.equal(keep, want_keep) and same(got, want)
    assert torch.equal(got == 0, ~keep) and int((~keep).sum()) == W.numel() // 2

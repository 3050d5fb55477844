"""Native (dispatcher) kernels of the scope family against the plain-PyTorch reference, plus
opcheck, torch.compile and the bad-input contract (errors before any work, x untouched)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradkit import _ext, ops
from gradkit.kernels.reference import scope as ref

from conftest import DEVICES

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0] if n else [1]


@st.composite
def layouts(draw, max_dims=3, max_size=12, allow_views=True, nan=True):
    """(x, block_shape, scope_shape): integer-valued data in [-8, 8] (exact sums, many ties),
    sometimes NaN, sometimes a non-contiguous view (permute / step / pairing as_strided)."""
    nd = draw(st.integers(1, max_dims))
    shape = draw(st.lists(st.integers(1, max_size), min_size=nd, max_size=nd))
    block = [draw(st.sampled_from(_divisors(n))) for n in shape]
    grid = [n // b for n, b in zip(shape, block)]
    scope = [draw(st.sampled_from(_divisors(g))) for g in grid]
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    view = draw(st.sampled_from(["contig", "permute", "step", "pair"] if allow_views else ["contig"]))
    lo = draw(st.sampled_from([-8, 0]))
    numel = math.prod(shape)
    if view == "permute" and nd >= 2:
        base = torch.randint(lo, 9, shape[::-1], generator=g).to(dtype)
        x = base.permute(list(range(nd))[::-1])
    elif view == "step":
        big = list(shape)
        big[-1] *= 2
        x = torch.randint(lo, 9, big, generator=g).to(dtype)[..., ::2]
    elif view == "pair" and shape[-1] % 2 == 0:
        # last dim split into (half, 2) pairs that are half apart, like coupled 2:4 columns
        h = shape[-1] // 2
        base = torch.randint(lo, 9, [numel], generator=g).to(dtype)
        st_ = torch.empty(shape).stride()
        x = base.as_strided(tuple(shape[:-1]) + (h, 2), tuple(st_[:-1]) + (1, h))
        block = block[:-1] + [1, draw(st.sampled_from([1, 2]))]
        scope = scope[:-1] + [draw(st.sampled_from(_divisors(h))), 2 // block[-1]]
    else:
        x = torch.randint(lo, 9, shape, generator=g).to(dtype)
    if nan and draw(st.booleans()) and x.numel():
        flat = torch.zeros(x.numel(), dtype=torch.bool)
        flat[torch.randint(0, x.numel(), (max(1, x.numel() // 7),), generator=g)] = True
        x = x.clone() if view == "contig" else x
        x.masked_fill_(flat.reshape(x.shape), float("nan"))
    return x, block, scope


def _nb(scope):
    return math.prod(scope)


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == torch.bool:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, equal_nan=True, atol=0, rtol=1e-3 if a.dtype in (torch.float16, torch.bfloat16)
                                   else 1e-5)


@given(layouts(), st.sampled_from([1.0, 2.0, math.inf]), st.data())
def test_scope_mask_matches_reference(case, p, data):
    x, block, scope = case
    nnz = data.draw(st.integers(0, _nb(scope)))
    keep_ties = data.draw(st.booleans())
    expand = data.draw(st.booleans())
    raw = all(b == 1 for b in block) and data.draw(st.booleans())
    got = torch.ops.gradkit.scope_mask(x, block, scope, nnz, p, raw, keep_ties, expand)
    want = ref.scope_mask(x, block, scope, nnz, p, raw, keep_ties, expand)
    _same(got, want)
    if not keep_ties and not torch.isnan(x).any():  # exact: nnz per scope always
        bm = got if not expand else ref.scope_block_mask(x, block, scope, nnz, p, raw, False)
        assert int(bm.sum()) == nnz * (bm.numel() // max(_nb(scope), 1))


@given(layouts(), st.sampled_from([1.0, 2.0, math.inf, 3.0]))
def test_block_norms_matches_reference(case, p):
    x, block, _ = case
    got = torch.ops.gradkit.block_norms(x, block, p)
    want = ref.block_norms(x, block, p)
    _same(got, want)


@given(layouts(), st.sampled_from([1.0, 2.0, math.inf]), st.data())
def test_scope_kth_matches_reference(case, p, data):
    x, block, scope = case
    nb = _nb(scope)
    mid = nb >= 2 and data.draw(st.booleans())
    k = data.draw(st.integers(1, nb - 1 if mid else nb))
    w = data.draw(st.sampled_from([0.0, 1.0, 0.5]))
    raw = all(b == 1 for b in block) and data.draw(st.booleans())
    got = torch.ops.gradkit.scope_kth(x, block, scope, k, p, raw, w, mid)
    want = ref.scope_kth(x, block, scope, k, p, raw, w, mid)
    _same(got, want)


@given(layouts(), st.sampled_from([1.0, 2.0, math.inf]), st.data())
def test_scope_hard_threshold_matches_reference_and_writes_through(case, p, data):
    x, block, scope = case
    nnz = data.draw(st.integers(0, _nb(scope)))
    keep_ties = data.draw(st.booleans())
    use_values = data.draw(st.booleans())
    values = None
    if use_values:
        values = torch.randint(-8, 9, x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    base = x._base if x._base is not None else x
    snap = base.clone()
    a = x.clone()
    bm_ref = ref.scope_hard_threshold_(a, None if values is None else values.clone(), block, scope, nnz, p, keep_ties)
    bm = torch.ops.gradkit.scope_hard_threshold_(x, values, block, scope, nnz, p, keep_ties)
    _same(bm, bm_ref)
    _same(x.clone(), a)
    # written through the view, nothing outside it touched
    outside = torch.ones(base.numel(), dtype=torch.bool)
    outside.view(base.shape).as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset()).fill_(False)
    assert torch.equal(base.reshape(-1)[outside].nan_to_num(), snap.reshape(-1)[outside].nan_to_num())


@given(layouts(), st.data())
def test_block_apply_mask_matches_reference(case, data):
    x, block, _ = case
    grid = [n // b for n, b in zip(x.shape, block)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    m = torch.rand(grid, generator=g) < 0.5
    a = x.clone()
    ref.block_apply_mask_(a, block, m)
    torch.ops.gradkit.block_apply_mask_(x, block, m)
    _same(x.clone(), a)


# block_soft_threshold_ (kernel) against the reference, on x / 4 of integer data (|x| <= 2): both compute the scales in
# float32 / float64 and round the result once, so fp16 / bf16 agree within 1 ulp of the dtype (measured: bit for bit
# over 600 draws, CPU and emulated CUDA kernels alike; the old 2e-2 allowed ~30 fp16 ulps), float32 within a few ulps
# of |x| <= 2 (measured 3.3e-7 absolute; old atol 1e-5), float64 within rounding (measured 4.4e-16; old 1e-5)
SOFT_TOL = {torch.float16: dict(atol=torch.finfo(torch.float16).tiny, rtol=torch.finfo(torch.float16).eps),
            torch.bfloat16: dict(atol=torch.finfo(torch.bfloat16).tiny, rtol=torch.finfo(torch.bfloat16).eps),
            torch.float32: dict(atol=2e-6, rtol=1e-5), torch.float64: dict(atol=1e-13, rtol=1e-12)}


@settings(max_examples=25)
@given(layouts(nan=True), st.data())
def test_block_soft_threshold_matches_reference(case, data):
    x, block, _ = case
    x = x / 4  # non-trivial magnitudes
    grid = [n // b for n, b in zip(x.shape, block)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    t = torch.rand(grid, generator=g).to(x.dtype) * 2
    cond = None
    if data.draw(st.booleans()):
        cond = (torch.rand(x.shape, generator=g) + 0.25).to(x.dtype)
    eps = float(torch.finfo(x.dtype).eps)
    a = x.clone()
    ref.block_soft_threshold_(a, block, t, cond, 30, 1e-9, eps)
    b = x.clone()
    torch.ops.gradkit.block_soft_threshold_(b, block, t, cond, 30, 1e-9, eps)
    tol = SOFT_TOL[x.dtype]
    torch.testing.assert_close(b, a, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_sqrt_is_correctly_rounded(dtype):
    """The reference's norms use ``ieee_sqrt``: the correctly rounded root the native kernels compute.

    torch's own ``sqrt`` fails this on an Intel CPU (MKL's vector math; 0.7% of these inputs on an
    Emerald Rapids Xeon), so it checks the helper, not torch, against numpy's ``sqrt``.
    """
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(1)
    fi = torch.finfo(dtype)
    x = torch.rand(50_000, generator=g, dtype=torch.float64) * 100
    x = torch.cat([x, torch.exp2(torch.empty(4000, dtype=torch.float64).uniform_(-120, 120, generator=g))]).to(dtype)
    edge = torch.tensor([0.0, -0.0, 2.0, float("inf"), float("nan"), -1.0, -float("inf"), fi.tiny, fi.max,
                         fi.smallest_normal / 8, 1.0 - fi.eps / 2, 1.0 + fi.eps], dtype=dtype)
    x = torch.cat([x, edge])
    got = ref.ieee_sqrt(x).numpy()
    with np.errstate(invalid="ignore"):
        want = np.sqrt(x.numpy())
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all(), (x[torch.from_numpy(~same)][:5], got[~same][:5], want[~same][:5])
    num = ~np.isnan(want)
    assert np.array_equal(np.signbit(got[num]), np.signbit(want[num]))  # -0 stays -0
    assert ref.ieee_sqrt(x).dtype == dtype


def test_large_scope_paths_against_reference():
    """Scopes over 32 blocks use the nth_element path (row-wise and whole-tensor scopes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (37, 300), generator=g).float()
    x[3, 5] = float("nan")
    for scope, nnz in (([1, 300], 31), ([37, 300], 1000), ([1, 300], 300), ([1, 300], 0), ([37, 60], 7)):
        for kt in (False, True):
            _same(torch.ops.gradkit.scope_mask(x, [1, 1], scope, nnz, 2.0, False, kt, True),
                  ref.scope_mask(x, [1, 1], scope, nnz, 2.0, False, kt, True))
        k = max(1, min(nnz, math.prod(scope) - 1))
        _same(torch.ops.gradkit.scope_kth(x, [1, 1], scope, k, 2.0, False, 1.0, True),
              ref.scope_kth(x, [1, 1], scope, k, 2.0, False, 1.0, True))
    xb = torch.randn(64, 512, generator=g)
    _same(torch.ops.gradkit.scope_mask(xb, [1, 16], [2, 32], 20, 2.0, False, False, True),
          ref.scope_mask(xb, [1, 16], [2, 32], 20, 2.0, False, False, True))


def test_nm_patterns_exact():
    """2:4 / 4:8 hold exactly per group of M, even on all-equal and all-zero rows."""
    x = torch.zeros(4, 16)
    x[1] = 1.0
    x[2] = torch.arange(16.0) % 3
    for n, m in ((2, 4), (4, 8), (1, 2)):
        mask = ops.scope_mask(x, [1, 1], [1, m], n)
        assert torch.equal(mask.view(4, -1, m).sum(-1), torch.full((4, 16 // m), n))
    # keep_ties reproduces the seed's rule: [1, 1, 1, 0.5] with nnz=2 keeps 3; all-zero keeps all
    y = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    assert ops.scope_mask(y, [1, 1], [1, 4], 2, keep_ties=True).tolist() == [[True, True, True, False] + [True] * 4]
    assert ops.scope_mask(y, [1, 1], [1, 4], 2).tolist() == [[True, True, False, False, True, True, False, False]]


def test_nan_never_kept_never_crashes():
    x = torch.tensor([[float("nan"), 1.0, float("nan"), float("nan")], [float("nan")] * 4])
    assert ops.scope_mask(x, [1, 1], [1, 4], 2).tolist() == [[False, True, False, False], [False] * 4]
    assert ops.scope_kth(x, [1, 1], [1, 4], 2).tolist() == [[-math.inf], [-math.inf]]
    y = x.clone()
    ops.scope_hard_threshold_(y, [1, 1], [1, 4], 2)
    assert y.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0] * 4]


# ---------------------------------------------------------------- opcheck / compile


def _opcheck_cases(dev):
    x = torch.randn(8, 16, device=dev)
    v = torch.randn(8, 16, device=dev)
    return [
        (torch.ops.gradkit.block_norms, (x, [2, 4], 2.0)),
        (torch.ops.gradkit.scope_kth, (x, [1, 4], [2, 2], 2, 2.0, False, 1.0, True)),
        (torch.ops.gradkit.scope_mask, (x, [1, 1], [1, 4], 2, 2.0, False, False, True)),
        (torch.ops.gradkit.scope_mask, (x, [1, 1], [1, 4], 2, 2.0, True, True, False)),
        (torch.ops.gradkit.scope_hard_threshold_, (x.clone(), v, [1, 2], [1, 4], 1, 2.0, False)),
        (torch.ops.gradkit.scope_hard_threshold_, (x.clone(), None, [1, 2], [1, 4], 1, 1.0, True)),
        (torch.ops.gradkit.block_apply_mask_, (x.clone(), [2, 2], torch.rand(4, 8, device=dev) < 0.5)),
        (torch.ops.gradkit.block_soft_threshold_, (x.clone(), [1, 4], torch.rand(8, 4, device=dev), None, 10, 1e-8,
                                                   1e-7)),
        (torch.ops.gradkit.block_soft_threshold_, (x.clone(), [1, 4], torch.rand(8, 4, device=dev),
                                                   torch.rand(8, 16, device=dev) + 0.5, 10, 1e-8, 1e-7)),
    ]


@pytest.mark.parametrize("dev", DEVICES)
def test_opcheck(dev):
    for op, args in _opcheck_cases(dev):
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(w):
        m = torch.ops.gradkit.scope_mask(w, [1, 1], [1, 4], 2, 2.0, False, False, True)
        return w * m

    w = torch.randn(8, 16)
    torch.testing.assert_close(f(w), w * ref.scope_mask(w, [1, 1], [1, 4], 2, 2.0, False, False, True))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, err, msg", [
    (lambda x: ops.scope_mask(x, [1, 3], [1, 1], 1), ValueError, "block_shape[1]=3 does not divide"),
    (lambda x: ops.scope_mask(x, [1, 1], [1, 3], 1), ValueError, "scope_shape[1]=3 does not divide"),
    (lambda x: ops.scope_mask(x, [1, 1], [1, 4], 5), ValueError, "nnz"),
    (lambda x: ops.scope_mask(x, [1, 1], [1, 4], -1), ValueError, "nnz"),
    (lambda x: ops.scope_mask(x, [1, 2], [1, 4], 1, raw=True), ValueError, "raw"),
    (lambda x: ops.scope_mask(x, [1], [1], 1), ValueError, "block_shape"),
    (lambda x: ops.scope_mask(x, [1, 1], [1, 4], 1, p=0), ValueError, "p:"),
    (lambda x: ops.scope_kth(x, [1, 1], [1, 4], 4, mid=True), ValueError, "k:"),
    (lambda x: ops.scope_hard_threshold_(x, [1, 1], [1, 4], 1, values=torch.ones(3, 3)), ValueError, "values"),
    (lambda x: ops.block_apply_mask_(x, [1, 4], torch.ones(4, 3, dtype=torch.bool)), ValueError, "block_mask"),
    (lambda x: ops.block_soft_threshold_(x, [1, 4], torch.ones(4, 3)), ValueError, "thresholds"),
    (lambda x: ops.block_soft_threshold_(x, [1, 4], torch.ones(4, 4), conditioner=torch.ones(4)), ValueError,
     "conditioner"),
    (lambda x: ops.scope_mask(x.long(), [1, 1], [1, 4], 1), TypeError, "x:"),
])
def test_bad_input_raises_before_work(call, err, msg):
    x = torch.randn(4, 16)
    snap = x.clone()
    with pytest.raises(err, match=msg.replace("[", r"\[").replace("]", r"\]")):
        call(x)
    assert torch.equal(x, snap)


def test_native_checks_match_wrapper():
    """Called straight through torch.ops (no Python wrapper), the kernels validate too."""
    x = torch.randn(4, 16)
    snap = x.clone()
    with pytest.raises(ValueError, match="does not divide"):
        torch.ops.gradkit.scope_hard_threshold_(x, None, [1, 1], [1, 3], 1, 2.0, False)
    with pytest.raises(ValueError, match="nnz"):
        torch.ops.gradkit.scope_hard_threshold_(x, None, [1, 1], [1, 4], 9, 2.0, False)
    assert torch.equal(x, snap)


@pytest.mark.parametrize("m", [2, 4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dense_nm_tiles_match_reference(m, dtype):
    """Big enough for the vectorised dense N:M tiles (64 scopes) plus ragged tails, with ties and NaN."""
    g = torch.Generator().manual_seed(m)
    x = torch.randint(-3, 4, (37, 16 * 67), generator=g).to(dtype)
    x[torch.rand(x.shape, generator=g) < 0.02] = float("nan")
    for nnz in sorted({0, 1, m // 2, m - 1, m}):
        for kt in (False, True):
            for expand in (True, False):
                _same(torch.ops.gradkit.scope_mask(x, [1, 1], [1, m], nnz, 2.0, False, kt, expand),
                      ref.scope_mask(x, [1, 1], [1, m], nnz, 2.0, False, kt, expand))
            a, b = x.clone(), x.clone()
            _same(torch.ops.gradkit.scope_hard_threshold_(a, None, [1, 1], [1, m], nnz, 1.0, kt),
                  ref.scope_hard_threshold_(b, None, [1, 1], [1, m], nnz, 1.0, kt))
            _same(a, b)


@pytest.mark.parametrize("ne", [4, 8, 16])
@pytest.mark.parametrize("nb", [2, 4])
def test_row_coupled_runs_match_reference(ne, nb):
    """The fp32 run path (contiguous blocks a multiple of 4 long, long scope-grid rows): row
    coupling through a View as in 16-column blocks with 8-row coupling, runs of 67 and 130 scopes
    (ragged tiles and groups of 4), NaN, ties, p in {1, 2}, every nnz, masks and hard threshold."""
    g = torch.Generator().manual_seed(ne * nb)
    for cols in (67, 130):
        rows = 3 * nb * 2
        base = torch.randint(-2, 3, (rows, ne * cols), generator=g).float()
        base[torch.rand(base.shape, generator=g) < 0.01] = float("nan")
        n = base.shape[1]
        # rows r, r + 2, r + 4, ... of each (2 * nb)-row chunk compete for each column block
        x = base.as_strided((rows // (2 * nb), 2, nb, n), (2 * nb * n, n, 2 * n, 1))
        for p in (1.0, 2.0):
            for nnz in range(nb + 1):
                for kt in (False, True):
                    for expand in (True, False):
                        _same(torch.ops.gradkit.scope_mask(x, [1, 1, 1, ne], [1, 1, nb, 1], nnz, p, False, kt, expand),
                              ref.scope_mask(x, [1, 1, 1, ne], [1, 1, nb, 1], nnz, p, False, kt, expand))
                    a, b = base.clone(), base.clone()
                    va, vb = (t.as_strided(x.shape, x.stride()) for t in (a, b))
                    _same(torch.ops.gradkit.scope_hard_threshold_(va, None, [1, 1, 1, ne], [1, 1, nb, 1], nnz, p, kt),
                          ref.scope_hard_threshold_(vb, None, [1, 1, 1, ne], [1, 1, nb, 1], nnz, p, kt))
                    _same(a, b)
                    vals = torch.randint(0, 5, x.shape, generator=g).float()
                    a, b = base.clone(), base.clone()
                    va, vb = (t.as_strided(x.shape, x.stride()) for t in (a, b))
                    _same(torch.ops.gradkit.scope_hard_threshold_(va, vals, [1, 1, 1, ne], [1, 1, nb, 1], nnz, p, kt),
                          ref.scope_hard_threshold_(vb, vals, [1, 1, 1, ne], [1, 1, nb, 1], nnz, p, kt))
                    _same(a, b)


def test_large_mask_outputs_reuse_cached_buffers_safely():
    """Expanded masks of >= 4 MiB come from gradkit's output cache: a freed mask's buffer is
    reused by the next call of the same size, and live masks never share one."""
    g = torch.Generator().manual_seed(4)
    n = 2048  # a 4 MiB bool mask
    xs = [torch.randn(n, n, generator=g) for _ in range(3)]
    views = [x.as_strided((n // 16, 8, 2, n), (16 * n, n, 8 * n, 1)) for x in xs]
    call = lambda v: torch.ops.gradkit.scope_mask(v, [1, 1, 1, 16], [1, 1, 2, 1], 1, 2.0, False, False, True)
    want = [ref.scope_mask(v, [1, 1, 1, 16], [1, 1, 2, 1], 1, 2.0, False, False, True) for v in views]
    a = call(views[0])
    ptr = a.data_ptr()
    assert torch.equal(a, want[0])
    del a
    b = call(views[1])  # reuses the freed buffer
    assert b.data_ptr() == ptr and torch.equal(b, want[1])
    c = call(views[2])  # b is alive: a different buffer
    assert c.data_ptr() != b.data_ptr() and torch.equal(c, want[2]) and torch.equal(b, want[1])

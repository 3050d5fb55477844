"""The Triton scope kernels against the plain-PyTorch reference (the oracle).

Runs on CPU tensors through the Triton interpreter. Inputs are integer-valued (in [-8, 8] or a
narrower range, with many ties and zeros, some NaN / inf / -0.0), so every block score is exact in
every dtype: masks, kept / zeroed blocks and p = 1 / inf norms must match the reference exactly.
Tolerances only where the arithmetic legitimately differs: values through a square root (torch's CPU
sqrt is not correctly rounded on this build, the kernels' is: a few ulps), general-p norms
(exp2 / log2) and the conditioned soft threshold's bisection (sums in another order).
x is drawn as arbitrary strided views of a larger buffer (permuted, padded / sliced, interleaved,
with an offset); the in-place ops must write through, and leave the rest of the buffer alone.
Every selection runs on three paths: default tiles, tiny tiles (multi-chunk loops in the fused
small-scope kernel) and the large-scope path (scores + radix select) with tiny chunks.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import contextlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from gradkit.kernels.reference import scope as R  # noqa: E402
from gradkit.kernels.triton import scope as T  # noqa: E402

# The interpreter evaluates with numpy, which warns on the NaN / inf these tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INF = float("inf")
# The selection properties are cheap per example (tiny tensors): run more of them than the profile's default.
# The interpreter is slow: a quarter of the profile's examples here (ci: 10, deep: 150).
_EX = max(8, settings.default.max_examples // 4)
MORE = settings(deadline=None, max_examples=_EX)
SENTINEL = 77.0  # fills the buffer around a view: must survive the in-place ops

# "large": every scope takes the scores + radix-select path, with tiny chunks (multi-chunk carries);
# "tiny": the fused small-scope kernel with tiny tiles (several element chunks, one scope per program).
PATHS = {
    "default": {},
    "large": {"small_nb": 0, "select_chunk": 4, "elem_chunk": 2, "tile": 8, "soft_chunk": 2},
    "tiny": {"elem_chunk": 1, "tile": 2, "rank_tile": 1, "soft_chunk": 1},
}


@contextlib.contextmanager
def path(kind):
    saved = dict(T.TUNING)
    T.TUNING.update(PATHS[kind])
    try:
        yield
    finally:
        T.TUNING.clear()
        T.TUNING.update(saved)


# --------------------------------------------------------------------------- inputs


def int_data(shape, dtype, seed, nan=0.05, inf=0.0, zero=0.2, spread=8):
    """Integers in [-spread, spread] (exact in every float dtype), extra zeros (-0.0 too), some NaN / +-inf."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    v = torch.randint(-spread, spread + 1, (n,), generator=g).to(torch.float64)
    r = torch.rand(n, generator=g)
    v = torch.where(r < zero, torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0), v)
    v = torch.where((r >= zero) & (r < zero + nan), float("nan"), v)
    v = torch.where((r >= zero + nan) & (r < zero + nan + inf), torch.where(v < 0, -INF, INF), v)
    return v.reshape(shape).to(dtype)


def strided(shape, dtype, geom, fill):
    """A view of `shape` with strides from geom = (order: dims innermost first, pads, step, offset),
    inside a SENTINEL-filled 1-d buffer; returns (view, buffer)."""
    order, pads, step, offset = geom
    strides = [0] * len(shape)
    run = step
    for d in order:
        strides[d] = run
        run *= shape[d] + pads[d]
    base = torch.full((offset + run + 1,), SENTINEL, dtype=dtype)
    x = base.as_strided(shape, strides, offset)
    x.copy_(fill)
    return x, base


def twin(x, base):
    """An identical (buffer, view) pair to run the reference on."""
    b2 = base.clone()
    return b2.as_strided(x.shape, x.stride(), x.storage_offset()), b2


@st.composite
def geometry(draw, nd):
    kind = draw(st.sampled_from(["contiguous", "permuted", "padded", "interleaved", "any"]))
    order = list(range(nd))[::-1]
    pads, step, offset = [0] * nd, 1, 0
    if kind in ("permuted", "any"):
        order = draw(st.permutations(range(nd)))
    if kind in ("padded", "any"):
        pads = draw(st.lists(st.sampled_from([0, 1, 3]), min_size=nd, max_size=nd))
        offset = draw(st.integers(0, 3))
    if kind in ("interleaved", "any"):
        step = 2
    return list(order), pads, step, offset


@st.composite
def scoped(draw, max_numel=400, max_scopes=None, min_nb=1):
    """(shape, block, scope): 1-4 dims, each dim = scope-grid * scope * block, sizes 1 / odd / even."""
    nd = draw(st.integers(1, 4))
    ones = draw(st.integers(0, 2)) == 0  # single-element blocks (raw scores allowed)
    g = draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=nd, max_size=nd))
    s = draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=nd, max_size=nd))
    b = [1] * nd if ones else draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=nd, max_size=nd))
    for lst in (g, b, s):  # shrink until small enough for the interpreter
        for i in sorted(range(nd), key=lambda i: -lst[i]):
            if math.prod(g) * math.prod(s) * math.prod(b) <= max_numel:
                break
            lst[i] = 1
    if max_scopes is not None:
        for i in range(nd):
            if math.prod(g) > max_scopes:
                g[i] = 1
    if math.prod(s) < min_nb:
        s[-1] *= min_nb
    shape = tuple(gi * si * bi for gi, si, bi in zip(g, s, b))
    return shape, b, s


def assert_same(a, b):
    """Same dtype and shape, NaN in the same places, equal elsewhere (-0.0 == +0.0)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype.is_floating_point:
        assert torch.equal(a.isnan(), b.isnan()), (a, b)
        a, b = torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b)
    assert torch.equal(a, b), (a, b)


def assert_ulps(a, b, ulps=2, abs_ulps=0):
    """Equal up to a few ulps of a's dtype (NaN in the same places): for values that go through a
    square root. torch's CPU sqrt is not correctly rounded on every build (this one, AVX512, is 1 ulp
    off on ~0.6% of integers); the kernels' is (IEEE sqrt on the GPU, numpy's in the interpreter)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    fi = torch.finfo(a.dtype)
    torch.testing.assert_close(a, b, rtol=ulps * fi.eps, atol=max(fi.tiny, abs_ulps * fi.eps), equal_nan=True)
    assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a == 0, b == 0)


def ref_scope_kth(x, block, scope, k, p, raw, k_weight, mid):
    """The reference's scope_kth, except that a scope with fewer than k valid scores gives -inf for
    every p (its docstring; the reference maps that -inf through score_to_norm, which gives NaN for
    p = 2 and +inf for general p)."""
    sc = R.block_scores(x, block, p, raw)
    rows = R.to_scopes(sc, scope)
    ident = raw or math.prod(block) == 1  # single-element blocks: the score |x| is the norm

    def norm(s):
        return torch.where(s == -INF, s, R.score_to_norm(s, p, ident))

    v = norm(R.kth_rows(rows, k))
    if mid:
        v = R.mid_value(v, norm(R.kth_rows(rows, k + 1)), k_weight)  # MID_RULE: no NaN from inf / 0 * inf
    return v.reshape([n // s for n, s in zip(sc.shape, scope)]).to(x.dtype)


# --------------------------------------------------------------------------- block norms


@settings(deadline=None, max_examples=_EX)
@given(lay=scoped(), dtype=st.sampled_from(FLOATS), p=st.sampled_from([1.0, 2.0, INF]), data=st.data(),
       seed=st.integers(0, 2**31), kind=st.sampled_from(["default", "tiny"]))
def test_block_norms(lay, dtype, p, data, seed, kind):
    shape, block, _ = lay
    x, _ = strided(shape, dtype, data.draw(geometry(len(shape))), int_data(shape, dtype, seed, inf=0.03))
    with path(kind):
        got = T.block_norms(x, block, p)
    (assert_ulps if p == 2.0 and math.prod(block) > 1 else assert_same)(got, R.block_norms(x, block, p))


@settings(deadline=None, max_examples=min(15, _EX))
@given(lay=scoped(), dtype=st.sampled_from(FLOATS), p=st.sampled_from([3.0, 2.5, 0.5, 4.0]), data=st.data(),
       seed=st.integers(0, 2**31))
def test_block_norms_general_p(lay, dtype, p, data, seed):
    shape, block, _ = lay
    g = torch.Generator().manual_seed(seed)
    fill = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    x, _ = strided(shape, dtype, data.draw(geometry(len(shape))), fill)
    got = T.block_norms(x, block, p)
    # exp2(p log2|x|) and the final exp2(log2(s) / p) are not correctly rounded: a few float32 ulps
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(got, R.block_norms(x, block, p), rtol=rtol, atol=0)


# --------------------------------------------------------------------------- selection


def draw_nnz(data, nb):
    return data.draw(st.one_of(st.integers(0, nb), st.just(nb // 2), st.just(max(nb - 1, 0))))


@MORE
@given(dtype=st.sampled_from(FLOATS), p=st.sampled_from([1.0, 2.0, INF, 3.0]), data=st.data(),
       seed=st.integers(0, 2**31), nan=st.sampled_from([0.0, 0.05, 0.4]), spread=st.sampled_from([1, 2, 8]),
       keep_ties=st.booleans(), expand=st.booleans(), kind=st.sampled_from(["default", "default", "tiny", "large"]))
def test_scope_mask(dtype, p, data, seed, nan, spread, keep_ties, expand, kind):
    # the select kernel runs one (interpreted) program per scope: keep them few on the large path
    shape, block, scope = data.draw(scoped(max_scopes=4, min_nb=2) if kind == "large" else scoped())
    nb = math.prod(scope)
    raw = all(b == 1 for b in block) and data.draw(st.booleans())
    nnz = draw_nnz(data, nb)
    fill = int_data(shape, dtype, seed, nan=nan, inf=0.03, spread=spread)
    x, _ = strided(shape, dtype, data.draw(geometry(len(shape))), fill)
    with path(kind):
        got = T.scope_mask(x, block, scope, nnz, p, raw, keep_ties, expand)
    expect = R.scope_mask(x, block, scope, nnz, p, raw, keep_ties, expand)
    assert got.dtype == torch.bool and got.is_contiguous()
    assert_same(got, expect)


@MORE
@given(dtype=st.sampled_from(FLOATS), p=st.sampled_from([1.0, 2.0, INF, 3.0]), data=st.data(),
       seed=st.integers(0, 2**31), nan=st.sampled_from([0.0, 0.1, 0.5]), spread=st.sampled_from([1, 2, 8]),
       mid=st.booleans(), k_weight=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
       kind=st.sampled_from(["default", "default", "tiny", "large"]))
def test_scope_kth(dtype, p, data, seed, nan, spread, mid, k_weight, kind):
    shape, block, scope = data.draw(scoped(max_scopes=4, min_nb=2) if kind == "large" else scoped(max_scopes=6))
    nb = math.prod(scope)
    if mid and nb < 2:
        mid = False
    k = data.draw(st.integers(1, nb - 1 if mid else nb))
    raw = all(b == 1 for b in block) and data.draw(st.booleans())
    fill = int_data(shape, dtype, seed, nan=nan, inf=0.03, spread=spread)
    x, _ = strided(shape, dtype, data.draw(geometry(len(shape))), fill)
    with path(kind):
        got = T.scope_kth(x, block, scope, k, p, raw, k_weight, mid)
    expect = ref_scope_kth(x, block, scope, k, p, raw, k_weight, mid)
    single = raw or math.prod(block) == 1
    if p == 3.0 and not single:  # the cube root is exp2(log2(s) / 3) (not correctly rounded)
        torch.testing.assert_close(got, expect, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5,
                                   atol=0, equal_nan=True)
    elif p == 2.0 and not single:
        assert_ulps(got, expect, 4)
    else:
        assert_same(got, expect)


# Rows of 6 single elements (raw: signed, -0.0 / +-inf / NaN, ties across signs) and 6 blocks of
# 1x2 (NaN inside otherwise winning blocks, inf, ties): 2 scopes each.
SPECIAL_RAW = torch.tensor([[-0.0, 3.0, -3.0, 0.0, -INF, float("nan")], [2.0, -1.0, 2.0, INF, -1.0, -0.0]])
SPECIAL_BLK = torch.tensor([[8.0, float("nan"), 1.0, 1.0, -1.0, 1.0, 0.0, -0.0, 2.0, 0.0, 8.0, 8.0],
                            [INF, 1.0, -2.0, 2.0, 2.0, -2.0, float("nan"), float("nan"), 3.0, 0.0, -0.0, -3.0]])


@pytest.mark.parametrize("kind,p,dtypes", [(k, p, (torch.float32, torch.float64)) for k in ("default", "tiny")
                                           for p in (1.0, 2.0, INF, 3.0)]
                         # the select kernel's choice does not depend on p (scores come from the scratch):
                         # 32-bit keys once, 64-bit keys once (it is the slow one under the interpreter)
                         + [("large", 2.0, (torch.float32,)), ("large", INF, (torch.float64,))])
def test_special_values_every_nnz(kind, p, dtypes):
    for dtype in dtypes:
        for x, block, raw in ((SPECIAL_RAW, [1, 1], True), (SPECIAL_RAW, [1, 1], False), (SPECIAL_BLK, [1, 2], False)):
            x = x.to(dtype)
            for nnz in range(7):
                for ties in (False, True):
                    with path(kind):
                        got = T.scope_mask(x, block, [1, 6], nnz, p, raw, ties, False)
                    assert_same(got, R.scope_mask(x, block, [1, 6], nnz, p, raw, ties, False))
            for k in range(1, 6):
                with path(kind):
                    got = T.scope_kth(x, block, [1, 6], k, p, raw, 0.5, k < 5)
                expect = ref_scope_kth(x, block, [1, 6], k, p, raw, 0.5, k < 5)
                torch.testing.assert_close(got, expect, rtol=1e-6, atol=0, equal_nan=True)


def test_scope_kth_fewer_valid_is_minus_inf():
    x = torch.tensor([[1.0, float("nan"), float("nan"), float("nan")], [3.0, 4.0, 0.0, 2.0]])
    for kind in ("default", "large"):
        with path(kind):
            for p in (1.0, 2.0, 3.0, INF):  # row 1: the 2nd largest norm is 3 for every p
                got = T.scope_kth(x, [1, 1], [1, 4], 2, p, False, 1.0, False)
                assert got[0, 0] == -INF, (p, got)
                torch.testing.assert_close(got[1, 0], torch.tensor(3.0))
            got = T.scope_kth(x, [1, 1], [1, 4], 3, 1.0, False, 1.0, True)  # mid of 2 and 0
            assert got[0, 0] == -INF and got[1, 0] == 1.0


@settings(deadline=None, max_examples=_EX)
@given(dtype=st.sampled_from(FLOATS), p=st.sampled_from([1.0, 2.0, INF, 3.0]), data=st.data(),
       seed=st.integers(0, 2**31), nan=st.sampled_from([0.0, 0.1]), spread=st.sampled_from([2, 8]),
       keep_ties=st.booleans(), vdtype=st.sampled_from([None] + FLOATS),
       kind=st.sampled_from(["default", "tiny", "large"]))
def test_scope_hard_threshold(dtype, p, data, seed, nan, spread, keep_ties, vdtype, kind):
    shape, block, scope = data.draw(scoped(max_scopes=4, min_nb=2) if kind == "large" else scoped())
    nnz = draw_nnz(data, math.prod(scope))
    fill = int_data(shape, dtype, seed, nan=nan, spread=spread)
    x, base = strided(shape, dtype, data.draw(geometry(len(shape))), fill)
    values = None
    if vdtype is not None:
        vfill = int_data(shape, vdtype, seed + 1, nan=nan, spread=spread)
        values, _ = strided(shape, vdtype, data.draw(geometry(len(shape))), vfill)
    rx, rbase = twin(x, base)
    expect = R.scope_hard_threshold_(rx, values, block, scope, nnz, p, keep_ties)
    with path(kind):
        got = T.scope_hard_threshold_(x, values, block, scope, nnz, p, keep_ties)
    assert_same(got, expect)
    assert_same(base, rbase)  # written through the view, nothing outside it touched
    assert (base == SENTINEL).sum() == base.numel() - x.numel() + int((x == SENTINEL).sum())


@settings(deadline=None, max_examples=_EX)
@given(lay=scoped(), dtype=st.sampled_from(FLOATS), data=st.data(), seed=st.integers(0, 2**31),
       kind=st.sampled_from(["default", "tiny"]))
def test_block_apply_mask(lay, dtype, data, seed, kind):
    shape, block, _ = lay
    grid = [n // b for n, b in zip(shape, block)]
    x, base = strided(shape, dtype, data.draw(geometry(len(shape))), int_data(shape, dtype, seed))
    g = torch.Generator().manual_seed(seed + 7)
    mbuf = torch.rand(2 * math.prod(grid) + 3, generator=g) < 0.5
    mask, _ = strided(grid, torch.bool, data.draw(geometry(len(grid))), mbuf[:math.prod(grid)].reshape(grid))
    rx, rbase = twin(x, base)
    R.block_apply_mask_(rx, block, mask)
    with path(kind):
        assert T.block_apply_mask_(x, block, mask) is None
    assert_same(base, rbase)


# --------------------------------------------------------------------------- soft threshold


@settings(deadline=None, max_examples=_EX)
@given(lay=scoped(max_numel=200), dtype=st.sampled_from(FLOATS), data=st.data(), seed=st.integers(0, 2**31),
       cond=st.sampled_from(["none", "none", "single", "bisect"]), tdtype=st.sampled_from(FLOATS),
       eps=st.sampled_from([0.0, 1e-6, 0.25]), kind=st.sampled_from(["default", "tiny", "large"]))
def test_block_soft_threshold(lay, dtype, data, seed, cond, tdtype, eps, kind):
    shape, block, _ = lay
    if cond == "single":
        block = [1] * len(shape)
    grid = [n // b for n, b in zip(shape, block)]
    g = torch.Generator().manual_seed(seed)
    x, base = strided(shape, dtype, data.draw(geometry(len(shape))), int_data(shape, dtype, seed, nan=0.03))
    tfill = (torch.rand(grid, generator=g, dtype=torch.float64) * 12).round() / 4  # exact in every dtype
    thr, _ = strided(grid, tdtype, data.draw(geometry(len(grid))), tfill.to(tdtype))
    h = None
    if cond != "none":
        hfill = (torch.randint(1, 9, shape, generator=g) / 4).to(tdtype)  # positive, exact
        h, _ = strided(shape, tdtype, data.draw(geometry(len(shape))), hfill)
    max_iter = data.draw(st.sampled_from([0, 3, 30]))
    atol = data.draw(st.sampled_from([0.0, 1e-8, 1e-2]))
    rx, rbase = twin(x, base)
    R.block_soft_threshold_(rx, block, thr, h, max_iter, atol, eps)
    with path(kind):
        assert T.block_soft_threshold_(x, block, thr, h, max_iter, atol, eps) is None
    if cond == "bisect" and math.prod(block) > 1:
        # the bisection compares sums taken in another order: mu can differ by ~ the final bracket
        tol = {torch.float64: 1e-6, torch.float32: 1e-4}.get(dtype, 2e-2)
        torch.testing.assert_close(base, rbase, rtol=tol, atol=tol, equal_nan=True)
        # h x is exact (multiples of 1/4): the dead-block test and the zeros agree exactly
        assert torch.equal(base == 0, rbase == 0)
    else:
        # every step correctly rounded, in the reference's order; only the CPU reference's sqrt can be
        # off (by an ulp), which 1 - t / (n + eps) amplifies when t ~ n: absolute slack of |x| <= 8 * 8 ulps
        assert_ulps(base, rbase, 4, 64)


def test_soft_threshold_bisection_float64_tight():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    h = torch.rand(6, 40, generator=g, dtype=torch.float64) + 0.1
    t = torch.rand(6, 4, generator=g, dtype=torch.float64) * 4
    t[0, 0] = 1e9  # a dead block
    for kind in ("default", "large"):
        a, b = x.clone(), x.clone()
        R.block_soft_threshold_(b, [1, 10], t, h, 60, 1e-14, 1e-12)
        with path(kind):
            T.block_soft_threshold_(a, [1, 10], t, h, 60, 1e-14, 1e-12)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert torch.equal(a[0, :10], torch.zeros(10, dtype=torch.float64))
        assert not torch.equal(a, x)


# --------------------------------------------------------------------------- larger inputs, default tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rowwise_topk_4096(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4096, generator=g) * 4).round().to(dtype)  # many ties
    x[1, ::7] = float("nan")
    for nnz, ties in ((1, False), (100, False), (100, True), (4000, False)):
        assert_same(T.scope_mask(x, [1, 1], [1, 4096], nnz, 2.0, False, ties, False),
                    R.scope_mask(x, [1, 1], [1, 4096], nnz, 2.0, False, ties, False))
    assert_same(T.scope_kth(x, [1, 1], [1, 4096], 100, 1.0, False, 1.0, True),
                ref_scope_kth(x, [1, 1], [1, 4096], 100, 1.0, False, 1.0, True))
    with path("large"):  # same with the tiny-chunk select (many carries across chunks)
        T.TUNING["select_chunk"] = 64
        assert_same(T.scope_mask(x[:, :1024], [1, 1], [1, 1024], 300, 2.0, False, False, False),
                    R.scope_mask(x[:, :1024], [1, 1], [1, 1024], 300, 2.0, False, False, False))


def test_whole_tensor_one_scope_raw():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(24, 40, generator=g) * 3).round()
    x[3, 5], x[7, 7], x[0, 0], x[1, 1] = -0.0, INF, -INF, float("nan")
    xt = x.t()  # non-contiguous
    for nnz in (0, 1, 17, 500, 959, 960):
        for ties in (False, True):
            assert_same(T.scope_mask(xt, [1, 1], [40, 24], nnz, 2.0, True, ties, True),
                        R.scope_mask(xt, [1, 1], [40, 24], nnz, 2.0, True, ties, True))
    assert_same(T.scope_kth(xt, [1, 1], [40, 24], 959, 2.0, True, 0.5, False),
                ref_scope_kth(xt, [1, 1], [40, 24], 959, 2.0, True, 0.5, False))
    assert T.scope_kth(xt, [1, 1], [40, 24], 959, 2.0, True, 0.5, False).item() == -INF  # -inf is valid and last


def test_nm_sparsity_2_4_exact_count():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(64, 128, generator=g) * 2).round().to(torch.float16)  # lots of ties
    m = T.scope_mask(x, [1, 1], [1, 4], 2, 1.0, False, False, True)
    assert torch.equal(m, R.scope_mask(x, [1, 1], [1, 4], 2, 1.0, False, False, True))
    assert torch.equal(m.reshape(64, 32, 4).sum(-1), torch.full((64, 32), 2))
    y = x.clone()
    keep = T.scope_hard_threshold_(y, None, [1, 1], [1, 4], 2, 1.0, False)
    assert torch.equal(keep, m) and torch.equal(y, torch.where(m, x, 0))


# --------------------------------------------------------------------------- layouts, fallback, errors


def test_layout_merges_contiguous_rows():
    x = torch.zeros(8, 6, 16)
    lay = T._Layout(x.shape, [1, 1, 4], [1, 6, 2], [(x.stride(), "e")] * 3)
    assert lay.sizes == [[8, 2], [6, 2], [4]] and lay.ok  # (scopes) (in-scope) (in-block)
    lay = T._Layout(x.shape, [1, 1, 1], [1, 1, 1], [(x.stride(), "e")] * 3)
    assert lay.sizes == [[768], [], []]


def test_too_many_dims_falls_back_to_reference():
    # 6 dims of 2, blocks across all of them on a permuted, padded view: 6 unmergeable in-block dims.
    shape, block = (2,) * 6, [2] * 6
    x, base = strided(shape, torch.float32, ([0, 2, 4, 1, 3, 5], [1] * 6, 1, 2), int_data(shape, torch.float32, 0))
    assert not T._Layout(shape, block, [1] * 6, [(x.stride(), "e")] * 3).ok
    assert_same(T.block_norms(x, block, 1.0), R.block_norms(x, block, 1.0))
    blk, scp = [1, 1, 2, 2, 2, 2], [2, 2, 1, 1, 1, 1]
    assert_same(T.scope_mask(x, blk, scp, 2, 1.0, False, False, True),
                R.scope_mask(x, blk, scp, 2, 1.0, False, False, True))
    rx, rbase = twin(x, base)
    assert_same(T.scope_hard_threshold_(x, None, blk, scp, 1, 2.0, False),
                R.scope_hard_threshold_(rx, None, blk, scp, 1, 2.0, False))
    assert_same(base, rbase)


def test_eight_dims_merge_into_the_kernels():
    x = int_data((2, 1, 3, 2, 1, 2, 3, 2), torch.float32, 9)
    block, scope = [1, 1, 1, 1, 1, 1, 3, 2], [1, 1, 1, 1, 1, 2, 1, 1]
    assert T._Layout(x.shape, block, scope, [(x.stride(), "e")] * 3).ok
    assert_same(T.scope_mask(x, block, scope, 1, 1.0, False, False, True),
                R.scope_mask(x, block, scope, 1, 1.0, False, False, True))
    y, ry = x.clone(), x.clone()
    T.block_soft_threshold_(y, block, torch.ones(2, 1, 3, 2, 1, 2, 1, 1), None, 20, 1e-8, 0.0)
    R.block_soft_threshold_(ry, block, torch.ones(2, 1, 3, 2, 1, 2, 1, 1), None, 20, 1e-8, 0.0)
    assert_ulps(y, ry, 4, 64)


def test_empty():
    x = torch.empty(0, 4)
    assert T.block_norms(x, [1, 2], 2.0).shape == (0, 2)
    assert T.scope_kth(x, [1, 2], [1, 2], 1, 2.0, False, 1.0, False).shape == (0, 1)
    assert T.scope_mask(x, [1, 2], [1, 2], 1, 2.0, False, False, True).shape == (0, 4)
    assert T.scope_mask(x, [1, 2], [1, 2], 1, 2.0, False, False, False).shape == (0, 2)
    assert T.scope_hard_threshold_(x, None, [1, 2], [1, 2], 1, 2.0, False).shape == (0, 2)
    T.block_apply_mask_(x, [1, 2], torch.empty(0, 2, dtype=torch.bool))
    T.block_soft_threshold_(x, [1, 2], torch.empty(0, 2), None, 20, 1e-8, 0.0)


def test_inplace_rejects_overlapping_x():
    x = torch.ones(4).expand(3, 4)
    with pytest.raises(RuntimeError, match="single memory location"):
        T.scope_hard_threshold_(x, None, [1, 1], [1, 4], 2, 2.0, False)
    with pytest.raises(RuntimeError, match="single memory location"):
        T.block_apply_mask_(x, [1, 1], torch.ones(3, 4, dtype=torch.bool))


def test_int64_offsets_path():
    x = int_data((4, 6, 8), torch.float32, 5)[:, :, 1:7:2]
    T.FORCE_INT64 = True
    try:
        assert_same(T.scope_mask(x, [1, 2, 1], [2, 1, 3], 2, 2.0, False, False, True),
                    R.scope_mask(x, [1, 2, 1], [2, 1, 3], 2, 2.0, False, False, True))
        with path("large"):
            assert_same(T.scope_mask(x, [1, 2, 1], [2, 1, 3], 2, 2.0, False, True, True),
                        R.scope_mask(x, [1, 2, 1], [2, 1, 3], 2, 2.0, False, True, True))
    finally:
        T.FORCE_INT64 = False

"""Session 35 audit of the op contract (DESIGN.md, "The op contract") over every op of csrc/ops.cpp.

Each op's existing tests were read against the contract (hypothesis-drawn inputs with odd and size-0/1 shapes,
non-contiguous views and every supported dtype, each backend against the reference, plus opcheck). This file
adds the elements found missing; each test names the gap it closes:

* parammap: topk_select never drew a strided ``scores`` / ``active`` (native: never n = 0); mask_to_indices /
  pack_bitmask (native) never drew a non-contiguous or stride-0 (expanded) mask; bitmask_to_indices never a
  strided ``bits``; gather / scatter never a strided ``index`` or ``flat``, and the native functional
  scatter only a float32 ``flat``;
* scope: the native hypothesis tests never drew a size-0 x nor a strided ``values`` / ``block_mask`` /
  ``thresholds`` / ``conditioner``; the Triton size-0 test was float32 only;
* golden: the native golden_topk_and_ test drew 1-D g only; non-contiguous g / bits / counts are refused by the
  wrapper, but direct calls of the native op and of the Triton launcher (as registered for CUDA) were never
  shown to refuse them rather than compute from the wrong elements;
* projection: the Triton projection_matrix_ test drew float32, contiguous, non-empty ``out`` only; the Triton
  project_flat test never drew float64, strided x, or B / D = 0; factored_project never drew strided a / g /
  lt / rt / rb / mask on the Triton path, nor column-strided ones anywhere;
* search: score_topk never drew non-contiguous queries / key_scale / scores_in / idx_in;
* obs: obs_shared_prune never drew strided inputs on the Triton path, nor a non-contiguous cinv / pidx;
* opcheck on size-0 / size-1 / non-contiguous arguments (the fake impls' edge shapes) for the ops whose opchecks
  used ordinary shapes only.

Exact (torch.equal, NaN-aware bit comparisons) where the op promises bits; elsewhere the existing per-op tests'
tolerances. Triton runs on CPU tensors under the interpreter, small sizes.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import math  # noqa: E402
from itertools import combinations  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from conftest import use_backend  # noqa: E402
from gradkit import _ext, ops  # noqa: E402
from gradkit.kernels.reference import golden as RG  # noqa: E402
from gradkit.kernels.reference import obs as RO  # noqa: E402
from gradkit.kernels.reference import parammap as RP  # noqa: E402
from gradkit.kernels.reference import projection as RJ  # noqa: E402
from gradkit.kernels.reference import scope as RS  # noqa: E402
from gradkit.kernels.reference import search as RQ  # noqa: E402

pytestmark = [pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                         "ignore:invalid value encountered:RuntimeWarning",
                                         "ignore:divide by zero encountered:RuntimeWarning")]

T = pytest.importorskip("gradkit.kernels.triton.parammap")
from gradkit.kernels.triton import cuda_kernel  # noqa: E402
from gradkit.kernels.triton import golden as TG  # noqa: E402
from gradkit.kernels.triton import obs as TO  # noqa: E402
from gradkit.kernels.triton import projection as TJ  # noqa: E402
from gradkit.kernels.triton import scope as TS  # noqa: E402
from gradkit.kernels.triton import search as TQ  # noqa: E402

G = torch.ops.gradkit
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INDEX = [torch.int32, torch.int64]
FEW = settings(deadline=None, max_examples=12)
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def same_bits(a, b):
    """Same dtype and shape, bit for bit (-0.0 != +0.0); NaN matches NaN of any payload."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype in _BITS:
        assert torch.equal(a.isnan(), b.isnan()), (a, b)
        a, b = (torch.where(t.isnan(), 0, t).contiguous().view(_BITS[t.dtype]) for t in (a, b))
    assert torch.equal(a, b), (a, b)


def strided_1d(v, how, seed=0):
    """A 1-D view holding v's values: "step" (every other element of a bigger buffer, offset 1), "column" (a
    column of a row-major (n, 3) buffer, stride 3), else a contiguous copy."""
    n = v.numel()
    if how == "step":
        big = torch.zeros(2 * n + 1, dtype=v.dtype)
        big[1::2] = v
        return big[1::2]
    if how == "column":  # a column of a row-major (n, 3) buffer: stride 3
        big = torch.zeros(n, 3, dtype=v.dtype)
        big[:, 1] = v
        return big[:, 1]
    return v.clone()


# =========================================================================== family 1: parammap


@FEW
@given(n=st.integers(0, 60), dtype=st.sampled_from(FLOATS), how=st.sampled_from(["step", "column", "contig"]),
       ahow=st.sampled_from([None, "step", "column"]), kind=st.sampled_from(["ties", "randn"]), data=st.data(),
       seed=st.integers(0, 2**31))
def test_topk_select_strided_scores_and_active_size0(n, dtype, how, ahow, kind, data, seed):
    """Gap: topk_select's strategies drew contiguous scores / active only (and native n >= 1)."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.randint(-3, 4, (n,), generator=g).double() if kind == "ties" else torch.randn(n, generator=g,
                                                                                             dtype=torch.float64))
    s = strided_1d(v.to(dtype), how, seed)
    active = None if ahow is None else strided_1d(torch.rand(n, generator=g) < 0.6, ahow, seed)
    n_act = n if active is None else int(active.sum())
    k = data.draw(st.sampled_from(sorted({0, min(1, n_act), n_act // 2, n_act})))
    want = RP.topk_select(s.contiguous(), None if active is None else active.contiguous(), k)
    with use_backend("native"):
        got = ops.topk_select(s, k, active)
    same_bits(got, want)
    same_bits(T.topk_select(s, active, k), want)
    # the segments variant: the same strided scores split into two strided pieces
    h = n // 2
    parts, acts = [s[:h], s[h:]], None if active is None else [active[:h], active[h:]]
    with use_backend("native"):
        same_bits(ops.topk_select_segments(parts, k, acts), want)
    same_bits(T.topk_select_segments(parts, acts or [None, None], k), want)


@st.composite
def bool_masks(draw):
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    p = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    view = draw(st.sampled_from(["transpose", "step", "expand", "contig"]))
    if view == "transpose" and len(shape) >= 2:
        return (torch.rand(shape[::-1], generator=g) < p).permute(list(range(len(shape)))[::-1])
    if view == "step":
        big = shape[:-1] + (2 * shape[-1],)
        return (torch.rand(big, generator=g) < p)[..., ::2]
    if view == "expand" and len(shape) >= 2:  # stride 0 along dim 0: every row the same
        return (torch.rand((1,) + shape[1:], generator=g) < p).expand(shape)
    return torch.rand(shape, generator=g) < p


@FEW
@given(mask=bool_masks(), dtype=st.sampled_from(INDEX), bhow=st.sampled_from(["step", "column"]))
def test_mask_encodings_non_contiguous_every_backend(mask, dtype, bhow):
    """Gap: the native mask tests drew contiguous masks only (Triton: no stride-0 mask), and bitmask_to_indices
    never a strided ``bits``."""
    flat = mask.contiguous()
    want_idx = RP.mask_to_indices(flat, dtype)
    want_bits = RP.pack_bitmask(flat)
    with use_backend("native"):
        same_bits(ops.mask_to_indices(mask, dtype), want_idx)
        same_bits(ops.pack_bitmask(mask), want_bits)
    same_bits(T.mask_to_indices(mask, dtype), want_idx)
    same_bits(T.pack_bitmask(mask), want_bits)
    bits = strided_1d(want_bits, bhow, 0)
    assert bits.numel() == 0 or not bits.is_contiguous() or bits.numel() == 1
    with use_backend("native"):
        same_bits(ops.bitmask_to_indices(bits, mask.numel(), dtype), want_idx)
    same_bits(T.bitmask_to_indices(bits, mask.numel(), dtype), want_idx)


def _tols(dtype):
    fi = torch.finfo(dtype)  # test_parammap_triton.tols: ~1 ulp
    return dict(rtol=fi.eps, atol=fi.tiny * fi.eps, equal_nan=True)


@st.composite
def strided_segments(draw):
    """1-3 segments, every float dtype, index (when given) a strided view of an int32/int64 buffer."""
    src, index = [], []
    for _ in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=2)))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        t = torch.randn(shape, generator=g).to(draw(st.sampled_from(FLOATS)))
        if len(shape) == 2 and draw(st.booleans()):
            t = t.t()
        src.append(t)
        if draw(st.booleans()):
            index.append(None)
            continue
        pos = torch.randperm(t.numel(), generator=g)[:draw(st.integers(0, t.numel()))]
        index.append(strided_1d(pos.to(draw(st.sampled_from(INDEX))), draw(st.sampled_from(["step", "column"])), 0))
    return src, index


@FEW
@given(segs=strided_segments(), flat_dtype=st.sampled_from(FLOATS), fhow=st.sampled_from(["step", "column"]),
       scale=st.sampled_from([1.0, -0.5, 3.0]), accumulate=st.booleans(), seed=st.integers(0, 2**31))
def test_gather_scatter_strided_index_and_flat(segs, flat_dtype, fhow, scale, accumulate, seed):
    """Gap: gather / scatter never drew a strided ``index`` or ``flat``; the native functional scatter only a
    float32 flat. Native: bit for bit (both round the exact result once); Triton: exact at scale 1, else 1 ulp
    (test_parammap_triton's rule)."""
    src, index = segs
    cindex = [None if i is None else i.contiguous() for i in index]
    want = RP.gather_segments(src, cindex, None)
    with use_backend("native"):
        same_bits(ops.gather_segments(src, index), want)
    same_bits(T.gather_segments(src, index, None), want)
    total = want.numel()
    g = torch.Generator().manual_seed(seed)
    flat = strided_1d(torch.randn(total, generator=g).to(flat_dtype), fhow, 0)
    numel = [t.numel() for t in src]
    want_s = RP.scatter_segments(flat.contiguous(), cindex, numel, scale)
    with use_backend("native"):
        got_s = ops.scatter_segments(flat, index, numel, scale=scale)
    tri_s = T.scatter_segments(flat, index, numel, scale)
    for a, b, w in zip(got_s, tri_s, want_s):
        same_bits(a, w)
        same_bits(b, w) if scale == 1.0 else torch.testing.assert_close(b, w, **_tols(w.dtype))
    # in place, into (possibly transposed) destinations of the sources' dtypes
    dst_ref = [s.clone() for s in src]
    RP.scatter_segments_(flat.contiguous(), cindex, dst_ref, scale, accumulate)
    for backend in ("native", "triton"):
        dst = [torch.empty_strided(s.shape, s.stride(), dtype=s.dtype).copy_(s) for s in src]
        if backend == "native":
            with use_backend("native"):
                ops.scatter_segments_(flat, index, dst, scale=scale, accumulate=accumulate)
        else:
            T.scatter_segments_(flat, index, dst, scale, accumulate)
        for d, w in zip(dst, dst_ref):
            if backend == "native" or (scale == 1.0 and not accumulate):
                same_bits(d, w)
            else:
                torch.testing.assert_close(d, w, **_tols(w.dtype))
    # gather into out (accumulate) with strided index
    start = torch.randn(total, generator=g).to(flat_dtype)
    want_o = start.clone()
    RP.gather_segments_out(src, cindex, want_o, accumulate)
    for backend in ("native", "triton"):
        out = start.clone()
        if backend == "native":
            with use_backend("native"):
                ops.gather_segments(src, index, out=out, accumulate=accumulate)
        else:
            T.gather_segments_out(src, index, out, accumulate)
        same_bits(out, want_o)


# =========================================================================== family 2: scope

EMPTY_LAYOUTS = [((0, 4), [1, 2], [1, 2]), ((3, 0), [1, 1], [3, 1]), ((0,), [1], [1]),
                 ((2, 0, 3), [1, 1, 3], [2, 1, 1])]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,bs,ss", EMPTY_LAYOUTS, ids=lambda v: str(v))
def test_scope_ops_size0_every_backend_every_dtype(shape, bs, ss, dtype):
    """Gap: the native scope hypothesis tests draw sizes >= 1; Triton's test_empty is float32 only and checks
    shapes alone. Every op, every backend, every dtype: the reference's shape and dtype, x untouched."""
    grid = [n // b for n, b in zip(shape, bs)]
    impls = {"native": G, "triton": TS}
    for name, mod in impls.items():
        x = torch.empty(shape, dtype=dtype)
        for got, want in (
            (mod.block_norms(x, bs, 2.0), RS.block_norms(x, bs, 2.0)),
            (mod.scope_kth(x, bs, ss, 1, 2.0, False, 1.0, False), RS.scope_kth(x, bs, ss, 1, 2.0, False, 1.0, False)),
            (mod.scope_mask(x, bs, ss, 1, 1.0, False, False, True),
             RS.scope_mask(x, bs, ss, 1, 1.0, False, False, True)),
            (mod.scope_mask(x, bs, ss, 1, 1.0, False, True, False),
             RS.scope_mask(x, bs, ss, 1, 1.0, False, True, False)),
            (mod.scope_hard_threshold_(x, None, bs, ss, 1, 2.0, False),
             RS.scope_hard_threshold_(x.clone(), None, bs, ss, 1, 2.0, False)),
        ):
            assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
        assert mod.block_apply_mask_(x, bs, torch.zeros(grid, dtype=torch.bool)) is None
        assert mod.block_soft_threshold_(x, bs, torch.zeros(grid, dtype=dtype), None, 5, 1e-8, 1e-7) is None
        assert x.shape == tuple(shape)


def _strided_like(t, how):
    """t's values in a non-contiguous layout of the same shape: "transpose" (reversed dim order) or "step"."""
    if how == "transpose" and t.dim() >= 2:
        v = t.permute(list(range(t.dim()))[::-1]).contiguous().permute(list(range(t.dim()))[::-1])
        if not v.is_contiguous():
            return v
    big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


@st.composite
def scope_cases(draw):
    nd = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd))
    block = [draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in shape]
    grid = [n // b for n, b in zip(shape, block)]
    scope = [draw(st.sampled_from([d for d in range(1, g + 1) if g % d == 0])) for g in grid]
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randint(-8, 9, shape, generator=g).to(dtype)
    if draw(st.booleans()) and x.numel():
        x.view(-1)[torch.randint(0, x.numel(), (1,), generator=g)] = float("nan")
    return x, block, scope, grid, g, draw(st.sampled_from(["transpose", "step"]))


def _nan_equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == torch.bool:
        assert torch.equal(a, b)
    else:
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (a, b)


# test_scope_ops.SOFT_TOL
SOFT_TOL = {torch.float16: dict(atol=torch.finfo(torch.float16).tiny, rtol=torch.finfo(torch.float16).eps),
            torch.bfloat16: dict(atol=torch.finfo(torch.bfloat16).tiny, rtol=torch.finfo(torch.bfloat16).eps),
            torch.float32: dict(atol=2e-6, rtol=1e-5), torch.float64: dict(atol=1e-13, rtol=1e-12)}


@FEW
@given(case=scope_cases(), data=st.data())
def test_scope_native_strided_companions(case, data):
    """Gap: the native scope tests drew strided x only; values / block_mask / thresholds / conditioner were
    always contiguous (the Triton tests stride them)."""
    x, block, scope, grid, g, how = case
    nb = math.prod(scope)
    nnz = data.draw(st.integers(0, nb))
    keep_ties = data.draw(st.booleans())
    values = torch.randint(-8, 9, x.shape, generator=g).to(x.dtype)
    sv = _strided_like(values, how)
    assert sv.shape[-1] <= 1 or not sv.is_contiguous()
    a, b = x.clone(), _strided_like(x, how)
    keep_ref = RS.scope_hard_threshold_(a, values, block, scope, nnz, 2.0, keep_ties)
    with use_backend("native"):
        keep = ops.scope_hard_threshold_(b, block, scope, nnz, values=sv, keep_ties=keep_ties)
    _nan_equal(keep, keep_ref)
    _nan_equal(b.contiguous(), a)
    m = torch.rand(grid, generator=g) < 0.5
    a, b = x.clone(), x.clone()
    RS.block_apply_mask_(a, block, m)
    with use_backend("native"):
        ops.block_apply_mask_(b, block, _strided_like(m, how))
    _nan_equal(b, a)
    # soft threshold: thresholds and conditioner strided
    x4 = x / 4
    t = (torch.rand(grid, generator=g) * 2).to(x.dtype)
    cond = (torch.rand(x.shape, generator=g) + 0.25).to(x.dtype) if data.draw(st.booleans()) else None
    eps = float(torch.finfo(x.dtype).eps)
    a, b = x4.clone(), x4.clone()
    RS.block_soft_threshold_(a, block, t, cond, 30, 1e-9, eps)
    with use_backend("native"):
        ops.block_soft_threshold_(b, block, _strided_like(t, how),
                                  conditioner=None if cond is None else _strided_like(cond, how),
                                  max_iter=30, atol=1e-9, eps=eps)
    torch.testing.assert_close(b, a, equal_nan=True, **SOFT_TOL[x.dtype])


# =========================================================================== family 3: golden


@FEW
@given(shape=st.sampled_from([(0,), (1,), (0, 3), (1, 1), (3, 5), (2, 3, 3), (4, 1, 7)]),
       dtype=st.sampled_from(FLOATS), data=st.data(), seed=st.integers(0, 2**31))
def test_golden_topk_and_multi_dim_and_empty_g_native_and_triton(shape, dtype, data, seed):
    """Gap: the native golden_topk_and_ test drew 1-D g only (Triton: (n,), (1, n), (n, 1)). Positions are
    row-major flat positions of g; bits, counts and popcount exact over a two-step running AND."""
    n = math.prod(shape)
    g0 = torch.Generator().manual_seed(seed)
    bits0 = RP.pack_bitmask(torch.rand(n, generator=g0) < 0.5)
    counts0 = torch.randint(0, 4, shape, generator=g0, dtype=torch.int32)
    state = {b: (bits0.clone(), counts0.clone()) for b in ("ref", "native", "triton")}
    for step in range(2):
        gr = torch.randint(-3, 4, shape, generator=g0).to(dtype)
        if n and data.draw(st.booleans()):
            gr.view(-1)[torch.randint(0, n, (1,), generator=g0)] = float("nan")
        k = data.draw(st.integers(0, n))
        first = step == 0 or data.draw(st.booleans())
        pops = {}
        for b, (bits, counts) in state.items():
            if b == "ref":
                pops[b] = RG.golden_topk_and_(gr, bits, counts, k, first)
            elif b == "native":
                with use_backend("native"):
                    pops[b] = ops.golden_topk_and_(gr, bits, k, counts=counts, first=first)
            else:
                pops[b] = TG.golden_topk_and_(gr, bits, counts, k, first)
        for b in ("native", "triton"):
            assert torch.equal(state[b][0], state["ref"][0]) and torch.equal(state[b][1], state["ref"][1]), b
            assert pops[b].dtype == torch.int64 and pops[b].dim() == 0 and int(pops[b]) == int(pops["ref"])


def _golden_impls():
    return [("native", G.golden_topk_and_), ("triton", cuda_kernel("golden", "golden_topk_and_")),
            ("wrapper", lambda g, b, c, k, f: ops.golden_topk_and_(g, b, k, counts=c, first=f))]


@pytest.mark.parametrize("which", ["g", "bits", "counts"])
@pytest.mark.parametrize("impl_name,impl", _golden_impls(), ids=[n for n, _ in _golden_impls()])
def test_golden_non_contiguous_arguments_refused_on_every_path(which, impl_name, impl):
    """Golden's kernels read g / bits / counts by flat pointer: a non-contiguous one is refused (ValueError
    naming it) by the wrapper, the native op called directly and the Triton launcher as registered for CUDA,
    with nothing written."""
    g = torch.randn(6, 8)
    bits = torch.zeros(6, dtype=torch.uint8)
    counts = torch.zeros(48, dtype=torch.int32)
    if which == "g":
        g = torch.randn(8, 6).t()
    elif which == "bits":
        bits = torch.zeros(12, dtype=torch.uint8)[::2]
    else:
        counts = torch.zeros(96, dtype=torch.int32)[::2]
    b0, c0 = bits.clone(), counts.clone()
    with pytest.raises(ValueError, match=f"^{which}: "):
        impl(g, bits, counts, 5, True)
    assert torch.equal(bits, b0) and torch.equal(counts, c0)


@pytest.mark.parametrize("name", ["bitmask_binary", "bitmask_not", "bitmask_count"])
@pytest.mark.parametrize("path", ["native", "triton"])
def test_bitmask_ops_refuse_non_contiguous_bits_on_direct_calls(name, path):
    """The bitmask list ops read each mask by flat pointer: a strided mask is refused on a direct op call and by
    the Triton launcher as registered for CUDA, as by the wrapper."""
    a = [torch.randint(0, 256, (10,), dtype=torch.uint8), torch.randint(0, 256, (20,), dtype=torch.uint8)[::2]]
    b = [torch.randint(0, 256, (10,), dtype=torch.uint8) for _ in a]
    fn = getattr(G, name) if path == "native" else cuda_kernel("golden", name)
    args = {"bitmask_binary": (a, b, 0), "bitmask_not": (a, [80, 80]), "bitmask_count": (a,)}[name]
    with pytest.raises((ValueError, TypeError), match=r"^a\[1\]|^bits\[1\]"):
        fn(*args)


# =========================================================================== family 6: projection


def _ulp32(a, b):
    ia, ib = (t.float().contiguous().view(torch.int32).long() for t in (a, b))
    return int((ia - ib).abs().max()) if ia.numel() else 0


def _ulp16(a, b):
    ia, ib = (t.contiguous().view(torch.int16).long() for t in (a, b))
    return int((ia - ib).abs().max()) if ia.numel() else 0


@FEW
@given(rows=st.integers(0, 9), cols=st.integers(0, 70), row0=st.integers(0, 2**40), col0=st.integers(0, 200),
       seed=st.integers(0, 2**63 - 1), k=st.integers(1, 500), kind=st.sampled_from([0, 1]),
       dtype=st.sampled_from(FLOATS), layout=st.sampled_from(["contig", "transpose", "step"]))
def test_projection_matrix_every_dtype_layout_and_empty(rows, cols, row0, col0, seed, k, kind, dtype, layout):
    """Gap: the Triton projection_matrix_ test drew float32, contiguous, non-empty outs only; the native one
    contiguous outs (one fixed strided case). Rademacher bit for bit; Gaussian within 1 ulp (fp32 / fp64 out:
    of float32; fp16 / bf16: of the half dtype), test_projection_ops' rules."""
    want = RJ.matrix_values(rows, cols, seed, kind, k, row0, col0)
    for backend in ("native", "triton"):
        if layout == "transpose":
            out = torch.full((cols, rows), 7.0, dtype=dtype).t()
        elif layout == "step":
            out = torch.full((rows, 2 * cols), 7.0, dtype=dtype)[:, ::2]
        else:
            out = torch.full((rows, cols), 7.0, dtype=dtype)
        if backend == "native":
            G.projection_matrix_(out, seed, kind, k, row0, col0)
        else:
            TJ.projection_matrix_(out, seed, kind, k, row0, col0)
        assert out.shape == (rows, cols) and out.dtype == dtype
        if kind == 0:
            assert torch.equal(out, want.to(dtype)), backend
        elif dtype in (torch.float32, torch.float64):
            assert _ulp32(out, want) <= 1, backend
        else:
            assert _ulp16(out, want.to(dtype)) <= 1, backend


@FEW
@given(B=st.integers(0, 6), D=st.integers(0, 90), k=st.integers(1, 40), col0=st.integers(0, 300),
       seed=st.integers(0, 2**63 - 1), kind=st.sampled_from([0, 1]), dtype=st.sampled_from(FLOATS),
       layout=st.sampled_from(["contig", "step", "transpose"]))
def test_project_flat_triton_every_dtype_layout_and_empty(B, D, k, col0, seed, kind, dtype, layout):
    """Gap: the Triton project_flat test never drew float64 x, strided x (one fixed case) or B / D = 0 (nor the
    native one a transposed x). Tolerance: test_projection_ops' fp32-accumulation bound."""
    g = torch.Generator().manual_seed(seed % 1000)
    if layout == "step":
        x = torch.randn(B, 2 * D, generator=g, dtype=torch.float64)[:, ::2]
    elif layout == "transpose":
        x = torch.randn(D, B, generator=g, dtype=torch.float64).t()
    else:
        x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    want = RJ.project_flat(x.contiguous(), k, seed, kind, col0)
    tol = 2e-6 * math.sqrt(max(D, 1)) * 4 / math.sqrt(k) + 1e-6
    for fn in (G.project_flat, TJ.project_flat):
        got = fn(x, k, seed, kind, col0)
        assert got.dtype == torch.float32 and got.shape == (B, k)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)


def _col_strided(t, how):
    if how == "rows":  # a column window of a wider array (row stride > width)
        big = torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype)
        big[:, 1:t.shape[1] + 1] = t
        return big[:, 1:t.shape[1] + 1]
    return t.t().contiguous().t()  # column-major: unit stride along rows


@FEW
@given(B=st.integers(0, 3), T_=st.integers(1, 6), I=st.integers(1, 12), O=st.integers(1, 12),
       p=st.sampled_from([1, 5, 16]), seed=st.integers(0, 2**31), rb=st.booleans(), mask=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       how=st.sampled_from(["rows", "colmajor"]))
def test_factored_project_strided_every_argument(B, T_, I, O, p, seed, rb, mask, dtype, how):
    """Gap: factored_project's Triton test never drew strided inputs, and no test a column-major a / g / lt / rt
    or a strided rb / mask. Tolerance: test_factored_ops.close."""
    gen = torch.Generator().manual_seed(seed)
    N = B * T_
    a = torch.randn(N, I, generator=gen).to(dtype)
    gg = torch.randn(N, O, generator=gen).to(dtype)
    lt, rt = torch.randn(O, p, generator=gen), torch.randn(I, p, generator=gen)
    rbt = torch.randn(p, generator=gen) if rb else None
    m = (torch.rand(N, generator=gen) < 0.7) if mask else None
    if m is not None:
        a[~m] = float("nan")
        gg[~m] = float("nan")
    want = RJ.factored_project(a, gg, lt, rt, rbt, m, T_)
    args = (_col_strided(a, how), _col_strided(gg, how), _col_strided(lt, how), _col_strided(rt, how),
            None if rbt is None else strided_1d(rbt, "step", 0), None if m is None else strided_1d(m, "column", 0))
    scale = want.abs().max().item() if want.numel() else 1.0
    for name, fn in (("native", G.factored_project), ("triton", TJ.factored_project)):
        got = fn(*args, T_)
        assert got.shape == (B, p, p) and got.dtype == torch.float32, name
        assert not bool(torch.isnan(got).any()), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, scale))


# =========================================================================== family 7: search


@FEW
@given(Q=st.integers(0, 6), N=st.integers(0, 60), D=st.integers(1, 9), k=st.sampled_from([0, 1, 3, 10]),
       kdt=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), largest=st.booleans(),
       scale=st.booleans(), running=st.booleans(), kin=st.integers(0, 4), base=st.integers(0, 9),
       seed=st.integers(0, 2**31))
def test_score_topk_non_contiguous_every_argument(Q, N, D, k, kdt, largest, scale, running, kin, base, seed):
    """Gap: score_topk's tests strided keys only; queries, key_scale, scores_in and idx_in were always
    contiguous. Integer data: every score exact, results bit for bit (native, Triton) against the reference."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (D, Q), generator=g).float().t()  # (Q, D), column-major
    keys = torch.randint(-2, 3, (D, N), generator=g).to(kdt).t()  # (N, D), unit row stride
    ks = strided_1d(torch.randint(0, 3, (N,), generator=g).float(), "step", 0) if scale else None
    s_in = i_in = None
    if running:
        s_in = torch.randint(-5, 6, (kin, Q), generator=g).float().t()
        i_in = torch.randint(-1, N + 20, (kin, Q), generator=g).t()
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    want = RQ.score_topk(c(q), c(keys), k, largest, c(ks), c(s_in), c(i_in), base)
    with use_backend("native"):
        got = ops.score_topk(q, keys, k, largest=largest, key_scale=ks, scores_in=s_in, idx_in=i_in, base=base)
    tri = TQ.score_topk(q, keys, k, largest, ks, s_in, i_in, base)
    direct = G.score_topk(q, keys, k, largest, ks, s_in, i_in, base)  # keys' column stride != 1: no wrapper copy
    for r in (got, tri, direct):
        assert torch.equal(r[0], want[0]) and torch.equal(r[1], want[1])


# =========================================================================== family 5: obs


@FEW
@given(n=st.integers(0, 6), nq=st.integers(1, 3), E=st.integers(1, 5), data=st.data(), seed=st.integers(0, 2**31),
       local=st.booleans(), nan=st.booleans())
def test_obs_shared_prune_strided_every_argument(n, nq, E, data, seed, local, nan):
    """Gap: obs_shared_prune's Triton test never drew strided inputs, and neither backend a non-contiguous cinv
    or pidx. Bit for bit against the reference (test_obs_shared_ops / test_obs_triton's rule)."""
    p = data.draw(st.integers(1, min(E, 3)))
    subsets = list(combinations(range(E), p))
    ns = data.draw(st.integers(1, min(len(subsets), 5)))
    g = torch.Generator().manual_seed(seed)
    K = nq * E
    w = torch.randn(n, K, generator=g)
    if nan and n:
        w[0, 0] = float("nan")
    c = torch.randn(K, K, generator=g)
    cinv = torch.randn(nq, ns, p, p, generator=g)
    pick = torch.randperm(len(subsets), generator=g)[:ns].sort().values
    pidx = torch.tensor([subsets[i] for i in pick.tolist()], dtype=torch.int64).reshape(ns, p)
    want = RO.obs_shared_prune(w, c, cinv, pidx, E, local)
    sw = torch.cat([w, torch.zeros(n, 3)], 1)[:, :K]
    sc = c.t().contiguous().t()
    scinv = cinv.transpose(-1, -2).contiguous().transpose(-1, -2)
    spidx = pidx.t().contiguous().t()
    for name, fn in (("native", G.obs_shared_prune), ("triton", TO.obs_shared_prune)):
        got_w, got_s = fn(sw, sc, scinv, spidx, E, local)
        assert torch.equal(got_s, want[1]), name
        same_bits(got_w, want[0])


# =========================================================================== opcheck on edge shapes

_FAKE = ("test_schema", "test_faketensor")


def _edge_opcheck_cases():
    x0, x1 = torch.randn(0, 4), torch.randn(1, 1)
    e = torch.empty(0, dtype=torch.int64)
    mt = (torch.rand(5, 8) < 0.5).t()
    cases = [
        ("gather_segments/size0", G.gather_segments, ([torch.randn(0, 3), torch.randn(2, 3).t()], [None, e], None)),
        ("gather_segments/strided_index", G.gather_segments,
         ([torch.randn(4, 5)], [torch.tensor([7, 0, 3, 1, 19, 2])[::2]], torch.float16)),
        ("scatter_segments/size0", G.scatter_segments, (torch.randn(3), [e, None], [4, 3], 1.0)),
        ("scatter_segments_/strided_flat", G.scatter_segments_,
         (torch.randn(8)[::2], [torch.tensor([2, 0]), None], [torch.zeros(3), torch.zeros(2)], 0.5, True)),
        ("mask_to_indices/empty", G.mask_to_indices, (torch.zeros(0, 3, dtype=torch.bool), torch.int64)),
        ("mask_to_indices/transposed", G.mask_to_indices, (mt, torch.int32)),
        ("bitmask_to_indices/size0", G.bitmask_to_indices, (torch.empty(0, dtype=torch.uint8), 0, torch.int32)),
        ("pack_bitmask/transposed", G.pack_bitmask, (mt,)),
        ("pack_bitmask/empty", G.pack_bitmask, (torch.zeros(0, dtype=torch.bool),)),
        ("topk_select/size0", G.topk_select, (torch.empty(0), None, 0)),
        ("topk_select/strided", G.topk_select, (torch.randn(30)[::3], (torch.rand(30) < 0.7)[::3], 2)),
        ("topk_select_segments/size0_piece", G.topk_select_segments,
         ([torch.randn(0, 2), torch.randn(1), torch.randn(9)[::2]], [None, None, None], 3)),
        ("scope_kth/size0", G.scope_kth, (x0, [1, 2], [1, 2], 1, 2.0, False, 1.0, False)),
        ("scope_kth/size1", G.scope_kth, (x1, [1, 1], [1, 1], 1, 2.0, True, 0.5, False)),
        ("block_norms/size1", G.block_norms, (x1.double(), [1, 1], 3.0)),
        ("golden_topk_and_/size0", G.golden_topk_and_,
         (torch.empty(0, 3), torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int32), 0, True)),
        ("golden_topk_and_/size1_2d", G.golden_topk_and_,
         (torch.randn(1, 1).half(), torch.zeros(1, dtype=torch.uint8), None, 1, False)),
        ("bitmask_binary/size0", G.bitmask_binary,
         ([torch.empty(0, dtype=torch.uint8), torch.ones(1, dtype=torch.uint8)],
          [torch.empty(0, dtype=torch.uint8), torch.ones(1, dtype=torch.uint8)], 3)),
        ("bitmask_not/size0", G.bitmask_not, ([torch.empty(0, dtype=torch.uint8), torch.ones(1, dtype=torch.uint8)],
                                              [0, 1])),
        ("bitmask_count/size0", G.bitmask_count, ([torch.empty(0, dtype=torch.uint8)],)),
        ("masked_adamw_/size0", G.masked_adamw_,
         ([torch.empty(0, 2)], [torch.empty(0, 2)], [torch.empty(0, 2)], [torch.empty(0, 2)],
          [torch.empty(0, dtype=torch.uint8)], 0.1, 0.01, 0.9, 0.999, 1e-8, 0.0, [0.1], [0.03], False)),
        ("obs_select/size0", G.obs_select, (torch.ones(0, 8), torch.ones(0, 8), 4, 2, 3, 0.0)),
        ("obs_select/strided", G.obs_select, (torch.randn(3, 11)[:, :8], torch.rand(8, 3).t() + 0.5, 4, 1, 2, 0.0)),
        ("obs_shared_prune/size0", G.obs_shared_prune,
         (torch.empty(0, 4), torch.eye(4), torch.eye(1).expand(2, 2, 1, 1).contiguous(), torch.tensor([[0], [1]]),
          2, True)),
        ("obs_sweep_/size0", G.obs_sweep_,
         (torch.empty(0, 3), torch.empty(0, 3), torch.empty(0, 0), torch.empty(0, 3, dtype=torch.bool), 0, 0)),
        ("projection_matrix_/size0", G.projection_matrix_, (torch.empty(0, 5), 3, 1, 8, 0, 0)),
        ("projection_matrix_/strided", G.projection_matrix_,
         (torch.empty(6, 4, dtype=torch.float16).t(), 3, 0, 8, 1, 1)),
        ("project_flat/size0", G.project_flat, (torch.empty(0, 7), 5, 3, 0, 0)),
        ("project_flat/transposed", G.project_flat, (torch.randn(9, 2).t(), 5, 3, 1, 4)),
        ("factored_project/size0", G.factored_project,
         (torch.empty(0, 3), torch.empty(0, 2), torch.randn(2, 4), torch.randn(3, 4), None, None, 2)),
        ("score_topk/size0", G.score_topk, (torch.empty(0, 3), torch.randn(5, 3), 2, True, None, None, None, 0)),
        ("score_topk/no_keys", G.score_topk, (torch.randn(2, 3), torch.empty(0, 3), 3, False, None, None, None, 7)),
        ("score_topk/transposed", G.score_topk,
         (torch.randn(3, 2).t(), torch.randn(3, 6).t().half(), 4, True, torch.rand(12)[::2], None, None, 0)),
    ]
    return cases


_CASES = _edge_opcheck_cases()


@pytest.mark.parametrize("label,op,args", _CASES, ids=[c[0] for c in _CASES])
def test_opcheck_edge_shapes(label, op, args):
    """Gap: the ops' opchecks used ordinary shapes; these run the schema and fake-tensor checks (the fake impl's
    shape / dtype / strides against the real kernel's) on size-0 / size-1 / non-contiguous arguments."""
    torch.library.opcheck(op, args, test_utils=_FAKE)

"""s34 audit of gradkit.scope (BlockSpec / ScopeSpec / couplings, N:M helpers) and the scope ops it calls.

Every selection is compared against an explicit plain-torch oracle written here (not the library's reference
module): the weight is unfolded into blocks, p-norms are taken in float64, each scope keeps its nnz best
blocks (equal scores: lowest in-scope index; ``ties="keep"``: every block >= the nnz-th largest; NaN never
kept). Inputs are integer-valued wherever ranks matter, so float32 sums are exact and the float64 oracle
ranks exactly as the float32 kernels must.

Tests marked ``# DEFECT:`` fail on the current code and assert what the library should do.
"""
import math
import os

import numpy as np
import pytest
import torch

from gradkit import _ext, golden, ops
from gradkit.kernels.reference import scope as R
from gradkit.scope import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec, View, check_nm

from conftest import use_backend

pytestmark = [pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                         "ignore:invalid value encountered:RuntimeWarning",
                                         "ignore:divide by zero encountered:RuntimeWarning")]

INF = float("inf")
NAN = float("nan")
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- the plain-torch oracle


def _unfold(x, bs):
    """(*grid, elements per block) float64 copy of x."""
    x = x.detach().to(torch.float64)
    nd = x.dim()
    inter = []
    for n, b in zip(x.shape, bs):
        inter += [n // b, b]
    v = x.contiguous().reshape(inter).permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    return v.reshape(*[n // b for n, b in zip(x.shape, bs)], -1)


def norms64(x, bs, p):
    v = _unfold(x, bs).abs()
    if math.isinf(p):
        return v.amax(-1)
    return v.pow(p).sum(-1).pow(1.0 / p)


def _rows(g, ss):
    nd = g.dim()
    inter = []
    for n, s in zip(g.shape, ss):
        inter += [n // s, s]
    v = g.reshape(inter).permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    return v.reshape(-1, math.prod(ss))


def _unrows(r, grid, ss):
    nd = len(grid)
    v = r.reshape([n // s for n, s in zip(grid, ss)] + list(ss))
    perm = []
    for i in range(nd):
        perm += [i, nd + i]
    return v.permute(perm).reshape(grid)


def _select(rows, nnz, keep_ties):
    keep = torch.zeros(rows.shape, dtype=torch.bool)
    for r in range(rows.shape[0]):
        vals = rows[r].tolist()
        valid = [i for i, v in enumerate(vals) if not math.isnan(v)]
        order = sorted(valid, key=lambda i: (-vals[i], i))
        if nnz == 0:
            continue
        if keep_ties and len(order) >= nnz:
            kth = vals[order[nnz - 1]]
            chosen = [i for i in valid if vals[i] >= kth]
        else:
            chosen = order[:nnz]
        keep[r, chosen] = True
    return keep


def block_keep_oracle(x, bs, ss, nnz, p=2.0, keep_ties=False):
    g = norms64(x, bs, p)
    ss = [g.shape[i] if s == -1 else s for i, s in enumerate(ss)]
    return _unrows(_select(_rows(g, ss), nnz, keep_ties), list(g.shape), ss)


def expand(m, bs):
    v = m
    for i in range(len(bs)):
        v = v.unsqueeze(2 * i + 1)
    inter = []
    for n, b in zip(m.shape, bs):
        inter += [n, b]
    return v.expand(inter).reshape([n * b for n, b in zip(m.shape, bs)])


def ints(shape, dtype=torch.float32, seed=0, lo=-8, hi=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g).to(dtype)


# --------------------------------------------------------------------------- selection vs the oracle

LAYOUTS = [
    ((12,), (2,), (3,)),                      # 1-D
    ((12,), (1,), (-1,)),                     # 1-D, one scope (-1)
    ((4, 6, 8), (1, 2, 2), (2, 1, -1)),       # 3-D
    ((8, 4, 3, 3), (1, 1, 3, 3), (-1, 1, 1, 1)),  # conv: kernels compete along out-channels
    ((8, 4, 3, 3), (1, 4, 1, 1), (1, 1, 3, 3)),   # conv: in-channel columns compete per filter
    ((6, 8), (1, 1), (1, 4)),                 # 2:4-style N:M
    ((6, 8), (-1, 2), (1, -1)),               # whole-column blocks, one scope
]


@pytest.mark.parametrize("shape,bs,ss", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_masks_keep_and_hard_threshold_match_the_oracle(shape, bs, ss, dtype):
    x = ints(shape, dtype, seed=len(shape) * 7 + sum(bs))
    for p in (1, 2, INF, 0.5):
        b = BlockSpec(x, bs)
        s = ScopeSpec(b, ss)
        n = s.numblk_per_scope()
        for nnz in sorted({0, 1, n // 2, n}):
            for ties in ("exact", "keep"):
                want = block_keep_oracle(x, b.shape, list(s.shape), nnz, p, ties == "keep")
                assert torch.equal(s.block_keep(nnz, ties=ties, p=p), want), (p, nnz, ties)
                assert torch.equal(s.get_masks(nnz, ties=ties, p=p)[b], expand(want, b.shape)), (p, nnz, ties)
                y = x.clone()
                keep = ScopeSpec(BlockSpec(y, bs), ss).hard_threshold(nnz=nnz, ties=ties, p=p)
                assert torch.equal(keep, want)
                assert torch.equal(y, torch.where(expand(want, b.shape), x, torch.zeros_like(x)))
                if ties == "exact":  # an N:M pattern always holds
                    assert bool((_rows(want, list(s.shape)).sum(1) == nnz).all())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("p", [1, 2, INF, 0.5, 3])
def test_block_norms_match_float64(dtype, p):
    x = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = BlockSpec(x, (1, 2, 3, 3)).norms(p=p)
    assert got.dtype == dtype
    want = norms64(x, (1, 2, 3, 3), p)
    tol = {torch.float32: 2e-6, torch.float64: 1e-13, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)


def test_nan_inf_and_signed_zero_selection():
    x = torch.tensor([NAN, INF, -0.0, 0.0, -INF, 1.0, NAN, 2.0])
    s = ScopeSpec(BlockSpec(x, (1,)), (-1,))
    for nnz in range(9):
        for ties in ("exact", "keep"):
            want = block_keep_oracle(x, [1], [8], nnz, 2, ties == "keep")
            assert torch.equal(s.block_keep(nnz, ties=ties), want), (nnz, ties)
            # NaN never kept, whatever nnz
            assert not s.block_keep(nnz, ties=ties)[torch.isnan(x)].any()
    # -0.0 and 0.0 tie: the lower index wins; keep_ties keeps both
    z = torch.tensor([0.0, -0.0, -0.0, 0.0])
    assert ops.scope_mask(z, [1], [4], 1).tolist() == [True, False, False, False]
    assert ops.scope_mask(z, [1], [4], 1, keep_ties=True).all()
    # fewer valid blocks than nnz: -inf from kth, every valid block kept
    assert float(ScopeSpec(BlockSpec(x, (1,)), (-1,)).kth_largest(nnz=7)) == -INF


@pytest.mark.parametrize("dtype,big", [(torch.float16, 1024.0), (torch.bfloat16, 256.0)])
def test_half_weights_rank_by_float32_scores(dtype, big):
    # both blocks' norms round to `big` in the weight's dtype; the float32 scores differ (big^2 vs big^2 + 1)
    x = torch.tensor([[big, 0.0, big, 1.0]], dtype=dtype)
    assert torch.equal(ops.block_norms(x, [1, 2]).float(), torch.tensor([[big, big]]))
    s = ScopeSpec(BlockSpec(x, (1, 2)), (1, -1))
    assert s.block_keep(1).tolist() == [[False, True]]
    assert ScopeCoupling([s]).joint_keep(1).reshape(-1).tolist() == [False, True]
    assert ScopeSpec(BlockCoupling([BlockSpec(x, (1, 2))]), (1, -1)).block_keep(1).tolist() == [[False, True]]


def test_one_huge_scope_path_matches_the_oracle():
    # > 65536 blocks in one scope: the radix-select path (ScopeSpec and ScopeCoupling)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (256, 520), generator=g).float()
    x.view(-1)[torch.randint(0, x.numel(), (500,), generator=g)] = NAN
    x.view(-1)[torch.randint(0, x.numel(), (50,), generator=g)] = INF
    for bs, p in (((1, 1), 2.0), ((1, 2), INF), ((1, 2), 1.0)):
        s = ScopeSpec(BlockSpec(x.clone(), bs), (-1, -1))
        n = s.numblk_per_scope()
        assert n > 1 << 16
        for nnz in (0, 1, 1000, n // 2, n):
            want = block_keep_oracle(x, list(bs), [-1, -1], nnz, p)
            assert torch.equal(s.block_keep(nnz, p=p), want), (bs, p, nnz)
            assert torch.equal(s.get_masks(nnz, p=p)[s.block], expand(want, list(bs)))
            assert torch.equal(ScopeCoupling([s]).joint_keep(nnz, p=p).reshape(want.shape), want)


# --------------------------------------------------------------------------- thresholds


def _soft_oracle(x, bs, t, h=None):
    """The group-lasso prox in float64: Euclidean closed form, or the diagonal-metric one with mu found by
    200 bisection steps (mu ||h x / (h + mu)|| = t)."""
    xb = _unfold(x, bs)
    grid = list(xb.shape[:-1])
    t = t.double().reshape(*grid, 1)
    if h is None:
        n = xb.norm(dim=-1, keepdim=True)
        y = xb * (1 - t / n).clamp(min=0)
    else:
        hb = _unfold(h, bs)
        hw = hb * xb
        big = hw.norm(dim=-1, keepdim=True)
        lo = torch.zeros_like(big)
        hi = t * hb.amax(-1, keepdim=True) / (big - t).clamp(min=1e-300)
        for _ in range(200):
            mu = (lo + hi) / 2
            f = mu * (hw / (hb + mu)).norm(dim=-1, keepdim=True)
            lo, hi = torch.where(f < t, mu, lo), torch.where(f < t, hi, mu)
        y = torch.where(big > t, hw / (hb + (lo + hi) / 2), torch.zeros_like(hw))
    nd = x.dim()
    y = y.reshape(*grid, *bs)
    perm = []
    for i in range(nd):
        perm += [i, nd + i]
    return y.permute(perm).reshape(x.shape)


@pytest.mark.parametrize("shape,bs", [((6, 8), (2, 4)), ((4, 3, 3, 3), (1, 3, 3, 3)), ((10,), (5,)), ((6, 8), (1, 1))])
@pytest.mark.parametrize("cond", [False, True])
def test_soft_threshold_against_a_float64_bisection(shape, bs, cond):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand([n // b for n, b in zip(shape, bs)], generator=g, dtype=torch.float64) * 2
    h = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1 if cond else None
    want = _soft_oracle(x, bs, t, h)
    # converged (atol 0, many halvings): float64 round-off only
    y = x.clone()
    BlockSpec(y, bs).soft_threshold(t, conditioners=h, max_iter=200, atol=0.0, eps=0.0)
    torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-13)
    # the defaults (20 halvings): within the bracket the docstring promises
    y = x.clone()
    BlockSpec(y, bs).soft_threshold(t, conditioners=h, eps=0.0)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)
    # float32 weights: float32 round-off
    y = x.float()
    ScopeSpec(BlockSpec(y, bs)).block.soft_threshold(t.float(), conditioners=None if h is None else h.float(),
                                                     max_iter=60, atol=0.0, eps=0.0)
    torch.testing.assert_close(y.double(), _soft_oracle(x.float(), bs, t.float(), None if h is None else h.float()),
                               rtol=0, atol=2e-6)


def test_hard_threshold_by_thresholds_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        x = ints((4, 8), dtype, seed=5)
        x[1, 2] = NAN
        t = torch.tensor([[3.0, 5.0], [0.0, 7.0], [INF, -INF], [4.0, 4.0]], dtype=dtype)
        y = x.clone()
        keep = ScopeSpec(BlockSpec(y, (1, 2)), (1, 2)).hard_threshold(thresholds=t)
        n = norms64(x, (1, 2), 2)
        want = n >= ScopeSpec(BlockSpec(x, (1, 2)), (1, 2)).scope_to_block(t).double()  # NaN norm: never kept
        assert torch.equal(keep, want)
        assert torch.equal(y, torch.where(expand(want, (1, 2)), x, torch.zeros_like(x)))


# --------------------------------------------------------------------------- counting and refusals


def test_sparsity_to_nnz_floor_rule_and_bounds():
    s = ScopeSpec(BlockSpec(torch.zeros(1, 100), (1, 1)), (1, -1))
    for sp, nnz in [(0, 100), (1, 0), (0.0, 100), (1.0, 0), (-0.0, 100), (0.29, 71), (0.57, 43), (0.5, 50),
                    (0.005, 100), (0.0149, 99), (0.999, 1), (0.99, 1), (np.float64(0.25), 75)]:
        assert s.sparsity_to_nnz(sp) == nnz, sp
    s3 = ScopeSpec(BlockSpec(torch.zeros(3), (1,)), (-1,))
    assert [s3.sparsity_to_nnz(v) for v in (1 / 3, 2 / 3, 0.3333, 0.6666666)] == [2, 1, 3, 2]
    for bad in (-1e-300, 1.0000000000000002, NAN, INF, -INF, True, "0.5", None):
        with pytest.raises(ValueError, match="sparsity"):
            s.sparsity_to_nnz(bad)


def test_shapes_that_do_not_divide_are_refused_by_name():
    w = torch.zeros(6, 10)
    with pytest.raises(ValueError, match=r"dim 1: size 10 not divisible by block shape\[1\]=4"):
        BlockSpec(w, (1, 4))
    with pytest.raises(ValueError, match="dims but the tensor"):
        BlockSpec(w, (1,))
    # N:M with M not dividing the row
    with pytest.raises(ValueError, match=r"dim 1: block grid \(6, 10\) not divisible by scope shape \(1, 4\)"):
        ScopeSpec(BlockSpec(w, (1, 1)), (1, 4))
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        check_nm(torch.ones(6, 10, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="keeps 3 > 2"):
        check_nm(torch.tensor([[True, True, True, False]]), 2, 4)
    s = ScopeSpec(BlockSpec(w, (1, 2)), (1, 5))
    for nnz in (-1, 6):
        with pytest.raises(ValueError, match="nnz"):
            s.get_masks(nnz)
    with pytest.raises(ValueError, match="p:"):
        s.get_masks(1, p=0)
    with pytest.raises(ValueError, match="ties"):
        s.get_masks(1, ties="all")


def test_non_contiguous_weights():
    # the ops take any strided x (channels_last conv, transposed), matching the oracle
    w = ints((8, 4, 3, 3), seed=9).to(memory_format=torch.channels_last)
    assert not w.is_contiguous()
    want = block_keep_oracle(w, [1, 4, 1, 1], [1, 1, 3, 3], 4)
    assert torch.equal(ops.scope_mask(w, [1, 4, 1, 1], [1, 1, 3, 3], 4, expand=False), want)
    y = w.clone(memory_format=torch.channels_last)
    ops.scope_hard_threshold_(y, [1, 4, 1, 1], [1, 1, 3, 3], 4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, torch.where(expand(want, [1, 4, 1, 1]), w, torch.zeros_like(w)))
    base = ints((16, 6), seed=10)
    wt = base.t()
    want = block_keep_oracle(wt, [3, 2], [1, 8], 3)
    ops.scope_hard_threshold_(wt, [3, 2], [1, 8], 3)
    assert torch.equal(base.t(), torch.where(expand(want, [3, 2]), ints((16, 6), seed=10).t(), torch.zeros(6, 16)))
    # BlockSpec documents a contiguous parameter (View's linear offsets): refused by name, not mis-addressed
    with pytest.raises(ValueError, match="param must be contiguous"):
        BlockSpec(w, (1, 4, 1, 1))
    with pytest.raises(ValueError, match="param must be contiguous"):
        BlockSpec(torch.zeros(4, 8).expand(3, 4, 8), (1, 1, 2))


def test_in_place_ops_refuse_a_grad_leaf_and_bump_its_version():
    for call in (lambda w: ops.scope_hard_threshold_(w, [1, 1], [1, 4], 2),
                 lambda w: ops.block_apply_mask_(w, [1, 4], torch.ones(4, 2, dtype=torch.bool)),
                 lambda w: ops.block_soft_threshold_(w, [1, 4], torch.zeros(4, 2))):
        w = torch.randn(4, 8, requires_grad=True)
        snap = w.detach().clone()
        with pytest.raises(RuntimeError, match="requires grad"):
            call(w)
        assert torch.equal(w.detach(), snap)
        loss = (w * w).sum()
        v0 = w._version
        with torch.no_grad():
            call(w)
        assert w._version > v0
        with pytest.raises(RuntimeError):
            loss.backward()
    # through the spec API on a Parameter (View.data is detached but shares the counter)
    p = torch.nn.Parameter(torch.randn(4, 8))
    loss = (p * p).sum()
    ScopeSpec(BlockSpec(p, (1, 1)), (1, 4)).hard_threshold(nnz=2)
    with pytest.raises(RuntimeError):
        loss.backward()


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_in_place_ops_refuse_internal_overlap_before_writing(backend):
    buf = torch.arange(1.0, 9.0)
    x = buf.expand(3, 8)
    snap = buf.clone()
    with use_backend(backend):
        for call in (lambda: ops.scope_hard_threshold_(x, [1, 1], [1, 4], 1),
                     lambda: ops.block_apply_mask_(x, [1, 4], torch.zeros(3, 2, dtype=torch.bool)),
                     lambda: ops.block_soft_threshold_(x, [1, 4], torch.full((3, 2), 100.0))):
            with pytest.raises(RuntimeError, match="more than one element"):
                call()
            assert torch.equal(buf, snap)


# --------------------------------------------------------------------------- backends, opcheck, compile


def test_triton_interpreter_native_and_reference_agree_on_odd_layouts():
    if os.environ.get("TRITON_INTERPRET") != "1" or ops.triton_family("scope") is None:
        pytest.skip("Triton interpreter not available")
    g = torch.Generator().manual_seed(1)
    x16 = torch.tensor([[1024.0, 0.0, 1024.0, 1.0]], dtype=torch.float16)
    for b in ("triton", "native", "reference"):
        with use_backend(b):
            assert ops.scope_mask(x16, [1, 2], [1, 2], 1).tolist() == [[False, False, True, True]], b
    for shape, bs, ss in (((4, 2, 3, 3), (1, 2, 3, 3), (4, 1, 1, 1)), ((3, 5, 7), (1, 5, 1), (3, 1, 7)),
                          ((9,), (3,), (3,))):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randint(-4, 5, shape, generator=g).to(dtype)
            x.view(-1)[3] = NAN
            x.view(-1)[7] = -0.0
            nb = math.prod(ss)
            for p in (0.5, 2.0, INF):
                out = {}
                for b in ("triton", "native"):
                    with use_backend(b):
                        out[b] = [ops.block_norms(x, list(bs), p)] + [
                            ops.scope_mask(x, list(bs), list(ss), nnz, p=p, keep_ties=kt, expand=False)
                            for nnz in (0, 1, nb) for kt in (False, True)]
                want = [block_keep_oracle(x, bs, ss, nnz, p, kt) for nnz in (0, 1, nb) for kt in (False, True)]
                for b in out:
                    torch.testing.assert_close(out[b][0].double(), norms64(x, bs, p).to(dtype).double(),
                                               rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=0, equal_nan=True)
                    for got, w in zip(out[b][1:], want):
                        assert torch.equal(got, w), (b, shape, dtype, p)


def test_soft_threshold_backends_agree_for_max_iter_edges():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, generator=g)
    h = torch.rand(6, 8, dtype=torch.float64, generator=g) + 0.2
    t = torch.rand(3, 2, dtype=torch.float64, generator=g)
    backends = ["native", "reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for mi, atol in ((0, 1e-8), (1, 0.0), (3, 0.0), (20, 1e9), (50, 0.0)):
        outs = {}
        for b in backends:
            with use_backend(b):
                y = x.clone()
                ops.block_soft_threshold_(y, [2, 4], t, conditioner=h, max_iter=mi, atol=atol, eps=0.0)
                outs[b] = y
        for b in backends:
            torch.testing.assert_close(outs[b], outs["reference"], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(outs["reference"], _soft_oracle(x, (2, 4), t, h), rtol=1e-12, atol=1e-12)


def test_zeroed_blocks_are_positive_zero_on_every_backend():
    x = -torch.arange(1.0, 17.0).reshape(2, 8)
    for b in ("native", "reference"):
        with use_backend(b):
            y = x.clone()
            ops.scope_hard_threshold_(y, [1, 1], [1, 4], 1)
            z = x.clone()
            ops.block_apply_mask_(z, [1, 2], torch.zeros(2, 4, dtype=torch.bool))
            assert not torch.signbit(y[y == 0]).any() and not torch.signbit(z).any()


def test_opcheck_odd_shapes():
    G = torch.ops.gradkit
    x4 = torch.randn(4, 6, 3, 3).to(memory_format=torch.channels_last)
    xt = torch.randn(16, 6).t()
    x1 = torch.randn(12)
    xh = torch.randn(6, 8).half()
    x0 = torch.randn(0, 4)
    for x, bs, ss in ((x4, [1, 2, 3, 3], [4, 1, 1, 1]), (xt, [3, 2], [1, 8]), (x1, [3], [2]), (xh, [1, 2], [2, 2]),
                      (x0, [1, 2], [1, 2])):
        grid = [n // b for n, b in zip(x.shape, bs)]
        cases = [(G.block_norms, (x, bs, 0.5)),
                 (G.scope_mask, (x, bs, ss, 1, INF, False, False, True)),
                 (G.scope_mask, (x, bs, ss, 1, 1.0, False, True, False)),
                 (G.scope_hard_threshold_, (x.clone(memory_format=torch.preserve_format), None, bs, ss, 1, 2.0, False)),
                 (G.block_apply_mask_, (x.clone(memory_format=torch.preserve_format), bs, torch.rand(grid) < 0.5)),
                 (G.block_soft_threshold_, (x.clone(memory_format=torch.preserve_format), bs,
                                            torch.rand(grid, dtype=x.dtype), None, 5, 1e-8, 1e-7))]
        if x.numel():
            cases.append((G.scope_kth, (x, bs, ss, 1, 2.0, False, 0.5, True)))
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_compile_dynamic_conv_shapes():
    G = torch.ops.gradkit

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def f(w):
        n = G.block_norms(w, [1, 2, 3, 3], 0.5)
        m = G.scope_mask(w, [1, 2, 3, 3], [2, 1, 1, 1], 1, 0.5, False, False, True)
        return n, w * m

    for shape in ((4, 6, 3, 3), (6, 2, 3, 3)):
        w = ints(shape, seed=shape[0]).to(memory_format=torch.channels_last)
        n, y = f(w)
        torch.testing.assert_close(n.double(), norms64(w, [1, 2, 3, 3], 0.5), rtol=1e-6, atol=0)
        assert torch.equal(y, w * expand(block_keep_oracle(w, [1, 2, 3, 3], [2, 1, 1, 1], 1, 0.5), [1, 2, 3, 3]))


# --------------------------------------------------------------------------- defects


@pytest.mark.parametrize("dtype,w,t,keep", [
    # bf16 block of norm 257.12 (true) rounds to 258; t = 257.5 must zero it
    (torch.bfloat16, [256.0, 24.0, 0.0, 0.0], 257.5, False),
    # fp16 block of norm 2048.9998 rounds to 2048; t = 2048.5 must keep it
    (torch.float16, [2048.0, 64.0, 0.0, 0.0], 2048.5, True),
])
def test_hard_threshold_by_thresholds_compares_unrounded_norms(dtype, w, t, keep):
    # DEFECT: BlockSpec.hard_threshold (and ScopeSpec.hard_threshold(thresholds=), which calls it) compares the
    # thresholds with norms rounded to the half weight's dtype (scope.py:487, self.norms), so a block below its
    # threshold survives (or one above it is zeroed), and the result differs from BlockCoupling /
    # ScopeCoupling of the very same spec, which compare float32 norms.
    W = torch.tensor([w], dtype=dtype)
    assert (float(torch.tensor(w, dtype=torch.float64).norm()) >= t) == keep
    thr = torch.tensor([[t]])
    results = {}
    for kind in ("coupling", "scope_coupling", "block", "scope"):
        x = W.clone()
        b = BlockSpec(x, (1, 4))
        if kind == "block":
            k = b.hard_threshold(thr)
        elif kind == "scope":
            k = ScopeSpec(b, (1, 1)).hard_threshold(thresholds=thr)
        elif kind == "coupling":
            k = BlockCoupling([b]).hard_threshold(thr)
        else:
            k = ScopeCoupling([ScopeSpec(b, (1, 1))]).hard_threshold(thresholds=thr)
        results[kind] = (bool(k.reshape(-1)[0]), bool(x.any()))
    assert results == {k: (keep, keep) for k in results}, results


@pytest.mark.parametrize("shape,stride", [((2,), (0,)), ((4, 2), (1, 0)), ((2, 2), (1, 1)), ((2, 3), (2, 1))])
def test_view_refuses_a_view_that_covers_an_element_twice(shape, stride):
    # DEFECT: View's construction check (scope.py:217, `reach = -1`) lets zero strides and equal strides
    # through, although its docstring says construction refuses a view that covers an element twice; such a
    # View is then only refused by the in-place kernels (a generic torch message), and its read-side masks
    # (get_masks(format="param")) silently let the last of two view positions win: with W = [2, 1, 0.5] and
    # View(W, (2, 2), (1, 1)), nnz=1 per row prunes W[1] in row 0 and keeps it in row 1; the param mask keeps it.
    W = torch.arange(1.0, 9.0)
    with pytest.raises(ValueError, match="covers some elements twice"):
        View(W, shape, stride)


def test_view_still_accepts_non_overlapping_pairings():
    W = torch.zeros(32, 32)
    View.pairs(W)
    View.row_pairs(W)
    View(W, (32, 2, 16), (32, 1, 2))
    View(torch.zeros(8), (2, 2), (4, 1), offset=0)


def test_check_nm_accepts_an_empty_mask():
    # DEFECT: check_nm (scope.py:1173) reshapes with -1, which is ambiguous for a tensor with 0 elements:
    # RuntimeError on an empty (0, 4) mask, though the function guards counts.numel() for that very case
    # (an empty mask trivially satisfies every N:M pattern).
    check_nm(torch.zeros(0, 4, dtype=torch.bool), 2, 4)
    check_nm(torch.zeros(3, 0, dtype=torch.bool), 2, 4)


@pytest.mark.parametrize("m", [0, -4])
def test_check_nm_refuses_a_non_positive_m_by_name(m):
    # DEFECT: check_nm never validates m: m = 0 raises ZeroDivisionError, m = -4 torch's reshape RuntimeError.
    with pytest.raises(ValueError, match="m"):
        check_nm(torch.ones(2, 8, dtype=torch.bool), 2, m)


def test_spec_methods_accept_numpy_integers_as_ops_do():
    # DEFECT: SparseScope._check_nnz (scope.py:756) and mid_kth_largest (scope.py:844) accept only Python ints,
    # while ops._int (which the ops use, and whose docstring says "an argument that one accepts the others accept
    # too") takes numpy integers: ops.scope_mask(..., np.int64(2)) works, ScopeSpec.get_masks(np.int64(2)) raises
    # TypeError, and mid_kth_largest's message contradicts itself ("expected 1 <= nnz < 4, got np.int64(2)").
    W = ints((4, 8), seed=2)
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    want = s.get_masks(2)[s.block]
    assert torch.equal(ops.scope_mask(W, [1, 1], [1, 4], np.int64(2)), want)
    assert torch.equal(s.get_masks(np.int64(2))[s.block], want)
    assert torch.equal(s.block_keep(np.int32(2)), s.block_keep(2))
    assert torch.equal(s.kth_largest(nnz=np.int64(2)), s.kth_largest(nnz=2))
    assert torch.equal(s.mid_kth_largest(nnz=np.int64(2)), s.mid_kth_largest(nnz=2))
    assert torch.equal(ScopeCoupling([s]).joint_keep(np.int64(2)), ScopeCoupling([s]).joint_keep(2))


def test_sparsity_to_nnz_accepts_numpy_scalars_as_golden_does():
    # DEFECT: sparsity_to_nnz (scope.py:749) checks isinstance(sparsity, (int, float)), so np.float32(0.5) is
    # refused with "expected a number in [0, 1], got np.float32(0.5)"; its docstring ties it to golden's
    # percent_to_k rule, whose check takes numbers.Real (numpy float32 / int scalars).
    assert golden.percent_to_k(100, np.float32(50)) == 50
    s = ScopeSpec(BlockSpec(torch.zeros(1, 100), (1, 1)), (1, -1))
    assert s.sparsity_to_nnz(np.float32(0.5)) == 50
    assert s.sparsity_to_nnz(np.int64(1)) == 0


def test_p_accepts_numpy_float32():
    # DEFECT: ops._check_p (ops/__init__.py:497) checks isinstance(p, (int, float)): p = np.float32(2.0) is refused
    # with the self-contradicting "p: expected a positive number or inf, got np.float32(2.0)".
    W = ints((4, 8), seed=4)
    assert torch.equal(ops.block_norms(W, [1, 2], np.float32(2.0)), ops.block_norms(W, [1, 2], 2.0))
    s = ScopeSpec(BlockSpec(W, (1, 2)), (1, 4))
    assert torch.equal(s.block_keep(1, p=np.float32(1.0)), s.block_keep(1, p=1.0))


def test_whole_dim_spans_on_an_empty_parameter():
    # DEFECT: -1 ("the whole dim") resolves to 0 on a zero-size dim and is then refused as "not divisible by ...=0"
    # (scope.py:380-383 in BlockSpec, 781-784 in ScopeSpec): ScopeSpec(BlockSpec(torch.empty(0, 8))) - the
    # default, all-spanning scope - fails on any empty parameter, although explicit shapes work there and every
    # op handles empty tensors.
    W = torch.empty(0, 8)
    s = ScopeSpec(BlockSpec(W, (1, 4)), (1, 2))  # explicit shapes: fine
    assert s.get_masks(1)[s.block].shape == (0, 8)
    b = BlockSpec(W, (1, 4))
    s = ScopeSpec(b)
    assert s.get_masks(1)[b].shape == (0, 8)
    assert BlockSpec(W, (-1, 4)).grid_shape[1] == 2

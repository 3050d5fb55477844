"""s40 audit of gradkit.scope (View / BlockSpec / BlockCoupling / ScopeSpec / ScopeCoupling) and its SparseKit
drop-in, gradkit.compat.sparsekit.

Selections are checked against plain-torch oracles written here: float64 block norms, the nnz best blocks per
scope (equal scores: lowest in-scope index; ``ties="keep"``: every block >= the nnz-th largest). Couplings are
checked with permuted ``orders`` (the coupled grid of spec i is its grid permuted by orders[i]; within an aligned
scope, the specs' blocks in list order, each spec's in its own row-major scope order).

The tests named ``*_defect_*`` failed before this session's fixes in gradkit/scope.py and compat/sparsekit.py.
"""
import math

import pytest
import torch
from torch import nn

import gradkit.compat.sparsekit as gk
from gradkit import _ext
from gradkit.scope import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec, View

from conftest import use_backend

import sparsekit as sk  # noqa: E402  (installed wherever the suite runs)
import sparsekit.tensor_ops as sk_ops  # noqa: E402
from test_audit_s34_scope import _select

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")


@pytest.fixture(params=["native", "reference"])
def backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.fixture
def sparsekit_on_cpu(monkeypatch):
    """SparseKit 0.1.5 sends CPU tensors to Triton when triton imports; its torch path is the CPU user's."""
    monkeypatch.setattr(sk_ops, "_kth_largest_impl",
                        lambda x, k, dim=-1, **kw: torch.kthvalue(x, x.shape[dim] - k + 1, dim=dim).values)


def rn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def ints(shape, seed, lo=-3, hi=3):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed)).float()


# --------------------------------------------------------------------------- oracle


def unfold(x, bs):
    """(*grid, elements per block) float64 copy of x."""
    x = x.detach().double()
    nd = x.dim()
    inter = [v for n, b in zip(x.shape, bs) for v in (n // b, b)]
    v = x.contiguous().reshape(inter).permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    return v.reshape(*[n // b for n, b in zip(x.shape, bs)], -1)


def norms(x, bs, p=2.0):
    u = unfold(x, bs).abs()
    return u.amax(-1) if math.isinf(p) else u.pow(p).sum(-1).pow(1.0 / p)


def scope_rows(g, ss):
    """(*scope grid, blocks per scope), each scope's blocks row-major."""
    nd = g.dim()
    inter = [v for n, s in zip(g.shape, ss) for v in (n // s, s)]
    v = g.reshape(inter).permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    return v.reshape(*[n // s for n, s in zip(g.shape, ss)], -1)


def unrows(k, grid, ss):
    nd = len(grid)
    v = k.reshape(*[n // s for n, s in zip(grid, ss)], *ss)
    perm = [x for i in range(nd) for x in (i, nd + i)]
    return v.permute(perm).reshape(grid)


def select(rows, nnz, keep_ties=False):
    """test_audit_s34_scope's row oracle over every leading dim."""
    return _select(rows.reshape(-1, rows.shape[-1]), nnz, keep_ties).reshape(rows.shape)


def grid_keep(g, ss, nnz, keep_ties=False):
    ss = [g.shape[i] if s == -1 else s for i, s in enumerate(ss)]
    return unrows(select(scope_rows(g, ss), nnz, keep_ties), list(g.shape), ss)


def expand(m, bs):
    for d, b in enumerate(bs):
        m = m.repeat_interleave(b, d)
    return m


# --------------------------------------------------------------------------- couplings with permuted orders


@pytest.mark.parametrize("ss", [(2, 1, 1), (-1, 1, 1), (1, 3, 2), (4, 3, 2), (1, 1, 1)])
def test_block_coupling_with_permuted_3d_grids_matches_the_oracle(ss, backend):
    for seed in range(2):
        a, b = rn((4, 6, 2), seed), rn((2, 3, 8), seed + 100)
        sa, sb = BlockSpec(a, (1, 2, 1)), BlockSpec(b, (1, 1, 2))  # grids (4, 3, 2) and (2, 3, 4)
        c = BlockCoupling([sa, sb], [(0, 1, 2), (2, 1, 0)])
        assert c.grid_shape == (4, 3, 2)
        g = (norms(a, (1, 2, 1)).pow(2) + norms(b, (1, 1, 2)).pow(2).permute(2, 1, 0)).sqrt()
        torch.testing.assert_close(c.norms().double(), g, rtol=1e-6, atol=0)
        s = ScopeSpec(c, ss)
        for nnz in range(s.numblk_per_scope() + 1):
            want = grid_keep(g, ss, nnz)
            assert torch.equal(s.block_keep(nnz), want), (ss, nnz)
            m = s.get_masks(nnz)
            assert torch.equal(m[sa], expand(want, (1, 2, 1)))
            assert torch.equal(m[sb], expand(want.permute(2, 1, 0), (1, 1, 2)))


@pytest.mark.parametrize("p", [1.0, math.inf])
@pytest.mark.parametrize("ties", ["exact", "keep"])
def test_couplings_with_permuted_orders_follow_the_tie_rules(p, ties, backend):
    """Integer data and p in {1, inf}: every score exact, so ties are real and the tie rule decides."""
    keep_ties = ties == "keep"
    for seed in range(3):
        a, b = ints((4, 6), seed), ints((3, 8), seed + 50)
        # a: grid (4, 3), scopes (2, 3) -> scope grid (2, 1); b: grid (1, 4), scopes (1, 2) -> (1, 2), order (1, 0)
        A, B = ScopeSpec(BlockSpec(a, (1, 2)), (2, 3)), ScopeSpec(BlockSpec(b, (3, 2)), (1, 2))
        C = ScopeCoupling([A, B], [(0, 1), (1, 0)])
        joint = torch.cat([scope_rows(norms(a, (1, 2), p), (2, 3)),
                           scope_rows(norms(b, (3, 2), p), (1, 2)).permute(1, 0, 2)], -1)
        for nnz in range(C.numblk_per_scope() + 1):
            k = select(joint, nnz, keep_ties)
            wa = expand(unrows(k[..., :6], (4, 3), (2, 3)), (1, 2))
            wb = expand(unrows(k[..., 6:].permute(1, 0, 2), (1, 4), (1, 2)), (3, 2))
            m = C.get_masks(nnz, ties=ties, p=p)
            assert torch.equal(m[A.block], wa) and torch.equal(m[B.block], wb), (seed, nnz)
            a2, b2 = a.clone(), b.clone()
            ScopeCoupling([ScopeSpec(BlockSpec(a2, (1, 2)), (2, 3)), ScopeSpec(BlockSpec(b2, (3, 2)), (1, 2))],
                          [(0, 1), (1, 0)]).hard_threshold(nnz=nnz, ties=ties, p=p)
            assert torch.equal(a2, a * wa) and torch.equal(b2, b * wb), (seed, nnz)
        # BlockCoupling: b2's grid (3, 4) -> (4, 3) by order (1, 0); p=1 sums, p=inf maxes the parts
        bb = ints((3, 8), seed + 99)
        c = BlockCoupling([BlockSpec(a, (1, 2)), BlockSpec(bb, (1, 2))], [(0, 1), (1, 0)])
        ga, gb = norms(a, (1, 2), p), norms(bb, (1, 2), p).t()
        g = torch.maximum(ga, gb) if math.isinf(p) else ga + gb
        assert torch.equal(c.norms(p=p).double(), g)
        for ss in [(1, -1), (2, 1), (-1, -1)]:
            s = ScopeSpec(c, ss)
            for nnz in range(s.numblk_per_scope() + 1):
                want = grid_keep(g, ss, nnz, keep_ties)
                assert torch.equal(s.block_keep(nnz, ties=ties, p=p), want), (seed, ss, nnz)


def test_scope_coupling_thresholds_and_kth_with_permuted_orders(backend):
    for seed in range(3):
        a, b = rn((8, 6), seed), rn((3, 16), seed + 50)
        # a: grid (8, 3), scopes (2, 3) -> (4, 1); b: grid (1, 8), scopes (1, 2) -> (1, 4), order (1, 0) -> (4, 1)
        mk = lambda x, y: ScopeCoupling([ScopeSpec(BlockSpec(x, (1, 2)), (2, 3)),  # noqa: E731
                                         ScopeSpec(BlockSpec(y, (3, 2)), (1, 2))], [(0, 1), (1, 0)])
        C = mk(a, b)
        assert C.grid_shape == (4, 1)
        joint = torch.cat([scope_rows(norms(a, (1, 2)), (2, 3)), scope_rows(norms(b, (3, 2)), (1, 2)).permute(1, 0, 2)],
                          -1)
        srt = joint.sort(-1, descending=True).values
        for k in range(1, C.numblk_per_scope() + 1):
            kth = C.kth_largest(k)
            torch.testing.assert_close(kth.double(), srt[..., k - 1], rtol=1e-6, atol=0)
            keep = select(joint, k)  # the k-th largest float32 score keeps the k best (tie-free)
            wa = expand(unrows(keep[..., :6], (8, 3), (2, 3)), (1, 2))
            wb = expand(unrows(keep[..., 6:].permute(1, 0, 2), (1, 8), (1, 2)), (3, 2))
            a2, b2 = a.clone(), b.clone()
            mk(a2, b2).hard_threshold(thresholds=kth)
            assert torch.equal(a2, a * wa) and torch.equal(b2, b * wb)
        if seed == 0:
            t = torch.rand(4, 1, generator=torch.Generator().manual_seed(7))
            a2, b2 = a.clone(), b.clone()
            mk(a2, b2).soft_threshold(t)
            eps = torch.finfo(torch.float32).eps
            ea = a.double().reshape(4, 2, 3, 2)  # scope row r: a's rows 2r, 2r + 1
            sa = (1 - t.double().reshape(4, 1, 1, 1) / (ea.norm(dim=-1, keepdim=True) + eps)).clamp(min=0)
            eb = b.double().reshape(3, 4, 2, 2)  # b's block (0, j) lies in scope j // 2
            sb = (1 - t.double().reshape(1, 4, 1, 1) / (eb.norm(dim=(0, 3), keepdim=True) + eps)).clamp(min=0)
            torch.testing.assert_close(a2.double(), (ea * sa).reshape(8, 6), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b2.double(), (eb * sb).reshape(3, 16), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_coupling_soft_threshold_equals_one_spec_over_the_union(cond, dtype, backend):
    g = torch.Generator().manual_seed(0)
    a, b = rn((4, 4), 1, dtype), rn((4, 4), 2, dtype)
    ha, hb = (torch.rand(4, 4, generator=g, dtype=torch.float64).to(dtype) + 0.5 for _ in range(2))
    t = torch.rand(4, 2, generator=g, dtype=torch.float64).to(dtype) * 2
    union = lambda u, v: torch.cat([u.reshape(4, 2, 2), v.reshape(4, 2, 2)], -1).reshape(4, 8)  # noqa: E731
    a2, b2, x2 = a.clone(), b.clone(), union(a, b)
    sa, sb = BlockSpec(a2, (1, 2)), BlockSpec(b2, (1, 2))
    BlockCoupling([sa, sb]).soft_threshold(t, conditioners={sa: ha, sb: hb} if cond else None, max_iter=60,
                                           atol=1e-12)
    BlockSpec(x2, (1, 4)).soft_threshold(t, conditioners=union(ha, hb) if cond else None, max_iter=60, atol=1e-12)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(union(a2, b2), x2, rtol=tol, atol=tol)
    assert torch.equal(union(a2, b2) == 0, x2 == 0)


def test_one_scope_coupling_breaks_ties_as_the_scope_spec_does(backend):
    x = ints((6, 8), 3)
    for nnz in range(0, 7):
        s = ScopeSpec(BlockSpec(x, (2, 2)), (-1, 2))
        want = s.get_masks(nnz)[s.block]
        c = ScopeCoupling([ScopeSpec(BlockSpec(x, (2, 2)), (-1, 2))])
        assert torch.equal(c.get_masks(nnz)[c.scopes[0].block], want)
        assert torch.equal(want, expand(grid_keep(norms(x, (2, 2)), (-1, 2), nnz), (2, 2)))


def test_one_huge_scope_ties_go_to_the_lowest_position():
    a, b = torch.ones(300, 256), torch.ones(256, 300)  # 76800 coupled blocks > 1 << 16: the radix-select path
    s = ScopeSpec(BlockCoupling([BlockSpec(a), BlockSpec(b)], [(0, 1), (1, 0)]), (-1, -1))
    k = s.block_keep(1000).reshape(-1)
    assert int(k.sum()) == 1000 and bool(k[:1000].all())
    x, y = torch.ones(300, 256), torch.ones(300, 256)
    c = ScopeCoupling([ScopeSpec(BlockSpec(x), (-1, -1)), ScopeSpec(BlockSpec(y), (-1, -1))])
    m = c.get_masks(x.numel() + 5)
    assert bool(m[c.scopes[0].block].all()) and m[c.scopes[1].block].reshape(-1).nonzero().flatten().tolist() == \
        [0, 1, 2, 3, 4]


def test_compat_permuted_scope_coupling_matches_sparsekit(sparsekit_on_cpu):
    a, b = rn((4, 6), 3), rn((6, 4), 4)

    def build(L, x, y):
        return L.ScopeCoupling([L.ScopeSpec(L.BlockSpec(L.View.from_existing(x), (1, 2)), (1, -1)),
                                L.ScopeSpec(L.BlockSpec(L.View.from_existing(y), (2, 1)), (-1, 1))], [(0, 1), (1, 0)])

    for nnz in (1, 2, 4):
        a1, b1, a2, b2 = a.clone(), b.clone(), a.clone(), b.clone()
        build(sk, a1, b1).hard_threshold(nnz=nnz)
        build(gk, a2, b2).hard_threshold(nnz=nnz)
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
        s1, s2 = build(sk, a, b), build(gk, a, b)
        torch.testing.assert_close(s2.kth_largest(nnz), s1.kth_largest(nnz, None))
        for m1, m2 in zip(s1.get_masks(nnz).values(), s2.get_masks(nnz).values()):
            assert torch.equal(m1, m2)


# --------------------------------------------------------------------------- views


def test_transposed_offset_and_storage_offset_views(backend):
    W = rn((4, 6), 0)
    v = View(W, (6, 4), (1, 6))  # W.t(), in place
    assert torch.equal(v.data, W.t())
    s = ScopeSpec(BlockSpec(v, (1, 2)), (1, -1))
    want = expand(grid_keep(norms(W.t(), (1, 2)), (1, -1), 1), (1, 2))
    assert torch.equal(s.get_masks(1)[s.block], want)
    assert torch.equal(s.get_masks(1, format="param")[s.block], want.t())
    assert torch.equal(s.get_masks(1, format="indices")[s.block], want.t().reshape(-1).nonzero().flatten())
    vals = rn((4, 6), 1)  # parameter-shaped values are read through the view, as view-shaped ones
    assert torch.equal(s.get_masks(1, values=vals)[s.block], s.get_masks(1, values=vals.t())[s.block])

    big = rn((10, 6), 4)
    P, ref = big[2:6], big.clone()  # contiguous, storage offset 12
    vp = View(P, (4, 3, 2), (6, 2, 1))
    assert torch.equal(vp.offsets(), torch.arange(24).reshape(4, 3, 2))
    ScopeSpec(BlockSpec(vp, (1, 1, 2)), (1, -1, 1)).hard_threshold(nnz=1)
    k = grid_keep(norms(ref[2:6].reshape(4, 3, 2), (1, 1, 2)), (1, -1, 1), 1)
    assert torch.equal(P, (ref[2:6].reshape(4, 3, 2) * expand(k, (1, 1, 2))).reshape(4, 6))
    assert torch.equal(big[:2], ref[:2]) and torch.equal(big[6:], ref[6:])

    Q = rn((4, 8), 5)
    q0 = Q.clone()
    vq = View(Q, (4, 4), (8, 1), offset=4)  # the right half
    sq = ScopeSpec(BlockSpec(vq, (1, 2)), (1, -1))
    sq.hard_threshold(nnz=1)
    k = expand(grid_keep(norms(q0[:, 4:], (1, 2)), (1, -1), 1), (1, 2))
    assert torch.equal(Q[:, 4:], q0[:, 4:] * k) and torch.equal(Q[:, :4], q0[:, :4])
    assert vq.linear_offset(torch.tensor([[1, 2]])).tolist() == [14]
    r, c = vq.to_param_rc(torch.tensor([[1, 2]]))
    assert (r.tolist(), c.tolist()) == ([1], [6])


@pytest.mark.parametrize("shape,stride", [((3, 2), (2, 3)), ((2, 3), (3, 2)), ((2, 2, 2), (2, 3, 4))])
def test_defect_view_accepts_disjoint_interleaved_strides(shape, stride, backend):
    """The overlap check was only sufficient: strides (2, 3) over shape (3, 2) reach {0, 2, 4, 3, 5, 7}, each once."""
    W = torch.arange(1.0, 13.0)
    pos = torch.arange(12).as_strided(shape, stride).reshape(-1)
    assert pos.unique().numel() == pos.numel()
    v = View(W, shape, stride)
    s = ScopeSpec(BlockSpec(v, (1,) * len(shape)), (1,) * (len(shape) - 1) + (-1,))
    s.hard_threshold(nnz=1)
    want = W.new_zeros(12)
    x = torch.arange(1.0, 13.0).as_strided(shape, stride)
    keep = x == x.amax(-1, keepdim=True)
    want[pos] = (x * keep).reshape(-1)
    outside = torch.ones(12, dtype=torch.bool)
    outside[pos] = False
    want[outside] = torch.arange(1.0, 13.0)[outside]
    assert torch.equal(W, want)


@pytest.mark.parametrize("shape,stride", [((2, 2), (1, 1)), ((3, 2), (2, 2)), ((2, 2, 2), (1, 2, 3))])
def test_view_still_refuses_overlap(shape, stride):
    with pytest.raises(ValueError, match="covers some elements twice"):
        View(torch.zeros(12), shape, stride)


def test_defect_view_to_param_refuses_a_mask_of_another_shape():
    W = torch.zeros(4, 8)
    v = View(W, (4, 4), (8, 1), offset=4)
    with pytest.raises(ValueError, match="^view_mask"):
        v.to_param(torch.zeros(1, 4, dtype=torch.bool))  # was broadcast over the 4 rows
    with pytest.raises(ValueError, match="^view_mask"):
        View.from_existing(W).to_param(torch.zeros(1, 8, dtype=torch.bool))  # was returned as (1, 8)
    m = View.from_existing(W).to_param(torch.ones(4, 8))
    assert m.dtype == torch.bool and m.shape == (4, 8)  # a 0/1 mask comes back bool, as on the strided path
    m = v.to_param(torch.zeros(4, 4, dtype=torch.bool))
    assert not m[:, 4:].any() and m[:, :4].all()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("order", [(1.7, 0.2), (True, False), "10"])
def test_defect_orders_must_be_ints(order):
    a, b = torch.randn(4, 6), torch.randn(6, 4)
    with pytest.raises(TypeError, match=r"^orders\[1\]"):  # was truncated to (1, 0) / taken as (1, 0)
        BlockCoupling([BlockSpec(a), BlockSpec(b)], [(0, 1), order])
    with pytest.raises(TypeError, match=r"^orders\[1\]"):
        ScopeCoupling([ScopeSpec(BlockSpec(a)), ScopeSpec(BlockSpec(b))], [(0, 1), order])
    assert BlockCoupling([BlockSpec(a), BlockSpec(b)], [(0, 1), [1, 0]]).grid_shape == (4, 6)


def test_defect_values_of_another_kind_are_named():
    W = torch.randn(4, 8)
    s = ScopeSpec(BlockSpec(W, (1, 2)), (1, -1))
    bad = torch.ones(4, 8, dtype=torch.int64)
    for call in (lambda: s.get_masks(1, values=bad), lambda: s.hard_threshold(nnz=1, values=bad),
                 lambda: s.kth_largest(bad, 1), lambda: s.block_keep(1, values=bad),
                 lambda: s.hard_threshold(thresholds=torch.ones(4, 1), values=bad.bool())):
        with pytest.raises(TypeError, match="^values: expected a floating tensor"):  # was "x: ..."
            call()
    # block_view of integer positions (not scores) still works
    pos = View.from_existing(W).offsets()
    assert torch.equal(s.block.block_view(pos, merge=True)[0, 1], torch.tensor([2, 3]))


def test_defect_scope_coupling_hard_threshold_checks_ties_with_thresholds():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    a0 = a.clone()
    c = ScopeCoupling([ScopeSpec(BlockSpec(a, (1, 2)), (1, -1)), ScopeSpec(BlockSpec(b, (1, 2)), (1, -1))])
    with pytest.raises(ValueError, match="^ties"):
        c.hard_threshold(thresholds=torch.ones(4, 1), ties="bogus")
    assert torch.equal(a, a0)


# --------------------------------------------------------------------------- in-place updates


def _inference_tensor(*shape):
    with torch.inference_mode():
        return torch.randn(*shape)


COUPLED = {
    "ScopeCoupling.hard_threshold(nnz)": lambda a, b: ScopeCoupling(
        [ScopeSpec(BlockSpec(a, (1, 2))), ScopeSpec(BlockSpec(b, (1, 2)))]).hard_threshold(nnz=1),
    "ScopeCoupling.hard_threshold(thresholds)": lambda a, b: ScopeCoupling(
        [ScopeSpec(BlockSpec(a, (1, 2)), (1, -1)), ScopeSpec(BlockSpec(b, (1, 2)), (1, -1))]).hard_threshold(
        thresholds=torch.ones(4, 1)),
    "ScopeCoupling.soft_threshold": lambda a, b: ScopeCoupling(
        [ScopeSpec(BlockSpec(a, (1, 2)), (1, -1)), ScopeSpec(BlockSpec(b, (1, 2)), (1, -1))]).soft_threshold(
        torch.full((4, 1), 0.5)),
    "BlockCoupling.keep_blocks": lambda a, b: BlockCoupling([BlockSpec(a, (1, 2)), BlockSpec(b, (1, 2))]).keep_blocks(
        torch.zeros(4, 2, dtype=torch.bool)),
    "BlockCoupling.soft_threshold": lambda a, b: BlockCoupling(
        [BlockSpec(a, (1, 2)), BlockSpec(b, (1, 2))]).soft_threshold(torch.full((4, 2), 0.5)),
    "BlockCoupling.apply_multiplier": lambda a, b: BlockCoupling(
        [BlockSpec(a, (1, 2)), BlockSpec(b, (1, 2))]).apply_multiplier(torch.full((4, 2), 0.5)),
    "ScopeSpec(BlockCoupling).hard_threshold": lambda a, b: ScopeSpec(
        BlockCoupling([BlockSpec(a, (1, 2)), BlockSpec(b, (1, 2))])).hard_threshold(nnz=1),
}


@pytest.mark.parametrize("name", sorted(COUPLED))
def test_defect_an_inference_tensor_is_refused_before_any_spec_is_written(name, backend):
    """The second spec's weights were made under torch.inference_mode(): torch forbids in-place updates of them
    outside it. The couplings wrote the first spec and then raised (torch's ops), or, through the compiled
    kernels, wrote the inference tensor anyway."""
    a, b = torch.randn(4, 4), _inference_tensor(4, 4)
    a0, b0 = a.clone(), b.clone()
    with pytest.raises(RuntimeError, match="inference tensor"):
        COUPLED[name](a, b)
    assert torch.equal(a, a0) and torch.equal(b, b0)


SINGLE = {
    "keep_blocks": lambda s: s.keep_blocks(torch.zeros(4, 2, dtype=torch.bool)),
    "hard_threshold": lambda s: s.hard_threshold(torch.full((4, 2), 10.0)),
    "soft_threshold": lambda s: s.soft_threshold(torch.full((4, 2), 0.5)),
    "scope.hard_threshold": lambda s: ScopeSpec(s).hard_threshold(nnz=1),
    "apply_multiplier": lambda s: s.apply_multiplier(torch.zeros(4, 2)),
    "set_data": lambda s: s.set_data(torch.zeros(4, 4)),
    "View.data =": lambda s: setattr(s.view, "data", torch.zeros(4, 4)),
}


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_defect_every_backend_refuses_to_write_an_inference_tensor(name, backend):
    b = _inference_tensor(4, 4)
    b0 = b.clone()
    # native wrote it silently; torch's own in-place ops (the reference backend's) wrote it, then raised
    with pytest.raises(RuntimeError, match="inference tensor"):
        SINGLE[name](BlockSpec(b, (1, 2)))
    assert torch.equal(b, b0)
    with torch.inference_mode():  # inside inference mode: allowed, as torch allows it
        SINGLE[name](BlockSpec(b, (1, 2)))
    assert not torch.equal(b, b0)


def test_couplings_bump_every_parameters_version():
    cases = {
        "SC soft cond": lambda c: c.soft_threshold(torch.zeros(4, 1),
                                                   conditioners={s: torch.ones(4, 4) for s in c.blocks()}),
        "SC ht thr": lambda c: c.hard_threshold(thresholds=torch.zeros(4, 1)),
    }
    for name, f in cases.items():
        p1, p2 = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
        v1, v2 = p1._version, p2._version
        f(ScopeCoupling([ScopeSpec(BlockSpec(p1, (1, 2)), (1, -1)), ScopeSpec(BlockSpec(p2, (1, 2)), (1, -1))]))
        assert p1._version > v1 and p2._version > v2, name
    p1, p2 = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    s1, s2 = BlockSpec(p1, (1, 2)), BlockSpec(p2, (1, 2))
    v1, v2 = p1._version, p2._version
    BlockCoupling([s1, s2]).soft_threshold(torch.zeros(4, 2), conditioners={s1: torch.ones(4, 4), s2: torch.ones(4, 4)})
    assert p1._version > v1 and p2._version > v2


# --------------------------------------------------------------------------- compat


def test_defect_compat_block_spec_of_a_tensor_has_sparsekit_view_helpers():
    W0 = torch.arange(1.0, 17.0).reshape(4, 4)
    W = W0.clone()
    b = gk.BlockSpec(W, (1, 2))
    assert isinstance(b.view, gk.View)  # SparseKit: BlockSpec(tensor).view is a View with the block helpers
    b.view.apply_mask(torch.tensor([[True, False]] * 4), b.shape)
    assert torch.equal(W[:, :2], torch.zeros(4, 2)) and torch.equal(W[:, 2:], W0[:, 2:])
    b.view.apply_multiplier(torch.full((4, 2), 2.0), b.shape)
    assert torch.equal(W[:, 2:], 2 * W0[:, 2:])
    bv = b.view.block_view_of(W, b.shape, merge=True)
    assert bv.shape == (4, 2, 2)
    s = sk.BlockSpec(sk.View.from_existing(torch.zeros(4, 4)), (0, -3))
    assert gk.BlockSpec(torch.zeros(4, 4), (0, -3)).shape == s.shape == (4, 4)  # <= 0 spans, as SparseKit


@pytest.mark.parametrize("shape", [(1.5, 2), (True, 2), "12"])
def test_defect_compat_block_shape_must_be_ints(shape):
    with pytest.raises(TypeError, match="^shape"):  # (1.5, 2) was truncated to blocks of (1, 2)
        gk.BlockSpec(torch.zeros(4, 4), shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_compat_kth_along_every_dim_matches_torch(dtype):
    x = rn((3, 5, 7), 0, dtype)
    for dim in [None, 0, 1, 2, -1, -3]:
        xs, d = (x.reshape(-1), 0) if dim is None else (x, dim)
        n = xs.shape[d]
        for k in (1, 2, 3):
            got = gk.kth_largest(x, k, dim=dim)
            want = torch.kthvalue(xs.float(), n - k + 1, dim=d).values
            assert got.dtype == dtype and torch.equal(got.float(), want)
            if k >= n:
                continue
            mid = gk.mid_kth_largest(x, k, dim=dim, k_weight=0.5)
            wm = (want + 0.5 * torch.kthvalue(xs.float(), n - k, dim=d).values) / 1.5
            tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
            torch.testing.assert_close(mid.float(), wm, rtol=tol, atol=tol)
    t = rn((6, 4), 1).t()  # non-contiguous
    assert torch.equal(gk.kth_largest(t, 2, dim=1), torch.kthvalue(t, 5, dim=1).values)

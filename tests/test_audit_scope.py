"""Audit regressions for gradkit.scope / gradkit.compat.sparsekit: silent wrong answers (precision
lost before a comparison, autograd missing in-place pruning, aliasing and overlapping writes, float
rounding of sparsity fractions) and the state of the weights after an error."""
import math

import pytest
import torch
from torch import nn

import gradkit.compat.sparsekit as gk
from gradkit import _ext, ops
from gradkit.kernels.reference import scope as ref
from gradkit.scope import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec, View

from conftest import use_backend

import sparsekit as sk  # noqa: E402  (installed wherever the suite runs: scripts/install-peers.sh; never skipped)
import sparsekit.tensor_ops as sk_ops  # noqa: E402


def _kth_torch(x, k, dim=-1, **kwargs):
    return torch.kthvalue(x, x.shape[dim] - k + 1, dim=dim).values


def _mid_torch(x, k, dim=-1, k_weight=1.0, **kwargs):
    n = x.shape[dim]
    return (torch.kthvalue(x, n - k + 1, dim=dim).values + k_weight * torch.kthvalue(x, n - k, dim=dim).values) / (
        1.0 + k_weight)


@pytest.fixture
def sparsekit_on_cpu(monkeypatch):
    """SparseKit 0.1.5 sends CPU tensors to Triton when triton imports; its torch path is the CPU user's."""
    monkeypatch.setattr(sk_ops, "_kth_largest_impl", _kth_torch)
    monkeypatch.setattr(sk_ops, "_mid_kth_largest_impl", _mid_torch)


def _w(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _one(masks):
    assert len(masks) == 1
    return next(iter(masks.values()))


BACKENDS = ["native", "reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    if request.param == "native" and not _ext.LOADED:
        pytest.skip("compiled extension not built")
    with use_backend(request.param):
        yield request.param


# ------------------------------------------------------------------ precision before comparisons


def test_hard_threshold_values_of_another_dtype_rank_in_their_own_precision(backend, sparsekit_on_cpu):
    # float32 scores on a bf16 weight used to be rounded to bf16 first: ties (lowest index wins) replaced
    # the real order, so hard_threshold(nnz, values=V) disagreed with get_masks(nnz, values=V) and SparseKit
    W = _w(64, 64, seed=1, dtype=torch.bfloat16)
    V = _w(64, 64, seed=2)
    V[0, :4] = torch.tensor([1.0, 2.0, 1.001, 0.25])  # 1.0 and 1.001 are one bf16 value
    want = W * (V.abs() >= V.abs().reshape(64, 16, 4).sort(-1, descending=True).values[..., 1:2]
                .expand(64, 16, 4).reshape(64, 64))
    a, b = W.clone(), W.clone()
    s = ScopeSpec(BlockSpec(b, (1, 1)), (1, 4))
    keep = s.hard_threshold(nnz=2, values=V)
    assert torch.equal(b, want)
    assert b[0, 2] != 0 and b[0, 0] == 0
    assert torch.equal(keep, _one(s.get_masks(2, values=V)))
    sk.ScopeSpec(sk.BlockSpec(a, (1, 1)), (1, 4)).hard_threshold(nnz=2, values=V)
    assert torch.equal(a, b)


@pytest.mark.parametrize("wdtype,tdtype,t", [(torch.bfloat16, torch.float32, 1.001),
                                             (torch.float32, torch.float64, 1.0000000001)])
def test_thresholds_compared_in_the_promoted_dtype(wdtype, tdtype, t, sparsekit_on_cpu):
    # the thresholds used to be rounded to the weight's dtype: a block of norm 1.0 survived t = 1.001
    W = torch.tensor([[1.0, 0, 0, 0, 2.0, 0, 0, 0]], dtype=wdtype)
    want = torch.tensor([[0.0, 0, 0, 0, 2.0, 0, 0, 0]], dtype=wdtype)
    thr = torch.tensor([[t, t]], dtype=tdtype)
    for L, check in ((gk, True), (sk, True)):
        b = W.clone()
        L.BlockSpec(b, (1, 4)).hard_threshold(thr, None)
        assert torch.equal(b, want), L
        b = W.clone()
        L.ScopeSpec(L.BlockSpec(b, (1, 4)), (1, 1)).hard_threshold(thresholds=thr)
        assert torch.equal(b, want), L
    b, c = W.clone(), torch.zeros(8, 1, dtype=wdtype)
    bc = BlockCoupling([BlockSpec(b, (1, 4)), BlockSpec(c, (4, 1))], [(0, 1), (1, 0)])
    bc.hard_threshold(thr)
    assert torch.equal(b, want) and not c.any()
    b, c = W.clone(), torch.zeros(8, 1, dtype=wdtype)
    sc = ScopeCoupling([ScopeSpec(BlockSpec(b, (1, 4)), (1, -1)), ScopeSpec(BlockSpec(c, (4, 1)), (-1, 1))],
                       [(0, 1), (1, 0)])
    sc.hard_threshold(thresholds=torch.tensor([[t]], dtype=tdtype))
    assert torch.equal(b, want)


def test_global_selection_of_half_weights_ranks_by_float32_scores():
    # one scope of > 65536 blocks takes the radix-select path; it ranked norms rounded to fp16 / bf16
    # (about 200 of 131072 (1, 4) blocks differed from the reference and from float64)
    for dtype in (torch.bfloat16, torch.float16):
        W = _w(512, 1024, seed=3, dtype=dtype)
        for p in (1.0, 2.0):
            s = ScopeSpec(BlockSpec(W.clone(), (1, 4)), (-1, -1))
            nnz = s.numblk_per_scope() // 2
            want = ref.scope_mask(W.double(), [1, 4], list(s.shape), nnz, p, False, False, True)
            assert torch.equal(ref.scope_mask(W, [1, 4], list(s.shape), nnz, p, False, False, True), want)
            assert torch.equal(_one(s.get_masks(nnz, p=p)), want), (dtype, p)
            s.hard_threshold(nnz=nnz, p=p)
            assert torch.equal(s.block.view.param, W * want)
            c = ScopeCoupling([s])
            assert torch.equal(_one(c.get_masks(nnz, p=p, values={s.block: W})), want)


def _near_tie_pair(dtype):
    """Two single-block fp16 / bf16 tensors whose norms round to the same value but differ in float32:
    the first (index 0) is the smaller."""
    eps = torch.finfo(dtype).eps
    lo = torch.tensor([[1.0, 0.0]], dtype=dtype)
    hi = torch.tensor([[1.0, math.sqrt(eps) / 2]], dtype=dtype)  # norm 1 + eps / 8: rounds to 1.0
    assert torch.linalg.vector_norm(hi) == torch.linalg.vector_norm(lo)
    assert hi.float().norm() > lo.float().norm()
    return lo, hi


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_couplings_of_half_weights_rank_by_float32_norms(dtype, backend):
    # ScopeCoupling / BlockCoupling ranked per-tensor norms rounded to fp16 / bf16, so a near tie went to
    # the lower index; the single-tensor kernels rank float32 scores
    lo, hi = _near_tie_pair(dtype)
    a, b = lo.clone(), hi.clone()
    c = ScopeCoupling([ScopeSpec(BlockSpec(a, (1, 2)), ()), ScopeSpec(BlockSpec(b, (1, 2)), ())])
    keep = c.get_masks(1)
    assert not keep[c.scopes[0].block].any() and keep[c.scopes[1].block].all()
    c.hard_threshold(nnz=1)
    assert not a.any() and torch.equal(b, hi)
    # a BlockCoupling over two tensors: coupled block 0 is (lo, 0), block 1 is (hi, 0)
    x = torch.cat([lo, hi], dim=1)
    z = torch.zeros(1, 4, dtype=dtype)
    s = ScopeSpec(BlockCoupling([BlockSpec(x, (1, 2)), BlockSpec(z, (1, 2))]), (1, 2))
    s.hard_threshold(nnz=1)
    assert torch.equal(x, torch.cat([torch.zeros_like(lo), hi], dim=1))


# ------------------------------------------------------------------ soft thresholding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_threshold_eps_comes_from_the_thresholds_dtype(dtype, backend, sparsekit_on_cpu):
    # the default eps was the weight's machine epsilon: 7.8e-3 for bf16, which shrank small blocks by
    # up to ~40% less than the group-lasso step (SparseKit: the thresholds' dtype, float32 here)
    W = _w(8, 16, seed=4, dtype=dtype) * 0.01
    t = torch.full((8, 1), 0.01)
    x = W.double().reshape(8, 4, 4)
    n = x.norm(dim=-1, keepdim=True)
    want = (x * (1 - 0.01 / (n + torch.finfo(torch.float32).eps)).clamp(min=0)).reshape(8, 16)
    tol = torch.finfo(dtype).eps
    b = W.clone()
    ScopeSpec(BlockSpec(b, (1, 4)), (1, -1)).soft_threshold(t)
    torch.testing.assert_close(b.double(), want, atol=1e-6, rtol=tol)
    a = W.clone()
    sk.ScopeSpec(sk.BlockSpec(a, (1, 4)), (1, -1)).soft_threshold(t)
    torch.testing.assert_close(b.double(), a.double(), atol=1e-6, rtol=2 * tol)
    # the coupled (Python) path: same eps, and x * scale rounded once to each spec's dtype
    c = W.clone()
    ScopeSpec(BlockCoupling([BlockSpec(c, (1, 4))]), (1, -1)).soft_threshold(t)
    torch.testing.assert_close(c.double(), want, atol=1e-6, rtol=tol)


def test_mixed_dtype_block_coupling_soft_threshold_rounds_once():
    # the float32 scale was cast to the first spec's dtype (bf16) and then multiplied: two roundings
    x = _w(64, 8, seed=5, dtype=torch.bfloat16)
    y = _w(64, 8, seed=6)
    y[:, ::4] = 1.0  # so the float32 spec carries each block's exact scale
    t = torch.full((64, 2), 0.5)
    bx, by = x.clone(), y.clone()
    ScopeSpec(BlockCoupling([BlockSpec(bx, (1, 4)), BlockSpec(by, (1, 4))]), (1, 1)).soft_threshold(t)
    scale = by[:, ::4]
    assert (scale > 0).all() and (scale < 1).all()
    once = (x.float().reshape(64, 2, 4) * scale[..., None]).reshape(64, 8).bfloat16()
    twice = (x.reshape(64, 2, 4) * scale.bfloat16()[..., None]).reshape(64, 8)
    assert torch.equal(bx, once) and not torch.equal(once, twice)


@pytest.mark.parametrize("t", [-0.5, float("nan")])
def test_negative_or_nan_soft_thresholds_are_refused(t):
    # a negative threshold scaled every block up (1 - t / n > 1); NaN zeroed the whole weight
    W = _w(4, 8, seed=7)
    b = W.clone()
    s = ScopeSpec(BlockSpec(b, (1, 4)), (1, -1))
    with pytest.raises(ValueError, match="^thresholds: "):
        s.soft_threshold(torch.full(s.grid_shape, t))
    assert torch.equal(b, W)
    c = ScopeCoupling([s, ScopeSpec(BlockSpec(torch.zeros(4, 4), (1, 4)), (1, -1))])
    with pytest.raises(ValueError, match="^thresholds: "):
        c.soft_threshold(torch.full(c.grid_shape, t))
    assert torch.equal(b, W)


def test_nan_hard_thresholds_are_refused():
    # NaN used to zero every block (gradkit) or keep every block (SparseKit), silently
    W = _w(4, 8, seed=8)
    b = W.clone()
    s = ScopeSpec(BlockSpec(b, (1, 4)), (1, -1))
    thr = torch.tensor([[0.1], [float("nan")], [0.1], [0.1]])
    with pytest.raises(ValueError, match="^thresholds: NaN"):
        s.hard_threshold(thresholds=thr)
    with pytest.raises(ValueError, match="^thresholds: NaN"):
        ScopeCoupling([s]).hard_threshold(thresholds=thr)
    with pytest.raises(ValueError, match="^thresholds: NaN"):
        s.block.hard_threshold(torch.full((4, 2), float("nan")))
    assert torch.equal(b, W)
    s.hard_threshold(thresholds=torch.full((4, 1), -math.inf))  # -inf (kth_largest of too few) keeps all
    assert torch.equal(b, W)


def test_scope_coupling_soft_threshold_checks_every_conditioner_first():
    # the first scope was already shrunk when the second scope's conditioner turned out missing / misshaped
    A, B = _w(8, 16, seed=9), _w(16, 8, seed=10)
    a, b = A.clone(), B.clone()
    sa, sb = ScopeSpec(BlockSpec(a, (1, 4)), (1, -1)), ScopeSpec(BlockSpec(b, (4, 1)), (-1, 1))
    c = ScopeCoupling([sa, sb], [(0, 1), (1, 0)])
    t = torch.full(c.grid_shape, 0.1)
    for cond, err in (({sa.block: torch.ones(8, 16)}, KeyError),
                      ({sa.block: torch.ones(8, 16), sb.block: torch.ones(3, 3)}, ValueError),
                      ({sa.block: torch.ones(8, 16), sb.block: torch.ones(16, 8, dtype=torch.int32)}, TypeError)):
        with pytest.raises(err, match=r"^'?conditioners\b"):
            c.soft_threshold(t, conditioners=cond)
        assert torch.equal(a, A) and torch.equal(b, B)
    c.soft_threshold(t, conditioners={sa.block: torch.ones(8, 16), sb.block: torch.ones(16, 8)},
                     max_iter=60, atol=0)
    a2, b2 = A.clone(), B.clone()
    ScopeCoupling([ScopeSpec(BlockSpec(a2, (1, 4)), (1, -1)), ScopeSpec(BlockSpec(b2, (4, 1)), (-1, 1))],
                  [(0, 1), (1, 0)]).soft_threshold(t)
    torch.testing.assert_close(a, a2)  # h = 1: the Euclidean step
    torch.testing.assert_close(b, b2)


# ------------------------------------------------------------------ autograd


def _linear_graph(p):
    x = torch.randn(3, p.shape[0], generator=torch.Generator().manual_seed(0), requires_grad=True)
    return (x @ p).square().sum()


PRUNES = {
    "hard nnz": lambda s: s.hard_threshold(nnz=2),
    "hard nnz keep ties": lambda s: s.hard_threshold(nnz=2, ties="keep"),
    "hard nnz float64 values": lambda s: s.hard_threshold(nnz=2, values=torch.ones(8, 8, dtype=torch.float64)),
    "hard thresholds": lambda s: s.hard_threshold(thresholds=torch.full(s.grid_shape, 0.5)),
    "soft": lambda s: s.soft_threshold(torch.full(s.grid_shape, 0.1)),
    "soft conditioned": lambda s: s.soft_threshold(torch.full(s.grid_shape, 0.1), conditioners=torch.ones(8, 8)),
    "keep_blocks": lambda s: s.block.keep_blocks(torch.zeros(s.block.grid_shape, dtype=torch.bool)),
    "apply_mask": lambda s: s.block.apply_mask(torch.ones(s.block.grid_shape, dtype=torch.bool)),
    "apply_multiplier": lambda s: s.block.apply_multiplier(torch.zeros(s.block.grid_shape)),
    "coupled hard": lambda s: ScopeCoupling([s]).hard_threshold(nnz=1),
    "block coupling soft": lambda s: ScopeSpec(BlockCoupling([s.block]), s.shape).soft_threshold(
        torch.full(s.grid_shape, 0.1)),
}


@pytest.mark.parametrize("name", list(PRUNES))
@pytest.mark.parametrize("pairs", [False, True])
def test_in_place_pruning_bumps_the_autograd_version(name, pairs):
    # writes went through param.data (a version counter of its own), so a backward that had saved the
    # dense weight ran silently with the pruned one
    p = nn.Parameter(_w(8, 8, seed=11))
    loss = _linear_graph(p)
    if pairs:
        v = View(p, (8, 1, 4, 2), (8, 8, 1, 4))  # columns j, j + 4 (View.pairs' layout, period 8)
        s = ScopeSpec(BlockSpec(v, (1, 1, 1, 1)), (1, 1, 4, 1))  # param-shaped helper tensors apply to a view too
    else:
        s = ScopeSpec(BlockSpec(p, (1, 1)), (1, 4))
    v0 = p._version
    PRUNES[name](s)
    assert p._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    assert p.grad is None
    # a fresh graph after pruning back-propagates through the pruned weight as usual
    _linear_graph(p).backward()
    pd = p.detach().clone().requires_grad_()
    _linear_graph(pd).backward()
    assert torch.equal(p.grad, pd.grad)  # d/dp of |x p|^2 at the pruned p


def test_pruning_outside_a_pending_graph_still_works():
    p = nn.Parameter(_w(8, 8, seed=12))
    _linear_graph(p).backward()
    s = ScopeSpec(BlockSpec(p, (1, 1)), (1, 4))
    s.hard_threshold(nnz=2)
    assert int((p != 0).sum()) == 32 and not p.data.requires_grad
    with torch.inference_mode():
        s.hard_threshold(nnz=1)
    assert int((p != 0).sum()) == 16


# ------------------------------------------------------------------ sparsity fractions


def test_sparsity_to_nnz_takes_the_decimal_fraction(sparsekit_on_cpu):
    # int(0.29 * 100) == 28: SparseKit prunes 28 of 100 blocks for sparsity 0.29 (also 0.57, 0.58)
    s = ScopeSpec(BlockSpec(torch.zeros(1, 100), (1, 1)), (1, -1))
    for i in range(101):
        assert s.sparsity_to_nnz(i / 100) == 100 - i
    assert s.sparsity_to_nnz(0.295) == 71  # floor of 29.5 pruned
    s3 = ScopeSpec(BlockSpec(torch.zeros(1, 3), (1, 1)), (1, -1))
    assert [s3.sparsity_to_nnz(f) for f in (0, 1 / 3, 0.5, 2 / 3, 1)] == [3, 2, 2, 1, 0]
    skw = sk.ScopeSpec(sk.BlockSpec(torch.zeros(1, 100), (1, 1)), (1, -1))
    assert skw.sparsity_to_nnz(0.29) == 72 and s.sparsity_to_nnz(0.29) == 71  # the documented difference
    with pytest.raises(ValueError, match=r"^sparsity: "):
        s.sparsity_to_nnz(1.5)


# ------------------------------------------------------------------ kernels: aliasing and overlap


def test_inplace_ops_refuse_an_overlapping_x(backend):
    # the CPU kernels wrote through an expanded x (one element per column, shared by every row): the result
    # depended on the scope order and on the threads
    base = _w(4, seed=13)
    x = base.expand(3, 4)
    for call in (lambda: ops.block_apply_mask_(x, [1, 1], torch.ones(3, 4, dtype=torch.bool)),
                 lambda: ops.scope_hard_threshold_(x, [1, 1], [1, 4], 2),
                 lambda: ops.block_soft_threshold_(x, [1, 1], torch.zeros(3, 4))):
        with pytest.raises(RuntimeError, match="more than one element"):
            call()
    assert torch.equal(base, _w(4, seed=13))


@pytest.mark.parametrize("blk,scope", [([1, 1], [1, 4]), ([1, 2], [1, 4]), ([1, 1], [1, 3]), ([1, 1], [1, 48])])
def test_values_sharing_x_storage_are_read_before_x_is_written(backend, blk, scope):
    # values = x.t(): the CPU kernel scored later scopes on values another scope had already zeroed
    W = _w(48, 48, seed=14)
    want = W.clone()
    ref.scope_hard_threshold_(want, W.t().clone(), blk, scope, 2, 2.0, False)
    x = W.clone()
    ops.scope_hard_threshold_(x, blk, scope, 2, values=x.t())
    assert torch.equal(x, want)
    # through the API: a square weight scored on its own transpose (view-shaped values)
    y = W.clone()
    ScopeSpec(BlockSpec(y, blk), scope).hard_threshold(nnz=2, values=y.t())
    assert torch.equal(y, want)


def test_soft_threshold_conditioner_sharing_x_storage(backend):
    W = _w(16, 16, seed=15).abs() + 0.5
    t = torch.full((16, 4), 0.3)
    want = W.clone()
    ref.block_soft_threshold_(want, [1, 4], t, W.t().clone(), 30, 0.0, 1e-7)
    x = W.clone()
    ops.block_soft_threshold_(x, [1, 4], t, conditioner=x.t(), max_iter=30, atol=0.0, eps=1e-7)
    torch.testing.assert_close(x, want, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda_emu
def test_cuda_emulated_values_sharing_x_storage():
    """The CUDA host code already copies aliased values (detach_from); pinned here under the emulator."""
    if not _ext.LOADED:
        pytest.skip("compiled extension not built")
    import test_cuda_emulated as tce

    E = tce.emu("scope")
    W = _w(48, 48, seed=16)
    want = W.clone()
    ref.scope_hard_threshold_(want, W.t().clone(), [1, 1], [1, 4], 2, 2.0, False)
    x = W.clone()
    E.scope_hard_threshold_(x, x.t(), [1, 1], [1, 4], 2, 2.0, False)
    assert torch.equal(x, want)
    with pytest.raises(RuntimeError, match="more than one element"):
        E.block_apply_mask_(_w(4).expand(3, 4), [1, 1], torch.ones(3, 4, dtype=torch.bool))


# ------------------------------------------------------------------ compat: same calls, same answers


def test_compat_defaults_match_sparsekit_on_tie_free_input(sparsekit_on_cpu):
    """Every public call with its defaults, on 3-D / 4-D weights and strided views, against SparseKit."""
    W = _w(6, 8, 3, 3, seed=17)
    cases = (((1, 1, 3, 3), (1, 4, 1, 1), 2), ((2, 1, 1, 1), (1, 2, 3, 3), 5), ((1, 1, 1, 1), (1, 1, 1, 3), 1))
    for blk, scp, nnz in cases:
        a, b = W.clone(), W.clone()
        ssk, sgk = sk.ScopeSpec(sk.BlockSpec(a, blk), scp), gk.ScopeSpec(gk.BlockSpec(b, blk), scp)
        assert torch.equal(_one(ssk.get_masks(nnz)), _one(sgk.get_masks(nnz)))
        torch.testing.assert_close(sgk.kth_largest(None, nnz), ssk.kth_largest(None, nnz))
        torch.testing.assert_close(sgk.block_norms(None), ssk.block_norms(None))
        ssk.hard_threshold(nnz=nnz)
        sgk.hard_threshold(nnz=nnz)
        assert torch.equal(a, b)
        t = torch.full(sgk.grid_shape, 0.2)
        ssk.soft_threshold(t)
        sgk.soft_threshold(t)
        torch.testing.assert_close(b, a)
    # pairs / row pairs over a weight with a storage offset
    big = _w(40, 32, seed=18)
    a, b = big.clone(), big.clone()
    va, vb = sk.View(a[8:24], (16, 2, 8, 2), (32, 16, 1, 8)), gk.View.pairs(b[8:24])
    ssk = sk.ScopeSpec(sk.BlockSpec(va, (1, 1, 1, 2)), (1, 1, 4, 1))
    sgk = gk.ScopeSpec(gk.BlockSpec(vb, (1, 1, 1, 2)), (1, 1, 4, 1))
    assert torch.equal(_one(ssk.get_masks(2)), _one(sgk.get_masks(2)))
    ssk.hard_threshold(nnz=2)
    sgk.hard_threshold(nnz=2)
    assert torch.equal(a, b) and torch.equal(b[:8], big[:8]) and torch.equal(b[24:], big[24:])


def test_get_masks_refuses_unknown_keywords_and_coupling_honours_block_mask():
    """get_masks took **kwargs and dropped them (as SparseKit does): a misspelt `tie="keep"` selected with the
    default ties, and ScopeCoupling.get_masks(block_mask=...) selected by norms instead of the given mask."""
    from gradkit.scope import BlockSpec, ScopeCoupling, ScopeSpec, ShapeMismatchError

    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    sa, sb = ScopeSpec(BlockSpec(a, (1, 1)), (1, 4)), ScopeSpec(BlockSpec(b, (1, 1)), (1, 4))
    with pytest.raises(TypeError, match=r"^get_masks: unexpected keyword argument\(s\) \['tie'\]"):
        sa.get_masks(2, tie="keep")
    pair = ScopeCoupling([sa, sb], [(0, 1), (0, 1)])
    with pytest.raises(TypeError, match=r"^get_masks: unexpected keyword argument\(s\) \['tie'\]"):
        pair.get_masks(2, tie="keep")
    joint = torch.zeros(pair.grid_shape + (pair.numblk_per_scope(),), dtype=torch.bool)
    joint[..., 0] = True  # a's first block of every scope, and nothing of b
    got = pair.get_masks(2, block_mask=joint)
    want_a = torch.zeros(4, 8, dtype=torch.bool)
    want_a[:, 0::4] = True
    assert torch.equal(got[sa.block], want_a) and not got[sb.block].any()
    with pytest.raises(ShapeMismatchError, match="^block_mask: expected shape"):
        pair.get_masks(2, block_mask=joint[..., :4])

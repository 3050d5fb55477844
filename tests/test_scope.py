"""gradkit.scope end to end: every pattern of the issue against an independent plain-torch
computation, on every backend (native, reference, and Triton under the interpreter), plus
View / spec validation and the bad-input contract."""
import math

import pytest
import torch

from gradkit import ops
from gradkit.scope import (BlockCoupling, BlockSpec, CouplingError, ScopeCoupling, ScopeSpec, ShapeMismatchError,
                           View, check_nm, semi_structured)

from conftest import use_backend

BACKENDS = ["native", "reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
        try:
            import gradkit.kernels.triton.scope  # noqa: F401
        except ImportError as e:  # pragma: no cover
            pytest.fail(f"the Triton scope backend does not import: {e}")
    with use_backend(request.param):
        yield request.param


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _topk_mask_rows(scores, n):
    """Independent oracle: bool mask of the n largest per row (no ties in randn data)."""
    idx = scores.topk(n, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def test_two_four(backend):
    W = _w(16, 32)
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    m = s.get_masks(2)[s.block]
    want = _topk_mask_rows(W.abs().reshape(16, 8, 4), 2).reshape(16, 32)
    assert torch.equal(m, want)
    check_nm(m, 2, 4)
    W2 = W.clone()
    keep = ScopeSpec(BlockSpec(W2, (1, 1)), (1, 4)).hard_threshold(nnz=2)
    assert torch.equal(keep, want) and torch.equal(W2, W * want)


def test_four_eight_with_1x2_blocks(backend):
    W = _w(8, 32, seed=1)
    s = ScopeSpec(BlockSpec(W, (1, 2)), (1, 4))  # 1x2 blocks in scopes of 4: 4:8 in pairs
    m = s.get_masks(2)[s.block]
    bn = W.reshape(8, 4, 4, 2).norm(dim=-1)
    want = _topk_mask_rows(bn, 2).unsqueeze(-1).expand(8, 4, 4, 2).reshape(8, 32)
    assert torch.equal(m, want)
    check_nm(m, 4, 8)


def test_coupled_two_four_through_view(backend):
    W = _w(8, 32, seed=2)
    v = View.pairs(W)
    s = ScopeSpec(BlockSpec(v, (1, 1, 1, 2)), (1, 1, 4, 1))
    pm = s.get_masks(2, format="param")[s.block]
    # oracle: columns j, j+8 of each 16-tile share a bit; 2 of each 4 pairs kept
    t = W.reshape(8, 2, 2, 2, 4)  # (row, tile, half(+8), quad, j) with column = tile*16 + half*8 + quad*4 + j
    score = (t * t).sum(2)  # (row, tile, quad, j)
    keep = _topk_mask_rows(score, 2)  # per (row, tile, quad)
    want = keep.unsqueeze(2).expand(8, 2, 2, 2, 4).reshape(8, 32)
    assert torch.equal(pm, want)
    assert torch.equal(pm[:, :8], pm[:, 8:16])
    W2 = W.clone()
    ScopeSpec(BlockSpec(View.pairs(W2), (1, 1, 1, 2)), (1, 1, 4, 1)).hard_threshold(nnz=2)
    assert torch.equal(W2, W * want)  # written through the view into the parameter


def test_sixteen_col_blocks_eight_row_coupling(backend):
    W = _w(32, 64, seed=3)
    s = ScopeSpec(BlockSpec(View.row_pairs(W), (1, 1, 1, 16)), (1, 1, 2, 1))
    pm = s.get_masks(1, format="param")[s.block]
    n = W.reshape(2, 2, 8, 4, 16).norm(dim=-1)  # (chunk, half, p, colblock)
    keep_first = n[:, 0] >= n[:, 1]
    want = torch.stack([keep_first, ~keep_first], 1).unsqueeze(-1).expand(2, 2, 8, 4, 16).reshape(32, 64)
    assert torch.equal(pm, want)


def test_row_wise_and_global(backend):
    W = _w(8, 48, seed=4)
    rows = ScopeSpec(BlockSpec(W, (1, 1)), (1, -1))
    assert torch.equal(rows.get_masks(5)[rows.block], _topk_mask_rows(W.abs(), 5))
    glob = ScopeSpec(BlockSpec(W, (1, 1)), (-1, -1))
    m = glob.get_masks(40)[glob.block]
    assert torch.equal(m.reshape(-1), _topk_mask_rows(W.abs().reshape(1, -1), 40).reshape(-1))


def test_global_over_one_huge_scope_uses_radix_select():
    W = _w(300, 300, seed=5)  # 90000 blocks > 65536: the topk_select path
    W[0, 0] = float("nan")
    s = ScopeSpec(BlockSpec(W, (1, 1)), (-1, -1))
    m = s.get_masks(900)[s.block]
    a = W.abs().reshape(-1).nan_to_num(-1.0)
    want = torch.zeros(a.numel(), dtype=torch.bool)
    want[a.topk(900).indices] = True
    assert torch.equal(m.reshape(-1), want) and not m[0, 0]


def test_cross_param_coupling_qkv_rows_with_o_columns(backend):
    q, k, v, o = _w(16, 8, seed=6), _w(16, 8, seed=7), _w(16, 8, seed=8), _w(8, 16, seed=9)
    specs = [BlockSpec(q, (1, -1)), BlockSpec(k, (1, -1)), BlockSpec(v, (1, -1)), BlockSpec(o, (-1, 1))]
    s = ScopeSpec(BlockCoupling(specs, [(0, 1), (0, 1), (0, 1), (1, 0)]), (-1, 1))
    masks = s.get_masks(10)
    head = (q.pow(2).sum(1) + k.pow(2).sum(1) + v.pow(2).sum(1) + o.pow(2).sum(0)).sqrt()
    kept = torch.zeros(16, dtype=torch.bool)
    kept[head.topk(10).indices] = True
    mq, mk, mv, mo = (masks[b] for b in specs)
    for m in (mq, mk, mv):
        assert torch.equal(m, kept.unsqueeze(1).expand(16, 8))
    assert torch.equal(mo, kept.unsqueeze(0).expand(8, 16))


def test_scope_coupling_global_across_tensors(backend):
    a, b = _w(8, 8, seed=10), _w(4, 16, seed=11)
    sa, sb = ScopeSpec(BlockSpec(a, (1, 1)), (-1, -1)), ScopeSpec(BlockSpec(b, (1, 1)), (-1, -1))
    c = ScopeCoupling([sa, sb])
    masks = c.get_masks(30)
    flat = torch.cat([a.abs().reshape(-1), b.abs().reshape(-1)])
    want = torch.zeros(flat.numel(), dtype=torch.bool)
    want[flat.topk(30).indices] = True
    got = torch.cat([masks[sa.block].reshape(-1), masks[sb.block].reshape(-1)])
    assert torch.equal(got, want)


def test_mask_formats():
    W = _w(4, 32, seed=12)
    s = ScopeSpec(BlockSpec(View.pairs(W), (1, 1, 1, 2)), (1, 1, 4, 1))
    blk = s.block
    pm = s.get_masks(2, format="param")[blk]
    assert pm.shape == W.shape
    bits = s.get_masks(2, format="bitmask")[blk]
    assert torch.equal(bits, ops.pack_bitmask(pm))
    idx = s.get_masks(2, format="indices")[blk]
    assert torch.equal(idx, pm.reshape(-1).nonzero().squeeze(1))
    vm = s.get_masks(2)[blk]
    assert vm.shape == blk.view.shape and torch.equal(vm, pm.as_strided(blk.view.shape, blk.view.stride))
    with pytest.raises(ValueError, match="format"):
        s.get_masks(2, format="csr")


def test_views_outside_the_param_are_refused():
    W = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="outside its parameter"):
        View(W, (4, 9), (8, 1))
    with pytest.raises(ValueError, match="outside its parameter"):
        View(W, (4, 8), (8, 1), offset=1)
    with pytest.raises(ValueError, match="twice"):
        View(W, (4, 4), (1, 1))
    with pytest.raises(ValueError, match="contiguous"):
        View(W.t(), (8, 4), (4, 1))
    with pytest.raises(ValueError, match="dims"):
        View(W, (4, 8), (8,))


def test_spec_errors_name_the_problem():
    W = torch.zeros(6, 8)
    with pytest.raises(ValueError, match="not divisible"):
        BlockSpec(W, (4, 1))
    b = BlockSpec(W, (1, 2))
    with pytest.raises(ValueError, match=r"grid \(6, 4\) not divisible by scope shape \(4, 1\)"):
        ScopeSpec(b, (4, 1))
    s = ScopeSpec(b, (1, 4))
    with pytest.raises(ValueError, match="nnz"):
        s.get_masks(5)
    with pytest.raises(ValueError, match="nnz"):
        s.hard_threshold(nnz=-1)
    with pytest.raises(ValueError, match="exactly one"):
        s.hard_threshold()
    with pytest.raises(ShapeMismatchError, match="values"):
        s.get_masks(2, values=torch.zeros(5, 8))
    with pytest.raises(ValueError, match="ties"):
        s.get_masks(2, ties="random")
    with pytest.raises(ValueError, match="sparsity"):
        s.sparsity_to_nnz(1.5)
    with pytest.raises(CouplingError, match=r"\(6, 4\).*\(4, 6\)|\(4, 6\).*\(6, 4\)"):
        BlockCoupling([BlockSpec(W, (1, 2)), BlockSpec(torch.zeros(4, 6), (1, 1))], [(0, 1), (0, 1)])


def test_bad_input_leaves_weights_untouched():
    W = _w(8, 16, seed=13)
    snap = W.clone()
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    for call, arg in ((lambda: s.hard_threshold(nnz=5), "nnz"),
                      (lambda: s.hard_threshold(nnz=2, values=torch.zeros(3)), "values"),
                      (lambda: s.hard_threshold(thresholds=torch.zeros(8, 3)), "thresholds"),
                      (lambda: s.soft_threshold(torch.zeros(8, 3)), "thresholds"),
                      (lambda: s.soft_threshold(torch.zeros(8, 4), conditioners=torch.zeros(8, 3)), "conditioners")):
        with pytest.raises((ValueError, TypeError), match=rf"^{arg}\b"):  # "values (or the parameter's ...): "
            call()
        assert torch.equal(W, snap)


def test_nan_scores_never_kept(backend):
    W = _w(4, 8, seed=14)
    W[0, :3] = float("nan")
    W[1] = float("nan")
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    m = s.get_masks(2)[s.block]
    assert not m[torch.isnan(W)].any()
    assert m[0, :4].tolist() == [False, False, False, True]
    W2 = W.clone()
    ScopeSpec(BlockSpec(W2, (1, 1)), (1, 4)).hard_threshold(nnz=2)
    assert not torch.isnan(W2).any()


def test_soft_threshold_single_and_coupled_agree():
    """A BlockCoupling of one spec is the spec: the Python coupled path matches the fused kernel."""
    W = _w(8, 16, seed=15)
    H = torch.rand(8, 16, generator=torch.Generator().manual_seed(16)) + 0.5
    t = torch.rand(8, 4, generator=torch.Generator().manual_seed(17))
    a, b = W.clone(), W.clone()
    ba = BlockSpec(a, (1, 4))
    ba.soft_threshold(t, conditioners=H, max_iter=50, atol=1e-12)
    bb = BlockSpec(b, (1, 4))
    BlockCoupling([bb]).soft_threshold(t, conditioners={bb: H}, max_iter=50, atol=1e-12)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    a, b = W.clone(), W.clone()
    BlockSpec(a, (1, 4)).soft_threshold(t)
    bb = BlockSpec(b, (1, 4))
    BlockCoupling([bb]).soft_threshold(t)
    torch.testing.assert_close(a, b)


def test_soft_threshold_is_the_prox():
    """Euclidean step = argmin 0.5||y - w||^2 + t||y||: check the optimality condition per block."""
    W = _w(8, 16, seed=18)
    t = torch.full((8, 4), 0.7)
    y = W.clone()
    BlockSpec(y, (1, 4)).soft_threshold(t)
    wb, yb = W.reshape(8, 4, 4), y.reshape(8, 4, 4)
    n = wb.norm(dim=-1)
    alive = n > 0.7
    assert torch.equal(yb.norm(dim=-1) > 0, alive)
    grad = (yb - wb) + 0.7 * yb / yb.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    assert grad[alive].abs().max() < 1e-5


def test_semi_structured_layout_check():
    W = _w(8, 16, seed=19)
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    m = s.get_masks(2)[s.block]
    check_nm(m, 2, 4)
    bad = m.clone()
    bad[0, :4] = True
    with pytest.raises(ValueError, match="keeps 4 > 2"):
        check_nm(bad, 2, 4)
    with pytest.raises(ValueError, match="CUDA"):
        semi_structured(W, m)
    with pytest.raises(ValueError, match="keeps"):
        semi_structured(W, bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch semi-structured sparsity needs CUDA")
def test_semi_structured_on_gpu():  # pragma: no cover - GPU only
    W = _w(128, 128, seed=20).half().cuda()
    s = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    m = s.get_masks(2, format="param")[s.block]
    sp = semi_structured(W, m)
    x = torch.randn(128, 64, device="cuda", dtype=torch.half)
    torch.testing.assert_close(sp @ x, (W * m) @ x, atol=1e-2, rtol=1e-2)


def test_global_across_many_tensors_without_concatenation():
    """Above 65536 blocks in the one aligned scope, ScopeCoupling uses the multi-tensor radix select."""
    ts = [_w(100, 300, seed=30), _w(300, 100, seed=31), _w(50, 200, seed=32)]
    ts[1][5, 5] = float("nan")
    scopes = [ScopeSpec(BlockSpec(t, (1, 1)), (-1, -1)) for t in ts]
    c = ScopeCoupling(scopes)
    masks = c.get_masks(700)
    flat = torch.cat([t.abs().reshape(-1) for t in ts]).nan_to_num(-1.0)
    want = torch.zeros(flat.numel(), dtype=torch.bool)
    want[flat.topk(700).indices] = True
    got = torch.cat([masks[s.block].reshape(-1) for s in scopes])
    assert torch.equal(got, want)
    copies = [t.clone() for t in ts]
    c2 = ScopeCoupling([ScopeSpec(BlockSpec(t, (1, 1)), (-1, -1)) for t in copies])
    c2.hard_threshold(nnz=700)
    assert torch.equal(torch.cat([(t != 0).reshape(-1) for t in copies]), want)

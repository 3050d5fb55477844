"""gradkit.compat.sparsekit against the installed SparseKit 0.1.5 peer, on inputs without ties.

SparseKit 0.1.5 sends CPU tensors to its Triton kth-largest kernels whenever triton is importable
(and then fails: "0 active drivers"); its torch path (torch.kthvalue) is what a CPU user gets, so
the fixture routes its kth_largest / mid_kth_largest there. gradkit needs no such patch.
"""
import math

import pytest
import torch

import sparsekit as sk  # installed wherever the suite runs (scripts/install-peers.sh): never skipped
import sparsekit.tensor_ops as sk_ops  # noqa: E402

import gradkit.compat.sparsekit as gk  # noqa: E402


def _kth_torch(x, k, dim=-1, **kwargs):
    n = x.shape[dim]
    return torch.kthvalue(x, n - k + 1, dim=dim).values


def _mid_torch(x, k, dim=-1, k_weight=1.0, **kwargs):
    n = x.shape[dim]
    a = torch.kthvalue(x, n - k + 1, dim=dim).values
    b = torch.kthvalue(x, n - k, dim=dim).values
    return (a + k_weight * b) / (1.0 + k_weight)


@pytest.fixture(autouse=True)
def sparsekit_on_cpu(monkeypatch):
    monkeypatch.setattr(sk_ops, "_kth_largest_impl", _kth_torch)
    monkeypatch.setattr(sk_ops, "_mid_kth_largest_impl", _mid_torch)


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pair(W, make):
    """The same construction in both libraries over separate copies of W."""
    a, b = W.clone(), W.clone()
    return a, make(sk, a), b, make(gk, b)


def _one_mask(masks):
    assert len(masks) == 1
    return next(iter(masks.values()))


PATTERNS = {
    "2:4": (lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 1)), (1, 4)), 2),
    "4:8": (lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 1)), (1, 8)), 4),
    "1x2 blocks in scopes of 4": (lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 2)), (1, 4)), 2),
    "coupled 2:4 via View": (lambda L, W: L.ScopeSpec(
        L.BlockSpec(L.View(W, (W.shape[0], W.shape[1] // 16, 8, 2), (W.shape[1], 16, 1, 8)), (1, 1, 1, 2)),
        (1, 1, 4, 1)), 2),
    "16-col blocks, 8-row coupling": (lambda L, W: L.ScopeSpec(
        L.BlockSpec(L.View(W, (W.shape[0] // 16, 8, 2, W.shape[1]), (16 * W.shape[1], W.shape[1], 8 * W.shape[1], 1)),
                    (1, 1, 1, 16)), (1, 1, 2, 1)), 1),
    "row-wise top-k": (lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 1)), (1, -1)), 20),
    "global top-k": (lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 1)), (-1, -1)), 300),
    "column blocks": (lambda L, W: L.ScopeSpec(L.BlockSpec(W, (-1, 1)), ()), 24),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_masks_and_hard_threshold_match_sparsekit(name):
    make, nnz = PATTERNS[name]
    W = _w(32, 64)
    a, s_sk, b, s_gk = _pair(W, make)
    m_sk, m_gk = _one_mask(s_sk.get_masks(nnz)), _one_mask(s_gk.get_masks(nnz))
    assert m_sk.shape == m_gk.shape and torch.equal(m_sk, m_gk)
    s_sk.hard_threshold(nnz=nnz)
    s_gk.hard_threshold(nnz=nnz)
    assert torch.equal(a, b)
    assert not torch.equal(b, W)  # something was pruned
    # the masks are exactly what hard_threshold keeps (W has no zeros of its own)
    assert not (W == 0).any()
    assert torch.equal(s_gk.blocks()[0].data != 0, m_gk)


@pytest.mark.parametrize("name", ["2:4", "1x2 blocks in scopes of 4", "coupled 2:4 via View", "row-wise top-k"])
def test_kth_and_mid_kth_match_sparsekit(name):
    make, nnz = PATTERNS[name]
    W = _w(32, 64, seed=1)
    _, s_sk, _, s_gk = _pair(W, make)
    torch.testing.assert_close(s_gk.kth_largest(None, nnz), s_sk.kth_largest(None, nnz))
    torch.testing.assert_close(s_gk.mid_kth_largest(None, nnz, k_weight=0.5), s_sk.kth_mid(None, nnz, k_weight=0.5))
    torch.testing.assert_close(gk.kth_largest(W, 7, dim=1), sk_ops.kth_largest(W, 7, dim=1))
    torch.testing.assert_close(gk.mid_kth_largest(W, 7, dim=0, k_weight=2.0),
                               sk_ops.mid_kth_largest(W, 7, dim=0, k_weight=2.0))
    torch.testing.assert_close(gk.kth_largest(W, 11), sk_ops.kth_largest(W, 11))


def test_values_drive_selection_like_sparsekit():
    W, V = _w(16, 32, seed=2), _w(16, 32, seed=3)
    a, s_sk, b, s_gk = _pair(W, lambda L, w: L.ScopeSpec(L.BlockSpec(w, (1, 2)), (1, 4)))
    assert torch.equal(_one_mask(s_sk.get_masks(1, values=V)), _one_mask(s_gk.get_masks(1, values=V)))
    s_sk.hard_threshold(nnz=1, values=V)
    s_gk.hard_threshold(nnz=1, values=V)
    assert torch.equal(a, b)
    t = torch.rand(s_gk.grid_shape, generator=torch.Generator().manual_seed(4)) * 2
    a2, s_sk2, b2, s_gk2 = _pair(W, lambda L, w: L.ScopeSpec(L.BlockSpec(w, (1, 2)), (1, 4)))
    s_sk2.hard_threshold(thresholds=t)
    s_gk2.hard_threshold(thresholds=t)
    assert torch.equal(a2, b2)


def _attention(L, q, k, v, o):
    """Head-coupled blocks: row i of q/k/v with column i of o is one block (BlockCoupling), scopes of all heads."""
    specs = [L.BlockSpec(q, (1, -1)), L.BlockSpec(k, (1, -1)), L.BlockSpec(v, (1, -1)), L.BlockSpec(o, (-1, 1))]
    coupling = L.BlockCoupling(specs, [(0, 1), (0, 1), (0, 1), (1, 0)])
    return L.ScopeSpec(coupling, (4, 1))


def test_block_coupling_across_params_matches_sparsekit():
    q, k, v, o = _w(16, 8, seed=5), _w(16, 8, seed=6), _w(16, 8, seed=7), _w(8, 16, seed=8)
    ours = [t.clone() for t in (q, k, v, o)]
    theirs = [t.clone() for t in (q, k, v, o)]
    s_sk, s_gk = _attention(sk, *theirs), _attention(gk, *ours)
    m_sk = list(s_sk.get_masks(2).values())
    m_gk = list(s_gk.get_masks(2).values())
    for a, b in zip(m_sk, m_gk):
        assert torch.equal(a, b)
    s_sk.hard_threshold(nnz=2)
    s_gk.hard_threshold(nnz=2)
    for a, b in zip(theirs, ours):
        assert torch.equal(a, b)
    # a pruned head is gone everywhere: row i of q/k/v and column i of o together
    dead = ours[0].abs().sum(1) == 0
    assert int(dead.sum()) == 8
    for t in ours[1:3]:
        assert torch.equal(t.abs().sum(1) == 0, dead)
    assert torch.equal(ours[3].abs().sum(0) == 0, dead)


def test_scope_coupling_across_params_matches_sparsekit():
    def make(L, q, o):
        sq = L.ScopeSpec(L.BlockSpec(q, (1, 1)), (4, -1))
        so = L.ScopeSpec(L.BlockSpec(o, (1, 1)), (-1, 4))
        return L.ScopeCoupling([sq, so], [(0, 1), (1, 0)])

    q, o = _w(16, 8, seed=9), _w(8, 16, seed=10)
    qa, oa, qb, ob = q.clone(), o.clone(), q.clone(), o.clone()
    c_sk, c_gk = make(sk, qa, oa), make(gk, qb, ob)
    assert c_sk.grid_shape == c_gk.grid_shape == (4, 1)
    torch.testing.assert_close(c_gk.kth_largest(20, None), c_sk.kth_largest(20, None))
    c_sk.hard_threshold(nnz=20)
    c_gk.hard_threshold(nnz=20)
    assert torch.equal(qa, qb) and torch.equal(oa, ob)
    # SparseKit 0.1.5's ScopeCoupling.get_masks raises here (.view of a sliced mask); check
    # gradkit's masks against what hard_threshold kept, and 20 kept per aligned scope.
    mq, mo = c_gk.get_masks(20).values()
    assert torch.equal(mq, qb != 0) and torch.equal(mo, ob != 0)
    per_scope = mq.reshape(4, -1).sum(1) + mo.t().reshape(4, -1).sum(1)
    assert per_scope.tolist() == [20] * 4


def test_coupling_error_names_both_shapes():
    q, o = _w(16, 8), _w(8, 12)
    sq = gk.ScopeSpec(gk.BlockSpec(q, (1, 1)), (4, -1))
    so = gk.ScopeSpec(gk.BlockSpec(o, (1, 1)), (-1, 4))
    with pytest.raises(gk.CouplingError, match=r"\(3, 1\).*\(4, 1\)"):
        gk.ScopeCoupling([sq, so], [(0, 1), (1, 0)])


@pytest.mark.parametrize("block", [(1, 4), (1, 1)])
def test_soft_threshold_matches_sparsekit(block):
    W = _w(16, 32, seed=11)
    t = torch.rand(16, 1, generator=torch.Generator().manual_seed(12))
    a, s_sk, b, s_gk = _pair(W, lambda L, w: L.ScopeSpec(L.BlockSpec(w, block), (1, -1)))
    s_sk.soft_threshold(t)
    s_gk.soft_threshold(t)
    torch.testing.assert_close(b, a)
    H = torch.rand(16, 32, generator=torch.Generator().manual_seed(13)) + 0.5
    a, s_sk, b, s_gk = _pair(W, lambda L, w: L.ScopeSpec(L.BlockSpec(w, block), (1, -1)))
    s_sk.soft_threshold(t, conditioners=H, max_iter=60, atol=1e-12)
    s_gk.soft_threshold(t, conditioners=H, max_iter=60, atol=1e-12)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert (b == 0).any() and not torch.equal(b, W)


def test_soft_threshold_scale_fixed():
    """SparseKit 0.1.5 scales by sqrt(all elements of the tensor); gradkit by sqrt(elements per block)."""
    W = _w(16, 32, seed=14)
    t = torch.full((16, 1), 0.3)
    a, s_sk, b, s_gk = _pair(W, lambda L, w: L.ScopeSpec(L.BlockSpec(w, (1, 4)), (1, -1)))
    s_gk.soft_threshold(t, scale=True)
    s_sk.soft_threshold(t * 2.0)  # sqrt(4 elements per block), unscaled
    torch.testing.assert_close(b, a)
    c = W.clone()
    gk.ScopeSpec(gk.BlockSpec(c, (1, 4)), (1, -1)).soft_threshold(t * math.sqrt(16 * 32))
    assert not torch.equal(b, c)  # the whole-tensor scaling would be a different (much larger) step


def test_numel_per_scope_counts_elements():
    W = _w(8, 16)
    s_gk = gk.ScopeSpec(gk.BlockSpec(W, (1, 2)), (1, 4))
    s_sk = sk.ScopeSpec(sk.BlockSpec(W, (1, 2)), (1, 4))
    assert s_gk.numblk_per_scope() == s_sk.numblk_per_scope() == 4
    assert s_gk.numel_per_scope() == 8 and s_sk.numel_per_scope() == 4  # SparseKit returns the block count
    assert s_gk.sparsity_to_nnz(0.5) == s_sk.sparsity_to_nnz(0.5) == 2
    assert s_gk.grid_shape == s_sk.grid_shape and s_gk.numscp() == s_sk.numscp() and s_gk.numblk() == s_sk.numblk()


def test_ties_exact_by_default_keep_on_request():
    W = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    s_sk = sk.ScopeSpec(sk.BlockSpec(W.clone(), (1, 1)), (1, 4))
    s_gk = gk.ScopeSpec(gk.BlockSpec(W.clone(), (1, 1)), (1, 4))
    seed_rule = _one_mask(s_sk.get_masks(2))
    assert seed_rule.tolist() == [[True, True, True, False, True, True, True, True]]
    assert torch.equal(_one_mask(s_gk.get_masks(2, ties="keep")), seed_rule)
    assert _one_mask(s_gk.get_masks(2)).tolist() == [[True, True, False, False, True, True, False, False]]


def test_coupling_values_compared_with_values_norms():
    """SparseKit 0.1.5's ScopeCoupling.hard_threshold(values=V) computes thresholds from V's norms but
    compares them with the weights' own norms; gradkit keeps exactly the nnz best blocks by V."""
    q, o = _w(8, 4, seed=15), _w(4, 8, seed=16)
    Vq, Vo = _w(8, 4, seed=17), _w(4, 8, seed=18)
    bq, bo = gk.BlockSpec(q, (1, 1)), gk.BlockSpec(o, (1, 1))
    c = gk.ScopeCoupling([gk.ScopeSpec(bq, (-1, -1)), gk.ScopeSpec(bo, (-1, -1))], [(0, 1), (1, 0)])
    c.hard_threshold(nnz=10, values={bq: Vq, bo: Vo})
    kept = torch.cat([(q != 0).reshape(-1), (o != 0).reshape(-1)])
    scores = torch.cat([Vq.abs().reshape(-1), Vo.abs().reshape(-1)])
    assert int(kept.sum()) == 10
    assert torch.equal(kept.nonzero().squeeze(1).sort().values, scores.topk(10).indices.sort().values)


def test_builder_mirrors_sparsekit():
    W, U = _w(8, 16), _w(16, 8)
    b = (gk.SparsityBuilder().add_block(W, (1, 2), "W").add_block(U, (2, 1), "U")
         .add_scope("W", (1, -1), "sW").add_scope("U", (-1, 1), "sU")
         .couple_scopes(["sW", "sU"], [(0, 1), (1, 0)], "WU"))
    c = b.get_scope("WU")
    assert isinstance(c, gk.ScopeCoupling) and c.grid_shape == (8, 1) and c.numblk_per_scope() == 16
    assert [s for s in b.get_all_scopes()] == [c]
    with pytest.raises(KeyError, match="sW"):
        b.get_scope("sW")

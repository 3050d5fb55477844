"""Audit of the drop-in layers gradkit.compat.gradiend / gradkit.compat.sparsekit against the installed
peers (gradiend 0.2.3, SparseKit 0.1.5): code that swaps the import must keep working, with the same
results, or fail loudly where the compat module's docstring says it deliberately does.

SparseKit's references below call ``sparsekit.kernels`` on inputs under its small-tensor size, where
it runs ``torch.kthvalue`` (no Triton launch), so they are SparseKit's own CPU results.
"""
import copy
import pickle

import pytest
import torch

from gradiend.model.param_mapped import ParamMappedGradiendModel, _selected_positions_from_spec

import sparsekit as sk
import sparsekit.kernels as sk_kernels

from gradkit import ParamMap
from gradkit.compat.gradiend import accelerate
import gradkit.compat.sparsekit as gk


# ------------------------------------------------------------------ gradiend


def _gradiend_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    base(torch.randn(3, 16)).pow(2).sum().backward()
    idx = torch.randperm(32, generator=g)[:9]  # unsorted: GRADIEND and gradkit keep it in this order
    spec = {
        "0.weight": {"shape": (8, 16), "repr": "mask", "mask": torch.rand(8, 16, generator=g) < 0.4},
        "0.bias": {"shape": (8,), "repr": "all"},
        "2.weight": {"shape": (4, 8), "repr": "indices", "indices": idx},
    }
    n = ParamMap(spec).input_dim
    torch.manual_seed(seed)
    ref = ParamMappedGradiendModel(n, 3, spec, device=torch.device("cpu"))
    return base, ref, accelerate(copy.deepcopy(ref))


def _positions(model):
    return {k: _selected_positions_from_spec(v).tolist() for k, v in model.param_map.items()}


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert int(a.input_dim) == int(b.input_dim)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_accelerated_model_pickles_and_stays_accelerated(how):
    """types.MethodType patches pickled as getattr(model, '_extract_gradients'): loading failed. (pickle of
    the test's own bytes covers torch.save(model), which pickles the same way; nothing untrusted is loaded.)"""
    base, ref, fast = _gradiend_pair(1)
    back = pickle.loads(pickle.dumps(fast)) if how == "pickle" else copy.deepcopy(fast)
    assert back._gradkit_accelerated and back.extract_gradients.__self__ is back
    assert back.forward.__self__ is back and back.prune.__self__ is back
    flat = ref.extract_gradients(base)
    assert torch.equal(back.extract_gradients(base), flat)
    grads = {n: p.grad.clone() for n, p in base.named_parameters()}
    out_ref, out_back = ref(grads), back(grads)
    assert list(out_ref) == list(out_back)
    for k in out_ref:
        assert torch.equal(out_ref[k], out_back[k])
    imp = torch.rand(int(ref.input_dim), generator=torch.Generator().manual_seed(3))
    p_ref, m_ref = ref.prune(topk=7, importance=imp, return_mask=True)
    p_back, m_back = back.prune(topk=7, importance=imp, return_mask=True)
    assert torch.equal(m_ref, m_back)
    _same_model(p_ref, p_back)
    assert p_back.prune.__self__ is p_back  # the pruned copy is accelerated too


def _int_importance(n, big=False):
    vals = torch.randperm(n, generator=torch.Generator().manual_seed(11)).to(torch.int64) * 3
    if big == "f32":  # 2**24 + multiples of 3: float32 rounds the odd ones to even neighbours
        vals = vals + (1 << 24)
    elif big:  # distinct int64 values that float64 cannot tell apart (2**60 + small steps)
        vals = vals + (1 << 60)
    return vals


@pytest.mark.parametrize("kw", [dict(topk=9), dict(topk=0.4), dict(threshold=60), dict(threshold=30, topk=5),
                                dict(topk=9, big=True), dict(topk=0.3, big=True, mask=True),
                                dict(threshold=(1 << 24) + 61, big="f32"), dict(threshold=(1 << 24) + 61, topk=4, big="f32")])
def test_integer_importance_prunes_like_gradiend(kw):
    """gradkit refused integer importances (TypeError); GRADIEND ranks / thresholds them. GRADIEND's ParamMapped
    model compares `importance >= float(threshold)` in float32, which keeps 2**24 + 60 at a 2**24 + 61
    threshold; the compat layer does the same (ParamMap.prune itself compares integers exactly)."""
    kw = dict(kw)
    big, use_mask = kw.pop("big", False), kw.pop("mask", False)
    base, ref, fast = _gradiend_pair(2)
    n = int(ref.input_dim)
    kw["importance"] = _int_importance(n, big)
    if use_mask:
        kw["mask"] = torch.rand(n, generator=torch.Generator().manual_seed(5)) < 0.6
    p_ref, m_ref = ref.prune(return_mask=True, **kw)
    p_fast, m_fast = fast.prune(return_mask=True, **kw)
    assert m_ref.dtype == m_fast.dtype == torch.bool and torch.equal(m_ref, m_fast)
    assert _positions(p_ref) == _positions(p_fast)
    _same_model(p_ref, p_fast)
    assert torch.equal(p_ref.extract_gradients(base), p_fast.extract_gradients(base))


def test_integer_importance_errors_leave_the_model_untouched():
    base, ref, fast = _gradiend_pair(3)
    n = int(ref.input_dim)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    with pytest.raises(ValueError, match="threshold"):
        fast.prune(threshold=True, importance=_int_importance(n), inplace=True)
    with pytest.raises(ValueError):
        fast.prune(threshold=10 ** 6, importance=_int_importance(n), inplace=True)
    with pytest.raises(ValueError):  # GRADIEND: no dimensions left after the threshold
        ref.prune(threshold=10 ** 6, topk=3, importance=_int_importance(n))
    with pytest.raises(ValueError):
        fast.prune(threshold=10 ** 6, topk=3, importance=_int_importance(n), inplace=True)
    assert int(fast.input_dim) == n
    after = fast.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ sparsekit: module functions


def test_kth_largest_out_of_range_dim_is_an_error():
    """dim=2 of a 2-D tensor silently reduced dim 0 (dim % ndim), as SparseKit 0.1.5 does; an
    IndexError naming dim is documented instead."""
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for dim in (2, -3, 5):
        with pytest.raises(IndexError, match="dim"):
            gk.kth_largest(x, 1, dim=dim)
        with pytest.raises(IndexError, match="dim"):
            gk.mid_kth_largest(x, 1, dim=dim)
    torch.testing.assert_close(gk.kth_largest(x, 2, dim=-2), sk_kernels.kth_largest(x, 2, dim=-2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_kth_of_integer_tensors_matches_sparsekit(dtype, dim):
    """gradkit raised TypeError for integer tensors; SparseKit takes them (exact kth, float mid)."""
    x = torch.randint(0, 100, (5, 7), generator=torch.Generator().manual_seed(4)).to(dtype)
    flat = dim is None
    for k in (1, 2, 4):
        want = sk_kernels.kth_largest(x.reshape(-1) if flat else x, k, dim=0 if flat else dim)
        got = gk.kth_largest(x, k, dim=dim)
        assert got.dtype == want.dtype and torch.equal(got, want.squeeze() if flat else want)
        want = sk_kernels.mid_kth_largest(x.reshape(-1) if flat else x, k, dim=0 if flat else dim, k_weight=0.3)
        got = gk.mid_kth_largest(x, k, dim=dim, k_weight=0.3)
        assert got.dtype == want.dtype and torch.equal(got, want.squeeze() if flat else want)
    with pytest.raises(ValueError, match="k"):
        gk.kth_largest(x, 0, dim=1)
    with pytest.raises(ValueError, match="k"):
        gk.mid_kth_largest(x, 7, dim=1)
    with pytest.raises(ValueError, match="k_weight"):
        gk.mid_kth_largest(x, 2, dim=1, k_weight=-1.0)


# ------------------------------------------------------------------ sparsekit: specs


@pytest.mark.parametrize("block", [(1, 0), (0, 2), (-3, 4), (0, 0)])
def test_non_positive_block_shape_spans_the_dim_like_sparsekit(block):
    """SparseKit reads any block-shape entry <= 0 as the whole dim; gradkit refused all but -1."""
    W = torch.randn(8, 12, generator=torch.Generator().manual_seed(6))
    a, b = W.clone(), W.clone()
    s_sk = sk.ScopeSpec(sk.BlockSpec(a, block), ())
    s_gk = gk.ScopeSpec(gk.BlockSpec(b, block), ())
    assert s_gk.block.shape == s_sk.block.shape and s_gk.block.grid_shape == s_sk.block.grid_shape
    nnz = max(1, s_gk.numblk_per_scope() // 2)
    assert torch.equal(next(iter(s_gk.get_masks(nnz).values())), next(iter(s_sk.get_masks(nnz).values())))
    s_sk.hard_threshold(nnz=nnz)
    s_gk.hard_threshold(nnz=nnz)
    assert torch.equal(a, b)


def test_block_and_view_helpers_of_sparsekit_exist_and_agree():
    """BlockSpec.expand_block_tensor and View.block_view_of / broadcast_block_to_element /
    apply_multiplier / apply_mask were missing (AttributeError)."""
    t = torch.randn(8, 12, generator=torch.Generator().manual_seed(7))
    for bs in [(2, 3), (1, 12), (8, 1)]:
        for reorder, merge in [(True, False), (False, False), (True, True), (False, True)]:
            want = sk.View.block_view_of(t, bs, reorder, merge)
            got = gk.View.block_view_of(t, bs, reorder, merge)
            assert got.shape == want.shape and torch.equal(got, want)
            if not merge:
                assert got.data_ptr() == t.data_ptr()  # a view, as SparseKit's
        grid = torch.randn(8 // bs[0], 12 // bs[1], generator=torch.Generator().manual_seed(8))
        for fake in (False, True):
            want = sk.View.broadcast_block_to_element(grid, bs, fake)
            got = gk.View.broadcast_block_to_element(grid, bs, fake)
            assert got.shape == want.shape and torch.equal(got, want)
        a, b = t.clone(), t.clone()
        sk.View.from_existing(a).apply_multiplier(grid, bs)
        gk.View.from_existing(b).apply_multiplier(grid, bs)
        assert torch.equal(a, b)
        sk.View.from_existing(a).apply_mask(grid > 0, bs)
        gk.View.from_existing(b).apply_mask(grid > 0, bs)
        assert torch.equal(a, b)
        flat = grid.reshape(-1)
        assert torch.equal(gk.BlockSpec(t, bs).expand_block_tensor(flat), sk.BlockSpec(t, bs).expand_block_tensor(flat))


def test_builder_coupling_may_take_a_consumed_scope_name():
    """SparseKit lets couple_scopes reuse the name of a scope it consumes; gradkit raised ValueError."""
    def build(L, W, U):
        return (L.builder.SparsityBuilder() if L is sk else L.SparsityBuilder()) \
            .add_block(W, (1, 2), "W").add_block(U, (2, 1), "U") \
            .add_scope("W", (1, -1), "sW").add_scope("U", (-1, 1), "sU") \
            .couple_scopes(["sW", "sU"], [(0, 1), (1, 0)], "sW")

    W, U = torch.randn(8, 16), torch.randn(16, 8)
    b_sk, b_gk = build(sk, W.clone(), U.clone()), build(gk, W.clone(), U.clone())
    c_sk, c_gk = b_sk.get_scope("sW"), b_gk.get_scope("sW")
    assert isinstance(c_gk, gk.ScopeCoupling) and c_gk.grid_shape == c_sk.grid_shape
    assert len(b_gk.get_all_scopes()) == len(b_sk.get_all_scopes()) == 1
    with pytest.raises(ValueError, match="sU"):  # still no shadowing of a scope that stays
        (gk.SparsityBuilder().add_block(W, (1, 2), "W").add_block(U, (2, 1), "U")
         .add_scope("W", (1, -1), "sW").add_scope("U", (-1, 1), "sU").add_scope("W", (1, -1), "sW2")
         .couple_scopes(["sW", "sW2"], [(0, 1), (0, 1)], "sU"))


def test_documented_nnz_zero_and_conflicting_arguments():
    """Documented: nnz=0 keeps nothing (SparseKit raises); thresholds and nnz
    together raise before any write (SparseKit ignores nnz)."""
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(9))
    with pytest.raises((AssertionError, RuntimeError)):
        sk.ScopeSpec(sk.BlockSpec(W.clone(), (1, 2)), (1, 4)).hard_threshold(nnz=0)
    b = W.clone()
    s = gk.ScopeSpec(gk.BlockSpec(b, (1, 2)), (1, 4))
    assert s.sparsity_to_nnz(1.0) == 0
    assert not next(iter(s.get_masks(0).values())).any()
    with pytest.raises(ValueError, match="thresholds or nnz"):
        s.hard_threshold(thresholds=torch.zeros(s.grid_shape), nnz=2)
    assert torch.equal(b, W)
    s.hard_threshold(nnz=0)
    assert not b.any()

"""Audit s35: gradkit.compat.sparsekit and gradkit.obs.structured against SparseKit 0.1.5's StructuredOBS /
BlockSpec (the installed peer): names a SparseKit user imports, inverse Hessians checked before use, numpy
integers where ScopeSpec takes them, empty weights, and fp16 / bf16 weights pruned like the peer."""
import numpy as np
import pytest
import torch

import gradkit.compat.sparsekit as cs
import gradkit.scope as gk
from gradkit.obs import StructuredOBS


def _layer(M, K, seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K, generator=g) @ torch.randn(K, K, generator=g) * 0.3 + torch.randn(n, K, generator=g)
    return torch.randn(M, K, generator=g), X.T @ X


def _sparsekit():
    import sparsekit as sk  # installed wherever the suite runs (scripts/install-peers.sh): never skipped
    import sparsekit.tensor_ops as sk_ops
    from sparsekit.pruners.obs import StructuredOBS as SK

    if not torch.cuda.is_available():  # its Triton kth kernels need a GPU: route to its torch path
        sk_ops._kth_largest_impl = lambda x, k, dim=-1, **kw: torch.kthvalue(x, x.shape[dim] - k + 1, dim=dim).values
    return sk, SK


def _nm(W, block=(1, 1), scope=(1, 4)):
    return gk.ScopeSpec(gk.BlockSpec(W, block), scope)


# ---------------------------------------------------------------------------- the drop-in import


def test_compat_exports_structured_obs_and_it_prunes_like_sparsekit():
    """``from sparsekit import StructuredOBS`` -> ``from gradkit.compat.sparsekit import StructuredOBS`` (was an
    ImportError: the compat layer had the scope API only)."""
    from gradkit.compat.sparsekit import StructuredOBS as CompatOBS

    assert CompatOBS is StructuredOBS and "StructuredOBS" in cs.__all__
    sk, SK = _sparsekit()
    W0, H = _layer(8, 16, seed=1)
    Wa, Wb = W0.clone(), W0.clone()
    CompatOBS(cs.ScopeSpec(cs.BlockSpec(cs.View.from_existing(Wa), (1, 1)), (1, 4)), H, damp=0.01).prune(2)
    SK(sk.ScopeSpec(sk.BlockSpec(sk.View.from_existing(Wb), (1, 1)), (1, 4)), H, damp=0.01).prune(2)
    assert torch.equal(Wa != 0, Wb != 0)
    torch.testing.assert_close(Wa, Wb, rtol=1e-5, atol=1e-6)


def test_compat_blockspec_reduce_matches_sparsekit():
    """SparseKit's ``BlockSpec.reduce(values, reduce_fn)`` (was an AttributeError)."""
    sk, _ = _sparsekit()
    W = torch.randn(4, 6)
    V = torch.randn(4, 6)
    a = cs.BlockSpec(cs.View.from_existing(W), (2, 3))
    b = sk.BlockSpec(sk.View.from_existing(W), (2, 3))
    for values, fn in ((None, lambda t: t.amax(dim=(1, 3))), (V, lambda t: t.sum(dim=(1, 3)))):
        got, ref = a.reduce(values, fn), b.reduce(values, fn)
        assert got.shape == (2, 2)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="reduce_fn"):
        a.reduce(None, "sum")


# ---------------------------------------------------------------------------- inverse Hessians


def test_indefinite_inv_h_is_refused_by_name():
    """An indefinite ``inv_h`` whose 1x1 / 2x2 sub-blocks are all positive definite ran every method silently
    (prune local / full / split, true OBS) and moved the weights with it; now refused at construction."""
    K = 8
    inv = torch.eye(K) - 0.3 * (torch.ones(K, K) - torch.eye(K))  # eigenvalues 1.3 (x7) and -1.1
    W = torch.randn(4, K)
    with pytest.raises(ValueError, match=r"^inv_h: is not positive definite"):
        StructuredOBS(_nm(W), torch.eye(K), inv_h=inv)
    # a proper one (float32 or float64) is taken as given, and used instead of inverting H
    W0, H = _layer(4, K, seed=2)
    for dt in (torch.float32, torch.float64):
        C = StructuredOBS.compute_inverse(H.to(dt), 0.01)
        o = StructuredOBS(_nm(W0.clone()), H, damp=0.01, inv_h=C)
        assert o.inv_hessian is C


# ---------------------------------------------------------------------------- numpy scalars


def test_numpy_nnz_and_damp_are_taken_like_python_numbers():
    """ScopeSpec.get_masks / hard_threshold take numpy integers for nnz (and SparseKit's StructuredOBS any
    integer); StructuredOBS refused them with TypeError, and a numpy float32 damp with ValueError."""
    W0, H = _layer(8, 16, seed=3)
    Wa, Wb = W0.clone(), W0.clone()
    StructuredOBS(_nm(Wa), H, damp=np.float32(0.01)).prune_true_obs(np.int64(2))
    StructuredOBS(_nm(Wb), H, damp=float(np.float32(0.01))).prune_true_obs(2)
    assert torch.equal(Wa, Wb)
    Wc, Wd = W0.clone(), W0.clone()
    StructuredOBS(_nm(Wc), H, damp=0.01).prune(np.int32(1), compensate="full")
    StructuredOBS(_nm(Wd), H, damp=0.01).prune(1, compensate="full")
    assert torch.equal(Wc, Wd)
    o = StructuredOBS(_nm(W0.clone()), H)
    with pytest.raises(TypeError, match="nnz"):
        o.prune(np.float64(2.0))
    with pytest.raises(TypeError, match="nnz"):
        o.prune_true_obs(np.bool_(True))


# ---------------------------------------------------------------------------- empty weights


@pytest.mark.parametrize("shape,scope", [((0, 8), (1, 4)), ((4, 0), (1, 4)), ((0, 0), (1, 1))])
def test_empty_weight_is_a_no_op(shape, scope):
    """A weight with 0 rows or 0 columns has no scope to prune: every method is a no-op returning an empty
    keep mask (was a RuntimeError from reshaping the empty block grid; SparseKit raises IndexError)."""
    W = torch.randn(*shape)
    K = shape[1]
    o = StructuredOBS(_nm(W, scope=scope), torch.eye(K), damp=0.01)
    keep = o.prune_true_obs(1, return_mask=True)
    assert keep.shape == shape and keep.dtype == torch.bool
    assert o.prune(0, compensate="full", return_mask=True).shape == shape
    assert o.prune(1, compensate="interleaved", n_splits=2) is None
    assert o.prune_true_obs(0, mode="resolve") is None
    assert W.shape == shape
    with pytest.raises(ValueError, match="nnz"):  # arguments are still checked
        o.prune(-1)
    with pytest.raises(ValueError, match="hessian"):
        StructuredOBS(_nm(torch.randn(*shape), scope=scope), torch.eye(K + 1))


# ---------------------------------------------------------------------------- low-precision weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("run", ["local", "split", "true"])
def test_half_weights_pruned_like_sparsekit(dtype, run):
    """fp16 / bf16 weights: both prune a float32 copy and round once on the way back, so the masks and the
    rounded weights agree with the peer's (true OBS with the peer's factors in float32)."""
    sk, SK = _sparsekit()
    W0, H = _layer(8, 24, seed=4)
    W0 = W0.to(dtype)
    outs = []
    for lib, cls in ((gk, StructuredOBS), (sk, SK)):
        w = W0.clone()
        blk = lib.BlockSpec(w if lib is gk else sk.View.from_existing(w), (1, 1))
        o = cls(lib.ScopeSpec(blk, (1, 4)), H, damp=0.01)
        if run == "true":
            o.prune_true_obs(2, ng=2, c_dtype=torch.float32)
        else:
            o.prune(2, compensate=run, n_splits=3)
        assert w.dtype == dtype
        outs.append(w)
    assert torch.equal(outs[0] != 0, outs[1] != 0)
    # one rounding of float32 results that differ by ~1e-6: at most one ulp of the weights' dtype apart
    ulp = torch.finfo(dtype).eps * outs[1].float().abs().clamp(min=torch.finfo(dtype).tiny)
    assert bool(((outs[0].float() - outs[1].float()).abs() <= ulp).all())

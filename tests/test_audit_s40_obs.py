"""Audit s40: gradkit's OBS pruning API (StructuredOBS, compute_inverse, sparsegpt / magnitude / obd, obs_layout)
against plain-PyTorch float64 brute force on tiny layers, the scale of H, dtypes, partial / sliced weights,
argument edge values, meta tensors, and weights left untouched when an error is raised.

Oracles are written here from the definitions: OBS cost of pruning a set P of a row is
``w_P^T C[P, P]^-1 w_P`` with ``C = (H + lam I)^-1``, the compensated row ``w - C[:, P] C[P, P]^-1 w_P``.
"""
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.obs import StructuredOBS, compute_inverse, magnitude, obd, obs_layout, sparsegpt
from gradkit.obs.baselines import sparsegpt_mask
from gradkit.scope import BlockSpec, ScopeSpec, View

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _layer(m, k, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g, dtype=F64) @ (torch.eye(k, dtype=F64) + 0.5 * torch.randn(k, k, generator=g,
                                                                                             dtype=F64))
    return torch.randn(m, k, generator=g, dtype=F64), X.T @ X


def _inv(H, damp):
    lam = damp * H.diagonal().mean() if damp < 1 else damp
    return torch.linalg.inv(H.double() + lam * torch.eye(H.shape[0], dtype=F64))


def _cost(w, C, P):
    return float(w[P] @ torch.linalg.solve(C[P][:, P], w[P])) if P else 0.0


def _nm(w, m=4, bk=1):
    return ScopeSpec(BlockSpec(w, (1, bk)), (1, m))


# ============================================================================ optimality, and the scale of H


@pytest.mark.parametrize("scale", [1 / 4096, 1.0, 64.0])  # H / N, X^T X of 4096 tokens, ... of 262144 tokens
@pytest.mark.parametrize("nnz", [7, 6, 5])  # 1, 2 (the closed form) and 3 pruned per row
def test_joint_true_obs_on_one_scope_per_row_is_the_exhaustive_optimum(scale, nnz):
    # DEFECT (fixed, structured.py): the peer's absolute 1e-8 on det(C_PP) (and on diag(C)) outweighed C once H was
    # the unnormalised X^T X the driver passes: with 2 pruned per row joint scoring chose a non-optimal subset in
    # 1/16 rows at scale 1 and 9/16 at scale 64 (1.2x to 9x the optimal OBS cost).
    g = torch.Generator().manual_seed(0)
    K, M = 8, 16
    X = torch.randn(4096, K, generator=g, dtype=F64) @ (torch.eye(K, dtype=F64) + 0.5 * torch.randn(K, K, generator=g,
                                                                                                  dtype=F64))
    W = torch.randn(M, K, generator=g, dtype=F64)
    H = X.T @ X * scale
    C = _inv(H, 0.01)
    w = W.float().clone()
    keep = StructuredOBS(_nm(w, K), H.float(), damp=0.01).prune_true_obs(nnz, scoring="joint", return_mask=True)
    for r in range(M):
        costs = {P: _cost(W[r], C, list(P)) for P in itertools.combinations(range(K), K - nnz)}
        best = min(costs, key=costs.get)
        got = tuple(j for j in range(K) if not keep[r, j])
        assert costs[got] <= costs[best] * (1 + 1e-4), (r, got, best)
        ref = W[r] - C[:, list(got)] @ torch.linalg.solve(C[list(got)][:, list(got)], W[r, list(got)])
        ref[list(got)] = 0
        torch.testing.assert_close(w[r].double(), ref, rtol=1e-4, atol=1e-4 * float(W[r].abs().max()))


RUNS = {
    "true independent": lambda o, n: o.prune_true_obs(n, ng=2, return_mask=True),
    "true joint": lambda o, n: o.prune_true_obs(n, ng=2, scoring="joint", return_mask=True),
    "true largest_first": lambda o, n: o.prune_true_obs(n, ng=1, order="largest_first", return_mask=True),
    "true fp16 factor": lambda o, n: o.prune_true_obs(n, ng=1, c_dtype=torch.float16, return_mask=True),
    "resolve": lambda o, n: o.prune_true_obs(n, mode="resolve", return_mask=True),
    "local": lambda o, n: o.prune(n, return_mask=True),
    "full": lambda o, n: o.prune(n, compensate="full", return_mask=True),
    "split": lambda o, n: o.prune(n, compensate="split", n_splits=2, return_mask=True),
    "interleaved": lambda o, n: o.prune(n, compensate="interleaved", n_splits=2, return_mask=True),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_masks_and_weights_invariant_to_the_scale_of_H(run):
    # the driver documents every pruner as invariant to a positive scale of H (it passes X^T X, no 1/N)
    W, H = _layer(8, 16, seed=4)
    outs = []
    for s in (1e-6, 1.0, 1e4, 1e8):
        w = W.float().clone()
        keep = RUNS[run](StructuredOBS(_nm(w), (H * s).float(), damp=0.01), 2)
        outs.append((keep, w))
    for keep, w in outs[1:]:
        assert torch.equal(keep, outs[0][0])
        tol = 3e-3 if "fp16" in run else 1e-4
        torch.testing.assert_close(w, outs[0][1], rtol=tol, atol=tol * float(W.abs().max()))


@pytest.mark.xfail(strict=True, reason="row-coupled independent scoring keeps the peer's absolute 1e-4 ridge on "
                   "C[b, b] (documented in StructuredOBS and gradkit.obs.driver), so its masks still depend on the scale "
                   "of H; making it relative changes the "
                   "masks that tests/test_obs.py compares with SparseKit (agreement 0.85 < its 0.9)")
def test_row_coupled_true_obs_masks_invariant_to_the_scale_of_H():
    W, H = _layer(32, 64, n=512, seed=19)
    masks = []
    for s in (1.0, 1e3):
        w = W.float().clone()
        scope = ScopeSpec(BlockSpec(View.row_pairs(w), (1, 1, 1, 16)), (1, 1, 2, 1))
        masks.append(StructuredOBS(scope, (H * s).float(), damp=0.01).prune_true_obs(1, ng=1, return_mask=True))
    assert torch.equal(masks[0], masks[1])


# ============================================================================ brute-force references


def _ref_local(W, C, gs, bk, nnz):
    out, keep = W.clone(), torch.ones(W.shape, dtype=torch.bool)
    e = gs * bk
    for r in range(W.shape[0]):
        for q in range(W.shape[1] // e):
            blocks = [list(range(q * e + b * bk, q * e + b * bk + bk)) for b in range(gs)]
            subs = [[c for b in S for c in blocks[b]] for S in itertools.combinations(range(gs), gs - nnz)]
            P = min(subs, key=lambda P: _cost(W[r], C, P))
            Kc = [c for c in range(q * e, q * e + e) if c not in P]
            out[r, Kc] -= C[Kc][:, P] @ torch.linalg.solve(C[P][:, P], W[r, P])
            out[r, P] = 0
            keep[r, P] = False
    return out, keep


@pytest.mark.parametrize("gs,bk,nnz", [(4, 1, 2), (2, 2, 1), (4, 2, 1), (8, 1, 3)])
def test_prune_local_equals_exhaustive_per_scope_obs(gs, bk, nnz):
    W, H = _layer(4, 16, seed=1)
    w = W.float().clone()
    keep = StructuredOBS(_nm(w, gs, bk), H.float(), damp=0.01).prune(nnz, return_mask=True)
    ref, rk = _ref_local(W, _inv(H, 0.01), gs, bk, nnz)
    assert torch.equal(keep, rk)
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-5 * float(W.abs().max()))


def _ref_true_obs(W, C0, slots, nnz, ng):
    """Literal per-row Schur recursion over ``slots`` (lists of columns, bk = 1), independent scoring."""
    out, keep = W.clone(), torch.ones(W.shape, dtype=torch.bool)
    for r in range(W.shape[0]):
        C, w = C0.clone(), W[r].clone()
        for b0 in range(0, len(slots), ng):
            P = []
            for sl in slots[b0:b0 + ng]:
                sc = [float(w[c] ** 2 / C[c, c]) for c in sl]
                P += [sl[b] for b in sorted(sorted(range(len(sl)), key=lambda b: sc[b])[:len(sl) - nnz])]
            w = w - C[:, P] @ torch.linalg.solve(C[P][:, P], w[P])
            w[P] = 0
            C = C - C[:, P] @ torch.linalg.solve(C[P][:, P], C[P, :])
            keep[r, P] = False
        out[r] = w
    return out, keep


@pytest.mark.parametrize("ng", [1, 2])
@pytest.mark.parametrize("name,view,slots", [
    ("holes", lambda w: View(w, (3, 2, 4), (16, 8, 1), 0), [[0, 1, 2, 3], [8, 9, 10, 11]]),
    ("offset", lambda w: View(w, (3, 2, 4), (16, 4, 1), 4), [[4, 5, 6, 7], [8, 9, 10, 11]]),
    ("strided columns", lambda w: View(w, (3, 8), (16, 2), 1), [[1, 3, 5, 7], [9, 11, 13, 15]]),
])
def test_true_obs_on_a_partial_view_equals_the_literal_recursion(ng, name, view, slots):
    # columns outside the view are free weights: compensated, never pruned
    W, H = _layer(3, 16, seed=3)
    w = W.float().clone()
    v = view(w)
    nd = len(v.shape)
    scope = ScopeSpec(BlockSpec(v, (1,) * nd), (1,) * (nd - 1) + (4,))
    keep = StructuredOBS(scope, H.float(), damp=0.01).prune_true_obs(2, ng=ng, return_mask=True)
    ref, rk = _ref_true_obs(W, _inv(H, 0.01), slots, 2, ng)
    assert torch.equal(keep, rk)
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-5 * float(W.abs().max()))


@pytest.mark.parametrize("how", ["local", "full", "split", "interleaved", "true", "resolve", "sgpt", "mag", "obd"])
def test_elements_outside_the_view_are_never_pruned(how):
    W, H = _layer(4, 16, seed=5)
    w = W.float().clone()
    scope = ScopeSpec(BlockSpec(View(w, (4, 8), (16, 1), 0), (1, 1)), (1, 4))
    if how == "true":
        StructuredOBS(scope, H.float(), damp=0.01).prune_true_obs(2)
    elif how == "resolve":
        StructuredOBS(scope, H.float(), damp=0.01).prune_true_obs(2, mode="resolve")
    elif how in ("local", "full", "split", "interleaved"):
        StructuredOBS(scope, H.float(), damp=0.01).prune(2, compensate=how, n_splits=2)
    elif how == "sgpt":
        sparsegpt(scope, H.float(), 2, inplace=True)
    elif how == "mag":
        magnitude(scope, 2, inplace=True)
    else:
        obd(scope, H.float(), 2, inplace=True)
    assert bool((w[:, 8:] != 0).all())
    assert bool(((w[:, :8] != 0).view(4, 2, 4).sum(-1) == 2).all())
    if how in ("local", "mag", "obd"):  # no compensation outside the scope
        assert torch.equal(w[:, 8:], W.float()[:, 8:])


def _plain_sparsegpt(W, H, elems, nnz, damp):
    """SparseGPT, float64, one lazy block: at the first column of every scope prune its nnz-complement of lowest
    sum w^2 / U_jj^2 (current weights; ties prune the higher block), spread each pruned weight's error by U."""
    W = W.clone()
    M, K = W.shape
    U = torch.linalg.cholesky(_inv(H, damp), upper=True)
    cols = elems % K
    first = cols.flatten(1).min(1).values
    prune = torch.zeros(M, K, dtype=torch.bool)
    for c in range(K):
        for s in (first == c).nonzero().flatten().tolist():
            r, cc = elems[s] // K, elems[s] % K
            sc = (W[r, cc] ** 2 / U.diagonal()[cc] ** 2).sum(1)
            for b in torch.sort(sc, descending=True, stable=True).indices[nnz:].tolist():
                prune[r[b], cc[b]] = True
        err = torch.where(prune[:, c], W[:, c], torch.zeros(M, dtype=F64)) / U[c, c]
        W[:, c:] -= err[:, None] * U[c, c:][None]
        W[prune[:, c], c] = 0
    return W, ~prune


@pytest.mark.parametrize("name,make", [
    ("2:4", lambda w: ScopeSpec(BlockSpec(w, (1, 1)), (1, 4))),
    ("1x2 blocks 2 of 4", lambda w: ScopeSpec(BlockSpec(w, (1, 2)), (1, 4))),
    ("coupled 2:4", lambda w: ScopeSpec(BlockSpec(View.pairs(w), (1, 1, 1, 2)), (1, 1, 4, 1))),
    ("2x1 blocks", lambda w: ScopeSpec(BlockSpec(w, (2, 1)), (1, 4))),
])
@pytest.mark.parametrize("nnz", [1, 2])
def test_sparsegpt_float64_equals_plain_sparsegpt(name, make, nnz):
    W, H = _layer(16, 16, seed=6)
    scope = make(W.clone())
    out, keep = sparsegpt(scope, H, nnz, damp=0.01, dtype=F64, return_mask=True)
    ref, rk = _plain_sparsegpt(W, H, obs_layout(scope).elems, nnz, 0.01)
    assert torch.equal(keep, rk)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    assert torch.equal(sparsegpt_mask(make(W.float().clone()), H.float(), nnz, damp=0.01), keep)


# ============================================================================ dtypes, weights that are views


@pytest.mark.parametrize("wdt", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("how", ["true", "local", "full"])
def test_low_and_high_precision_weights_are_pruned_in_float32_and_rounded_once(wdt, how):
    # documented: every method prunes a float32 copy and writes it back in the weight's dtype
    W, H = _layer(4, 16, seed=7)
    w, w32 = W.to(wdt).clone(), W.to(wdt).float().clone()
    for t in (w, w32):
        o = StructuredOBS(_nm(t), H.float(), damp=0.01)
        o.prune_true_obs(2) if how == "true" else o.prune(2, compensate=how)
    assert w.dtype == wdt
    assert torch.equal(w, w32.to(wdt))


@pytest.mark.parametrize("hdt", [torch.float16, torch.bfloat16, torch.float64])
def test_hessian_dtype_other_than_the_weight(hdt):
    W, H = _layer(4, 16, seed=8)
    H = H / H.diagonal().mean()  # representable in fp16
    w = W.float().clone()
    keep = StructuredOBS(_nm(w), H.to(hdt), damp=0.01).prune_true_obs(2, return_mask=True)
    Hq = H.to(hdt).double()  # what the pruner was given
    ref, rk = _ref_true_obs(W, _inv(Hq, 0.01), [list(range(q, q + 4)) for q in range(0, 16, 4)], 2, 64)
    assert torch.equal(keep, rk)
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-4 * float(W.abs().max()))
    assert compute_inverse(H.to(hdt)).dtype == (F64 if hdt == F64 else torch.float32)
    out = sparsegpt(_nm(W.float().clone()), H.to(hdt), 2)
    assert out.dtype == torch.float32 and bool(((out != 0).view(4, 4, 4).sum(-1) == 2).all())


@pytest.mark.parametrize("how", ["true", "sgpt", "mag"])
def test_weight_that_is_a_row_slice_of_a_larger_tensor(how):
    W, H = _layer(4, 16, seed=9)
    big = torch.full((10, 16), 7.0)
    big[3:7] = W.float()
    ref = W.float().clone()
    if how == "true":
        StructuredOBS(_nm(big[3:7]), H.float(), damp=0.01).prune_true_obs(2)
        StructuredOBS(_nm(ref), H.float(), damp=0.01).prune_true_obs(2)
    elif how == "sgpt":
        sparsegpt(_nm(big[3:7]), H.float(), 2, inplace=True)
        sparsegpt(_nm(ref), H.float(), 2, inplace=True)
    else:
        magnitude(_nm(big[3:7]), 2, inplace=True)
        magnitude(_nm(ref), 2, inplace=True)
    assert torch.equal(big[3:7], ref)
    assert bool((big[:3] == 7).all() and (big[7:] == 7).all())


def test_transposed_weight_is_refused():
    W, _ = _layer(4, 16)
    with pytest.raises(ValueError, match="contiguous"):
        StructuredOBS(_nm(W.float().T.contiguous().T), torch.eye(16))


@pytest.mark.parametrize("how", ["true", "prune", "sgpt", "mag", "obd"])
def test_parameter_leaf_stays_a_leaf_and_the_hessian_graph_is_not_kept(how):
    W, H = _layer(4, 16, seed=10)
    p = nn.Parameter(W.float().clone())
    Hg = H.float().clone().requires_grad_(True)
    ref = W.float().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True to a scalar" was warned
        if how in ("true", "prune"):
            o = StructuredOBS(_nm(p), Hg, damp=0.01)
            assert not o.inv_hessian.requires_grad
            o.prune_true_obs(2) if how == "true" else o.prune(2)
            o2 = StructuredOBS(_nm(ref), H.float(), damp=0.01)
            o2.prune_true_obs(2) if how == "true" else o2.prune(2)
        elif how == "sgpt":
            assert not sparsegpt(_nm(p), Hg, 2, inplace=True).requires_grad
            sparsegpt(_nm(ref), H.float(), 2, inplace=True)
        elif how == "obd":
            obd(_nm(p), Hg, 2, inplace=True)
            obd(_nm(ref), H.float(), 2, inplace=True)
        else:
            magnitude(_nm(p), 2, inplace=True)
            magnitude(_nm(ref), 2, inplace=True)
    assert p.is_leaf and p.requires_grad and p.grad_fn is None
    assert torch.equal(p.detach(), ref)


# ============================================================================ arguments


def _all(scope_w, H, nnz, **kw):
    """Every entry point on fresh copies of scope_w; returns the pruned weights."""
    outs = {}
    for how in ("true", "joint", "local", "full", "split", "interleaved", "resolve"):
        w = scope_w.clone()
        o = StructuredOBS(_nm(w), H, damp=0.01)
        if how in ("true", "joint", "resolve"):
            o.prune_true_obs(nnz, scoring="joint" if how == "joint" else "independent",
                             mode="resolve" if how == "resolve" else "obs", **kw.get("true", {}))
        else:
            o.prune(nnz, compensate=how, n_splits=2, **kw.get("prune", {}))
        outs[how] = w
    outs["sgpt"] = sparsegpt(_nm(scope_w.clone()), H, nnz)
    outs["mag"] = magnitude(_nm(scope_w.clone()), nnz)
    outs["obd"] = obd(_nm(scope_w.clone()), H, nnz)
    return outs


def test_nnz_zero_zeroes_every_scope_and_full_is_a_bitwise_noop():
    W, H = _layer(4, 16, seed=11)
    W = W.float()
    for how, out in _all(W, H.float(), 0).items():
        assert bool((out == 0).all()), how
    for nnz in (4, 5, np.int64(4), torch.tensor(9)):
        for how, out in _all(W, H.float(), nnz).items():
            assert torch.equal(out, W), (how, nnz)


@pytest.mark.parametrize("nnz,exc", [(True, TypeError), (2.0, TypeError), (-1, ValueError), ("2", TypeError),
                                     (None, TypeError), (torch.tensor(2.0), TypeError)])
def test_bad_nnz_is_refused_by_name_everywhere_with_the_weight_untouched(nnz, exc):
    W, H = _layer(4, 16, seed=12)
    w = W.float().clone()
    o = StructuredOBS(_nm(w), H.float())
    calls = [lambda: o.prune_true_obs(nnz), lambda: o.prune(nnz), lambda: sparsegpt(_nm(w), H.float(), nnz, inplace=True),
             lambda: sparsegpt_mask(_nm(w), H.float(), nnz), lambda: magnitude(_nm(w), nnz, inplace=True),
             lambda: obd(_nm(w), H.float(), nnz, inplace=True)]
    for f in calls:
        with pytest.raises(exc, match=r"^nnz: "):
            f()
    assert torch.equal(w, W.float())


def test_numpy_and_tensor_integers_are_taken_like_ints():
    # nnz took numpy integers, chunk_size / ng / n_splits / block_size refused them (ValueError "expected an int")
    W, H = _layer(4, 16, seed=13)
    W, H = W.float(), H.float()
    a, b = W.clone(), W.clone()
    StructuredOBS(_nm(a), H).prune_true_obs(np.int64(2), ng=np.int64(2), chunk_size=np.int32(2))
    StructuredOBS(_nm(b), H).prune_true_obs(2, ng=2, chunk_size=2)
    assert torch.equal(a, b)
    a, b = W.clone(), W.clone()
    StructuredOBS(_nm(a), H).prune(torch.tensor(2), compensate="split", n_splits=np.int64(2), block_size=np.int64(8))
    StructuredOBS(_nm(b), H).prune(2, compensate="split", n_splits=2, block_size=8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("call,arg", [
    (lambda o: o.prune_true_obs(2, chunk_size=4.0), "chunk_size"),
    (lambda o: o.prune_true_obs(2, ng=2.5), "ng"),
    (lambda o: o.prune_true_obs(2, ng=True), "ng"),
    (lambda o: o.prune_true_obs(2, chunk_size=0), "chunk_size"),
    (lambda o: o.prune(2, n_splits=1.0), "n_splits"),
    (lambda o: o.prune(2, block_size=0), "block_size"),
    (lambda o: o.prune_true_obs(2, return_mask=1), "return_mask"),
    (lambda o: o.prune(2, return_mask="yes"), "return_mask"),
    (lambda o: o.prune_true_obs(2, progress="yes"), "progress"),
    (lambda o: o.prune_true_obs(2, progress_fn=3), "progress_fn"),
])
def test_bad_arguments_are_refused_by_name_with_the_weight_untouched(call, arg):
    W, H = _layer(4, 16, seed=14)
    w = W.float().clone()
    with pytest.raises((TypeError, ValueError), match=rf"^{arg}: "):
        call(StructuredOBS(_nm(w), H.float()))
    assert torch.equal(w, W.float())


def test_progress_callable_gets_one_message_per_chunk():
    W, H = _layer(4, 16, seed=15)
    msgs = []
    StructuredOBS(_nm(W.float().clone()), H.float()).prune_true_obs(2, chunk_size=1, progress=msgs.append)
    assert msgs == [f"true OBS {i}/4" for i in range(1, 5)] + [""]


# ============================================================================ bad Hessians, meta tensors


def _bad_hessians(H):
    out = {}
    A = H.clone()
    A[0, 1] += 5 * float(H.abs().max())
    out["asymmetric"] = (A, "symmetric")
    A = H.clone()
    A[2, 2] = float("nan")
    out["nan"] = (A, "NaN")
    A = H.clone()
    A[2, 3] = A[3, 2] = float("inf")
    out["inf"] = (A, "Inf")
    A = H.clone()
    A[3, 3] = -float(H.diagonal().mean())  # indefinite, with a negative diagonal entry (what OBD reads)
    out["indefinite"] = (A, "positive definite|negative diagonal")
    out["int"] = (torch.eye(H.shape[0], dtype=torch.int64), "floating")
    out["wrong K"] = (torch.eye(H.shape[0] - 1), "columns")
    return out


@pytest.mark.parametrize("bad", ["asymmetric", "nan", "inf", "indefinite", "int", "wrong K"])
@pytest.mark.parametrize("how", ["true", "local", "sgpt", "obd"])
def test_bad_hessian_refused_by_name_with_the_weight_untouched(bad, how):
    W, H = _layer(4, 16, seed=16)
    Hb, pat = _bad_hessians(H.float())[bad]
    w = W.float().clone()
    with pytest.raises((ValueError, TypeError), match=rf"^hessian: .*({pat})"):
        if how == "true":
            StructuredOBS(_nm(w), Hb, damp=0.01).prune_true_obs(2)
        elif how == "local":
            StructuredOBS(_nm(w), Hb, damp=0.01).prune(2)
        elif how == "sgpt":
            sparsegpt(_nm(w), Hb, 2, inplace=True)
        else:
            obd(_nm(w), Hb, 2, damp=0.01, inplace=True)
    assert torch.equal(w, W.float())


def test_dead_input_with_damp_zero():
    W, H = _layer(4, 16, seed=17)
    H[:, 5] = 0
    H[5, :] = 0
    C = compute_inverse(H, 0.0)
    assert bool(torch.isfinite(C).all()) and float(C[5, 5]) > 0 and bool((C[5, :5] == 0).all())
    w = W.float().clone()
    keep = StructuredOBS(_nm(w), H.float(), damp=0.0).prune_true_obs(2, return_mask=True)
    assert not bool(keep[:, 5].any())  # a dead input's weights are free: pruned first


@pytest.mark.parametrize("where", ["weight", "hessian", "inv_h"])
def test_meta_tensors_are_refused_by_name(where):
    # torch's "Tensor.item() cannot be called on meta tensors" named no argument
    W, H = _layer(4, 16, seed=18)
    w = W.float().to("meta") if where == "weight" else W.float().clone()
    h = H.float().to("meta") if where == "hessian" else H.float()
    want = {"weight": r"^scope: .*meta", "hessian": r"^hessian: .*meta", "inv_h": r"^inv_h: .*meta"}[where]
    calls = [lambda: StructuredOBS(_nm(w), h, inv_h=torch.eye(16, device="meta") if where == "inv_h" else None)]
    if where != "inv_h":
        calls += [lambda: sparsegpt(_nm(w), h, 2), lambda: obd(_nm(w), h, 2)]
    if where == "weight":
        calls += [lambda: magnitude(_nm(w), 2), lambda: obs_layout(_nm(w))]
    if where == "hessian":
        calls += [lambda: compute_inverse(h), lambda: sparsegpt_mask(_nm(w), h, 2)]
    for f in calls:
        with pytest.raises(ValueError, match=want):
            f()


# ============================================================================ errors raised mid-way


@pytest.mark.parametrize("how", ["resolve", "full", "sgpt"])
def test_fp16_overflow_raises_and_leaves_the_weight_untouched(how):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, generator=g)
    X = torch.cat([x, x + 1e-3 * torch.randn(200, 7, generator=g)], 1)  # nearly collinear inputs
    H = X.T @ X
    W = torch.full((2, 8), 60000.0).half()
    W[:, 1::2] = -60000
    w = W.clone()
    with pytest.raises(RuntimeError, match="overflow"):
        if how == "sgpt":
            sparsegpt(_nm(w), H, 2, damp=1e-6, inplace=True)
        elif how == "full":
            StructuredOBS(_nm(w), H, damp=1e-6).prune(2, compensate="full")
        else:
            StructuredOBS(_nm(w), H, damp=1e-6).prune_true_obs(2, mode="resolve")
    assert torch.equal(w, W)

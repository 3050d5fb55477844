"""Audit s35: StructuredOBS on dead inputs, argument checks, and the split inverse's device.

A dead input (``H[j, j] == 0``: always 0 in calibration) makes its weights free to prune. StructuredOBS decoupled
the dead diagonal (a safe inverse, kept) but then scored those weights against that diagonal as costly, keeping
them and pruning live weights instead, in every method. The oracles below are plain float64 recomputations of each
method from its description (one row, one scope at a time), with the dead weights scored as zero.
"""
from itertools import combinations

import numpy as np
import pytest
import torch
from torch import nn

import gradkit.scope as gk
from gradkit.obs import StructuredOBS, collect_hessians, damped_hessian, output_error, prune_model, resolve, sparsegpt
from gradkit.obs.structured import _active_inverse

F64 = torch.float64
EPS = 1e-8  # the scoring ridge on C[P, P] (the peer's)


def _layer(m, k, dead, n=200, seed=0, corr=0.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g, dtype=F64)
    if corr:
        X = X @ (torch.eye(k, dtype=F64) + corr * torch.randn(k, k, generator=g, dtype=F64))
    X[:, dead] = 0.0
    W = torch.randn(m, k, generator=g, dtype=F64)
    X, W = X.float(), W.float()
    return W, X, X.T @ X


def _inv64(H, damp):
    """(H + lam I)^-1 in float64: lam = damp * mean(diag H) (damp < 1); dead diagonal entries set to the mean of the
    live ones (gradkit.obs.metrics' documented rule, kept)."""
    H = H.to(F64).clone()
    d = H.diagonal()
    lam = damp * float(d.mean()) if damp < 1 else float(damp)
    dead = d == 0
    d[dead] = d[~dead].mean()
    d += lam
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def _scopes(M, K, R, m):
    """(row group, slot) -> element list [(r, c)] of each (R rows x m columns) scope of 1 x 1 blocks."""
    return [[[(g * R + r, q * m + c) for r in range(R) for c in range(m)] for q in range(K // m)]
            for g in range(M // R)]


def _first_min(costs):
    best = min(costs)
    return costs.index(best)


def _restore(out, W, keep, dead):
    out = out.clone()
    out[~keep] = 0
    kd = keep.clone()
    kd[:, [j for j in range(W.shape[1]) if j not in dead]] = False
    out[kd] = W.to(F64)[kd]  # dead weights the pattern keeps keep their value
    return out


def _ref_true_obs(W, H, damp, R, m, nnz, ng, dead, scoring="independent"):
    """Per-row OBS with Schur downdates, literally: per row group, batches of ng scope slots decided from the rows'
    current weights and inverses (dead weights zeroed), each row then compensated with its own inverse and
    downdated, C_r <- C_r - C_r[:, P] C_r[P, P]^-1 C_r[P, :]."""
    C = _inv64(H, damp)
    M, K = W.shape
    w = W.to(F64).clone()
    w[:, dead] = 0
    keep = torch.ones(M, K, dtype=torch.bool)
    npr = R * m - nnz
    for slots in _scopes(M, K, R, m):
        rows = sorted({r for r, _ in slots[0]})
        Cr = {r: C.clone() for r in rows}
        for q0 in range(0, len(slots), ng):
            P = {r: [] for r in rows}
            for elems in slots[q0:q0 + ng]:
                if scoring == "joint":
                    subs = list(combinations(range(len(elems)), npr))
                    costs = []
                    for s in subs:
                        cost = 0.0
                        for r in rows:
                            cols = [elems[i][1] for i in s if elems[i][0] == r]
                            if cols:
                                A = Cr[r][cols][:, cols] + EPS * torch.eye(len(cols), dtype=F64)
                                cost += float(w[r, cols] @ torch.linalg.solve(A, w[r, cols]))
                        costs.append(cost)
                    chosen = subs[_first_min(costs)]
                else:
                    ridge = EPS if R == 1 else 1e-4  # a row-coupled block's own cost carries a 1e-4 ridge
                    costs = [float(w[r, c] ** 2 / (Cr[r][c, c] + ridge)) for r, c in elems]
                    chosen = sorted(range(len(elems)), key=lambda i: (costs[i], i))[:npr]
                for i in chosen:
                    P[elems[i][0]].append(elems[i][1])
            for r in rows:
                p = sorted(P[r])
                if not p:
                    continue
                A = Cr[r][p][:, p]
                w[r] -= Cr[r][:, p] @ torch.linalg.solve(A, w[r, p])
                Cr[r] = Cr[r] - Cr[r][:, p] @ torch.linalg.solve(A, Cr[r][p, :])
                w[r, p] = 0
                keep[r, p] = False
    return _restore(w, W, keep, dead), keep


def _select_shared(w, C, elems, npr):
    """The prune subset of one scope with the lowest sum over its rows of w_P^T (C[P, P] + eps I)^-1 w_P."""
    rows = sorted({r for r, _ in elems})
    subs = list(combinations(range(len(elems)), npr))
    costs = []
    for s in subs:
        cost = 0.0
        for r in rows:
            cols = [elems[i][1] for i in s if elems[i][0] == r]
            if cols:
                A = C[cols][:, cols] + EPS * torch.eye(len(cols), dtype=F64)
                cost += float(w[r, cols] @ torch.linalg.solve(A, w[r, cols]))
        costs.append(cost)
    return {r: sorted(elems[i][1] for i in subs[_first_min(costs)] if elems[i][0] == r) for r in rows}


def _ref_local(W, H, damp, R, m, nnz, dead):
    """Shared inverse, compensation inside each scope: w_K -= C[K, P] (C[P, P] + eps I)^-1 w_P."""
    C = _inv64(H, damp)
    M, K = W.shape
    w = W.to(F64).clone()
    w[:, dead] = 0
    out = w.clone()
    keep = torch.ones(M, K, dtype=torch.bool)
    for slots in _scopes(M, K, R, m):
        for elems in slots:
            for r, p in _select_shared(w, C, elems, R * m - nnz).items():
                if not p:
                    continue
                kc = [c for rr, c in elems if rr == r and c not in p]
                y = torch.linalg.solve(C[p][:, p] + EPS * torch.eye(len(p), dtype=F64), w[r, p])
                out[r, kc] -= C[kc][:, p] @ y
                out[r, p] = 0
                keep[r, p] = False
    return _restore(out, W, keep, dead), keep


def _ref_split(W, H, damp, R, m, nnz, dead, n_splits, reselect):
    """Shared inverse, full compensation: slots left to right, each w -= (C[P, P]^-1 w_P)^T C[P, :]. Split k > 0
    uses the damped inverse of H on the columns not yet frozen (zero elsewhere); n_splits=1 is "full".
    Masks from the original weights and C, or (reselect: "interleaved") per split from the current ones."""
    M, K = W.shape
    C0 = _inv64(H, damp)
    w = W.to(F64).clone()
    w[:, dead] = 0
    keep = torch.ones(M, K, dtype=torch.bool)
    scopes = _scopes(M, K, R, m)
    Q = len(scopes[0])
    chosen = None if reselect else [[_select_shared(w, C0, e, R * m - nnz) for e in g] for g in scopes]
    per = -(-Q // n_splits)
    frozen = []
    for k in range(n_splits):
        qs = range(k * per, min(Q, (k + 1) * per))
        if k == 0:
            C = C0
        else:
            act = [j for j in range(K) if j not in frozen]
            C = torch.zeros(K, K, dtype=F64)
            C[np.ix_(act, act)] = _inv64(H[act][:, act], damp)
        for q in qs:
            for g, slots in enumerate(scopes):
                ch = _select_shared(w, C, slots[q], R * m - nnz) if reselect else chosen[g][q]
                for r, p in ch.items():
                    if p:
                        w[r] -= torch.linalg.solve(C[p][:, p], w[r, p]) @ C[p, :]
                        keep[r, p] = False
            frozen += [q * m + c for c in range(m)]
    return _restore(w, W, keep, dead), keep


def _spec(W, R=1, m=4):
    return gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (R, m))


def _check(got, keep, ref, ref_keep, W, dead):
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(got.to(F64), ref, rtol=1e-5, atol=1e-5)
    assert bool((got[~keep] == 0).all())
    kd = keep[:, dead]
    assert torch.equal(got[:, dead][kd], W[:, dead][kd])  # kept dead weights untouched, bit for bit


# ============================================================================ the audit's example


METHODS = {
    "true": (lambda o: o.prune_true_obs(2, return_mask=True), 0.0946),
    "local": (lambda o: o.prune(2, compensate="local", return_mask=True), 0.0974),
    "full": (lambda o: o.prune(2, compensate="full", return_mask=True), 0.0946),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_brief_example_dead_input_weights_pruned_first(method):
    # 2:4, 16 inputs, input 3 dead, damp=0.01: every row kept its dead-input weight (4 of them pruned live weights
    # instead; errors 0.110 / 0.113 / 0.110), now the result of pruning with W[:, 3] = 0 first
    W, X, H = _layer(8, 16, [3])
    fn, err = METHODS[method]
    w = W.clone()
    keep = fn(StructuredOBS(_spec(w), H, damp=0.01))
    assert not bool(keep[:, 3].any()) and bool((w[:, 3] == 0).all())
    assert output_error(W, w, X=X) == pytest.approx(err, abs=5e-4)
    w0 = W.clone()
    w0[:, 3] = 0
    assert torch.equal(fn(StructuredOBS(_spec(w0), H, damp=0.01)), keep)
    torch.testing.assert_close(w, w0, rtol=0, atol=0)


# ============================================================================ every method vs float64 oracles

# dead inputs: three of group 0 (one of them stays kept at 2:4: a free choice, ties to the lowest columns), one of
# group 2 (pruned), none elsewhere
DEAD = [0, 1, 2, 9]


@pytest.mark.parametrize("ng,scoring", [(1, "independent"), (64, "independent"), (2, "joint")])
def test_true_obs_nm_matches_float64_schur_recursion(ng, scoring):
    W, X, H = _layer(6, 16, DEAD, seed=1, corr=0.3)
    w = W.clone()
    keep = StructuredOBS(_spec(w), H, damp=0.01).prune_true_obs(2, ng=ng, scoring=scoring, return_mask=True)
    ref, ref_keep = _ref_true_obs(W, H, 0.01, 1, 4, 2, ng, DEAD, scoring)
    _check(w, keep, ref, ref_keep, W, DEAD)
    assert bool(keep[:, 2].all()) and not bool(keep[:, [0, 1, 9]].any())


@pytest.mark.parametrize("compensate", ["local", "full", "split", "interleaved"])
def test_shared_prune_nm_matches_float64_oracle(compensate):
    W, X, H = _layer(6, 16, DEAD, seed=2, corr=0.3)
    w = W.clone()
    keep = StructuredOBS(_spec(w), H, damp=0.01).prune(2, compensate=compensate, n_splits=2, return_mask=True)
    if compensate == "local":
        ref, ref_keep = _ref_local(W, H, 0.01, 1, 4, 2, DEAD)
    else:
        ref, ref_keep = _ref_split(W, H, 0.01, 1, 4, 2, DEAD, 1 if compensate == "full" else 2,
                                   compensate == "interleaved")
    _check(w, keep, ref, ref_keep, W, DEAD)
    assert bool(keep[:, 2].all()) and not bool(keep[:, [0, 1, 9]].any())


@pytest.mark.parametrize("run", ["true", "local"])
def test_row_coupled_scopes_prune_dead_blocks_first(run):
    # 2 rows x 4 columns per scope, 4 of 8 blocks kept: the two blocks on dead input 5 are free and go first (the
    # local path is not the fused one here: scopes couple rows)
    dead = [5]
    W, X, H = _layer(4, 16, dead, seed=3, corr=0.3)
    w = W.clone()
    o = StructuredOBS(_spec(w, R=2), H, damp=0.01)
    if run == "true":
        keep = o.prune_true_obs(4, ng=1, return_mask=True)  # one slot per batch, as the peer decides them
        ref, ref_keep = _ref_true_obs(W, H, 0.01, 2, 4, 4, 1, dead)
    else:
        keep = o.prune(4, compensate="local", return_mask=True)
        ref, ref_keep = _ref_local(W, H, 0.01, 2, 4, 4, dead)
    _check(w, keep, ref, ref_keep, W, dead)
    assert not bool(keep[:, 5].any())


def test_rowwise_scope_prunes_only_free_weights_when_enough_are_dead():
    # one scope per row (unstructured), 5 dead inputs, 2 pruned per row: only dead weights go, nothing is
    # compensated (their inverse rows are decoupled) and the three dead weights kept keep their value
    dead = [1, 4, 6, 11, 13]
    W, X, H = _layer(5, 16, dead, seed=4, corr=0.3)
    for run in ("true", "joint", "resolve"):
        w = W.clone()
        o = StructuredOBS(gk.ScopeSpec(gk.BlockSpec(w, (1, 1)), (1, -1)), H, damp=0.01)
        if run == "resolve":
            keep = o.prune_true_obs(14, mode="resolve", return_mask=True)
        else:
            keep = o.prune_true_obs(14, scoring="independent" if run == "true" else "joint", return_mask=True)
        assert keep.sum(1).tolist() == [14] * 5
        assert not bool((~keep)[:, [j for j in range(16) if j not in dead]].any()), run
        assert torch.equal(w, W.masked_fill(~keep, 0.0)), run


# ============================================================================ prune_model agrees


@pytest.mark.parametrize("method", ["true_obs", "obs_local", "obs_full"])
def test_prune_model_prunes_dead_inputs_first_like_structured_obs(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    data = [torch.randn(32, 16) for _ in range(2)]
    for x in data:
        x[:, [3, 10]] = 0
    H = collect_hessians(net, data, progress=False)["0"]
    w = net[0].weight.detach().clone()
    keep = StructuredOBS(_spec(w), H, damp=0.01).prune_true_obs(2, return_mask=True) if method == "true_obs" else \
        StructuredOBS(_spec(w), H, damp=0.01).prune(2, compensate=method[4:], return_mask=True)
    assert not bool(keep[:, [3, 10]].any())
    prune_model(net, data, "2:4", method=method, damp=0.01, progress=False)
    assert torch.equal(net[0].weight.detach(), w)


# ============================================================================ the split inverse's device


def test_split_inverse_indexes_the_hessian_on_its_own_device():
    # a CPU H with a CUDA weight raised a device mismatch in the second split (H indexed with indices on the
    # weight's device). The split's inverse now comes from one helper that indexes and inverts H where it lives and
    # builds C on the weight's device: checked here with "meta" standing in for a device H is not on (the
    # end-to-end CUDA weight / CPU H run needs a GPU)
    W, X, H = _layer(4, 16, [3], seed=5)
    frozen = torch.zeros(16, dtype=torch.bool)
    frozen[:4] = True
    C, act = _active_inverse(H, frozen, 0.01, torch.device("cpu"))
    ref = torch.zeros(16, 16, dtype=F64)
    ref[4:, 4:] = _inv64(H[4:, 4:], 0.01)
    torch.testing.assert_close(C.to(F64), ref, rtol=1e-4, atol=1e-9)
    assert act.tolist() == list(range(4, 16))
    Cm, actm = _active_inverse(H, frozen, 0.01, torch.device("meta"))
    assert Cm.device.type == "meta" and actm.device.type == "meta" and Cm.shape == (16, 16)


# ============================================================================ argument checks


@pytest.mark.parametrize("arg", ["progress", "progress_fn"])
@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_progress_must_be_bool_or_callable(arg, bad):
    W, X, H = _layer(4, 8, [], seed=6)
    w = W.clone()
    o = StructuredOBS(_spec(w), H, damp=0.01)
    with pytest.raises(TypeError, match=rf"^{arg}: expected None, a bool or a callable"):
        o.prune_true_obs(2, **{arg: bad})
    assert torch.equal(w, W)
    msgs = []
    o.prune_true_obs(2, **{arg: msgs.append})  # callables and bools still work
    assert msgs and msgs[-1] == ""
    StructuredOBS(_spec(W.clone()), H, damp=0.01).prune_true_obs(2, **{arg: False})


def test_damp_must_be_a_real_number():
    W, X, H = _layer(4, 8, [], seed=7)
    spec = _spec(W.clone())
    keep = torch.ones(4, 8, dtype=torch.bool)
    calls = [lambda d: damped_hessian(H, d), lambda d: resolve(W, H, keep, damp=d),
             lambda d: sparsegpt(_spec(W.clone()), H, 2, damp=d), lambda d: StructuredOBS(spec, H, damp=d)]
    for call in calls:
        for bad in ("0.1", b"0.1", True, 0.1j, None):
            with pytest.raises(TypeError, match=r"^damp: expected a real number"):
                call(bad)
        for ok in (np.float32(0.1), np.float64(0.1), np.int64(2), 0.1, 0):
            call(ok)
    with pytest.raises(TypeError, match=r"^damp:"):
        prune_model(nn.Linear(8, 4), [torch.randn(4, 8)], "2:4", damp="0.1", progress=False)
    with pytest.raises(ValueError, match=r"^damp: expected a finite number >= 0"):
        damped_hessian(H, float("nan"))

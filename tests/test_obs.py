"""StructuredOBS: the fast paths against float64 literal references, SparseKit 0.1.5, brute-force
least squares, quality orderings, pattern exactness and bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradkit.scope as gk
from gradkit.kernels.reference.obs import brute_force_resolve, shared_obs_reference, true_obs_reference
from gradkit.obs import StructuredOBS, output_error, sparsegpt
from gradkit.obs import structured as S

PATTERNS = {
    "2:4": (8, 32, lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 1)), (1, 4)), 2),
    "4:8": (8, 32, lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 1)), (1, 8)), 4),
    "1x2 blocks, 2 of 4": (8, 32, lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 2)), (1, 4)), 2),
    "coupled 2:4": (8, 32, lambda L, W: L.ScopeSpec(L.BlockSpec(L.View(
        W, (W.shape[0], W.shape[1] // 16, 8, 2), (W.shape[1], 16, 1, 8)), (1, 1, 1, 2)), (1, 1, 4, 1)), 2),
    "16-col blocks, 8-row coupling": (16, 64, lambda L, W: L.ScopeSpec(L.BlockSpec(L.View(
        W, (W.shape[0] // 16, 8, 2, W.shape[1]), (16 * W.shape[1], W.shape[1], 8 * W.shape[1], 1)),
        (1, 1, 1, 16)), (1, 1, 2, 1)), 1),
}
UNCOUPLED = ["2:4", "4:8", "1x2 blocks, 2 of 4", "coupled 2:4"]


def _layer(M, K, n=256, seed=0, decay=False):
    g = torch.Generator().manual_seed(seed)
    if decay:  # calibration inputs with a decaying spectrum
        X = torch.randn(n, K, generator=g) @ (torch.randn(K, K, generator=g) * torch.logspace(0, -2, K)[None, :])
    else:
        X = torch.randn(n, K, generator=g) @ torch.randn(K, K, generator=g) * 0.3 + torch.randn(n, K, generator=g)
    return torch.randn(M, K, generator=g), X


def _obs(name, W, H, damp=0.01):
    M, K, make, nnz = PATTERNS[name]
    return StructuredOBS(make(gk, W), H, damp=damp), nnz


def _close(a, b, tol):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max()) < tol


# --------------------------------------------------------------------------- vs the literal recursion


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("scoring,order", [("independent", "left_to_right"), ("joint", "left_to_right"),
                                           ("independent", "largest_first")])
def test_true_obs_matches_literal_schur_recursion(name, scoring, order):
    M, K, _, _ = PATTERNS[name]
    W0, X = _layer(M, K)
    H = X.T @ X
    W = W0.clone()
    o, nnz = _obs(name, W, H)
    if scoring == "joint" and o.plan.coupled:  # documented refusal, before any work
        with pytest.raises(NotImplementedError, match="joint"):
            o.prune_true_obs(nnz, scoring="joint")
        assert torch.equal(W, W0)
        return
    ng = 1 if o.plan.coupled else 3
    so = o._slot_order(W0.clone(), o._c32(), o.blocks_per_scope - nnz, order)
    ref = true_obs_reference(W0, o.inv_hessian, o.plan.group_rows, o.plan.t_col[so], o.plan.t_lrow[so], ng,
                             o.blocks_per_scope - nnz, scoring, o.plan.coupled)
    keep = o.prune_true_obs(nnz, ng=ng, scoring=scoring, order=order, chunk_size=4, return_mask=True)
    assert torch.equal(W != 0, ref != 0)
    assert torch.equal(keep, ref != 0)
    assert _close(W, ref, 1e-5)


@settings(max_examples=15)
@given(rows=st.integers(1, 12), scopes=st.integers(1, 12), ng=st.integers(1, 7), chunk=st.integers(1, 9),
       m=st.sampled_from([(4, 2), (4, 1), (8, 4), (8, 6), (2, 1)]), seed=st.integers(0, 2 ** 16))
def test_true_obs_property(rows, scopes, ng, chunk, m, seed):
    gsz, nnz = m
    K = scopes * gsz
    W0, X = _layer(rows, K, n=3 * K, seed=seed)
    H = X.T @ X
    W = W0.clone()
    o = StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (1, gsz)), H, damp=0.01)
    p = o.plan
    ref = true_obs_reference(W0, o.inv_hessian, p.group_rows, p.t_col, p.t_lrow, ng, gsz - nnz, "independent", False)
    o.prune_true_obs(nnz, ng=ng, chunk_size=chunk)
    assert torch.equal(W != 0, ref != 0)
    assert _close(W, ref, 1e-4)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("compensate", ["local", "full"])
def test_prune_matches_literal_reference(name, compensate):
    M, K, _, _ = PATTERNS[name]
    W0, X = _layer(M, K, seed=1)
    W = W0.clone()
    o, nnz = _obs(name, W, X.T @ X)
    ref = shared_obs_reference(W0, o.inv_hessian, o.plan.group_rows, o.plan.t_col, o.plan.t_lrow,
                               o.blocks_per_scope - nnz, compensate)
    o.prune(nnz, compensate=compensate)
    assert torch.equal(W != 0, ref != 0)
    assert _close(W, ref, 1e-5)


# --------------------------------------------------------------------------- vs SparseKit 0.1.5


def _sparsekit():
    import sparsekit as sk  # installed wherever the suite runs (scripts/install-peers.sh): never skipped
    import sparsekit.tensor_ops as sk_ops
    from sparsekit.pruners.obs import StructuredOBS as SK

    if not torch.cuda.is_available():  # its Triton kth kernels need a GPU: route to its torch path
        sk_ops._kth_largest_impl = lambda x, k, dim=-1, **kw: torch.kthvalue(x, x.shape[dim] - k + 1, dim=dim).values
    return sk, SK


SK_RUNS = {
    "prune local": lambda o, nnz: o.prune(nnz, compensate="local"),
    "prune full": lambda o, nnz: o.prune(nnz, compensate="full"),
    "prune split": lambda o, nnz: o.prune(nnz, compensate="split", n_splits=2),
    "prune interleaved": lambda o, nnz: o.prune(nnz, compensate="interleaved", n_splits=2),
    "true independent": lambda o, nnz: o.prune_true_obs(nnz, ng=4, c_dtype=torch.float32),
    "true joint": lambda o, nnz: o.prune_true_obs(nnz, ng=4, scoring="joint", c_dtype=torch.float32),
    "true largest_first": lambda o, nnz: o.prune_true_obs(nnz, ng=4, order="largest_first", c_dtype=torch.float32),
}


@pytest.mark.parametrize("name", ["2:4", "4:8", "coupled 2:4"])
@pytest.mark.parametrize("run", list(SK_RUNS))
def test_same_masks_and_weights_as_sparsekit(name, run):
    sk, SK = _sparsekit()
    M, K, make, nnz = PATTERNS[name]
    W0, X = _layer(2 * M, 2 * K, seed=3)
    H = X.T @ X
    Wa, Wb = W0.clone(), W0.clone()
    SK_RUNS[run](StructuredOBS(make(gk, Wa), H, damp=0.01), nnz)
    SK_RUNS[run](SK(make(sk, Wb), H, damp=0.01), nnz)
    assert torch.equal(Wa != 0, Wb != 0)
    assert _close(Wa, Wb, 1e-4)


def test_row_coupled_true_obs_vs_sparsekit():
    """The peer keeps per-row C in fp16 on its row-coupled path (hard-coded), so a few near-tie
    decisions flip; gradkit (fp32, equal to the float64 recursion above) keeps the pattern exactly and
    its error is no worse."""
    sk, SK = _sparsekit()
    M, K, make, nnz = PATTERNS["16-col blocks, 8-row coupling"]
    W0, X = _layer(2 * M, 2 * K, seed=4)
    H = X.T @ X
    Wa, Wb = W0.clone(), W0.clone()
    StructuredOBS(make(gk, Wa), H, damp=0.01).prune_true_obs(1, ng=1)
    SK(make(sk, Wb), H, damp=0.01).prune_true_obs(1, ng=1)
    ka = (Wa.view(2, 2, 8, -1, 16) != 0).any(-1)
    kb = (Wb.view(2, 2, 8, -1, 16) != 0).any(-1)
    assert bool((ka.sum(1) == 1).all())
    assert float((ka == kb).float().mean()) > 0.9
    assert output_error(W0, Wa, X=X) <= output_error(W0, Wb, X=X) * 1.001


# --------------------------------------------------------------------------- brute force and quality


@pytest.mark.parametrize("name", list(PATTERNS))
def test_true_obs_weights_are_the_least_squares_solution_on_its_mask(name):
    """Sequential OBS with exact downdates ends at the H-metric projection onto its support."""
    M, K, _, _ = PATTERNS[name]
    W0, X = _layer(M, K, seed=5)
    H = X.T @ X
    W = W0.clone()
    o, nnz = _obs(name, W, H)
    o.prune_true_obs(nnz)
    d = 0.01 * float(torch.diagonal(H).double().mean())
    bf = brute_force_resolve(W0, H, W != 0, d)
    assert _close(W, bf, 1e-5)  # float32 factors vs the float64 solve: 3.3e-7 measured (was 1e-3)


@pytest.mark.parametrize("block,scope,nnz,kw", [((1, 1), (1, 4), 2, {}), ((1, 1), (1, 8), 4, {"ng": 3}),
                                                 ((1, 2), (1, 8), 2, {"chunk_size": 5}),
                                                 ((1, 1), (1, 4), 2, {"c_dtype": torch.bfloat16, "ng": 4})])
def test_resolve_mode_equals_brute_force_on_sparsegpt_mask(block, scope, nnz, kw):
    """mode="resolve" runs the factor machinery with P fixed to SparseGPT's mask: the exact
    least-squares re-solve on that support (float64 brute force), for several batchings / factor dtypes,
    and the same weights as the generic batched-Cholesky re-solve (``_resolve_mode``)."""
    W0, X = _layer(16, 64, seed=6)
    H = X.T @ X
    W = W0.clone()
    o = StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W, block), scope), H, damp=0.01)
    keep = o.prune_true_obs(nnz, mode="resolve", return_mask=True, **kw)
    _, keep_sg = sparsegpt(gk.ScopeSpec(gk.BlockSpec(W0.clone(), block), scope), H, nnz, damp=0.01,
                           return_mask=True)
    assert torch.equal(keep, keep_sg.reshape(keep.shape))
    assert bool((W[~keep] == 0).all())
    bf = brute_force_resolve(W0, H, keep, 0.01 * float(torch.diagonal(H).double().mean()))
    # float32 factors: 5.7e-7 measured (was 1e-3); bf16 factor: 7.2e-4 until session 44's iterative refinement
    # against the float32 C, 2.0e-7 since (the same bound now)
    assert _close(W, bf, 1e-5)
    W2 = W0.clone()
    StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W2, block), scope), H, damp=0.01)._resolve_mode(nnz, False)
    assert _close(W2, bf, 1e-5)  # 6.8e-7 measured (was 1e-3)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("decay", [False, True])
def test_quality_ordering(nm, decay):
    """true OBS <= SparseGPT and full <= local, on random and correlated (decaying spectrum) inputs.

    ng=1 (one scope slot per downdate). With ng scopes decided at once from one inverse, a layer
    this small (32 scopes per row) may lose to SparseGPT when ng covers most of the row; on the
    512 x 1024 benchmark layer the default ng=64 beats SparseGPT (benchmarks/results)."""
    nnz, m = nm
    W0, X = _layer(32, 128, n=512, seed=7, decay=decay)
    H = X.T @ X
    err = {}
    for mode in ("true", "local", "full", "sparsegpt"):
        W = W0.clone()
        scope = gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (1, m))
        if mode == "sparsegpt":
            W = sparsegpt(scope, H, nnz, damp=0.01)
        elif mode == "true":
            StructuredOBS(scope, H, damp=0.01).prune_true_obs(nnz, ng=1)
        else:
            StructuredOBS(scope, H, damp=0.01).prune(nnz, compensate=mode)
        err[mode] = output_error(W0, W, X=X)
    assert err["true"] <= err["sparsegpt"]
    assert err["full"] <= err["local"]


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("method", ["true", "local", "full", "interleaved"])
def test_pattern_holds_exactly(name, method):
    M, K, make, nnz = PATTERNS[name]
    W0, X = _layer(M, K, seed=8)
    W = W0.clone()
    scope = make(gk, W)
    o = StructuredOBS(scope, X.T @ X, damp=0.01)
    if method == "true":
        o.prune_true_obs(nnz)
    else:
        o.prune(nnz, compensate=method, n_splits=2)
    lay = o.layout
    alive = (W.reshape(-1)[lay.elems] != 0).any(-1)  # (S, gs)
    assert bool((alive.sum(-1) == nnz).all())
    # every element outside a pruned block is nonzero only if its block is kept
    dead = ~alive[..., None].expand_as(lay.elems)
    assert bool((W.reshape(-1)[lay.elems[dead]] == 0).all())


@pytest.mark.parametrize("c_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_factor_storage(c_dtype):
    W0, X = _layer(16, 64, seed=9)
    H = X.T @ X
    Wa, Wb = W0.clone(), W0.clone()
    StructuredOBS(gk.ScopeSpec(gk.BlockSpec(Wa, (1, 1)), (1, 4)), H, damp=0.01).prune_true_obs(2)
    StructuredOBS(gk.ScopeSpec(gk.BlockSpec(Wb, (1, 1)), (1, 4)), H, damp=0.01).prune_true_obs(2, c_dtype=c_dtype)
    ea, eb = output_error(W0, Wa, X=X), output_error(W0, Wb, X=X)
    assert eb <= ea * 1.05
    assert float(((Wa != 0) == (Wb != 0)).float().mean()) > 0.95


def test_progress_messages_and_no_op():
    W0, X = _layer(32, 32)
    W = W0.clone()
    o = StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (1, 4)), X.T @ X)
    msgs = []
    o.prune_true_obs(2, chunk_size=8, progress_fn=msgs.append)
    assert any("4/4" in m for m in msgs)
    W2 = W0.clone()
    o2 = StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W2, (1, 1)), (1, 4)), X.T @ X)
    o2.prune_true_obs(4)
    o2.prune(4)
    assert torch.equal(W2, W0)  # nnz == blocks per scope: documented no-op


def test_compute_inverse_damping_rules():
    _, X = _layer(4, 16)
    H = X.T @ X
    C = StructuredOBS.compute_inverse(H, 0.1)
    ref = torch.linalg.inv(H.double() + 0.1 * torch.diagonal(H).double().mean() * torch.eye(16))
    assert _close(C, ref, 1e-5)
    C2 = StructuredOBS.compute_inverse(H, 5.0)
    assert _close(C2, torch.linalg.inv(H.double() + 5.0 * torch.eye(16)), 1e-5)


# --------------------------------------------------------------------------- bad input


def _spec(W):
    return gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (1, 4))


def test_bad_hessians():
    W = torch.randn(4, 8)
    with pytest.raises(ValueError, match="hessian.*square"):
        StructuredOBS(_spec(W), torch.randn(8, 7))
    with pytest.raises(ValueError, match="hessian.*8 columns"):
        StructuredOBS(_spec(W), torch.eye(6))
    with pytest.raises(ValueError, match="hessian.*not positive definite"):
        StructuredOBS(_spec(W), -torch.eye(8), damp=1e-4)
    H = torch.eye(8)
    H[2, 3] = float("nan")
    with pytest.raises(ValueError, match="hessian.*NaN"):
        StructuredOBS(_spec(W), H)
    with pytest.raises(ValueError, match="inv_h.*NaN"):
        StructuredOBS(_spec(W), torch.eye(8), inv_h=torch.full((8, 8), float("inf")))
    with pytest.raises(ValueError, match="damp"):
        StructuredOBS(_spec(W), torch.eye(8), damp=-1.0)


def test_bad_weights_and_arguments_leave_the_weight_untouched():
    W = torch.randn(4, 8)
    W[1, 1] = float("inf")
    before = W.clone()
    o = StructuredOBS(_spec(W), torch.eye(8))
    with pytest.raises(ValueError, match="weight.*NaN or Inf"):
        o.prune_true_obs(2)
    with pytest.raises(ValueError, match="weight.*NaN or Inf"):
        o.prune(2)
    assert torch.equal(W.isinf(), before.isinf()) and torch.equal(W[~W.isinf()], before[~before.isinf()])
    W = torch.randn(4, 8)
    o = StructuredOBS(_spec(W), torch.eye(8))
    with pytest.raises(ValueError, match="nnz"):
        o.prune_true_obs(-1)
    with pytest.raises(TypeError, match="nnz"):
        o.prune(1.5)
    for kw, pat in [(dict(order="random"), "order"), (dict(scoring="best"), "scoring"), (dict(ng=0), "ng"),
                    (dict(chunk_size=0), "chunk_size"), (dict(mode="fast"), "mode"),
                    (dict(c_dtype=torch.int8), "c_dtype")]:
        with pytest.raises((ValueError, TypeError), match=pat):
            o.prune_true_obs(2, **kw)
    with pytest.raises(ValueError, match="compensate"):
        o.prune(2, compensate="global")
    with pytest.raises(TypeError, match="ScopeSpec"):
        StructuredOBS(gk.BlockSpec(W, (1, 1)), torch.eye(8))


def test_joint_scoring_refuses_subset_explosion():
    W = torch.randn(2, 32)
    o = StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (1, 32)), torch.eye(32))
    assert math.comb(32, 16) > S.MAX_SUBSETS
    with pytest.raises(ValueError, match="MAX_SUBSETS"):
        o.prune_true_obs(16, scoring="joint")
    with pytest.raises(ValueError, match="MAX_SUBSETS"):
        o.prune(16)
    o.prune_true_obs(16)  # independent scoring never enumerates subsets
    assert bool(((W != 0).sum(1) == 16).all())


def test_error_mid_run_leaves_no_half_pruned_weight(monkeypatch):
    W0, X = _layer(32, 32)
    W = W0.clone()
    o = StructuredOBS(_spec(W), X.T @ X)
    calls = {"n": 0}
    real = S._true_obs_chunk

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(S, "_true_obs_chunk", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        o.prune_true_obs(2, chunk_size=8)
    assert torch.equal(W, W0)

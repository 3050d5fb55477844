"""Audit (s44): numerical accuracy of gradkit's selection and pruning side against float64 ground truth, measured
against the peers (SparseKit 0.1.5, torch.optim.AdamW) at the same input dtype, on hard inputs.

* OBS (``gradkit.obs``): SparseGPT, true OBS (fp32 / bf16 / fp16 factors), shared-inverse ``prune`` on Hessians of
  condition number 1e4 .. 1e10 stored in float32, damping as the README documents (``damp < 1`` relative to
  ``mean(diag(H))``: 0.01 as ``sparsegpt`` / ``prune_model``, 1e-4 as ``StructuredOBS``), fp32 / bf16 / fp16 weights.
  Error = ``||(W - W') X^T||^2 / ||W X^T||^2`` in float64, compared with the same algorithm in float64 (the
  literal references of ``gradkit/kernels/reference/obs.py``, or ``sparsegpt(dtype=float64)``) and with SparseKit at
  the same dtype; the ops ``obs_select``, ``obs_shared_prune``, ``obs_sweep_``, ``obs_schur_extend_`` against float64
  recomputations; singular-in-float32 Hessians give the documented error, never NaN weights.
* scope (``block_norms`` / ``scope_kth`` / ``scope_mask``) on values spanning 1e-18 .. 1e18: float64 ranking exactly
  where gaps exceed rounding; the documented float32-sum overflow; the undocumented underflow (xfail).
* golden selection and ``topk_select`` / ``topk_select_segments`` with +-0.0, subnormals and last-ulp neighbours:
  exactly a float64 stable sort.
* ``MaskedAdamW`` over 100 steps with tiny / huge gradients against float64 AdamW, compared with torch's AdamW drift
  at the same dtype.

Measured numbers are in the assert messages; the bounds sit just above the worst measured case.
Tests marked ``# DEFECT (fixed):`` failed before this session's fix (python/gradkit/obs/structured.py).
"""
from __future__ import annotations

import math

import pytest
import torch

import gradkit.scope as gk
from gradkit import ops
from gradkit.kernels.reference import obs as R
from gradkit.kernels.reference import scope as RS
from gradkit.obs import NotPositiveDefiniteError, StructuredOBS, compute_inverse, sparsegpt
from gradkit.optim import MaskedAdamW

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
INF = float("inf")


# ============================================================================ helpers


def _sparsekit():
    import sparsekit as sk  # installed by scripts/install-peers.sh wherever the suite runs: never skipped
    import sparsekit.tensor_ops as sk_ops
    from sparsekit.pruners.obs import StructuredOBS as SK
    from sparsekit.pruners.sparsegpt import sparsegpt as sk_sparsegpt

    if not torch.cuda.is_available():  # its Triton kth kernels need a GPU: its torch path (as tests/test_obs.py)
        sk_ops._kth_largest_impl = lambda x, k, dim=-1, **kw: torch.kthvalue(x, x.shape[dim] - k + 1, dim=dim).values
    return sk, SK, sk_sparsegpt


def _layer(m: int, k: int, kappa: float, seed: int):
    """W (m, k) and calibration inputs X (2k, k), float64, with cond(X^T X) = kappa exactly (log-spaced spectrum,
    random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(2 * k, k, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))[0]
    s = torch.logspace(0, -0.5 * math.log10(kappa), k, dtype=F64)
    return torch.randn(m, k, generator=g, dtype=F64), (U * s) @ V.T


def _err(W0: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    """||(W0 - W) X^T||^2 / ||W0 X^T||^2 in float64 (W0: the weight as given to the pruner)."""
    d = (W0.double() - W.double()) @ X.T
    return float(d.square().sum() / (W0.double() @ X.T).square().sum())


def _nm(w: torch.Tensor, bk: int = 1):
    return gk.ScopeSpec(gk.BlockSpec(w, (1, bk)), (1, 4))


def _lam(H: torch.Tensor, damp: float) -> float:
    return damp * float(H.double().diagonal().mean()) if damp < 1 else damp


KAPPAS = [1e4, 1e6, 1e8, 1e10]


def _show(*what) -> None:
    """The measured numbers, printed with ``-s`` when AUDIT_S44_PRINT=1 (the report's table)."""
    import os

    if os.environ.get("AUDIT_S44_PRINT") == "1":
        print(*what)


# ============================================================================ 1. OBS: SparseGPT


@pytest.mark.parametrize("damp", [0.01, 1e-4])
@pytest.mark.parametrize("wdt", [F32, BF16, F16])
def test_sparsegpt_ill_conditioned_loss_vs_float64_and_sparsekit(wdt, damp):
    """float32 SparseGPT on a float32 H of cond 1e4 .. 1e10: its loss against gradkit's own float64 run and SparseKit's
    float32 one (its result rounded to the weight's dtype, as gradkit's is). Measured worst ratios (M=16, K=64, two
    seeds per cond): gk32 / gk64 1.00073, gk32 / SparseKit 1.00052 (both bf16 weights at damp=1e-4)."""
    _, _, sk_sparsegpt = _sparsekit()
    worst_ref = worst_peer = 0.0
    rows = []
    for kappa in KAPPAS:
        for seed in (0, 1):
            W64, X = _layer(16, 64, kappa, seed)
            W0, H = W64.to(wdt), (X.T @ X).float()
            out = {}
            for dt in (F32, F64):
                w = W0.clone()
                out[dt] = sparsegpt(_nm(w), H, 2, damp=damp, dtype=dt)
                assert torch.equal(w, W0)  # not in place: untouched
                assert out[dt].dtype == wdt and bool(torch.isfinite(out[dt]).all())
            peer = sk_sparsegpt(W0.float(), H.clone(), scope_size=4, damp=damp).to(wdt)
            e32, e64, ep = _err(W0, out[F32], X), _err(W0, out[F64], X), _err(W0, peer, X)
            rows.append((kappa, seed, e32, e64, ep))
            worst_ref, worst_peer = max(worst_ref, e32 / e64), max(worst_peer, e32 / ep)
    _show('sparsegpt', wdt, damp, worst_ref, worst_peer, rows)
    assert worst_ref <= 1.002 and worst_peer <= 1.002, (worst_ref, worst_peer, rows)


# ============================================================================ 1. OBS: true OBS and prune


def _c64(H: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + lam I)^-1 in float64 from the float32 H as stored (the ground truth every fp32 method approximates)."""
    return compute_inverse(H.double(), damp)


@pytest.mark.parametrize("damp", [0.01, 1e-4])
def test_true_obs_ill_conditioned_loss_vs_float64_reference_and_sparsekit(damp):
    """prune_true_obs (ng=2: the factor is read between batches) with fp32 / bf16 / fp16 factors against the literal
    float64 Schur recursion (true_obs_reference on the float64 inverse of the float32 H) and SparseKit at the same
    c_dtype (M=8, K=64, 2:4). Measured worst: gradkit (any factor) / reference 1.00006; gradkit / SparseKit 1.0019
    (damp=0.01, fp16 factor at cond 1e8: the peer's mask happened to be 0.2% better); half / fp32 factor 1.000001.
    At damp=1e-4 SparseKit's fp32 path loses 1.28x at cond 1e10 (an LU inverse in float32), its bf16 per-row C
    up to 8.7x, and its fp16 one (its default c_dtype) fails 2 of 4 (non-finite or _LinAlgError), bf16 1 of 4."""
    sk, SK, _ = _sparsekit()
    rows, worst_ref, worst_peer, worst_half = [], 0.0, 0.0, 0.0
    peer_fail = 0
    for kappa in KAPPAS:
        W64, X = _layer(8, 64, kappa, 0)
        W0, H = W64.float(), (X.T @ X).float()
        o = StructuredOBS(_nm(W0.clone()), H, damp=damp)
        ref = R.true_obs_reference(W0.double(), _c64(H, damp), o.plan.group_rows, o.plan.t_col, o.plan.t_lrow, 2,
                                   2, "independent", False)
        eref = _err(W0, ref, X)
        got = {}
        for cdt in (F32, BF16, F16):
            w = W0.clone()
            StructuredOBS(_nm(w), H, damp=damp).prune_true_obs(2, ng=2, c_dtype=cdt)
            assert bool(torch.isfinite(w).all()) and bool(((w != 0).view(8, 16, 4).sum(-1) == 2).all())
            got[cdt] = _err(W0, w, X)
            wp = W0.clone()
            try:
                SK(sk.ScopeSpec(sk.BlockSpec(wp, (1, 1)), (1, 4)), H.clone(), damp=damp).prune_true_obs(
                    2, ng=2, c_dtype=cdt)
                ep = _err(W0, wp, X) if bool(torch.isfinite(wp).all()) else INF
            except RuntimeError:  # torch's _LinAlgError: the peer's half-precision downdates lost definiteness
                ep = INF
            peer_fail += ep == INF
            worst_peer = max(worst_peer, got[cdt] / ep)  # the peer at the same factor dtype (INF: it failed)
            worst_ref = max(worst_ref, got[cdt] / eref)
            rows.append((kappa, str(cdt)[6:], got[cdt], ep, eref))
        worst_half = max(worst_half, got[BF16] / got[F32], got[F16] / got[F32])
    _show('true_obs', damp, worst_ref, worst_peer, worst_half, peer_fail, rows)
    assert worst_ref <= 1.0002, (worst_ref, rows)
    assert worst_peer <= 1.003, (worst_peer, rows)
    assert worst_half <= 1.0002, (worst_half, rows)
    assert peer_fail == (0 if damp == 0.01 else 3), rows  # the peer's half-precision C: _LinAlgError / non-finite


@pytest.mark.parametrize("cdt,damp,bound", [(BF16, 1e-4, 1.0005), (F16, 1e-4, 1.0005), (F16, 1e-6, 1.02)])
def test_half_factor_final_weights_are_the_least_squares_solve_on_their_mask(cdt, damp, bound):
    """# DEFECT (fixed): with a bf16 / fp16 factor, prune_true_obs's final weights came from the rounded factor
    (a Cholesky factor of a perturbed C[P, P]), so they missed the exact re-solve on the chosen support: 1.37x its
    loss at the default damp=1e-4 on cond(H)=1e6 (bf16), 8x at damp=1e-6, cond 1e6; fp16 9.6x at damp=1e-6, cond
    1e8. Now refined against the float32 C (structured.py, _true_obs_chunk). Measured after the fix: <= 1.00014 at
    damp=1e-4; fp16 at damp=1e-6 <= 1.0106; bf16 at damp=1e-6 still 4-12x where refinement cannot converge (the
    strict xfail below)."""
    worst, rows = 0.0, []
    for kappa in (1e6, 1e8):
        for seed in (0, 1):
            W64, X = _layer(16, 64, kappa, seed)
            W0, H = W64.float(), (X.T @ X).float()
            w = W0.clone()
            StructuredOBS(_nm(w), H, damp=damp).prune_true_obs(2, ng=2, c_dtype=cdt)
            best = R.brute_force_resolve(W0, H.double(), w != 0, _lam(H, damp))
            r = _err(W0, w, X) / _err(W0, best, X)
            rows.append((kappa, seed, r))
            worst = max(worst, r)
    _show('half factor', cdt, damp, worst, rows)
    assert worst <= bound, (worst, rows)


_COUPLED = {  # (weight rows, nnz, scope): tests/test_obs.py's coupled patterns
    "coupled 2:4": (32, 2, lambda W: gk.ScopeSpec(gk.BlockSpec(gk.View(
        W, (W.shape[0], W.shape[1] // 16, 8, 2), (W.shape[1], 16, 1, 8)), (1, 1, 1, 2)), (1, 1, 4, 1))),
    "16-col blocks, 8-row coupling": (32, 1, lambda W: gk.ScopeSpec(gk.BlockSpec(gk.View(
        W, (W.shape[0] // 16, 8, 2, W.shape[1]), (16 * W.shape[1], W.shape[1], 8 * W.shape[1], 1)),
        (1, 1, 1, 16)), (1, 1, 2, 1))),
}


@pytest.mark.parametrize("name", list(_COUPLED))
def test_half_factor_fix_on_coupled_patterns_and_in_resolve_mode(name):
    """# DEFECT (fixed): the same refinement on coupled 2:4 through a View and on row-coupled 16-column blocks (padded
    batches), bf16 / fp16 factors, cond(H) = 1e6 and 1e8, damp=1e-4, ng=1: loss over the exact re-solve on the mask
    was 1.18-1.46 (bf16) and 1.002-1.005 (fp16) before, 1.00008 at most now. mode="resolve" with a bf16 factor (ng=4,
    2:4, cond 1e8, damp=0.01) was 1.0e-3 (of max |w|) from the float64 re-solve, now 6.2e-6, the float32 factor's
    6.1e-6 (tests/test_obs.py's well-conditioned case: 6.9e-4 before, 2.0e-7 now)."""
    M, nnz, make = _COUPLED[name]
    worst, rows = 0.0, []
    for kappa in (1e6, 1e8):
        W64, X = _layer(M, 64, kappa, 0)
        W0, H = W64.float(), (X.T @ X).float()
        for cdt in (BF16, F16):
            w = W0.clone()
            StructuredOBS(make(w), H, damp=1e-4).prune_true_obs(nnz, ng=1, c_dtype=cdt)
            best = R.brute_force_resolve(W0, H.double(), w != 0, _lam(H, 1e-4))
            r = _err(W0, w, X) / _err(W0, best, X)
            rows.append((kappa, str(cdt)[6:], r))
            worst = max(worst, r)
    e_res = {F32: 1.0, BF16: 0.0}
    for cdt in (F32, BF16) if name == "coupled 2:4" else ():  # mode="resolve" (2:4) on the cond 1e8 H, once
        w = W0.clone()
        keep = StructuredOBS(_nm(w), H, damp=0.01).prune_true_obs(2, mode="resolve", ng=4, c_dtype=cdt,
                                                                  return_mask=True)
        best = R.brute_force_resolve(W0, H.double(), keep, _lam(H, 0.01))
        e_res[cdt] = float((w.double() - best).abs().max() / best.abs().max())
    _show("half factor coupled", name, worst, e_res, rows)
    assert worst <= 1.0005 and e_res[BF16] <= 1.5 * e_res[F32], (worst, e_res, rows)


@pytest.mark.xfail(strict=True, reason="prune_true_obs(c_dtype=torch.bfloat16) below the documented damping "
                   "(damp=1e-6, cond(H)=1e6, M=16, K=64, ng=2): the bf16 factor's rounding (2^-8) times cond(C[P,P]) "
                   "exceeds 1, iterative refinement cannot converge, and the kept weights cost 4.0x / 11.7x the exact "
                   "re-solve on their mask (python/gradkit/obs/structured.py _true_obs_chunk); a float32 factor or "
                   "damp >= 1e-4 is exact to 1e-3")
def test_bf16_factor_below_documented_damping_is_not_the_least_squares_solve():
    W64, X = _layer(16, 64, 1e6, 1)
    W0, H = W64.float(), (X.T @ X).float()
    w = W0.clone()
    StructuredOBS(_nm(w), H, damp=1e-6).prune_true_obs(2, ng=2, c_dtype=BF16)
    best = R.brute_force_resolve(W0, H.double(), w != 0, _lam(H, 1e-6))
    assert _err(W0, w, X) <= 1.25 * _err(W0, best, X)


@pytest.mark.parametrize("compensate", ["local", "full"])
def test_shared_prune_ill_conditioned_loss_vs_float64_reference_and_sparsekit(compensate):
    """prune(compensate=...) at StructuredOBS's default damp=1e-4 against the literal float64 shared-inverse reference
    and SparseKit's float32 prune. Measured worst: gk / reference 1.00002, gk / SparseKit 1.00005."""
    sk, SK, _ = _sparsekit()
    rows, worst_ref, worst_peer = [], 0.0, 0.0
    for kappa in KAPPAS:
        W64, X = _layer(8, 64, kappa, 2)
        W0, H = W64.float(), (X.T @ X).float()
        w = W0.clone()
        o = StructuredOBS(_nm(w), H, damp=1e-4)
        o.prune(2, compensate=compensate)
        assert bool(torch.isfinite(w).all()) and bool(((w != 0).view(8, 16, 4).sum(-1) == 2).all())
        ref = R.shared_obs_reference(W0.double(), _c64(H, 1e-4), o.plan.group_rows, o.plan.t_col, o.plan.t_lrow, 2,
                                     compensate)
        wp = W0.clone()
        SK(sk.ScopeSpec(sk.BlockSpec(wp, (1, 1)), (1, 4)), H.clone(), damp=1e-4).prune(2, compensate=compensate)
        e, er, ep = _err(W0, w, X), _err(W0, ref, X), _err(W0, wp, X)
        rows.append((kappa, e, er, ep))
        worst_ref, worst_peer = max(worst_ref, e / er), max(worst_peer, e / ep)
    _show('prune', compensate, worst_ref, worst_peer, rows)
    assert worst_ref <= 1.0003 and worst_peer <= 1.0003, (worst_ref, worst_peer, rows)


_METHODS = {
    "sparsegpt": lambda w, H, d: sparsegpt(_nm(w), H, 2, damp=d, inplace=True),
    "true fp32": lambda w, H, d: StructuredOBS(_nm(w), H, damp=d).prune_true_obs(2, ng=2),
    "true bf16": lambda w, H, d: StructuredOBS(_nm(w), H, damp=d).prune_true_obs(2, ng=2, c_dtype=BF16),
    "resolve": lambda w, H, d: StructuredOBS(_nm(w), H, damp=d).prune_true_obs(2, mode="resolve"),
    "local": lambda w, H, d: StructuredOBS(_nm(w), H, damp=d).prune(2),
    "full": lambda w, H, d: StructuredOBS(_nm(w), H, damp=d).prune(2, compensate="full"),
    "split": lambda w, H, d: StructuredOBS(_nm(w), H, damp=d).prune(2, compensate="split", n_splits=2),
    "interleaved": lambda w, H, d: StructuredOBS(_nm(w), H, damp=d).prune(2, compensate="interleaved", n_splits=2),
}


@pytest.mark.parametrize("wdt", [F32, BF16, F16])
def test_hessian_singular_in_float32_raises_the_documented_error_and_damping_recovers(wdt):
    """cond(H) = 1e10 / 1e12 (positive definite in exact arithmetic, not in float32) with damp=0: every method raises
    the README's error (ValueError, NotPositiveDefiniteError for sparsegpt) naming ``hessian`` before touching the
    weight, never NaN weights; with the README's damp=0.01 every method gives finite weights of the pattern whose
    loss is within 1.0005x of the same method on the float64 H (measured worst 1.00027, fp16 weights, split)."""
    worst, rows = 0.0, []
    for kappa in (1e10, 1e12):
        W64, X = _layer(8, 64, kappa, 1)
        W0, H = W64.to(wdt), (X.T @ X).float()
        for name, f in _METHODS.items():
            w = W0.clone()
            with pytest.raises(ValueError, match=r"^hessian: not positive definite even after damping") as ei:
                f(w, H, 0.0)
            assert name != "sparsegpt" or isinstance(ei.value, NotPositiveDefiniteError)
            assert torch.equal(w, W0), name
            f(w, H, 0.01)
            assert bool(torch.isfinite(w).all()) and bool(((w != 0).view(8, 16, 4).sum(-1) <= 2).all()), name
            w64 = W0.clone()
            f(w64, H.double(), 0.01)
            r = _err(W0, w, X) / _err(W0, w64, X)
            rows.append((kappa, name, r))
            worst = max(worst, r)
    _show("singular", wdt, worst, rows)
    assert worst <= 1.0005, (worst, rows)


def test_bf16_factor_losing_definiteness_raises_and_leaves_the_weight():
    """Below the documented damping a bf16 factor's downdate can lose definiteness (cond(H) = 1e8, damp=1e-6): the
    documented fallback is a ValueError naming ``hessian`` before the weight is written (the float32 factor
    succeeds on the same input, finite, within 1.0001x of the exact re-solve on its mask: measured 1.000002)."""
    W64, X = _layer(16, 64, 1e8, 0)
    W0, H = W64.float(), (X.T @ X).float()
    w = W0.clone()
    with pytest.raises(ValueError, match=r"^hessian: the downdated inverse lost positive definiteness"):
        StructuredOBS(_nm(w), H, damp=1e-6).prune_true_obs(2, ng=2, c_dtype=BF16)
    assert torch.equal(w, W0)
    StructuredOBS(_nm(w), H, damp=1e-6).prune_true_obs(2, ng=2)
    best = R.brute_force_resolve(W0, H.double(), w != 0, _lam(H, 1e-6))
    r = _err(W0, w, X) / _err(W0, best, X)
    _show("bf16 lost PD; fp32 factor / own-mask resolve", r)
    assert bool(torch.isfinite(w).all()) and r <= 1.0001, r


# ============================================================================ 1. OBS ops against float64


@pytest.mark.parametrize("gs,bk", [(4, 1), (8, 1), (4, 2), (8, 4)])
def test_obs_select_ranks_as_float64_costs_over_24_decades(gs, bk):
    """obs_select's fp32 block costs sum w^2 / (d + eps) with w over 1e-12 .. 1e12 and d over 1e-8 .. 1e8 (costs
    1e-32 .. 1e32, inside float32): in every scope whose float64 costs are 1e-5 apart (relative; fp32 rounding of a
    cost is <= (bk + 2) 2^-24), the pruned blocks are exactly the float64 ranking's (equal costs: lower block).
    Measured: 100% of such scopes agree; the rest (near-ties) are not checked."""
    g = torch.Generator().manual_seed(gs * 10 + bk)
    n, nq = 64, 16
    nb = nq * gs * bk
    w = (10.0 ** (torch.rand(n, nb, generator=g, dtype=F64) * 24 - 12) * torch.randn(n, nb, generator=g,
                                                                                      dtype=F64).sign()).float()
    d = (10.0 ** (torch.rand(n, nb, generator=g, dtype=F64) * 16 - 8)).float()
    c64 = (w.double() ** 2 / (d.double() + 1e-8)).view(n, nq, gs, bk).sum(-1)  # (n, nq, gs)
    srt = c64.sort(-1).values
    clear = ((srt[..., 1:] - srt[..., :-1]) > 1e-5 * srt[..., 1:]).all(-1)  # (n, nq) scopes without near-ties
    assert float(clear.float().mean()) > 0.9
    for num_prune in sorted({1, gs // 2, gs - 1}):
        pos = ops.obs_select(w, d, gs, bk, num_prune, 1e-8).view(n, nq, num_prune * bk)
        got = torch.zeros(n, nq, gs, dtype=torch.bool)
        got.scatter_(2, (pos % (gs * bk)) // bk, True)
        want = torch.zeros(n, nq, gs, dtype=torch.bool)
        want.scatter_(2, c64.sort(dim=-1, stable=True).indices[..., :num_prune], True)
        bad = int(((got != want).any(-1) & clear).sum())
        assert bad == 0, (num_prune, bad, int(clear.sum()))


def _ill_c(k: int, kappa: float, damp: float, seed: int) -> torch.Tensor:
    """The float32 C / mean(diag(C)) StructuredOBS works with, for an H of cond kappa stored in float32."""
    _, X = _layer(1, k, kappa, seed)
    C = compute_inverse((X.T @ X).float(), damp)
    return C / C.diagonal().double().mean().float()


def test_obs_shared_prune_compensation_on_ill_conditioned_c_vs_float64():
    """obs_shared_prune (the fused local 2:4 pass of prune) on C from cond(H) = 1e8 at damp=1e-4: its compensated
    weights against the op's arithmetic in float64 on the same inputs (where the float64 choice of subset agrees),
    next to the float32 reference's error. Measured: gradkit 3.8e-8, reference fp32 3.8e-8 (of max |out|); subset
    choices agree with float64 in 100% of the (row, scope)s (>= 99% asserted: float32 near-ties may flip)."""
    from itertools import combinations

    K, n, E = 64, 64, 4
    C = _ill_c(K, 1e8, 1e-4, 3)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, K, generator=g)
    pidx = torch.tensor(list(combinations(range(E), 2)))
    cols = torch.arange(K // E)[:, None, None] * E + pidx[None]
    Cs = C[cols[..., :, None], cols[..., None, :]] + 1e-8 * torch.eye(2)
    cinv = torch.cholesky_inverse(torch.linalg.cholesky(Cs)).contiguous()
    out, sub = ops.obs_shared_prune(w, C, cinv, pidx, E, True)
    o32, s32 = R.obs_shared_prune(w, C, cinv, pidx, E, True)
    o64, s64 = R.obs_shared_prune(w.double(), C.double(), cinv.double(), pidx, E, True)
    agree = (sub == s64)
    assert float(agree.float().mean()) >= 0.99, float(agree.float().mean())
    rows_ok = agree.repeat_interleave(E, 1)
    scale = float(o64.abs().max())
    e_gk = float(((out.double() - o64).abs() * rows_ok).max()) / scale
    e_ref = float(((o32.double() - o64).abs() * (rows_ok & (s32 == s64).repeat_interleave(E, 1))).max()) / scale
    _show("shared_prune op", e_gk, e_ref, float(agree.float().mean()))
    assert e_gk <= 1e-7 and e_gk <= 1.5 * e_ref + 1e-8, (e_gk, e_ref)


def test_obs_sweep_on_an_ill_conditioned_factor_vs_float64():
    """obs_sweep_ (SparseGPT's column sweep) with u the upper Cholesky factor of (H + lam I)^-1, cond(H) = 1e8,
    damp=0.01, in float32: the swept weights against the same sweep in float64 on the widened inputs, and the bits of
    the float32 reference (the documented contract). Measured: weights 1.6e-7 of max |w|, errors 1.9e-7."""
    n, m = 64, 48
    _, X = _layer(1, n, 1e8, 4)
    H = (X.T @ X).float().double()
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(n, dtype=F64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True).float()
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(n, m, generator=g)
    prune = torch.rand(n, m, generator=g) < 0.5
    w, err = w0.clone(), torch.zeros(n, m)
    ops.obs_sweep_(w, err, u, prune, 0, n)
    wr, er = w0.clone(), torch.zeros(n, m)
    R.obs_sweep_(wr, er, u, prune, 0, n)
    assert torch.equal(w, wr) and torch.equal(err, er)
    w64, e64 = w0.double(), torch.zeros(n, m, dtype=F64)
    R.obs_sweep_(w64, e64, u.double(), prune, 0, n)
    ew = float((w.double() - w64).abs().max() / w64.abs().max())
    ee = float((err.double() - e64).abs().max() / e64.abs().max())
    _show("sweep op", ew, ee)
    assert ew <= 4e-7 and ee <= 4e-7, (ew, ee)


@pytest.mark.parametrize("dt", [F32, BF16, F16])
def test_obs_schur_extend_on_an_ill_conditioned_block_vs_float64(dt):
    """obs_schur_extend_ with linv = L^-1 of an m x m block of cond 1e6 (entries up to ~1e3): the new factor rows
    against float64 arithmetic on the same (rounded) inputs, next to the torch reference at the same storage dtype.
    Measured max error over max |row| (fp32 / bf16 / fp16): gradkit 1.3e-7 / 3.4e-3 / 2.4e-4, the reference the same;
    half storage within half its epsilon (the one rounding), float32 within 2 epsilons (the accumulation)."""
    g = torch.Generator().manual_seed(5)
    n, cap, K, cnt, m, F = 6, 24, 64, 12, 8, 40
    Q = torch.linalg.qr(torch.randn(n, m, m, generator=g, dtype=F64))[0]
    A = Q @ torch.diag_embed(torch.logspace(0, -6, m, dtype=F64).expand(n, m)) @ Q.transpose(1, 2)
    linv = torch.linalg.inv(torch.linalg.cholesky(A)).float()
    ut0 = torch.randn(n, cap, K, generator=g).to(dt)
    xf = torch.randn(n, m, F, generator=g)
    up = ut0[:, :cnt, :m].transpose(1, 2).float()  # read from the factor: exact in dt
    ut, utr = ut0.clone(), ut0.clone()
    ops.obs_schur_extend_(ut, xf, up, linv, cnt)
    R.obs_schur_extend_(utr, xf, up, linv, cnt)
    want = linv.double() @ (xf.double() - up.double() @ ut0[:, :cnt, K - F:].double())
    scale = float(want.abs().max())
    e_gk = float((ut[:, cnt:cnt + m, K - F:].double() - want).abs().max()) / scale
    e_ref = float((utr[:, cnt:cnt + m, K - F:].double() - want).abs().max()) / scale
    assert torch.equal(ut[:, :cnt], ut0[:, :cnt]) and torch.equal(ut[:, cnt + m:], ut0[:, cnt + m:])
    assert torch.equal(ut[:, cnt:cnt + m, :K - F], ut0[:, cnt:cnt + m, :K - F])
    _show("schur op", dt, e_gk, e_ref)
    bound = 2 * torch.finfo(dt).eps if dt == F32 else 0.5 * torch.finfo(dt).eps
    assert e_gk <= 1.5 * e_ref + 1e-8 and e_gk <= bound, (e_gk, e_ref, bound)


# ============================================================================ 2. scope: block norms and selection


def _wide(shape, lo: float, hi: float, dt: torch.dtype, seed: int) -> torch.Tensor:
    """Random-sign values log-uniform over [10^lo, 10^hi], rounded to dt."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** (torch.rand(shape, generator=g, dtype=F64) * (hi - lo) + lo)
    return (mag * torch.randn(shape, generator=g, dtype=F64).sign()).to(dt)


_RANGES = {F32: (-18, 18), BF16: (-18, 18), F16: (-7, 4.2)}  # squares stay normal in float32; fp16 norms < 65504
# worst relative error of a norm (p = 1, 2) against float64 on the values as stored; measured / bound
# (half-precision: the unit roundoff of one rounding of a float32 result, 2^-8 / 2^-11, times 1 + 1e-6)
_NORM_BOUND = {F32: 2.5e-7, BF16: 2.0 ** -8 * (1 + 1e-6), F16: 2.0 ** -11 * (1 + 1e-6)}


@pytest.mark.parametrize("dt", [F32, BF16, F16])
@pytest.mark.parametrize("p", [2, 1])
def test_block_norms_over_36_decades_vs_float64_and_sparsekit(dt, p):
    """block_norms of 1x4 and 2x2 blocks whose entries span 1e-18 .. 1e18 (fp32 / bf16; fp16: 1e-7 .. 1.6e4, its
    subnormals included): no inf / 0 where the float64 norm is a normal number of the dtype, and every norm within
    the dtype's rounding of the float64 norm (half an ulp for the halves: one rounding of a float32 result), never
    worse than SparseKit's norms (torch.linalg.vector_norm) at the same dtype. Measured max relative errors, p=2,
    gradkit = SparseKit: fp32 1.0e-7, bf16 3.7e-3, fp16 4.7e-4 (p=1: 1.3e-7, 3.9e-3, 4.8e-4); fp16 subnormal
    norms within 2.9e-8 (half their spacing: 3.0e-8)."""
    import sparsekit as sk

    lo, hi = _RANGES[dt]
    for bs in ((1, 4), (2, 2)):
        x = _wide((64, 256), lo, hi, dt, seed=7)
        got = ops.block_norms(x, list(bs), p)
        peer = sk.BlockSpec(x, bs).norms(p=p)
        assert got.dtype == dt and peer.dtype == dt and got.shape == peer.shape
        want = RS._blocked(x.double().abs(), bs).pow(p).sum(dim=(1, 3)).pow(1.0 / p)
        assert bool((want < torch.finfo(dt).max).all())
        assert bool(torch.isfinite(got).all()) and bool((got > 0).all())
        normal = want >= torch.finfo(dt).tiny  # fp16: some blocks' norms are fp16 subnormals (half a spacing apart)
        assert float(normal.float().mean()) > (0.99 if dt == F16 else 1 - 1e-9)
        e_gk = float(((got.double() - want).abs() / want)[normal].max())
        e_pk = float(((peer.double() - want).abs() / want)[normal].max())
        sub = float((got.double() - want).abs()[~normal].max()) if bool((~normal).any()) else 0.0
        _show("block_norms", dt, p, bs, e_gk, e_pk, sub)
        assert e_gk <= _NORM_BOUND[dt] and e_gk <= e_pk * 1.0001, (bs, e_gk, e_pk)
        assert sub <= 2.0 ** -25, sub  # fp16 subnormal outputs: within half their spacing 2^-24


@pytest.mark.parametrize("dt", [F32, BF16])
def test_block_scores_past_float32_range_are_inf_as_documented_and_tie_by_index(dt):
    """README: "Scores are float32 sums of |x|^p: ... a sum past float32's range, scores +inf (ties among those go by
    index)". Entries 1e19 .. 1e20 (float64 norms 2e19 .. 4e20 fit float32 and bfloat16): gradkit's norms are +inf,
    as SparseKit's torch.linalg.vector_norm at the same dtype; the kept blocks are the infinite ones lowest index
    first, not the float64 ranking, and scope_kth is +inf."""
    import sparsekit as sk

    x = torch.tensor([[2e19, 2e19, 1e5, 1e5, 3e19, 3e19, 4e19, 4e19]], dtype=F64).to(dt)  # blocks of 2
    got = ops.block_norms(x, [1, 2])
    n64 = x.double().view(4, 2).norm(dim=1)
    assert bool((got[0, [0, 2, 3]] == INF).all()) and bool((n64 < torch.finfo(dt).max).all())
    assert abs(float(got[0, 1]) / float(n64[1]) - 1) <= _NORM_BOUND[dt]
    assert torch.equal(got, sk.BlockSpec(x, (1, 2)).norms()), (got, sk.BlockSpec(x, (1, 2)).norms())
    assert ops.scope_mask(x, [1, 2], [1, 4], 2, expand=False).tolist() == [[True, False, True, False]]
    assert ops.scope_mask(x, [1, 2], [1, 4], 3, expand=False).tolist() == [[True, False, True, True]]
    assert float(ops.scope_kth(x, [1, 2], [1, 4], 3)) == INF
    # float64 would keep blocks 3 and 2 for nnz=2: the documented float32 limit, not a rounding tie
    assert n64.argsort(descending=True)[:2].tolist() == [3, 2]


@pytest.mark.parametrize("dt", [F32, BF16])
@pytest.mark.xfail(strict=True, reason="undocumented underflow: block scores are float32 sums of |x|^2 "
                   "(gradkit/kernels/reference/scope.py block_scores; csrc scope kernels), so a block of entries below "
                   "~1e-23 scores 0 (block_norms([[1e-23] * 4]) == 0, float64 norm 2e-23 is a normal float32) and "
                   "blocks of norm 2e-23 and 4e-23 tie with zero blocks, ranked by index instead of by norm. SparseKit "
                   "(torch.linalg.vector_norm) flushes the same; the README documents only the overflow side")
def test_block_norms_below_float32_square_range_rank_as_float64(dt):
    x = torch.tensor([[0.0, 0.0, 1e-23, 1e-23, 2e-23, 2e-23, 0.0, 1e-30]], dtype=F64).to(dt)
    assert bool((ops.block_norms(x, [1, 2])[0, 1:3] > 0).all())
    assert ops.scope_mask(x, [1, 2], [1, 4], 2, expand=False).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("dt", [F32, BF16, F16])
def test_scope_kth_and_mask_match_float64_ranking_over_the_dynamic_range(dt):
    """Per block a target norm 10^u (u spread over 1e-18 .. 1e18 for fp32 / bf16, 1e-3 .. 1e4 for fp16, at least
    1.7% apart within a scope: far above float32 score rounding), entries a random direction of that norm rounded to
    dt. For every nnz of an 8-block scope: scope_mask keeps exactly the float64 ranking's blocks, scope_kth is exactly
    block_norms of the float64 k-th block, and within the dtype's rounding of its float64 norm; ScopeSpec.get_masks
    (the API over the same op) agrees. Measured: all masks equal; kth relative error fp32 1.1e-7, bf16 3.8e-3, fp16
    4.7e-4."""
    g = torch.Generator().manual_seed(11)
    rows, scopes, gsz = 32, 8, 8
    lo, hi = (-18, 18) if dt != F16 else (-3, 4)
    steps = torch.linspace(lo, hi, rows * scopes * gsz, dtype=F64)
    u = steps[torch.randperm(steps.numel(), generator=g)].view(rows, scopes * gsz)
    d = torch.randn(rows, scopes * gsz, 4, generator=g, dtype=F64)
    x = ((10.0 ** u)[..., None] * d / d.norm(dim=-1, keepdim=True)).reshape(rows, scopes * gsz * 4).to(dt)
    n64 = x.double().view(rows, scopes, gsz, 4).norm(dim=-1)  # float64 norms of the stored values
    srt = n64.sort(-1).values
    assert bool((srt[..., 1:] > srt[..., :-1] * 1.001).all())  # gaps far above float32 score rounding
    norms = ops.block_norms(x, [1, 4]).view(rows, scopes, gsz)
    spec = gk.ScopeSpec(gk.BlockSpec(x, (1, 4)), (1, gsz))
    worst = 0.0
    for nnz in range(1, gsz):
        order = n64.argsort(dim=-1, descending=True)
        want = torch.zeros(rows, scopes, gsz, dtype=torch.bool).scatter_(2, order[..., :nnz], True)
        got = ops.scope_mask(x, [1, 4], [1, gsz], nnz, expand=False).view(rows, scopes, gsz)
        assert torch.equal(got, want), nnz
        assert torch.equal(spec.get_masks(nnz)[spec.block], want.repeat_interleave(4, 2).view(x.shape)), nnz
        kth = ops.scope_kth(x, [1, 4], [1, gsz], nnz).view(rows, scopes)
        kidx = order[..., nnz - 1:nnz]
        assert torch.equal(kth, norms.gather(2, kidx).squeeze(2)), nnz
        k64 = n64.gather(2, kidx).squeeze(2)
        worst = max(worst, float(((kth.double() - k64).abs() / k64).max()))
    _show("scope kth", dt, worst)
    assert worst <= _NORM_BOUND[dt], worst


# ============================================================================ 3/4. exact top-k: +-0, subnormals, ulps

_BITS = {F64: (torch.int64, 64, 0x7FEFFFFFFFFFFFFF), F32: (torch.int32, 32, 0x7F7FFFFF),
         BF16: (torch.int16, 16, 0x7F7F), F16: (torch.int16, 16, 0x7BFF)}


def _hard(n: int, dt: torch.dtype, seed: int, nonfinite: bool = True) -> torch.Tensor:
    """n values of dt built from bit patterns: a few bases (the smallest subnormals, +-0, random magnitudes over the
    whole finite range) each with neighbours 0..3 ulps away, random signs (so -0.0 and +0.0 both occur), repeats
    (exact ties) and, if ``nonfinite``, +-inf."""
    g = torch.Generator().manual_seed(seed)
    itype, bits, top = _BITS[dt]
    bases = torch.cat([torch.tensor([0, 1, 2, 3, 5, top - 2, top]),
                       torch.randint(4, top - 4, (40,), generator=g, dtype=torch.int64)])
    pat = bases[torch.randint(0, bases.numel(), (n,), generator=g)]
    pat = (pat + torch.randint(0, 4, (n,), generator=g)).clamp(max=top)  # last-ulp neighbours
    if nonfinite:
        inf = torch.rand(n, generator=g) < 0.01
        pat = torch.where(inf, torch.full_like(pat, top + 1), pat)  # +inf's pattern
    sign = torch.rand(n, generator=g) < 0.5
    pat = torch.where(sign, pat - (1 << (bits - 1)), pat)  # the sign bit, as a signed integer
    return pat.to(itype).view(dt)


def _rank64(x: torch.Tensor, active=None) -> torch.Tensor:
    """All positions, best first: float64 values descending (-0.0 == +0.0), equal values lowest position first;
    with ``active``, the active ones first (an inactive -inf must not tie with an active one)."""
    order = torch.sort(x.double() + 0.0, descending=True, stable=True).indices  # -0.0 + 0.0 = +0.0
    if active is not None:
        order = order[torch.sort(active[order].to(torch.int8), descending=True, stable=True).indices]
    return order


def _topk64(x: torch.Tensor, k: int, active=None, order=None) -> torch.Tensor:
    """The ascending positions of the k best of :func:`_rank64`."""
    assert active is None or k <= int(active.sum())
    order = _rank64(x, active) if order is None else order
    return order[:k].sort().values


@pytest.mark.parametrize("dt", [F64, F32, BF16, F16])
def test_topk_select_is_the_float64_stable_ranking_on_hard_values(dt):
    """topk_select over 30000 values of signed zeros, subnormals (the smallest patterns of each dtype), last-ulp
    neighbours, exact repeats and +-inf, for k at every tie boundary of the top 40 distinct values and across the
    range, with and without ``active``: exactly the float64 stable ranking (ties lowest position, -0.0 == +0.0)."""
    x = _hard(30000, dt, seed=21)
    act = torch.rand(x.shape, generator=torch.Generator().manual_seed(22)) < 0.7
    key = x.double() + 0.0
    csum = torch.unique(key, sorted=True, return_counts=True)[1].flip(0).cumsum(0)  # elements >= each value
    ks = {1, 2, 7, 1000, 14999, 29999, 30000, int((key >= 0).sum())}  # the last: every +-0.0 and above
    for c in csum[:40].tolist():
        ks |= {c - 1, c, c + 1}
    vals = torch.unique(key, sorted=True)
    z = int(torch.searchsorted(vals, torch.tensor(0.0, dtype=F64)))
    for v in vals[max(0, z - 4):z + 5].tolist():  # the signed zeros' group and the subnormal groups around it
        hi, ge = int((key > v).sum()), int((key >= v).sum())
        ks |= {hi, hi + 1, (hi + ge) // 2, ge - 1, ge}
    o_all, o_act = _rank64(x), _rank64(x, act)
    for k in sorted(k for k in ks if 0 <= k <= x.numel()):
        assert torch.equal(ops.topk_select(x, k), _topk64(x, k, order=o_all)), (dt, k)
        if k <= int(act.sum()):
            assert torch.equal(ops.topk_select(x, k, act), _topk64(x, k, act, order=o_act)), (dt, k)


@pytest.mark.parametrize("dt", [F32, BF16, F16])
def test_topk_select_segments_is_the_float64_ranking_of_the_concatenation(dt):
    """The same hard values cut into 9 segments of random shapes (two empty), some with ``active`` masks: the
    positions in the concatenation are exactly the float64 stable ranking's, for k across the tie boundaries."""
    x = _hard(12000, dt, seed=23)
    g = torch.Generator().manual_seed(24)
    cuts = sorted(torch.randint(0, 12000, (6,), generator=g).tolist()) + [5000, 5000]  # two empty segments
    cuts = sorted(cuts)
    edges = [0] + cuts + [12000]
    segs = [x[a:b] for a, b in zip(edges[:-1], edges[1:])]
    segs = [s.view(-1, 2) if s.numel() % 2 == 0 and s.numel() else s for s in segs]  # 2-D ones too
    acts = [None if i % 3 else (torch.rand(s.shape, generator=g) < 0.6) for i, s in enumerate(segs)]
    act = torch.cat([torch.ones(s.numel(), dtype=torch.bool) if a is None else a.reshape(-1)
                     for s, a in zip(segs, acts)])
    key = x.double() + 0.0
    vals = torch.unique(key[act], sorted=True).flip(0)
    ks = {1, 3, 500, int(act.sum())}
    for v in vals[:25]:
        c = int(((key >= v) & act).sum())
        ks |= {c - 1, c, c + 1}
    o_all, o_act = _rank64(x), _rank64(x, act)
    for k in sorted(k for k in ks if 0 <= k <= int(act.sum())):
        assert torch.equal(ops.topk_select_segments(segs, k, acts), _topk64(x, k, act, order=o_act)), (dt, k)
        assert torch.equal(ops.topk_select_segments(segs, k), _topk64(x, k, order=o_all)), (dt, k)


@pytest.mark.parametrize("dt", [F32, BF16, F16])
def test_golden_topk_selects_the_float64_ranking_of_abs_values(dt):
    """golden_topk_and_ (first=True packs the selection; then ANDs a second one) on hard finite values and NaN: the
    k largest |g| by the float64 stable ranking (|-0.0| ties +0.0, subnormals above zero, NaN never selected), the
    counts and the popcount; golden_masks(percent=...) over the same gradient selects the same set."""
    import gradkit.golden as G

    g0 = _hard(8000, dt, seed=25, nonfinite=False)
    g1 = _hard(8000, dt, seed=26, nonfinite=False)
    nan = torch.rand(8000, generator=torch.Generator().manual_seed(27)) < 0.02
    g0 = torch.where(nan, torch.full_like(g0, float("nan")), g0)
    a0, a1 = g0.double().abs(), g1.double().abs()
    for k in (1, 13, 800, 4000, 7840):
        want0 = torch.zeros(8000, dtype=torch.bool)
        want0[_topk64(a0.nan_to_num(-1.0), k)] = True  # NaN below every |g|: never selected while k <= finite count
        want1 = torch.zeros(8000, dtype=torch.bool)
        want1[_topk64(a1, k)] = True
        bits = torch.zeros(1000, dtype=torch.uint8)
        counts = torch.zeros(8000, dtype=torch.int32)
        pc = ops.golden_topk_and_(g0, bits, k, counts=counts, first=True)
        assert torch.equal(bits, ops.pack_bitmask(want0)) and int(pc) == k, (dt, k)
        pc = ops.golden_topk_and_(g1, bits, k, counts=counts)
        assert torch.equal(bits, ops.pack_bitmask(want0 & want1)) and int(pc) == int((want0 & want1).sum()), (dt, k)
        assert torch.equal(counts, want0.int() + want1.int()), (dt, k)
    res = G.golden_masks([{"w": g1}], percent=10.0)
    want = torch.zeros(8000, dtype=torch.bool)
    want[_topk64(a1, 800)] = True
    assert torch.equal(res.masks["w"].to_bool().reshape(-1), want)


# ============================================================================ 3. MaskedAdamW against float64 AdamW


def _grads(n: int, steps: int, dt: torch.dtype, lo: float, hi: float, seed: int):
    """Per entry a gradient scale 10^u (u integer in [lo, hi]), per step scale * (N(0, 1) + 0.3), rounded to dt."""
    g = torch.Generator().manual_seed(seed)
    sc = 10.0 ** torch.randint(lo, hi + 1, (n,), generator=g).double()
    return [((torch.randn(n, generator=g, dtype=F64) + 0.3) * sc).to(dt) for _ in range(steps)]


def _adam_drift(dt, lo, hi, lr, steps=100, n=2048, seed=0, masked=False):
    """Drift after ``steps`` of MaskedAdamW (equal rates, or rate 0 off a random half mask) and torch.optim.AdamW
    (single-tensor and foreach) on dt parameters, against torch.optim.AdamW in float64 from the same start with the
    same (rounded) gradients: ||p - p64|| / ||p64 - p0|| over the stepped entries, and the max |p - p64|."""
    grads = _grads(n, steps, dt, lo, hi, seed)
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(dt)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed + 2)) < 0.5 if masked else torch.ones(
        n, dtype=torch.bool)
    kw = dict(weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8)
    pt = torch.nn.Parameter(p0.double())
    ps = {k: torch.nn.Parameter(p0.clone()) for k in ("gk", "torch", "foreach")}
    opts = [torch.optim.AdamW([pt], lr=lr, foreach=False, **kw),
            MaskedAdamW({"w": ps["gk"]}, {"w": mask}, masked_lr=lr, unmasked_lr=0.0 if masked else lr, **kw),
            torch.optim.AdamW([ps["torch"]], lr=lr, foreach=False, **kw),
            torch.optim.AdamW([ps["foreach"]], lr=lr, foreach=True, **kw)]
    for gr in grads:
        pt.grad = gr.double()
        for p in ps.values():
            p.grad = gr.clone()
        for o in opts:
            o.step()
    if masked:
        assert torch.equal(ps["gk"].detach()[~mask], p0[~mask])  # rate 0: bit for bit unchanged
    moved = (pt.detach() - p0.double())[mask]
    out = {}
    for k, p in ps.items():
        d = (p.detach().double() - pt.detach())[mask]
        out[k] = (float(d.norm() / moved.norm()), float(d.abs().max()))
    return out


@pytest.mark.parametrize("dt,lo,hi,lr,bound", [
    (F32, -25, 16, 1e-2, 1.0005),  # tiny and huge gradients (g^2 up to 1e32, fits float32)
    (BF16, -25, 16, 1e-2, 1.0),
    (BF16, -25, 16, 1e-1, 0.6),
    (BF16, 6, 16, 1e-1, 0.25),
    (F16, 1, 3, 1e-2, 1.0),  # fp16: gradients 10 .. 1e4 (below its 65504)
])
@pytest.mark.parametrize("masked", [False, True])
def test_masked_adamw_100_steps_drift_vs_float64_no_worse_than_torch_adamw(dt, lo, hi, lr, bound, masked):
    """100 steps; drift against float64 AdamW relative to the float64 movement. gradkit computes each step in float32
    and rounds once into the dtype; torch rounds every intermediate to the parameter dtype. Measured gradkit / torch
    (relative-norm drift; torch's foreach step drifts as its single-tensor one): fp32 1.00015 (both 7.6e-6: the
    float32 weight-decay factor); bf16 lr=1e-2 0.983 (both ~0.25: bf16 rounding of the parameter), lr=1e-1 0.486
    (huge gradients only: 0.212); fp16 lr=1e-2 0.964; max-drift ratios 0.30 .. 1.0. The bound is on the ratio."""
    r = _adam_drift(dt, lo, hi, lr, masked=masked)
    ratio = r["gk"][0] / max(r["torch"][0], r["foreach"][0] * 0 + r["torch"][0])
    ratio_max = r["gk"][1] / r["torch"][1]
    _show("adamw", dt, lo, hi, lr, masked, r, ratio, ratio_max)
    assert all(math.isfinite(v) for v in r["gk"])
    assert ratio <= bound and ratio_max <= max(bound, 1.0), (ratio, ratio_max, r)


def test_masked_adamw_fp16_tiny_gradients_finite_where_torch_adamw_is_nan():
    """fp16 parameters, gradients 1e-7 .. 1e-4: torch.optim.AdamW (fp16 state, fp16 arithmetic) divides by
    sqrt(v) + eps with v = 0 and eps = 1e-8 rounded to 0 in fp16: NaN after the first step. MaskedAdamW computes in
    float32: every parameter finite (its drift: the strict xfail below)."""
    r = _adam_drift(F16, -7, -4, 1e-2)
    assert all(math.isfinite(v) for v in r["gk"]), r
    assert math.isnan(r["torch"][0]) and math.isnan(r["foreach"][0]), r


@pytest.mark.xfail(strict=True, reason="MaskedAdamW keeps exp_avg_sq in the parameter's dtype (python/gradkit/optim.py "
                   "step: zeros_like(p)); for float16 parameters with |g| <~ 8e-3, (1 - beta2) g^2 underflows float16 "
                   "(< 6e-8) and is stored as 0, so every step divides by sqrt((1 - beta2) g^2) / bias_correction2 "
                   "instead of ~|g|: updates up to 10x too large. After 100 steps (lr=1e-2, gradients 1e-7 .. 1e-4) "
                   "the drift from float64 AdamW is 27x the float64 movement (torch.optim.AdamW: NaN). Needs float32 "
                   "state for half-precision parameters, not a small fix")
def test_masked_adamw_fp16_tiny_gradients_track_float64_adamw():
    r = _adam_drift(F16, -7, -4, 1e-2)
    assert r["gk"][0] <= 0.05, r

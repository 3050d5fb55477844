"""Pruning baselines on gradkit's scope objects: SparseGPT, magnitude and OBD.

All three take a :class:`gradkit.scope.ScopeSpec` over one 2-D weight ``(M, K)`` (see
:func:`gradkit.obs.layout.obs_layout`) and keep ``nnz`` blocks in every scope. They work in a copy
and return the pruned weight; ``inplace=True`` also writes it back into the scope's parameter, and
only after everything succeeded. ``nnz >= blocks per scope`` is a documented no-op: an unchanged
copy is returned (after the inputs are checked). Elements of the weight outside the scope's view
are never pruned (SparseGPT still compensates them: they are free weights).

Hessian conventions (``H = X^T X``, damping, dead columns) are those of
:mod:`gradkit.obs.metrics`.

Ties (equal block scores) keep the block with the lowest in-scope index, as
:class:`gradkit.scope.ScopeSpec` does.
"""
from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from gradkit._rules import FLOATS, all_finite, flag, int_arg
from gradkit.obs.layout import ObsLayout, obs_layout
from gradkit.obs.metrics import (
    NotPositiveDefiniteError,
    _check_damp,
    _check_dtype,
    _check_finite,
    _check_hessian,
    _cholesky,
    _damped_hessian,
    cast_finite,
)

__all__ = ["sparsegpt", "magnitude", "obd"]


# --------------------------------------------------------------------------- shared helpers


def _check_nnz(nnz) -> int:
    return int_arg(nnz, "nnz", "an int (blocks kept per scope)", 0, "blocks kept per scope")


def _layout(scope) -> ObsLayout:
    lay = obs_layout(scope)
    if lay.weight.dtype not in FLOATS:
        raise TypeError(f"scope: the pruned weight must be floating, got {lay.weight.dtype}")
    _check_finite(lay.weight, "weight (the scope's parameter)")
    return lay


def _scope_hessian_args(scope, hessian: Tensor, nnz, damp) -> Tuple[ObsLayout, int, float]:
    """The checks every Hessian-based baseline starts with, in order: scope, nnz, hessian, damp."""
    lay = _layout(scope)
    nnz = _check_nnz(nnz)
    if isinstance(hessian, Tensor) and hessian.device.type == "meta":  # the checks below read values
        raise ValueError("hessian: is a meta tensor (no data); pass the materialised matrix")
    _check_hessian(hessian, lay.K)
    return lay, nnz, _check_damp(damp)


def _check_inplace_weight(lay: ObsLayout, inplace: bool) -> None:
    """``inplace=True`` writes the scope's weight: an inference tensor (made under ``torch.inference_mode()``) is
    refused outside inference mode before any work, as gradkit's in-place ops refuse it (session 43: the write-back's
    ``copy_`` wrote the pruned values into it and only then raised torch's RuntimeError, after the whole pruning)."""
    if inplace:
        from gradkit.ops import _check_not_inference

        _check_not_inference((lay.weight,), "weight (the scope's parameter)")


def _keep_top(scores: Tensor, nnz: int) -> Tensor:
    """(S, gs) scores -> bool keep mask with exactly nnz per row; ties keep the lowest index."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :nnz], True)
    return keep


def _finish(lay: ObsLayout, result: Tensor, inplace: bool) -> Tensor:
    if inplace:
        with torch.no_grad():
            lay.weight.copy_(result)
    return result


def _mask_prune(lay: ObsLayout, scores: Tensor, nnz: int, inplace: bool) -> Tensor:
    out = lay.weight.detach().clone(memory_format=torch.contiguous_format)
    keep = _keep_top(scores, nnz)
    out.view(-1)[lay.elems[~keep].reshape(-1)] = 0
    return _finish(lay, out, inplace)


# --------------------------------------------------------------------------- magnitude / OBD


def magnitude(scope, nnz: int, inplace: bool = False) -> Tensor:
    """Keep the ``nnz`` blocks of largest L2 norm in every scope; zero the others. No update."""
    lay = _layout(scope)
    nnz = _check_nnz(nnz)
    inplace = flag(inplace, "inplace")
    _check_inplace_weight(lay, inplace)
    if nnz >= lay.gs or lay.S == 0:
        return lay.weight.detach().clone()
    w = lay.weight.detach().reshape(-1)
    scores = w[lay.elems].double().square().sum(-1)
    return _mask_prune(lay, scores, nnz, inplace)


def obd(scope, hessian: Tensor, nnz: int, damp: float = 0.0, inplace: bool = False) -> Tensor:
    """Optimal Brain Damage: keep the ``nnz`` blocks of largest saliency ``sum_e w_e^2 (H_jj + lam)``
    (``j`` the element's column, ``lam`` the damping of :mod:`gradkit.obs.metrics`) per scope; zero
    the others, no compensation. A dead column (``H_jj == 0``) has saliency ``lam w^2``."""
    lay, nnz, damp = _scope_hessian_args(scope, hessian, nnz, damp)
    inplace = flag(inplace, "inplace")
    _check_inplace_weight(lay, inplace)
    if nnz >= lay.gs or lay.S == 0:
        return lay.weight.detach().clone()
    hdiag = hessian.detach().diagonal().to(device=lay.weight.device, dtype=torch.float64)
    if bool((hdiag < 0).any()):
        raise NotPositiveDefiniteError("hessian: has a negative diagonal entry; not a Gram matrix X^T X")
    lam = damp * float(hdiag.mean()) if damp < 1.0 else damp
    w = lay.weight.detach().reshape(-1)
    scores = (w[lay.elems].double().square() * (hdiag + lam)[lay.cols]).sum(-1)
    return _mask_prune(lay, scores, nnz, inplace)


# --------------------------------------------------------------------------- SparseGPT


@dataclass
class _Event:
    """A mask decision taken when the column sweep reaches local column ``col`` of a lazy block:
    in each of ``loc.shape[0]`` scopes, prune ``quota`` of the candidate blocks (``valid``)."""

    col: int
    loc: Tensor  # (n_s, n, bk) flat positions in the lazy block's transposed (bsz, M) slice
    c: Tensor  # (n_s, n, bk) local columns
    valid: Optional[Tensor]  # (n_s, n) bool, None = all valid
    quota: Union[int, Tensor]  # per scope blocks to prune


@dataclass
class _RowsEvent:
    """N:M along the rows: every weight row's scope of ``gs`` blocks of ``bk`` columns at block columns
    ``c0 .. c0 + gs * bk``, decided when the sweep reaches ``c0`` (what the general plan builds for such
    scopes, without the per-element index tensors)."""
    c0: int
    gs: int
    bk: int
    quota: int


def _nm_span(lay: ObsLayout, blocksize: int) -> int:
    """``gs * bk`` when every scope is ``gs * bk`` consecutive elements of one weight row, the scopes in row-major
    order, and a scope fits a lazy block (N:M patterns such as 2:4 over the input features), else 0."""
    span = lay.gs * lay.bk
    if lay.row_coupled or span == 0 or span > blocksize or lay.K % span or lay.S * span != lay.M * lay.K:
        return 0
    flat = lay.elems.reshape(-1)
    return span if torch.equal(flat, torch.arange(flat.numel(), device=flat.device)) else 0


def _rows_plan(lay: ObsLayout, nnz: int, blocksize: int, span: int) -> List[Tuple[int, int, Dict[int, list]]]:
    """:func:`_lazy_plan` for N:M along the rows (``_nm_span``): the same block boundaries (a block that would end
    inside a scope runs to the scope's end) and one event per scope column."""
    k, p, plan, i1 = lay.K, lay.gs - nnz, [], 0
    while i1 < k:
        i2 = min(k, -(-(i1 + blocksize) // span) * span)
        plan.append((i1, i2, {c: [_RowsEvent(c, lay.gs, lay.bk, p)] for c in range(0, i2 - i1, span)}))
        i1 = i2
    return plan


def _select_rows(ev: _RowsEvent, w1: Tensor, dcol: Tensor, prune1: Tensor, select) -> None:
    """:func:`_select` for a :class:`_RowsEvent`. float32: the native ``obs_select`` (cost w^2 / d^2 per element,
    summed over the block in element order; the lowest costs pruned, equal costs the lower block first), given
    the blocks in reverse order, so that equal costs prune the higher block first: sparsegpt's tie rule."""
    gs, bk, q, c0 = ev.gs, ev.bk, ev.quota, ev.c0
    span, m = gs * bk, w1.shape[1]
    wv, d = w1[c0:c0 + span], dcol[c0:c0 + span]
    if w1.dtype == torch.float32:
        wr = wv.view(gs, bk, m).flip(0).permute(2, 0, 1).reshape(m, span)
        dr = (d * d).view(gs, bk).flip(0).reshape(1, span).expand(m, span)
        pos = select(wr, dr, gs, bk, q, 0.0)  # (m, q * bk): positions in the reversed scope
        col = (gs - 1) - pos if bk == 1 else (gs - 1 - pos // bk) * bk + pos % bk
    else:
        score = (wv * wv / (d * d)[:, None]).view(gs, bk, m).sum(1).T  # (m, gs)
        score = torch.nan_to_num(score, nan=float("inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, gs - q:]  # (m, q)
        col = order if bk == 1 else (order[:, :, None] * bk + torch.arange(bk, device=order.device)).reshape(m, -1)
    prune1[c0:c0 + span].scatter_(0, col.T, True)


def _imin(x: Tensor, dim: int) -> Tensor:
    """``x.amin(dim)`` for non-negative int64 ``x`` through ``amax``: torch 2.13's CPU int64 ``amin`` over a dim
    is ~50x slower than its ``amax`` (27 ms against 0.6 ms for 131072 x 4 at 2 threads, an Intel Xeon), which
    made it most of SparseGPT's lazy-block plan."""
    return x.neg().amax(dim).neg_()


def _lazy_plan(lay: ObsLayout, nnz: int, blocksize: int, dead: Optional[Tensor] = None,
               pre: Optional[Tensor] = None) -> List[Tuple[int, int, Dict[int, List[_Event]]]]:
    """Lazy-block boundaries and the mask events of each block (see :func:`sparsegpt`).

    ``dead`` ((K,) bool, or None): the dead inputs. A block of a wide scope that lies wholly on dead inputs is free
    to prune: up to the scope's quota of them (the highest in-scope indices first) are marked in ``pre`` (the
    ``(M, K)`` prune mask, before the sweep), and the rest of the quota is spread over the live blocks only.
    Narrow scopes need nothing: their dead weights are zero in the sweep, so they score 0 and go first."""
    k, gs, bk = lay.K, lay.gs, lay.bk
    elems = lay.elems
    dev = elems.device
    cols = elems % k
    lo_s = _imin(cols.flatten(1), 1)
    hi_s = cols.flatten(1).amax(1)
    narrow = (hi_s - lo_s + 1) <= blocksize
    ids_n = torch.nonzero(narrow).squeeze(1)
    ids_w = torch.nonzero(~narrow).squeeze(1)
    # units that must not straddle a lazy-block boundary: narrow scopes, and blocks of wide scopes
    lo_b = _imin(cols[ids_w], 2)
    hi_b = cols[ids_w].amax(2)
    u_lo = torch.cat([lo_s[ids_n], lo_b.reshape(-1)])
    u_hi = torch.cat([hi_s[ids_n], hi_b.reshape(-1)])
    reach = torch.full((k,), -1, dtype=torch.long, device=dev)
    if u_lo.numel():
        reach.scatter_reduce_(0, u_lo, u_hi, "amax")
    reach = torch.cummax(reach, 0).values.tolist() if k else []
    bounds = [0]
    while bounds[-1] < k:
        end = min(bounds[-1] + blocksize, k)
        while end < k and reach[end - 1] >= end:
            end = reach[end - 1] + 1
        bounds.append(min(end, k))
    plan = [(bounds[i], bounds[i + 1], {}) for i in range(len(bounds) - 1)]
    starts = bounds[:-1]

    def add(i1: int, bsz: int, events: Dict[int, List[_Event]], col: int, el: Tensor, valid, quota) -> None:
        r, c = el // k, el % k - i1
        events.setdefault(col, []).append(_Event(col, c * lay.M + r, c, valid, quota))

    p = gs - nnz
    # narrow scopes: decided when the sweep reaches their first column, from the current weights
    if ids_n.numel():
        lo = lo_s[ids_n]
        order = torch.argsort(lo, stable=True)
        ids_sorted, lo_sorted = ids_n[order], lo[order]
        # every narrow scope's locations in its lazy block, in one pass (not one division per column)
        starts_t = torch.tensor(starts, dtype=torch.long, device=dev)
        i1_s = starts_t[torch.searchsorted(starts_t, lo_sorted, right=True) - 1]
        c_all = cols[ids_sorted] - i1_s[:, None, None]
        loc_all = c_all * lay.M + elems[ids_sorted] // k
        uniq, counts = torch.unique_consecutive(lo_sorted, return_counts=True)
        o1 = 0
        for col, cnt in zip(uniq.tolist(), counts.tolist()):  # slices, not torch.split (~18 us a piece)
            o0, o1 = o1, o1 + cnt
            i1, _, events = plan[bisect.bisect_right(starts, col) - 1]
            events.setdefault(col - i1, []).append(_Event(col - i1, loc_all[o0:o1], c_all[o0:o1], None, p))
    # wide scopes: each lazy block prunes a cumulative-proportional share of the scope's quota
    if ids_w.numel():
        ew = elems[ids_w]
        b_order = torch.argsort(lo_b, dim=1, stable=True)
        lo_sorted = lo_b.gather(1, b_order).contiguous()
        nw = ids_w.numel()
        t_prev = torch.zeros(nw, dtype=torch.long, device=dev)
        p_live = torch.full((nw,), p, dtype=torch.long, device=dev)  # blocks to prune among the live ones
        n_live = torch.full((nw,), gs, dtype=torch.long, device=dev)
        dead_sorted = dead_before = None
        if dead is not None:
            dblk = dead[cols[ids_w]].all(2)  # (nw, gs): blocks wholly on dead inputs
            nd = dblk.sum(1)
            # the free blocks go first, up to the quota: those with the highest in-scope index (ties keep the lowest)
            free = dblk & (dblk.flip(1).cumsum(1).flip(1) <= p)
            pre.view(-1)[ew[free].reshape(-1)] = True
            p_live = p - nd.clamp_max(p)
            n_live = gs - nd
            dead_sorted = dblk.gather(1, b_order)
            dead_before = torch.cat([torch.zeros(nw, 1, dtype=torch.long, device=dev), dead_sorted.cumsum(1)], 1)
        den = n_live.clamp_min(1)
        for i1, i2, events in plan:
            q = torch.tensor([[i1, i2]], device=dev).expand(nw, 2).contiguous()
            se = torch.searchsorted(lo_sorted, q)  # first block with lo >= i1 / >= i2
            s0, s1 = se[:, 0], se[:, 1]
            cum = s1  # blocks of the scope in lazy blocks up to this one (live ones when some are dead)
            if dead_before is not None:
                cum = cum - dead_before.gather(1, s1[:, None]).squeeze(1)
            # round(p * cum / gs), half up; == p when cum == gs (p and gs counting live blocks when some are dead)
            t = (2 * p_live * cum + n_live) // (2 * den)
            quota = t - t_prev
            t_prev = t
            n = s1 - s0
            sel = torch.nonzero((n > 0) & (quota > 0)).squeeze(1)
            if not sel.numel():
                continue
            nmax = int(n[sel].max())
            ar = torch.arange(nmax, device=dev)
            valid = ar < n[sel, None]
            # padding points at the scope's first block here, not past it: a later block may lie in a later lazy
            # block, outside this one's (bsz, M) slice (an IndexError once, 2:4 scopes with blocksize=3)
            pos = torch.where(valid, s0[sel, None] + ar, s0[sel, None])
            if dead_sorted is not None:
                valid &= ~dead_sorted[sel].gather(1, pos)
            blk = b_order[sel].gather(1, pos)
            el = ew[sel].gather(1, blk.unsqueeze(2).expand(-1, -1, bk))
            add(i1, i2 - i1, events, 0, el, valid, quota[sel])
    return plan


def _select(ev: _Event, w1: Tensor, dcol: Tensor, prune1: Tensor) -> None:
    wv = w1.reshape(-1)[ev.loc]
    d = dcol[ev.c]
    score = (wv * wv / (d * d)).sum(-1)  # (n_s, n): OBS saliency of each block, w^2 / [H_F^-1]_jj
    score = torch.nan_to_num(score, nan=float("inf"))  # a NaN saliency ranks as +inf (then by block index)
    n = score.shape[1]
    if ev.valid is None and isinstance(ev.quota, int):  # N:M-like scopes: the quota's last blocks in the order
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, n - ev.quota:]
        locs = ev.loc.gather(1, order.unsqueeze(2).expand(-1, -1, ev.loc.shape[2]))
        prune1.view(-1).index_fill_(0, locs.reshape(-1), True)
        return
    if ev.valid is not None:
        score = score.masked_fill(~ev.valid, -float("inf"))
        nvalid = ev.valid.sum(1)
    else:
        nvalid = torch.full((score.shape[0],), n, dtype=torch.long, device=score.device)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=score.device).expand_as(order))
    cut = nvalid - ev.quota  # blocks ranked >= cut are pruned (ties keep the lower index)
    pr = rank >= cut.unsqueeze(1)
    if ev.valid is not None:
        pr &= ev.valid
    prune1.view(-1)[ev.loc[pr].reshape(-1)] = True


def _lower_inverse(lf: Tensor, leaf: int = 256) -> Tensor:
    """L^-1 of a lower-triangular L by halves, [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]: mostly one
    GEMM (C A^-1) and one triangular solve (D^-1 of it) per level, where a triangular solve against the identity
    does n^3 multiply-adds and LAPACK's trtri is not bound in torch; leaves of at most ``leaf`` rows by triangular
    solve. (float32 4096 x 4096, two threads of an Intel Xeon: 188 ms, 213 with a second GEMM for D^-1.)"""
    n = lf.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(lf, torch.eye(n, dtype=lf.dtype, device=lf.device), upper=False)
    h = n // 2
    ai, di = _lower_inverse(lf[:h, :h], leaf), _lower_inverse(lf[h:, h:], leaf)
    out = torch.zeros_like(lf)
    out[:h, :h] = ai
    out[h:, h:] = di
    out[h:, :h] = torch.linalg.solve_triangular(lf[h:, h:], lf[h:, :h] @ ai, upper=False).neg_()
    return out


def _dead_inputs(hessian: Tensor, dev, dtype: torch.dtype) -> Optional[Tensor]:
    """(K,) bool: the inputs that were always 0 in calibration (``H[j, j] == 0`` in ``dtype``, as
    :func:`gradkit.obs.metrics.damped_hessian` decides, and the whole row zero, so the input is decoupled), or None."""
    h = hessian.detach()
    dead = h.diagonal().to(device=dev, dtype=dtype) == 0
    if not bool(dead.any()):
        return None
    idx = torch.nonzero(dead).squeeze(1)
    dead[idx] = (h[idx.to(h.device)].to(device=dev, dtype=dtype) == 0).all(1)
    return dead if bool(dead.any()) else None


def _sparsegpt(lay: ObsLayout, hessian: Tensor, nnz: int, damp: float, blocksize: int, progress: bool,
               dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    m, k = lay.M, lay.K
    dev = lay.weight.device
    dead = _dead_inputs(hessian, dev, dtype)
    hd, lam = _damped_hessian(hessian.to(dev), damp, dtype)
    # U, the upper Cholesky factor of H^-1 (H^-1 = U^T U), straight from a factor of H: with J the index reversal,
    # J H J = L L^T gives H^-1 = J L^-T L^-1 J = U^T U for U = J L^-1 J (upper, positive diagonal: by uniqueness
    # the factor itself). One Cholesky and one triangular inverse: half the flops of factoring H, inverting it
    # (LAPACK potri, single-threaded) and factoring the inverse again, and no second factorisation to fail
    # (float32, an Intel Xeon at 2 threads: 1024 x 1024 15.2 ms against 34.9 ms, 4096 x 4096 483 against 924 ms;
    # error against float64 1.7e-7 against 2.5e-7 of the largest entry at 1024, 2.8e-7 against 2.4e-7 at 4096;
    # the triangular inverse by halves with a solve per level since, 188 instead of 213 ms of those 483 at 4096).
    lf = _cholesky(hd.flip(0, 1), "hessian", damp, lam)
    del hd
    u = _lower_inverse(lf).flip(0, 1)
    del lf
    w = lay.weight.detach().to(dtype=dtype, copy=True).contiguous()
    prune = torch.zeros(m, k, dtype=torch.bool, device=dev)
    w_dead = None
    if dead is not None:
        # weights on dead inputs cost nothing to prune (their input is always 0): zeroed for the sweep (as SparseGPT
        # does), they score 0 and are pruned first; their column of U is e_j U[j, j], so nothing else changes them
        w_dead = w[:, dead]
        w[:, dead] = 0
    span = _nm_span(lay, blocksize)
    plan = _rows_plan(lay, nnz, blocksize, span) if span else _lazy_plan(lay, nnz, blocksize, dead, prune)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=k, desc="sparsegpt", unit="col", leave=False)
    # The column sweep between mask events runs as one obs_sweep_ call (a native kernel: before, four torch ops
    # per column). The block tensors are built here, so the op's checks are not repeated: the backend's kernel is
    # called directly, below the ADInplaceOrView version bump (nothing saved them for autograd).
    from gradkit.ops import _impl

    sweep = _impl("obs_sweep_", "obs")
    select = _impl("obs_select", "obs") if span and dtype == torch.float32 else None
    try:
        with torch._C._AutoDispatchBelowADInplaceOrView():
            for i1, i2, events in plan:
                bsz = i2 - i1
                # the lazy block transposed, (bsz, M): a column is contiguous, the trailing update one addmm_
                w1 = w[:, i1:i2].T.contiguous()
                err1 = torch.empty_like(w1)
                u1 = u[i1:i2, i1:i2]
                dcol = u1.diagonal()
                prune1 = prune[:, i1:i2].T.contiguous()  # dead-input blocks of wide scopes are marked already
                done = 0
                for col in sorted(events):  # sweep up to the event's column, then decide its masks
                    if col > done:
                        sweep(w1, err1, u1, prune1, done, col)
                        done = col
                    for ev in events[col]:
                        if span:
                            _select_rows(ev, w1, dcol, prune1, select)
                        else:
                            _select(ev, w1, dcol, prune1)
                if done < bsz:
                    sweep(w1, err1, u1, prune1, done, bsz)
                w[:, i1:i2] = w1.T
                prune[:, i1:i2] = prune1.T
                if i2 < k:
                    w[:, i2:].addmm_(err1.T, u[i1:i2, i2:], alpha=-1.0)
                if bar is not None:
                    bar.update(bsz)
    finally:
        if bar is not None:
            bar.close()
    if not all_finite(w):
        raise NotPositiveDefiniteError(f"sparsegpt: the updates overflowed (H is numerically singular with damp={damp}); "
                                       "increase damp")
    if w_dead is not None:  # kept dead-input weights keep their value (as resolve keeps them)
        w[:, dead] = w_dead.masked_fill_(prune[:, dead], 0)
    return w, ~prune


def sparsegpt_mask(scope, hessian: Tensor, nnz: int, damp: float = 0.01) -> Tensor:
    """SparseGPT's keep-mask alone (``sparsegpt(..., return_mask=True)[1]``, float32), for callers that compute
    their own weights from it: no overflow check on compensated weights it does not return."""
    lay, nnz, damp = _scope_hessian_args(scope, hessian, nnz, damp)
    if nnz >= lay.gs or lay.S == 0:
        return torch.ones(lay.M, lay.K, dtype=torch.bool, device=lay.weight.device)
    return _sparsegpt(lay, hessian, nnz, damp, 128, False, torch.float32)[1]


def _sparsegpt_options(blocksize: int = 128, progress: bool = False, inplace: bool = False,
                       dtype: torch.dtype = torch.float32, return_mask: bool = False):
    """:func:`sparsegpt`'s options, checked (its defaults): also what ``prune_model`` checks of ``method_kwargs``
    before any work, so that a bad one is not first refused at the first layer."""
    dtype = _check_dtype(dtype)
    if isinstance(blocksize, bool):
        raise TypeError("blocksize: expected an int")
    try:
        blocksize = operator.index(blocksize)
    except TypeError:
        raise TypeError(f"blocksize: expected an int, got {type(blocksize).__name__}") from None
    if blocksize < 1:
        raise ValueError(f"blocksize: expected >= 1, got {blocksize}")
    inplace, progress = flag(inplace, "inplace"), flag(progress, "progress")
    return blocksize, progress, inplace, dtype, flag(return_mask, "return_mask")


def sparsegpt(scope, hessian: Tensor, nnz: int, damp: float = 0.01, blocksize: int = 128, progress: bool = False,
              inplace: bool = False, dtype: torch.dtype = torch.float32,
              return_mask: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """SparseGPT (Frantar & Alistarh, 2023) on a scope: column-sequential OBS with lazy block updates.

    ``C = (H + lam I)^-1`` (damping as in :mod:`gradkit.obs.metrics`; ``damp=0.01`` = 1 % of the
    mean diagonal) is factored as ``C = U^T U`` (upper Cholesky). Columns are swept left to right
    in lazy blocks of about ``blocksize`` columns; at column ``j`` every weight of the column that
    the mask prunes is zeroed, its error ``err = w / U[j, j]`` is spread over the remaining columns
    of the lazy block (``W[:, j:] -= err U[j, j:]``), and after the block the columns to its right
    receive all of the block's errors in one GEMM.

    Mask rule (exactly ``nnz`` blocks kept per scope; saliency of a block = sum over its elements
    of ``w^2 / U[j, j]^2`` with the current, already compensated weights):

    * a scope whose columns span at most ``blocksize`` (N:M along rows, coupled 2:4 through
      ``View.pairs``, blocks of several columns, row-coupled scopes such as ``View.row_pairs``) is
      decided when the sweep reaches its first column, jointly over all its blocks and rows;
      lazy-block boundaries are moved right so that no such scope straddles one;
    * a wider scope (e.g. unstructured per row: the scope is the whole row) is decided lazy block
      by lazy block when the sweep enters each one: with ``P = gs - nnz`` blocks to prune and
      ``c_b`` of the scope's blocks (by first column) in lazy blocks ``0..b``, lazy block ``b``
      prunes ``round(P c_b / gs) - round(P c_{b-1} / gs)`` (halves up) of its blocks, the lowest
      saliencies first, so the scope ends with exactly ``nnz`` (SparseGPT's own unstructured mode
      thresholds a whole lazy block at once instead, which does not give equal per-row counts).

    Dead inputs (``H[j, j] == 0``: the input was always 0, so pruning its weights costs nothing) are
    pruned first, as SparseGPT does by zeroing ``W[:, dead]`` before the sweep: their weights score 0
    in every decision (within the pattern: in N:M a dead-input weight is among its group's pruned
    ones), and in a wide scope the blocks wholly on dead inputs take the quota first (the highest
    in-scope indices when there are more of them than the quota), the rest of the quota being spread
    over the live blocks as above. Dead-input weights that stay kept keep their value (as in
    :func:`gradkit.obs.metrics.resolve`; nothing compensates into a dead column). The inverse is
    still taken of ``H`` with the dead diagonal decoupled as in :mod:`gradkit.obs.metrics`.

    ``dtype`` is the compute precision (float32 as SparseGPT; float64 for references). Returns the
    pruned weight (the scope's parameter shape and dtype), and with ``return_mask=True`` also the
    ``(M, K)`` bool keep-mask (False = pruned). Raises :class:`NotPositiveDefiniteError` when ``H``
    is not positive definite after damping (or the updates overflow), and RuntimeError when the
    result is finite in ``dtype`` but overflows the weight's own dtype (an fp16 weight); the weight
    is untouched either way.
    """
    lay, nnz, damp = _scope_hessian_args(scope, hessian, nnz, damp)
    blocksize, progress, inplace, dtype, return_mask = _sparsegpt_options(blocksize, progress, inplace, dtype,
                                                                          return_mask)
    _check_inplace_weight(lay, inplace)
    if nnz >= lay.gs or lay.S == 0:
        out = lay.weight.detach().clone()
        keep = torch.ones(lay.M, lay.K, dtype=torch.bool, device=out.device)
        return (out, keep) if return_mask else out
    out, keep = _sparsegpt(lay, hessian, nnz, damp, blocksize, progress, dtype)
    out = cast_finite(out, lay.weight.dtype, "sparsegpt: the pruned weights overflow the weight's dtype",
                      "; the weight is untouched")
    _finish(lay, out, inplace)
    return (out, keep) if return_mask else out

"""Plain-PyTorch float64 oracles for OBS pruning: the Schur-downdate recursion run literally.

``true_obs_reference`` keeps a full K x K inverse per row and applies, batch after batch,
``w <- w - C[:, P] C[P, P]^-1 w_P`` and ``C <- C - C[:, P] C[P, P]^-1 C[P, :]`` exactly as
the method is defined; the fast path (``gradkit.obs.structured``) must agree with it.
"""
from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor

from gradkit.kernels.reference.scope import addressless, byte_span, check_inplace

SCORE_EPS = 1e-8
BLOCK_EPS = 1e-4


def obs_update(w: Tensor, C: Tensor, P: Tensor):
    """One OBS step on one row: prune positions P with compensation; returns (w', C')."""
    if P.numel() == 0:
        return w, C
    Cpp = C[P][:, P]
    L = torch.linalg.cholesky(Cpp)
    y = torch.cholesky_solve(w[P].unsqueeze(1), L).squeeze(1)
    w = w - C[:, P] @ y
    w[P] = 0
    C = C - C[:, P] @ torch.cholesky_solve(C[P, :], L)
    return w, C


def true_obs_reference(W: Tensor, C: Tensor, group_rows: Tensor, t_col: Tensor, t_lrow: Tensor, ng: int,
                       num_prune: int, scoring: str, coupled: bool) -> Tensor:
    """W (M, K); C (K, K); group_rows (G, R) weight rows of each row group; t_col / t_lrow
    (Q, gs, bk) the columns / local rows of each scope slot in processing order. Returns W' (float64)."""
    W = W.double().clone()
    C = C.double()
    pruned = torch.zeros(W.shape, dtype=torch.bool)
    Q, gs, bk = t_col.shape
    for grp in group_rows.tolist():
        Cs = {r: C.clone() for r in grp}
        for q0 in range(0, Q, ng):
            chosen = []  # (slot, pruned block ids)
            for q in range(q0, min(Q, q0 + ng)):
                costs = []
                for b in range(gs):
                    r = grp[int(t_lrow[q, b, 0])]
                    cols = t_col[q, b]
                    w = W[r, cols]
                    Cr = Cs[r]
                    if coupled:
                        Cb = Cr[cols][:, cols] + BLOCK_EPS * torch.eye(bk, dtype=torch.float64)
                        costs.append(float(w @ torch.linalg.solve(Cb, w)))
                    else:
                        costs.append(float((w * w / (torch.diagonal(Cr)[cols] + SCORE_EPS)).sum()))
                if scoring == "joint":
                    r = grp[int(t_lrow[q, 0, 0])]
                    best, best_c = None, None
                    for sub in combinations(range(gs), num_prune):
                        cols = t_col[q, list(sub)].reshape(-1)
                        w = W[r, cols]
                        Cpp = Cs[r][cols][:, cols]
                        if cols.numel() <= 2:
                            c = float(w @ torch.linalg.solve(Cpp + SCORE_EPS * (cols.numel() == 1), w)) \
                                if cols.numel() == 1 else _closed2(w, Cpp)
                        else:
                            c = float(w @ torch.linalg.solve(Cpp + SCORE_EPS * torch.eye(cols.numel(),
                                                                                           dtype=torch.float64), w))
                        if best_c is None or c < best_c:
                            best, best_c = sub, c
                    chosen.append((q, list(best)))
                else:
                    order = sorted(range(gs), key=lambda b: (costs[b], b))
                    chosen.append((q, order[:num_prune]))
            for lr, r in enumerate(grp):
                cols = [int(c) for q, blks in chosen for b in blks if int(t_lrow[q, b, 0]) == lr
                        for c in t_col[q, b].tolist()]
                P = torch.tensor(sorted(cols), dtype=torch.long)
                W[r], Cs[r] = obs_update(W[r], Cs[r], P)
                pruned[r, P] = True
    return W.masked_fill(pruned, 0.0)  # later steps leave round-off on pruned entries


def _closed2(w, Cpp):
    a, b, d = Cpp[0, 0], Cpp[0, 1], Cpp[1, 1]
    return float((w[0] * w[0] * d - 2 * w[0] * w[1] * b + w[1] * w[1] * a) / (a * d - b * b + SCORE_EPS))


def brute_force_resolve(W: Tensor, H: Tensor, keep: Tensor, damp_value: float) -> Tensor:
    """Exact least squares on a support, float64: per row, (H + d I)_SS w'_S = ((H + d I) w)_S."""
    Hd = H.double() + damp_value * torch.eye(H.shape[0], dtype=torch.float64)
    out = torch.zeros_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        S = torch.nonzero(keep[r]).squeeze(1)
        if S.numel():
            rhs = (Hd @ W[r].double())[S]
            out[r, S] = torch.linalg.solve(Hd[S][:, S], rhs)
    return out


def shared_obs_reference(W: Tensor, C: Tensor, group_rows: Tensor, t_col: Tensor, t_lrow: Tensor, num_prune: int,
                         compensate: str) -> Tensor:
    """``prune`` with one shared inverse (float64, literal): per (row group, slot) the prune subset with the
    lowest summed OBS cost; ``local``: compensate inside the scope; ``full``: slots in order, each
    compensating every column with the original C (pruned entries zeroed at the end)."""
    W = W.double().clone()
    C = C.double()
    Q, gs, bk = t_col.shape
    pruned = torch.zeros(W.shape, dtype=torch.bool)
    for grp in group_rows.tolist():
        choice = []
        for q in range(Q):
            best, best_c = None, None
            for sub in combinations(range(gs), num_prune):
                c = 0.0
                for lr, r in enumerate(grp):
                    cols = [int(x) for b in sub if int(t_lrow[q, b, 0]) == lr for x in t_col[q, b].tolist()]
                    if cols:
                        P = torch.tensor(cols)
                        w = W[r, P]
                        c += float(w @ torch.linalg.solve(C[P][:, P] + SCORE_EPS * torch.eye(len(cols),
                                                                                            dtype=torch.float64), w))
                if best_c is None or c < best_c:
                    best, best_c = sub, c
            choice.append(best)
        for q in range(Q):
            for lr, r in enumerate(grp):
                P = torch.tensor([int(x) for b in choice[q] if int(t_lrow[q, b, 0]) == lr
                                  for x in t_col[q, b].tolist()], dtype=torch.long)
                if P.numel() == 0:
                    continue
                Kc = torch.tensor([int(x) for b in range(gs) if b not in choice[q] and int(t_lrow[q, b, 0]) == lr
                                   for x in t_col[q, b].tolist()], dtype=torch.long)
                y = torch.linalg.solve(C[P][:, P], W[r, P])
                if compensate == "local":
                    if Kc.numel():
                        W[r, Kc] -= C[Kc][:, P] @ y
                else:
                    W[r] -= C[P, :].T @ y
                W[r, P] = 0.0 if compensate == "local" else W[r, P]
                pruned[r, P] = True
    return W.masked_fill(pruned, 0.0)


def obs_select(w: Tensor, d: Tensor, gs: int, bk: int, num_prune: int, eps: float) -> Tensor:
    """Independent OBS scoring and selection of the pruned blocks of every (row, scope).

    w, d: (n, nb) float32 (any strides), nb = nq * gs * bk: each row is nq consecutive scopes of gs
    consecutive blocks of bk consecutive elements. Block cost (fp32, summed in element order)::

        c[r, q, b] = sum_{j < bk} w[r, e]^2 / (d[r, e] + eps),   e = (q * gs + b) * bk + j

    Per (row, scope) the ``num_prune`` blocks of lowest cost are pruned; equal costs: lower block
    index first; a NaN cost counts as +inf (ranked with the +inf costs, by block index). Returns
    int64 (n, nq * num_prune * bk): per row, the local positions (0..nb-1) of every element of
    every pruned block, ascending.
    """
    n, nb = w.shape
    e = gs * bk
    nq = nb // e
    if num_prune == 0 or n == 0 or nq == 0:
        return torch.empty((n, nq * num_prune * bk), dtype=torch.long, device=w.device)
    t = (w * w / (d + eps)).reshape(n, nq, gs, bk)
    c = t[..., 0]
    for j in range(1, bk):  # element order, one rounding per addition
        c = c + t[..., j]
    c = torch.where(torch.isnan(c), torch.full_like(c, float("inf")), c)
    order = torch.sort(c, dim=-1, stable=True).indices  # equal costs keep block order
    pruned = torch.zeros(n, nq, gs, dtype=torch.bool, device=w.device)
    pruned.scatter_(2, order[..., :num_prune], True)
    mask = pruned[..., None].expand(n, nq, gs, bk).reshape(n, nb)
    pos = torch.arange(nb, device=w.device).expand(n, nb)
    return pos[mask].view(n, nq * num_prune * bk)  # row-major: ascending within each row


def obs_shared_prune(w: Tensor, c: Tensor, cinv: Tensor, pidx: Tensor, E: int, local: bool):
    """Shared-inverse OBS selection and local compensation of every (row, scope).

    w (n, K) float32, K = nq * E: each row is nq consecutive scopes of E elements; c (K, K) float32
    (the shared inverse Hessian; only its within-scope diagonal blocks are read); cinv (nq, ns, p, p)
    float32, ``(C[P, P] + eps I)^-1`` for every (scope slot q, prune subset s); pidx (ns, p) int64,
    the in-scope element indices of subset s, strictly ascending in [0, E). In float32, sums in
    index order::

        t_i(s)  = sum_j cinv[q, s, i, j] * w_P[j],     w_P[j] = w[r, q E + pidx[s, j]]
        cost(s) = sum_i w_P[i] * t_i(s)                 (NaN -> +inf)
        sub     = the lowest s of minimal cost
        out     = 0 on P(sub); on the other elements e of the scope
                  w[e] - sum_i c[qE + e, qE + P_i] * t_i(sub)   (local)   or   w[e]   (not local)

    Returns (out (n, K) float32, sub (n, nq) int64).
    """
    n, K = w.shape
    nq = K // E
    ns, p = pidx.shape
    wt = w.reshape(n, nq, E)
    wP = wt[:, :, pidx]  # (n, nq, ns, p)
    t = [None] * p
    for i in range(p):
        acc = torch.zeros(n, nq, ns, dtype=w.dtype, device=w.device)
        for j in range(p):
            acc = acc + cinv[None, :, :, i, j] * wP[..., j]
        t[i] = acc
    cost = torch.zeros(n, nq, ns, dtype=w.dtype, device=w.device)
    for i in range(p):
        cost = cost + wP[..., i] * t[i]
    cost = torch.where(torch.isnan(cost), torch.full_like(cost, float("inf")), cost)
    # lowest s of minimal cost (argmin's tie rule is not promised on every device: make it explicit)
    best = cost.min(-1, keepdim=True).values
    s_idx = torch.arange(ns, device=w.device).expand_as(cost)
    sub = torch.where(cost == best, s_idx, torch.full_like(s_idx, ns)).min(-1).values  # (n, nq)
    y = torch.stack(t, -1)  # (n, nq, ns, p)
    y = torch.gather(y, 2, sub[:, :, None, None].expand(n, nq, 1, p)).squeeze(2)  # (n, nq, p)
    P = pidx[sub]  # (n, nq, p)
    pruned = torch.zeros(n, nq, E, dtype=torch.bool, device=w.device).scatter_(2, P, True)
    out = wt.clone()
    if local:
        base = torch.arange(nq, device=w.device)[:, None] * E  # (nq, 1)
        rows = base[None] + torch.arange(E, device=w.device)[None, None, :]  # (1, nq, E) global rows of C
        cols = base[None] + P  # (n, nq, p) global columns
        dl = torch.zeros(n, nq, E, dtype=w.dtype, device=w.device)
        for i in range(p):
            ce = c[rows.expand(n, nq, E), cols[..., i:i + 1].expand(n, nq, E)]  # C[qE + e, qE + P_i]
            dl = dl + ce * y[..., i:i + 1]
        out = out - dl
    out = out.masked_fill(pruned, 0.0)
    return out.reshape(n, K), sub


def obs_schur_extend_(ut: Tensor, xf: Tensor, up: Tensor, linv: Tensor, cnt: int) -> None:
    """One factor extension of true OBS (the batched Schur downdate in factored form), in place.

    Per row b (the row's inverse Hessian C_row, its partial Cholesky-type factor U with cnt columns so
    far, kept transposed in ``ut``: ut[b, j, f] = U[f, j]; the m newly pruned positions P; the
    undecided positions F, the last F of K)::

        ut[b, cnt:cnt+m, K-F:] = linv[b] @ (xf[b] - round(up[b]) @ ut[b, :cnt, K-F:])   fp32 math
                               = L^-1 (C_row[P, F] - U[P, :cnt] U[F, :cnt]^T)          new factor rows

    ut (n, cap, K) float32 / bfloat16 / float16, any strides; xf (n, m, F) float32 = C_row[P, F];
    up (n, m, cnt) float32 = U[P, :cnt] (cnt may be 0); linv (n, m, m) float32 = L^-1 for L L^T the
    downdated C_row[P, P]. ``round`` rounds up to ut's dtype (exact when up was read from the
    factor). The fp32 result is rounded once to ut's dtype; nothing else of ut changes. Accumulation
    order is not part of the contract: backends agree to fp32 rounding.
    """
    m, F = xf.shape[1], xf.shape[2]
    K = ut.shape[2]
    low = ut.dtype != torch.float32
    if cnt:
        uf = ut[:, :cnt, K - F:]
        ufl = uf.float() if low else uf
        upl = up.to(ut.dtype).float() if low else up
        t = torch.baddbmm(xf, upl, ufl, alpha=-1.0)
    else:
        t = xf
    ut[:, cnt:cnt + m, K - F:] = torch.bmm(linv, t)


def obs_sweep_(w: Tensor, err: Tensor, u: Tensor, prune: Tensor, start: int, stop: int) -> None:
    """SparseGPT's column sweep over one lazy block, in place (csrc/obs_sweep.h).

    w (n, m) float32 / float64: the block's weights transposed (row i is the lazy block's weight column i,
    one entry per weight row); err (n, m) w's dtype; u (n, n) w's dtype, the block of the upper Cholesky
    factor of the damped H^-1 (only u[i, i:] is read); prune (n, m) bool. For i in [start, stop), in order::

        err[i] = where(prune[i], w[i] / u[i, i], 0)
        w[i]   = where(prune[i], 0, w[i])
        w[j]   = w[j] - u[i, j] * err[i]     for j in (i, n)   (product rounded, then the difference)

    Every backend computes exactly these roundings (no FMA contraction): the same bits everywhere.
    """
    n = w.shape[0]
    for i in range(start, stop):
        e = torch.where(prune[i], w[i] / u[i, i], torch.zeros((), dtype=w.dtype, device=w.device))
        err[i] = e
        w[i] = torch.where(prune[i], torch.zeros((), dtype=w.dtype, device=w.device), w[i])
        if i + 1 < n:
            w[i + 1:] = w[i + 1:] - u[i, i + 1:, None] * e[None, :]


def check_sweep(w: Tensor, err: Tensor, u: Tensor, prune: Tensor, start: int, stop: int) -> None:
    """obs_sweep_'s shape, stride, range and overlap checks (after its dtype checks), raising as the C++ op does
    (csrc/obs_sweep.h) and naming the argument: shared by the op wrapper and the Triton launcher."""
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D tensor (n, m), got shape {tuple(w.shape)}")
    n, m = w.shape
    for name, t, want in (("err", err, (n, m)), ("u", u, (n, n)), ("prune", prune, (n, m))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if not 0 <= start <= stop <= n:
        raise ValueError(f"start, stop: expected 0 <= start <= stop <= {n}, got {start}, {stop}")
    for name, t in (("w", w), ("err", err)):
        if m > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}: expected unit stride along dim 1, got strides {tuple(t.stride())}")
        check_inplace(t, name)
    for name, t, others in (("err", err, (w,)), ("u", u, (w, err)), ("prune", prune, (w, err))):
        if any(_shares(t, o) for o in others):
            raise ValueError(f"{name}: shares memory with {'w' if name == 'err' else 'w or err'}")


def _shares(a: Tensor, b: Tensor) -> bool:
    """Whether a's and b's address ranges meet (conservative for interleaved views). Tensors without addresses
    (fake / meta: a fake impl's checks, torch.compile tracing) meet nothing: the kernels check when they run."""
    if a.numel() == 0 or b.numel() == 0 or addressless(a) or addressless(b):
        return False
    (da, a0, a1), (db, b0, b1) = byte_span(a), byte_span(b)
    return da == db and a0 < b1 and b0 < a1

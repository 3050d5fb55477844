"""Triton kernel for the obs family: independent OBS scoring and selection of the pruned blocks.

Semantics are exactly those of ``gradkit.kernels.reference.obs.obs_select`` (the schema's positional
signature and return value). On machines without a GPU this runs on CPU tensors under
``TRITON_INTERPRET=1``.

Design: one program per tile of BLOCK_S (row, scope) pairs
--------------------------------------------------------
The (row, scope) pairs form one flat range of S = n * nq scopes (inputs contiguous): scope s reads
elements [s * E, (s + 1) * E), E = gs * bk, and owns the output slice [s * O, (s + 1) * O),
O = num_prune * bk (every scope prunes exactly num_prune blocks). A program loads a
(BLOCK_S, GS_P) tile of block costs, GS_P = next power of two >= gs::

    c[s, b] = sum_j w^2 / (d + eps)    (fp32; div_rn: IEEE division on the GPU too; element order)

NaN costs and padding blocks (b >= gs) become +inf: a padding block has a higher index than every
real block, so it never ranks before one and is never pruned. Then, for each competitor b'
(a loop over gs; its cost taken from the tile by an exact max-extraction)::

    rank[s, b] += c[s, b'] < c[s, b]  or  (c[s, b'] == c[s, b] and b' < b)

A block is pruned iff rank < num_prune; its slot among the scope's pruned blocks is the exclusive
prefix count of pruned blocks (``tl.cumsum``), which orders the positions ascending. The work is
O(gs^2) per scope, so scopes of more than MAX_FUSED_GS blocks take a composite path (the plain
torch reference, a stable sort, on the same device).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from gradkit.kernels.reference import obs as _ref
from gradkit.kernels.triton import interpreting, on_tensor_device

# Tile of (row, scope) pairs per program: min(max_scopes, tile_elems // GS_P), at least 1; tests
# shrink it to exercise many programs on tiny inputs.
BLOCKS = {"max_scopes": 256, "tile_elems": 1024}
MAX_FUSED_GS = 256


@triton.jit
def _obs_select_kernel(w_ptr, d_ptr, out_ptr, S, nq, gs, bk, num_prune, eps, GS_P: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    # int64 scope index and element offsets: S and S * E can pass 2^31 (pid * BLOCK_S would wrap in
    # int32), and so can E = gs * bk (gs, bk int32 arguments; tl.cast: either may be a constexpr 1)
    pid = tl.program_id(0).to(tl.int64)
    rs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    rb = tl.arange(0, GS_P)
    sm = rs < S
    bm = rb < gs
    m2 = sm[:, None] & bm[None, :]
    bk64 = tl.cast(bk, tl.int64)
    E = tl.cast(gs, tl.int64) * bk64
    row0 = rs * E
    blk0 = row0[:, None] + (rb.to(tl.int64) * bk64)[None, :]
    w = tl.load(w_ptr + blk0, mask=m2, other=0.0)
    d = tl.load(d_ptr + blk0, mask=m2, other=1.0)
    c = tl.math.div_rn(w * w, d + eps)
    for j in range(1, bk):  # element order: one rounding per addition
        w = tl.load(w_ptr + blk0 + j, mask=m2, other=0.0)
        d = tl.load(d_ptr + blk0 + j, mask=m2, other=1.0)
        c = c + tl.math.div_rn(w * w, d + eps)
    inf = float("inf")
    c = tl.where((c != c) | (rb[None, :] >= gs), inf, c)
    rank = tl.zeros((BLOCK_S, GS_P), dtype=tl.int32)
    for bp in range(gs):
        cb = tl.max(tl.where(rb[None, :] == bp, c, -inf), axis=1)  # c[:, bp], exactly
        beats = (cb[:, None] < c) | ((cb[:, None] == c) & (bp < rb[None, :]))
        rank += beats.to(tl.int32)
    pr = ((rank < num_prune) & bm[None, :]).to(tl.int32)
    slot = tl.cumsum(pr, axis=1) - pr
    O = tl.cast(num_prune, tl.int64) * bk64
    q = rs % nq
    dst = rs[:, None] * O + slot.to(tl.int64) * bk64
    pos = (q * E)[:, None] + (rb.to(tl.int64) * bk64)[None, :]
    keep = (pr != 0) & sm[:, None]
    for j in range(bk):
        tl.store(out_ptr + dst + j, pos + j, mask=keep)


@on_tensor_device
def obs_select(w: torch.Tensor, d: torch.Tensor, gs: int, bk: int, num_prune: int, eps: float) -> torch.Tensor:
    """Launcher: see ``gradkit.kernels.reference.obs.obs_select``; int64 (n, nq * num_prune * bk). Arguments
    checked by gradkit.ops.obs.check_obs_select (op wrapper, CUDA kernel: gradkit.kernels.triton.cuda_kernel)."""
    n, nb = w.shape
    E = gs * bk
    nq = nb // E
    out = torch.empty((n, nq * num_prune * bk), dtype=torch.int64, device=w.device)
    S = n * nq
    if S == 0 or num_prune == 0:
        return out
    if gs > MAX_FUSED_GS:  # O(gs^2) ranks no longer pay: stable sort (composite torch)
        return _ref.obs_select(w, d, gs, bk, num_prune, eps)
    w = w.contiguous()
    d = d.contiguous()
    GS_P = triton.next_power_of_2(gs)
    BLOCK_S = max(1, min(BLOCKS["max_scopes"], BLOCKS["tile_elems"] // GS_P))
    BLOCK_S = 1 << (BLOCK_S.bit_length() - 1)  # a power of two (tl.arange)
    grid = (triton.cdiv(S, BLOCK_S),)
    _obs_select_kernel[grid](w, d, out, S, nq, gs, bk, num_prune, float(eps), GS_P=GS_P, BLOCK_S=BLOCK_S)
    return out


# Rows per program of obs_shared_prune (a power of two); tests shrink it.
SHARED_BLOCKS = {"rows": 64}


@triton.jit
def _shared_prune_kernel(w_ptr, out_ptr, c_ptr, cinv_ptr, pidx_ptr, sub_ptr, n, nq, ns, p, E, K,
                         LOCAL: tl.constexpr, P_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program: BLOCK_R rows x one scope q (programs are (row tile, q) pairs, q fastest).

    Per row, in fp32 and index order (the CPU/CUDA core's arithmetic; launched without FP fusion)::

        t_i(s) = sum_j cinv[q,s,i,j] w_P[j];  cost(s) = sum_i w_P[i] t_i(s)  (NaN -> +inf)
        sub = lowest s of minimal cost;  y = t(sub) kept in a (BLOCK_R, P_P) tile
        out[e] = 0 on P(sub), else w[e] - sum_i C[qE+e, qE+P_i] y_i (LOCAL) or w[e]
    """
    pid = tl.program_id(0)
    q = (pid % nq).to(tl.int64)
    rows = (pid // nq).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: n may pass 2^31 - BLOCK_R
    rm = rows < n
    base = rows * K + q * E
    cq = cinv_ptr + q * ns * p * p
    inf = float("inf")
    best = tl.full((BLOCK_R,), inf, tl.float32)
    bs = tl.full((BLOCK_R,), -1, tl.int64)
    for s in range(ns):
        cost = tl.zeros((BLOCK_R,), tl.float32)
        for i in range(p):
            wi = tl.load(w_ptr + base + tl.load(pidx_ptr + s * p + i), mask=rm, other=0.0)
            t = tl.zeros((BLOCK_R,), tl.float32)
            for j in range(p):
                wj = tl.load(w_ptr + base + tl.load(pidx_ptr + s * p + j), mask=rm, other=0.0)
                t = t + tl.load(cq + (s * p + i) * p + j) * wj
            cost = cost + wi * t
        cost = tl.where(cost != cost, inf, cost)
        take = (bs < 0) | (cost < best)
        best = tl.where(take, cost, best)
        bs = tl.where(take, s, bs)
    tl.store(sub_ptr + rows * nq + q, bs, mask=rm)
    cols = tl.arange(0, P_P)
    y = tl.zeros((BLOCK_R, P_P), tl.float32)
    for i in range(p):
        t = tl.zeros((BLOCK_R,), tl.float32)
        for j in range(p):
            wj = tl.load(w_ptr + base + tl.load(pidx_ptr + bs * p + j, mask=rm, other=0), mask=rm, other=0.0)
            t = t + tl.load(cq + (bs * p + i) * p + j, mask=rm, other=0.0) * wj
        y = tl.where(cols[None, :] == i, t[:, None], y)
    for e in range(E):
        pr = tl.zeros((BLOCK_R,), tl.int1)
        dl = tl.zeros((BLOCK_R,), tl.float32)
        for i in range(p):
            pi = tl.load(pidx_ptr + bs * p + i, mask=rm, other=0)
            pr = pr | (pi == e)
            if LOCAL:
                yi = tl.sum(tl.where(cols[None, :] == i, y, 0.0), axis=1)  # y[:, i] exactly
                ce = tl.load(c_ptr + (q * E + e) * K + q * E + pi, mask=rm, other=0.0)
                dl = dl + ce * yi
        we = tl.load(w_ptr + base + e, mask=rm, other=0.0)
        if LOCAL:
            we = we - dl
        tl.store(out_ptr + base + e, tl.where(pr, 0.0, we), mask=rm)


@on_tensor_device
def obs_shared_prune(w: torch.Tensor, c: torch.Tensor, cinv: torch.Tensor, pidx: torch.Tensor, E: int,
                     local: bool):
    """Launcher: see ``gradkit.kernels.reference.obs.obs_shared_prune``; (w' (n, K), sub (n, nq) int64). Arguments
    checked by gradkit.ops.obs.check_obs_shared_prune (op wrapper, CUDA kernel)."""
    n, K = w.shape
    nq = K // E
    ns, p = pidx.shape
    w, c, cinv, pidx = w.contiguous(), c.contiguous(), cinv.contiguous(), pidx.contiguous()
    out = torch.empty_like(w)
    sub = torch.empty((n, nq), dtype=torch.int64, device=w.device)
    if n == 0 or nq == 0:
        return out, sub
    BLOCK_R = max(1, min(SHARED_BLOCKS["rows"], triton.next_power_of_2(n)))
    grid = (triton.cdiv(n, BLOCK_R) * nq,)
    kw = {} if w.device.type == "cpu" else {"enable_fp_fusion": False}
    _shared_prune_kernel[grid](w, out, c, cinv, pidx, sub, n, nq, ns, p, E, K, LOCAL=bool(local),
                               P_P=triton.next_power_of_2(p), BLOCK_R=BLOCK_R, **kw)
    return out, sub


# --------------------------------------------------------------------------------------- obs_schur_extend_
# One program per (tile of BF columns of F, row b): the whole (M_PAD x BF) tile of
# T = xf - round(up) @ U, U = ut[b, :cnt, K-F:], stays in registers (tl.dot over chunks of BK of the cnt
# factor columns; with a bf16 / fp16 factor both operands are in that dtype -- exact products, fp32
# accumulation, the half-precision matrix units; with fp32, input_precision="ieee": no TF32), then
# linv @ T is formed in row blocks of BM (linv read from memory, T reused) and stored, in ut's dtype, to
# ut[b, cnt + i, K-F + j] (rows never read by any program). M_PAD = next power of two >= max(m, 16)
# (tl.dot's minimum); m above MAX_FUSED_M takes the composite path (the reference's two batched GEMMs,
# cuBLAS on the device). Tests shrink the tiles. Under the interpreter the half-precision operands are
# widened to fp32 before the dot (the same exact products; its bf16 dot is unusable).
SCHUR_BLOCKS = {"bk": 32, "tile": 8192, "bf_max": 64, "bm_elems": 4096}
MAX_FUSED_M = 256


@triton.jit
def _schur_extend_kernel(ut_ptr, xf_ptr, up_ptr, linv_ptr, m, cnt, F, K, stb, sti, stj, sxb, sxi, sxj, spb, spi,
                         spk, slb, sli, slj, M_PAD: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr,
                         BM: tl.constexpr, LOW: tl.constexpr):
    pf = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, M_PAD)
    cols = pf * BF + tl.arange(0, BF)
    rm = rows < m
    cm = cols < F
    ks = tl.arange(0, BK)
    ucol = (K - F + cols).to(tl.int64) * stj  # offsets of the F window in ut
    # ut's row offsets (rows < cnt + m <= cap, stride sti) in int64: one factor's cap * K can pass 2^31.
    # The loop advances a row pointer, so its tile offsets ks * sti (< BK * sti) stay int32.
    ut_b = ut_ptr + b * stb
    u_row = ut_b
    acc = tl.zeros((M_PAD, BF), dtype=tl.float32)
    for k0 in range(0, cnt, BK):
        kk = k0 + ks
        km = kk < cnt
        a = tl.load(up_ptr + b * spb + rows[:, None] * spi + kk[None, :] * spk, mask=rm[:, None] & km[None, :],
                    other=0.0)
        u = tl.load(u_row + ks[:, None] * sti + ucol[None, :], mask=km[:, None] & cm[None, :], other=0.0)
        u_row += BK * sti
        if LOW == 1:
            acc += tl.dot(a.to(u.dtype), u)
        elif LOW == 2:
            acc += tl.dot(a.to(u.dtype).to(tl.float32), u.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, u, input_precision="ieee")
    x = tl.load(xf_ptr + b * sxb + rows[:, None] * sxi + cols[None, :] * sxj, mask=rm[:, None] & cm[None, :],
                other=0.0)
    t = x - acc
    for i0 in tl.static_range(0, M_PAD, BM):
        ri = i0 + tl.arange(0, BM)
        li = tl.load(linv_ptr + b * slb + ri[:, None] * sli + rows[None, :] * slj,
                     mask=(ri < m)[:, None] & rm[None, :], other=0.0)
        o = tl.dot(li, t, input_precision="ieee")
        tl.store(ut_b + (tl.cast(cnt, tl.int64) + ri[:, None]) * sti + ucol[None, :], o.to(ut_ptr.dtype.element_ty),
                 mask=(ri < m)[:, None] & cm[None, :])


@on_tensor_device
def obs_schur_extend_(ut: torch.Tensor, xf: torch.Tensor, up: torch.Tensor, linv: torch.Tensor, cnt: int) -> None:
    """Launcher: see ``gradkit.kernels.reference.obs.obs_schur_extend_`` (writes ut[:, cnt:cnt+m, K-F:]). Arguments
    checked by gradkit.ops.obs.check_obs_schur_extend_ (op wrapper, CUDA kernel), overlap of ut with itself
    included."""
    n, cap, K = ut.shape
    _, m, F = xf.shape
    if m > MAX_FUSED_M or n > 65535:
        return _ref.obs_schur_extend_(ut, xf, up, linv, cnt)
    if n == 0 or m == 0 or F == 0:
        return None
    M_PAD = max(16, triton.next_power_of_2(m))
    BF = max(16, min(SCHUR_BLOCKS["bf_max"], SCHUR_BLOCKS["tile"] // M_PAD))
    BM = max(16, min(M_PAD, SCHUR_BLOCKS["bm_elems"] // M_PAD))
    grid = (triton.cdiv(F, BF), n)
    _schur_extend_kernel[grid](ut, xf, up, linv, m, cnt, F, K, *ut.stride(), *xf.stride(), *up.stride(),
                               *linv.stride(), M_PAD=M_PAD, BF=BF, BK=SCHUR_BLOCKS["bk"], BM=BM,
                               LOW=0 if ut.dtype == torch.float32 else (2 if interpreting() else 1))
    return None


# --------------------------------------------------------------------------------------------- obs_sweep_
# One program per tile of BLOCK_M columns of w (weight rows), which it owns through every step i: the columns
# are independent. Per step: row i's error and zeroing (div_rn: IEEE division on the GPU), then the later rows
# in tiles of BLOCK_J, w[j] - u[i, j] * e with enable_fp_fusion=False (the product rounded, then the
# difference: csrc/obs_sweep.h's bits). A barrier closes each step: the 2-D tiles and the 1-D row need not map a
# column to the same thread, and step i + 1 reads the row step i wrote.
SWEEP_BLOCKS = {"m": 128, "j": 32}


@triton.jit
def _sweep_kernel(w_ptr, e_ptr, u_ptr, p_ptr, n, m, start, stop, sw, se, su0, su1, sp0, sp1,
                  BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, F64: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cm = cols < m
    jj = tl.arange(0, BLOCK_J)
    zero = tl.zeros((BLOCK_M,), dtype=w_ptr.dtype.element_ty)
    for i in range(start, stop):
        ii = tl.cast(i, tl.int64)
        d = tl.load(u_ptr + ii * su0 + ii * su1)
        x = tl.load(w_ptr + ii * sw + cols, mask=cm, other=0.0)
        p = tl.load(p_ptr + ii * sp0 + cols * sp1, mask=cm, other=0) != 0
        if F64:  # float64 division is IEEE on the GPU; div_rn takes float32 only
            q = x / d
        else:
            q = tl.math.div_rn(x, tl.zeros_like(x) + d)
        e = tl.where(p, q, zero)
        tl.store(e_ptr + ii * se + cols, e, mask=cm)
        tl.store(w_ptr + ii * sw + cols, tl.where(p, zero, x), mask=cm)
        for j0 in range(i + 1, n, BLOCK_J):
            j = tl.cast(j0, tl.int64) + jj
            jm = j < n
            uij = tl.load(u_ptr + ii * su0 + j * su1, mask=jm, other=0.0)
            ptrs = w_ptr + j[:, None] * sw + cols[None, :]
            tm = jm[:, None] & cm[None, :]
            wt = tl.load(ptrs, mask=tm, other=0.0)
            tl.store(ptrs, wt - uij[:, None] * e[None, :], mask=tm)
        tl.debug_barrier()


@on_tensor_device
def obs_sweep_(w: torch.Tensor, err: torch.Tensor, u: torch.Tensor, prune: torch.Tensor, start: int,
               stop: int) -> None:
    """Launcher: see ``gradkit.kernels.reference.obs.obs_sweep_``. Arguments checked by
    gradkit.ops.obs.check_obs_sweep_ (op wrapper, CUDA kernel; the C++ op's checks: csrc/obs_sweep.h)."""
    n, m = w.shape
    if start == stop or m == 0:
        return None
    pv = prune.view(torch.uint8)
    kw = {} if w.device.type == "cpu" else {"enable_fp_fusion": False}
    bm = SWEEP_BLOCKS["m"]
    _sweep_kernel[(triton.cdiv(m, bm),)](w, err, u, pv, n, m, start, stop, w.stride(0), err.stride(0), u.stride(0),
                                         u.stride(1), pv.stride(0), pv.stride(1), BLOCK_M=bm,
                                         BLOCK_J=SWEEP_BLOCKS["j"], F64=w.dtype == torch.float64, **kw)
    return None


def record_aot_cases() -> None:
    """Representative calls on tiny CPU tensors (for the recording interpreter of
    scripts/triton_aot_check.py): gs = 1, 3, 4, 8, 16, 64, 256 (every GS_P up to the fused limit),
    bk = 1 and 3, NaN, ties, default and tiny tiles."""
    g = torch.Generator().manual_seed(0)
    for gs, bk, npr in ((4, 1, 2), (3, 3, 1), (1, 1, 1), (8, 1, 4), (16, 2, 8), (64, 1, 32), (256, 1, 100)):
        w = torch.randint(-3, 4, (3, 2 * gs * bk), generator=g).float()
        w[0, 0] = float("nan")
        d = torch.rand(3, 2 * gs * bk, generator=g) + 0.5
        obs_select(w, d, gs, bk, npr, 1e-8)
    for E, p, ns, n in ((4, 2, 6, 5), (8, 4, 3, 3), (2, 1, 2, 70)):  # 2:4, 1x2 blocks, a partial row tile
        w = torch.randn(n, 2 * E, generator=g)
        c = torch.randn(2 * E, 2 * E, generator=g)
        cinv = torch.randn(2, ns, p, p, generator=g)
        pidx = torch.stack([torch.randperm(E, generator=g)[:p].sort().values for _ in range(ns)])
        for local in (True, False):
            obs_shared_prune(w, c, cinv, pidx, E, local)
    for n, m, cnt, F, dt in ((2, 3, 0, 5, torch.float32), (3, 16, 40, 70, torch.float32),
                             (2, 128, 33, 17, torch.bfloat16), (1, 40, 20, 9, torch.float16),
                             (1, 256, 16, 16, torch.bfloat16)):
        ut = torch.randn(n, cnt + m + 2, F + 3, generator=g).to(dt)
        xf = torch.randn(n, m, F, generator=g)
        up = torch.randn(n, m, cnt, generator=g)
        linv = torch.randn(n, m, m, generator=g)
        obs_schur_extend_(ut, xf, up, linv, cnt)
    for n, m, dt in ((5, 7, torch.float32), (40, 130, torch.float32), (9, 3, torch.float64)):
        w = torch.randn(n, m, generator=g, dtype=dt)
        u = torch.randn(n, n, generator=g, dtype=dt).triu_() + 2 * torch.eye(n, dtype=dt)
        obs_sweep_(w, torch.empty_like(w), u, torch.rand(n, m, generator=g) < 0.5, 1, n - 1)

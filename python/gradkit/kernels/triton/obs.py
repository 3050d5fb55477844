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

# Tile of (row, scope) pairs per program: min(max_scopes, tile_elems // GS_P), at least 1; tests
# shrink it to exercise many programs on tiny inputs.
BLOCKS = {"max_scopes": 256, "tile_elems": 1024}
MAX_FUSED_GS = 256


@triton.jit
def _obs_select_kernel(w_ptr, d_ptr, out_ptr, S, nq, gs, bk, num_prune, eps, GS_P: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    rs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    rb = tl.arange(0, GS_P)
    sm = rs < S
    bm = rb < gs
    m2 = sm[:, None] & bm[None, :]
    E = gs * bk
    row0 = rs.to(tl.int64) * E
    blk0 = row0[:, None] + (rb * bk).to(tl.int64)[None, :]
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
    O = num_prune * bk
    q = (rs % nq).to(tl.int64)
    dst = rs.to(tl.int64)[:, None] * O + (slot * bk).to(tl.int64)
    pos = (q * E)[:, None] + (rb * bk).to(tl.int64)[None, :]
    keep = (pr != 0) & sm[:, None]
    for j in range(bk):
        tl.store(out_ptr + dst + j, pos + j, mask=keep)


def _check(w: torch.Tensor, d: torch.Tensor, gs: int, bk: int, num_prune: int, eps: float) -> None:
    """The schema's preconditions (the API wrapper checks them first; direct dispatcher calls land here)."""
    if w.dtype != torch.float32 or d.dtype != torch.float32:
        raise TypeError(f"w, d: expected float32 tensors, got {w.dtype} and {d.dtype}")
    if w.dim() != 2 or d.shape != w.shape:
        raise ValueError(f"d: expected the 2-D shape of w {tuple(w.shape)}, got {tuple(d.shape)}")
    if d.device != w.device:
        raise ValueError(f"d: on {d.device} but w is on {w.device}")
    if gs < 1 or bk < 1:
        raise ValueError(f"gs, bk: expected >= 1, got {gs}, {bk}")
    if not 0 <= num_prune <= gs:
        raise ValueError(f"num_prune: expected 0 <= num_prune <= gs = {gs}, got {num_prune}")
    if w.shape[1] % (gs * bk):
        raise ValueError(f"w: the row length {w.shape[1]} is not a multiple of gs * bk = {gs} * {bk}")
    if not (0.0 <= eps < float("inf")):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


def obs_select(w: torch.Tensor, d: torch.Tensor, gs: int, bk: int, num_prune: int, eps: float) -> torch.Tensor:
    """Launcher: see ``gradkit.kernels.reference.obs.obs_select``; int64 (n, nq * num_prune * bk)."""
    _check(w, d, gs, bk, num_prune, eps)
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

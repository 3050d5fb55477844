"""Triton kernel for the search family: blocked inner-product scoring with a running top-k.

Semantics are exactly those of ``gradkit.kernels.reference.search.score_topk`` (the schema's
positional signature and return value). On machines without a GPU this runs on CPU tensors
under ``TRITON_INTERPRET=1``.

Design: fused tile matmul + per-tile top-k (for k <= MAX_FUSED_K), then one merge
----------------------------------------------------------------------------------
* ``_tile_topk_kernel``: program (j, i) computes the BLOCK_Q x BLOCK_N tile of scores of query
  block i against key block j (key tiles on grid axis 0, which allows 2^31 - 1 programs; column
  offsets in int64) with ``tl.dot`` over BLOCK_D slices of the feature dimension
  (keys of any float dtype are upcast to fp32 on load; fp32 "ieee" products, so results match
  the fp32 reference to rounding), multiplies by ``key_scale`` and maps NaN to -inf. Without
  leaving registers it then extracts the tile's k best per query row by k rounds of
  (row max, lowest column holding it, mark taken): k x BLOCK_N compare work against
  D x BLOCK_N multiply-adds for the tile, so the selection is cheap for small k. The scores never
  reach global memory; only k candidates per (query, tile) do.
* the host merges the (Q, tiles * k) tile candidates with the running top-k using the
  reference's ordering (stable sorts: valid first, score desc, index asc), which gives
  exactly the reference's result: a candidate in the global top-k is in its tile's top-k.
* ``smallest`` runs as ``largest`` on negated queries (exact), negating the scores back.
* k > MAX_FUSED_K: composite path (``torch.mm`` block of keys + the same merge), chunked over
  the keys so the score matrix stays bounded.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from gradkit.kernels.reference.search import select_topk
from gradkit.kernels.triton import on_tensor_device

# Tile sizes; tests shrink them to exercise many tiles on tiny inputs.
BLOCKS = {"q": 32, "n": 64, "d": 32, "composite_rows": 1 << 16}
MAX_FUSED_K = 64
# The largest grid extent on axis 1 of a CUDA launch (gridDim.y): more query blocks than this run in slices of
# queries, each its own launch (tests shrink it to exercise the slicing under the interpreter).
_MAX_GRID_Y = 65535


@triton.jit
def _tile_topk_kernel(q_ptr, k_ptr, scale_ptr, out_s_ptr, out_i_ptr, Q, N, D, stride_q, stride_k, n_tiles,
                      HAS_SCALE: tl.constexpr, K: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)  # key tiles on axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop at 65535)
    pid_q = tl.program_id(1)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n0 = pid_n.to(tl.int64) * BLOCK_N  # int64: pid_n * BLOCK_N passes 2^31 for N > 2^31 keys
    cols = tl.arange(0, BLOCK_N)  # the tile's columns; the selection below works on these (int32)
    rn = n0 + cols
    qm = rq < Q
    nm = rn < N
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        dm = rd < D
        a = tl.load(q_ptr + rq.to(tl.int64)[:, None] * stride_q + rd[None, :], mask=qm[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        b = tl.load(k_ptr + rn.to(tl.int64)[None, :] * stride_k + rd[:, None], mask=nm[None, :] & dm[:, None],
                    other=0.0).to(tl.float32)
        acc += tl.dot(a, b, input_precision="ieee")
    if HAS_SCALE:
        sc = tl.load(scale_ptr + rn, mask=nm, other=1.0)
        acc = acc * sc[None, :]
    neg_inf = float("-inf")
    acc = tl.where(acc != acc, neg_inf, acc)
    taken = (rn[None, :] >= N) | (rq[:, None] < 0)  # (BLOCK_Q, BLOCK_N): out-of-range columns are never taken
    big = BLOCK_N
    out_base = rq.to(tl.int64) * n_tiles * K + pid_n.to(tl.int64) * K
    for j in tl.static_range(K):
        cur = tl.where(taken, neg_inf, acc)
        m = tl.max(cur, axis=1)
        cand = tl.where((cur == m[:, None]) & (~taken), cols[None, :], big)
        sel = tl.min(cand, axis=1)
        has = sel < big
        tl.store(out_s_ptr + out_base + j, tl.where(has, m, neg_inf), mask=qm)
        tl.store(out_i_ptr + out_base + j, tl.where(has, n0 + sel, -1), mask=qm)
        taken = taken | (cols[None, :] == sel[:, None])


def _merge(cs: torch.Tensor, ci: torch.Tensor, k: int, scores_in, idx_in, largest: bool):
    """Merge candidates (largest-sense scores, absolute indices) with the running top-k."""
    if scores_in is not None and scores_in.shape[1]:
        sin = scores_in if largest else -scores_in
        cs = torch.cat([sin.float(), cs], dim=1)
        ci = torch.cat([idx_in, ci], dim=1)
    s, i = select_topk(cs, ci, k, True)
    return (s if largest else 0.0 - s), i  # 0 - s: a zero score is +0.0, as q . k gives (session 40)


@on_tensor_device
def score_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, largest: bool, key_scale: Optional[torch.Tensor],
               scores_in: Optional[torch.Tensor], idx_in: Optional[torch.Tensor],
               base: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launcher; arguments checked by gradkit.ops.search.check_score_topk (op wrapper, CUDA kernel)."""
    Q, D = queries.shape
    N = keys.shape[0]
    k = int(k)
    dev = queries.device
    if Q == 0 or k == 0:
        return (torch.empty(Q, k, dtype=torch.float32, device=dev), torch.empty(Q, k, dtype=torch.int64, device=dev))
    q = queries.contiguous() if largest else (-queries).contiguous()
    if N and D and keys.stride(1) != 1:
        keys = keys.contiguous()
    if N == 0:
        cs = torch.empty(Q, 0, dtype=torch.float32, device=dev)
        ci = torch.empty(Q, 0, dtype=torch.int64, device=dev)
        return _merge(cs, ci, k, scores_in, idx_in, largest)
    if k > MAX_FUSED_K or D == 0:
        # composite: GEMM per chunk of keys + merge
        rs, ri = scores_in, idx_in
        step = max(1, int(BLOCKS["composite_rows"]))
        for j0 in range(0, N, step):
            kb = keys[j0:j0 + step].float()
            s = q @ kb.T if D else torch.zeros(Q, kb.shape[0], device=dev)
            if key_scale is not None:
                s = s * key_scale[j0:j0 + step][None, :]
            idx = (base + j0 + torch.arange(kb.shape[0], device=dev, dtype=torch.int64)).expand(Q, -1)
            rs, ri = _merge(s, idx, k, rs, ri, largest)
        return rs, ri
    BQ, BN, BD = BLOCKS["q"], BLOCKS["n"], BLOCKS["d"]
    if triton.cdiv(Q, BQ) > _MAX_GRID_Y:  # query blocks on grid axis 1: slices of queries, each query's top-k its own
        step = _MAX_GRID_Y * BQ
        out_s = torch.empty(Q, k, dtype=torch.float32, device=dev)
        out_i = torch.empty(Q, k, dtype=torch.int64, device=dev)
        for q0 in range(0, Q, step):
            sl = slice(q0, q0 + step)
            out_s[sl], out_i[sl] = score_topk(queries[sl], keys, k, largest, key_scale,
                                              None if scores_in is None else scores_in[sl],
                                              None if idx_in is None else idx_in[sl], base)
        return out_s, out_i
    kk = min(k, BN)
    n_tiles = triton.cdiv(N, BN)
    out_s = torch.empty(Q, n_tiles, kk, dtype=torch.float32, device=dev)
    out_i = torch.empty(Q, n_tiles, kk, dtype=torch.int64, device=dev)
    scale = key_scale.contiguous() if key_scale is not None else q  # dummy pointer when absent
    grid = (n_tiles, triton.cdiv(Q, BQ))
    _tile_topk_kernel[grid](q, keys, scale, out_s, out_i, Q, N, D, q.stride(0), keys.stride(0), n_tiles,
                            HAS_SCALE=key_scale is not None, K=kk, BLOCK_Q=BQ, BLOCK_N=BN, BLOCK_D=BD)
    cs = out_s.reshape(Q, n_tiles * kk)
    ci = out_i.reshape(Q, n_tiles * kk)
    ci = torch.where(ci >= 0, ci + base, ci)
    return _merge(cs, ci, k, scores_in, idx_in, largest)


def record_aot_cases() -> None:
    """Representative calls on tiny CPU tensors for scripts/triton_aot_check.py (key dtypes, scale,
    largest / smallest, a running top-k)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 24, generator=g)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        keys = torch.randn(150, 24, generator=g).to(dt)
        score_topk(q, keys, 4, True, None, None, None, 0)
        s, i = score_topk(q, keys, 3, False, torch.rand(150, generator=g), None, None, 7)
        score_topk(q, keys, 3, False, None, s, i, 150)

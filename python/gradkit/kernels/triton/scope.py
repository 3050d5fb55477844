"""Triton kernels for the scope family (block norms, per-scope k-th largest, structured masks,
hard / soft thresholding): the GPU backend where gradkit was built without CUDA C++.

Semantics are exactly those of ``gradkit.kernels.reference.scope``; every public function here has
the op schema's positional signature. On machines without a GPU they run on CPU tensors under
``TRITON_INTERPRET=1``.

Layout
------
``x`` (shape ``S``, ANY strides: the kernels address it through its strides, it is never copied,
and the in-place ops write through to its storage) is cut into blocks ``b`` (grid ``B = S / b``)
and the grid into scopes ``s`` (scope grid ``G = B / s``). Element coordinate ``e_i`` decomposes
as ``e_i = (g_i * s_i + j_i) * b_i + k_i``, so every tensor a kernel touches is a three-level
strided walk, each level row-major:

* level 0, ``g`` over ``G``: which scope (row-major = the scope's position in the scope grid);
* level 1, ``j`` over ``s``: which block of the scope (row-major = the in-scope index);
* level 2, ``k`` over ``b``: which element of the block.

``_Layout`` builds, on the host, each level as a list of ``(size, stride per operand)``: size-1
dims are dropped and adjacent dims are merged where every operand's strides allow (a contiguous
row-block case becomes one or two flat loops). A kernel receives at most ``MAXD`` (4) dims per level
as scalar arguments, the count of dims in use as a constexpr. A layout that still has more than
``MAXD`` dims in some level after merging (only possible with 5+ dims of x, blocked in a way that
no merging helps) is handled by the plain-PyTorch reference instead (``_Layout.ok``): slower, never
wrong. Offsets are computed in int32, or int64 when any offset or count could pass 2**31.

Operands of the element kernels: ``R`` (read: the tensor scored), ``W`` (written elementwise: x
for the in-place ops, the contiguous element mask for ``expand``) and ``G`` (per block: the grid
mask / thresholds, or per scope: the ``scope_kth`` output). An operand a call does not use copies
R's strides, so it never prevents a merge.

Scores
------
``sum |x|^p`` (``max |x|`` for p = inf, NaN if any element is NaN; ``|x|`` for single-element
blocks whatever p, their norm being that score; the signed value when ``raw``),
accumulated in float32 (float64 for float64 input; the scored tensor's dtype decides). p = 1, 2, 3
use exact products like torch (``x*x``, ``x*x*x``); other p use ``exp2(p * log2|x|)`` (not
correctly rounded: rankings on such p can differ from the reference in the last bits of near-ties).
Norms are ``sqrt`` (correctly rounded, ``tl.sqrt_rn``) for p = 2, the score for p = 1 / inf / raw,
else ``exp2(log2(score) / p)``. A scope with fewer than k valid scores gives ``-inf`` from
``scope_kth`` whatever p, as the reference's docstring says (the reference itself passes that -inf
through ``score_to_norm``: NaN for p = 2, +inf for a general p, with multi-element blocks).
Floating scalars (p, 1/p, k_weight, eps, atol) travel as float64 bit patterns and are rounded to
the accumulation dtype in the kernel, like torch does with Python scalars. Every kernel is built
with ``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA, and uses correctly
rounded sqrt / division: on integer-valued data the results are bit-identical to an IEEE evaluation of
the reference's formulas in the reference's order (masks always; torch's CPU sqrt is not correctly
rounded on every build, so p = 2 norms can differ from the CPU reference by an ulp).

bfloat16 tensors are read and written as raw int16 bits, with an explicit round-to-nearest-even on
store (the interpreter's own bf16 casts truncate); bool tensors as uint8.

Selection
---------
* **Small scopes** (at most ``TUNING["small_nb"]`` = 32 blocks): ``_small_kernel``, one fused pass.
  A program takes a tile of ``TS`` scopes x ``NBP`` (next power of two of the blocks per scope),
  sums the block scores in registers over chunks of ``EC`` elements, ranks every block within its
  scope by counting: ``rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}`` (NaN compares false, so
  it counts nowhere; padding rows are NaN), keeps ``valid & rank < nnz`` (``keep_ties``:
  ``valid & #{j: s_j > s_i} < nnz``), and writes the grid mask / element mask / zeros into x
  (masked stores: only dropped blocks are written). ``scope_kth`` picks the score of rank k-1
  (and k for ``mid``). One read of the scored tensor, one write of the output.
* **Large scopes**: ``_rows_kernel`` writes every block's score into a ``(numscp, nb)`` scratch
  (scope-major), then ``_select_kernel``, one program per scope, finds the k-th largest valid score
  exactly without sorting: a radix select over an order-preserving unsigned key of the score
  (32-bit for float32 scores, 64-bit for float64; -0.0 and +0.0 share a key; NaN excluded),
  8 bits per pass, each pass a 256-bin ``tl.histogram`` over the scope's keys that match the
  digits fixed so far, summed over chunks. The final pass keeps keys above the k-th and, of the
  keys equal to it, the ``need`` lowest in-scope indices (a running ``tl.cumsum`` with a carry
  across chunks), or all of them with ``keep_ties``. The grid mask it writes is then expanded /
  applied to x by ``_rows_kernel`` (``block_apply_mask_``'s kernel). One program per scope limits
  the parallelism when there are very few, very large scopes (e.g. a whole tensor as one scope).

Soft threshold
--------------
``_soft_kernel``: a tile of blocks per program. Euclidean (and single-element blocks with a
conditioner): the closed form. Diagonal conditioner: per-block bisection exactly as the reference
(same bracket, same update order, frozen once its bracket is below atol; the loop ends when every
block of the program is done or after max_iter). Blocks of at most ``TUNING["soft_chunk"]``
elements stay in registers across the iterations; larger ones are re-read per iteration.
"""
from __future__ import annotations

import math
import struct
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from gradkit.kernels.reference import scope as _ref

__all__ = ["block_norms", "scope_kth", "scope_mask", "scope_hard_threshold_", "block_apply_mask_",
           "block_soft_threshold_"]

MAXD = 4  # dims per level the kernels take (after merging)

# Tile sizes. Tests shrink "small_nb" (to 0: every scope takes the large-scope path) and the chunks
# to exercise the multi-chunk paths on tiny inputs.
TUNING = {
    "small_nb": 32,        # blocks per scope up to which the fused rank-counting kernel is used
    "tile": 4096,          # elements loaded per chunk by the small / rows kernels
    "rank_tile": 8192,     # TS * NBP * NBP of the small kernel's pairwise comparison
    "elem_chunk": 128,     # max elements of one block per chunk (small / rows kernels)
    "select_chunk": 1024,  # scores per chunk of the select kernel
    "soft_chunk": 1024,    # elements of one block per chunk of the soft-threshold kernel
}

# Force int64 offsets (the record phase of scripts/triton_aot_check.py compiles both widths).
FORCE_INT64 = False

# kernel modes (constexpr globals, readable inside the kernels; the host passes ``.value``)
_KTH, _MASK, _EXPAND, _HARD = (tl.constexpr(i) for i in range(4))   # _small_kernel
_SCORE, _NORM, _ZERO, _FILL = (tl.constexpr(i) for i in range(4))   # _rows_kernel
_SEL_KTH, _SEL_MASK = (tl.constexpr(i) for i in range(2))           # _select_kernel


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _coords(i, n1, n2, n3, ND: tl.constexpr):
    """Row-major coordinates of linear index ``i`` over the last ND of (n0, n1, n2, n3)."""
    c0 = i * 0
    c1 = i * 0
    c2 = i * 0
    c3 = i * 0
    if ND == 1:
        c3 = i
    elif ND == 2:
        c3 = i % n3
        c2 = i // n3
    elif ND == 3:
        c3 = i % n3
        t = i // n3
        c2 = t % n2
        c1 = t // n2
    elif ND == 4:
        c3 = i % n3
        t = i // n3
        c2 = t % n2
        t = t // n2
        c1 = t % n1
        c0 = t // n1
    return c0, c1, c2, c3


@triton.jit
def _off(c0, c1, c2, c3, s0, s1, s2, s3, ND: tl.constexpr, IDX: tl.constexpr):
    """Offset of coordinates (c0..c3) with strides (s0..s3), last ND dims in use."""
    o = c3.to(IDX) * 0
    if ND >= 1:
        o = c3.to(IDX) * s3
    if ND >= 2:
        o += c2.to(IDX) * s2
    if ND >= 3:
        o += c1.to(IDX) * s1
    if ND >= 4:
        o += c0.to(IDX) * s0
    return o


@triton.jit
def _f64(bits):
    """A float64 scalar passed as its int64 bit pattern."""
    return tl.cast(bits, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _load(ptr, off, m, BF: tl.constexpr, ACC: tl.constexpr):
    """Load as ACC; BF: ptr holds bfloat16 as int16 bits."""
    if BF:
        b = tl.load(ptr + off, mask=m, other=0)
        v = (b.to(tl.int32) << 16).to(tl.float32, bitcast=True).to(ACC)
    else:
        v = tl.load(ptr + off, mask=m, other=0.0).to(ACC)
    return v


@triton.jit
def _store(ptr, off, v, m, BF: tl.constexpr):
    """Store v rounded to ptr's dtype (BF: bfloat16 bits, round to nearest even, NaN -> 0x7FC0)."""
    if BF:
        f = v.to(tl.float32)
        u = f.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(f != f, 0x7FC0, r)
        tl.store(ptr + off, r.to(tl.int16), mask=m)
    else:
        tl.store(ptr + off, v.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _sqrt(x):
    # correctly rounded (tl.sqrt is approximate for float32 on the GPU; float64 sqrt is IEEE)
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _div(a, b):
    # correctly rounded division (float32 `/` is approximate on the GPU; float64 `/` is IEEE)
    if a.dtype == tl.float64 or b.dtype == tl.float64:
        r = a.to(tl.float64) / b.to(tl.float64)
    else:
        r = tl.div_rn(a, b)
    return r


@triton.jit
def _term(v, pf, PK: tl.constexpr, RAW: tl.constexpr):
    """Per-element score term. PK: 0 p=1, 1 p=2, 2 p=inf, 3 p=3, 4 other p (pf)."""
    if RAW:
        t = v
    else:
        a = tl.abs(v)
        if PK == 1:
            t = a * a
        elif PK == 3:
            t = a * a * a
        elif PK == 4:
            t = tl.exp2(pf * tl.log2(a))
        else:
            t = a
    return t


@triton.jit
def _norm(s, ipf, PK: tl.constexpr, RAW: tl.constexpr):
    """score -> norm (score ** (1/p))."""
    if RAW:
        r = s
    elif PK == 1:
        r = tl.where(s < 0, s, _sqrt(s))  # -inf (fewer than k valid scores) stays -inf
    elif PK >= 3:
        r = tl.where(s < 0, s, tl.exp2(tl.log2(s) * ipf))
    else:
        r = s
    return r


@triton.jit
def _kth_out(kv, ipf, PK: tl.constexpr, RAW: tl.constexpr):
    """The k-th score as scope_kth reports it: its norm, -inf for 'fewer than k valid'."""
    r = _norm(kv, ipf, PK, RAW)
    if not RAW:
        r = tl.where(kv == float("-inf"), float("-inf"), r)
    return r


@triton.jit
def _mid(v, v1, wbits, dbits, ACC: tl.constexpr):
    # (v + w * v1) / (1 + w), with w and (1 + w) rounded to ACC like torch's Python scalars, never NaN (MID_RULE of
    # the reference): w = 0 gives v; an infinite v gives v, v1 = -inf below a finite v gives -inf; finite v, v1 whose
    # formula overflows (or a w past ACC's range) take two products that cannot
    w64 = _f64(wbits)
    d64 = _f64(dbits)
    m = _div(v + w64.to(ACC) * v1, d64.to(ACC))
    a = (1.0 / d64).to(ACC)
    b = (w64 / d64).to(ACC)
    m = tl.where((tl.abs(m) == float("inf")) | (m != m), v * a + v1 * b, m)
    m = tl.where(tl.abs(v1) == float("inf"), v1, m)
    m = tl.where(tl.abs(v) == float("inf"), v, m)
    return tl.where(w64 == 0, v, m)


@triton.jit
def _scaled(x, scale):
    # x * scale for a soft-threshold scale (SOFT_RULE of the reference): a NaN scale (inf / inf, 0 / 0) counts as 0,
    # and a scale of 0 gives x's signed zero, also for an infinite x (inf * 0 would be NaN)
    s = tl.where(scale > 0, scale, 0.0)
    y = x * s
    return tl.where((s == 0) & (tl.abs(x) == float("inf")), tl.where(x > 0, 1.0, -1.0) * 0.0, y)


@triton.jit
def _clamp0(v):
    # clamp(min=0) that keeps NaN (like torch.clamp)
    return tl.where(v < 0, tl.zeros_like(v), v)


@triton.jit
def _key(v, KT: tl.constexpr):
    """Order-preserving unsigned key of float v (bit width of KT); -0.0 -> key(+0.0)."""
    u = v.to(KT, bitcast=True)
    top = tl.full([], 1, KT) << (KT.primitive_bitwidth - 1)
    k = tl.where((u & top) != 0, ~u, u | top)
    return tl.where((u & ~top) == 0, top, k)


@triton.jit
def _unkey(k, FT: tl.constexpr, KT: tl.constexpr):
    top = tl.full([], 1, KT) << (KT.primitive_bitwidth - 1)
    u = tl.where((k & top) != 0, k ^ top, ~k)
    return u.to(FT, bitcast=True)


# --------------------------------------------------------------------------- small scopes: one fused pass


@triton.jit(do_not_specialize=["pbits", "ipbits", "wbits", "dbits"])
def _small_kernel(r_ptr, w_ptr, g_ptr, numscp, nb, ne, k,
                  n01, n02, n03, r00, r01, r02, r03, w00, w01, w02, w03, g00, g01, g02, g03,
                  n11, n12, n13, r10, r11, r12, r13, w10, w11, w12, w13, g10, g11, g12, g13,
                  n21, n22, n23, r20, r21, r22, r23, w20, w21, w22, w23,
                  pbits, ipbits, wbits, dbits,
                  MODE: tl.constexpr, PK: tl.constexpr, RAW: tl.constexpr, TIES: tl.constexpr,
                  MID: tl.constexpr, ACC: tl.constexpr, R_BF: tl.constexpr, O_BF: tl.constexpr,
                  IDX: tl.constexpr, ND0: tl.constexpr, ND1: tl.constexpr, ND2: tl.constexpr,
                  TS: tl.constexpr, NBP: tl.constexpr, EC: tl.constexpr):
    # MODE _KTH: G[scope] = k-th norm (G is the scope-grid output, level-1 strides 0)
    #      _MASK: G[block] = keep    _EXPAND: W[element] = keep    _HARD: W[element] = 0 if dropped, G[block] = keep
    pid = tl.program_id(0)
    sc = pid.to(IDX) * TS + tl.arange(0, TS).to(IDX)
    bj = tl.arange(0, NBP)
    sc_ok = sc < numscp
    row_ok = sc_ok[:, None] & (bj < nb)[None, :]
    a0, a1, a2, a3 = _coords(sc, n01, n02, n03, ND0)
    ro0 = _off(a0, a1, a2, a3, r00, r01, r02, r03, ND0, IDX)
    wo0 = _off(a0, a1, a2, a3, w00, w01, w02, w03, ND0, IDX)
    go0 = _off(a0, a1, a2, a3, g00, g01, g02, g03, ND0, IDX)
    b0, b1, b2, b3 = _coords(bj, n11, n12, n13, ND1)
    ro1 = _off(b0, b1, b2, b3, r10, r11, r12, r13, ND1, IDX)
    wo1 = _off(b0, b1, b2, b3, w10, w11, w12, w13, ND1, IDX)
    go1 = _off(b0, b1, b2, b3, g10, g11, g12, g13, ND1, IDX)
    rrow = ro0[:, None] + ro1[None, :]
    wrow = wo0[:, None] + wo1[None, :]
    pf = _f64(pbits).to(ACC)
    ipf = _f64(ipbits).to(ACC)

    score = tl.zeros([TS, NBP], ACC)
    nan = tl.zeros([TS, NBP], tl.int32)
    for c0 in range(0, ne, EC):
        e = c0 + tl.arange(0, EC)
        e_ok = e < ne
        c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
        ro2 = _off(c_0, c_1, c_2, c_3, r20, r21, r22, r23, ND2, IDX)
        m = row_ok[:, :, None] & e_ok[None, None, :]
        v = _load(r_ptr, rrow[:, :, None] + ro2[None, None, :], m, R_BF, ACC)
        t = _term(v, pf, PK, RAW)
        if PK == 2 and not RAW:
            nan += tl.sum((t != t).to(tl.int32), axis=2)
            score = tl.maximum(score, tl.max(tl.where(t == t, t, tl.zeros_like(t)), axis=2))
        else:
            score += tl.sum(t, axis=2)
    if PK == 2 and not RAW:
        score = tl.where(nan > 0, float("nan"), score)
    s = tl.where(row_ok, score, float("nan"))  # padding never counts and is never kept
    valid = s == s

    si = s[:, :, None]
    sj = s[:, None, :]
    gt = tl.sum((sj > si).to(tl.int32), axis=2)
    if TIES and MODE != _KTH:
        keep = valid & (gt < k)
    else:
        before = bj[:, None] > bj[None, :]  # [i, j]: j < i
        eqb = tl.sum(((sj == si) & before[None, :, :]).to(tl.int32), axis=2)
        rank = gt + eqb
        keep = valid & (rank < k)

    if MODE == _KTH:
        kv = tl.max(tl.where(valid & (rank == k - 1), s, float("-inf")), axis=1)
        out = _kth_out(kv, ipf, PK, RAW)
        if MID:
            kv1 = tl.max(tl.where(valid & (rank == k), s, float("-inf")), axis=1)
            out = _mid(out, _kth_out(kv1, ipf, PK, RAW), wbits, dbits, ACC)
        _store(g_ptr, go0, out, sc_ok, O_BF)
    else:
        if MODE == _MASK or MODE == _HARD:
            tl.store(g_ptr + (go0[:, None] + go1[None, :]), keep.to(tl.uint8), mask=row_ok)
        if MODE == _EXPAND or MODE == _HARD:
            for c0 in range(0, ne, EC):
                e = c0 + tl.arange(0, EC)
                e_ok = e < ne
                c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
                wo2 = _off(c_0, c_1, c_2, c_3, w20, w21, w22, w23, ND2, IDX)
                m = row_ok[:, :, None] & e_ok[None, None, :]
                ptrs = w_ptr + (wrow[:, :, None] + wo2[None, None, :])
                if MODE == _EXPAND:
                    tl.store(ptrs, (keep[:, :, None] & m).to(tl.uint8), mask=m)
                else:
                    z = tl.zeros([TS, NBP, EC], w_ptr.dtype.element_ty)
                    tl.store(ptrs, z, mask=m & ~keep[:, :, None])


# --------------------------------------------------------------------------- per-block rows


@triton.jit(do_not_specialize=["pbits", "ipbits"])
def _rows_kernel(r_ptr, w_ptr, g_ptr, o_ptr, nrows, nb, ne,
                 n01, n02, n03, r00, r01, r02, r03, w00, w01, w02, w03, g00, g01, g02, g03,
                 n11, n12, n13, r10, r11, r12, r13, w10, w11, w12, w13, g10, g11, g12, g13,
                 n21, n22, n23, r20, r21, r22, r23, w20, w21, w22, w23,
                 pbits, ipbits,
                 MODE: tl.constexpr, PK: tl.constexpr, RAW: tl.constexpr, ACC: tl.constexpr,
                 R_BF: tl.constexpr, O_BF: tl.constexpr, IDX: tl.constexpr,
                 ND0: tl.constexpr, ND1: tl.constexpr, ND2: tl.constexpr, RB: tl.constexpr, EC: tl.constexpr):
    # Row q = scope * nb + in-scope index. MODE _SCORE: o[q] = score (ACC); _NORM: o[q] = norm (x dtype);
    # _ZERO: W[element] = 0 where G[block] is false; _FILL: W[element] = G[block].
    pid = tl.program_id(0)
    q = pid.to(IDX) * RB + tl.arange(0, RB).to(IDX)
    q_ok = q < nrows
    if ND1 == 0:
        sc = q
        bj = q * 0
    else:
        sc = q // nb
        bj = q - sc * nb
    a0, a1, a2, a3 = _coords(sc, n01, n02, n03, ND0)
    b0, b1, b2, b3 = _coords(bj, n11, n12, n13, ND1)
    if MODE == _SCORE or MODE == _NORM:
        rrow = _off(a0, a1, a2, a3, r00, r01, r02, r03, ND0, IDX) + _off(b0, b1, b2, b3, r10, r11, r12, r13, ND1, IDX)
        pf = _f64(pbits).to(ACC)
        score = tl.zeros([RB], ACC)
        nan = tl.zeros([RB], tl.int32)
        for c0 in range(0, ne, EC):
            e = c0 + tl.arange(0, EC)
            c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
            ro2 = _off(c_0, c_1, c_2, c_3, r20, r21, r22, r23, ND2, IDX)
            m = q_ok[:, None] & (e < ne)[None, :]
            v = _load(r_ptr, rrow[:, None] + ro2[None, :], m, R_BF, ACC)
            t = _term(v, pf, PK, RAW)
            if PK == 2 and not RAW:
                nan += tl.sum((t != t).to(tl.int32), axis=1)
                score = tl.maximum(score, tl.max(tl.where(t == t, t, tl.zeros_like(t)), axis=1))
            else:
                score += tl.sum(t, axis=1)
        if PK == 2 and not RAW:
            score = tl.where(nan > 0, float("nan"), score)
        if MODE == _NORM:
            _store(o_ptr, q, _norm(score, _f64(ipbits).to(ACC), PK, RAW), q_ok, O_BF)
        else:
            tl.store(o_ptr + q, score, mask=q_ok)
    else:
        goff = _off(a0, a1, a2, a3, g00, g01, g02, g03, ND0, IDX) + _off(b0, b1, b2, b3, g10, g11, g12, g13, ND1, IDX)
        keep = tl.load(g_ptr + goff, mask=q_ok, other=1) != 0
        wrow = _off(a0, a1, a2, a3, w00, w01, w02, w03, ND0, IDX) + _off(b0, b1, b2, b3, w10, w11, w12, w13, ND1, IDX)
        for c0 in range(0, ne, EC):
            e = c0 + tl.arange(0, EC)
            c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
            wo2 = _off(c_0, c_1, c_2, c_3, w20, w21, w22, w23, ND2, IDX)
            m = q_ok[:, None] & (e < ne)[None, :]
            ptrs = w_ptr + (wrow[:, None] + wo2[None, :])
            if MODE == _FILL:
                tl.store(ptrs, (keep[:, None] & m).to(tl.uint8), mask=m)
            else:
                tl.store(ptrs, tl.zeros([RB, EC], w_ptr.dtype.element_ty), mask=m & ~keep[:, None])


# --------------------------------------------------------------------------- large scopes: exact radix select


@triton.jit
def _radix_kth(s_ptr, base, nb, k, KT: tl.constexpr, CH: tl.constexpr, CNT: tl.constexpr):
    """Key of the k-th largest valid score of row s_ptr[base : base + nb] (1 <= k <= #valid), and
    how many of the scores with that key a top-k takes (>= 1). CNT: the counters' dtype (int64 once
    a scope can hold 2^31 scores: a bin, ``need`` and their sums would wrap in int32)."""
    BITS: tl.constexpr = KT.primitive_bitwidth
    prefix = tl.full([], 0, KT)
    need = tl.full([], 0, CNT) + k
    b = tl.arange(0, 256)
    for ps in tl.static_range(BITS // 8):
        sh = tl.full([], BITS - 8 * (ps + 1), KT)
        hist = tl.zeros([256], CNT)
        for c0 in range(0, nb, CH):
            j = c0 + tl.arange(0, CH)
            v = tl.load(s_ptr + base + j, mask=j < nb, other=float("nan"))
            key = _key(v, KT)
            ok = v == v
            if ps > 0:
                sh_hi = tl.full([], BITS - 8 * ps, KT)
                ok = ok & ((key >> sh_hi) == (prefix >> sh_hi))
            d = ((key >> sh) & 255).to(tl.int32)
            hist += tl.histogram(d, 256, mask=ok).to(CNT)
        at_or_above = tl.sum(hist) - tl.cumsum(hist, 0) + hist
        digit = tl.sum((at_or_above >= need).to(tl.int32)) - 1
        need = need - tl.sum(tl.where(b > digit, hist, 0))
        prefix = prefix | (digit.to(KT) << sh)
    return prefix, need


@triton.jit(do_not_specialize=["ipbits", "wbits", "dbits"])
def _select_kernel(s_ptr, g_ptr, nb, k,
                   n01, n02, n03, g00, g01, g02, g03, n11, n12, n13, g10, g11, g12, g13,
                   ipbits, wbits, dbits,
                   MODE: tl.constexpr, PK: tl.constexpr, RAW: tl.constexpr, TIES: tl.constexpr,
                   MID: tl.constexpr, ACC: tl.constexpr, KT: tl.constexpr, O_BF: tl.constexpr,
                   IDX: tl.constexpr, ND0: tl.constexpr, ND1: tl.constexpr, CH: tl.constexpr):
    # One program per scope over its row of scores s[scope * nb : (scope + 1) * nb].
    # MODE _SEL_KTH: g[scope] = k-th norm (contiguous scope grid); _SEL_MASK: G[block] = keep.
    # Counters (valid scores, histogram bins, need, the tie carry) in IDX: int64 when a scope can hold
    # 2^31 scores or more (IDX is int64 whenever numscp * nb * ne + 4096 >= 2^31).
    sc = tl.program_id(0).to(IDX)
    base = sc * nb
    nvalid = tl.full([], 0, IDX)
    for c0 in range(0, nb, CH):
        j = c0 + tl.arange(0, CH)
        v = tl.load(s_ptr + base + j, mask=j < nb, other=float("nan"))
        nvalid += tl.sum((v == v).to(tl.int32)).to(IDX)
    if MODE == _SEL_KTH:
        ipf = _f64(ipbits).to(ACC)
        kv = tl.full([], float("-inf"), ACC)
        if k <= nvalid:
            kk, _n = _radix_kth(s_ptr, base, nb, k, KT, CH, IDX)
            kv = _unkey(kk, ACC, KT)
        out = _kth_out(kv, ipf, PK, RAW)
        if MID:
            kv1 = tl.full([], float("-inf"), ACC)
            if k + 1 <= nvalid:
                kk1, _n1 = _radix_kth(s_ptr, base, nb, k + 1, KT, CH, IDX)
                kv1 = _unkey(kk1, ACC, KT)
            out = _mid(out, _kth_out(kv1, ipf, PK, RAW), wbits, dbits, ACC)
        _store(g_ptr, sc, out, sc >= 0, O_BF)
    else:
        a0, a1, a2, a3 = _coords(sc, n01, n02, n03, ND0)
        g0 = _off(a0, a1, a2, a3, g00, g01, g02, g03, ND0, IDX)
        take_all = nvalid <= k
        thr = ~tl.full([], 0, KT)  # above every valid key: nothing passes but take_all
        need = tl.full([], 0, IDX)
        if (k > 0) & (nvalid > k):
            thr, need = _radix_kth(s_ptr, base, nb, k, KT, CH, IDX)
        carry = tl.full([], 0, IDX)
        for c0 in range(0, nb, CH):
            j = c0 + tl.arange(0, CH)
            jm = j < nb
            v = tl.load(s_ptr + base + j, mask=jm, other=float("nan"))
            key = _key(v, KT)
            ok = v == v
            if TIES:
                keep = ok & (take_all | (key >= thr))
            else:
                eq = ok & (key == thr)
                rank_eq = tl.cumsum(eq.to(tl.int32), 0).to(IDX) + carry
                keep = ok & (take_all | (key > thr) | (eq & (rank_eq <= need)))
                carry += tl.sum(eq.to(tl.int32)).to(IDX)
            b0, b1, b2, b3 = _coords(j, n11, n12, n13, ND1)
            g1 = _off(b0, b1, b2, b3, g10, g11, g12, g13, ND1, IDX)
            tl.store(g_ptr + (g0 + g1), keep.to(tl.uint8), mask=jm)


# --------------------------------------------------------------------------- soft threshold


@triton.jit(do_not_specialize=["max_iter", "atolbits", "epsbits"])
def _soft_kernel(x_ptr, h_ptr, t_ptr, nrows, ne, max_iter,
                 n01, n02, n03, x00, x01, x02, x03, h00, h01, h02, h03, t00, t01, t02, t03,
                 n21, n22, n23, x20, x21, x22, x23, h20, h21, h22, h23,
                 atolbits, epsbits,
                 COND: tl.constexpr, BISECT: tl.constexpr, ONE: tl.constexpr, ACC: tl.constexpr,
                 X_BF: tl.constexpr, H_BF: tl.constexpr, T_BF: tl.constexpr, IDX: tl.constexpr,
                 ND0: tl.constexpr, ND2: tl.constexpr, RB: tl.constexpr, EC: tl.constexpr):
    # Rows = blocks (grid row-major). COND: h = conditioner; BISECT: diagonal metric on blocks of > 1 element;
    # ONE: the whole block is one chunk (kept in registers across the bisection).
    pid = tl.program_id(0)
    q = pid.to(IDX) * RB + tl.arange(0, RB).to(IDX)
    q_ok = q < nrows
    a0, a1, a2, a3 = _coords(q, n01, n02, n03, ND0)
    xrow = _off(a0, a1, a2, a3, x00, x01, x02, x03, ND0, IDX)
    hrow = _off(a0, a1, a2, a3, h00, h01, h02, h03, ND0, IDX)
    t = _load(t_ptr, _off(a0, a1, a2, a3, t00, t01, t02, t03, ND0, IDX), q_ok, T_BF, ACC)
    eps = _f64(epsbits).to(ACC)
    atol = _f64(atolbits).to(ACC)
    if ONE:
        e = tl.arange(0, EC)
        c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
        xo = xrow[:, None] + _off(c_0, c_1, c_2, c_3, x20, x21, x22, x23, ND2, IDX)[None, :]
        ho = hrow[:, None] + _off(c_0, c_1, c_2, c_3, h20, h21, h22, h23, ND2, IDX)[None, :]
        m1 = q_ok[:, None] & (e < ne)[None, :]
        xv1 = _load(x_ptr, xo, m1, X_BF, ACC)
        if COND:
            hv1 = _load(h_ptr, ho, m1, H_BF, ACC)
    if BISECT:
        if ONE:
            hw1 = hv1 * xv1
            ss = tl.sum(hw1 * hw1, axis=1)
            hmin = tl.min(tl.where(m1, hv1, float("inf")), axis=1)
            hmax = tl.max(tl.where(m1, hv1, float("-inf")), axis=1)
        else:
            ss = tl.zeros([RB], ACC)
            hmin = tl.full([RB], float("inf"), ACC)
            hmax = tl.full([RB], float("-inf"), ACC)
            for c0 in range(0, ne, EC):
                e = c0 + tl.arange(0, EC)
                c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
                m = q_ok[:, None] & (e < ne)[None, :]
                xv = _load(x_ptr, xrow[:, None] + _off(c_0, c_1, c_2, c_3, x20, x21, x22, x23, ND2, IDX)[None, :],
                           m, X_BF, ACC)
                hv = _load(h_ptr, hrow[:, None] + _off(c_0, c_1, c_2, c_3, h20, h21, h22, h23, ND2, IDX)[None, :],
                           m, H_BF, ACC)
                hw = hv * xv
                ss += tl.sum(hw * hw, axis=1)
                hmin = tl.minimum(hmin, tl.min(tl.where(m, hv, float("inf")), axis=1))
                hmax = tl.maximum(hmax, tl.max(tl.where(m, hv, float("-inf")), axis=1))
        nhw = _sqrt(ss)
        dead = ~(nhw > t)
        denom = _clamp0(nhw - t) + eps
        lo = _clamp0(_div(t * hmin, denom))
        hi = _clamp0(_div(t * hmax, denom))
        mu = (lo + hi) * 0.5
        done = ~q_ok
        it = tl.full([], 0, tl.int32)
        pending = tl.sum((~done).to(tl.int32))
        while (it < max_iter) & (pending > 0):
            if ONE:
                z = tl.where(m1, _div(hw1, hv1 + mu[:, None]), tl.zeros_like(hw1))
                zs = tl.sum(z * z, axis=1)
            else:
                zs = tl.zeros([RB], ACC)
                for c0 in range(0, ne, EC):
                    e = c0 + tl.arange(0, EC)
                    c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
                    m = q_ok[:, None] & (e < ne)[None, :]
                    xv = _load(x_ptr, xrow[:, None] + _off(c_0, c_1, c_2, c_3, x20, x21, x22, x23, ND2, IDX)[None, :],
                               m, X_BF, ACC)
                    hv = _load(h_ptr, hrow[:, None] + _off(c_0, c_1, c_2, c_3, h20, h21, h22, h23, ND2, IDX)[None, :],
                               m, H_BF, ACC)
                    z = tl.where(m, _div(hv * xv, hv + mu[:, None]), tl.zeros_like(xv))
                    zs += tl.sum(z * z, axis=1)
            zeta = mu * _sqrt(zs)
            below = zeta < t
            lo = tl.where(done, lo, tl.where(below, mu, lo))
            hi = tl.where(done, hi, tl.where(below, hi, mu))
            mu = tl.where(done, mu, (lo + hi) * 0.5)
            done = done | (tl.abs(hi - lo) < atol)
            pending = tl.sum((~done).to(tl.int32))
            it += 1
        if ONE:
            y = tl.where(dead[:, None], 0.0, _div(hw1, hv1 + mu[:, None]))
            _store(x_ptr, xo, y, m1, X_BF)
        else:
            for c0 in range(0, ne, EC):
                e = c0 + tl.arange(0, EC)
                c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
                m = q_ok[:, None] & (e < ne)[None, :]
                xo = xrow[:, None] + _off(c_0, c_1, c_2, c_3, x20, x21, x22, x23, ND2, IDX)[None, :]
                xv = _load(x_ptr, xo, m, X_BF, ACC)
                hv = _load(h_ptr, hrow[:, None] + _off(c_0, c_1, c_2, c_3, h20, h21, h22, h23, ND2, IDX)[None, :],
                           m, H_BF, ACC)
                y = tl.where(dead[:, None], 0.0, _div(hv * xv, hv + mu[:, None]))
                _store(x_ptr, xo, y, m, X_BF)
    else:
        # Euclidean; with COND the blocks are single elements (threshold / h per element).
        if ONE:
            ss = tl.sum(xv1 * xv1, axis=1)
        else:
            ss = tl.zeros([RB], ACC)
            for c0 in range(0, ne, EC):
                e = c0 + tl.arange(0, EC)
                c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
                m = q_ok[:, None] & (e < ne)[None, :]
                xv = _load(x_ptr, xrow[:, None] + _off(c_0, c_1, c_2, c_3, x20, x21, x22, x23, ND2, IDX)[None, :],
                           m, X_BF, ACC)
                ss += tl.sum(xv * xv, axis=1)
        n = _sqrt(ss)
        if ONE:
            tb = t[:, None] + tl.zeros_like(xv1)
            if COND:
                tb = _div(tb, hv1)
            scale = _clamp0(1.0 - _div(tb, (n + eps)[:, None]))
            y = tl.where((n != n)[:, None], 0.0, _scaled(xv1, scale))
            _store(x_ptr, xo, y, m1, X_BF)
        else:
            scale = _clamp0(1.0 - _div(t, n + eps))
            for c0 in range(0, ne, EC):
                e = c0 + tl.arange(0, EC)
                c_0, c_1, c_2, c_3 = _coords(e, n21, n22, n23, ND2)
                m = q_ok[:, None] & (e < ne)[None, :]
                xo = xrow[:, None] + _off(c_0, c_1, c_2, c_3, x20, x21, x22, x23, ND2, IDX)[None, :]
                xv = _load(x_ptr, xo, m, X_BF, ACC)
                y = tl.where((n != n)[:, None], 0.0, _scaled(xv, scale[:, None]))
                _store(x_ptr, xo, y, m, X_BF)


# --------------------------------------------------------------------------- host side


def _contig(shape: Sequence[int]) -> List[int]:
    st = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        st[i] = st[i + 1] * max(int(shape[i + 1]), 1)
    return st


def _np2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v) + 0.0))[0]  # + 0.0: -0.0 -> 0.0


class _Layout:
    """The three-level walk (scope / in-scope block / in-block element) of up to three operands.

    ``ops``: (strides, kind) per operand, kind ``"e"`` (x-shaped, element strides), ``"g"``
    (grid-shaped) or ``"s"`` (scope-grid-shaped). Level ``L`` is ``sizes[L]`` (dims, outermost
    first) with ``strides[L][op]``.
    """

    def __init__(self, shape, block, scope, ops):
        nd = len(shape)
        grid = [int(s) // int(b) for s, b in zip(shape, block)]
        sgrid = [g // int(s) for g, s in zip(grid, scope)]
        per = []
        for st, kind in ops:
            st = [int(v) for v in st]
            if kind == "e":
                per.append(([st[i] * scope[i] * block[i] for i in range(nd)], [st[i] * block[i] for i in range(nd)],
                            st))
            elif kind == "g":
                per.append(([st[i] * scope[i] for i in range(nd)], st, [0] * nd))
            else:
                per.append((st, [0] * nd, [0] * nd))
        self.sizes, self.strides = [], []
        for L, dims in enumerate((sgrid, list(scope), list(block))):
            sizes, strides = [], [[] for _ in ops]
            for i in range(nd):
                n = int(dims[i])
                if n == 1:
                    continue
                cur = [p[L][i] for p in per]
                if sizes and all(strides[o][-1] == cur[o] * n for o in range(len(ops))):
                    sizes[-1] *= n
                    for o in range(len(ops)):
                        strides[o][-1] = cur[o]
                else:
                    sizes.append(n)
                    for o in range(len(ops)):
                        strides[o].append(cur[o])
            self.sizes.append(sizes)
            self.strides.append(strides)
        self.ok = all(len(s) <= MAXD for s in self.sizes)
        self.numscp, self.nb, self.ne = math.prod(sgrid), math.prod(scope), math.prod(block)
        span = max(sum((n - 1) * abs(s[o][d]) for s, sz in zip(self.strides, self.sizes) for d, n in enumerate(sz))
                   for o in range(len(ops)))
        big = max(span, self.numscp * self.nb * self.ne) + 4096 >= 2**31
        self.idx = tl.int64 if (big or FORCE_INT64) else tl.int32

    def nd(self, L: int) -> int:
        return len(self.sizes[L])

    def args(self, L: int, ops: Sequence[int]) -> list:
        """Level L as kernel arguments: the inner three sizes, then four strides per operand in ``ops``."""
        pad = MAXD - len(self.sizes[L])
        out = ([1] * pad + self.sizes[L])[1:]
        for o in ops:
            out += [0] * pad + self.strides[L][o]
        return out


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _kt(t: torch.Tensor) -> torch.Tensor:
    """The tensor as the kernels address it: bfloat16 as int16 bits, bool as uint8 (views, no copy)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16)
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t


def _pkind(p: float, raw: bool = False, single: bool = False):
    """(PK constexpr, p bits, 1/p bits). Single-element blocks score |x| whatever p (like p = 1)."""
    p = float(p)
    if raw or single:
        return 0, _bits(1.0), _bits(1.0)
    if math.isinf(p):
        return 2, _bits(1.0), _bits(1.0)
    pk = {1.0: 0, 2.0: 1, 3.0: 3}.get(p, 4)
    return pk, _bits(p), _bits(1.0 / p)


def _check_inplace(x: torch.Tensor) -> None:
    if torch._debug_has_internal_overlap(x) == 1:
        raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a single "
                           "memory location. Please clone() the tensor before performing the operation.")


def _detach_from(t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """A read-side tensor sharing x's storage (other than x itself, same layout), copied before x is
    written: programs run concurrently, so one would read values another has already zeroed (the
    CPU and CUDA host code do the same)."""
    if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
        return t
    if t.data_ptr() == x.data_ptr() and t.stride() == x.stride() and t.shape == x.shape:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _small_tiles(lay: _Layout):
    nbp = _np2(lay.nb)
    ec = min(_np2(lay.ne), TUNING["elem_chunk"])
    ts = max(1, min(TUNING["tile"] // (nbp * ec), TUNING["rank_tile"] // (nbp * nbp)))
    ts = min(_np2(ts + 1) // 2, _np2(lay.numscp))  # a power of two <= the budget, no more than needed
    return ts, nbp, ec


def _launch_small(mode, lay, r, w, g, k, p, raw, ties, mid=False, k_weight=0.0, out_dtype=None):
    pk, pb, ipb = _pkind(p, raw, lay.ne == 1)
    ts, nbp, ec = _small_tiles(lay)
    ops = (0, 1, 2)
    args = lay.args(0, ops) + lay.args(1, ops) + lay.args(2, (0, 1))
    _small_kernel[(triton.cdiv(lay.numscp, ts),)](
        _kt(r), _kt(w), _kt(g), lay.numscp, lay.nb, lay.ne, int(k), *args,
        pb, ipb, _bits(k_weight), _bits(1.0 + k_weight),
        MODE=mode.value, PK=pk, RAW=bool(raw), TIES=bool(ties), MID=bool(mid), ACC=_acc(r.dtype),
        R_BF=r.dtype == torch.bfloat16, O_BF=out_dtype == torch.bfloat16, IDX=lay.idx,
        ND0=lay.nd(0), ND1=lay.nd(1), ND2=lay.nd(2), TS=ts, NBP=nbp, EC=ec, enable_fp_fusion=False)


def _launch_rows(mode, lay, r, w, g, o, p=2.0, raw=False):
    """Rows = every block, scope-major (scope index * nb + in-scope index)."""
    pk, pb, ipb = _pkind(p, raw, lay.ne == 1)
    nrows = lay.numscp * lay.nb
    ec = min(_np2(lay.ne), TUNING["elem_chunk"] * 2)
    rb = min(max(1, TUNING["tile"] // ec), 1024, _np2(nrows))
    ops = (0, 1, 2)
    args = lay.args(0, ops) + lay.args(1, ops) + lay.args(2, (0, 1))
    _rows_kernel[(triton.cdiv(nrows, rb),)](
        _kt(r), _kt(w), _kt(g), _kt(o), nrows, lay.nb, lay.ne, *args, pb, ipb,
        MODE=mode.value, PK=pk, RAW=bool(raw), ACC=_acc(r.dtype), R_BF=r.dtype == torch.bfloat16,
        O_BF=o.dtype == torch.bfloat16, IDX=lay.idx, ND0=lay.nd(0), ND1=lay.nd(1), ND2=lay.nd(2),
        RB=rb, EC=ec, enable_fp_fusion=False)


def _scores(src, block, scope, p, raw):
    """(numscp * nb) scratch of block scores, scope-major, in the accumulation dtype; None if the
    layout needs the reference."""
    lay = _Layout(src.shape, block, scope, [(src.stride(), "e")] * 3)
    if not lay.ok:
        return None
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    buf = torch.empty(lay.numscp * lay.nb, dtype=acc, device=src.device)
    _launch_rows(_SCORE, lay, src, src, src, buf, p, raw)
    return buf


def _launch_select(mode, scores, lay, g, k, p, raw, ties, mid=False, k_weight=0.0, out_dtype=None):
    pk, _, ipb = _pkind(p, raw, lay.ne == 1)
    kt = tl.uint64 if scores.dtype == torch.float64 else tl.uint32
    ch = min(_np2(lay.nb), TUNING["select_chunk"])
    args = lay.args(0, (2,)) + lay.args(1, (2,))
    _select_kernel[(lay.numscp,)](
        scores, _kt(g), lay.nb, int(k), *args, ipb, _bits(k_weight), _bits(1.0 + k_weight),
        MODE=mode.value, PK=pk, RAW=bool(raw), TIES=bool(ties), MID=bool(mid), ACC=_acc(scores.dtype), KT=kt,
        O_BF=out_dtype == torch.bfloat16, IDX=lay.idx, ND0=lay.nd(0), ND1=lay.nd(1), CH=ch,
        enable_fp_fusion=False)


def _grid(x: torch.Tensor, block_shape) -> List[int]:
    return [int(n) // int(b) for n, b in zip(x.shape, block_shape)]


def _small(nb: int) -> bool:
    return nb <= TUNING["small_nb"]


# --------------------------------------------------------------------------- public ops


def block_norms(x: torch.Tensor, block_shape: List[int], p: float) -> torch.Tensor:
    block = [int(b) for b in block_shape]
    out = torch.empty(_grid(x, block), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    lay = _Layout(x.shape, block, [1] * x.dim(), [(x.stride(), "e")] * 3)
    if not lay.ok:  # too many unmergeable dims for the kernels
        return _ref.block_norms(x, block, p)
    _launch_rows(_NORM, lay, x, x, x, out, p)
    return out


def scope_kth(x: torch.Tensor, block_shape: List[int], scope_shape: List[int], k: int, p: float, raw: bool,
              k_weight: float, mid: bool) -> torch.Tensor:
    block, scope = [int(b) for b in block_shape], [int(s) for s in scope_shape]
    sgrid = [g // s for g, s in zip(_grid(x, block), scope)]
    out = torch.empty(sgrid, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    nb = math.prod(scope)
    k_weight = float(k_weight)
    if _small(nb):
        lay = _Layout(x.shape, block, scope, [(x.stride(), "e"), (x.stride(), "e"), (_contig(sgrid), "s")])
        if lay.ok:
            _launch_small(_KTH, lay, x, x, out, k, p, raw, False, mid, k_weight, x.dtype)
            return out
    else:
        sc = _scores(x, block, scope, p, raw)
        if sc is not None:
            lay = _Layout(x.shape, block, scope, [(_contig(sgrid), "s")] * 3)
            _launch_select(_SEL_KTH, sc, lay, out, k, p, raw, False, mid, k_weight, x.dtype)
            return out
    return _ref.scope_kth(x, block, scope, k, p, raw, k_weight, mid)  # too many unmergeable dims


def _scope_select(src, block, scope, nnz, p, raw, ties, gmask, dst=None, emask=None) -> bool:
    """Selects the blocks to keep and writes the grid keep-mask into ``gmask`` (contiguous,
    grid-shaped; may be None with ``emask`` on the small path), zeros the dropped blocks of ``dst``
    / writes the element mask ``emask`` where given. False: the layout needs the reference."""
    grid = _grid(src, block)
    gst = (_contig(grid), "g")
    w = dst if dst is not None else emask
    if _small(math.prod(scope)):
        wop = (w.stride(), "e") if w is not None else (src.stride(), "e")
        gop = gst if gmask is not None else (src.stride(), "e")  # unused operands copy R
        lay = _Layout(src.shape, block, scope, [(src.stride(), "e"), wop, gop])
        if not lay.ok:
            return False
        mode = _HARD if dst is not None else (_EXPAND if emask is not None else _MASK)
        _launch_small(mode, lay, src, w if w is not None else src, gmask if gmask is not None else src,
                      nnz, p, raw, ties)
        return True
    if gmask is None:
        gmask = torch.empty(grid, dtype=torch.bool, device=src.device)
    lay_sel = _Layout(src.shape, block, scope, [gst] * 3)
    lay_w = None
    if w is not None:
        lay_w = _Layout(src.shape, block, [1] * len(block), [(w.stride(), "e"), (w.stride(), "e"), gst])
    if not (lay_sel.ok and (lay_w is None or lay_w.ok)):
        return False
    sc = _scores(src, block, scope, p, raw)
    if sc is None:
        return False
    _launch_select(_SEL_MASK, sc, lay_sel, gmask, nnz, p, raw, ties)
    if w is not None:
        _launch_rows(_ZERO if dst is not None else _FILL, lay_w, w, w, gmask, w)
    return True


def scope_mask(x: torch.Tensor, block_shape: List[int], scope_shape: List[int], nnz: int, p: float, raw: bool,
               keep_ties: bool, expand: bool) -> torch.Tensor:
    block, scope = [int(b) for b in block_shape], [int(s) for s in scope_shape]
    grid = _grid(x, block)
    if x.numel() == 0:
        return _ref.scope_mask(x, block, scope, nnz, p, raw, keep_ties, expand)
    em = torch.empty(x.shape, dtype=torch.bool, device=x.device) if expand else None
    gm = None if expand else torch.empty(grid, dtype=torch.bool, device=x.device)
    if not _scope_select(x, block, scope, int(nnz), p, raw, keep_ties, gm, None, em):
        return _ref.scope_mask(x, block, scope, nnz, p, raw, keep_ties, expand)
    return em if expand else gm


def scope_hard_threshold_(x: torch.Tensor, values: Optional[torch.Tensor], block_shape: List[int],
                          scope_shape: List[int], nnz: int, p: float, keep_ties: bool) -> torch.Tensor:
    block, scope = [int(b) for b in block_shape], [int(s) for s in scope_shape]
    _check_inplace(x)
    gm = torch.empty(_grid(x, block), dtype=torch.bool, device=x.device)
    if x.numel() == 0:
        return gm
    values = _detach_from(values, x)
    src = x if values is None else values
    if not _scope_select(src, block, scope, int(nnz), p, False, keep_ties, gm, x, None):
        return _ref.scope_hard_threshold_(x, values, block, scope, nnz, p, keep_ties)
    return gm


def block_apply_mask_(x: torch.Tensor, block_shape: List[int], block_mask: torch.Tensor) -> None:
    block = [int(b) for b in block_shape]
    _check_inplace(x)
    if x.numel() == 0:
        return None
    block_mask = _detach_from(block_mask, x)
    lay = _Layout(x.shape, block, [1] * x.dim(), [(x.stride(), "e"), (x.stride(), "e"), (block_mask.stride(), "g")])
    if not lay.ok:
        _ref.block_apply_mask_(x, block, block_mask)
        return None
    _launch_rows(_ZERO, lay, x, x, block_mask, x)
    return None


def block_soft_threshold_(x: torch.Tensor, block_shape: List[int], thresholds: torch.Tensor,
                          conditioner: Optional[torch.Tensor], max_iter: int, atol: float, eps: float) -> None:
    block = [int(b) for b in block_shape]
    _check_inplace(x)
    _ref.check_soft_values(thresholds, conditioner, _ref.acc_dtype(x.dtype))  # before x is written
    if x.numel() == 0:
        return None
    thresholds, conditioner = _detach_from(thresholds, x), _detach_from(conditioner, x)
    h = conditioner if conditioner is not None else x
    lay = _Layout(x.shape, block, [1] * x.dim(), [(x.stride(), "e"), (h.stride(), "e"), (thresholds.stride(), "g")])
    if not lay.ok:
        _ref.soft_threshold_unchecked_(x, block, thresholds, conditioner, max_iter, atol, eps)
        return None
    ne, nrows = lay.ne, lay.numscp
    ec = min(_np2(ne), TUNING["soft_chunk"])
    one = ne <= ec
    rb = min(max(1, 2048 // ec), _np2(nrows))
    args = lay.args(0, (0, 1, 2)) + lay.args(2, (0, 1))
    _soft_kernel[(triton.cdiv(nrows, rb),)](
        _kt(x), _kt(h), _kt(thresholds), nrows, ne, int(max_iter), *args, _bits(atol), _bits(eps),
        COND=conditioner is not None, BISECT=conditioner is not None and ne > 1, ONE=one, ACC=_acc(x.dtype),
        X_BF=x.dtype == torch.bfloat16, H_BF=h.dtype == torch.bfloat16, T_BF=thresholds.dtype == torch.bfloat16,
        IDX=lay.idx, ND0=lay.nd(0), ND2=lay.nd(2), RB=rb, EC=ec, enable_fp_fusion=False)
    return None

"""Issue 6, GPU: the Triton flat projection kernel against variants that generate the same +-1 matrix more
cheaply, in one call (the second GPU lease step after bench_gpu.py; see benchmarks/GPU-NOTES.md).

The first H200 run (benchmarks/results/h200/gpu-issue6.md) put the shipped kernel at 217 TFLOP/s for bf16 x
(31% of the measured 8192^3 bf16 product), the same at B = 64 and B = 512: the R-tile generation, not the
matrix units, bounds it. Variants, all drawing the same bits (so the same matrix, entry for entry):

* GEN 0: the shipped expansion, ``(word >> j) & 1`` on the 64-bit word, then a select of +-1.
* GEN 1: each 64-bit word split once into two 32-bit halves; an entry is
  ``((half << (31 - j)) & 0x80000000) ^ 0xBF800000`` read as fp32 (+1 when bit j is set, else -1): a shift
  and one logic op per entry, then a packed fp32 -> bf16 conversion.
* TRANS 0: ``acc[B, k] += x_tile @ Rt_tile`` (R^T tile is the B operand: generated in registers, stored to
  shared memory for wgmma). TRANS 1: ``acc[k, B] += R_tile @ x_tile^T`` (R is the A operand, which wgmma can
  take from registers). TRANS 2 (GEN 0 only, added after the first run): TRANS 0 unrolled by two into two
  accumulators over alternate tiles, so one tile's generation can overlap the other's wgmma. TRANS 3 / 4
  (GEN 0, added in session 15, no GPU): x read through a tensor descriptor (TMA) instead of masked pointer
  loads; TRANS 4 also warp-specialised by the compiler (a TMA producer warp group and two consumer groups,
  each generating R^T for its own 64 rows of the B tile; see _flat_tma). TRANS 6 (bf16 x, added in session
  15): the hand-written warp-specialised Gluon kernel of benchmarks/gpu_flat_gluon.py (a TMA loader warp,
  four generator warps writing R tiles with 16-byte stores, one wgmma warp group), the tile's stage count
  as its ring depth; TRANS 7 the same with two entries generated per 32-bit register (PACKED), and for fp32
  x the three-part split with a fresh accumulator per tile (SPLIT).

Each variant is checked before it is timed: its first 65,536 columns against float64 (R from the Triton
generator, itself checked against the CPU's in bench_gpu.py), and its full output against the shipped
kernel's. Rows go to $OUT/gpu-flat-variants.jsonl as they are measured. ``--smoke`` runs tiny shapes under
TRITON_INTERPRET=1 on CPU (correctness of every variant's generation and indexing, MODE 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from gradkit.kernels.triton import projection as T  # noqa: E402
from gradkit.kernels.triton.projection import _row_key, _word  # noqa: E402


@triton.jit
def _halves(h):
    lo = h.to(tl.uint32).to(tl.int32, bitcast=True)
    hi = (h >> 32).to(tl.uint32).to(tl.int32, bitcast=True)
    return tl.join(lo, hi)  # [..., 2]: bits 0-31, 32-63


@triton.jit
def _pm1(half_bcast, s):
    top = (half_bcast << s) & tl.full([], -2147483648, tl.int32)  # bit j moved to bit 31
    return (top ^ tl.full([], -1082130432, tl.int32)).to(tl.float32, bitcast=True)  # 0xBF800000: set -> +1.0


@triton.jit
def _rt_gen1(rk, wbase, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr,
             G: tl.constexpr):
    """R^T tile [BLOCK_D, BLOCK_K], fp32 +-1."""
    NW: tl.constexpr = BLOCK_D // 64
    w = wbase + tl.arange(0, NW)
    h = _word(rk[None, :], w[:, None], MA, MB, G)  # [NW, BLOCK_K]
    hv = tl.permute(_halves(h), (0, 2, 1))  # [NW, 2, BLOCK_K]
    s = 31 - tl.arange(0, 32)
    v = _pm1(hv[:, :, None, :], s[None, None, :, None])  # [NW, 2, 32, BLOCK_K]
    return tl.reshape(v, (BLOCK_D, BLOCK_K))


@triton.jit
def _r_gen1(rk, wbase, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr,
            G: tl.constexpr):
    """R tile [BLOCK_K, BLOCK_D], fp32 +-1."""
    NW: tl.constexpr = BLOCK_D // 64
    w = wbase + tl.arange(0, NW)
    h = _word(rk[:, None], w[None, :], MA, MB, G)  # [BLOCK_K, NW]
    hv = _halves(h)  # [BLOCK_K, NW, 2]
    s = 31 - tl.arange(0, 32)
    v = _pm1(hv[:, :, :, None], s[None, None, None, :])  # [BLOCK_K, NW, 2, 32]
    return tl.reshape(v, (BLOCK_K, BLOCK_D))


@triton.jit
def _r_gen0(rk, wbase, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr,
            G: tl.constexpr):
    NW: tl.constexpr = BLOCK_D // 64
    w = wbase + tl.arange(0, NW)
    h = _word(rk[:, None], w[None, :], MA, MB, G)  # [BLOCK_K, NW]
    j = tl.arange(0, 64).to(tl.uint64)
    bits = (h[:, :, None] >> j[None, None, :]) & 1
    return tl.where(tl.reshape(bits, (BLOCK_K, BLOCK_D)) != 0, 1.0, -1.0).to(tl.float32)


@triton.jit
def _program(seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split, inv_bits, BLOCK_B: tl.constexpr,
             BLOCK_K: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, RC: tl.constexpr):
    """What every variant kernel starts from, as the shipped kernel does: 1/sqrt(k), col0 and its 64-column
    word base, this program's rows of R and of x, their row keys, and its tile range [t0, t1)."""
    inv = tl.cast(tl.cast(inv_bits, tl.int64), tl.float64, bitcast=True)
    col0 = T._join(c0_h, c0_m, c0_l)
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    bidx = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rk = _row_key(T._join(seed_h, seed_m, seed_l), rows.to(tl.int64), MA, MB, RC)
    t0 = tl.program_id(2) * per_split
    return inv, col0, col0 - (col0 & 63), rows, bidx, rk, t0, tl.minimum(t0 + per_split, ntiles)


@triton.jit
def _store_part(part_ptr, acc, inv, bidx, rows, B, K):
    """acc [B tile, k tile] scaled by 1/sqrt(k) into this D split's (B, K) slab of the partial sums."""
    om = (bidx[:, None] < B) & (rows[None, :] < K)
    optr = part_ptr + tl.program_id(2).to(tl.int64) * B * K + bidx[:, None].to(tl.int64) * K + rows[None, :]
    tl.store(optr, acc * inv.to(tl.float32), mask=om)


@triton.jit
def _flat_v(x_ptr, part_ptr, B, D, K, sxb, sxd, seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split,
            inv_bits, MODE: tl.constexpr, GEN: tl.constexpr, TRANS: tl.constexpr, BLOCK_B: tl.constexpr,
            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, RC: tl.constexpr,
            G: tl.constexpr):
    inv, col0, base, rows, bidx, rk, t0, t1 = _program(seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split,
                                                       inv_bits, BLOCK_B, BLOCK_K, MA, MB, RC)
    if TRANS == 0:
        acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_B], dtype=tl.float32)
    for t in range(t0, t1):
        t64 = tl.cast(t, tl.int64)
        c = base + t64 * BLOCK_D + tl.arange(0, BLOCK_D)
        d = c - col0
        dm = (d >= 0) & (d < D)
        wb = (base >> 6) + t64 * (BLOCK_D // 64)
        if TRANS == 0:
            xm = (bidx[:, None] < B) & dm[None, :]
            xt = tl.load(x_ptr + bidx[:, None].to(tl.int64) * sxb + d[None, :] * sxd, mask=xm, other=0.0)
            if GEN == 0:
                bits = T._rt_tile_signs(rk, wb, BLOCK_D, BLOCK_K, MA, MB, G)
                r = tl.where(bits != 0, 1.0, -1.0).to(tl.float32)
            else:
                r = _rt_gen1(rk, wb, BLOCK_D, BLOCK_K, MA, MB, G)
        else:
            xm = dm[:, None] & (bidx[None, :] < B)
            xt = tl.load(x_ptr + bidx[None, :].to(tl.int64) * sxb + d[:, None] * sxd, mask=xm, other=0.0)
            if GEN == 0:
                r = _r_gen0(rk, wb, BLOCK_D, BLOCK_K, MA, MB, G)
            else:
                r = _r_gen1(rk, wb, BLOCK_D, BLOCK_K, MA, MB, G)
        if MODE == 0:
            if TRANS == 0:
                acc += tl.dot(xt.to(tl.float32), r, input_precision="ieee")
            else:
                acc += tl.dot(r, xt.to(tl.float32), input_precision="ieee")
        elif MODE == 1:
            rb = r.to(xt.dtype)
            if TRANS == 0:
                acc += tl.dot(xt, rb)
            else:
                acc += tl.dot(rb, xt)
        else:
            rb = r.to(tl.bfloat16)
            xf = xt.to(tl.float32)
            hi = xf.to(tl.bfloat16)
            r1 = xf - hi.to(tl.float32)
            mid = r1.to(tl.bfloat16)
            lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
            if TRANS == 0:
                acc += tl.dot(hi, rb)
                acc += tl.dot(mid, rb)
                acc += tl.dot(lo, rb)
            else:
                acc += tl.dot(rb, hi)
                acc += tl.dot(rb, mid)
                acc += tl.dot(rb, lo)
    if TRANS == 0:
        _store_part(part_ptr, acc, inv, bidx, rows, B, K)
    else:  # acc is [k tile, B tile]: stored through transposed addresses, not a transposed tensor
        om = (rows[:, None] < K) & (bidx[None, :] < B)
        optr = part_ptr + tl.program_id(2).to(tl.int64) * B * K + bidx[None, :].to(tl.int64) * K + rows[:, None]
        tl.store(optr, acc * inv.to(tl.float32), mask=om)


@triton.jit
def _tile_xr(x_ptr, B, D, sxb, sxd, bidx, rk, t64, tlim, base, col0, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
             MA: tl.constexpr, MB: tl.constexpr, G: tl.constexpr):
    """x tile [BLOCK_B, BLOCK_D] (zeros when t64 >= tlim) and the shipped +-1 R^T tile [BLOCK_D, BLOCK_K]."""
    c = base + t64 * BLOCK_D + tl.arange(0, BLOCK_D)
    d = c - col0
    dm = (d >= 0) & (d < D) & (c < base + tlim.to(tl.int64) * BLOCK_D)
    xm = (bidx[:, None] < B) & dm[None, :]
    xt = tl.load(x_ptr + bidx[:, None].to(tl.int64) * sxb + d[None, :] * sxd, mask=xm, other=0.0)
    bits = T._rt_tile_signs(rk, (base >> 6) + t64 * (BLOCK_D // 64), BLOCK_D, BLOCK_K, MA, MB, G)
    return xt, tl.where(bits != 0, 1.0, -1.0).to(tl.float32)


@triton.jit
def _mode_dot(xt, r, acc, MODE: tl.constexpr):
    if MODE == 0:
        return tl.dot(xt.to(tl.float32), r, acc, input_precision="ieee")
    elif MODE == 1:
        return tl.dot(xt, r.to(xt.dtype), acc)
    else:
        rb = r.to(tl.bfloat16)
        xf = xt.to(tl.float32)
        hi = xf.to(tl.bfloat16)
        r1 = xf - hi.to(tl.float32)
        mid = r1.to(tl.bfloat16)
        lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(hi, rb, acc)
        acc = tl.dot(mid, rb, acc)
        return tl.dot(lo, rb, acc)


@triton.jit
def _flat_2acc(x_ptr, part_ptr, B, D, K, sxb, sxd, seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split,
               inv_bits, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               MA: tl.constexpr, MB: tl.constexpr, RC: tl.constexpr, G: tl.constexpr):
    """The shipped kernel with the D loop unrolled by two into two accumulators: the two dots of an
    iteration are independent (their own R^T operand in shared memory), so the second tile's generation
    need not wait for the first tile's wgmma, and each MMA chain is half as long."""
    inv, col0, base, rows, bidx, rk, t0, t1 = _program(seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split,
                                                       inv_bits, BLOCK_B, BLOCK_K, MA, MB, RC)
    acc0 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for t in range(t0, t1, 2):
        t64 = tl.cast(t, tl.int64)
        xa, ra = _tile_xr(x_ptr, B, D, sxb, sxd, bidx, rk, t64, t1, base, col0, BLOCK_D, BLOCK_K, MA, MB, G)
        acc0 = _mode_dot(xa, ra, acc0, MODE)
        xb, rb = _tile_xr(x_ptr, B, D, sxb, sxd, bidx, rk, t64 + 1, t1, base, col0, BLOCK_D, BLOCK_K, MA, MB, G)
        acc1 = _mode_dot(xb, rb, acc1, MODE)
    _store_part(part_ptr, acc0 + acc1, inv, bidx, rows, B, K)


@triton.jit
def _flat_tma(x_ptr, part_ptr, B, D, K, sxb, sxd, seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split,
              inv_bits, MODE: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, RC: tl.constexpr,
              G: tl.constexpr):
    """TRANS 3 / 4: the shipped generation and orientation with x read through a tensor descriptor (TMA, zero
    fill past B and D) instead of masked pointer loads; TRANS 4 also asks for warp specialisation of the D loop
    (``tl.range(..., warp_specialize=True)``). What Triton 3.9's Hopper pass makes of it (compiled here for
    sm_90; the H200 runs Triton 3.6, whose pass may differ, and a failure there is recorded as the row's error):
    * with the shipped pointer loads it aborts ("unsupported load type for producer commit";
      triton-lang/triton#9728), hence the descriptor;
    * 4 warps: a TMA producer warp group plus two consumer warp groups (12 warps, 232 registers each). The
      consumers split the B tile by rows, 64 each, and each generates the whole R^T tile for its own wgmma.
      At BLOCK_B = 64 there is nothing to split and both consumers do the whole tile twice, so the plan runs
      TRANS 4 only with BLOCK_B = 128 (B = 512: the same generation per MMA as the shipped BLOCK_B = 64, now
      with one group's generation free to overlap the other's wgmma); 8 warps: no partitions at all;
      BLOCK_K = 256 with 4 warps: the pass fails.
    Generation is not a load, so the pass never makes it the producer's job: a producer warp group that
    generates R^T tiles for MMA-only consumers needs a hand-written (Gluon) kernel. Needs col0 == 0 and
    sxd == 1 (the variant launcher's case)."""
    inv, col0, base, rows, bidx, rk, t0, t1 = _program(seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split,
                                                       inv_bits, BLOCK_B, BLOCK_K, MA, MB, RC)
    b0 = tl.program_id(1) * BLOCK_B
    xdesc = tl.make_tensor_descriptor(x_ptr, shape=[B, D], strides=[sxb, 1], block_shape=[BLOCK_B, BLOCK_D])
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for t in tl.range(t0, t1, num_stages=STAGES, warp_specialize=WS):
        xt = xdesc.load([b0, t * BLOCK_D])
        bits = T._rt_tile_signs(rk, tl.cast(t, tl.int64) * (BLOCK_D // 64), BLOCK_D, BLOCK_K, MA, MB, G)
        acc = _mode_dot(xt, tl.where(bits != 0, 1.0, -1.0).to(tl.float32), acc, MODE)
    _store_part(part_ptr, acc, inv, bidx, rows, B, K)


def _descriptor_scratch(size: int, alignment: int, stream):
    """Global scratch for tensor descriptors made inside kernels (triton.set_allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def split_launch(launch, x, k, bk, bb, bd, sms):
    """launch(grid, part, ntiles, per) over the grid (k tiles, B tiles, D splits) with project_flat's D-split rule
    (T.d_splits), the per-split partial sums added afterwards in order, as the shipped launcher does."""
    B, D = x.shape
    out = torch.zeros(B, k, dtype=torch.float32, device=x.device)
    ntiles = triton.cdiv(D, bd)
    gk, gb = triton.cdiv(k, bk), triton.cdiv(B, bb)
    split, per = T.d_splits(ntiles, gk * gb, 4 * sms)
    part = out if split == 1 else torch.empty(split, B, k, dtype=torch.float32, device=x.device)
    launch((gk, gb, split), part, ntiles, per)
    if split > 1:
        torch.sum(part, dim=0, out=out)
    return out


def _launch(kernel, x, k, seed, bk, bb, bd, warps, stages, sms, **constexprs):
    """A variant kernel (the shipped kernel's arguments) through split_launch."""
    kw = {} if x.device.type == "cpu" else {"num_warps": warps, "num_stages": stages}

    def launch(grid, part, ntiles, per):
        kernel[grid](x, part, x.shape[0], x.shape[1], k, x.stride(0), x.stride(1), *T._split(seed), *T._split(0),
                     ntiles, per, T._inv_bits(k), BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd, MA=T._MIX_A, MB=T._MIX_B,
                     RC=T._ROW_C, G=T._GOLDEN, **constexprs, **kw)

    return split_launch(launch, x, k, bk, bb, bd, sms)


def flat_variant(x, k, seed, gen, trans, bk, bb, bd, warps, stages, mode=None, sms=132):
    """project_flat(x, k, seed, Rademacher, col0=0) with the given variant and tiles."""
    if mode is None:
        mode = 1 if x.dtype in (torch.bfloat16, torch.float16) else 2
    if trans == 2:  # TRANS 2: the shipped generation and orientation, two accumulators over alternate tiles
        return _launch(_flat_2acc, x, k, seed, bk, bb, bd, warps, stages, sms, MODE=mode)
    if trans == -1:  # the library's kernel as shipped (GPU_FLAT tiles, ALIGNED path at col0 = 0)
        return T.project_flat(x, k, seed, 0, 0)
    if trans in (6, 7):  # TRANS 6 / 7: the hand-written warp-specialised Gluon kernel (7: packed generation)
        import gpu_flat_gluon

        return gpu_flat_gluon.flat_gluon(x, k, seed, bk, bb, bd, nbuf=stages, sms=sms, packed=trans == 7)
    if trans in (3, 4):  # TRANS 3 / 4: x through a tensor descriptor; 4 also warp-specialised
        if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16:
            raise ValueError("TRANS 3/4: x needs unit column stride and 16-byte aligned rows (TMA)")
        if x.device.type == "cuda":
            triton.set_allocator(_descriptor_scratch)
        return _launch(_flat_tma, x, k, seed, bk, bb, bd, warps, stages, sms, MODE=mode, WS=trans == 4,
                       STAGES=stages)
    return _launch(_flat_v, x, k, seed, bk, bb, bd, warps, stages, sms, MODE=mode, GEN=gen, TRANS=trans)


@triton.jit
def _fp32_tile(x_ptr, B, D, sxb, sxd, bidx, rk, t64, tlim, base, col0, BLOCK_D: tl.constexpr,
               BLOCK_K: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, G: tl.constexpr, IEEE: tl.constexpr):
    """One D tile of fp32 x as three bf16 parts (hi, mid, lo) and the +-1 R^T tile (bf16); IEEE (the
    interpreter, whose bf16 dots are wrong) returns the same parts widened to fp32."""
    xt, r = _tile_xr(x_ptr, B, D, sxb, sxd, bidx, rk, t64, tlim, base, col0, BLOCK_D, BLOCK_K, MA, MB, G)
    xf = xt.to(tl.float32)
    hi = xf.to(tl.bfloat16)
    r1 = xf - hi.to(tl.float32)
    mid = r1.to(tl.bfloat16)
    lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
    rb = r.to(tl.bfloat16)
    if IEEE:
        return hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32), rb.to(tl.float32)
    return hi, mid, lo, rb


@triton.jit
def _dot(a, b, c, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, c, input_precision="ieee")
    return tl.dot(a, b, c)


@triton.jit
def _flat_fp32acc(x_ptr, part_ptr, B, D, K, sxb, sxd, seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split,
                  inv_bits, ACC: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_K: tl.constexpr,
                  BLOCK_D: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, RC: tl.constexpr, G: tl.constexpr):
    """fp32 x (MODE 2), Rademacher, R^T as the B operand. ACC 0: the shipped single in-place chain; 1: the
    chain restarted every GROUP tiles and added to the running sum in IEEE fp32; 2: hi in one accumulator,
    mid + lo in another (each chain's addends then sit at or above its accumulator's last bit far longer);
    3: three accumulators."""
    inv, col0, base, rows, bidx, rk, t0, t1 = _program(seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles, per_split,
                                                       inv_bits, BLOCK_B, BLOCK_K, MA, MB, RC)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    if ACC == 1:
        for g0 in range(t0, t1, GROUP):
            inner = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            for t in range(g0, tl.minimum(g0 + GROUP, t1)):
                hi, mid, lo, rb = _fp32_tile(x_ptr, B, D, sxb, sxd, bidx, rk, tl.cast(t, tl.int64), t1, base, col0,
                                             BLOCK_D, BLOCK_K, MA, MB, G, IEEE)
                inner = _dot(lo, rb, inner, IEEE)
                inner = _dot(mid, rb, inner, IEEE)
                inner = _dot(hi, rb, inner, IEEE)
            acc += inner
    else:
        for t in range(t0, t1):
            hi, mid, lo, rb = _fp32_tile(x_ptr, B, D, sxb, sxd, bidx, rk, tl.cast(t, tl.int64), t1, base, col0,
                                         BLOCK_D, BLOCK_K, MA, MB, G, IEEE)
            if ACC == 0:
                acc = _dot(hi, rb, acc, IEEE)
                acc = _dot(mid, rb, acc, IEEE)
                acc = _dot(lo, rb, acc, IEEE)
            elif ACC == 2:
                acc = _dot(hi, rb, acc, IEEE)
                acc2 = _dot(mid, rb, acc2, IEEE)
                acc2 = _dot(lo, rb, acc2, IEEE)
            else:
                acc = _dot(hi, rb, acc, IEEE)
                acc2 = _dot(mid, rb, acc2, IEEE)
                acc3 = _dot(lo, rb, acc3, IEEE)
    _store_part(part_ptr, acc + (acc2 + acc3), inv, bidx, rows, B, K)


def flat_fp32acc(x, k, seed, acc, group, bk, bb, bd, warps, stages, sms=132):
    return _launch(_flat_fp32acc, x, k, seed, bk, bb, bd, warps, stages, sms, ACC=acc, GROUP=group,
                   IEEE=x.device.type == "cpu")


def library_flat(x, k, seed, tile=None):
    """gradkit's project_flat kernel (Rademacher, col0 0) with its GPU_FLAT tile replaced by tile = (BLOCK_K,
    BLOCK_B, BLOCK_D, warps, stages) for this call (None: as shipped)."""
    saved = dict(T.GPU_FLAT)
    if tile is not None:
        T.GPU_FLAT.update(zip(("k", "b", "d", "num_warps", "num_stages"), tile))
    try:
        return T.project_flat(x, k, seed, 0, 0)
    finally:
        T.GPU_FLAT.clear()
        T.GPU_FLAT.update(saved)


def _full_reference(x, k, seed, chunk=65_536):
    """x @ R^T over the whole D in float64, R generated chunk by chunk (the Triton generator, which
    bench_gpu.py checks against the CPU's bit for bit)."""
    out = torch.zeros(x.shape[0], k, dtype=torch.float64, device=x.device)
    for c0 in range(0, x.shape[1], chunk):
        c1 = min(c0 + chunk, x.shape[1])
        r = torch.empty(k, c1 - c0, dtype=torch.float32, device=x.device)
        T.projection_matrix_(r, seed, 0, k, 0, c0)
        out += x[:, c0:c1].double() @ r.double().T
    return out


def accuracy(a, dev, k, D, batches, xs, seed, sms, path):
    """fp32 x over the full D: relative error against float64 and time, per accumulation variant."""
    rows = []
    # the shipped tile, and (128, 64, 64), which spills least for every ACC (sm_90 compile here: 8-360
    # stack bytes against 760-1680)
    tiles = [(64, 16, 64, 4, 3)] if a.smoke else [(128, 64, 128, 4, 3), (128, 64, 64, 4, 3)]
    variants = [(0, 1), (1, 8), (1, 32), (2, 1), (3, 1)] + ([(1, 3)] if a.smoke else [])
    if a.smoke:  # programs of 8 tiles (D = 2000, one 'SM'): whole and partial groups
        sms = 1
        xs = {B: [(torch.randn(B, 2000, generator=torch.Generator().manual_seed(B)), "float32")] for B in batches}
    # the library kernel itself (MODE 2, ALIGNED) at its GPU_FLAT tile and at (128, 64, 64, 4, 3), where it does
    # not spill for sm_90 (185 registers, no stack, against 255 and 120 stack bytes: GPU-NOTES, session 16)
    lib_tiles = [None] if a.smoke else [None, (128, 64, 64, 4, 3)]
    with open(path, "w") as fh:
        def measure(B, variant, tile, f, want):
            """One row: f()'s full-D error against float64, then (on a GPU, when within 1e-3) its time."""
            row = {"B": B, "dtype": "float32", "variant": variant, "tile": tile}
            try:
                row["err_full_f64"] = _rel(f(), want)
                row["ok"] = row["err_full_f64"] <= (1e-6 if a.smoke else 1e-3)
                if row["ok"] and not a.smoke:
                    row["ms"] = triton.testing.do_bench(f, warmup=20, rep=60, return_mode="median")
                    row["tflops"] = 2 * B * D * k / row["ms"] / 1e9
            except Exception as e:
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(f"accuracy B={B} {row['variant']}: err {row.get('err_full_f64', float('nan')):.2e} "
                  f"{row.get('ms', 0):.3f} ms {row.get('tflops', 0):.1f} TFLOP/s {row.get('error', '')}", flush=True)

        for B in batches:
            x = next(x for x, dt in xs[B] if dt == "float32")
            want = _full_reference(x, k, seed)
            for tile in lib_tiles:
                name = "library project_flat" + ("" if tile is None else " k{} b{} d{} w{} s{}".format(*tile))
                measure(B, name, tile, lambda: library_flat(x, k, seed, tile), want)
            for tile, (acc, group) in [(t, v) for t in tiles for v in variants]:
                bk, bb, bd, w, s = tile
                measure(B, f"acc{acc} group{group} k{bk} b{bb} d{bd}", tile,
                        lambda: flat_fp32acc(x, k, seed, acc, group, bk, bb, bd, w, s, sms), want)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} accuracy rows, {len(bad)} not ok; wrote {path}")
    return 1 if bad else 0


def _matrix(k, cols, seed, dev):
    out = torch.empty(k, cols, dtype=torch.float32, device=dev)
    T.projection_matrix_(out, seed, 0, k, 0, 0)
    return out


def _rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def peer_rows(xs, k, D, Rs, ds):
    """TRAK's CudaProjector (fast_jl 0.1.3, its own +-1 matrix; checked for the JL scale only: its matrix is
    not gradkit's) on the same x, per dtype it accepts."""
    try:
        from trak.projectors import CudaProjector, ProjectionType
        import fast_jl  # noqa: F401
    except Exception as e:
        print(f"fast_jl unavailable: {type(e).__name__}: {e}", flush=True)
        return [{"variant": "trak fast_jl", "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}]
    rows = []
    for B, pairs in xs.items():
        for x, dt in pairs:
            row = {"B": B, "dtype": dt, "variant": "trak fast_jl"}
            try:
                proj = CudaProjector(grad_dim=D, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                                     device=x.device, max_batch_size=32)
                xin = x.to(torch.float16) if x.dtype == torch.bfloat16 else x  # fast_jl takes fp16 / fp32 only
                y = proj.project(xin, model_id=0).float()
                # fast_jl's entries are +-1, unscaled: |y|^2 / |x|^2 is about k (JL with entries +-1/sqrt(k): 1)
                ratio = float((y.double().pow(2).sum(1) / x.double().pow(2).sum(1)).mean()) / k
                row.update(norm_ratio=ratio, input=str(xin.dtype),
                           ok=bool(torch.isfinite(y).all()) and 0.7 < ratio < 1.3)
                if row["ok"]:
                    ms = triton.testing.do_bench(lambda: proj.project(xin, model_id=0), warmup=20, rep=60,
                                                 return_mode="median")
                    row.update(ms=ms, tflops=2 * B * D * k / ms / 1e9)
            except Exception as e:
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"B={B:4d} {dt:8s} trak fast_jl {row.get('ms', 0):8.3f} ms {row.get('tflops', 0):7.1f} TFLOP/s "
                  f"{row.get('norm_ratio', '')} {row.get('error', '')}", flush=True)
            rows.append(row)
    return rows


def search_rows():
    """Top-10 of 1,000 queries over 1,000,000 x 256 fp32 keys: one mm + topk (the 4 GB score matrix) against
    the same products over key blocks with a running top-k (bounded memory), fp32 (no tf32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(5)
    keys = torch.randn(1_000_000, 256, device="cuda", generator=g)
    q = torch.randn(1000, 256, device="cuda", generator=g)

    def whole():
        return torch.topk(q @ keys.T, 10, dim=1)

    def blocked(bs):
        def f():
            best_s = best_i = None
            for s0 in range(0, keys.shape[0], bs):
                s, i = torch.topk(q @ keys[s0:s0 + bs].T, 10, dim=1)
                i = i + s0
                if best_s is not None:
                    s, j = torch.topk(torch.cat([best_s, s], 1), 10, dim=1)
                    i = torch.gather(torch.cat([best_i, i], 1), 1, j)
                best_s, best_i = s, i
            return best_s, best_i
        return f

    rows = []
    ref_s, ref_i = whole()
    for name, f in (("torch mm + topk (whole)", whole), ("blocked 131072", blocked(131072)),
                    ("blocked 262144", blocked(262144))):
        s, i = f()
        ok = bool(torch.equal(i, ref_i) or (s - ref_s).abs().max().item() <= 1e-4)
        ms = triton.testing.do_bench(f, warmup=20, rep=200, return_mode="median") if ok else None
        rows.append({"variant": f"search {name}", "ok": ok, "ms": ms})
        print(f"search {name}: ok {ok} {ms} ms", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new variant after this many seconds")
    ap.add_argument("--no-extras", action="store_true", help="variants only (no fast_jl / search rows)")
    ap.add_argument("--extras-only", action="store_true", help="fast_jl / search rows only")
    ap.add_argument("--trans", default=None, help="only these TRANS values (comma list; -1 = the library kernel)")
    ap.add_argument("--skip-trans", default="", help="leave out these TRANS values (comma list)")
    ap.add_argument("--max-tile", type=int, default=None, help="only the first N tile shapes")
    ap.add_argument("--stem", default=None, help="output file stem (default gpu-flat-variants / -extras)")
    ap.add_argument("--accuracy", action="store_true",
                    help="fp32 x: the shipped accumulation against the ACC variants, checked over the full D")
    a = ap.parse_args(argv)
    t_start = time.time()
    dev = "cpu" if a.smoke else "cuda"
    k, D = (64, 1100) if a.smoke else (2048, 1_048_576)  # smoke: 18 or 9 tiles, 5 or 3 per program (one SM)
    seed = 0
    stem = a.stem or ("gpu-flat-extras" if a.extras_only else "gpu-flat-variants")
    path = os.path.join(a.out, stem + ("-smoke" if a.smoke else "") + ".jsonl")
    os.makedirs(a.out, exist_ok=True)
    fh = open(path, "w")
    env = {"torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (TRITON_INTERPRET)"}
    fh.write(json.dumps({"env": env}) + "\n")
    print(env, flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    ds = min(D, 65_536)
    Rs = _matrix(k, ds, seed, dev).double()
    if a.smoke:
        tiles = [(32, 16, 64, 4, 3), (64, 16, 128, 4, 3)]
        batches, modes = (5, 19), (0,)
    else:
        # (128, 256, *) tiles spill hundreds of bytes for sm_90 (cuobjdump -res-usage of a local compile): left out
        tiles = [(128, 64, 128, 4, 3), (128, 128, 64, 4, 3), (256, 64, 64, 8, 3), (128, 128, 64, 8, 3),
                 (256, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 64, 128, 8, 4)]
        batches, modes = (64, 512), (None,)
    rows = []
    xs = {}
    for B in batches:
        g = torch.Generator(device=dev).manual_seed(B)
        x32 = torch.randn(B, D, device=dev, generator=g)
        xs[B] = [(x32, "float32")] if a.smoke else [(x32.to(torch.bfloat16), "bfloat16"), (x32, "float32")]
    plan = []  # most informative first: the shipped tiles, every (GEN, TRANS), both dtypes and batches
    for ti, tile in enumerate(tiles):
        for B in batches:
            for x, dt in xs[B]:
                for gen, trans in ((0, 0), (0, -1), (0, 6), (0, 7), (0, 3), (0, 4), (0, 2), (0, 1), (1, 0), (1, 1)):
                    if trans == -1 and (ti != 0 or a.smoke):
                        continue  # the library kernel has its own tiles: one row per batch and dtype
                    if trans == 4 and not (tile[1] == 128 and tile[3] == 4) and not a.smoke:
                        continue  # see _flat_tma: warp specialisation only splits a 128-row B tile, 4 warps
                    if trans in (6, 7) and (a.smoke or tile[0] != 128 or (trans == 6 and dt != "bfloat16")):
                        continue  # Gluon: no interpreter; BLOCK_K 128 (256 runs out of registers); fp32 x: TRANS 7
                    for mode in modes:
                        plan.append((ti, tile, B, x, dt, gen, trans, mode))
    # the rows added in session 15 first (the library kernel with ALIGNED, TRANS 6, TRANS 3, TRANS 4), so that the
    # time budget cannot cut them; then the rest in the order above
    keep = None if a.trans is None else {int(v) for v in a.trans.split(",")}
    skip = {int(v) for v in a.skip_trans.split(",") if v}
    plan = [p for p in plan if (keep is None or (p[6] in keep and p[5] == 0)) and p[6] not in skip
            and (a.max_tile is None or p[0] < a.max_tile)]  # --trans: GEN 0 rows only
    first = [p for p in plan
             if p[5] == 0 and ((p[0] == 0 and p[6] in (0, -1, 6, 7, 3)) or (p[0] == 1 and p[6] in (0, 4, 6, 7)))]
    plan = first + [p for p in plan if not any(p is q for q in first)]
    if a.accuracy:
        fh.close()
        return accuracy(a, dev, k, D, batches, xs, seed, sms,
                        os.path.join(a.out, "gpu-flat-accuracy" + ("-smoke" if a.smoke else "") + ".jsonl"))
    baseline = {}
    for ti, tile, B, x, dt, gen, trans, mode in ([] if a.extras_only else plan):
        if time.time() - t_start > a.budget_s:
            print(f"budget reached: {len(rows)} rows", flush=True)
            break
        bk, bb, bd, w, s = tile
        name = "library project_flat" if trans == -1 else f"gen{gen} trans{trans} k{bk} b{bb} d{bd} w{w} s{s}"
        row = {"B": B, "dtype": dt, "variant": name, "gen": gen, "trans": trans, "tile": tile}
        try:
            f = lambda: flat_variant(x, k, seed, gen, trans, bk, bb, bd, w, s, mode, sms)  # noqa: E731
            head = flat_variant(x[:, :ds].contiguous(), k, seed, gen, trans, bk, bb, bd, w, s, mode, sms)
            err = _rel(head, x[:, :ds].double() @ Rs.T)
            full = f()
            key = (B, dt)
            if key not in baseline and gen == 0 and trans == 0 and ti == 0:
                baseline[key] = full
            vs = _rel(full, baseline[key]) if key in baseline else None
            row.update(err_f64=err, rel_vs_shipped=vs)
            # the Gluon fp32 path sums each tile apart (IEEE adds), the shipped chain in place: over the full D at
            # B = 512 two shipped-kernel tilings already differ by 2.9e-4 (session 14), so allow that against it
            vs_tol = 5e-4 if trans in (6, 7) and dt == "float32" else 1e-4
            row["vs_tol"] = vs_tol
            ok = err <= 1e-4 and (vs is None or vs <= vs_tol)
            row["ok"] = ok
            if ok and not a.smoke:
                ms = triton.testing.do_bench(f, warmup=20, rep=60, return_mode="median")
                row.update(ms=ms, tflops=2 * B * D * k / ms / 1e9)
        except Exception as e:  # a variant that does not compile on this Triton: recorded, the rest go on
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        print(f"B={B:4d} {dt:8s} {name:34s} err {row.get('err_f64', float('nan')):.2e} "
              f"vs {row.get('rel_vs_shipped', -1) if row.get('rel_vs_shipped') is not None else -1:.1e} ok {row['ok']} "
              f"{row.get('ms', 0):8.3f} ms {row.get('tflops', 0):7.1f} TFLOP/s {row.get('error', '')}", flush=True)
    if not a.smoke and not a.no_extras:
        for row in peer_rows(xs, k, D, Rs, ds):
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        for row in search_rows():
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
    fh.close()
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} rows, {len(bad)} not ok; wrote {path} ({time.time() - t_start:.0f} s)")
    if not a.smoke:
        for B in batches:
            for dt in ("bfloat16", "float32"):
                best = sorted((r for r in rows if r.get("B") == B and r.get("dtype") == dt and r.get("ms")),
                              key=lambda r: r["ms"])[:3]
                for r in best:
                    print(f"best B={B} {dt}: {r['variant']} {r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s")
    return 1 if a.smoke and bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Triton kernels for the golden family: the per-sample golden update (top-k of |g| ANDed into
a packed bitmask) and packed-bitmask algebra. Semantics are exactly those of
``gradkit.kernels.reference.golden``; every public function has the schema's positional
signature (csrc/ops.cpp) and return value. On machines without a GPU these run on CPU tensors
under ``TRITON_INTERPRET=1``.

Bitmasks are packed little-endian: bit ``j`` of byte ``i`` is element ``8*i + j``; padding bits
of the last byte are 0 on input and output.

Design
------
* **golden_topk_and_** is an exact radix select, never a sort, with no host sync (so it can be
  captured in a CUDA graph). ``|g|`` maps to an order-preserving unsigned key read from the raw
  bits: ``key = (bits & ~sign) + 1``, and NaN -> ``0`` (below every number, so the select runs
  over all ``numel`` keys for every ``1 <= k <= numel`` and NaN can still be skipped at the end).
  ``-0.0`` and ``+0.0`` share a key. float16/bfloat16 use 16-bit keys (2 passes of 8-bit digits),
  float32 32-bit keys (4 passes), float64 64-bit keys (8 passes). Each pass is a per-program
  ``tl.histogram`` of the digit over the keys that match the digits fixed so far, summed into a
  256-bin histogram with one vector atomic add per program, then parammap's one-program walk
  kernel (``_topk_walk_kernel``) picks the digit of the k-th largest key and how many of its ties
  are still needed; digits and ``need`` stay on the device. Afterwards a count kernel gives the
  number of keys equal to the k-th key (``kth``) per block, a device cumsum makes that an
  exclusive prefix over blocks, and ONE fused kernel per block of ``BLOCK`` elements (whole
  bytes of ``bits``) selects ``key != 0 and (key > kth or (key == kth and tie rank <= need))``
  (tie rank = ties before the block + in-block cumsum, i.e. lowest position first), packs the
  selection into bytes (ANDed with the old bytes unless ``first``), adds it to ``counts`` and
  atomically adds the popcount of the new bytes to the 0-dim result.
  ``k == 0`` and ``k == numel`` skip the passes and the count (``kth`` = all ones: nothing
  selected; ``kth`` = 0 with ``need`` = 0: every non-NaN entry selected).
* **bitmask_binary / bitmask_not / bitmask_count** are one launch per call over all tensors of
  the list: a small int64 table (one row per tensor: input/output addresses, the last byte's
  valid-bit mask, byte count, output slot; one work row per block of ``BLOCK`` bytes, built by
  parammap's ``_work_rows``) goes to the device in one transfer and the kernel casts the
  addresses in-kernel (as parammap's gather does). Elementwise work is per byte; popcount is
  the SWAR bit trick on bytes, reduced per program and added atomically into the tensor's slot.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from gradkit.kernels.triton.parammap import (_HIST_DTYPE, _KEYS, _META_COLS, _topk_prefix, _topk_walk_kernel,
                                             _work_item, _work_rows)

# Elements per program of the select count/write kernels (a multiple of 8: whole bytes of bits),
# histogram programs cover HIST_ITERS such blocks, bytes per program of the bitmask kernels.
# Tests shrink these to exercise the multi-block paths on tiny inputs.
BLOCKS = {"select": 4096, "hist_iters": 4, "bitmask": 4096}

# raw-bits dtype torch views g as, per float dtype
_RAW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _abs_keys(g_ptr, offs, m, KT: tl.constexpr, INF: tl.constexpr):
    """Order-preserving unsigned keys of |g| at ``offs``: magnitude bits + 1; NaN and lanes
    outside ``m`` -> 0 (``g_ptr`` points at the raw bits as signed ints of KT's width)."""
    u = tl.load(g_ptr + offs, mask=m, other=0).to(KT, bitcast=True)
    mag = u & ((tl.full([], 1, KT) << (KT.primitive_bitwidth - 1)) - 1)
    return tl.where(m & (mag <= tl.full([], INF, KT)), mag + 1, tl.zeros_like(mag))


@triton.jit
def _popcount8(x):
    """Set bits of each byte value in ``x`` (int32 in [0, 255]): SWAR bit trick."""
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


# --------------------------------------------------------------------------- golden_topk_and_ kernels


@triton.jit(do_not_specialize=["npass"])
def _golden_hist_kernel(g_ptr, n, hist_ptr, digits_ptr, npass, KT: tl.constexpr, INF: tl.constexpr,
                        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # 256-bin histogram of digit ``npass`` of the keys (NaN included, as key 0) that match the
    # digits fixed so far, over ITERS consecutive blocks of BLOCK elements.
    prefix, pmask = _topk_prefix(digits_ptr, npass, KT)
    shift = tl.cast(KT.primitive_bitwidth - 8 * (npass + 1), KT)
    h = tl.zeros([256], tl.int32)
    for i in range(ITERS):
        offs = (tl.program_id(0).to(tl.int64) * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        key = _abs_keys(g_ptr, offs, m, KT, INF)
        h += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=m & ((key & pmask) == prefix))
    tl.atomic_add(hist_ptr + tl.arange(0, 256), h.to(tl.int64), mask=h > 0)  # int64 bins: n may pass 2^31


@triton.jit
def _golden_ties_kernel(g_ptr, n, digits_ptr, eq_ptr, NPASS: tl.constexpr, KT: tl.constexpr, INF: tl.constexpr,
                        BLOCK: tl.constexpr):
    # eq[pid] = keys == kth among this block's elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    kth, _ = _topk_prefix(digits_ptr, NPASS, KT)
    key = _abs_keys(g_ptr, offs, m, KT, INF)
    tl.store(eq_ptr + tl.program_id(0), tl.sum((m & (key == kth)).to(tl.int32)))


@triton.jit
def _golden_write_kernel(g_ptr, n, bits_ptr, counts_ptr, digits_ptr, need_ptr, eq_before_ptr, pop_ptr,
                         NPASS: tl.constexpr, KT: tl.constexpr, INF: tl.constexpr, FIRST: tl.constexpr,
                         HAS_COUNTS: tl.constexpr, BYTES: tl.constexpr):
    # The selection of BYTES * 8 consecutive elements, as a [BYTES, 8] tile (row = one byte of bits,
    # column = bit). A tie's in-block rank (1-based, position order) = ties in earlier rows of the
    # tile + ties up to it in its row; this block may take need - (ties in earlier blocks) of them.
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    offs = byte[:, None] * 8 + bit[None, :]
    m = offs < n
    kth, _ = _topk_prefix(digits_ptr, NPASS, KT)
    key = _abs_keys(g_ptr, offs, m, KT, INF)
    tie = (key == kth).to(tl.int32)
    row = tl.sum(tie, axis=1)
    rank = (tl.cumsum(row, 0) - row)[:, None] + tl.cumsum(tie, axis=1)
    take = tl.minimum(tl.maximum(tl.load(need_ptr + NPASS) - tl.load(eq_before_ptr + pid), 0), BYTES * 8)
    sel = (key != 0) & ((key > kth) | ((tie != 0) & (rank <= take.to(tl.int32))))
    packed = tl.sum(sel.to(tl.int32) << bit[None, :], axis=1)
    bm = byte * 8 < n  # == byte < ceil(n / 8), without n + 7 (wraps in int32 for n > 2^31 - 8)
    if not FIRST:
        packed = packed & tl.load(bits_ptr + byte, mask=bm, other=0).to(tl.int32)
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=bm)
    if HAS_COUNTS:
        c = tl.load(counts_ptr + offs, mask=sel, other=0)
        tl.store(counts_ptr + offs, c + 1, mask=sel)
    tl.atomic_add(pop_ptr, tl.sum(_popcount8(packed)).to(tl.int64))


# --------------------------------------------------------------------------- golden_topk_and_


def golden_topk_and_(g: torch.Tensor, bits: torch.Tensor, counts: Optional[torch.Tensor], k: int,
                     first: bool) -> torch.Tensor:
    """One golden update of ``bits`` (and ``counts``) in place; returns the new popcount (int64, 0-dim).

    g: contiguous float tensor; bits: (ceil(numel/8),) uint8; counts: None or int32 of g's numel;
    0 <= k <= numel (gradkit.ops.check_golden_topk_and_: op wrapper, CUDA kernel).
    """
    n, k, dev = g.numel(), int(k), g.device
    pop = torch.zeros((), dtype=torch.int64, device=dev)
    if n == 0:
        return pop
    kt, inf_bits = _KEYS[g.dtype]
    npass = kt.primitive_bitwidth // 8
    raw = g.reshape(-1).view(_RAW[g.dtype])
    block, iters = BLOCKS["select"], BLOCKS["hist_iters"]
    nb = triton.cdiv(n, block)
    # digits (npass) | need (npass + 1): need[p] = ties of the k-th key still needed before pass p
    state = torch.zeros(2 * npass + 1, dtype=torch.int64, device=dev)
    if 0 < k < n:
        state[npass] = k
        hist = torch.zeros(npass * 256, dtype=_HIST_DTYPE, device=dev)
        for p in range(npass):
            _golden_hist_kernel[(triton.cdiv(n, block * iters),)](raw, n, hist[p * 256:], state, p, KT=kt,
                                                                   INF=inf_bits, BLOCK=block, ITERS=iters)
            _topk_walk_kernel[(1,)](hist[p * 256:], state[:npass], state[npass:], p)
        eq = torch.empty(nb, dtype=torch.int32, device=dev)
        _golden_ties_kernel[(nb,)](raw, n, state, eq, NPASS=npass, KT=kt, INF=inf_bits, BLOCK=block)
        eq_before = torch.cumsum(eq, 0, dtype=torch.int64) - eq
    else:  # k == 0: kth = all ones, above every key; k == n: kth = 0 (NaN), need = 0
        if k == 0:
            state[:npass] = 255
        eq_before = torch.zeros(nb, dtype=torch.int64, device=dev)
    _golden_write_kernel[(nb,)](raw, n, bits, bits if counts is None else counts, state, state[npass:], eq_before,
                                pop, NPASS=npass, KT=kt, INF=inf_bits, FIRST=bool(first),
                                HAS_COUNTS=counts is not None, BYTES=block // 8)
    return pop


# --------------------------------------------------------------------------- bitmask algebra


@triton.jit
def _bitmask_binary_kernel(meta_ptr, work_ptr, OP: tl.constexpr, BLOCK: tl.constexpr):
    row, _, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    a = tl.load(tl.load(row).to(tl.pointer_type(tl.uint8)) + offs, mask=m)
    b = tl.load(tl.load(row + 1).to(tl.pointer_type(tl.uint8)) + offs, mask=m)
    if OP == 0:
        r = a & b
    elif OP == 1:
        r = a | b
    elif OP == 2:
        r = a ^ b
    else:
        r = a & ~b
    tl.store(tl.load(row + 2).to(tl.pointer_type(tl.uint8)) + offs, r, mask=m)


@triton.jit
def _bitmask_not_kernel(meta_ptr, work_ptr, BLOCK: tl.constexpr):
    # ~a, with the last byte ANDed with its valid-bit mask (row[3]).
    row, _, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    a = tl.load(tl.load(row).to(tl.pointer_type(tl.uint8)) + offs, mask=m)
    last = tl.load(row + 3).to(tl.uint8)
    r = tl.where(offs == tl.load(row + 4) - 1, ~a & last, ~a)
    tl.store(tl.load(row + 2).to(tl.pointer_type(tl.uint8)) + offs, r, mask=m)


@triton.jit
def _bitmask_count_kernel(meta_ptr, work_ptr, out_ptr, BLOCK: tl.constexpr):
    # out[slot] += set bits of this block of the tensor.
    row, slot, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    a = tl.load(tl.load(row).to(tl.pointer_type(tl.uint8)) + offs, mask=m, other=0).to(tl.int32)
    tl.atomic_add(out_ptr + slot, tl.sum(_popcount8(a)).to(tl.int64))


def _bitmask_plan(rows: List[List[int]], device: torch.device):
    """The one host->device int64 table of a bitmask launch: rows (S x 6: [a address, b address,
    out address, last-byte mask, bytes, slot]) then work rows (W x 3); returns (meta, work, W)."""
    block = BLOCKS["bitmask"]
    work = _work_rows([r[4] for r in rows], [r[5] for r in rows], block)
    host = torch.cat([torch.tensor(rows, dtype=torch.int64).reshape(-1), work.reshape(-1)])
    buf = host if device.type == "cpu" else host.to(device)
    s = len(rows) * _META_COLS
    return buf[:s], buf[s:], work.shape[0]


def _addr(t: torch.Tensor) -> int:
    return t.data_ptr() if t.numel() else 0


def bitmask_binary(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], op: int) -> List[torch.Tensor]:
    out = [torch.empty_like(x) for x in a]
    if not out:
        return out
    rows = [[_addr(x), _addr(y), _addr(o), 0, x.numel(), i] for i, (x, y, o) in enumerate(zip(a, b, out))]
    meta, work, nw = _bitmask_plan(rows, a[0].device)
    if nw:
        _bitmask_binary_kernel[(nw,)](meta, work, OP=int(op), BLOCK=BLOCKS["bitmask"])
    return out


def bitmask_not(a: Sequence[torch.Tensor], numel: Sequence[int]) -> List[torch.Tensor]:
    out = [torch.empty_like(x) for x in a]
    if not out:
        return out
    rows = [[_addr(x), 0, _addr(o), (1 << (int(n) % 8)) - 1 if int(n) % 8 else 255, x.numel(), i]
            for i, (x, o, n) in enumerate(zip(a, out, numel))]
    meta, work, nw = _bitmask_plan(rows, a[0].device)
    if nw:
        _bitmask_not_kernel[(nw,)](meta, work, BLOCK=BLOCKS["bitmask"])
    return out


def bitmask_count(bits: Sequence[torch.Tensor]) -> torch.Tensor:
    if not len(bits):
        return torch.zeros(0, dtype=torch.int64)
    out = torch.zeros(len(bits), dtype=torch.int64, device=bits[0].device)
    meta, work, nw = _bitmask_plan([[_addr(x), 0, 0, 0, x.numel(), i] for i, x in enumerate(bits)], bits[0].device)
    if nw:
        _bitmask_count_kernel[(nw,)](meta, work, out, BLOCK=BLOCKS["bitmask"])
    return out


# --------------------------------------------------------------------------- sm_90 compile check


def record_aot_cases() -> None:
    """Representative calls of every kernel variant on tiny CPU tensors (run under the recording
    interpreter of scripts/triton_aot_check.py): every float dtype, first True/False, counts None /
    present, ties, NaN, k in {0, some, numel}, every bitmask op, empty and odd-sized masks."""
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randint(-4, 5, (7, 11), generator=g).to(dt)  # ties
        x[0, 3] = float("nan")
        n = x.numel()
        bits = torch.zeros((n + 7) // 8, dtype=torch.uint8)
        counts = torch.zeros(7, 11, dtype=torch.int32)
        for k, first, cnt in ((9, True, counts), (30, False, None), (0, False, counts), (n, False, None),
                              (n, True, None), (n - 1, True, counts)):
            golden_topk_and_(x, bits, cnt, k, first)
    masks = [torch.randint(0, 256, (s,), dtype=torch.uint8, generator=g) for s in (5, 0, 13)]
    others = [torch.randint(0, 256, (s,), dtype=torch.uint8, generator=g) for s in (5, 0, 13)]
    for op in range(4):
        bitmask_binary(masks, others, op)
    bitmask_not(masks, [37, 0, 100])
    bitmask_count(masks)

"""Triton kernels for the param-map family (the GPU backend where gradkit was built
without CUDA C++). Semantics are exactly those of ``gradkit.kernels.reference.parammap``;
every public function here has the reference's positional signature and return value.

On machines without a GPU these run on CPU tensors under ``TRITON_INTERPRET=1``.

Design
------
* **gather / scatter: one launch for all segments.** The host builds, per call, a
  small int64 table that is copied to the device in one transfer:

  - a per-segment row ``[data address, numel, index address, flags, count, offset]``
    where ``flags = dtype code | has_index << 4 | index_is_int64 << 5`` and ``offset``
    is the segment's position in the flat vector;
  - a work table, one row ``[segment, start, offset]`` per block of ``BLOCK`` flat
    elements (built with vectorised torch ops, no Python loop over blocks);
  - a slot for ``scale`` (float64 bits) and an error flag.

  The kernel loads the segment's address from the table and casts it in-kernel
  (``tl.load(row).to(tl.pointer_type(T))``); the source/destination dtype and the
  index dtype are runtime per-segment branches (uniform per program, so no
  divergence), so mixed dtypes still take ONE launch. Pointer tables work under
  ``TRITON_INTERPRET=1`` for CPU tensors because the interpreter dereferences raw
  host addresses (CPU storages are not copied by the interpreter).
* **dtype conversions match torch bit for bit**: float64 -> float16/bfloat16 goes
  through float32 (this is what torch's ``.to`` does), and bfloat16 is handled as
  raw uint16 bits with an explicit round-to-nearest-even (the interpreter's own
  bf16 casts truncate). ``gather_segments_out(accumulate=True)`` adds
  ``cast(src)`` to ``out`` in float32 (float64 for a float64 ``out``), which is
  what ``out.add_`` computes. ``scatter_segments`` scales in the "opmath" type
  (float32 with a float32 scale, float64 for float64 ``flat``) like ``flat * scale``;
  ``scatter_segments_`` computes ``dst + scale * flat`` in float64, like the
  reference. The scatter kernel is launched with ``enable_fp_fusion=False`` so the
  GPU compiler does not contract that multiply+add into an FMA (which would change
  the last bit against the CPU kernels and the reference).
* **Non-contiguous tensors**: a non-contiguous ``src`` is gathered from a
  contiguous copy; a non-contiguous ``dst`` is scattered into a contiguous copy
  that is written back with ``copy_`` (one extra copy per such tensor).
* **Indices** are never used to address memory out of range: an index outside
  ``[0, numel)`` is masked off and sets an error flag, after which the call raises
  ``IndexError`` (like the C++ CPU kernel; note the reference wraps negative
  indices Python-style, these kernels and the C++ ones reject them). Checking the
  flag costs one device sync per gather/scatter that has an index; it is skipped
  while a CUDA graph is being captured, or when ``CHECK_INDEX`` is set to False.
* **mask / bitmask -> indices**: a per-block count kernel, an exclusive cumsum on the
  device, then a per-block write kernel (in-block ranks by ``tl.cumsum``).
* **topk_select** is an exact radix select, never a sort: scores are mapped to
  order-preserving unsigned keys (-0.0 and +0.0 map to the same key; inactive
  entries get key 0, below every real key), float16/bfloat16 use 16-bit keys
  (2 passes), float32 32-bit keys (4 passes), float64 64-bit keys (8 passes) of
  8-bit digits. Each pass is a ``tl.histogram`` per block, summed into a 256-bin
  histogram with one vector atomic add per block, followed by a one-program
  "walk" kernel that picks the digit of the k-th largest key and updates how
  many of its ties are still needed. The digits stay on the device, so the passes
  need no host sync. A final count kernel + device cumsum + write kernel emits
  every position with key > kth and the first ``need`` positions with key == kth
  in position order. NaN among the active scores (inactive NaN is ignored, like
  the reference) and the range of ``k`` are checked from per-block counts
  produced by the key kernel (one sync).
"""
from __future__ import annotations

import struct
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

# Elements (bytes for "pack") handled by one program. Tests shrink these to
# exercise the multi-block paths on tiny inputs.
BLOCKS = {"gather": 1024, "scatter": 1024, "zero": 1024, "mask": 2048, "pack": 256, "topk": 4096}

# Raise IndexError for out-of-range indices (costs one device sync per gather/scatter with indices).
CHECK_INDEX = True

_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_META_COLS = 6
_WORK_COLS = 3


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _bf16_bits_to_f32(b):
    return (b.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_bits(x):
    # Round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's conversion).
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16)


@triton.jit
def _load_wide(addr, pos, mask, code, WIDE: tl.constexpr):
    """Load element ``pos`` of the tensor at int64 address ``addr`` with dtype ``code``, as WIDE."""
    if code == 0:
        v = tl.load(addr.to(tl.pointer_type(tl.float32)) + pos, mask=mask, other=0.0).to(WIDE)
    elif code == 1:
        v = tl.load(addr.to(tl.pointer_type(tl.float64)) + pos, mask=mask, other=0.0).to(WIDE)
    elif code == 2:
        v = tl.load(addr.to(tl.pointer_type(tl.float16)) + pos, mask=mask, other=0.0).to(WIDE)
    else:
        b = tl.load(addr.to(tl.pointer_type(tl.uint16)) + pos, mask=mask, other=0)
        v = _bf16_bits_to_f32(b).to(WIDE)
    return v


@triton.jit
def _store_wide(addr, pos, v, mask, code):
    """Store WIDE values ``v`` rounded (like torch's ``.to``) to dtype ``code`` at ``addr``."""
    if code == 0:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + pos, v.to(tl.float32), mask=mask)
    elif code == 1:
        tl.store(addr.to(tl.pointer_type(tl.float64)) + pos, v.to(tl.float64), mask=mask)
    elif code == 2:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + pos, v.to(tl.float32).to(tl.float16), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.uint16)) + pos, _f32_to_bf16_bits(v.to(tl.float32)), mask=mask)


@triton.jit
def _round_as(v, CODE: tl.constexpr):
    """Round WIDE values to dtype CODE and widen them back (exact for CODE 0/1 with a matching WIDE)."""
    if CODE == 2:
        r = v.to(tl.float32).to(tl.float16).to(v.dtype)
    elif CODE == 3:
        r = _bf16_bits_to_f32(_f32_to_bf16_bits(v.to(tl.float32))).to(v.dtype)
    else:
        r = v
    return r


@triton.jit
def _segment_positions(row_ptr, offs, m, flag_ptr):
    """Positions inside the segment for flat offsets ``offs`` (masked by ``m``); returns (pos, in_range)."""
    numel = tl.load(row_ptr + 1)
    flags = tl.load(row_ptr + 3)
    if ((flags >> 4) & 1) != 0:
        iaddr = tl.load(row_ptr + 2)
        if ((flags >> 5) & 1) != 0:
            ix = tl.load(iaddr.to(tl.pointer_type(tl.int64)) + offs, mask=m, other=0)
        else:
            ix = tl.load(iaddr.to(tl.pointer_type(tl.int32)) + offs, mask=m, other=0).to(tl.int64)
        ok = (ix >= 0) & (ix < numel)
        nbad = tl.sum((m & ~ok).to(tl.int32))
        tl.store(flag_ptr, 1, mask=nbad > 0)
        pos = tl.where(ok, ix, 0)
        lm = m & ok
    else:
        pos = offs
        lm = m
    return pos, lm


# --------------------------------------------------------------------------- gather / scatter kernels


@triton.jit
def _work_item(meta_ptr, work_ptr, BLOCK: tl.constexpr):
    """This program's work row -> (segment table row, flat offset, in-segment positions, mask)."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(work_ptr + pid * 3)
    start = tl.load(work_ptr + pid * 3 + 1)
    ooff = tl.load(work_ptr + pid * 3 + 2)
    row = meta_ptr + seg * 6
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return row, ooff, offs, offs < tl.load(row + 4)


@triton.jit
def _gather_kernel(meta_ptr, work_ptr, out_addr_ptr, flag_ptr, OUT_CODE: tl.constexpr, ACC: tl.constexpr,
                   WIDE: tl.constexpr, BLOCK: tl.constexpr):
    row, ooff, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    pos, lm = _segment_positions(row, offs, m, flag_ptr)
    code = tl.load(row + 3) & 15
    v = _round_as(_load_wide(tl.load(row), pos, lm, code, WIDE), OUT_CODE)
    out_addr = tl.load(out_addr_ptr)
    if ACC:
        v = v + _load_wide(out_addr, ooff + offs, m, OUT_CODE, WIDE)
    _store_wide(out_addr, ooff + offs, v, m, OUT_CODE)


@triton.jit
def _scatter_kernel(meta_ptr, work_ptr, flat_addr_ptr, flag_ptr, FLAT_CODE: tl.constexpr,
                    DST_CODE: tl.constexpr, ACC: tl.constexpr, HAS_SCALE: tl.constexpr,
                    WIDE: tl.constexpr, BLOCK: tl.constexpr):
    # DST_CODE >= 0: every destination has that dtype (scatter_segments); -1: per segment.
    row, ooff, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    pos, lm = _segment_positions(row, offs, m, flag_ptr)
    v = _load_wide(tl.load(flat_addr_ptr), ooff + offs, m, FLAT_CODE, WIDE)
    if HAS_SCALE:
        v = v * tl.load(flat_addr_ptr + 1).to(tl.float64, bitcast=True).to(WIDE)
    addr = tl.load(row)
    if DST_CODE >= 0:
        if ACC:
            v = v + _load_wide(addr, pos, lm, DST_CODE, WIDE)
        _store_wide(addr, pos, v, lm, DST_CODE)
    else:
        code = tl.load(row + 3) & 15
        if ACC:
            v = v + _load_wide(addr, pos, lm, code, WIDE)
        _store_wide(addr, pos, v, lm, code)


@triton.jit
def _zero_kernel(meta_ptr, work_ptr, ZT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(work_ptr + pid * 3)
    start = tl.load(work_ptr + pid * 3 + 1)
    row = meta_ptr + seg * 6
    numel = tl.load(row + 1)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(tl.load(row).to(tl.pointer_type(ZT)) + offs, tl.zeros([BLOCK], ZT), mask=offs < numel)


# --------------------------------------------------------------------------- host side of gather / scatter


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _work_rows(sizes: List[int], offsets: List[int], block: int) -> torch.Tensor:
    """[W, 3] int64 rows (segment, start, offset) covering ``sizes[s]`` elements of every segment."""
    if not sizes:
        return torch.empty(0, _WORK_COLS, dtype=torch.int64)
    n = torch.tensor(sizes, dtype=torch.int64)
    nblk = (n + block - 1) // block
    total = int(nblk.sum())
    seg = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), nblk)
    first = torch.cumsum(nblk, 0) - nblk
    start = (torch.arange(total, dtype=torch.int64) - first[seg]) * block
    off = torch.tensor(offsets, dtype=torch.int64)[seg]
    return torch.stack([seg, start, off], 1)


class _Plan:
    """The one host->device table of a gather/scatter launch.

    Layout of ``buf`` (int64): [tensor address, scale bits] | error flag | segment rows (S x 6) |
    work rows (W x 3) | extra work rows (W2 x 3).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], index: Sequence[Optional[torch.Tensor]],
                 main_addr: int, scale: float, block: int, zero_rows_for_indexed: int = 0):
        self.keep = []  # contiguous index copies that must outlive the launch
        rows, counts, offsets = [], [], []
        off = 0
        self.has_index = False
        zero_sizes, zero_offs = [], []
        for t, ix in zip(tensors, index):
            flags = _CODE[t.dtype]
            iaddr = 0
            if ix is not None:
                ixc = ix.contiguous()
                self.keep.append(ixc)
                iaddr = ixc.data_ptr() if ixc.numel() else 0
                flags |= 1 << 4
                if ixc.dtype == torch.int64:
                    flags |= 1 << 5
                self.has_index = True
                c = ixc.numel()
            else:
                c = t.numel()
            rows.append([t.data_ptr() if t.numel() else 0, t.numel(), iaddr, flags, c, off])
            counts.append(c)
            offsets.append(off)
            # Zero-fill (scatter_segments' new tensors): only indexed segments have unwritten positions.
            zero_sizes.append(t.numel() if (zero_rows_for_indexed and ix is not None) else 0)
            zero_offs.append(0)
            off += c
        self.total = off
        work = _work_rows(counts, offsets, block)
        zwork = _work_rows(zero_sizes, zero_offs, zero_rows_for_indexed or 1)
        self.n_work, self.n_zero = work.shape[0], zwork.shape[0]
        segt = torch.tensor(rows, dtype=torch.int64).reshape(-1)
        head = torch.tensor([main_addr, _f64_bits(scale), 0], dtype=torch.int64)
        host = torch.cat([head, segt, work.reshape(-1), zwork.reshape(-1)])
        self.n_seg = len(rows)
        self.host = host

    def to(self, device: torch.device) -> "_Plan":
        self.buf = self.host if device.type == "cpu" else self.host.to(device)
        b, s = self.buf, 3 + self.n_seg * _META_COLS
        self.head = b[0:2]
        self.flag = b[2:3]
        self.meta = b[3:s]
        self.work = b[s:s + self.n_work * _WORK_COLS]
        self.zwork = b[s + self.n_work * _WORK_COLS:]
        return self

    def check(self) -> None:
        if not (CHECK_INDEX and self.has_index and self.n_work):
            return
        if self.buf.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        if int(self.flag.item()) != 0:
            raise IndexError("index: a position is out of range for its segment")


def _wide(*dtypes: torch.dtype) -> tl.dtype:
    return tl.float64 if torch.float64 in dtypes else tl.float32


def _promote(src: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = src[0].dtype if len(src) else torch.float32
    for s in src[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return dtype


def _gather_into(src, index, out: torch.Tensor, accumulate: bool) -> None:
    srcs = [s if s.is_contiguous() else s.contiguous() for s in src]
    target = out if out.is_contiguous() else out.contiguous()
    block = BLOCKS["gather"]
    plan = _Plan(srcs, index, target.data_ptr() if target.numel() else 0, 1.0, block).to(out.device)
    if plan.n_work == 0:
        return
    _gather_kernel[(plan.n_work,)](plan.meta, plan.work, plan.head, plan.flag, OUT_CODE=_CODE[out.dtype],
                                   ACC=bool(accumulate), WIDE=_wide(out.dtype), BLOCK=block)
    plan.check()
    if target is not out:
        out.copy_(target)


def gather_segments(src: Sequence[torch.Tensor], index: Sequence[Optional[torch.Tensor]],
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if dtype is None:
        dtype = _promote(src)
    device = src[0].device if len(src) else torch.device("cpu")
    total = sum(s.numel() if i is None else i.numel() for s, i in zip(src, index))
    out = torch.empty(total, dtype=dtype, device=device)
    if total:
        _gather_into(src, index, out, False)
    return out


def gather_segments_out(src, index, out: torch.Tensor, accumulate: bool = False) -> None:
    if out.numel():
        _gather_into(src, index, out, accumulate)


def _scatter_into(flat: torch.Tensor, index, dst: Sequence[torch.Tensor], scale: float, accumulate: bool,
                  new: bool) -> None:
    f = flat if flat.is_contiguous() else flat.contiguous()
    block = BLOCKS["scatter"]
    zblock = BLOCKS["zero"] if new else 0
    plan = _Plan(dst, index, f.data_ptr() if f.numel() else 0, scale, block, zero_rows_for_indexed=zblock)
    plan.to(flat.device)
    if new and plan.n_zero:
        zt = {2: tl.int16, 4: tl.int32, 8: tl.int64}[flat.element_size()]
        _zero_kernel[(plan.n_zero,)](plan.meta, plan.zwork, ZT=zt, BLOCK=zblock)
    if plan.n_work == 0:
        return
    if new:  # `flat * scale` in flat's opmath type, stored in flat's dtype
        dst_code, wide, has_scale = _CODE[flat.dtype], _wide(flat.dtype), scale != 1.0
    else:  # the reference: (dst +) flat.double() * scale, then .to(dst.dtype)
        dst_code, wide, has_scale = -1, tl.float64, True
    _scatter_kernel[(plan.n_work,)](plan.meta, plan.work, plan.head, plan.flag, FLAT_CODE=_CODE[flat.dtype],
                                    DST_CODE=dst_code, ACC=bool(accumulate), HAS_SCALE=has_scale,
                                    WIDE=wide, BLOCK=block, enable_fp_fusion=False)
    plan.check()


def scatter_segments(flat: torch.Tensor, index: Sequence[Optional[torch.Tensor]],
                     numel: Sequence[int], scale: float = 1.0) -> List[torch.Tensor]:
    outs = [torch.empty(int(n), dtype=flat.dtype, device=flat.device) for n in numel]
    if outs:
        _scatter_into(flat, index, outs, float(scale), False, new=True)
    return outs


def scatter_segments_(flat: torch.Tensor, index, dst: Sequence[torch.Tensor],
                      scale: float = 1.0, accumulate: bool = False) -> None:
    if not len(dst):
        return
    work = [d if d.is_contiguous() else d.contiguous() for d in dst]
    _scatter_into(flat, index, work, float(scale), bool(accumulate), new=False)
    for d, w in zip(dst, work):
        if w is not d:
            d.copy_(w)


# --------------------------------------------------------------------------- selection encodings


@triton.jit
def _mask_count_kernel(m_ptr, n, cnt_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(m_ptr + offs, mask=offs < n, other=0)
    tl.store(cnt_ptr + pid, tl.sum((v != 0).to(tl.int32)))


@triton.jit
def _mask_write_kernel(m_ptr, n, start_ptr, out_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sel = tl.load(m_ptr + offs, mask=offs < n, other=0) != 0
    rank = tl.cumsum(sel.to(tl.int32), 0)
    base = tl.load(start_ptr + pid)
    tl.store(out_ptr + base + rank - 1, offs.to(out_ptr.dtype.element_ty), mask=sel)


@triton.jit
def _bits_at(bits_ptr, offs, nbits):
    inb = offs < nbits
    byte = tl.load(bits_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32)
    return ((byte >> (offs & 7).to(tl.int32)) & 1) != 0


@triton.jit
def _bitmask_count_kernel(bits_ptr, nbits, numel, cnt_ptr, nblocks, BLOCK: tl.constexpr):
    # cnt[pid] = set bits below numel; cnt[nblocks + pid] = set bits at or beyond numel.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = _bits_at(bits_ptr, offs, nbits)
    tl.store(cnt_ptr + pid, tl.sum((on & (offs < numel)).to(tl.int32)))
    tl.store(cnt_ptr + nblocks + pid, tl.sum((on & (offs >= numel)).to(tl.int32)))


@triton.jit
def _bitmask_write_kernel(bits_ptr, nbits, numel, start_ptr, out_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sel = _bits_at(bits_ptr, offs, nbits) & (offs < numel)
    rank = tl.cumsum(sel.to(tl.int32), 0)
    base = tl.load(start_ptr + pid)
    tl.store(out_ptr + base + rank - 1, offs.to(out_ptr.dtype.element_ty), mask=sel)


@triton.jit
def _pack_kernel(m_ptr, n, out_ptr, nbytes, BYTES: tl.constexpr):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    e = byte[:, None] * 8 + bit[None, :]
    v = (tl.load(m_ptr + e, mask=e < n, other=0) != 0).to(tl.int32)
    packed = tl.sum(v << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


def _scan_starts(counts: torch.Tensor):
    """Exclusive prefix sums of per-block counts (device) and the total (one sync)."""
    c = counts.to(torch.int64)
    incl = torch.cumsum(c, 0)
    return incl - c, incl


def mask_to_indices(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = mask.reshape(-1)
    m = (m if m.is_contiguous() else m.contiguous()).view(torch.uint8)
    n = m.numel()
    if n == 0:
        return torch.empty(0, dtype=dtype, device=mask.device)
    block = BLOCKS["mask"]
    nb = triton.cdiv(n, block)
    cnt = torch.empty(nb, dtype=torch.int32, device=mask.device)
    _mask_count_kernel[(nb,)](m, n, cnt, BLOCK=block)
    starts, incl = _scan_starts(cnt)
    total = int(incl[-1])
    out = torch.empty(total, dtype=dtype, device=mask.device)
    if total:
        _mask_write_kernel[(nb,)](m, n, starts, out, BLOCK=block)
    return out


def bitmask_to_indices(bits: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    b = bits.reshape(-1)
    b = b if b.is_contiguous() else b.contiguous()
    nbits = b.numel() * 8
    numel = int(numel)
    if nbits == 0:
        return torch.empty(0, dtype=dtype, device=bits.device)
    block = BLOCKS["mask"]
    nb = triton.cdiv(nbits, block)
    cnt = torch.empty(2 * nb, dtype=torch.int32, device=bits.device)
    _bitmask_count_kernel[(nb,)](b, nbits, numel, cnt, nb, BLOCK=block)
    starts, incl = _scan_starts(cnt[:nb])
    total, beyond = torch.stack([incl[-1], cnt[nb:].to(torch.int64).sum()]).tolist()
    if beyond:
        raise ValueError("bits: bits set beyond numel")
    out = torch.empty(total, dtype=dtype, device=bits.device)
    if total:
        _bitmask_write_kernel[(nb,)](b, nbits, numel, starts, out, BLOCK=block)
    return out


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    m = mask.reshape(-1)
    m = (m if m.is_contiguous() else m.contiguous()).view(torch.uint8)
    n = m.numel()
    nbytes = (n + 7) // 8
    out = torch.empty(nbytes, dtype=torch.uint8, device=mask.device)
    if nbytes:
        block = BLOCKS["pack"]
        _pack_kernel[(triton.cdiv(nbytes, block),)](m, n, out, nbytes, BYTES=block)
    return out


# --------------------------------------------------------------------------- exact top-k select

# scores dtype -> (raw-bits view dtype, key bits, +inf bit pattern)
_KEYS = {
    torch.float16: (torch.uint16, 16, 0x7C00),
    torch.bfloat16: (torch.uint16, 16, 0x7F80),
    torch.float32: (torch.uint32, 32, 0x7F800000),
    torch.float64: (torch.uint64, 64, 0x7FF0000000000000),
}


@triton.jit
def _topk_keys_kernel(bits_ptr, act_ptr, n, keys_ptr, stats_ptr, nblocks, W: tl.constexpr,
                      INF: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr):
    # Order-preserving unsigned keys; -0.0 -> key(+0.0); inactive -> 0 (below every real key).
    # stats[pid] = active count, stats[nblocks + pid] = NaN count among the active scores.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    u = tl.load(bits_ptr + offs, mask=m, other=0)
    sign = tl.full([], 1, u.dtype) << (W - 1)
    mag = u & (sign - 1)
    key = tl.where((u & sign) != 0, ~u, u | sign)
    key = tl.where(mag == 0, sign, key)
    if HAS_ACTIVE:
        act = m & (tl.load(act_ptr + offs, mask=m, other=0) != 0)
        key = tl.where(act, key, 0)
    else:
        act = m
    tl.store(keys_ptr + offs, key, mask=m)
    tl.store(stats_ptr + pid, tl.sum(act.to(tl.int32)))
    tl.store(stats_ptr + nblocks + pid, tl.sum((act & (mag > tl.full([], INF, u.dtype))).to(tl.int32)))


@triton.jit
def _topk_prefix(digits_ptr, npass, KT: tl.constexpr, W: tl.constexpr):
    """The key bits fixed by the first ``npass`` digits, and their mask."""
    prefix = tl.full([], 0, KT)
    pmask = tl.full([], 0, KT)
    for q in range(0, npass):
        sh = tl.cast(W - 8 * (q + 1), KT)
        prefix = prefix | (tl.load(digits_ptr + q).to(KT) << sh)
        pmask = pmask | (tl.full([], 255, KT) << sh)
    return prefix, pmask


@triton.jit(do_not_specialize=["npass"])
def _topk_hist_kernel(keys_ptr, n, hist_ptr, digits_ptr, npass, W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = tl.load(keys_ptr + offs, mask=m, other=0)
    prefix, pmask = _topk_prefix(digits_ptr, npass, key.dtype, W)
    match = m & ((key & pmask) == prefix)
    digit = ((key >> tl.cast(W - 8 * (npass + 1), key.dtype)) & 255).to(tl.int32)
    h = tl.histogram(digit, 256, mask=match)
    tl.atomic_add(hist_ptr + tl.arange(0, 256), h, mask=h > 0)


@triton.jit(do_not_specialize=["p"])
def _topk_walk_kernel(hist_ptr, digits_ptr, need_ptr, p):
    # Digit of the need-th largest key among the candidates, and how many of its bin are still needed.
    b = tl.arange(0, 256)
    h = tl.load(hist_ptr + b).to(tl.int64)
    need = tl.load(need_ptr + p)
    at_or_above = tl.sum(h) - tl.cumsum(h, 0) + h
    digit = tl.sum((at_or_above >= need).to(tl.int32)) - 1
    above = tl.sum(tl.where(b > digit, h, 0))
    tl.store(digits_ptr + p, digit.to(tl.int64))
    tl.store(need_ptr + p + 1, need - above)


@triton.jit
def _topk_count_kernel(keys_ptr, n, digits_ptr, npass, cnt_ptr, nblocks, W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = tl.load(keys_ptr + offs, mask=m, other=0)
    kth, _ = _topk_prefix(digits_ptr, npass, key.dtype, W)
    tl.store(cnt_ptr + pid, tl.sum((m & (key > kth)).to(tl.int32)))
    tl.store(cnt_ptr + nblocks + pid, tl.sum((m & (key == kth)).to(tl.int32)))


@triton.jit
def _topk_write_kernel(keys_ptr, n, digits_ptr, npass, plan_ptr, nblocks, out_ptr, W: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = tl.load(keys_ptr + offs, mask=m, other=0)
    kth, _ = _topk_prefix(digits_ptr, npass, key.dtype, W)
    eq = m & (key == kth)
    take = tl.load(plan_ptr + nblocks + pid)
    sel = (m & (key > kth)) | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= take))
    rank = tl.cumsum(sel.to(tl.int32), 0)
    tl.store(out_ptr + tl.load(plan_ptr + pid) + rank - 1, offs, mask=sel)


def topk_select(scores: torch.Tensor, active: Optional[torch.Tensor], k: int) -> torch.Tensor:
    dev = scores.device
    s = scores.reshape(-1)
    s = s if s.is_contiguous() else s.contiguous()
    n = s.numel()
    k = int(k)
    view_dt, width, inf_bits = _KEYS[s.dtype]
    a = None
    if active is not None:
        a = active.reshape(-1)
        a = (a if a.is_contiguous() else a.contiguous()).view(torch.uint8)
    n_active = 0
    if n:
        block = BLOCKS["topk"]
        nb = triton.cdiv(n, block)
        keys = torch.empty(n, dtype=view_dt, device=dev)
        stats = torch.empty(2 * nb, dtype=torch.int32, device=dev)
        _topk_keys_kernel[(nb,)](s.view(view_dt), a if a is not None else s, n, keys, stats, nb, W=width,
                                 INF=inf_bits, HAS_ACTIVE=a is not None, BLOCK=block)
        n_act, n_nan = stats.view(2, nb).to(torch.int64).sum(1).tolist()
        if n_nan:
            raise ValueError("scores: contains NaN among the active entries")
        n_active = n_act
    if k < 0 or k > n_active:
        raise ValueError(f"k={k} exceeds the number of active scores {n_active}" if k > 0 else
                         f"k: must be in [0, {n_active}], got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    npass = width // 8
    hist = torch.zeros(npass * 256, dtype=torch.int32, device=dev)
    state = torch.zeros(2 * npass + 1, dtype=torch.int64)  # digits[npass] | need[npass + 1]
    state[npass] = k
    state = state.to(dev)
    digits, need = state[:npass], state[npass:]
    for p in range(npass):
        _topk_hist_kernel[(nb,)](keys, n, hist[p * 256:], digits, p, W=width, BLOCK=block)
        _topk_walk_kernel[(1,)](hist[p * 256:], digits, need, p)
    cnt = torch.empty(2 * nb, dtype=torch.int32, device=dev)
    _topk_count_kernel[(nb,)](keys, n, digits, npass, cnt, nb, W=width, BLOCK=block)
    n_gt, n_eq = cnt.view(2, nb).to(torch.int64)
    eq_before = torch.cumsum(n_eq, 0) - n_eq
    take = torch.minimum((need[npass] - eq_before).clamp_min(0), n_eq)
    sel = n_gt + take
    plan = torch.cat([torch.cumsum(sel, 0) - sel, take])
    out = torch.empty(k, dtype=torch.int64, device=dev)
    _topk_write_kernel[(nb,)](keys, n, digits, npass, plan, nb, out, W=width, BLOCK=block)
    return out

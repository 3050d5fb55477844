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
  The in-place calls (``gather_segments_out``, ``scatter_segments_``) write into the
  caller's tensors, so there a ``_check_kernel`` launch reads the indexed positions
  first and the writing kernel (``GATED``) masks every access off when the flag is
  set: an out-of-range position leaves the destination untouched (one more read of
  the positions, no extra sync).
* **mask / bitmask -> indices**: a per-block count kernel, an exclusive cumsum on the
  device, then a per-block write kernel (in-block ranks by ``tl.cumsum``).
* **topk_select_segments** (and ``topk_select``, its one-segment case) is an exact
  radix select, never a sort, run over all segments at once with no concatenated
  copy of the scores and no key buffer: a table like gather's (per segment
  ``[scores address, numel, active address or 0, 0, numel, offset]``, plus one work
  row per block of a segment, plus the select state) goes to the device in one
  transfer, and every pass is ONE launch over all segments' blocks that re-derives
  the keys from the scores it reads. Scores map to order-preserving unsigned keys
  (-0.0 and +0.0 map to the same key); inactive entries are masked out of every
  count. float16/bfloat16 use 16-bit keys (2 passes), float32 32-bit keys (4
  passes), float64 64-bit keys (8 passes) of 8-bit digits. Each pass is a
  ``tl.histogram`` per block, summed into a 256-bin histogram with one vector
  atomic add per block, followed by a one-program "walk" kernel that picks the
  digit of the k-th largest key and updates how many of its ties are still needed.
  The digits stay on the device, so the passes need no host sync. Pass 0 also
  counts, per block, the active scores and the NaN among them (inactive NaN is
  ignored, like the reference), which checks NaN and the range of ``k`` (one sync).
  ``k == n_active`` skips the radix passes (every active score is taken). A final
  count kernel + device cumsum + write kernel emits every active position with key
  > kth and the first ``need`` with key == kth, in global position order (work rows
  are in segment order). A non-contiguous score tensor or mask is read from a
  contiguous copy of that tensor alone.
"""
from __future__ import annotations

import struct
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from gradkit.ops.overlap import check_no_overlap, spans_meet as _spans_meet  # noqa: F401 (re-exported)

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
def _load_index(iaddr, flags, offs, m):
    """Entries ``offs`` (masked by ``m``, else 0) of a segment's index, int32 or int64 by its flags, as int64."""
    if ((flags >> 5) & 1) != 0:
        return tl.load(iaddr.to(tl.pointer_type(tl.int64)) + offs, mask=m, other=0)
    return tl.load(iaddr.to(tl.pointer_type(tl.int32)) + offs, mask=m, other=0).to(tl.int64)


@triton.jit
def _segment_positions(row_ptr, offs, m, flag_ptr):
    """Positions inside the segment for flat offsets ``offs`` (masked by ``m``); returns (pos, in_range)."""
    numel = tl.load(row_ptr + 1)
    flags = tl.load(row_ptr + 3)
    if ((flags >> 4) & 1) != 0:
        ix = _load_index(tl.load(row_ptr + 2), flags, offs, m)
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
def _check_kernel(meta_ptr, work_ptr, flag_ptr, BLOCK: tl.constexpr, ASCENDING: tl.constexpr = False):
    """ORs 1 into the flag if a work row's indexed positions run out of range and, with ASCENDING (the
    scatters), 2 if they are not strictly ascending (position j >= position j + 1, the row's last one compared
    with the next row's first); writes nothing else."""
    row, ooff, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    numel = tl.load(row + 1)
    flags = tl.load(row + 3)
    if ((flags >> 4) & 1) != 0:
        iaddr = tl.load(row + 2)
        nm = m & (offs + 1 < tl.load(row + 4))
        ix = _load_index(iaddr, flags, offs, m)
        nx = _load_index(iaddr, flags, offs + 1, nm)
        nbad = tl.sum((m & ((ix < 0) | (ix >= numel))).to(tl.int32))
        f = tl.where(nbad > 0, 1, 0)
        if ASCENDING:
            ndown = tl.sum((nm & (ix >= nx)).to(tl.int32))
            f = f | tl.where(ndown > 0, 2, 0)
        tl.atomic_or(flag_ptr, f.to(tl.int64), mask=f != 0)


@triton.jit
def _gather_kernel(meta_ptr, work_ptr, out_addr_ptr, flag_ptr, OUT_CODE: tl.constexpr, ACC: tl.constexpr,
                   WIDE: tl.constexpr, BLOCK: tl.constexpr, GATED: tl.constexpr = False):
    # GATED: _check_kernel ran first on this stream; a set flag masks every load and store off.
    row, ooff, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    if GATED:
        m = m & ((offs * 0 + tl.load(flag_ptr)) == 0)  # a block-shaped mask (the interpreter wants one)
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
                    WIDE: tl.constexpr, BLOCK: tl.constexpr, GATED: tl.constexpr = False):
    # DST_CODE >= 0: every destination has that dtype (scatter_segments); -1: per segment.
    # GATED: as in _gather_kernel.
    row, ooff, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    if GATED:
        m = m & ((offs * 0 + tl.load(flag_ptr)) == 0)  # a block-shaped mask (the interpreter wants one)
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


# --------------------------------------------------------------------------- memory overlap (host side)
# The in-place launchers write many tensors from many programs at once: a written tensor that shares an element
# with another listed tensor races on a GPU, and under the interpreter, which runs programs in order, a later
# program reads what an earlier one wrote. The rules (refuse, or read a source from a copy) are the native
# kernels' (csrc/overlap.h), shared with the op-level checks: gradkit.ops.overlap.


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

    def capturing(self) -> bool:
        return self.buf.is_cuda and torch.cuda.is_current_stream_capturing()

    def precheck(self, block: int, ascending: bool = False) -> bool:
        """_check_kernel over the indexed positions, before launches into the caller's tensors (whose writing
        kernel, GATED=True, then writes nothing when the flag is set) and before the scatters (``ascending``:
        positions that are not strictly ascending are flagged too; they may repeat one, see
        ``repeats``). False: nothing to check."""
        if not (CHECK_INDEX and self.has_index and self.n_work):
            return False
        _check_kernel[(self.n_work,)](self.meta, self.work, self.flag, BLOCK=block, ASCENDING=ascending)
        return True

    def check(self) -> int:
        """The flag after the launches (0 when nothing was checked); raises when a position was out of range."""
        if not (CHECK_INDEX and self.has_index and self.n_work):
            return 0
        if self.capturing():
            return 0
        flag = int(self.flag.item())
        if flag & 1:
            raise IndexError("index: a position is out of range for its segment")
        return flag

    def repeats(self) -> bool:
        """After a check that flagged unsorted positions: True when a segment repeats one (a sorted copy each)."""
        for ix in self.keep:
            if ix.numel() > 1:
                s = torch.sort(ix).values
                if bool((s[1:] == s[:-1]).any()):
                    return True
        return False


def _wide(*dtypes: torch.dtype) -> tl.dtype:
    return tl.float64 if torch.float64 in dtypes else tl.float32


def _promote(src: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = src[0].dtype if len(src) else torch.float32
    for s in src[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return dtype


def _gather_into(src, index, out: torch.Tensor, accumulate: bool, in_place: bool) -> None:
    # a caller's out that shares memory with a source: the source is read as it was before the call (from a copy,
    # as the native kernels do), not as earlier programs have overwritten it
    srcs = [s.clone(memory_format=torch.contiguous_format) if in_place and _spans_meet(s, [out])
            else s if s.is_contiguous() else s.contiguous() for s in src]
    target = out if out.is_contiguous() else out.contiguous()
    block = BLOCKS["gather"]
    plan = _Plan(srcs, index, target.data_ptr() if target.numel() else 0, 1.0, block).to(out.device)
    if plan.n_work == 0:
        return
    gated = in_place and plan.precheck(block)
    _gather_kernel[(plan.n_work,)](plan.meta, plan.work, plan.head, plan.flag, OUT_CODE=_CODE[out.dtype],
                                   ACC=bool(accumulate), WIDE=_wide(out.dtype), BLOCK=block, GATED=gated)
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
        _gather_into(src, index, out, False, in_place=False)
    return out


def gather_segments_out(src, index, out: torch.Tensor, accumulate: bool = False) -> None:
    if out.numel():
        _gather_into(src, index, out, accumulate, in_place=True)


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
    # the check also flags unsorted positions, which may repeat one (racing writes, lost += updates); not while a
    # CUDA graph is captured (its flag cannot be read, and a gated writer would then skip distinct unsorted ones)
    checked = plan.precheck(block, ascending=not plan.capturing())
    gated = not new and checked  # new: scatter_segments' own tensors, nothing to protect

    def launch(gated: bool) -> None:
        _scatter_kernel[(plan.n_work,)](plan.meta, plan.work, plan.head, plan.flag, FLAT_CODE=_CODE[flat.dtype],
                                        DST_CODE=dst_code, ACC=bool(accumulate), HAS_SCALE=has_scale,
                                        WIDE=wide, BLOCK=block, GATED=gated, enable_fp_fusion=False)

    launch(gated)
    if plan.check() & 2:  # unsorted positions: refused if one repeats
        if plan.repeats():
            raise ValueError("index: a position occurs more than once in a segment; scatter positions must be "
                             "distinct")
        if gated:  # distinct after all: the gated writer wrote nothing, so write now
            launch(False)


def scatter_segments(flat: torch.Tensor, index: Sequence[Optional[torch.Tensor]],
                     numel: Sequence[int], scale: float = 1.0) -> List[torch.Tensor]:
    outs = [torch.empty(int(n), dtype=flat.dtype, device=flat.device) for n in numel]
    if outs:
        _scatter_into(flat, index, outs, float(scale), False, new=True)
    return outs


def scatter_segments_(flat: torch.Tensor, index, dst: Sequence[torch.Tensor],
                      scale: float = 1.0, accumulate: bool = False) -> None:
    if not len(dst) or flat.numel() == 0:  # nothing to write
        return
    # destinations sharing an element race: refused before anything is written (as the native op); flat sharing
    # memory with one is read as it was before the call, from a copy
    check_no_overlap([(f"dst[{i}]", d, True) for i, d in enumerate(dst)])
    if _spans_meet(flat, dst):
        flat = flat.clone(memory_format=torch.contiguous_format)
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

# scores dtype -> (raw-bits dtype the kernels read the scores as, +inf bit pattern)
# Global radix-select histograms (topk_select*, golden_topk_and_): int64, since one bin can count
# more than 2^31 - 1 keys once a select spans more than 2^31 elements.
_HIST_DTYPE = torch.int64

_KEYS = {
    torch.float16: (tl.uint16, 0x7C00),
    torch.bfloat16: (tl.uint16, 0x7F80),
    torch.float32: (tl.uint32, 0x7F800000),
    torch.float64: (tl.uint64, 0x7FF0000000000000),
}


@triton.jit
def _topk_keys(meta_ptr, work_ptr, KT: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of one segment as order-preserving unsigned keys (-0.0 -> key(+0.0)).

    Returns (key, act, mag, pos): ``act`` = in range and active, ``mag`` = the raw bits without the
    sign (NaN iff > the +inf pattern), ``pos`` = the global flat position (segment offset + offset).
    """
    row, ooff, offs, m = _work_item(meta_ptr, work_ptr, BLOCK)
    u = tl.load(tl.load(row).to(tl.pointer_type(KT)) + offs, mask=m, other=0)
    aaddr = tl.load(row + 2)
    if aaddr != 0:
        act = m & (tl.load(aaddr.to(tl.pointer_type(tl.uint8)) + offs, mask=m, other=0) != 0)
    else:
        act = m
    sign = tl.full([], 1, KT) << (KT.primitive_bitwidth - 1)
    mag = u & (sign - 1)
    key = tl.where((u & sign) != 0, ~u, u | sign)
    key = tl.where(mag == 0, sign, key)
    return key, act, mag, ooff + offs


@triton.jit
def _topk_prefix(digits_ptr, npass, KT: tl.constexpr):
    """The key bits fixed by the first ``npass`` digits, and their mask."""
    W: tl.constexpr = KT.primitive_bitwidth
    prefix = tl.full([], 0, KT)
    pmask = tl.full([], 0, KT)
    for q in range(0, npass):
        sh = tl.cast(W - 8 * (q + 1), KT)
        prefix = prefix | (tl.load(digits_ptr + q).to(KT) << sh)
        pmask = pmask | (tl.full([], 255, KT) << sh)
    return prefix, pmask


@triton.jit(do_not_specialize=["npass"])
def _topk_hist_kernel(meta_ptr, work_ptr, hist_ptr, digits_ptr, npass, stats_ptr, nwork, KT: tl.constexpr,
                      INF: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    # 256-bin histogram of digit ``npass`` of the active keys that match the digits fixed so far.
    # STATS (pass 0): stats[pid] = active count, stats[nwork + pid] = NaN count among the active scores.
    key, act, mag, _ = _topk_keys(meta_ptr, work_ptr, KT, BLOCK)
    prefix, pmask = _topk_prefix(digits_ptr, npass, KT)
    match = act & ((key & pmask) == prefix)
    digit = ((key >> tl.cast(KT.primitive_bitwidth - 8 * (npass + 1), KT)) & 255).to(tl.int32)
    h = tl.histogram(digit, 256, mask=match)
    # int64 global bins: a bin of a select over > 2^31 scores (an 8B-parameter model) must not wrap
    tl.atomic_add(hist_ptr + tl.arange(0, 256), h.to(tl.int64), mask=h > 0)
    if STATS:
        pid = tl.program_id(0)
        tl.store(stats_ptr + pid, tl.sum(act.to(tl.int32)))
        tl.store(stats_ptr + nwork + pid, tl.sum((act & (mag > tl.full([], INF, KT))).to(tl.int32)))


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
def _topk_count_kernel(meta_ptr, work_ptr, digits_ptr, npass, cnt_ptr, nwork, KT: tl.constexpr,
                       BLOCK: tl.constexpr):
    # cnt[pid] = active keys > kth, cnt[nwork + pid] = active keys == kth.
    pid = tl.program_id(0)
    key, act, _, _ = _topk_keys(meta_ptr, work_ptr, KT, BLOCK)
    kth, _ = _topk_prefix(digits_ptr, npass, KT)
    tl.store(cnt_ptr + pid, tl.sum((act & (key > kth)).to(tl.int32)))
    tl.store(cnt_ptr + nwork + pid, tl.sum((act & (key == kth)).to(tl.int32)))


@triton.jit
def _topk_write_kernel(meta_ptr, work_ptr, digits_ptr, npass, plan_ptr, nwork, out_ptr, KT: tl.constexpr,
                       BLOCK: tl.constexpr):
    # Every active key > kth, and the first plan[nwork + pid] keys == kth of this block, at plan[pid] on.
    pid = tl.program_id(0)
    key, act, _, pos = _topk_keys(meta_ptr, work_ptr, KT, BLOCK)
    kth, _ = _topk_prefix(digits_ptr, npass, KT)
    eq = act & (key == kth)
    take = tl.load(plan_ptr + nwork + pid)
    sel = (act & (key > kth)) | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= take))
    rank = tl.cumsum(sel.to(tl.int32), 0)
    tl.store(out_ptr + tl.load(plan_ptr + pid) + rank - 1, pos, mask=sel)


def _topk_table(scores: Sequence[torch.Tensor], active: Sequence[Optional[torch.Tensor]], npass: int, k: int,
                block: int, device: torch.device):
    """The one host->device int64 table of a top-k call, and the contiguous tensors it points into.

    Layout: digits (npass) | need (npass + 1, need[0] = k) | segment rows (S x 6:
    [scores address, numel, active address or 0, 0, numel, offset]) | work rows (W x 3).
    """
    keep, rows, sizes, offsets = [], [], [], []
    off = 0
    for s, a in zip(scores, active):
        n = s.numel()
        sc = s if s.is_contiguous() else s.contiguous()  # row-major order == the order of s.reshape(-1)
        aaddr = 0
        if a is not None and n:
            ac = a.reshape(-1)
            ac = ac if ac.is_contiguous() else ac.contiguous()
            keep.append(ac)
            aaddr = ac.data_ptr()
        keep.append(sc)
        rows.append([sc.data_ptr() if n else 0, n, aaddr, 0, n, off])
        sizes.append(n)
        offsets.append(off)
        off += n
    work = _work_rows(sizes, offsets, block)
    state = torch.zeros(2 * npass + 1, dtype=torch.int64)
    state[npass] = k
    host = torch.cat([state, torch.tensor(rows, dtype=torch.int64).reshape(-1), work.reshape(-1)])
    buf = host if device.type == "cpu" else host.to(device)
    s = 2 * npass + 1 + len(rows) * _META_COLS
    return buf[:npass], buf[npass:2 * npass + 1], buf[2 * npass + 1:s], buf[s:], work.shape[0], off, keep


def topk_select_segments(scores: Sequence[torch.Tensor], active: Sequence[Optional[torch.Tensor]],
                         k: int) -> torch.Tensor:
    k = int(k)
    dev = scores[0].device if len(scores) else torch.device("cpu")
    n_active = 0
    if len(scores):
        dtype = scores[0].dtype
        if any(s.dtype != dtype for s in scores):
            raise TypeError("scores: every tensor must have the same dtype")
        kt, inf_bits = _KEYS[dtype]
        npass = kt.primitive_bitwidth // 8
        block = BLOCKS["topk"]
        digits, need, meta, work, nw, n, keep = _topk_table(scores, active, npass, k, block, dev)
        if nw:
            hist = torch.zeros(npass * 256, dtype=_HIST_DTYPE, device=dev)
            stats = torch.empty(2 * nw, dtype=torch.int32, device=dev)
            # Pass 0 also counts the active and the NaN-among-active scores.
            _topk_hist_kernel[(nw,)](meta, work, hist, digits, 0, stats, nw, KT=kt, INF=inf_bits, STATS=True,
                                     BLOCK=block)
            n_act, n_nan = stats.view(2, nw).to(torch.int64).sum(1).tolist()
            if n_nan:
                raise ValueError("scores: contains NaN among the active entries")
            n_active = n_act
    if k < 0 or k > n_active:
        raise ValueError(f"k: must be in [0, {n_active}] (active scores), got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    if k < n_active:
        for p in range(npass):
            if p:
                _topk_hist_kernel[(nw,)](meta, work, hist[p * 256:], digits, p, stats, nw, KT=kt, INF=inf_bits,
                                         STATS=False, BLOCK=block)
            _topk_walk_kernel[(1,)](hist[p * 256:], digits, need, p)
    # else every active score is taken: the digits stay 0, a kth key below every active key, and
    # need[npass] stays 0, so the passes are skipped.
    cnt = torch.empty(2 * nw, dtype=torch.int32, device=dev)
    _topk_count_kernel[(nw,)](meta, work, digits, npass, cnt, nw, KT=kt, BLOCK=block)
    n_gt, n_eq = cnt.view(2, nw).to(torch.int64)
    eq_before = torch.cumsum(n_eq, 0) - n_eq
    take = torch.minimum((need[npass] - eq_before).clamp_min(0), n_eq)
    sel = n_gt + take
    plan = torch.cat([torch.cumsum(sel, 0) - sel, take])
    out = torch.empty(k, dtype=torch.int64, device=dev)
    _topk_write_kernel[(nw,)](meta, work, digits, npass, plan, nw, out, KT=kt, BLOCK=block)
    del keep  # the contiguous copies the table points into must outlive every launch (queued on this stream)
    return out


def topk_select(scores: torch.Tensor, active: Optional[torch.Tensor], k: int) -> torch.Tensor:
    return topk_select_segments([scores], [active], k)

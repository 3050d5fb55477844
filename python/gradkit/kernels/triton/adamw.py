"""Triton kernel of the fused masked AdamW step (the GPU backend where gradkit was built without
CUDA C++). Semantics are those of ``gradkit.kernels.reference.adamw``; ``masked_adamw_`` has the
reference's positional signature. On machines without a GPU it runs on CPU tensors under
``TRITON_INTERPRET=1``.

Design
------
* **One launch per dtype** present in the call (the optimizer groups by dtype, so usually one),
  covering every tensor of that dtype. The host packs one int64 table, copied to the device in
  one transfer: 8 global words (the hyper-parameters as float64 bits, formed in float64 on the
  host exactly as torch forms its scalars), one row per tensor ``[param, grad, exp_avg,
  exp_avg_sq, bits (0 = no mask), numel, masked step size, unmasked step size,
  bias_correction2_sqrt, max_exp_avg_sq (0 = no AMSGrad)]`` (addresses, cast in-kernel with ``.to(tl.pointer_type(T))``; the
  interpreter dereferences raw host addresses of CPU tensors), and one work row ``[tensor,
  block index]`` per block of ``8 * BYTES`` entries.
* **One pass**: a program loads ``BYTES`` mask bytes once and views its entries as a
  ``(BYTES, 8)`` tile (entry ``8k + j`` <-> bit ``j`` of byte ``k``), reads param, grad, exp_avg
  and exp_avg_sq once and writes them once. An entry whose rate is 0 gets back the bits it was
  read with (-0.0 and NaN payloads included). Full blocks (all but a tensor's last) take a
  branch without bounds masks, and when every tensor of the launch is 16-byte aligned
  (``ALIGNED``) the GPU compiler moves them with 16-byte vector accesses.
* **Arithmetic** in float32 (float64 for float64 tensors) with torch's op order, launched with
  ``enable_fp_fusion=False`` and correctly rounded ``sqrt_rn`` / ``div_rn``, so no step is
  contracted or approximated on the GPU. bfloat16 is handled as raw uint16 bits with an explicit
  round-to-nearest-even store (the interpreter's own bf16 casts truncate).
"""
from __future__ import annotations

import struct
from typing import Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from gradkit.kernels.triton.parammap import _bf16_bits_to_f32, _f32_to_bf16_bits
from gradkit.ops.overlap import check_no_overlap

# Mask bytes (8 entries each) handled by one program; tests shrink it to exercise many blocks.
BYTES = 256

_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_HYPER = 8  # global words: decay_m, decay_u, 1 - beta1, beta2, 1 - beta2, eps, frozen_m, frozen_u
_COLS = tl.constexpr(10)  # words per tensor row (see the module docstring)


@triton.jit
def _f64(word_ptr, WIDE: tl.constexpr):
    """The float64 stored (as int64 bits) at ``word_ptr``, rounded to WIDE."""
    return tl.load(word_ptr).to(tl.float64, bitcast=True).to(WIDE)


@triton.jit
def _ptr(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer at int64 address ``addr`` (bfloat16 as uint16 bits); ALIGNED: 16-byte aligned."""
    if CODE == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        p = addr.to(tl.pointer_type(tl.float64))
    elif CODE == 2:
        p = addr.to(tl.pointer_type(tl.float16))
    else:
        p = addr.to(tl.pointer_type(tl.uint16))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _ld(ptr, offs, inb, EVEN: tl.constexpr):
    if EVEN:  # no bounds mask: the GPU compiler may use 16-byte accesses
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=inb, other=0)
    return x


@triton.jit
def _st(ptr, offs, x, inb, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptr + offs, x)
    else:
        tl.store(ptr + offs, x, mask=inb)


@triton.jit
def _widen(raw, CODE: tl.constexpr, WIDE: tl.constexpr):
    if CODE == 3:
        x = _bf16_bits_to_f32(raw).to(WIDE)
    else:
        x = raw.to(WIDE)
    return x


@triton.jit
def _narrow(x, ptr, CODE: tl.constexpr):
    if CODE == 3:
        r = _f32_to_bf16_bits(x.to(tl.float32))
    else:
        r = x.to(ptr.dtype.element_ty)
    return r


@triton.jit
def _update_block(hyper_ptr, row, blk, numel, CODE: tl.constexpr, WIDE: tl.constexpr, MAXIMIZE: tl.constexpr,
                  ALIGNED: tl.constexpr, BYTES: tl.constexpr, EVEN: tl.constexpr, AMS: tl.constexpr):
    byte = blk * BYTES + tl.arange(0, BYTES).to(tl.int64)
    offs = byte[:, None] * 8 + tl.arange(0, 8)[None, :]  # entry 8k + j <-> bit j of byte k
    inb = offs < numel
    baddr = tl.load(row + 4)
    if baddr != 0:
        b = _ld(baddr.to(tl.pointer_type(tl.uint8)), byte, byte * 8 < numel, EVEN)
        sel = ((b.to(tl.int32)[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
    else:
        sel = offs < 0
    decay = tl.where(sel, _f64(hyper_ptr, WIDE), _f64(hyper_ptr + 1, WIDE))
    step = tl.where(sel, _f64(row + 6, WIDE), _f64(row + 7, WIDE))
    frozen = tl.where(sel, tl.load(hyper_ptr + 6), tl.load(hyper_ptr + 7)) != 0
    w1 = _f64(hyper_ptr + 2, WIDE)
    beta2 = _f64(hyper_ptr + 3, WIDE)
    w2 = _f64(hyper_ptr + 4, WIDE)
    eps = _f64(hyper_ptr + 5, WIDE)
    bc2s = _f64(row + 8, WIDE)

    p_ptr = _ptr(tl.load(row), CODE, ALIGNED)
    m_ptr = _ptr(tl.load(row + 2), CODE, ALIGNED)
    v_ptr = _ptr(tl.load(row + 3), CODE, ALIGNED)
    g = _widen(_ld(_ptr(tl.load(row + 1), CODE, ALIGNED), offs, inb, EVEN), CODE, WIDE)
    if MAXIMIZE:
        g = -g
    m = _widen(_ld(m_ptr, offs, inb, EVEN), CODE, WIDE)
    v = _widen(_ld(v_ptr, offs, inb, EVEN), CODE, WIDE)
    p_raw = _ld(p_ptr, offs, inb, EVEN)
    p = _widen(p_raw, CODE, WIDE) * decay
    if w1 < 0.5:  # torch.lerp's two formulas (uniform branch)
        m = m + w1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - w1)
    v = v * beta2 + w2 * g * g
    vd = v
    if AMS:  # AMSGrad: the denominator takes torch.maximum(max_exp_avg_sq, v) (NaN when either is), stored back
        vm_ptr = _ptr(tl.load(row + 9), CODE, ALIGNED)
        vm = _widen(_ld(vm_ptr, offs, inb, EVEN), CODE, WIDE)
        vd = tl.where((vm > v) | (vm != vm), vm, v)
        _st(vm_ptr, offs, _narrow(vd, vm_ptr, CODE), inb, EVEN)
    if WIDE == tl.float32:  # correctly rounded, as on the CPU (float64's sqrt and / always are)
        denom = tl.div_rn(tl.sqrt_rn(vd), bc2s) + eps
        p = p + tl.div_rn(-step * m, denom)
    else:
        denom = tl.sqrt(vd) / bc2s + eps
        p = p + (-step * m) / denom
    _st(m_ptr, offs, _narrow(m, m_ptr, CODE), inb, EVEN)
    _st(v_ptr, offs, _narrow(v, v_ptr, CODE), inb, EVEN)
    _st(p_ptr, offs, tl.where(frozen, p_raw, _narrow(p, p_ptr, CODE)), inb, EVEN)  # frozen: the bits as read


@triton.jit
def _masked_adamw_kernel(hyper_ptr, meta_ptr, work_ptr, CODE: tl.constexpr, WIDE: tl.constexpr,
                         MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, BYTES: tl.constexpr, AMS: tl.constexpr):
    """Block ``blk`` (8 * BYTES entries) of one tensor; per entry, lr = masked rate if its bit is set::

        p1 = p * (1 - lr wd);  m = lerp(m, g, 1 - beta1);  v = v beta2 + (1 - beta2) g g
        p  = p1 + (-(lr / bc1) m) / (sqrt(v) / bc2sqrt + eps), p kept bit for bit where lr == 0
    (AMS: sqrt(max(max_exp_avg_sq, v)), the maximum stored)
    """
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(work_ptr + 2 * pid)
    blk = tl.load(work_ptr + 2 * pid + 1)
    row = meta_ptr + t * _COLS
    numel = tl.load(row + 5)
    if (blk + 1) * (8 * BYTES) <= numel:  # full block (uniform branch): no bounds masks
        _update_block(hyper_ptr, row, blk, numel, CODE, WIDE, MAXIMIZE, ALIGNED, BYTES, True, AMS)
    else:
        _update_block(hyper_ptr, row, blk, numel, CODE, WIDE, MAXIMIZE, ALIGNED, BYTES, False, AMS)


def _bits64(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _work_rows(numels: List[int], block: int) -> torch.Tensor:
    """[W, 2] int64 rows (tensor, block index) covering every tensor in blocks of ``block`` entries."""
    n = torch.tensor(numels, dtype=torch.int64)
    nblk = (n + block - 1) // block
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), nblk)
    first = torch.cumsum(nblk, 0) - nblk
    return torch.stack([tensor, torch.arange(int(nblk.sum()), dtype=torch.int64) - first[tensor]], 1)


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                  exp_avg_sqs: Sequence[torch.Tensor], bits: Sequence[Optional[torch.Tensor]], masked_lr: float,
                  unmasked_lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  bias_correction1: Sequence[float], bias_correction2_sqrt: Sequence[float], maximize: bool,
                  max_exp_avg_sqs: Optional[Sequence[torch.Tensor]] = None) -> None:
    """Launcher; the kernel reads every tensor by address and numel, so gradkit.ops.check_masked_adamw_ runs
    first (op wrapper, CUDA kernel). A written tensor sharing an element with another listed tensor (a parameter
    listed twice, one state tensor in two roles, a gradient that is also written) is refused before any tensor is
    touched, naming both, as the native op refuses it (the programs would race; the interpreter would apply one
    step twice)."""
    named = [(f"{name}[{i}]", t, True) for name, lst in (("params", params), ("exp_avgs", exp_avgs),
                                                         ("exp_avg_sqs", exp_avg_sqs),
                                                         ("max_exp_avg_sqs", max_exp_avg_sqs or []))
             for i, t in enumerate(lst)]
    check_no_overlap(named + [(f"grads[{i}]", t, False) for i, t in enumerate(grads)])
    hyper = [_bits64(1 - masked_lr * weight_decay), _bits64(1 - unmasked_lr * weight_decay), _bits64(1 - beta1),
             _bits64(beta2), _bits64(1 - beta2), _bits64(eps), int(masked_lr == 0), int(unmasked_lr == 0)]
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            by_dtype.setdefault(p.dtype, []).append(i)
    block = 8 * BYTES
    for dtype, idx in by_dtype.items():
        rows, aligned = [], True
        for i in idx:
            vmx = [] if max_exp_avg_sqs is None else [max_exp_avg_sqs[i]]
            aligned &= all(t.data_ptr() % 16 == 0 for t in [params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]] + vmx)
            b = bits[i]
            rows.append([params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                         0 if b is None else b.data_ptr(), params[i].numel(),
                         _bits64(masked_lr / bias_correction1[i]), _bits64(unmasked_lr / bias_correction1[i]),
                         _bits64(bias_correction2_sqrt[i]), vmx[0].data_ptr() if vmx else 0])
        work = _work_rows([params[i].numel() for i in idx], block)
        host = torch.cat([torch.tensor(hyper + [w for r in rows for w in r], dtype=torch.int64), work.reshape(-1)])
        buf = host.to(params[idx[0]].device)
        meta_end = _HYPER + _COLS.value * len(idx)
        _masked_adamw_kernel[(work.shape[0],)](buf[:_HYPER], buf[_HYPER:meta_end], buf[meta_end:],
                                               CODE=_CODE[dtype], WIDE=tl.float64 if dtype == torch.float64
                                               else tl.float32, MAXIMIZE=bool(maximize), ALIGNED=aligned,
                                               BYTES=BYTES, AMS=max_exp_avg_sqs is not None, enable_fp_fusion=False)


def record_aot_cases() -> None:
    """Representative calls of every kernel variant on tiny CPU tensors (run by
    scripts/triton_aot_check.py under its recording interpreter): each dtype, 16-byte aligned
    tensors and tensors one entry off, with and without masks, maximize on/off, a zero rate, the
    other lerp formula (beta1 <= 0.5), odd sizes."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (16,), (3,)]

    def tensor(shape, dt, off):
        n = torch.Size(shape).numel()
        return torch.randn(n + off, generator=g).to(dt)[off:].view(shape)

    for dt in _CODE:
        for off in (0, 1):
            ps, gs, ms = ([tensor(s, dt, off) for s in shapes] for _ in range(3))
            vs = [tensor(s, dt, off).abs_() for s in shapes]
            bs = [torch.randint(0, 256, ((torch.Size(s).numel() + 7) // 8,), generator=g, dtype=torch.uint8)
                  for s in shapes[:2]] + [None]
            for maximize in (False, True):
                for lrs in ((1e-2, 1e-3), (1e-2, 0.0)):
                    masked_adamw_(ps, gs, ms, vs, bs, *lrs, 0.9, 0.999, 1e-8, 0.01, [0.1] * 3, [0.03] * 3, maximize)
                    vmax = [v.clone() for v in vs]  # AMSGrad
                    masked_adamw_(ps, gs, ms, vs, bs, *lrs, 0.9, 0.999, 1e-8, 0.01, [0.1] * 3, [0.03] * 3, maximize,
                                  vmax)
            masked_adamw_(ps, gs, ms, vs, [None] * 3, 1e-3, 1e-3, 0.3, 0.99, 1e-8, 0.0, [0.7] * 3, [0.1] * 3, False)

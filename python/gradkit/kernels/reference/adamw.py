"""Plain-PyTorch oracle for the fused masked AdamW step (family 4): the definition of its meaning.

For every tensor ``i`` and every entry of it, with ``sel`` = the entry's bit in ``bits[i]``
(packed little-endian: bit ``j`` of byte ``k`` is flat element ``8k + j``; ``bits[i]`` None: no
bit set), computed in float32 (float64 for float64 tensors) and rounded only when stored::

    lr     = masked_lr if sel else unmasked_lr
    g      = -grad if maximize else grad
    p1     = p * (1 - lr * weight_decay)                  # the factor is formed in float64, then cast
    m      = lerp(m, g, 1 - beta1)                         # torch.lerp: m + w (g - m) for w < 0.5
    v      = v * beta2 + (1 - beta2) * g * g              # torch's mul_ + addcmul_
    vmax   = maximum(vmax, v)                             # AMSGrad only (max_exp_avg_sqs given): torch.maximum,
                                                          # NaN when either is NaN; the stored maximum
    denom  = sqrt(vmax if AMSGrad else v) / bias_correction2_sqrt[i] + eps
    p      = p1 + (-(lr / bias_correction1[i]) * m) / denom   # torch's addcdiv_
    p      = p (unchanged, bit for bit) where lr == 0

This is torch.optim.AdamW's single-tensor step (decoupled weight decay) with a per-entry rate,
op for op: for float32 tensors and ``masked_lr == unmasked_lr`` the result equals torch's. The
parameter update uses the new ``m``/``v`` before they are rounded to a half-precision state dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from gradkit.kernels.reference.parammap import unpack_bitmask


def unpack_bits(bits: Optional[torch.Tensor], numel: int, device: torch.device) -> torch.Tensor:
    """The flat bool selection (numel,) of a packed bitmask (None: nothing selected)."""
    if bits is None:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    return unpack_bitmask(bits, numel)


def _per_entry(sel: torch.Tensor, a: float, b: float, dtype: torch.dtype) -> torch.Tensor:
    """``a`` where sel else ``b``, each Python float rounded once to ``dtype`` (as torch casts a scalar)."""
    return torch.where(sel, torch.tensor(a, dtype=dtype, device=sel.device),
                       torch.tensor(b, dtype=dtype, device=sel.device))


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                  exp_avg_sqs: Sequence[torch.Tensor], bits: Sequence[Optional[torch.Tensor]], masked_lr: float,
                  unmasked_lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  bias_correction1: Sequence[float], bias_correction2_sqrt: Sequence[float], maximize: bool,
                  max_exp_avg_sqs: Optional[Sequence[torch.Tensor]] = None) -> None:
    vmaxes = [None] * len(params) if max_exp_avg_sqs is None else max_exp_avg_sqs
    for p, g, m, v, b, bc1, bc2s, vmx in zip(params, grads, exp_avgs, exp_avg_sqs, bits, bias_correction1,
                                             bias_correction2_sqrt, vmaxes):
        wide = torch.float64 if p.dtype == torch.float64 else torch.float32
        sel = unpack_bits(b, p.numel(), p.device).reshape(p.shape)
        decay = _per_entry(sel, 1 - masked_lr * weight_decay, 1 - unmasked_lr * weight_decay, wide)
        step = _per_entry(sel, masked_lr / bc1, unmasked_lr / bc1, wide)
        frozen = _per_entry(sel, float(masked_lr == 0), float(unmasked_lr == 0), wide) != 0
        gw = g.to(wide)
        if maximize:
            gw = -gw
        mw = m.to(wide)
        vw = v.to(wide)
        pw = p.to(wide) * decay
        mw.lerp_(gw, 1 - beta1)
        vw.mul_(beta2).addcmul_(gw, gw, value=1 - beta2)
        vd = vw
        if vmx is not None:
            vd = torch.maximum(vmx.to(wide), vw)
        denom = (vd.sqrt() / bc2s).add_(eps)
        pw.add_((-step) * mw / denom)
        p.copy_(torch.where(frozen, p, pw.to(p.dtype)))
        m.copy_(mw)
        v.copy_(vw)
        if vmx is not None:
            vmx.copy_(vd)

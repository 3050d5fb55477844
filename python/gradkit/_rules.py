"""Numeric rules shared by several families, so that each question has one answer across gradkit."""
from __future__ import annotations

import math
from fractions import Fraction

import torch


def floor_count(n: int, x: float, divisor: int = 1) -> int:
    """``floor(n * x / divisor)`` for a count ``n`` and a fraction or percentage ``x`` read as the user meant it.

    The product is taken exactly on ``x``'s binary value. When moving ``x`` by at most two ulps (its own
    rounding, and one more for an ``x`` the caller computed, such as ``percent / 100``, whose double rounding
    reaches 1.09 ulp) lands the product on an integer, that integer is the answer: ``0.57`` % of 10,000
    entries is 57 (float arithmetic gives 56.99999999999999), ``1 / 3`` of 3 blocks is 1 (the exact product
    is 0.99999999999999994). The allowance is ``2 n ulp(x) / divisor``: it shrinks with ``x``'s precision,
    and a large ``n`` still floors (a fixed relative tolerance would round, not floor, past ~1e9)."""
    xf = float(x)
    prod = n * Fraction(xf) / divisor
    near = round(prod)
    if abs(prod - near) <= 2 * n * Fraction(math.ulp(xf)) / divisor:
        return int(near)
    return math.floor(prod)


def check_symmetric(h: torch.Tensor, what: str, rtol: float = 1e-3, hint: str = "") -> None:
    """Refuses a matrix that is not symmetric up to round-off: ``max |H - H^T|`` above ``max(rtol, 16 eps)``
    times ``max |H|`` (eps of ``h``'s dtype). Both the OBS solves (which read one triangle) and the search
    preconditioner (which uses the symmetric part) take this rule. Row blocks keep the temporaries small
    (no K x K copy beside H: K = 11008 would be ~0.5 GB in fp32)."""
    if not h.numel():
        return
    hd = h.detach()
    scale = float(hd.abs().max())
    tol = max(rtol, 16 * torch.finfo(hd.dtype).eps) * scale
    step = 1024
    gap = max(float((hd[i:i + step] - hd[:, i:i + step].T).abs().max()) for i in range(0, hd.shape[0], step))
    if not gap <= tol:
        raise ValueError(f"{what}: is not symmetric (max |H - H^T| = {gap:.3g}, max |H| = {scale:.3g})"
                         + (f"; {hint}" if hint else ""))

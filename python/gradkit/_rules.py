"""Numeric rules shared by several families, so that each question has one answer across gradkit."""
from __future__ import annotations

import math
import numbers
import operator
import sys
from fractions import Fraction
from typing import Optional

import torch


def as_written(x: numbers.Real) -> float:
    """``x`` as a Python float, a numpy float32 / float16 scalar read as the decimal numpy prints for it (the
    shortest that round-trips in its type: the value the user wrote). Its double value (``np.float32(1.1)`` is
    1.10000002384...) is further from the decimal than the count rules' allowance for a double's rounding, so 1.1%
    of 1000 entries would count 12."""
    dt = getattr(x, "dtype", None)
    if getattr(dt, "kind", None) == "f" and getattr(dt, "itemsize", 8) < 8:
        return float(str(x))
    return float(x)


def floor_count(n: int, x: float, divisor: int = 1) -> int:
    """``floor(n * x / divisor)`` for a count ``n`` and a fraction or percentage ``x`` read as the user meant it.

    The product is taken exactly on ``x``'s binary value. When moving ``x`` by at most two ulps (its own
    rounding, and one more for an ``x`` the caller computed, such as ``percent / 100``, whose double rounding
    reaches 1.09 ulp) lands the product on an integer, that integer is the answer: ``0.57`` % of 10,000
    entries is 57 (float arithmetic gives 56.99999999999999), ``1 / 3`` of 3 blocks is 1 (the exact product
    is 0.99999999999999994). The allowance is ``2 n ulp(x) / divisor``: it shrinks with ``x``'s precision,
    and a large ``n`` still floors (a fixed relative tolerance would round, not floor, past ~1e9)."""
    return _count(n, x, divisor, math.floor)


def ceil_count(n: int, x: float, divisor: int = 1) -> int:
    """``ceil(n * x / divisor)``, read as :func:`floor_count` reads it: a product that ``x``'s own rounding could move
    onto an integer is that integer (1.1 % of 1000 entries is 11, where float arithmetic gives 11.000000000000002
    and a plain ceil 12)."""
    return _count(n, x, divisor, math.ceil)


def _count(n: int, x: float, divisor: int, rounding) -> int:
    """``rounding(n * x / divisor)`` on ``x``'s exact value, a product within ``x``'s rounding of an integer taken as
    that integer (see :func:`floor_count`)."""
    xf = float(x)
    prod = n * Fraction(xf) / divisor
    near = round(prod)
    if abs(prod - near) <= 2 * n * Fraction(math.ulp(xf)) / divisor:
        return int(near)
    return rounding(prod)


def flag(v, what: str) -> bool:
    """``v`` as a Python bool: a bool or numpy's ``bool_`` (what a config array or a numpy comparison gives),
    else a TypeError naming ``what``. ``bool(v)`` would take the string "False" as True, and 0 / 1 or None are
    as likely a wrong argument as a flag. Every boolean option in gradkit goes through this one rule."""
    if isinstance(v, (bool, getattr(sys.modules.get("numpy"), "bool_", bool))):
        return bool(v)
    raise TypeError(f"{what}: expected a bool, got {type(v).__name__} {v!r}")


# the floating dtypes gradkit's kernels take (float8 is floating, is_floating_point() says so, but no kernel takes it)
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def not_meta(t, what: str) -> None:
    """A meta tensor holds no values: a ValueError naming ``what`` (torch's own errors, "Cannot copy out of meta
    tensor" or "Tensor.item() cannot be called on meta tensors", name no argument). Anything else passes."""
    if isinstance(t, torch.Tensor) and t.is_meta:
        raise ValueError(f"{what}: is a meta tensor (no data); pass the materialised tensor")


def dense(t: torch.Tensor, what: str) -> None:
    """A sparse (or other non-strided) tensor is a TypeError naming ``what`` (torch's NotImplementedError /
    RuntimeError from deep inside a kernel names nothing the caller passed)."""
    if t.layout != torch.strided:
        raise TypeError(f"{what}: expected a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, a float8 one widened to float32 (exact): few ops (aminmax, isfinite, the kernels) take
    float8, and float32 holds every float8 value."""
    t = t.detach()
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())`` through one ``aminmax`` pass (NaN and +-inf reach the min or the max):
    no bool temporary, whose first-touch page faults made the check 16x slower on a 4096 x 4096 float32 matrix
    (58 ms against 3.6 ms at two threads, an Intel Xeon)."""
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    if not t.numel() or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(widened(t))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_symmetric(h: torch.Tensor, what: str, rtol: float = 1e-3, hint: str = "",
                    scale: Optional[float] = None) -> None:
    """Refuses a matrix that is not symmetric up to round-off: ``max |H - H^T|`` above ``max(rtol, 16 eps)``
    times ``max |H|`` (eps of ``h``'s dtype; ``scale``: that max when the caller has it). Both the OBS solves
    (which read one triangle) and the search preconditioner (which uses the symmetric part) take this rule.
    Compared in 256 x 256 tiles, each upper tile against its mirror transposed: both in L2 and no K x K
    temporary (K = 11008 would be ~0.5 GB in fp32). Row panels against transposed column panels, as before,
    read the transposed side a cache line per element: 160 ms against 40 ms for a float32 4096 x 4096 at two
    threads (an Intel Xeon)."""
    if not h.numel():
        return
    hd = h.detach()
    if scale is None:
        lo, hi = torch.aminmax(hd)  # one pass, no |H| temporary (its page faults were most of the cost)
        scale = max(abs(float(lo)), abs(float(hi)))
    tol = max(rtol, 16 * torch.finfo(hd.dtype).eps) * scale
    n, b = hd.shape[0], 256
    gaps = [(hd[i:i + b, j:j + b] - hd[j:j + b, i:i + b].T).abs().amax() for i in range(0, n, b) for j in range(i, n, b)]
    gap = float(torch.stack(gaps).max())
    if not gap <= tol:
        raise ValueError(f"{what}: is not symmetric (max |H - H^T| = {gap:.3g}, max |H| = {scale:.3g})"
                         + (f"; {hint}" if hint else ""))


def int_arg(v, what: str, desc: str = "an int", minimum: int = 0, min_desc: Optional[str] = None) -> int:
    """``v`` as a Python int (numpy integers too, never a bool), or a TypeError / ValueError naming ``what``:
    ``{what}: expected {desc}, got <type>`` and ``{what}: expected >= {minimum}[ min_desc], got v``."""
    if isinstance(v, bool):
        raise TypeError(f"{what}: expected {desc}, got a bool")
    try:
        n = operator.index(v)
    except TypeError:
        raise TypeError(f"{what}: expected {desc}, got {type(v).__name__}") from None
    if n < minimum:
        raise ValueError(f"{what}: expected >= {minimum}{' ' + min_desc if min_desc else ''}, got {n}")
    return n


def device_arg(device, what: str = "device", desc: str = "a torch.device or a device string") -> torch.device:
    """``device`` as a torch.device, or a ValueError naming ``what`` (torch raises RuntimeError / AssertionError
    for an unknown or unavailable device, deep inside the first allocation)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected {desc}, got {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}: {dev} was asked for but CUDA is not available")
    return dev


def int_seq(values, what: str, negative: Optional[str] = None) -> list:
    """The entries of ``values`` as Python ints (numpy integers too; never a bool or a float, which ``int(s)``
    would take as 1 or truncate), else a TypeError naming ``what``; with ``negative`` (a message), a negative
    entry is a ValueError ``{what}: {negative}``, checked entry by entry in order."""
    out = []
    for s in values:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{what}: expected a sequence of ints, got an entry {s!r}")
        if negative is not None and s < 0:
            raise ValueError(f"{what}: {negative}")
        out.append(int(s))
    return out

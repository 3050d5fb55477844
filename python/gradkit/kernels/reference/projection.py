"""Plain-PyTorch reference of the projection family: the definition of every generated entry.

Entry ``(row, col)`` of the projection matrix ``R`` (k x D) is a pure function of
``(seed, row, col)`` -- never of batch size, tiling, chunking, matrix shape or device:

* ``mix64(z)``: splitmix64's finaliser (a bijection of 64-bit words)::

      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
      z = (z ^ (z >> 27)) * 0x94D049BB133111EB
      z =  z ^ (z >> 31)                       (all mod 2^64, logical shifts)

* ``rowkey = mix64(seed ^ mix64(row + 0x632BE59BD9B4E019))``;
  ``word(w) = mix64(rowkey + (w + 1) * 0x9E3779B97F4A7C15)`` (a splitmix64 stream per row).
* **Rademacher** (``kind`` 0): bit ``col % 64`` of ``word(col // 64)`` set -> ``+s``, else ``-s``,
  ``s = fp32(1 / sqrt(k))`` (``1 / sqrt(k)`` in float64, correctly rounded, then rounded to fp32).
  Bit-identical on every backend.
* **Gaussian** (``kind`` 1): with ``h = word(col // 2)``, in float64:
  ``u1 = ((h >> 32) + 0.5) * 2^-32`` (in (0, 1)), ``u2 = (h & 0xffffffff) * 2^-32``,
  ``r = sqrt(-2 log u1)``, ``t = 2 pi u2``; entry = ``fp32(r cos t / sqrt(k))`` for even ``col``,
  ``fp32(r sin t / sqrt(k))`` for odd (``/ sqrt(k)`` as ``* (1 / sqrt(k))`` in float64). Backends
  agree within 1 ulp of fp32 (their float64 ``log``/``sin``/``cos`` differ by ~1 ulp of float64).

The scale depends only on ``k`` (the full output dimension), so ``R[row0:row0+rows,
col0:col0+cols]`` is an exact slice of any larger matrix with the same seed and k.

Ops (positional signatures of the schemas in csrc/ops.cpp):

* ``projection_matrix_(out, seed, kind, k, row0, col0)``: fills ``out`` (rows, cols).
* ``project_flat(x, k, seed, kind, col0)``: ``x (B, Dc) @ R[:, col0:col0+Dc]^T`` -> (B, k) fp32.
"""
from __future__ import annotations

import math

import torch

MIX_A = 0xBF58476D1CE4E5B9
MIX_B = 0x94D049BB133111EB
GOLDEN = 0x9E3779B97F4A7C15
ROW_C = 0x632BE59BD9B4E019
TWO_PI = 6.283185307179586
INV_2P32 = 2.0 ** -32
KINDS = {"rademacher": 0, "gaussian": 1}


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (two's-complement wraparound = mod 2^64)."""
    z = (z ^ _srl(z, 30)) * _s64(MIX_A)
    z = (z ^ _srl(z, 27)) * _s64(MIX_B)
    return z ^ _srl(z, 31)


def row_key(seed: int, rows: torch.Tensor) -> torch.Tensor:
    return mix64(mix64(rows + _s64(ROW_C)) ^ _s64(seed))


def word_hash(rk: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return mix64(rk + (w + 1) * _s64(GOLDEN))


def inv_sqrt_k(k: int) -> float:
    """1 / sqrt(k) in float64 (correctly rounded on every backend)."""
    return 1.0 / math.sqrt(float(k))


F32_MAX = float(torch.finfo(torch.float32).max)


def f64_row_scale(x: torch.Tensor):
    """The row-scaling rule for float64 inputs of a flat projection (csrc/project_wide.h holds the C++ copy for the
    CPU and CUDA kernels). Every kernel converts x to float32 before multiplying: a finite row entry past float32's
    range would become +-inf (and +v, -v then meet as inf - inf = NaN), and a row whose largest entry is nonzero and
    under 2**-100 would lose its values to subnormals or 0. Such rows are divided by the power of two (exact) that
    brings their largest entry to [2**63, 2**64), projected, and their outputs multiplied back in float64.

    Returns ``(wide, up)``: a (B,) bool of the rows that need it, and a (B, 1) float64 of their divisors (1 for
    every other row: in range, all-zero, or holding NaN / Inf, which propagate). One min / max reduction (no |x|
    copy), no data-dependent branch."""
    lo, hi = torch.aminmax(x.detach(), dim=1)
    amax = torch.maximum(-lo, hi)  # max |x| of each row (NaN: NaN)
    wide = ((amax > F32_MAX) | ((amax < 2.0 ** -100) & (amax > 0))) & torch.isfinite(amax)
    ex = torch.frexp(amax)[1].to(torch.float64)  # amax = m 2**ex, 0.5 <= m < 1
    up = torch.pow(2.0, torch.where(wide, ex - 64.0, torch.zeros_like(ex)))[:, None]
    return wide, up


def _check(seed: int, kind: int, k: int) -> None:
    if k <= 0:
        raise ValueError(f"k: must be positive, got {k}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed: must be a non-negative 63-bit integer, got {seed}")
    if kind not in (0, 1):
        raise ValueError(f"kind: expected 0 (rademacher) or 1 (gaussian), got {kind}")


def matrix_values(rows: int, cols: int, seed: int, kind: int, k: int, row0: int = 0, col0: int = 0,
                  device="cpu") -> torch.Tensor:
    """R[row0:row0+rows, col0:col0+cols] as a new fp32 tensor (the reference generator)."""
    _check(seed, kind, k)
    r = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)[:, None]
    c = torch.arange(col0, col0 + cols, dtype=torch.int64, device=device)[None, :]
    rk = row_key(seed, r)
    inv = inv_sqrt_k(k)
    if kind == 0:
        h = word_hash(rk, c >> 6)
        bit = (h >> (c & 63)) & 1  # arithmetic >>, then & 1: bit (c & 63) of the word
        s = torch.tensor(inv, dtype=torch.float64).to(torch.float32).item()
        return torch.where(bit.bool(), s, -s).to(torch.float32)
    h = word_hash(rk, c >> 1)
    u1 = (_srl(h, 32).double() + 0.5) * INV_2P32
    u2 = (h & 0xFFFFFFFF).double() * INV_2P32
    r_ = torch.sqrt(-2.0 * torch.log(u1))
    t = TWO_PI * u2
    z = torch.where((c & 1).bool(), r_ * torch.sin(t), r_ * torch.cos(t))
    return (z * inv).to(torch.float32)


def projection_matrix_(out: torch.Tensor, seed: int, kind: int, k: int, row0: int, col0: int) -> None:
    if out.dim() != 2:
        raise ValueError(f"out: expected a 2-D tensor (rows, cols), got shape {tuple(out.shape)}")
    if not out.dtype.is_floating_point:
        raise TypeError(f"out: expected a floating dtype, got {out.dtype}")
    if row0 < 0 or col0 < 0:
        raise ValueError(f"{'row0' if row0 < 0 else 'col0'}: must be non-negative")
    vals = matrix_values(out.shape[0], out.shape[1], seed, kind, k, row0, col0, device=out.device)
    out.copy_(vals)


def project_flat(x: torch.Tensor, k: int, seed: int, kind: int, col0: int) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor (B, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x: expected float32/float16/bfloat16/float64, got {x.dtype}")
    if col0 < 0:
        raise ValueError(f"col0: must be non-negative, got {col0}")
    R = matrix_values(k, x.shape[1], seed, kind, k, 0, col0, device=x.device)
    return x.double().matmul(R.double().T).to(torch.float32)


def factored_project(a: torch.Tensor, g: torch.Tensor, lt: torch.Tensor, rt: torch.Tensor, rb, mask, T: int) -> torch.Tensor:
    """Factored per-example projection of a Linear layer (the op ``factored_project``).

    a (N, I), g (N, O) float32 / bfloat16 / float16 (one dtype; widened exactly) with N = B * T tokens
    (example-major); lt = L^T (O, p), rt = R^T (I, p);
    rb (p,) or None; mask (N,) bool or None. Per token ``u = g_n lt``, ``v = a_n rt (+ rb)``; per example
    ``out[b] = sum over the unmasked tokens of b of u v^T`` -- ``L G_b R^T`` with ``G_b = sum_t g_t a_t^T``
    (plus the bias column) never formed. Returns (B, p, p) float32 (computed here in float64).
    """
    N = a.shape[0]
    p = lt.shape[1]
    u = g.double() @ lt.double()
    v = a.double() @ rt.double()
    if rb is not None:
        v = v + rb.double()
    if mask is not None:
        keep = mask[:, None]
        u = torch.where(keep, u, 0.0)
        v = torch.where(keep, v, 0.0)
    B = N // T
    return torch.bmm(u.view(B, T, p).transpose(1, 2), v.view(B, T, p)).float()

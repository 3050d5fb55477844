"""Plain-PyTorch oracles for the scope family (block norms, per-scope k-th largest,
structured masks, hard / soft thresholding): the definition every backend must match.

Layout. ``x`` has shape ``S`` (any strides). ``block_shape`` ``b`` (one entry per dim,
each dividing ``S``) cuts it into a *block grid* of shape ``B = S // b``;
``scope_shape`` ``s`` (in blocks, each dividing ``B``) groups the grid into *scopes*,
a scope grid of shape ``G = B // s``. Within a scope the ``prod(s)`` blocks are
numbered row-major over their in-scope coordinates; that number is the block's
*in-scope index* (ties go to the lowest one).

Scores. A block's score is ``sum |x|^p`` over its elements (``max |x|`` for
``p = inf``; ``|x|`` for single-element blocks, whatever p), accumulated in float32 (float64 for float64 inputs). That is a monotone
function of the block's Lp norm, so ranking by it ranks by norm; values returned to
the user (``block_norms``, ``scope_kth``) are norms, ``score ** (1/p)``. The summation order is
each backend's own: scores agree across backends to rounding, not bitwise, so blocks that tie only
in exact arithmetic may rank differently per backend (equal computed scores follow the tie rule). With
``raw=True`` the blocks must be single elements and the score is the signed value.

Selection (``nnz`` blocks per scope, ``0 <= nnz <= prod(s)``):
* default (exact): keep exactly ``nnz`` blocks per scope, the ``nnz`` largest scores,
  an equal score going to the lower in-scope index, so N:M patterns always hold;
* ``keep_ties``: keep every block whose score is ``>=`` the ``nnz``-th largest (the
  seed's rule); ``nnz = 0`` keeps nothing.
* In-place ops refuse an ``x`` that covers an element twice (torch's in-place rule), and read
  ``values`` / ``conditioner`` / thresholds that share x's storage as they were before x is written.
* NaN scores are never kept and never counted: a scope with fewer valid scores
  than ``nnz`` keeps all of its valid ones. ``scope_kth`` returns ``-inf`` for such a
  scope (every valid block passes a ``>=`` test against it).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch


def ieee_sqrt(t: torch.Tensor) -> torch.Tensor:
    """``t.sqrt()`` correctly rounded on every host, as the native and GPU kernels compute it.

    On an Intel CPU torch's float32 / float64 ``sqrt`` goes through MKL's vector math, which is
    accurate to 1 ulp but not correctly rounded (0.7% of uniform float64 inputs on an Emerald
    Rapids Xeon, session 26; MKL_CBWR=COMPATIBLE doubles that), while the AMD hosts' results
    were correctly rounded. The square root of a complex number with a zero imaginary part is
    the real root, correctly rounded, on both; zeros, negatives and NaN keep the real ``sqrt``
    (exact there: -0 stays -0).
    """
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return t.sqrt()
    root = torch.view_as_real(torch.complex(t, torch.zeros_like(t)).sqrt())[..., 0]
    return torch.where(t > 0, root, t.sqrt())


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grid_of(shape: Sequence[int], block_shape: Sequence[int]) -> List[int]:
    return [s // b for s, b in zip(shape, block_shape)]


def _blocked(x: torch.Tensor, block_shape: Sequence[int]) -> torch.Tensor:
    """(B0, b0, B1, b1, ...) view of a contiguous copy of x."""
    inter = []
    for s, b in zip(x.shape, block_shape):
        inter += [s // b, b]
    return x.contiguous().reshape(inter)


def block_scores(x: torch.Tensor, block_shape: Sequence[int], p: float, raw: bool = False) -> torch.Tensor:
    """Grid-shaped ranking scores (see module docstring), in the accumulation dtype."""
    a = x.to(acc_dtype(x.dtype))
    grid = grid_of(x.shape, block_shape)
    if raw:
        return a.contiguous().reshape(grid)
    if math.prod(block_shape) == 1:  # single elements: |x| ranks like every |x|^p
        return a.abs().contiguous().reshape(grid)
    v = _blocked(a.abs(), block_shape)
    red = tuple(range(1, 2 * x.dim(), 2))
    if math.isinf(p):
        if v.numel() == 0:
            return v.sum(dim=red)
        return v.amax(dim=red) if red else v
    if p == 1:
        return v.sum(dim=red)
    if p == 2:
        return (v * v).sum(dim=red)
    return v.pow(p).sum(dim=red)


def score_to_norm(s: torch.Tensor, p: float, raw: bool = False, single: bool = False) -> torch.Tensor:
    if raw or single or math.isinf(p) or p == 1:
        return s
    n = ieee_sqrt(s) if p == 2 else s.pow(1.0 / p)
    return torch.where(s < 0, s, n)  # -inf (fewer than k valid scores) stays -inf


def block_norms(x: torch.Tensor, block_shape: List[int], p: float) -> torch.Tensor:
    """Lp norm of every block: grid-shaped, x's dtype."""
    single = math.prod(block_shape) == 1
    return score_to_norm(block_scores(x, block_shape, p), p, single=single).to(x.dtype)


def to_scopes(g: torch.Tensor, scope_shape: Sequence[int]) -> torch.Tensor:
    """Grid-shaped tensor -> (numscp, numblk_per_scope), scopes row-major over the scope grid."""
    inter = []
    for n, s in zip(g.shape, scope_shape):
        inter += [n // s, s]
    v = g.reshape(inter)
    nd = g.dim()
    v = v.permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    return v.reshape(math.prod(n // s for n, s in zip(g.shape, scope_shape)), math.prod(scope_shape))


def from_scopes(r: torch.Tensor, grid: Sequence[int], scope_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``to_scopes``."""
    nd = len(grid)
    sg = [n // s for n, s in zip(grid, scope_shape)]
    v = r.reshape(list(sg) + list(scope_shape))
    perm = []
    for i in range(nd):
        perm += [i, nd + i]
    return v.permute(perm).reshape(list(grid))


def select_rows(s: torch.Tensor, nnz: int, keep_ties: bool) -> torch.Tensor:
    """(R, n) scores -> (R, n) bool keep mask, per the selection rules above."""
    valid = ~torch.isnan(s)
    if s.shape[1] == 0 or nnz == 0:
        return torch.zeros_like(s, dtype=torch.bool)
    if keep_ties:
        kth = kth_rows(s, nnz)
        return valid & (s >= kth.unsqueeze(1))
    filled = torch.where(valid, s, torch.full_like(s, -math.inf))
    order = torch.sort(filled, dim=1, descending=True, stable=True).indices
    # NaNs after every valid score (a valid -inf included), keeping the order among valid ones.
    inval = (~valid).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(inval, dim=1, stable=True).indices)
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(1, order[:, :nnz], True)
    return keep & valid


def kth_rows(s: torch.Tensor, k: int) -> torch.Tensor:
    """(R, n) -> (R,): k-th largest valid score per row; -inf where fewer than k are valid."""
    filled = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
    top = torch.sort(filled, dim=1, descending=True).values
    return top[:, k - 1]


def mid_value(v: torch.Tensor, v1: torch.Tensor, w: float) -> torch.Tensor:
    """``(v + w v1) / (1 + w)`` in v's dtype, rounded step by step, with the non-finite cases of MID_RULE."""
    if w == 0:
        return v.clone()
    m = (v + w * v1) / (1.0 + w)
    fin = torch.isfinite(v) & torch.isfinite(v1)
    # finite v, v1 whose formula overflows (w v1 or the sum past the dtype's range, or a w past it): the same
    # weights as two products that cannot overflow
    redo = fin & ~torch.isfinite(m)
    if bool(redo.any()):
        a, b = torch.tensor(1.0 / (1.0 + w), dtype=v.dtype), torch.tensor(w / (1.0 + w), dtype=v.dtype)
        m = torch.where(redo, v * a + v1 * b, m)
    # an infinite v (+inf, or -inf with v1 = -inf too) is the result; so is v1 = -inf below a finite v
    return torch.where(fin, m, torch.where(torch.isinf(v), v, v1))


MID_RULE = """``mid``: ``(v_k + w v_{k+1}) / (1 + w)`` (``w = k_weight``), in the accumulation dtype, where ``v_{k+1}``
is ``-inf`` when fewer than k+1 scores are valid. No NaN comes out of it: ``w = 0`` gives ``v_k`` (not
``v_k + 0 * inf``); an infinite ``v_k`` gives ``v_k`` (``+inf`` rather than ``inf - inf``), and ``v_{k+1} = -inf``
below a finite ``v_k`` gives ``-inf`` (every valid block passes a ``>=`` test against it); finite ``v_k``,
``v_{k+1}`` whose formula overflows (values near the dtype's largest, a ``w`` past its range) give
``v_k / (1 + w) + v_{k+1} w / (1 + w)``."""


def scope_kth(x: torch.Tensor, block_shape: List[int], scope_shape: List[int], k: int, p: float,
              raw: bool, k_weight: float, mid: bool) -> torch.Tensor:
    """Per scope: the k-th largest block norm (``mid``: ``(v_k + w v_{k+1}) / (1 + w)``); scope-grid shaped."""
    sc = block_scores(x, block_shape, p, raw)
    rows = to_scopes(sc, scope_shape)
    single = math.prod(block_shape) == 1
    v = score_to_norm(kth_rows(rows, k), p, raw, single)
    if mid:
        v1 = score_to_norm(kth_rows(rows, k + 1), p, raw, single)
        v = mid_value(v, v1, k_weight)
    sg = [n // s for n, s in zip(sc.shape, scope_shape)]
    return v.reshape(sg).to(x.dtype)


def expand_blocks(m: torch.Tensor, block_shape: Sequence[int]) -> torch.Tensor:
    """Grid-shaped tensor -> element shape, each block's value repeated over the block."""
    v = m
    for i, b in enumerate(block_shape):
        v = v.unsqueeze(2 * i + 1)
    inter = []
    for n, b in zip(m.shape, block_shape):
        inter += [n, b]
    return v.expand(inter).reshape([n * b for n, b in zip(m.shape, block_shape)])


def scope_block_mask(x: torch.Tensor, block_shape: Sequence[int], scope_shape: Sequence[int], nnz: int,
                     p: float, raw: bool, keep_ties: bool) -> torch.Tensor:
    sc = block_scores(x, block_shape, p, raw)
    keep = select_rows(to_scopes(sc, scope_shape), nnz, keep_ties)
    return from_scopes(keep, list(sc.shape), scope_shape).contiguous()


def scope_mask(x: torch.Tensor, block_shape: List[int], scope_shape: List[int], nnz: int, p: float,
               raw: bool, keep_ties: bool, expand: bool) -> torch.Tensor:
    """Bool keep-mask: element-shaped (contiguous) when ``expand``, else grid-shaped."""
    bm = scope_block_mask(x, block_shape, scope_shape, nnz, p, raw, keep_ties)
    return expand_blocks(bm, block_shape).contiguous() if expand else bm


def byte_span(t: torch.Tensor):
    """``(device, first, end)``: the byte addresses ``t``'s elements can occupy, ``[first, end)`` (its strided
    extent; ``t`` non-empty). Two tensors whose spans on one device meet may share memory."""
    extent = sum((d - 1) * st for d, st in zip(t.shape, t.stride())) + 1
    return t.device, t.data_ptr(), t.data_ptr() + extent * t.element_size()


def is_fake(t) -> bool:
    """A fake tensor (FakeTensorMode, AOT tracing; functional wrappers of one too): no data, no address. The skips
    for tracing test this and ``torch.compiler.is_dynamo_compiling()``, not ``torch.compiler.is_compiling()``: that
    one is a process-wide flag set for a whole compile session, so an eager call on another thread while any
    torch.compile ran skipped the checks (session 42: an inference tensor was written in place, silently)."""
    try:
        from torch._subclasses.fake_tensor import is_fake as _is_fake
    except ImportError:  # pragma: no cover
        return False
    return _is_fake(t)


def addressless(t: torch.Tensor) -> bool:
    """t has no address to compare (the overlap checks skip it; the kernels check when they run): while Dynamo
    traces (it cannot trace data_ptr), a meta or fake tensor (a fake's data_ptr is deprecated), or one without
    storage."""
    if torch.compiler.is_dynamo_compiling() or t.device.type == "meta" or is_fake(t):
        return True
    try:
        return t.data_ptr() == 0
    except Exception:  # noqa: BLE001 - functional or other wrapper tensors: nothing to compare
        return True


def check_inplace(x: torch.Tensor, what: Optional[str] = None) -> None:
    """An in-place op's x must not cover an element twice (torch's in-place rule and message, as
    ``at::assert_no_internal_overlap``; every backend checks). ``what``: the argument's name, to prefix the
    message with (the C++ checks that name it, e.g. obs_schur_extend_'s ``ut``, print the same).
    at::has_internal_overlap's YES (a non-empty x with a dim of size > 1 and stride 0) read off the strides, so that
    torch.compile traces it (Dynamo cannot trace ``torch._debug_has_internal_overlap``: obs_sweep_ and
    obs_schur_extend_ broke the graph)."""
    if x.layout == torch.strided and x.numel() != 0 and any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride())):
        raise RuntimeError(("" if what is None else f"{what}: ") +
                           "unsupported operation: more than one element of the written-to tensor refers to a single "
                           "memory location. Please clone() the tensor before performing the operation.")


def block_apply_mask_(x: torch.Tensor, block_shape: List[int], block_mask: torch.Tensor) -> None:
    """Set every element of the blocks where ``block_mask`` is False to exactly 0."""
    check_inplace(x)
    em = expand_blocks(block_mask, block_shape)
    x.masked_fill_(~em, 0)


def scope_hard_threshold_(x: torch.Tensor, values: Optional[torch.Tensor], block_shape: List[int],
                          scope_shape: List[int], nnz: int, p: float, keep_ties: bool) -> torch.Tensor:
    """Zero x's blocks not selected (scores from ``values`` when given, else x); returns the grid keep-mask."""
    check_inplace(x)
    bm = scope_block_mask(x if values is None else values, block_shape, scope_shape, nnz, p, False, keep_ties)
    block_apply_mask_(x, block_shape, bm)
    return bm


def check_soft_values(thresholds: Optional[torch.Tensor], conditioner: Optional[torch.Tensor], acc: torch.dtype,
                      names: Tuple[str, str] = ("thresholds", "conditioner")) -> None:
    """The value domain of ``block_soft_threshold_`` (every backend checks it before x is written; the C++
    kernels' ``check_soft_values`` in csrc/scope_layout.h, same messages): thresholds ``>= 0`` (a NaN one
    would zero or keep its block silently, a negative one scales the block *up*; ``+inf`` zeroes it), the
    conditioner finite and ``> 0`` everywhere (a positive diagonal metric: a zero entry can make ``t / h`` or
    ``h x / (h + mu)`` 0/0 = NaN, a negative one makes the problem non-convex and the bisection meaningless,
    an infinite one gives inf * 0). Both are judged as the kernels read them, in the accumulation dtype
    ``acc`` (rounding is monotone, so min / max of the tensor, then rounded, are those of the rounded
    tensor). One reduction over each; a single device-to-host copy brings the results back (for CUDA
    tensors the check's one host sync: the error has to be raised before the call returns). ``names``:
    the arguments as the caller calls them. Raises ValueError naming the argument."""
    parts = []
    if thresholds is not None and thresholds.numel():
        parts.append(thresholds.min().to(acc).reshape(1))
    if conditioner is not None and conditioner.numel():
        lo, hi = torch.aminmax(conditioner)
        parts += [lo.to(acc).reshape(1), hi.to(acc).reshape(1)]
    if not parts:
        return
    vals = torch.cat(parts).tolist()
    if thresholds is not None and thresholds.numel():
        tmin, vals = vals[0], vals[1:]
        if math.isnan(tmin):
            raise ValueError(f"{names[0]}: NaN threshold(s)")
        if tmin < 0:
            raise ValueError(f"{names[0]}: expected thresholds >= 0, got a minimum of {tmin:g}")
    if vals:
        hmin, hmax = vals
        if math.isnan(hmin) or math.isnan(hmax):
            raise ValueError(f"{names[1]}: NaN value(s); expected finite values > 0 (a positive diagonal metric)")
        if not (hmin > 0 and hmax < math.inf):
            raise ValueError(f"{names[1]}: expected finite values > 0 (a positive diagonal metric), got a minimum "
                             f"of {hmin:g} and a maximum of {hmax:g}")


SOFT_RULE = """Non-finite cases of the soft threshold (every backend): a block whose norm is NaN is set to 0; a
Euclidean scale ``1 - t / (n + eps)`` that is NaN (``t = +inf`` with an infinite norm ``n``, or ``0 / 0`` with
``t = n = eps = 0``) counts as 0; a scale of 0 writes zeros with x's signs (``x * 0``, and ``+-0`` for an
infinite x, where ``inf * 0`` would be NaN). So a threshold of ``+inf`` zeroes its block whatever it holds, and a
finite threshold leaves a block with an infinite element as it is (scale 1). Norms are fp32 sums of squares
(fp64 for fp64 x): a finite block whose sum overflows has norm ``+inf`` and is treated as such."""


def block_soft_threshold_(x: torch.Tensor, block_shape: List[int], thresholds: torch.Tensor,
                          conditioner: Optional[torch.Tensor], max_iter: int, atol: float, eps: float) -> None:
    """Group-lasso proximal step on every block, in place (values checked first: ``check_soft_values``).

    Euclidean (``conditioner`` None): ``x_b *= max(0, 1 - t_b / (||x_b||_2 + eps))``.
    Diagonal metric ``h`` (``conditioner``, x-shaped, positive): the minimiser of
    ``0.5 (y - x)^T diag(h) (y - x) + t ||y||_2`` per block, which is 0 when
    ``||h x_b|| <= t_b`` and otherwise ``h x / (h + mu)`` with ``mu ||h x / (h + mu)|| = t``;
    ``mu`` is found by bisection from ``[t h_min / (||h x|| - t), t h_max / (||h x|| - t)]``
    (``max_iter`` halvings, or until the bracket is narrower than ``atol``). Single-element
    blocks use the closed form ``x * max(0, 1 - (t / h) / (|x| + eps))``.
    Blocks whose norm is NaN are set to 0 (never kept). Non-finite cases: SOFT_RULE.
    """
    check_inplace(x)
    check_soft_values(thresholds, conditioner, acc_dtype(x.dtype))
    soft_threshold_unchecked_(x, block_shape, thresholds, conditioner, max_iter, atol, eps)


def soft_threshold_unchecked_(x: torch.Tensor, block_shape: List[int], thresholds: torch.Tensor,
                              conditioner: Optional[torch.Tensor], max_iter: int, atol: float, eps: float) -> None:
    """``block_soft_threshold_`` without its checks (a caller that made them: the Triton launcher's fallback)."""
    acc = acc_dtype(x.dtype)
    xb = _blocked(x.to(acc), block_shape)
    red = tuple(range(1, 2 * x.dim(), 2))
    t = thresholds.to(acc).reshape(grid_of(x.shape, block_shape))
    tb = expand_fake(t)
    nb = math.prod(block_shape)
    if conditioner is None or nb == 1:
        if conditioner is not None:
            hb = _blocked(conditioner.to(acc), block_shape)
            tb = tb / hb
        n = ieee_sqrt((xb * xb).sum(dim=red, keepdim=True))
        scale = (1 - tb / (n + eps)).clamp(min=0.0)
        scale = torch.where(torch.isnan(scale), torch.zeros_like(scale), scale)  # inf / inf, 0 / 0: see SOFT_RULE
        y = xb * scale
        y = torch.where((scale == 0) & torch.isinf(xb), torch.copysign(torch.zeros_like(y), xb), y)
        y = torch.where(torch.isnan(n), torch.zeros_like(y), y)
    else:
        hb = _blocked(conditioner.to(acc), block_shape)
        hw = hb * xb
        nhw = ieee_sqrt((hw * hw).sum(dim=red, keepdim=True))
        dead = ~(nhw > tb)
        denom = (nhw - tb).clamp(min=0.0) + eps
        lo = (tb * hb.amin(dim=red, keepdim=True) / denom).clamp(min=0.0)
        hi = (tb * hb.amax(dim=red, keepdim=True) / denom).clamp(min=0.0)
        done = torch.zeros_like(lo, dtype=torch.bool)
        mu = (lo + hi) / 2
        for _ in range(max_iter):
            z = hw / (hb + mu)
            zeta = mu * ieee_sqrt((z * z).sum(dim=red, keepdim=True))
            below = zeta < tb
            lo = torch.where(done, lo, torch.where(below, mu, lo))
            hi = torch.where(done, hi, torch.where(below, hi, mu))
            mu = torch.where(done, mu, (lo + hi) / 2)
            done = done | ((hi - lo).abs() < atol)
            if bool(done.all()):
                break
        y = hw / (hb + mu)
        y = torch.where(dead, torch.zeros_like(y), y)
    x.copy_(y.reshape(x.shape).to(x.dtype))


def expand_fake(t: torch.Tensor) -> torch.Tensor:
    """(B0, B1, ...) -> (B0, 1, B1, 1, ...) for broadcasting against a blocked view."""
    v = t
    for i in range(t.dim()):
        v = v.unsqueeze(2 * i + 1)
    return v

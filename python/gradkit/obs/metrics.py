"""Layer reconstruction error and the exact least-squares re-solve of kept weights on a support.

Conventions shared by every OBS routine in gradkit:

* ``W`` is a Linear weight ``(M, K)`` (out features x in features), ``X`` the calibration inputs
  ``(n, K)`` (one row per token) and ``H = X^T X`` (``(K, K)``, no 1/n or 2/n factor: the driver's
  :func:`gradkit.obs.driver.collect_hessians` returns exactly this sum). Every quantity below is
  invariant to a positive scale of ``H``, and damping is relative, so any other normalisation of
  ``H`` gives the same results.
* Damping (``damp``): ``lam = damp * mean(diag(H))`` when ``damp < 1`` (relative, SparseKit's
  ``compute_inverse`` rule), ``lam = damp`` when ``damp >= 1`` (absolute); ``H + lam I`` is used.
  Columns with ``H[j, j] == 0`` (an input that is always zero) are decoupled first: their row and
  column are zero already and their diagonal is set to the mean of the live diagonal entries (1 when
  every entry is dead), so a dead input never makes ``H`` singular and results stay invariant to the
  scale of ``H`` (SparseGPT sets 1, which made the mask depend on that scale: a dead input's weights
  cost ``w^2 (1 + lam)`` to prune against the live ones' ``w^2 H_jj``-sized costs).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from gradkit._rules import FLOATS as _FLOATS, all_finite, check_symmetric, flag, int_arg, not_meta

__all__ = ["output_error", "resolve", "damped_hessian", "NotPositiveDefiniteError"]



class NotPositiveDefiniteError(ValueError):
    """The (damped) Hessian, or one of its principal sub-blocks, failed a Cholesky factorisation."""


# --------------------------------------------------------------------------- checks (shared)


def _check_matrix(t, what: str, *, dims: int = 2) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{what}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{what}: expected a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    not_meta(t, what)  # session 42: torch's "Tensor.item() cannot be called on meta tensors" named no argument
    return t


def _check_finite(t: Tensor, what: str) -> None:
    if t.numel() and not all_finite(t):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{what}: contains {bad}")


def _check_hessian(h, k: int, what: str = "hessian") -> Tensor:
    _check_matrix(h, what)
    if h.shape[0] != h.shape[1]:
        raise ValueError(f"{what}: must be square (K, K), got shape {tuple(h.shape)}")
    if h.shape[0] != k:
        raise ValueError(f"{what}: is {h.shape[0]} x {h.shape[1]} but the weight has K={k} columns (in features)")
    scale = 0.0
    if h.numel():  # finite, and the largest |entry| for the symmetry rule, in one pass without temporaries
        lo, hi = (float(v) for v in torch.aminmax(h.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            _check_finite(h, what)  # names NaN or Inf
        scale = max(abs(lo), abs(hi))
    _check_symmetric(h, what, scale=scale)
    return h


def _check_symmetric(h: Tensor, what: str, rtol: float = 1e-3, scale: Optional[float] = None) -> None:
    """The Cholesky-based solves read one triangle only, so an asymmetric H would silently be replaced by its
    lower triangle: refused by gradkit's one symmetry rule."""
    check_symmetric(h, what, rtol, hint="expected X^T X of the layer inputs", scale=scale)


def _check_damp(damp) -> float:
    # a real number (numpy reals too); float() alone took the string "0.1" (and a bool as 0 / 1)
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real):
        raise TypeError(f"damp: expected a real number, got {type(damp).__name__}")
    d = float(damp)
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"damp: expected a finite number >= 0, got {damp!r}")
    return d


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def damped_hessian(hessian: Tensor, damp: float, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, float]:
    """``(H + lam I)`` in ``dtype`` (float32 or float64) with dead columns decoupled (see the module docstring),
    and ``lam``.

    The mean diagonal is taken over the original ``H``. A fresh tensor; ``hessian`` is untouched. ``hessian`` must
    be a finite, square, floating ``(K, K)`` matrix (ValueError / TypeError naming the argument otherwise)."""
    _check_matrix(hessian, "hessian")
    if hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian: must be square (K, K), got shape {tuple(hessian.shape)}")
    _check_finite(hessian, "hessian")
    return _damped_hessian(hessian, _check_damp(damp), _check_dtype(dtype))


def _damped_hessian(hessian: Tensor, d: float, dtype: torch.dtype) -> Tuple[Tensor, float]:
    """:func:`damped_hessian` for inputs the caller has checked already."""
    hd = hessian.detach().to(dtype=dtype, copy=True)
    diag = hd.diagonal()
    lam = d * float(diag.double().mean()) if (d < 1.0 and diag.numel()) else d
    dead = diag == 0
    if bool(dead.any()):
        diag[dead] = dead_diagonal(diag, dead)
    diag.add_(lam)
    return hd, lam


def dead_diagonal(diag: Tensor, dead: Tensor) -> float:
    """The value a dead input's diagonal entry takes (see the module docstring): the mean of the live entries, or 1
    when there are none."""
    live = diag[~dead]
    return float(live.double().mean()) if live.numel() else 1.0


class _threads:
    """``with _threads(n):`` run torch ops with ``n`` intra-op threads, restoring the setting after.

    Used around long sequences of small ops (SparseGPT's column sweep): with OpenMP's spinning
    barriers, several threads on ops of a few microseconds are slower than one, badly so on a busy
    machine."""

    def __init__(self, n: int) -> None:
        self.n = max(1, int(n))

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.old != self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.old:
            torch.set_num_threads(self.old)


def _batched(fn, outs, *ts: Tensor):
    """``fn(*ts, out=outs)`` over a batch of small matrices, MKL/OpenMP held to one thread per call.

    On this torch build a batched LAPACK call with more than one thread is several times slower
    than with one (and batched ``inv``/``solve`` hang outright), so the batch is split into
    ``torch.get_num_threads()`` chunks that run concurrently in Python threads (torch releases the
    GIL), each single-threaded, each writing its slice of the preallocated ``outs``. The thread
    setting is restored afterwards."""
    nt = torch.get_num_threads()
    b = ts[0].shape[0]
    single = isinstance(outs, Tensor)
    if ts[0].device.type != "cpu":
        fn(*ts, out=outs)
        return outs
    with _threads(1):
        if nt <= 1 or b < 2:
            fn(*ts, out=outs)
            return outs
        from concurrent.futures import ThreadPoolExecutor

        n = min(nt, b)
        o_parts = [o.tensor_split(n) for o in ((outs,) if single else outs)]
        t_parts = [t.tensor_split(n) for t in ts]

        def run(i):
            torch.set_num_threads(1)
            o = o_parts[0][i] if single else tuple(op[i] for op in o_parts)
            fn(*(tp[i] for tp in t_parts), out=o)

        with ThreadPoolExecutor(n) as ex:
            list(ex.map(run, range(n)))
    return outs


def _cholesky_inverse(lf: Tensor) -> Tensor:
    """``(L L^T)^-1`` from the lower factor, symmetrised. LAPACK's potri runs single-threaded:
    on this torch build it is 10-100x slower with two threads than with one."""
    with _threads(1 if lf.device.type == "cpu" else torch.get_num_threads()):
        c = torch.cholesky_inverse(lf)
    c = c + c.T
    return c.mul_(0.5)


def _cholesky(a: Tensor, what: str, damp: float, lam: float, upper: bool = False) -> Tensor:
    if a.dim() == 2:
        lf, info = torch.linalg.cholesky_ex(a, upper=upper)
    else:
        lf, info = _batched(lambda x, out: torch.linalg.cholesky_ex(x, upper=upper, out=out),
                            (torch.empty_like(a), torch.empty(a.shape[0], dtype=torch.int32, device=a.device)), a)
    if int(info.max() if info.dim() else info) > 0:
        raise NotPositiveDefiniteError(
            f"{what}: not positive definite even after damping (damp={damp}, {lam:.4g} added to the diagonal); "
            "increase damp")
    return lf


# --------------------------------------------------------------------------- output_error


def output_error(W: Tensor, W_pruned: Tensor, X: Optional[Tensor] = None, H: Optional[Tensor] = None,
                 chunk_elems: int = 1 << 22) -> float:
    """Relative layer reconstruction error ``||(W - W') X^T||_F^2 / ||W X^T||_F^2``.

    Give exactly one of ``X`` (``(n, K)`` calibration inputs, one row per token) or ``H``
    (``(K, K)``, ``X^T X``, positive semi-definite; then the error is ``tr(D H D^T) / tr(W H W^T)``
    with ``D = W - W'``). Accumulates in float64, chunked over the rows of ``W`` and of ``X`` so that
    no float64 intermediate (copies of ``W``/``X`` included) exceeds ``max(chunk_elems, K)``
    elements. A zero denominator gives 0.0 when ``W' == W`` on the data, else ``inf``. An ``H``
    that is not a Gram matrix (a negative diagonal entry, or a row's quadratic form below
    ``-max(1e-3, 16 eps) max|H| (sum_j |d_j|)^2``) is refused with ValueError; smaller negative
    forms (round-off of a low-precision ``X^T X``) count as 0. float64 inputs are first rescaled by exact powers of
    two (the ratio is invariant to a common scale of ``W`` and ``W'`` and to any scale of ``X`` / ``H``), so weights or
    inputs near the ends of the float64 range neither overflow (a NaN) nor underflow (a 0.0 for a total loss).
    """
    _check_matrix(W, "W")
    _check_matrix(W_pruned, "W_pruned")
    if W_pruned.shape != W.shape:
        raise ValueError(f"W_pruned: expected shape {tuple(W.shape)} (W's), got {tuple(W_pruned.shape)}")
    if (X is None) == (H is None):
        raise ValueError("output_error: give exactly one of X (n, K) or H (K, K)")
    cap = int_arg(chunk_elems, "chunk_elems", minimum=1)
    m, k = W.shape
    _check_finite(W, "W")
    _check_finite(W_pruned, "W_pruned")
    if X is not None:
        _check_matrix(X, "X")
        if X.shape[1] != k:
            raise ValueError(f"X: expected (n, {k}) (K = W's columns), got shape {tuple(X.shape)}")
        _check_finite(X, "X")
    else:
        _check_hessian(H, k, "H")
        if k and float(H.detach().diagonal().amin()) < 0:
            raise ValueError("H: has a negative diagonal entry; not a Gram matrix X^T X")
    dev = W.device
    W_pruned = W_pruned.to(dev)
    num = torch.zeros((), dtype=torch.float64, device=dev)
    den = torch.zeros((), dtype=torch.float64, device=dev)
    # float64 W / W' / X / H can square past the float64 range (NaN) or below it (0.0 for a total loss): scaled by
    # exact powers of two first, which leaves the ratio bit for bit as it is (narrower dtypes cannot get there)
    sw = _pow2_scale(W, W_pruned) if torch.float64 in (W.dtype, W_pruned.dtype) else 1.0

    def rows(r0: int, r1: int) -> Tuple[Tensor, Tensor]:
        w = W[r0:r1].detach().double()
        wp = W_pruned[r0:r1].detach().double()
        if sw != 1.0:
            w, wp = w * sw, wp * sw
        return w, w - wp

    if X is not None:
        n = X.shape[0]
        sx = _pow2_scale(X) if X.dtype == torch.float64 else 1.0
        xrows = max(1, min(n, cap // max(1, k)))  # rows of X converted to float64 at a time
        step = max(1, cap // max(xrows, k))  # rows of W: (step, k) copies and (step, xrows) products
        for x0 in range(0, n, xrows):
            xc = X[x0:x0 + xrows].detach().to(device=dev, dtype=torch.float64)
            if sx != 1.0:
                xc = xc * sx
            for r0 in range(0, m, step):
                w, dlt = rows(r0, r0 + step)
                num += (dlt @ xc.T).square().sum()
                den += (w @ xc.T).square().sum()
    else:
        other = H.detach().to(device=dev, dtype=torch.float64)
        if H.dtype == torch.float64:
            sh = _pow2_scale(other)
            if sh != 1.0:
                other = other * sh  # a new tensor: H itself is never written
        # |d H d^T| <= max|H| (sum_j |d_j|)^2 for any H: a form below -rtol times that bound is no round-off of a
        # Gram matrix (rtol as gradkit's symmetry rule); smaller negatives (an fp32 X^T X) count as 0
        rtol = max(1e-3, 16 * torch.finfo(H.dtype).eps)
        slack = rtol * (float(other.abs().amax()) if k else 0.0)
        step = max(1, cap // max(1, k))
        for r0 in range(0, m, step):
            w, dlt = rows(r0, r0 + step)
            qn = ((dlt @ other) * dlt).sum(1)
            qd = ((w @ other) * w).sum(1)
            if bool((qn < -slack * dlt.abs().sum(1).square()).any() or (qd < -slack * w.abs().sum(1).square()).any()):
                raise ValueError("H: not positive semi-definite (a quadratic form (W - W') H (W - W')^T is negative); "
                                 "expected X^T X of the layer inputs")
            num += qn.clamp_min(0).sum()
            den += qd.clamp_min(0).sum()
    num_f, den_f = float(num), float(den)
    if den_f == 0.0:
        return 0.0 if num_f == 0.0 else math.inf
    return num_f / den_f


def _pow2_scale(*ts: Tensor) -> float:
    """``2**-e`` bringing the largest ``|entry|`` of ``ts`` (finite) into [0.5, 1), ``e`` clamped to [-1020, 1024]
    so that the factor itself is a float64 (a power of two: multiplying by it is exact); 1.0 when all are 0."""
    big = 0.0
    for t in ts:
        if t.numel():
            lo, hi = (abs(float(v)) for v in torch.aminmax(t.detach()))
            big = max(big, lo, hi)
    if big == 0.0 or not math.isfinite(big):
        return 1.0
    e = min(max(math.frexp(big)[1], -1020), 1024)
    return 2.0 ** -e


# --------------------------------------------------------------------------- resolve


def cast_finite(w: Tensor, dtype: torch.dtype, what: str, tail: str = "", device=None) -> Tensor:
    """``w`` (finite, in the compute dtype) rounded to ``dtype`` (and moved to ``device``), or RuntimeError
    ``"<what> <dtype> (largest magnitude ...)<tail>"`` when a value leaves ``dtype``'s range (an fp16 weight):
    the overflow rule every pruner and ``prune_model`` apply before writing a weight back."""
    final = w.to(device=w.device if device is None else device, dtype=dtype)
    if not all_finite(final):
        raise RuntimeError(f"{what} {dtype} (largest magnitude {float(w.abs().max()):.4g}){tail}")
    return final


def resolve(W: Tensor, H: Tensor, mask: Tensor, damp: float = 0.0, out: Optional[Tensor] = None,
            dtype: torch.dtype = torch.float32, max_batch_bytes: int = 1 << 28, progress: bool = False) -> Tensor:
    """Exact per-row least-squares re-solve of the kept weights on a fixed support.

    For every row ``r`` with kept set ``S_r = {j : mask[r, j]}``, returns ``W'_r`` zero off ``S_r``
    minimising ``(W_r - W'_r) Hd (W_r - W'_r)^T`` with ``Hd = H + lam I`` (damped as in the module
    docstring; ``damp=0`` gives the plain least squares ``||(W_r - W'_r) X^T||^2``). Its normal
    equations ``Hd[S, S] W'_S = (Hd W_r^T)_S`` are solved in batches of rows of similar support
    size (equal for N:M masks; smaller systems are padded with identity rows, whose solution is 0),
    ``max_batch_bytes`` bounding each batch's gathered systems (``c^2 + 3K`` elements of ``dtype`` per row, ``c``
    its system's size, ``|S|`` or ``|P|`` below; a batch holds at least one row, so a budget below one row's system
    solves the rows one at a time, exceeding it by that row's system only):

    * keep side (``|S| <= |P|``, P the pruned set): ``Cholesky(Hd[S, S])`` + ``cholesky_solve``;
    * prune side (``|P| < |S|``, cheaper for light pruning): the same optimum written with
      ``C = Hd^-1`` as ``W' = W - (C[P, P]^-1 W_P)^T C[P, :]`` (one Cholesky of ``Hd``, then
      ``|P| x |P|`` Cholesky solves and one GEMM per batch).

    Only Cholesky factorisations are used (never batched ``linalg.inv``/``solve``). ``dtype``
    (float32 default, or float64) is the compute precision; a float32 factorisation that fails on
    a nearly singular ``H`` may succeed in float64. Rows with an empty support become 0;
    rows with a full support keep their weights as rounded to ``dtype`` (a float64 ``W`` with the default
    float32 comes back rounded to float32 there too; no factorisation: ``H`` need not be positive
    definite for them). Kept columns with ``H[j, j] == 0`` keep their weight. ``progress=True``
    shows a tqdm bar over the rows solved (a 50 % layer costs about ``M K^3 / 24`` multiply-adds).
    Returns ``W'`` in ``W``'s dtype (into ``out`` when given; ``out`` is written only on
    success). Raises :class:`NotPositiveDefiniteError` when a system is not positive definite
    (``H`` singular on the support: increase ``damp``), and RuntimeError when the weights, finite in
    ``dtype``, overflow the result's dtype (an fp16 ``W`` or ``out``).
    """
    _check_matrix(W, "W")
    m, k = W.shape
    _check_hessian(H, k, "H")
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = kept), got {mask.dtype}")
    if tuple(mask.shape) != (m, k):
        raise ValueError(f"mask: expected shape {(m, k)} (W's), got {tuple(mask.shape)}")
    if mask.is_meta:
        raise ValueError("mask: is a meta tensor (no data); pass the materialised mask")
    damp = _check_damp(damp)
    dtype = _check_dtype(dtype)
    if out is not None:
        if not isinstance(out, Tensor) or tuple(out.shape) != (m, k):
            raise ValueError(f"out: expected a tensor of shape {(m, k)}, got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        if out.dtype not in _FLOATS:
            raise TypeError(f"out: expected a floating tensor, got {out.dtype}")
        # session 42: each was refused by torch's copy_ only after the whole solve (or, on meta, nothing was written)
        if out.is_meta:
            raise ValueError("out: is a meta tensor (no memory to write the result into)")
        if out.layout != torch.strided or torch._debug_has_internal_overlap(out) == 1:
            raise ValueError("out: several elements share one memory location (an expanded tensor), or it is not "
                             "dense; pass a fresh tensor")
        # session 43: copy_ wrote an inference tensor (made under torch.inference_mode()) and then raised torch's
        # RuntimeError, after the whole solve; refused first, as gradkit's in-place ops refuse it
        from gradkit.ops import _check_not_inference

        _check_not_inference((out,), "out")
        if out.requires_grad and out.is_leaf and torch.is_grad_enabled():
            raise ValueError("out: a leaf tensor that requires grad cannot be written in place; pass out.detach() "
                             "or call resolve under torch.no_grad()")
    _check_finite(W, "W")
    mask = mask.to(W.device)
    # numpy integers too; a bool, a float or a value below 1 is refused (0 and negatives made every batch one row,
    # True was read as 1)
    max_batch_bytes = int_arg(max_batch_bytes, "max_batch_bytes", minimum=1)
    progress = flag(progress, "progress")

    dev = W.device
    hd, lam = _damped_hessian(H.to(dev), damp, dtype)
    w = W.detach().to(dtype)
    res = torch.zeros(m, k, dtype=dtype, device=dev)
    counts = mask.sum(1)
    esz = torch.finfo(dtype).bits // 8

    def chunks(rows: Tensor, size: Tensor, extra: int):
        """Rows sorted by system size, cut into batches of <= max_batch_bytes (systems padded to the
        batch's largest size with identity rows: their solution is 0)."""
        order = torch.argsort(size[rows], stable=True)
        rows, sz = rows[order], size[rows][order].tolist()
        i = 0
        while i < len(sz):
            j = i + 1
            while j < len(sz) and (j - i + 1) * (sz[j] * sz[j] + extra) * esz <= max_batch_bytes \
                    and sz[j] <= sz[i] + max(8, sz[i] // 8):
                j += 1
            yield rows[i:j], sz[j - 1]
            i = j

    def padded(mat: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
        a = mat[idx.unsqueeze(2), idx.unsqueeze(1)]
        if not bool(valid.all()):
            both = valid.unsqueeze(2) & valid.unsqueeze(1)
            eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device).expand_as(a)
            a = torch.where(both, a, eye)
        return a

    keep_rows = torch.nonzero((counts > 0) & (counts <= k - counts)).squeeze(1)
    prune_rows = torch.nonzero((counts > k - counts) & (counts < k)).squeeze(1)
    full = torch.nonzero((counts == k) & (counts > 0)).squeeze(1)
    res[full] = w[full]  # nothing to solve: no factorisation of H for them
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=keep_rows.numel() + prune_rows.numel(), desc="resolve", unit="row", leave=False)
    try:
        if keep_rows.numel():
            g = w @ hd  # (Hd W_r^T)^T for every row: Hd is symmetric
            for rb, c in chunks(keep_rows, counts, 3 * k):
                idx = torch.argsort((~mask[rb]).to(torch.int8), dim=1, stable=True)[:, :c]  # kept cols first, ascending
                valid = torch.arange(c, device=dev) < counts[rb].unsqueeze(1)
                a = padded(hd, idx, valid)
                lf = _cholesky(a, "H restricted to a row's kept columns (H[S, S])", damp, lam)
                rhs = g[rb].gather(1, idx).masked_fill_(~valid, 0.0).unsqueeze(2)
                x = _batched(torch.cholesky_solve, torch.empty_like(rhs), rhs, lf).squeeze(2)
                res[rb] = torch.zeros(rb.numel(), k, dtype=dtype, device=dev).scatter_(1, idx, x)
                if bar is not None:
                    bar.update(rb.numel())
        if prune_rows.numel():
            lh = _cholesky(hd, "H", damp, lam)
            cinv = _cholesky_inverse(lh)
            del lh
            for rb, p in chunks(prune_rows, k - counts, 3 * k):
                idx = torch.argsort(mask[rb].to(torch.int8), dim=1, stable=True)[:, :p]  # pruned cols first, ascending
                valid = torch.arange(p, device=dev) < (k - counts[rb]).unsqueeze(1)
                a = padded(cinv, idx, valid)
                lf = _cholesky(a, "the inverse of H restricted to a row's pruned columns (C[P, P])", damp, lam)
                wr = w[rb]
                rhs = wr.gather(1, idx).masked_fill_(~valid, 0.0).unsqueeze(2)
                y = _batched(torch.cholesky_solve, torch.empty_like(rhs), rhs, lf).squeeze(2)
                ydense = torch.zeros_like(wr).scatter_(1, idx, y.masked_fill_(~valid, 0.0))
                res[rb] = torch.addmm(wr, ydense, cinv, alpha=-1.0).masked_fill_(~mask[rb], 0.0)
                if bar is not None:
                    bar.update(rb.numel())
    finally:
        if bar is not None:
            bar.close()
    if not all_finite(res):
        raise NotPositiveDefiniteError("resolve: the solve produced non-finite weights (H is numerically singular "
                                       f"on a support even with damp={damp}); increase damp")
    # finite in `dtype`, not necessarily in an fp16 result's range: refused before `out` is written
    final = cast_finite(res, W.dtype if out is None else out.dtype,
                        "resolve: the re-solved weights overflow the result's dtype")
    if out is not None:
        out.copy_(final)
        return out
    return final

"""Op wrappers, validation and fake impls for the obs family (schemas in csrc/ops.cpp).

``obs_select`` is the scoring / selection step of independent OBS pruning: one fused pass that
computes every block's cost from the weights and the inverse-Hessian diagonal and lists the
positions of the pruned blocks' elements.
"""
from __future__ import annotations

import functools
import os

import torch

from gradkit import _ext
from gradkit.kernels.reference import obs as _ref
from gradkit.kernels.reference.scope import check_inplace as _check_inplace, is_fake
from gradkit.ops import (_REAL, _check_read_no_grad, _check_typed, _check_writable, _fake_check, _flag, _impl, _int,
                         _isfinite, _wrote, backend)

__all__ = ["OBS_OPS", "SHARED_MAX_P", "obs_schur_extend_", "obs_select", "obs_shared_prune", "obs_sweep_"]

OBS_OPS = ("obs_select", "obs_shared_prune", "obs_schur_extend_", "obs_sweep_")
SHARED_MAX_P = 64  # pruned elements per subset the kernels take


# The check_* functions take an op's schema arguments (csrc/ops.cpp): the op wrappers run them, and so do the
# Triton launchers where they are the ops' CUDA kernels (gradkit._ext.register_triton_for_cuda).


def check_obs_select(w, d, gs, bk, num_prune, eps) -> tuple:
    """Returns (gs, bk, num_prune, eps) as ints and a float."""
    _check_typed((("w", w), ("d", d)), torch.float32)
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D tensor (n, nb), got shape {tuple(w.shape)}")
    if d.shape != w.shape:
        raise ValueError(f"d: expected shape {tuple(w.shape)} (that of w), got {tuple(d.shape)}")
    if d.device != w.device:
        raise ValueError(f"d: on {d.device} but w is on {w.device}")
    gs = _int(gs, "gs")
    bk = _int(bk, "bk")
    num_prune = _int(num_prune, "num_prune")
    if gs < 1:
        raise ValueError(f"gs: expected >= 1 blocks per scope, got {gs}")
    if bk < 1:
        raise ValueError(f"bk: expected >= 1 elements per block, got {bk}")
    if not 0 <= num_prune <= gs:
        raise ValueError(f"num_prune: expected 0 <= num_prune <= gs = {gs}, got {num_prune}")
    if w.shape[1] % (gs * bk):
        raise ValueError(f"w: the row length {w.shape[1]} is not a multiple of gs * bk = {gs} * {bk}")
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, _REAL)):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if not _isfinite(eps) or eps < 0:  # a SymFloat under torch.compile(dynamic=True): no math.isfinite
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    return gs, bk, num_prune, float(eps)


def obs_select(w: torch.Tensor, d: torch.Tensor, gs: int, bk: int, num_prune: int, eps: float = 1e-8) -> torch.Tensor:
    """Positions of the elements of the ``num_prune`` lowest-cost blocks of every (row, scope).

    w, d: (n, nb) float32 (weights and the matching diagonal of the inverse Hessian; any strides),
    nb = nq * gs * bk: each row is nq consecutive scopes, each of gs consecutive blocks of bk
    consecutive elements. Block cost, in fp32, summed over the block's elements in order::

        c[r, q, b] = sum_j w[r, e]^2 / (d[r, e] + eps),   e = (q * gs + b) * bk + j

    Per (row, scope) the ``num_prune`` blocks with the lowest cost are pruned; equal costs take the
    lower block index first; a NaN cost counts as +inf (pruned last, ranked among the +inf costs
    by block index). ``d`` is not required to be positive (a zero or negative ``d + eps`` gives an
    inf / negative cost, ranked as such).

    Returns int64 (n, nq * num_prune * bk): per row, the local positions (0 .. nb - 1) of every
    element of every pruned block, ascending. ``num_prune == 0`` gives an (n, 0) tensor.
    """
    gs, bk, num_prune, eps = check_obs_select(w, d, gs, bk, num_prune, eps)
    if num_prune == 0:
        return torch.empty((w.shape[0], 0), dtype=torch.int64, device=w.device)
    return _impl("obs_select", "obs")(w.contiguous(), d.contiguous(), gs, bk, num_prune, eps)


def check_obs_shared_prune(w, c, cinv, pidx, E, local, values: bool = True) -> int:
    """Returns E as an int (pidx is read on the host: one copy for a CUDA pidx). ``values`` False: pidx's entries
    are not read (fake impl, torch.compile tracing: there they are data; the kernels check them when they run)."""
    _check_typed((("w", w),), torch.float32)
    _check_typed((("c", c), ("cinv", cinv)), torch.float32, ("w", w.device))
    _check_typed((("pidx", pidx),), torch.int64, ("w", w.device))
    E = _int(E, "E")
    local = _flag(local, "local")
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D tensor (n, K), got shape {tuple(w.shape)}")
    n, K = w.shape
    if E < 1 or K % E:
        raise ValueError(f"E: expected >= 1 dividing the row length {K}, got {E}")
    if c.shape != (K, K):
        raise ValueError(f"c: expected shape ({K}, {K}), got {tuple(c.shape)}")
    if pidx.dim() != 2 or pidx.shape[0] < 1 or not 1 <= pidx.shape[1] <= min(E, SHARED_MAX_P):
        raise ValueError(f"pidx: expected (ns >= 1, p) with 1 <= p <= min(E, {SHARED_MAX_P}), got "
                         f"{tuple(pidx.shape)}")
    ns, p = pidx.shape
    if cinv.shape != (K // E, ns, p, p):
        raise ValueError(f"cinv: expected shape {(K // E, ns, p, p)}, got {tuple(cinv.shape)}")
    if not values:
        return E
    ph = pidx.cpu()
    if bool((ph < 0).any()) or bool((ph >= E).any()) or (p > 1 and not bool((ph[:, 1:] > ph[:, :-1]).all())):
        raise ValueError(f"pidx: every row must be strictly ascending in [0, E={E})")
    return E


def obs_shared_prune(w: torch.Tensor, c: torch.Tensor, cinv: torch.Tensor, pidx: torch.Tensor, E: int,
                     local: bool = True):
    """Shared-inverse OBS: per (row, scope) the prune subset of lowest cost, pruned, with local compensation.

    w (n, K) float32, K = nq * E (each row: nq consecutive scopes of E elements); c (K, K) float32, the
    shared inverse Hessian (only its within-scope diagonal blocks are read); cinv (nq, ns, p, p)
    float32, ``(C[P,P] + eps I)^-1`` of every (slot, subset); pidx (ns, p) int64, the subsets' in-scope
    element indices, strictly ascending in [0, E), p <= 64. Per (row, scope)::

        cost(s) = w_P^T cinv[q, s] w_P      (fp32, index order; NaN -> +inf), lowest s of minimal cost
        w_P <- 0;   local: w_e <- w_e - C[e, P] cinv[q, s] w_P  for the scope's other elements e

    Returns (w' (n, K) float32, chosen subset (n, nq) int64). See
    ``gradkit.kernels.reference.obs.obs_shared_prune`` for the exact arithmetic.
    """
    # traced by torch.compile: pidx's entries are data (a data-dependent guard, an error under fullgraph=True);
    # the op checks them when it runs (C++ kernels, Triton launcher)
    E = check_obs_shared_prune(w, c, cinv, pidx, E, local,
                               values=not (torch.compiler.is_dynamo_compiling() or is_fake(pidx)))
    return _impl("obs_shared_prune", "obs")(w, c, cinv, pidx, E, local)


def check_obs_schur_extend_(ut, xf, up, linv, cnt) -> int:
    """Returns cnt as an int."""
    _check_typed((("ut", ut),), (torch.float32, torch.bfloat16, torch.float16))
    _check_typed((("xf", xf), ("up", up), ("linv", linv)), torch.float32, ("ut", ut.device))
    cnt = _int(cnt, "cnt")
    if ut.dim() != 3:
        raise ValueError(f"ut: expected a 3-D tensor (n, cap, K), got shape {tuple(ut.shape)}")
    n, cap, K = ut.shape
    if xf.dim() != 3 or xf.shape[0] != n or xf.shape[2] > K:
        raise ValueError(f"xf: expected shape ({n}, m, F <= {K}), got {tuple(xf.shape)}")
    m = xf.shape[1]
    if cnt < 0 or cnt + m > cap:
        raise ValueError(f"cnt: expected 0 <= cnt and cnt + m <= {cap} (m = {m}), got {cnt}")
    if up.shape != (n, m, cnt):
        raise ValueError(f"up: expected shape ({n}, {m}, {cnt}), got {tuple(up.shape)}")
    if linv.shape != (n, m, m):
        raise ValueError(f"linv: expected shape ({n}, {m}, {m}), got {tuple(linv.shape)}")
    _check_inplace(ut, "ut")  # an expanded / stride-0 ut: rows written twice, one row's result lost
    _check_writable([ut], "ut")
    _check_read_no_grad([("xf", xf), ("up", up), ("linv", linv)], "ut")
    return cnt


def obs_schur_extend_(ut: torch.Tensor, xf: torch.Tensor, up: torch.Tensor, linv: torch.Tensor, cnt: int) -> None:
    """One factor extension of true OBS, in place: ``ut[:, cnt:cnt+m, K-F:] = linv @ (xf - up @ ut[:, :cnt, K-F:])``.

    ut (n, cap, K) float32 / bfloat16 / float16, any strides: the factor U of the rows' downdated
    inverse Hessians, transposed (ut[:, j, f] = U[f, j]), its first ``cnt`` rows written so far;
    xf (n, m, F) float32: C_row[P, F], the inverse Hessian at the m newly pruned positions P on the F
    undecided positions (the last F of the K); up (n, m, cnt) float32: U[P, :cnt]; linv (n, m, m)
    float32: the inverse Cholesky factor of the downdated C_row[P, P]. Products and sums in float32
    (up rounded to ut's dtype first: exact when read from the factor, so a half-precision factor runs
    on the half-precision matrix units), the result rounded to ut's dtype. Writes rows cnt .. cnt+m on
    the last F positions only; xf, up and linv must not overlap ut, nor ut itself (an expanded or stride-0
    ut is refused, as torch's in-place ops refuse it). See
    ``gradkit.kernels.reference.obs.obs_schur_extend_``.
    """
    cnt = check_obs_schur_extend_(ut, xf, up, linv, cnt)
    n, m = ut.shape[0], xf.shape[1]
    if ut.is_cuda and ut.dtype != torch.float32 and backend() == "native" and m <= _SCHUR_FUSED_M and \
            n <= _SCHUR_MAX_ROWS and os.environ.get("GRADKIT_SCHUR_CUDA_CPP", "0") != "1" and \
            _tensor_core_schur() is not None:
        # a half-precision factor: the Triton kernel's tl.dot runs on the tensor cores; the CUDA C++
        # kernel accumulates on the fp32 units (GRADKIT_SCHUR_CUDA_CPP=1 selects it instead). Past the
        # Triton kernel's range (m > 256 or n > 65535) both take a cuBLAS composite: the op's (CUDA C++),
        # whose products stay float32 under TF32, not the Triton launcher's torch fallback, whose do not
        fn = _tensor_core_schur()
    else:
        fn = _impl("obs_schur_extend_", "obs")
    fn(ut, xf, up, linv, cnt)
    _wrote([ut], fn)


def check_obs_sweep_(w, err, u, prune, start, stop) -> tuple:
    """Returns (start, stop) as ints."""
    _check_typed((("w", w),), (torch.float32, torch.float64))
    _check_typed((("err", err), ("u", u)), w.dtype, ("w", w.device))
    _check_typed((("prune", prune),), torch.bool, ("w", w.device))
    start = _int(start, "start")
    stop = _int(stop, "stop")
    _ref.check_sweep(w, err, u, prune, start, stop)
    _check_writable([w], "w")
    _check_writable([err], "err")
    _check_read_no_grad([("u", u)], "w and err")
    return start, stop


def obs_sweep_(w: torch.Tensor, err: torch.Tensor, u: torch.Tensor, prune: torch.Tensor, start: int,
               stop: int) -> None:
    """SparseGPT's column sweep over one lazy block, in place: for i in [start, stop), in order,
    ``err[i] = where(prune[i], w[i] / u[i, i], 0)``, ``w[i]`` zeroed where pruned, and
    ``w[j] -= u[i, j] * err[i]`` for every later row j of the block (the product rounded, then the difference:
    the same bits on every backend).

    w (n, m) float32 / float64, the lazy block transposed (row i = weight column i; one entry per weight row),
    unit stride along m; err (n, m) of w's dtype, unit stride along m; u (n, n) of w's dtype, the block of the
    upper Cholesky factor of the damped inverse Hessian (only u[i, i:] is read); prune (n, m) bool;
    0 <= start <= stop <= n. w and err must not share memory with each other, u or prune. Checked before
    anything is written. See ``gradkit.kernels.reference.obs.obs_sweep_``.
    """
    start, stop = check_obs_sweep_(w, err, u, prune, start, stop)
    fn = _impl("obs_sweep_", "obs")
    fn(w, err, u, prune, start, stop)
    _wrote([w, err], fn)


_SCHUR_FUSED_M = 256  # kernels.triton.obs.MAX_FUSED_M (== csrc/cuda/obs.cu kSchurMaxM)
_SCHUR_MAX_ROWS = 65535  # rows on grid axis y of either kernel


@functools.lru_cache(maxsize=None)
def _tensor_core_schur():
    """The Triton obs_schur_extend_ where triton imports (looked up once), else None."""
    try:
        import importlib

        return importlib.import_module("gradkit.kernels.triton.obs").obs_schur_extend_
    except Exception:  # pragma: no cover - triton missing
        return None


def _obs_schur_extend_fake(ut, xf, up, linv, cnt):
    _fake_check(check_obs_schur_extend_, ut, xf, up, linv, cnt)
    return None


def _obs_sweep_fake(w, err, u, prune, start, stop):
    _fake_check(check_obs_sweep_, w, err, u, prune, start, stop)
    return None


def _obs_shared_prune_fake(w, c, cinv, pidx, E, local):
    _fake_check(check_obs_shared_prune, w, c, cinv, pidx, E, local, values=False)
    n, K = w.shape
    return w.new_empty((n, K)), w.new_empty((n, K // E), dtype=torch.int64)


def _obs_select_fake(w, d, gs, bk, num_prune, eps):
    _fake_check(check_obs_select, w, d, gs, bk, num_prune, eps)
    n, nb = w.shape
    return w.new_empty((n, (nb // (gs * bk)) * num_prune * bk), dtype=torch.int64)


if _ext.has_op("obs_select"):
    torch.library.register_fake("gradkit::obs_select", _obs_select_fake, _stacklevel=_ext.ops_package_stacklevel())
    if _ext.has_op("obs_shared_prune"):
        torch.library.register_fake("gradkit::obs_shared_prune", _obs_shared_prune_fake,
                                    _stacklevel=_ext.ops_package_stacklevel())
    if _ext.has_op("obs_schur_extend_"):
        torch.library.register_fake("gradkit::obs_schur_extend_", _obs_schur_extend_fake,
                                    _stacklevel=_ext.ops_package_stacklevel())
    if _ext.has_op("obs_sweep_"):
        torch.library.register_fake("gradkit::obs_sweep_", _obs_sweep_fake, _stacklevel=_ext.ops_package_stacklevel())

    # Triton is the GPU kernel where the extension was built without CUDA C++.
    _ext.register_triton_for_cuda("obs", OBS_OPS)

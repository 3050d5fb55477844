"""Op wrappers, validation and fake impls for the obs family (schemas in csrc/ops.cpp).

``obs_select`` is the scoring / selection step of independent OBS pruning: one fused pass that
computes every block's cost from the weights and the inverse-Hessian diagonal and lists the
positions of the pruned blocks' elements.
"""
from __future__ import annotations

import math
import numbers

import torch

from gradkit import _ext
from gradkit.ops import _impl

__all__ = ["OBS_OPS", "obs_select"]

OBS_OPS = ("obs_select",)


def _int(v, what: str) -> int:
    if type(v) is int:  # the common case, fast
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{what}: expected an int, got {type(v).__name__}")
    return int(v)


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
    for name, t in (("w", w), ("d", d)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected a float32 tensor, got {t.dtype}")
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
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if num_prune == 0:
        return torch.empty((w.shape[0], 0), dtype=torch.int64, device=w.device)
    return _impl("obs_select", "obs")(w.contiguous(), d.contiguous(), gs, bk, num_prune, float(eps))


def _obs_select_fake(w, d, gs, bk, num_prune, eps):
    n, nb = w.shape
    return w.new_empty((n, (nb // (gs * bk)) * num_prune * bk), dtype=torch.int64)


if _ext.has_op("obs_select"):
    torch.library.register_fake("gradkit::obs_select", _obs_select_fake, _stacklevel=_ext.ops_package_stacklevel())

    # Triton is the GPU kernel where the extension was built without CUDA C++.
    if torch.cuda.is_available():
        try:
            import importlib

            _tri_obs = importlib.import_module("gradkit.kernels.triton.obs")
        except Exception:  # pragma: no cover - triton missing: CUDA tensors get a dispatcher error
            _tri_obs = None
        if _tri_obs is not None:
            for _name in OBS_OPS:
                if not _ext.has_kernel(_name, "CUDA") and hasattr(_tri_obs, _name):
                    torch.library.impl(f"gradkit::{_name}", "CUDA")(getattr(_tri_obs, _name))

"""Op wrappers, validation and fake impls for the search family (schemas in csrc/ops.cpp).

``score_topk`` scores queries against a block of keys by inner product and merges the block's
best candidates into a running top-k. Streaming search over an index calls it once per block of
rows, feeding each result back as ``scores_in``/``idx_in`` with ``base`` = the block's first row.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from gradkit import _ext
from gradkit.ops import _fake_check, _flag, _int, loop_vmap_staticmethod, register_loop_vmap

__all__ = ["score_topk", "check_score_topk", "SEARCH_OPS", "KEY_DTYPES"]

SEARCH_OPS = ("score_topk",)
KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT64_MAX = (1 << 63) - 1


def check_score_topk(queries, keys, k, largest, key_scale, scores_in, idx_in, base) -> Tuple[int, int]:
    """score_topk's checks (the op wrapper's and the Triton launcher's; csrc/search_checks.h for the C++
    kernels); returns (k, base)."""
    if not isinstance(queries, torch.Tensor) or queries.dtype != torch.float32:
        raise TypeError(f"queries: expected a float32 tensor, got {getattr(queries, 'dtype', type(queries).__name__)}")
    if queries.dim() != 2:
        raise ValueError(f"queries: expected a 2-D tensor (Q, D), got shape {tuple(queries.shape)}")
    if not isinstance(keys, torch.Tensor) or keys.dtype not in KEY_DTYPES:
        raise TypeError(f"keys: expected a float32/float16/bfloat16 tensor, got "
                        f"{getattr(keys, 'dtype', type(keys).__name__)}")
    if keys.dim() != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(f"keys: expected shape (N, {queries.shape[1]}) to match queries' D, got {tuple(keys.shape)}")
    if keys.device != queries.device:
        raise ValueError(f"keys: on {keys.device} but queries is on {queries.device}")
    k = _int(k, "k")
    if k < 0:
        raise ValueError(f"k: must be non-negative, got {k}")
    base = _int(base, "base")
    if base < 0:
        raise ValueError(f"base: must be non-negative, got {base}")
    if base + max(keys.shape[0] - 1, 0) > _INT64_MAX:  # row numbers are int64: wrapped ones read as empty slots
        raise ValueError(f"base: {base} + {keys.shape[0]} keys overflows the int64 row numbers")
    _flag(largest, "largest")  # a bool or numpy's bool_ (np.bool_ was refused as "expected a bool, got bool")
    if key_scale is not None:
        if not isinstance(key_scale, torch.Tensor) or key_scale.dtype != torch.float32:
            raise TypeError("key_scale: expected a float32 tensor or None")
        if key_scale.shape != (keys.shape[0],):
            raise ValueError(f"key_scale: expected shape ({keys.shape[0]},), got {tuple(key_scale.shape)}")
        if key_scale.device != queries.device:
            raise ValueError(f"key_scale: on {key_scale.device} but queries is on {queries.device}")
    if (scores_in is None) != (idx_in is None):
        raise ValueError("scores_in, idx_in: give both or neither")
    if scores_in is not None:
        if not isinstance(scores_in, torch.Tensor) or scores_in.dtype != torch.float32:
            raise TypeError("scores_in: expected a float32 tensor")
        if not isinstance(idx_in, torch.Tensor) or idx_in.dtype != torch.int64:
            raise TypeError("idx_in: expected an int64 tensor")
        if scores_in.dim() != 2 or scores_in.shape[0] != queries.shape[0]:
            raise ValueError(f"scores_in: expected shape ({queries.shape[0]}, k_in), got {tuple(scores_in.shape)}")
        if idx_in.shape != scores_in.shape:
            raise ValueError(f"idx_in: expected shape {tuple(scores_in.shape)}, got {tuple(idx_in.shape)}")
        if scores_in.device != queries.device or idx_in.device != queries.device:
            raise ValueError("scores_in, idx_in: must be on the queries' device")
    return k, base


def score_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, largest: bool = True,
               key_scale: Optional[torch.Tensor] = None, scores_in: Optional[torch.Tensor] = None,
               idx_in: Optional[torch.Tensor] = None, base: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blocked exact top-k by inner product, merged into a running top-k.

    queries: (Q, D) float32; keys: (N, D) float32/float16/bfloat16 (any row stride; upcast to
    float32 per block); key_scale: (N,) float32 multiplying each key's score (e.g. inverse
    norms for cosine) or None; scores_in / idx_in: (Q, k_in) float32 / int64 running top-k
    (idx -1 = empty slot) or None; base: index of keys[0]. ``largest``: a bool (numpy's ``bool_`` too;
    anything else, a string included, is a TypeError).

    Returns (scores (Q, k) float32, indices (Q, k) int64): the k best of the running top-k and
    the new candidates, best first (largest: highest score, else lowest), ties lowest index
    first; NaN scores rank as -inf (largest) / +inf (smallest); slots without a candidate are
    (-inf, -1) (largest) or (+inf, -1).
    """
    from gradkit.ops import _fn_autograd, _impl, gpu_composite

    k, base = check_score_topk(queries, keys, k, largest, key_scale, scores_in, idx_in, base)
    largest = bool(largest)  # np.bool_ -> bool for the op schemas
    if keys.shape[0] and keys.shape[1] and keys.stride(1) != 1:
        keys = keys.contiguous()  # the kernels read rows with unit column stride
    if gpu_composite(queries):  # H200: blocked cuBLAS 25.0 ms, CUDA C++ kernel 71.8 (1,000 x 1M x 256, top-10)
        from gradkit.kernels import composite

        fn = composite.score_topk
    else:
        fn = _impl("score_topk", "search")
    # torch.func refuses the op's own autograd (and a composite's branches on data); a Triton launcher has none
    if _fn_autograd(fn, [queries, keys, key_scale, scores_in]):
        return _ScoreTopkFn.apply(queries, keys, k, largest, key_scale, scores_in, idx_in, base, fn)
    return fn(queries, keys, k, largest, key_scale, scores_in, idx_in, base)


def _score_topk_fake(queries, keys, k, largest, key_scale, scores_in, idx_in, base):
    _fake_check(check_score_topk, queries, keys, k, largest, key_scale, scores_in, idx_in, base)
    q = queries.shape[0]
    return queries.new_empty((q, k), dtype=torch.float32), queries.new_empty((q, k), dtype=torch.int64)


def _score_topk_setup(ctx, inputs, output):
    queries, keys, k, largest, key_scale, scores_in, idx_in, base = inputs
    ctx.save_for_backward(queries, keys, key_scale, scores_in, idx_in, output[0], output[1])
    ctx.base = int(base)
    ctx.largest = bool(largest)
    ctx.mark_non_differentiable(output[1])


def _from_scores_in(scores_in, idx_in, out_s, idx, largest):
    """(Q, k, k_in) bool: slot j of query q holds scores_in[q, m]. A row can be a candidate more than once (a
    repeat in idx_in, or an idx_in row that is also in this block); candidates of equal row and score are taken
    in their order (scores_in's, then the block's), as the reference's stable selection takes them, so the t-th
    slot holding (row, score) is the t-th scores_in entry with that row and score, else the block's row."""
    inf = float("inf")
    s_in = torch.nan_to_num(scores_in, nan=-inf if largest else inf, posinf=inf, neginf=-inf)  # as reported
    same = (idx_in[:, None, :] == idx[:, :, None]) & (s_in[:, None, :] == out_s[:, :, None]) \
        & (idx >= 0)[:, :, None]
    kk = idx.shape[1]
    earlier = torch.ones(kk, kk, dtype=torch.bool, device=idx.device).tril(-1)  # [j, j']: slot j' before j
    t = ((idx[:, :, None] == idx[:, None, :]) & (out_s[:, :, None] == out_s[:, None, :]) & earlier).sum(
        2, dtype=torch.int32)
    return same & (same.cumsum(2, dtype=torch.int32) == (t + 1)[:, :, None])


def _score_topk_backward(ctx, g_scores, _g_idx):
    """The gradient of each kept score: a slot whose row is in this block (base <= idx < base + N) holds
    <queries[q], keys[idx - base]> (times key_scale[idx - base]); a filled slot taken from the running top-k
    holds that scores_in entry; empty slots (idx -1) hold no input. Where a row is a candidate twice (repeated
    in idx_in, or in idx_in and in the block: session 43 review), the slot is matched to the candidate the
    selection kept (by its score, then in candidate order). The composite (torch) path's autograd gives the
    same; before session 43 the C++ op's scores required grad but their backward gave no gradient."""
    queries, keys, key_scale, scores_in, idx_in, out_s, idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    N = keys.shape[0]
    r = idx - ctx.base
    in_block = (idx >= 0) & (r >= 0) & (r < N)
    pick = None
    if idx_in is not None and idx_in.shape[1] and idx.shape[1]:
        pick = _from_scores_in(scores_in, idx_in, out_s, idx, ctx.largest)
        in_block = in_block & ~pick.any(2)
    g = torch.where(in_block, g_scores, torch.zeros((), dtype=g_scores.dtype, device=g_scores.device))
    rows = torch.where(in_block, r, torch.zeros((), dtype=r.dtype, device=r.device))
    d_q = d_keys = d_scale = d_in = None
    if (need[0] or need[1] or need[4]) and N:
        kr = keys[rows].float()  # (Q, k, D)
        ks = key_scale[rows] if key_scale is not None else None
        gk = g if ks is None else g * ks
        if need[0]:
            d_q = torch.einsum("qj,qjd->qd", gk, kr)
        if need[1]:
            # (Q * k rows, not -1: with D = 0 and no slot, -1 is ambiguous)
            contrib = (gk[:, :, None] * queries.float()[:, None, :]).reshape(rows.numel(), keys.shape[1])
            # (out of place: torch.func.vmap batches index_add, not index_add_ into an unbatched zeros; into an
            # expanded zero, so the result is the one allocation: zeros + index_add held two, session 44 review)
            d_keys = torch.zeros((), dtype=torch.float32, device=keys.device).expand(keys.shape).index_add(
                0, rows.reshape(-1), contrib).to(keys.dtype)
        if need[4] and key_scale is not None:
            dots = torch.einsum("qd,qjd->qj", queries.float(), kr)
            d_scale = torch.zeros_like(key_scale).index_add(0, rows.reshape(-1), (g * dots).reshape(-1))
    elif need[0]:
        d_q = torch.zeros_like(queries)
    if need[5] and idx_in is not None:
        d_in = torch.zeros(idx_in.shape, dtype=g_scores.dtype, device=g_scores.device)
        if pick is not None:  # each slot credits at most one entry
            got = torch.where(pick.any(2), g_scores, torch.zeros((), dtype=g_scores.dtype, device=g_scores.device))
            d_in = d_in.scatter_add(1, pick.to(torch.uint8).argmax(2), got)
    return d_q, d_keys, None, None, d_scale, d_in, None, None


class _ScoreTopkFn(torch.autograd.Function):
    """score_topk inside torch.func transforms (``gradkit.ops.transforms_active``: torch.func refuses the op's own
    registered autograd) and on the Triton backend (``gradkit.ops._fn_autograd``), whatever ``fn`` runs it (the op,
    a GPU composite, a backend's function): the op's setup and backward, with ``setup_context``, and a ``vmap``
    running ``fn`` once per example (the bits of a loop). ``fn`` is the last argument, so
    ``ctx.needs_input_grad[:8]`` lines up with the op's arguments."""

    @staticmethod
    def forward(queries, keys, k, largest, key_scale, scores_in, idx_in, base, fn):
        return tuple(fn(queries, keys, k, largest, key_scale, scores_in, idx_in, base))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _score_topk_setup(ctx, inputs[:-1], output)

    @staticmethod
    def backward(ctx, g_scores, g_idx):
        return (*_score_topk_backward(ctx, g_scores, g_idx), None)


_ScoreTopkFn.vmap = loop_vmap_staticmethod(_ScoreTopkFn, "score_topk")

if _ext.has_op("score_topk"):
    torch.library.register_fake("gradkit::score_topk", _score_topk_fake, _stacklevel=_ext.ops_package_stacklevel())

    _ext.register_triton_for_cuda("search", ("score_topk",))  # Triton where CUDA C++ was not built
    register_loop_vmap(("score_topk",))  # torch.func.vmap: one op call per example
    torch.library.register_autograd("gradkit::score_topk", _score_topk_backward, setup_context=_score_topk_setup)

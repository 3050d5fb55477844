"""SparseKit's names and signatures over gradkit's kernels: change one import.

    # from sparsekit import View, BlockSpec, BlockCoupling, ScopeSpec, ScopeCoupling
    from gradkit.compat.sparsekit import View, BlockSpec, BlockCoupling, ScopeSpec, ScopeCoupling

Same masks and thresholded weights as SparseKit 0.1.5 on inputs without ties, and it runs on
CPU (SparseKit 0.1.5 sends CPU tensors to its Triton kth-largest kernels when triton is
importable, which fails without a GPU). Deliberate differences, each where SparseKit 0.1.5 is
wrong or inconsistent (see ``gradkit.scope``):

* ties: exactly ``nnz`` blocks per scope, lowest in-scope index first, for ScopeSpec *and*
  ScopeCoupling (SparseKit's ScopeSpec keeps every block tied with the k-th; its
  ScopeCoupling takes torch.topk's arbitrary choice). Pass ``ties="keep"`` for the former;
* ``soft_threshold(scale=True)`` scales by sqrt(elements per block), not sqrt(all elements);
* ``numel_per_scope()`` counts elements, not blocks;
* ``ScopeCoupling.hard_threshold(values=...)`` compares thresholds with the norms of
  ``values``, not of the weights;
* NaN block scores are never kept (SparseKit keeps NaN blocks in hard_threshold and ranks
  NaN above everything in kth_largest);
* ``kth_largest`` / ``mid_kth_largest`` ignore NaN (a scope with fewer than k valid scores
  gives -inf);
* ``sparsity_to_nnz``: a product within float rounding of an integer is that integer (SparseKit's
  ``int(0.29 * 100)`` keeps 72 of 100 blocks for sparsity 0.29; gradkit keeps 71);
* NaN thresholds (hard or soft) and negative soft thresholds raise ValueError, the weights
  untouched (SparseKit zeroes or keeps every block, fills NaN, or scales blocks up);
* thresholds are compared with the norms in their promoted dtype (the same as SparseKit); fp16 /
  bf16 blocks are ranked by float32 norms (SparseKit ranks norms rounded to the weight's dtype,
  so blocks closer than that rounding can differ, as ties);
* pruned elements are exactly +0.0 (SparseKit multiplies by 0: -0.0 for negative weights, NaN for
  infinite ones);
* in-place updates bump the parameter's autograd version counter (SparseKit writes through
  ``.data``, so a backward that saved the dense weight silently used the pruned one);
* ``View`` needs a contiguous parameter (SparseKit accepts a transposed one, ``BlockSpec(W.t())``:
  for W of shape (r, c), ``BlockSpec(View(W, (c, r), (1, c)), ...)`` walks ``W.t()`` in place), and
  refuses a view that covers an element twice;
* ``nnz=0`` (``sparsity_to_nnz(1.0)``) keeps no block: ``get_masks(0)`` is all False and
  ``hard_threshold(nnz=0)`` zeroes every block (SparseKit raises: an AssertionError in its
  kth-largest kernel, or torch.kthvalue's RuntimeError);
* where SparseKit 0.1.5 raises on valid input, gradkit answers: ``ScopeCoupling.get_masks`` with
  more than one scope, ``ScopeSpec.get_masks`` over 3-D and higher block grids (SparseKit's
  ``.view`` of a permuted mask fails);
* block norms, kth / mid-kth values and soft-thresholded weights agree with SparseKit's to float
  rounding (about one ulp of the dtype; a few ulp after soft thresholding, which gradkit computes
  in float32 for fp16 / bf16 and rounds once), not bitwise: gradkit sums in its kernels' order;
* ``BlockCoupling.norms``, ``ScopeCoupling.block_norms`` / ``kth_largest`` / ``mid_kth_largest`` of
  fp16 / bf16 weights return the float32 scores they rank (SparseKit rounds them to the weights'
  dtype), so ``hard_threshold(thresholds=c.kth_largest(k))`` keeps the same blocks as ``nnz=k``;
* ``ScopeSpec.block_to_scope(b, merge=True)`` is ``(*grid_shape, numblk_per_scope)``, the layout of
  ``block_norms`` (SparseKit 0.1.5 permutes twice there and returns another layout);
* ``hard_threshold`` with both ``thresholds`` and ``nnz`` raises (SparseKit silently ignores ``nnz``);
  ``hard_threshold`` / ``BlockSpec.hard_threshold`` return the keep mask (SparseKit: None);
* bad arguments raise ``ValueError`` / ``TypeError`` / ``IndexError`` naming the argument before any
  work (SparseKit: ``AssertionError`` or ``RuntimeError`` from torch, e.g. ``kth_largest`` with ``k``
  out of range is ``ValueError``); ``kth_largest`` / ``mid_kth_largest`` with ``dim`` outside
  ``[-x.dim(), x.dim())`` raise ``IndexError`` (SparseKit reduces it modulo ``x.dim()``, silently
  answering for another dim); a negative ``k_weight`` is refused (SparseKit extrapolates, and
  divides by zero at -1); a scope shape entry other than -1 or a positive divisor is refused
  (SparseKit builds a negative grid from -2);
* ``SparsityBuilder`` refuses a name that would shadow another block / coupling or scope /
  coupling (SparseKit overwrites or hides it), and a failed ``couple_scopes`` consumes nothing.

``StructuredOBS`` is gradkit's (``gradkit.obs``): SparseKit's arguments and defaults, on these specs; its
differences are in its docstring (fp32 per-row factors by default, inverse Hessians checked, the weight
written only on success, row-coupled ``prune`` keeping the coupling, empty weights a no-op).

Kept from SparseKit: any block-shape entry <= 0 spans its whole dim (not only -1); ``kth_largest`` /
``mid_kth_largest`` take integer tensors (exact, by ``torch.kthvalue``; mid in float); ``View`` has
SparseKit's ``block_view_of`` / ``broadcast_block_to_element`` / ``apply_multiplier`` / ``apply_mask``
(``BlockSpec(tensor).view`` too, as SparseKit's ``View.from_existing``) and ``BlockSpec`` its
``expand_block_tensor``; block-shape entries must be ints (SparseKit's ``int(b)`` would truncate 1.5).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import math

from gradkit import ops
from gradkit import scope as _scope
from gradkit.obs.structured import StructuredOBS  # SparseKit's ``from sparsekit import StructuredOBS``
from gradkit.scope import (BlockCoupling, CouplingError, ScopeCoupling, ScopeSpec, ShapeMismatchError, SparseBlock,
                           SparseScope, Values)

SparseKitError = ValueError

__all__ = ["View", "BlockSpec", "BlockCoupling", "ScopeSpec", "ScopeCoupling", "SparsityBuilder", "CouplingError",
           "ShapeMismatchError", "SparseBlock", "SparseScope", "Values", "kth_largest", "mid_kth_largest",
           "StructuredOBS"]


class View(_scope.View):
    """gradkit's View plus SparseKit's block helpers (``block_view_of``, ``broadcast_block_to_element``,
    ``apply_multiplier``, ``apply_mask``)."""

    @staticmethod
    def block_view_of(t: Tensor, block_shape: Tuple[int, ...], reorder: bool = True, merge: bool = False) -> Tensor:
        """Zero-copy block view of ``t``: ``(B0, b0, B1, b1, ...)`` (``reorder=False``), grid dims first
        ``(B0, B1, ..., b0, b1, ...)`` (``reorder=True``) or ``(B0, B1, ..., b0*b1*...)`` (``merge=True``)."""
        v = _scope._blocked(t, block_shape)
        if reorder or merge:
            nd = len(block_shape)
            v = v.permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
            if merge:
                v = v.reshape(*v.shape[:nd], -1)
        return v

    @staticmethod
    def broadcast_block_to_element(block_values: Tensor, block_shape: Tuple[int, ...], fake: bool = False) -> Tensor:
        """Grid values -> element shape (``fake``: only the interleaved singleton dims, for broadcasting)."""
        if fake:
            v = block_values
            for i in range(len(block_shape)):
                v = v.unsqueeze(2 * i + 1)
            return v
        return _scope._expand(block_values, block_shape)

    def apply_multiplier(self, multiplier: Tensor, block_shape: Tuple[int, ...]) -> None:
        """Multiply every block of ``data`` by its grid entry, in place."""
        _scope.BlockSpec(self, block_shape).apply_multiplier(multiplier)

    def apply_mask(self, mask: Tensor, block_shape: Tuple[int, ...]) -> None:
        """Zero every block of ``data`` where the grid-shaped ``mask`` is True, in place."""
        _scope.BlockSpec(self, block_shape).apply_mask(mask)


class BlockSpec(_scope.BlockSpec):
    """gradkit's BlockSpec with SparseKit's block-shape rule (any entry <= 0 spans its whole dim) and
    ``expand_block_tensor``."""

    def __init__(self, view, shape: Sequence[int] = (), name: Optional[str] = None):
        # ints only (numpy integers too): int(b) would truncate 1.5 to a block of 1 and take True as 1
        shape = tuple(-1 if b <= 0 else b for b in _scope._ints(shape, f"BlockSpec {name}: shape" if name else "shape"))
        if isinstance(view, Tensor):  # SparseKit's View.from_existing: .view has the block helpers below
            view = View.from_existing(view)
        super().__init__(view, shape, name=name)

    def expand_block_tensor(self, block_values: Tensor) -> Tensor:
        """``block_values`` viewed as the block grid's shape."""
        return block_values.view(self.grid_shape)

    def reduce(self, values: Values, reduce_fn) -> Tensor:
        """``reduce_fn`` over the ``(B0, b0, B1, b1, ...)`` block view of ``values`` (None: the weights), its
        result viewed as the block grid (SparseKit's ``BlockSpec.reduce``)."""
        if not callable(reduce_fn):
            raise TypeError(f"reduce_fn: expected a callable, got {type(reduce_fn).__name__}")
        return reduce_fn(self.block_view(values, reorder=False)).view(self.grid_shape)


def _check_dim(x: Tensor, dim: Optional[int]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if dim is not None:
        nd = max(x.dim(), 1)
        if isinstance(dim, bool) or not isinstance(dim, int) or not -nd <= dim < nd:
            raise IndexError(f"dim: expected an int in [{-nd}, {nd - 1}] for a {x.dim()}-D x, got {dim!r}")


def _rows(x: Tensor, dim: Optional[int]):
    _check_dim(x, dim)
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if dim is None:
        return x.reshape(1, -1), ()
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dim")
    d = dim % x.dim()
    m = x.movedim(d, -1)
    return m.reshape(-1, m.shape[-1]), tuple(m.shape[:-1])


def _integer_kth(x: Tensor, k: int, dim: Optional[int], mid: bool, k_weight: float) -> Tensor:
    """Integer x (SparseKit accepts it): exact order statistics by torch.kthvalue; mid in float."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    n = x.shape[dim] if x.dim() else 1
    top = n - 1 if mid else n
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
        raise ValueError(f"k: expected 1 <= k <= {top} ({n} values along dim{', mid needs k+1' if mid else ''}), "
                         f"got {k!r}")
    v = torch.kthvalue(x, n - k + 1, dim=dim).values
    if not mid:
        return v
    if isinstance(k_weight, bool) or not isinstance(k_weight, (int, float)) or not 0 <= k_weight < math.inf:
        raise ValueError(f"k_weight: expected a finite number >= 0, got {k_weight!r}")
    nxt = torch.kthvalue(x, n - k, dim=dim).values
    return (k_weight * nxt + v) / (1.0 + k_weight)


def _is_integer(x: Tensor) -> bool:
    return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def kth_largest(x: Tensor, k: int, dim: Optional[int] = None, **kwargs) -> Tensor:
    """k-th largest along ``dim`` (flattened when None), NaN skipped; CPU and GPU."""
    _check_dim(x, dim)
    if _is_integer(x):
        return _integer_kth(x, k, dim, False, 1.0)
    r, out_shape = _rows(x, dim)
    v = ops.scope_kth(r, [1, 1], [1, r.shape[1]], k, raw=True)
    return v.reshape(out_shape)


def mid_kth_largest(x: Tensor, k: int, dim: Optional[int] = None, k_weight: float = 1.0, **kwargs) -> Tensor:
    """``(v_k + k_weight * v_{k+1}) / (1 + k_weight)`` along ``dim`` (flattened when None)."""
    _check_dim(x, dim)
    if _is_integer(x):
        return _integer_kth(x, k, dim, True, k_weight)
    r, out_shape = _rows(x, dim)
    v = ops.scope_kth(r, [1, 1], [1, r.shape[1]], k, raw=True, mid=True, k_weight=k_weight)
    return v.reshape(out_shape)


class SparsityBuilder:
    """Fluent construction of blocks, scopes and couplings by name (SparseKit's builder)."""

    def __init__(self):
        self._blocks: Dict[str, BlockSpec] = {}
        self._block_couplings: Dict[str, BlockCoupling] = {}
        self._scopes: Dict[str, ScopeSpec] = {}
        self._scope_couplings: Dict[str, ScopeCoupling] = {}

    @staticmethod
    def _fresh(name: str, *tables) -> None:
        if any(name in t for t in tables):
            raise ValueError(f"name {name!r} is already used")

    def add_block(self, param, block_shape: Tuple[int, ...], name: str) -> "SparsityBuilder":
        self._fresh(name, self._blocks, self._block_couplings)
        self._blocks[name] = BlockSpec(View.from_existing(param), block_shape, name=name)
        return self

    def couple_blocks(self, block_names: List[str], orders: List[Tuple[int, ...]], name: str) -> "SparsityBuilder":
        self._fresh(name, self._blocks, self._block_couplings)
        self._block_couplings[name] = BlockCoupling([self._get(self._blocks, n, "block") for n in block_names],
                                                    orders, name=name)
        return self

    @staticmethod
    def _get(table, name, what):
        if name not in table:
            raise KeyError(f"no {what} named {name!r}")
        return table[name]

    def get_block(self, name: str):
        if name in self._blocks:
            return self._blocks[name]
        return self._get(self._block_couplings, name, "block or block coupling")

    def add_scope(self, block_name: str, scope_shape: Tuple[int, ...], name: str) -> "SparsityBuilder":
        self._fresh(name, self._scopes, self._scope_couplings)
        self._scopes[name] = ScopeSpec(self.get_block(block_name), shape=scope_shape, name=name)
        return self

    def couple_scopes(self, scope_names: List[str], orders: List[Tuple[int, ...]], name: str) -> "SparsityBuilder":
        # the coupled scopes are consumed, so the coupling may take one of their names (as in SparseKit)
        self._fresh(name, {n: None for n in self._scopes if n not in scope_names}, self._scope_couplings)
        if len(set(scope_names)) != len(scope_names):  # before anything is registered or consumed
            raise ValueError(f"scope_names: a scope appears more than once in {list(scope_names)}")
        scopes = [self._get(self._scopes, n, "scope") for n in scope_names]
        self._scope_couplings[name] = ScopeCoupling(scopes, orders, name=name)
        for n in scope_names:  # coupled scopes are consumed, as in SparseKit
            del self._scopes[n]
        return self

    def get_scope(self, name: str):
        if name in self._scopes:
            return self._scopes[name]
        return self._get(self._scope_couplings, name, "scope or scope coupling")

    def get_all_scopes(self) -> Iterable:
        return list(self._scopes.values()) + list(self._scope_couplings.values())

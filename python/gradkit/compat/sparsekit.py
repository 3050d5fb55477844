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
  for W of shape (r, c), ``BlockSpec(View(W, (c, r), (1, c)), ...)`` walks ``W.t()`` in place).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from gradkit import ops
from gradkit.scope import (BlockCoupling, BlockSpec, CouplingError, ScopeCoupling, ScopeSpec, ShapeMismatchError,
                           SparseBlock, SparseScope, Values, View)

SparseKitError = ValueError

__all__ = ["View", "BlockSpec", "BlockCoupling", "ScopeSpec", "ScopeCoupling", "SparsityBuilder", "CouplingError",
           "ShapeMismatchError", "SparseBlock", "SparseScope", "Values", "kth_largest", "mid_kth_largest"]


def _rows(x: Tensor, dim: Optional[int]):
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if dim is None:
        return x.reshape(1, -1), ()
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dim")
    d = dim % x.dim()
    m = x.movedim(d, -1)
    return m.reshape(-1, m.shape[-1]), tuple(m.shape[:-1])


def kth_largest(x: Tensor, k: int, dim: Optional[int] = None, **kwargs) -> Tensor:
    """k-th largest along ``dim`` (flattened when None), NaN skipped; CPU and GPU."""
    r, out_shape = _rows(x, dim)
    v = ops.scope_kth(r, [1, 1], [1, r.shape[1]], k, raw=True)
    return v.reshape(out_shape)


def mid_kth_largest(x: Tensor, k: int, dim: Optional[int] = None, k_weight: float = 1.0, **kwargs) -> Tensor:
    """``(v_k + k_weight * v_{k+1}) / (1 + k_weight)`` along ``dim`` (flattened when None)."""
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
        self._fresh(name, self._scopes, self._scope_couplings)
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

"""Where a scope's blocks live in a 2-D weight: the element layout every OBS pruner works on."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradkit.scope import BlockSpec, ScopeSpec

__all__ = ["ObsLayout", "obs_layout"]


@dataclass(frozen=True)
class ObsLayout:
    """The blocks of a ``ScopeSpec`` over a 2-D weight ``(M, K)`` (out features x in features).

    ``elems[s, b, e]`` is the flat row-major position in ``weight`` of element ``e`` of block
    ``b`` of scope ``s`` (``S`` scopes, ``gs`` blocks per scope, ``bk`` elements per block).
    ``rows = elems // K`` and ``cols = elems % K``. ``row_coupled`` is True when some scope's
    elements lie in more than one weight row (blocks spanning rows, or scopes whose blocks sit
    in different rows, such as 16-column blocks with 8-row coupling): the choice is then joint
    across those rows while each row keeps its own compensation.
    """

    weight: Tensor
    elems: Tensor
    M: int
    K: int
    S: int
    gs: int
    bk: int
    row_coupled: bool

    @property
    def rows(self) -> Tensor:
        return self.elems // self.K

    @property
    def cols(self) -> Tensor:
        return self.elems % self.K


def obs_layout(scope: ScopeSpec) -> ObsLayout:
    """The :class:`ObsLayout` of ``scope``: a ``ScopeSpec`` over one ``BlockSpec`` of a 2-D weight."""
    if not isinstance(scope, ScopeSpec):
        raise TypeError(f"scope: expected a gradkit.scope.ScopeSpec, got {type(scope).__name__}")
    spec = scope.block
    if not isinstance(spec, BlockSpec):
        raise TypeError("scope: OBS prunes one weight against its own Hessian; a ScopeSpec over a BlockCoupling "
                        "(several parameters) is not supported")
    w = spec.view.param
    if w.dim() != 2:
        raise ValueError(f"scope: the pruned parameter must be a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if w.device.type == "meta":
        raise ValueError("scope: the pruned weight is a meta tensor (no data); materialise it (e.g. "
                         "module.to_empty(device=...) and load the weights) before pruning")
    m, k = w.shape
    # (*block grid, bk) flat positions: BlockSpec.block_view of the view's offsets (resolve takes any dtype
    # unless asked for scores)
    blocks = spec.block_view(spec.view.offsets(), merge=True)
    per_scope = scope.block_to_scope(blocks, merge=True)  # (*scope grid, gs, bk)
    gs, bk = scope.numblk_per_scope(), spec.numel_per_block()
    elems = per_scope.reshape(-1, gs, bk).contiguous()
    rows = elems // k
    flat_rows = rows.reshape(rows.shape[0], gs * bk)  # not -1: a weight without elements has S = 0 scopes
    coupled = bool((flat_rows != flat_rows[:, :1]).any()) if elems.numel() else False
    return ObsLayout(weight=w, elems=elems, M=int(m), K=int(k), S=int(elems.shape[0]), gs=int(gs), bk=int(bk),
                     row_coupled=coupled)

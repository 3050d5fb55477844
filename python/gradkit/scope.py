"""Structured-sparsity selection: views, blocks, scopes and their couplings.

The vocabulary follows SparseKit's ``ScopeSpec`` / ``ScopeCoupling`` (see
``gradkit.compat.sparsekit`` for a drop-in import):

* :class:`View` - a zero-copy strided view over a parameter (e.g. columns 8 apart paired
  for coupled 2:4), with linear offsets back into the parameter;
* :class:`BlockSpec` - a tensor (or View) cut into a grid of blocks; :class:`BlockCoupling` -
  blocks of several parameters that live or die together;
* :class:`ScopeSpec` - the block grid cut into scopes, the units inside which blocks compete;
  :class:`ScopeCoupling` - scope grids of several parameters aligned by dim permutations, so
  their blocks compete jointly.

Selection keeps ``nnz`` blocks per scope. ``ties="exact"`` (default) keeps exactly ``nnz``
(equal scores: lowest in-scope index), so an N:M pattern always holds; ``ties="keep"`` keeps
every block scoring ``>=`` the nnz-th largest (SparseKit's rule; can exceed nnz). NaN scores
are never kept. Every heavy step runs in one fused kernel (``gradkit.ops.scope_*``).

Where SparseKit 0.1.5 is wrong, gradkit does not follow it:
``soft_threshold(scale=True)`` scales by sqrt(elements per *block*) (SparseKit: the whole
tensor's element count); ``numel_per_scope`` counts elements (SparseKit: blocks);
``ScopeCoupling.hard_threshold(values=...)`` compares the thresholds with ``values``' norms
(SparseKit: with the weights' own norms); ScopeSpec and ScopeCoupling break ties the same way;
a block whose norm is NaN is zeroed by ``hard_threshold`` (SparseKit keeps it: NaN < t is False);
``sparsity_to_nnz`` counts a product within float rounding of an integer as that integer
(SparseKit's ``int(0.29 * 100)`` is 28); NaN thresholds, and negative ``soft_threshold`` ones,
are refused (SparseKit zeroes / keeps everything, or scales blocks up), and so are ``soft_threshold``
conditioners that are not finite and > 0 everywhere (a zero entry can give NaN weights).

Precision: selection ranks float32 scores (float64 for float64 tensors) everywhere - fp16 / bf16
norms are not rounded to the weight's dtype before couplings or the one-huge-scope path rank them,
``values`` of another dtype than the weight are ranked in their own precision, and thresholds are
compared in the promoted dtype of norms and thresholds. ``soft_threshold``'s default ``eps`` is the
machine epsilon of the thresholds' dtype (SparseKit's rule; bf16's own 7.8e-3 would visibly shrink
small blocks less). Scores are sums in each backend's own order, so they agree across backends to
rounding, not bitwise: blocks that tie only in exact arithmetic (the same values in another order)
can be ranked differently by the CPU, Triton and CUDA kernels; equal computed scores (e.g.
integer-valued data, single-element blocks) follow the tie rule on every backend.

Autograd: every in-place update (hard / soft thresholding, ``keep_blocks``, ``apply_mask``,
``apply_multiplier``, ``set_data``) bumps the parameter's version counter (``View.data`` is a
detached view sharing it, and gradkit's in-place ops bump what they write, as torch's do), so a backward that saved the dense weight raises instead of silently
using the pruned one. Prune after ``backward()`` / ``step()``, or build a fresh graph. An inference tensor (made
under ``torch.inference_mode()``) is refused, by every backend and before any spec of a coupling is written, by the
in-place updates outside inference mode (torch's rule: its own in-place ops raise there).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from gradkit import ops
from gradkit._rules import FLOATS, floor_count, int_seq, not_meta
from gradkit.kernels.reference.scope import acc_dtype as _acc_dtype, check_soft_values as _check_soft_values

__all__ = ["View", "BlockSpec", "BlockCoupling", "ScopeSpec", "ScopeCoupling", "CouplingError",
           "ShapeMismatchError", "Values", "semi_structured", "check_nm"]

Values = Union[Tensor, Mapping[Any, Tensor], None]
_TIES = ("exact", "keep")


class CouplingError(ValueError):
    """Coupled blocks or scopes whose grids do not line up."""


class ShapeMismatchError(ValueError):
    """A tensor whose shape does not match what the spec needs."""

    def __init__(self, expected, got, context: str = ""):
        msg = f"expected shape {tuple(expected)}, got {tuple(got)}"
        super().__init__(f"{context}: {msg}" if context else msg)


class _NoEntry(KeyError, ValueError):
    """A ``{BlockSpec: tensor}`` mapping without an entry for a spec: a KeyError (a mapping lookup) that is also the
    ValueError gradkit raises for every bad argument; its message starts with the argument's name, unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _ints(v, what: str) -> Tuple[int, ...]:
    """A sequence of ints (numpy integers too) as a tuple, else a TypeError naming ``what``: ``int(s)`` would
    truncate 4.5 to 4 and take True as 1."""
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
        raise TypeError(f"{what}: expected a sequence of ints, got {type(v).__name__}")
    return tuple(int_seq(v, what))


def _tensor_arg(t, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(t).__name__}")
    not_meta(t, what)


def _check_data(data, x: Tensor) -> None:
    """Values written into the weights ``x`` (``set_data``, ``View.data = ...``). Session 42: a meta, complex or
    non-tensor value failed inside ``copy_`` naming nothing (a complex one only warned, dropping its imaginary part)."""
    _tensor_arg(data, "data")
    if data.is_complex() and not x.is_complex():
        raise TypeError(f"data: a {data.dtype} tensor cannot be written into {x.dtype} weights (its imaginary part "
                        "would be dropped)")


def _mask_arg(t: Tensor, what: str) -> None:
    """A keep / prune mask: bool, integer (non-zero = set) or floating holding only 0 and 1 (``mask.float()``). Any
    other floating one was read as non-zero = set (session 42), so scores passed as a mask kept every block not
    exactly 0, NaN included; complex ones too."""
    _tensor_arg(t, what)
    if t.is_complex():
        raise TypeError(f"{what}: expected a bool mask, got {t.dtype}")
    if t.is_floating_point() and not ((t == 0) | (t == 1)).all():
        raise ValueError(f"{what}: a {t.dtype} mask must hold only 0 and 1 (scores? select with nnz or thresholds)")


def _score_arg(t: Tensor, what: str) -> None:
    """Scores ranked by the kernels: a real floating tensor (named here: the kernels' own error names their "x")."""
    _tensor_arg(t, what)
    if not t.is_floating_point():
        raise TypeError(f"{what}: expected a floating tensor, got {t.dtype}")


def _ties(ties: str) -> bool:
    if ties not in _TIES:
        raise ValueError(f"ties: expected 'exact' or 'keep', got {ties!r}")
    return ties == "keep"


def _check_order(order, nd: int, what: str) -> Tuple[int, ...]:
    if order is None or (isinstance(order, (tuple, list)) and not order):
        return tuple(range(nd))
    o = _ints(order, what)  # int(i) would truncate an order entry 1.7 to 1 and take True as 1
    if sorted(o) != list(range(nd)):
        raise ValueError(f"{what}: expected a permutation of 0..{nd - 1}, got {tuple(order)}")
    return o


def _inverse(perm: Sequence[int]) -> Tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _aligned(owner: str, items, cls, what: str, orders, describe):
    """Validates a coupling's members and orders; returns (items, orders, reverse orders, common grid).
    ``describe(grid, item, order, ref_grid, first)`` words the error for a member whose permuted
    grid differs from the first member's."""
    items = list(items)
    if not items:
        raise ValueError(f"{owner}: {what} is empty")
    for s in items:
        if not isinstance(s, cls):
            raise TypeError(f"{owner}: {what}: expected {cls.__name__}, got {type(s).__name__}")
    if not orders:
        orders = [()] * len(items)
    if len(orders) != len(items):
        raise ValueError(f"{owner}: {len(orders)} orders for {len(items)} {what}")
    orders = [_check_order(o, len(s.grid_shape), f"orders[{i}]") for i, (o, s) in enumerate(zip(orders, items))]
    ref = tuple(items[0].grid_shape[i] for i in orders[0])
    for s, o in zip(items, orders):
        g = tuple(s.grid_shape[i] for i in o)
        if g != ref:
            raise CouplingError(describe(g, s, o, ref, items[0]))
    return items, orders, [_inverse(o) for o in orders], ref


_HALF = (torch.float16, torch.bfloat16)


def _check_thresholds(t: Tensor, what: str = "thresholds", nonneg: bool = False) -> None:
    """NaN thresholds are refused (a NaN comparison would silently zero, or keep, every block);
    ``nonneg``: so are negative ones (a negative group-lasso threshold scales blocks *up*)."""
    if isinstance(t, Tensor):
        not_meta(t, what)
        if t.is_complex():  # no order: torch's ">=" raised NotImplementedError naming no argument (session 42)
            raise TypeError(f"{what}: expected real thresholds, got {t.dtype}")
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() == 0:
        return  # the shape / dtype checks downstream name the problem
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{what}: NaN threshold(s)")
    if nonneg and bool((t < 0).any()):
        raise ValueError(f"{what}: expected thresholds >= 0, got a minimum of {float(t.min())}")


def _at_least(a: Tensor, t: Tensor) -> Tensor:
    """``a >= t`` in the promoted dtype (neither side rounded to the other's precision)."""
    dt = torch.promote_types(a.dtype, t.dtype)
    return a.to(dt) >= t.to(dt)


def _default_eps(thresholds: Tensor, eps: Optional[float]) -> Optional[float]:
    """SparseKit's default: the machine epsilon of the *thresholds'* dtype (a float32 threshold on a
    bf16 weight gets float32's 1.2e-7, not bf16's 7.8e-3, which would shift every small block)."""
    if eps is None and isinstance(thresholds, Tensor) and thresholds.is_floating_point():
        return float(torch.finfo(thresholds.dtype).eps)
    return eps


def _check_soft_args(thresholds: Tensor, max_iter, atol, eps) -> None:
    """What ``ops.block_soft_threshold_`` checks of the thresholds' dtype and the scalar arguments (same
    messages), for the BlockCoupling step, which never reaches it: so that a bad argument is refused there
    too, before any spec (or, in a ScopeCoupling, any earlier scope) is written."""
    if not thresholds.is_floating_point():
        raise TypeError(f"thresholds: dtype {thresholds.dtype} not supported")
    _check_soft_scalars(max_iter, atol, eps)


def _check_soft_scalars(max_iter, atol, eps) -> None:
    """``ops.check_soft_scalars``, and what it lets through that the op then fails on (session 42): ``atol=None``
    (``float(None)``, a TypeError naming no argument) and a ``max_iter`` past int64 (a RuntimeError of the op's
    schema)."""
    if atol is None:
        raise ValueError("atol: expected a finite number >= 0, got None")
    if ops.check_soft_scalars(max_iter, atol, eps) >= 1 << 63:
        raise ValueError(f"max_iter: expected an int below 2**63, got {max_iter}")


def _check_targets(specs: Sequence["BlockSpec"], grid: Tensor, what: str, owner: str = "specs") -> None:
    """Before the first of several specs is written: every spec takes the write (floating weights on
    ``grid``'s device, or for ``what == "multiplier"`` weights that ``grid``'s dtype may be multiplied
    into), so that a later spec cannot refuse it after an earlier one was changed."""
    _check_writable(specs, owner)
    for i, s in enumerate(specs):
        x = s.view.data
        if what == "multiplier":
            if not torch.can_cast(torch.result_type(x, grid), x.dtype):
                raise TypeError(f"multiplier: a {grid.dtype} multiplier cannot be applied in place to the {x.dtype} "
                                f"weights of {owner}[{i}]")
        elif x.dtype not in FLOATS:  # float8 too (session 43 review: an earlier spec was zeroed first)
            raise TypeError(f"{owner}[{i}]: expected floating weights, got {x.dtype}")
        if x.device != grid.device and not (what == "multiplier" and grid.dim() == 0 and grid.device.type == "cpu"):
            raise ValueError(f"{what}: on {grid.device} but the weights of {owner}[{i}] are on {x.device}")


def _check_writable(specs: Sequence["BlockSpec"], owner: Optional[str] = None) -> None:
    """torch's rule for in-place updates, before the first of ``specs`` is written: an inference tensor (made under
    ``torch.inference_mode()``) is not written outside inference mode. torch's own in-place ops raise there, but
    after writing it, and only when they reach that spec (a coupling's earlier specs already written); the compiled
    kernels wrote it silently."""
    for i, s in enumerate(specs):  # ops' one rule and message, named for the spec whose weights they are
        who = owner if owner == "view" else f"{owner}[{i}]" if owner else f"BlockSpec {s.name or ''}".rstrip()
        ops._check_not_inference((s.view.param,), f"{who} weights")


def _check_eps(eps) -> None:
    """``nnz``'s ``eps``: a real number >= 0 (session 42: None raised torch's TypeError naming no argument, NaN
    counted nothing, a negative eps counted zeros and True was read as 1)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a number >= 0, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


def _acc_norms(x: Tensor, block_shape: Sequence[int], p: float) -> Tensor:
    """Block norms in the accumulation dtype (float32 for fp16 / bf16 x, else x's dtype), for ranking:
    ``ops.block_norms`` rounds them to x's dtype, which ties blocks whose float32 scores differ (and
    the tie then goes to the lower index, not the larger score). Half tensors are widened in slices
    of whole blocks along dim 0, so the float32 copy stays bounded."""
    if x.dtype not in _HALF:
        return ops.block_norms(x, block_shape, p)
    step = block_shape[0] * max(1, (1 << 24) // max(1, x[0:block_shape[0]].numel()))
    if x.shape[0] <= step:
        return ops.block_norms(x.float(), block_shape, p)
    parts = [ops.block_norms(x[i:i + step].float(), block_shape, p) for i in range(0, x.shape[0], step)]
    return torch.cat(parts, dim=0)


# --------------------------------------------------------------------------- View


class View:
    """A strided view ``(shape, stride, offset)`` of a contiguous parameter, in elements.

    ``data`` is a live ``as_strided`` view: in-place pruning writes straight into the
    parameter. Construction checks that the view stays inside the parameter and does not
    cover an element twice (in-place updates through an overlapping view are ill-defined).
    """

    def __init__(self, param: Tensor, shape: Sequence[int], stride: Sequence[int], offset: int = 0):
        if not isinstance(param, Tensor):
            raise TypeError(f"View: param: expected a tensor or Parameter, got {type(param).__name__}")
        shape, stride, offset = _ints(shape, "shape"), _ints(stride, "stride"), ops._int(offset, "offset")
        if len(shape) != len(stride):
            raise ValueError(f"View: shape has {len(shape)} dims but stride has {len(stride)}")
        if any(s < 0 for s in shape) or any(d < 0 for d in stride) or offset < 0:
            raise ValueError(f"View: sizes, strides and offset must be >= 0, got shape={shape} stride={stride} "
                             f"offset={offset}")
        if not param.is_contiguous():
            raise ValueError("View: param must be contiguous (linear offsets are row-major positions in it)")
        self.param, self.shape, self.stride, self.offset = param, shape, stride, int(offset)
        if math.prod(shape) > 0:
            top = offset + sum((s - 1) * d for s, d in zip(shape, stride))
            if top >= param.numel():
                raise ValueError(f"View reaches outside its parameter: linear offset {top} >= param.numel() "
                                 f"{param.numel()} (param shape {tuple(param.shape)}, view shape {shape}, "
                                 f"stride {stride}, offset {offset})")
            reach = 0  # the span covered so far (an axis of stride <= it revisits an element; 0: nothing yet)
            for s, d in sorted((sd for sd in zip(shape, stride) if sd[0] > 1), key=lambda sd: sd[1]):
                if d <= reach:  # only sufficient: shape (3, 2), stride (2, 3) interleaves {0, 2, 4} and {3, 5, 7}
                    pos = torch.arange(top + 1).as_strided(shape, stride)  # the exact check (param-sized, once)
                    if int(torch.bincount(pos.reshape(-1), minlength=1).max()) > 1:
                        raise ValueError(f"View: shape {shape} with stride {stride} covers some elements twice")
                    break
                reach += (s - 1) * d
        # the parameter's shape the view was checked against (_checked_param refuses a parameter changed since)
        self._param_shape = tuple(param.shape)

    @classmethod
    def from_existing(cls, param: Union[Tensor, "View"]) -> "View":
        if isinstance(param, View):
            return param
        if not isinstance(param, Tensor):
            raise TypeError(f"expected a tensor, Parameter or View, got {type(param).__name__}")
        return cls(param, tuple(param.shape), torch.empty(param.shape, device="meta").stride())

    @classmethod
    def pairs(cls, param: Tensor, period: int = 16, distance: int = 8) -> "View":
        """Columns ``j`` and ``j + distance`` of every ``period``-column tile as the last dim (size 2):
        shape ``(rows, cols // period, distance, 2)``. With ``BlockSpec(v, (1, 1, 1, 2))`` and
        ``ScopeSpec(b, (1, 1, 4, 1))`` and nnz=2 this is the coupled 2:4 pattern."""
        if not isinstance(param, Tensor) or param.dim() != 2:
            raise TypeError(f"View.pairs: param: expected a 2-D tensor, got "
                            f"{tuple(param.shape) if isinstance(param, Tensor) else type(param).__name__}")
        period, distance = ops._int(period, "period"), ops._int(distance, "distance")
        r, c = param.shape
        if period != 2 * distance or c % period:
            raise ValueError(f"View.pairs: need period == 2 * distance and cols % period == 0, got "
                             f"period={period}, distance={distance}, cols={c}")
        return cls(param, (r, c // period, distance, 2), (c, period, 1, distance))

    @classmethod
    def row_pairs(cls, param: Tensor, chunk: int = 16, distance: int = 8) -> "View":
        """Rows ``p`` and ``p + distance`` of every ``chunk``-row chunk as dim 2 (size 2):
        shape ``(rows // chunk, distance, 2, cols)``. ``BlockSpec(v, (1, 1, 1, 16))`` with
        ``ScopeSpec(b, (1, 1, 2, 1))`` and nnz=1: 16-column blocks with 8-row coupling."""
        if not isinstance(param, Tensor) or param.dim() != 2:
            raise TypeError(f"View.row_pairs: param: expected a 2-D tensor, got "
                            f"{tuple(param.shape) if isinstance(param, Tensor) else type(param).__name__}")
        chunk, distance = ops._int(chunk, "chunk"), ops._int(distance, "distance")
        r, c = param.shape
        if chunk != 2 * distance or r % chunk:
            raise ValueError(f"View.row_pairs: need chunk == 2 * distance and rows % chunk == 0, got "
                             f"chunk={chunk}, distance={distance}, rows={r}")
        return cls(param, (r // chunk, distance, 2, c), (chunk * c, c, distance * c, 1))

    def _checked_param(self) -> Tensor:
        """The parameter, refused (ValueError) when it is no longer what the view was checked against (session 41):
        the view's strides are row-major positions in the contiguous parameter it was built on, and
        ``model.to(memory_format=torch.channels_last)``, or ``param.data`` replaced by another shape, after the spec
        was built made them address other elements (masks and pruning silently hit the wrong ones)."""
        p = self.param
        built = getattr(self, "_param_shape", None)
        if built is not None and tuple(p.shape) != built:
            raise ValueError(f"View: its parameter's shape is now {tuple(p.shape)}, the view was built on {built} (its "
                             "data was replaced); build the spec again")
        if not p.is_contiguous():
            raise ValueError(f"View: its parameter is no longer contiguous (strides {p.stride()}, e.g. after "
                             "model.to(memory_format=torch.channels_last)): the view's positions are row-major; "
                             "make it contiguous again before using the spec")
        return p

    @property
    def data(self) -> Tensor:
        """The live view, detached from autograd but sharing the parameter's version counter: an
        in-place update through it makes a backward that saved the parameter raise instead of
        silently using the updated weights (``param.data`` has a counter of its own)."""
        p = self._checked_param().detach()
        return p.as_strided(self.shape, self.stride, p.storage_offset() + self.offset)

    @data.setter
    def data(self, value: Tensor) -> None:
        _check_data(value, self.data)
        _check_writable([BlockSpec(self)], "view")
        self.data.copy_(value)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def cosize(self) -> int:
        """One past the largest linear offset the view reaches (relative to ``offset``)."""
        return sum((s - 1) * d for s, d in zip(self.shape, self.stride)) + 1

    def linear_offset(self, idx: Tensor) -> Tensor:
        """``(..., ndim)`` view coordinates -> ``(...,)`` flat positions in the parameter."""
        s = torch.tensor(self.stride, device=idx.device, dtype=idx.dtype)
        return (idx * s).sum(dim=-1) + self.offset

    def offsets(self) -> Tensor:
        """View-shaped int64 tensor of every element's flat position in the parameter."""
        ar = torch.arange(self._checked_param().numel(), device=self.param.device)
        return ar.as_strided(self.shape, self.stride, self.offset)

    def to_param_rc(self, idx: Tensor) -> Tuple[Tensor, Tensor]:
        if self.param.dim() != 2:
            raise ValueError("to_param_rc: the parameter is not 2-D")
        flat = self.linear_offset(idx)
        return flat // self.param.shape[1], flat % self.param.shape[1]

    def resolve(self, values: Tensor, what: str = "values") -> Tensor:
        """A view-shaped tensor from view-shaped or parameter-shaped ``values``."""
        if not isinstance(values, Tensor):
            raise TypeError(f"{what}: expected a tensor, got {type(values).__name__}")
        if tuple(values.shape) == self.shape:
            return values
        if tuple(values.shape) == tuple(self.param.shape):
            v = values.contiguous()
            return v.as_strided(self.shape, self.stride, v.storage_offset() + self.offset)
        raise ShapeMismatchError(self.shape, values.shape, f"{what} (or the parameter's {tuple(self.param.shape)})")

    def to_param(self, view_mask: Tensor, fill: bool = True) -> Tensor:
        """A parameter-shaped bool mask: ``view_mask`` (view-shaped; not broadcast) where the view reaches, ``fill``
        elsewhere."""
        _tensor_arg(view_mask, "view_mask")
        if tuple(view_mask.shape) != self.shape:
            raise ShapeMismatchError(self.shape, view_mask.shape, "view_mask")
        if self.shape == tuple(self.param.shape) and self.stride == self.param.stride() and self.offset == 0:
            return view_mask.to(torch.bool).contiguous()
        out = torch.full(self.param.shape, fill, dtype=torch.bool, device=view_mask.device)
        out.as_strided(self.shape, self.stride, self.offset).copy_(view_mask)
        return out

    def __hash__(self) -> int:
        # from the parameter's identity now, not cached at construction: a deep copy / unpickled view holds another
        # tensor, and must hash as a view built on that tensor (equal views: equal hashes; session 41)
        return hash((id(self.param), self.shape, self.stride, self.offset))

    def __eq__(self, other) -> bool:
        if not isinstance(other, View):
            return NotImplemented
        return (self.param is other.param and self.shape == other.shape and self.stride == other.stride
                and self.offset == other.offset)

    def __repr__(self) -> str:
        return f"View(param.shape={tuple(self.param.shape)}, shape={self.shape}, stride={self.stride}, " \
               f"offset={self.offset})"


# --------------------------------------------------------------------------- blocks


def _expand(block_values: Tensor, block_shape: Sequence[int]) -> Tensor:
    v = block_values
    for i in range(len(block_shape)):
        v = v.unsqueeze(2 * i + 1)
    inter = []
    for n, b in zip(block_values.shape, block_shape):
        inter += [n, b]
    return v.expand(inter).reshape([n * b for n, b in zip(block_values.shape, block_shape)])


def _blocked(t: Tensor, block_shape: Sequence[int]) -> Tensor:
    """(B0, b0, B1, b1, ...) zero-copy view of any strided t."""
    size, stride = [], []
    for n, b, d in zip(t.shape, block_shape, t.stride()):
        size += [n // b, b]
        stride += [b * d, d]
    return t.as_strided(size, stride, t.storage_offset())


class SparseBlock:
    """Common interface of BlockSpec and BlockCoupling."""

    grid_shape: Tuple[int, ...]

    @property
    def grid_ndim(self) -> int:
        return len(self.grid_shape)

    def numblk(self) -> int:
        return math.prod(self.grid_shape)

    def numel(self) -> int:
        return self.numblk() * self.numel_per_block()

    def __str__(self) -> str:
        return repr(self)


class BlockSpec(SparseBlock):
    """A tensor (or View) as a grid of blocks of ``shape`` (-1: the whole dim; () : 1 per dim)."""

    def __init__(self, view: Union[Tensor, View], shape: Sequence[int] = (), name: Optional[str] = None):
        self.view = View.from_existing(view)
        self.name = name
        shape = _ints(shape, "shape")
        if not shape:
            shape = (1,) * self.view.ndim
        if len(shape) != self.view.ndim:
            raise ValueError(f"BlockSpec {name or ''}: block shape {shape} has {len(shape)} dims but the tensor "
                             f"is {self.view.ndim}-D {self.view.shape}")
        shape = tuple(max(1, self.view.shape[i]) if b == -1 else b for i, b in enumerate(shape))  # -1 of a 0 dim: 1
        for i, (n, b) in enumerate(zip(self.view.shape, shape)):
            if b < 1 or n % b:
                raise ValueError(f"BlockSpec {name or ''}: dim {i}: size {n} not divisible by block shape[{i}]={b}")
        self.shape = shape
        self.grid_shape = tuple(n // b for n, b in zip(self.view.shape, shape))

    # --- structure
    @property
    def ndim(self) -> int:
        return self.view.ndim

    @property
    def data(self) -> Tensor:
        return self.view.data

    def set_data(self, data: Tensor) -> None:
        _check_data(data, self.view.data)
        _check_writable([self])
        self.view.data.copy_(data)

    def numel_per_block(self) -> int:
        return math.prod(self.shape)

    def blocks(self) -> List["BlockSpec"]:
        return [self]

    def parameters(self) -> List[View]:
        return [self.view]

    def nnz(self, eps: float = 1e-8) -> int:
        """Elements with |x| > eps."""
        _check_eps(eps)
        return int((self.view.data.abs() > eps).sum())

    # --- values
    def resolve(self, values: Values, what: str = "values", floating: bool = False) -> Tensor:
        """The view-shaped tensor of ``values`` (None: the weights; a mapping: its entry for this spec; a
        view- or parameter-shaped tensor). ``floating``: scores, which must be floating (a TypeError naming
        ``what``); otherwise any dtype (``block_view`` of int positions)."""
        if values is None:
            v = self.view.data
            if floating and v.dtype not in FLOATS:
                # session 43: integer / bool / float8 weights reached the kernels, whose error named their "x"
                who = f"BlockSpec {self.name}" if self.name else "BlockSpec"
                raise TypeError(f"{who} weights: expected a floating tensor (float16, bfloat16, float32 or float64), "
                                f"got {v.dtype}")
            return v
        if isinstance(values, Mapping):
            if self not in values:
                raise _NoEntry(f"{what}: no entry for {self!r}")
            values = values[self]
        v = self.view.resolve(values, what)
        if floating and v.dtype not in FLOATS:  # named here: the kernels' own error names their "x"
            raise TypeError(f"{what}: expected a floating tensor, got {v.dtype}")
        if not self.view.param.is_meta:  # scores without values gave meta masks (session 42)
            not_meta(v, what)
        return v

    _resolve_values = resolve

    def block_view(self, values: Values = None, reorder: bool = True, merge: bool = False) -> Tensor:
        t = _blocked(self.resolve(values), self.shape)
        if reorder or merge:
            nd = self.ndim
            t = t.permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
            if merge:  # the block size, not -1: a weight without elements has an empty grid (-1 is ambiguous there)
                t = t.reshape(*self.grid_shape, self.numel_per_block())
        return t

    def broadcast_block_to_element(self, block_values: Tensor, fake: bool = False) -> Tensor:
        if tuple(block_values.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, block_values.shape, "block values")
        if fake:
            v = block_values
            for i in range(self.ndim):
                v = v.unsqueeze(2 * i + 1)
            return v
        return _expand(block_values, self.shape)

    # --- reductions
    def norms(self, values: Values = None, p: float = 2) -> Tensor:
        """Lp norm of every block (grid-shaped), one fused pass, no copy of strided views."""
        return ops.block_norms(self.resolve(values, floating=True), self.shape, p)

    def _rank_norms(self, values: Values = None, p: float = 2) -> Tensor:
        """Norms for ranking: float32 (not rounded to fp16 / bf16) for half tensors."""
        return _acc_norms(self.resolve(values, floating=True), self.shape, p)

    def min(self, values: Values = None) -> Tensor:
        return torch.amin(_blocked(self.resolve(values), self.shape), dim=tuple(range(1, 2 * self.ndim, 2)))

    def max(self, values: Values = None) -> Tensor:
        return torch.amax(_blocked(self.resolve(values), self.shape), dim=tuple(range(1, 2 * self.ndim, 2)))

    # --- in-place updates
    def _check_grid(self, t: Tensor, what: str) -> None:
        _tensor_arg(t, what)
        if tuple(t.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, t.shape, what)

    def keep_blocks(self, keep: Tensor) -> None:
        """Zero every block where the grid-shaped bool ``keep`` is False (exact zeros)."""
        self._check_grid(keep, "keep")
        _mask_arg(keep, "keep")
        self.resolve(None, floating=True)  # the weights' dtype, named (the kernel's error names its "x")
        _check_writable([self])
        ops.block_apply_mask_(self.view.data, self.shape, keep.to(torch.bool))

    def apply_mask(self, mask: Tensor) -> None:
        """Zero every block where ``mask`` is True (SparseKit's convention: the mask marks pruned blocks)."""
        self._check_grid(mask, "mask")
        _mask_arg(mask, "mask")
        self.keep_blocks(~mask.to(torch.bool))

    def apply_multiplier(self, multiplier: Tensor) -> None:
        """Multiply every block by its grid entry, in place."""
        self._check_grid(multiplier, "multiplier")
        # session 42: a meta multiplier left the weights silently unchanged, a complex one failed in mul_ unnamed
        x = self.view.data
        if not torch.can_cast(torch.result_type(x, multiplier), x.dtype):
            raise TypeError(f"multiplier: a {multiplier.dtype} multiplier cannot be applied in place to "
                            f"{x.dtype} weights")
        if multiplier.device != x.device and not (multiplier.dim() == 0 and multiplier.device.type == "cpu"):
            raise ValueError(f"multiplier: on {multiplier.device} but the weights are on {x.device}")
        _check_writable([self])
        _blocked(self.view.data, self.shape).mul_(self.broadcast_block_to_element(multiplier, fake=True))

    def hard_threshold(self, thresholds: Tensor, values: Values = None, p: float = 2) -> Tensor:
        """Zero blocks whose norm (of ``values``, else of the weights) is below ``thresholds``
        (grid-shaped) or NaN. Returns the grid keep-mask. The comparison runs in the promoted dtype
        of the norms and the thresholds (a float32 threshold is not rounded to a bf16 weight's
        precision); NaN thresholds are refused."""
        self._check_grid(thresholds, "thresholds")
        _check_thresholds(thresholds)
        self.resolve(None, floating=True)  # the weights' dtype, named (the kernel's error names its "x")
        _check_writable([self])
        # float32 norms for half weights (_rank_norms), as the couplings compare: a norm rounded to bf16 / fp16
        # first could keep a block below its threshold or zero one above it
        keep = _at_least(self._rank_norms(values, p), thresholds)
        ops.block_apply_mask_(self.view.data, self.shape, keep)
        return keep

    def soft_threshold(self, block_thresholds: Tensor, conditioners: Values = None, max_iter: int = 20,
                       atol: float = 1e-8, eps: Optional[float] = None) -> None:
        """Group-lasso proximal step per block (diagonal metric ``conditioners`` solved by bisection).
        ``eps`` defaults to the machine epsilon of the thresholds' dtype (SparseKit's rule);
        negative or NaN thresholds are refused."""
        self._check_grid(block_thresholds, "thresholds")
        _check_thresholds(block_thresholds, nonneg=True)
        _check_soft_scalars(max_iter, atol, eps)
        self.resolve(None, floating=True)  # the weights' dtype, named (the kernel's error names its "x")
        _check_writable([self])
        # the step writes .data, outside autograd (SparseKit's proximal step): thresholds and conditioners that
        # require grad are read as values, as the weights are
        cond = None if conditioners is None else self.resolve(conditioners, "conditioners").detach()
        ops.block_soft_threshold_(self.view.data, self.shape, block_thresholds.detach(), conditioner=cond,
                                  max_iter=max_iter, atol=atol, eps=_default_eps(block_thresholds, eps))

    # --- masks
    def get_masks(self, block_masks: Tensor) -> Dict["BlockSpec", Tensor]:
        """Grid-shaped bool keep-mask -> {self: element mask (view-shaped)}."""
        return {self: self.broadcast_block_to_element(block_masks)}

    def __repr__(self) -> str:
        return f"BlockSpec(shape={self.shape}, grid_shape={self.grid_shape}, name={self.name!r})"

    def __hash__(self) -> int:
        return hash((self.view, self.shape))

    def __eq__(self, other) -> bool:
        if not isinstance(other, BlockSpec):
            return NotImplemented
        return self.view == other.view and self.shape == other.shape


class BlockCoupling(SparseBlock):
    """Blocks of several BlockSpecs pruned together: block (i...) of the coupling is the union of
    each spec's block at the position its ``orders`` permutation maps to. Norms combine over the
    union (``(sum_s n_s^p)^(1/p)``)."""

    def __init__(self, specs: Sequence[BlockSpec], orders: Optional[Sequence[Sequence[int]]] = None,
                 name: Optional[str] = None):
        def describe(g, s, o, ref, first):
            return (f"BlockCoupling {name or ''}: incompatible block grids: {g} (spec {s.name or '?'}, "
                    f"grid {s.grid_shape} after order {o}) vs {ref} (spec {first.name or '?'})")

        self.name = name
        self.specs, self.orders, self._reverse_orders, self.grid_shape = _aligned(
            "BlockCoupling", specs, BlockSpec, "specs", orders, describe)

    @property
    def shape(self) -> Tuple[int, ...]:
        return (-1,) * len(self.grid_shape)

    @property
    def data(self) -> Dict[BlockSpec, Tensor]:
        return {s: s.view.data for s in self.specs}

    def numel_per_block(self) -> int:
        return sum(s.numel_per_block() for s in self.specs)

    def blocks(self) -> List[BlockSpec]:
        return list(self.specs)

    def parameters(self) -> List[View]:
        return [s.view for s in self.specs]

    def nnz(self, eps: float = 1e-8) -> int:
        return sum(s.nnz(eps) for s in self.specs)

    def _values_for(self, values: Values, s: BlockSpec) -> Values:
        if values is None:
            return None
        if isinstance(values, Mapping):
            return values
        raise ValueError("values: a BlockCoupling needs None or a mapping {BlockSpec: tensor}")

    def _to_common(self, t: Tensor, i: int) -> Tensor:
        return t.permute(self.orders[i])

    def _from_common(self, t: Tensor, i: int) -> Tensor:
        return t.permute(self._reverse_orders[i]).contiguous()

    def norms(self, values: Values = None, p: float = 2) -> Tensor:
        """Norms over the union of the coupled blocks, in float32 (float64 when the first spec's
        values are float64); each spec's part is combined unrounded (float32 for fp16 / bf16)."""
        parts = [self._to_common(s._rank_norms(self._values_for(values, s), p), i) for i, s in enumerate(self.specs)]
        acc = torch.float64 if parts[0].dtype == torch.float64 else torch.float32
        if math.isinf(p):
            out = parts[0].to(acc)
            for q in parts[1:]:
                out = torch.maximum(out, q.to(acc))
            return out
        tot = sum(q.to(acc) ** p for q in parts)
        return tot.sqrt() if p == 2 else tot ** (1.0 / p)

    def min(self, values: Values = None) -> Tensor:
        parts = [self._to_common(s.min(self._values_for(values, s)), i) for i, s in enumerate(self.specs)]
        return torch.stack(parts).amin(0)

    def max(self, values: Values = None) -> Tensor:
        parts = [self._to_common(s.max(self._values_for(values, s)), i) for i, s in enumerate(self.specs)]
        return torch.stack(parts).amax(0)

    def block_view(self, values: Values = None, reorder: bool = True, merge: bool = False) -> Tensor:
        parts = []
        for i, s in enumerate(self.specs):
            m = s.block_view(self._values_for(values, s), merge=True)
            parts.append(m.permute(*self.orders[i], len(self.orders[i])))
        return torch.cat(parts, dim=-1)

    def _check_grid(self, t: Tensor, what: str) -> None:
        _tensor_arg(t, what)
        if tuple(t.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, t.shape, what)

    def keep_blocks(self, keep: Tensor) -> None:
        self._check_grid(keep, "keep")
        _mask_arg(keep, "keep")
        _check_targets(self.specs, keep, "keep")
        for i, s in enumerate(self.specs):
            s.keep_blocks(self._from_common(keep, i))

    def apply_mask(self, mask: Tensor) -> None:
        self._check_grid(mask, "mask")
        _mask_arg(mask, "mask")
        self.keep_blocks(~mask.to(torch.bool))

    def apply_multiplier(self, multiplier: Tensor) -> None:
        self._check_grid(multiplier, "multiplier")
        _check_targets(self.specs, multiplier, "multiplier")
        for i, s in enumerate(self.specs):
            s.apply_multiplier(self._from_common(multiplier, i))

    def hard_threshold(self, thresholds: Tensor, values: Values = None, p: float = 2) -> Tensor:
        self._check_grid(thresholds, "thresholds")
        _check_thresholds(thresholds)
        keep = _at_least(self.norms(values, p), thresholds)
        self.keep_blocks(keep)
        return keep

    def soft_threshold(self, block_thresholds: Tensor, conditioners: Values = None, max_iter: int = 20,
                       atol: float = 1e-8, eps: Optional[float] = None) -> None:
        """Joint group-lasso step over the coupled blocks (one norm per coupled block). ``eps``
        defaults to the machine epsilon of the thresholds' dtype (SparseKit's rule)."""
        self._check_grid(block_thresholds, "thresholds")
        _check_thresholds(block_thresholds, nonneg=True)
        _check_soft_args(block_thresholds, max_iter, atol, eps)
        _check_writable(self.specs, "specs")
        dt = self.specs[0].view.data.dtype
        eps = _default_eps(block_thresholds, eps)
        eps = float(torch.finfo(dt).eps) if eps is None else eps
        acc = torch.float64 if dt == torch.float64 else torch.float32
        t = block_thresholds.to(acc)
        if conditioners is None:
            n = self.norms(None, 2)
            scale = (1 - t / (n + eps)).clamp(min=0.0)
            # the kernels' rule (kernels.reference.scope.SOFT_RULE): a NaN scale (NaN norm, inf / inf, 0 / 0) counts
            # as 0, and an infinite element scaled by 0 becomes its signed zero (not inf * 0 = NaN)
            scale = torch.where(torch.isnan(scale), torch.zeros_like(scale), scale)
            zero_inf = (scale == 0) & torch.isinf(n)
            any_zero_inf = bool(zero_inf.any())
            for i, s in enumerate(self.specs):
                fix = None
                if any_zero_inf:
                    xb = _blocked(s.view.data, s.shape)
                    fix = s.broadcast_block_to_element(self._from_common(zero_inf, i), fake=True) & torch.isinf(xb)
                    neg = fix & torch.signbit(xb)
                s.apply_multiplier(self._from_common(scale, i))  # in acc: x * scale rounds once
                if fix is not None:
                    xb.masked_fill_(fix, 0.0).masked_fill_(neg, -0.0)
                s.keep_blocks(self._from_common(~torch.isnan(n), i))
            return
        if not isinstance(conditioners, Mapping):
            raise ValueError("conditioners: a BlockCoupling needs a mapping {BlockSpec: tensor}")
        h = {s: s.resolve(conditioners, "conditioners").to(acc) for s in self.specs}
        for s in self.specs:  # finite and > 0 (ops.block_soft_threshold_'s rule), before any spec is written
            _check_soft_values(None, h[s], acc, ("thresholds", "conditioners"))
        x = {s: s.view.data.to(acc) for s in self.specs}
        hw = {s: h[s] * x[s] for s in self.specs}
        nhw = self.norms(hw, 2)
        dead = ~(nhw > t)
        denom = (nhw - t).clamp(min=0.0) + eps
        lo = (t * self.min(h) / denom).clamp(min=0.0)
        hi = (t * self.max(h) / denom).clamp(min=0.0)
        done = torch.zeros_like(lo, dtype=torch.bool)
        mu = (lo + hi) / 2

        def spread(v, i, s):
            return s.broadcast_block_to_element(self._from_common(v, i))

        for _ in range(max_iter):
            z = {s: hw[s] / (h[s] + spread(mu, i, s)) for i, s in enumerate(self.specs)}
            zeta = mu * self.norms(z, 2)
            below = zeta < t
            lo = torch.where(done, lo, torch.where(below, mu, lo))
            hi = torch.where(done, hi, torch.where(below, hi, mu))
            mu = torch.where(done, mu, (lo + hi) / 2)
            done = done | ((hi - lo).abs() < atol)
            if bool(done.all()):
                break
        for i, s in enumerate(self.specs):
            y = hw[s] / (h[s] + spread(mu, i, s))
            y = torch.where(spread(dead, i, s), torch.zeros_like(y), y)
            s.set_data(y)  # copy_ rounds once, to each spec's own dtype

    def get_masks(self, block_masks: Tensor) -> Dict[BlockSpec, Tensor]:
        self._check_grid(block_masks, "block_masks")
        out: Dict[BlockSpec, Tensor] = {}
        for i, s in enumerate(self.specs):
            out.update(s.get_masks(self._from_common(block_masks, i)))
        return out

    def __repr__(self) -> str:
        return f"BlockCoupling(grid_shape={self.grid_shape}, name={self.name!r}, specs={self.specs})"

    def __hash__(self) -> int:
        return hash(tuple(hash(s) for s in self.specs))


# --------------------------------------------------------------------------- scopes


def _no_extra_kwargs(method: str, kwargs: Mapping[str, object]) -> None:
    if kwargs:
        raise TypeError(f"{method}: unexpected keyword argument(s) {sorted(kwargs)}")


def _format_masks(masks: Dict[BlockSpec, Tensor], format: str):
    if format == "bool":
        return masks
    out = {}
    for spec, m in masks.items():
        pm = spec.view.to_param(m)
        if format == "param":
            out[spec] = pm
        elif format == "bitmask":
            out[spec] = ops.pack_bitmask(pm)
        elif format == "indices":
            out[spec] = ops.mask_to_indices(pm, torch.int64)
        else:
            raise ValueError(f"format: expected 'bool', 'param', 'bitmask' or 'indices', got {format!r}")
    return out


def _check_format(format: str) -> None:
    if format not in ("bool", "param", "bitmask", "indices"):
        raise ValueError(f"format: expected 'bool', 'param', 'bitmask' or 'indices', got {format!r}")


class SparseScope:
    """Common interface of ScopeSpec and ScopeCoupling."""

    grid_shape: Tuple[int, ...]

    def numscp(self) -> int:
        return math.prod(self.grid_shape)

    def numblk(self) -> int:
        return self.numscp() * self.numblk_per_scope()

    def sparsity_to_nnz(self, sparsity: float) -> int:
        """Blocks to keep per scope for a pruned fraction ``sparsity`` in [0, 1]: ``n - floor(sparsity * n)``,
        by gradkit's one counting rule (``gradkit._rules.floor_count``, as ``golden.percent_to_k``): a product
        that ``sparsity``'s own rounding could move onto an integer counts as that integer (``0.29`` of 100
        blocks prunes 29, ``1 / 3`` of 3 prunes 1; SparseKit's ``int(0.29 * 100)`` is 28, the float product
        being 28.999999999999996)."""
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity <= 1 \
                or math.isnan(sparsity):
            raise ValueError(f"sparsity: expected a number in [0, 1], got {sparsity!r}")
        n = self.numblk_per_scope()
        return max(n - floor_count(n, sparsity), 0)

    def _check_nnz(self, nnz, what: str = "nnz") -> int:
        if isinstance(nnz, bool) or not isinstance(nnz, numbers.Integral):  # numpy ints too, as the ops take them
            raise TypeError(f"{what}: expected an int, got {type(nnz).__name__}")
        nnz = int(nnz)
        n = self.numblk_per_scope()
        if not 0 <= nnz <= n:
            raise ValueError(f"{what}: expected 0 <= {what} <= {n} (blocks per scope), got {nnz}")
        return nnz

    def __str__(self) -> str:
        return repr(self)


class ScopeSpec(SparseScope):
    """The block grid of ``block`` cut into scopes of ``shape`` blocks (-1 spans a dim; missing
    trailing dims span). Blocks inside a scope compete; scopes are independent."""

    def __init__(self, block: SparseBlock, shape: Sequence[int] = (), name: Optional[str] = None):
        if not isinstance(block, SparseBlock):
            raise TypeError(f"ScopeSpec: block: expected a BlockSpec or BlockCoupling, got {type(block).__name__}")
        g = block.grid_shape
        shape = _ints(shape, "shape")
        if len(shape) < len(g):
            shape = shape + (-1,) * (len(g) - len(shape))
        if len(shape) != len(g):
            raise ValueError(f"ScopeSpec {name or ''}: scope shape {shape} has {len(shape)} dims but the block grid "
                             f"{g} has {len(g)}")
        shape = tuple(max(1, g[i]) if s == -1 else s for i, s in enumerate(shape))  # -1 of an empty grid dim: 1
        for i, (n, s) in enumerate(zip(g, shape)):
            if s < 1 or n % s:
                raise ValueError(f"ScopeSpec {name or ''}: dim {i}: block grid {g} not divisible by scope shape "
                                 f"{shape} (grid[{i}]={n}, scope[{i}]={s})")
        self.block, self.shape, self.name = block, shape, name
        self.grid_shape = tuple(n // s for n, s in zip(g, shape))

    def numblk_per_scope(self) -> int:
        return math.prod(self.shape)

    def numel_per_scope(self) -> int:
        """Elements per scope (SparseKit 0.1.5 returns the block count here)."""
        return self.numblk_per_scope() * self.block.numel_per_block()

    def blocks(self) -> List[BlockSpec]:
        return self.block.blocks()

    def nnz(self, eps: float = 1e-8) -> int:
        return self.block.nnz(eps)

    # --- layout helpers
    def block_to_scope(self, b: Tensor, reorder: bool = True, merge: bool = False) -> Tensor:
        g = self.block.grid_shape
        if tuple(b.shape[:len(g)]) != tuple(g):
            raise ShapeMismatchError(g, b.shape[:len(g)], "block_to_scope")
        inter = [x for pair in zip(self.grid_shape, self.shape) for x in pair]
        v = b.reshape(*inter, *b.shape[len(g):])
        nd = len(g)
        if reorder or merge:
            rest = list(range(2 * nd, v.dim()))
            v = v.permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)) + rest)
            if merge:
                v = v.reshape(*self.grid_shape, self.numblk_per_scope(), *b.shape[len(g):])
        return v

    def scope_to_block(self, scope_values: Tensor) -> Tensor:
        if tuple(scope_values.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, scope_values.shape, "scope values")
        return _expand(scope_values, self.shape)

    def _single(self) -> Optional[BlockSpec]:
        return self.block if isinstance(self.block, BlockSpec) else None

    def _grid_scores(self, values: Values, p: float) -> Tensor:
        """Grid-shaped norms for ranking (float32, not rounded to fp16 / bf16)."""
        b = self.block
        return b._rank_norms(values, p) if isinstance(b, BlockSpec) else b.norms(values, p)

    def block_norms(self, values: Values = None, p: float = 2) -> Tensor:
        """``(*grid_shape, numblk_per_scope)`` block norms in scope layout."""
        return self.block_to_scope(self.block.norms(values, p), merge=True)

    def kth_largest(self, element_values: Values = None, nnz: int = 1, p: float = 2) -> Tensor:
        """Per scope, the nnz-th largest block norm (scope-grid shaped); -inf where fewer valid."""
        nnz = self._check_nnz(nnz)
        if nnz == 0:
            raise ValueError("nnz: the 0-th largest is undefined; expected nnz >= 1")
        return self._kth(element_values, nnz, p, mid=False, k_weight=1.0)

    def mid_kth_largest(self, element_values: Values = None, nnz: int = 1, k_weight: float = 1.0,
                        p: float = 2) -> Tensor:
        """Per scope, ``(v_nnz + k_weight * v_{nnz+1}) / (1 + k_weight)`` of the block norms."""
        if isinstance(nnz, bool) or not isinstance(nnz, numbers.Integral) or not 1 <= nnz < self.numblk_per_scope():
            raise ValueError(f"nnz: expected 1 <= nnz < {self.numblk_per_scope()}, got {nnz!r}")
        nnz = int(nnz)
        return self._kth(element_values, nnz, p, mid=True, k_weight=k_weight)

    kth_mid = mid_kth_largest

    def _kth(self, values, k, p, mid, k_weight):
        spec = self._single()
        # once: a parameter-shaped non-contiguous one is copied
        x = None if spec is None else spec.resolve(values, floating=True)
        if x is not None and x.dtype not in (torch.float16, torch.bfloat16):
            return ops.scope_kth(x, spec.shape, self.shape, k, p=p, k_weight=k_weight, mid=mid)
        # half weights: the float32 norms (as ScopeCoupling.kth_largest and hard_threshold compare), so that
        # hard_threshold(thresholds=kth_largest(k)) keeps the k blocks whose norms rank first
        g = self.block._rank_norms(values, p) if spec is not None else self.block.norms(values, p)
        return ops.scope_kth(g, [1] * g.dim(), self.shape, k, p=p, raw=True, k_weight=k_weight, mid=mid)

    def block_keep(self, nnz: int, values: Values = None, block_scores: Optional[Tensor] = None,
                   ties: str = "exact", p: float = 2) -> Tensor:
        """Grid-shaped bool mask of the blocks kept (nnz per scope)."""
        keep_ties = _ties(ties)
        nnz = self._check_nnz(nnz)
        if block_scores is not None:
            _score_arg(block_scores, "block_scores")
            want = self.grid_shape + (self.numblk_per_scope(),)
            if tuple(block_scores.shape) != want:
                raise ShapeMismatchError(want, block_scores.shape, "block_scores")
            g = self._unmerge(block_scores)
            return ops.scope_mask(g, [1] * g.dim(), list(self.shape), nnz, raw=True, keep_ties=keep_ties,
                                  expand=False)
        spec = self._single()
        if spec is not None:
            x = spec.resolve(values, floating=True)
            if self.numscp() == 1 and self.numblk_per_scope() > 1 << 16 and not keep_ties:
                return _global_keep(_acc_norms(x, spec.shape, p), nnz)
            return ops.scope_mask(x, spec.shape, self.shape, nnz, p=p, keep_ties=keep_ties, expand=False)
        g = self.block.norms(values, p)
        if self.numscp() == 1 and self.numblk_per_scope() > 1 << 16 and not keep_ties:
            return _global_keep(g, nnz)
        return ops.scope_mask(g, [1] * g.dim(), list(self.shape), nnz, raw=True, keep_ties=keep_ties, expand=False)

    def _unmerge(self, merged: Tensor) -> Tensor:
        nd = len(self.shape)
        v = merged.reshape(*self.grid_shape, *self.shape)
        perm = []
        for i in range(nd):
            perm += [i, nd + i]
        return v.permute(perm).reshape(self.block.grid_shape)

    def get_masks(self, nnz: int, values: Values = None, block_scores: Optional[Tensor] = None,
                  block_mask: Optional[Tensor] = None, ties: str = "exact", p: float = 2, format: str = "bool",
                  **kwargs) -> Dict[BlockSpec, Tensor]:
        """Element keep-masks per BlockSpec: ``format`` "bool" (view-shaped), "param"
        (parameter-shaped; elements outside a View kept), "bitmask" (packed parameter mask) or
        "indices" (ascending flat parameter positions). Keyword arguments other than these are a
        TypeError (SparseKit ignores them, so a misspelt ``tie=`` went unnoticed)."""
        _check_format(format)
        _no_extra_kwargs("get_masks", kwargs)
        if block_mask is not None:
            _mask_arg(block_mask, "block_mask")
            want = self.grid_shape + (self.numblk_per_scope(),)
            if tuple(block_mask.shape) != want:
                raise ShapeMismatchError(want, block_mask.shape, "block_mask")
            keep = self._unmerge(block_mask.to(torch.bool))
            return _format_masks(self.block.get_masks(keep), format)
        spec = self._single()
        if spec is not None and block_scores is None and not (self.numscp() == 1 and self.numblk_per_scope() > 1 << 16):
            nnz = self._check_nnz(nnz)
            x = spec.resolve(values, floating=True)
            m = ops.scope_mask(x, spec.shape, self.shape, nnz, p=p, keep_ties=_ties(ties),
                               expand=True)
            return _format_masks({spec: m}, format)
        keep = self.block_keep(nnz, values=values, block_scores=block_scores, ties=ties, p=p)
        return _format_masks(self.block.get_masks(keep), format)

    def hard_threshold(self, thresholds: Optional[Tensor] = None, nnz: Optional[int] = None, values: Values = None,
                       ties: str = "exact", p: float = 2) -> Tensor:
        """Zero, in place, the blocks not kept; returns the grid keep-mask.

        With ``nnz``: the nnz best blocks per scope by the norms of ``values`` (else the
        weights), in one fused pass. With ``thresholds`` (scope-grid shaped): every block whose
        norm is >= its scope's threshold survives."""
        if (thresholds is None) == (nnz is None):
            raise ValueError("hard_threshold: give exactly one of thresholds or nnz")
        keep_ties = _ties(ties)
        if thresholds is not None:
            if not isinstance(thresholds, Tensor) or tuple(thresholds.shape) != self.grid_shape:
                raise ShapeMismatchError(self.grid_shape, getattr(thresholds, "shape", ()), "thresholds")
            return self.block.hard_threshold(self.scope_to_block(thresholds), values=values, p=p)
        nnz = self._check_nnz(nnz)
        spec = self._single()
        if spec is not None and not (self.numscp() == 1 and self.numblk_per_scope() > 1 << 16 and not keep_ties):
            spec.resolve(None, floating=True)  # the weights' dtype, named (the kernel's error names its "x")
            _check_writable([spec])
            v = None if values is None else spec.resolve(values, floating=True)
            if v is None or v.dtype == spec.view.data.dtype:
                return ops.scope_hard_threshold_(spec.view.data, spec.shape, self.shape, nnz, values=v, p=p,
                                                 keep_ties=keep_ties)
            # values of another dtype are ranked in their own precision (rounding float32 values to a
            # bf16 weight's dtype would tie, and so reorder, blocks that differ), then applied
        keep = self.block_keep(nnz, values=values, ties=ties, p=p)
        self.block.keep_blocks(keep)
        return keep

    def soft_threshold(self, thresholds: Tensor, conditioners: Values = None, scale: bool = False,
                       max_iter: int = 20, atol: float = 1e-8, eps: Optional[float] = None) -> None:
        """Group-lasso proximal step with per-scope ``thresholds`` (scope-grid shaped); ``scale``
        multiplies them by sqrt(elements per block)."""
        if not isinstance(thresholds, Tensor) or tuple(thresholds.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, getattr(thresholds, "shape", ()), "thresholds")
        scale = ops._flag(scale, "scale")  # scale="no" would be taken as True
        t = self.scope_to_block(thresholds)
        if scale:
            t = t * math.sqrt(self.block.numel_per_block())
        self.block.soft_threshold(t, conditioners=conditioners, max_iter=max_iter, atol=atol, eps=eps)

    def __repr__(self) -> str:
        return f"ScopeSpec(shape={self.shape}, grid_shape={self.grid_shape}, name={self.name!r}, block={self.block})"

    def __hash__(self) -> int:
        return hash((hash(self.block), self.shape))


def _global_keep(g: Tensor, nnz: int) -> Tensor:
    """One huge scope: the parallel radix select of the param-map (ties: lowest position; NaN never kept)."""
    flat = g.reshape(-1)
    valid = ~torch.isnan(flat)
    nv = int(valid.sum())
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if nnz >= nv:
        keep |= valid
    elif nnz > 0:
        pos = ops.topk_select(flat, nnz, active=None if nv == flat.numel() else valid)
        keep[pos] = True
    return keep.reshape(g.shape)


class ScopeCoupling(SparseScope):
    """Scopes of several ScopeSpecs competing jointly: scope grids aligned by ``orders``
    (permutations); within an aligned scope the blocks of every spec are ranked together, in
    the order specs are listed (the tie-break order)."""

    def __init__(self, scopes: Sequence[ScopeSpec], orders: Optional[Sequence[Sequence[int]]] = None,
                 name: Optional[str] = None):
        def describe(g, s, o, ref, first):
            return (f"ScopeCoupling {name or ''}: incompatible scope shapes after order: {g} "
                    f"(scope {s.name or '?'}, scope grid {s.grid_shape}, order {o}) vs {ref} "
                    f"(scope {first.name or '?'})")

        self.name = name
        self.scopes, self.orders, self._reverse_orders, self.grid_shape = _aligned(
            "ScopeCoupling", scopes, ScopeSpec, "scopes", orders, describe)

    @property
    def params(self):
        return {p for s in self.scopes for p in s.block.parameters()}

    def numblk(self) -> int:
        return sum(s.numblk() for s in self.scopes)

    def numblk_per_scope(self) -> int:
        return sum(s.numblk_per_scope() for s in self.scopes)

    def numel_per_scope(self) -> int:
        return sum(s.numel_per_scope() for s in self.scopes)

    def blocks(self) -> List[BlockSpec]:
        return [b for s in self.scopes for b in s.blocks()]

    specs = blocks

    def nnz(self, eps: float = 1e-8) -> int:
        return sum(s.nnz(eps) for s in self.scopes)

    def block_norms(self, values: Values = None, p: float = 2) -> Tensor:
        """``(*grid_shape, numblk_per_scope)``: each scope's merged norms, concatenated in list order."""
        parts = []
        for o, s in zip(self.orders, self.scopes):
            parts.append(s.block_to_scope(s._grid_scores(values, p), merge=True).permute(*o, len(o)))
        acc = torch.float64 if any(q.dtype == torch.float64 for q in parts) else torch.float32
        return torch.cat([q.to(acc) for q in parts], dim=-1)

    def kth_largest(self, k: int, values: Values = None, p: float = 2) -> Tensor:
        k = self._check_nnz(k, "k")
        if k == 0:
            raise ValueError("k: expected k >= 1")
        b = self.block_norms(values, p)
        return ops.scope_kth(b, [1] * b.dim(), [1] * (b.dim() - 1) + [b.shape[-1]], k, raw=True).squeeze(-1)

    def mid_kth_largest(self, k: int, values: Values = None, k_weight: float = 1.0, p: float = 2) -> Tensor:
        n = self.numblk_per_scope()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < n:
            raise ValueError(f"k: expected 1 <= k < {n}, got {k!r}")
        k = int(k)
        b = self.block_norms(values, p)
        return ops.scope_kth(b, [1] * b.dim(), [1] * (b.dim() - 1) + [b.shape[-1]], k, raw=True, mid=True,
                             k_weight=k_weight).squeeze(-1)

    def joint_keep(self, nnz: int, values: Values = None, block_scores: Optional[Tensor] = None,
                   ties: str = "exact", p: float = 2) -> Tensor:
        """``(*grid_shape, numblk_per_scope)`` bool: the blocks kept in every aligned scope."""
        keep_ties = _ties(ties)
        nnz = self._check_nnz(nnz)
        if block_scores is None:
            block_scores = self.block_norms(values, p)
        else:
            _score_arg(block_scores, "block_scores")
            want = self.grid_shape + (self.numblk_per_scope(),)
            if tuple(block_scores.shape) != want:
                raise ShapeMismatchError(want, block_scores.shape, "block_scores")
        b = block_scores
        if self.numscp() == 1 and b.shape[-1] > 1 << 16 and not keep_ties:
            return _global_keep(b, nnz)
        return ops.scope_mask(b, [1] * b.dim(), [1] * (b.dim() - 1) + [b.shape[-1]], nnz, raw=True,
                              keep_ties=keep_ties, expand=False)

    def _split(self, joint: Tensor):
        start = 0
        for ro, s in zip(self._reverse_orders, self.scopes):
            n = s.numblk_per_scope()
            yield s, joint[..., start:start + n].permute(*ro, len(ro)).contiguous()
            start += n

    def _global(self, nnz: int, values: Values, block_scores, ties: str) -> bool:
        return (self.numscp() == 1 and block_scores is None and not _ties(ties)
                and self.numblk_per_scope() > 1 << 16 and 0 < self._check_nnz(nnz))

    def _global_keeps(self, nnz: int, values: Values, p: float) -> List[Tuple[ScopeSpec, Tensor]]:
        """One aligned scope over every spec (global selection across tensors): the multi-tensor
        radix select on each spec's block norms, no concatenated copy. Returns each scope's
        grid-shaped keep mask."""
        norms = [s._grid_scores(values, p) for s in self.scopes]
        dt = torch.promote_types(norms[0].dtype, torch.float32)
        for q in norms[1:]:
            dt = torch.promote_types(dt, q.dtype)
        flat = [q.reshape(-1).to(dt) for q in norms]
        try:
            pos = ops.topk_select_segments(flat, min(nnz, sum(q.numel() for q in flat)))
        except ValueError:  # NaN norms: never kept; rank only the valid ones
            active = [~torch.isnan(q) for q in flat]
            nv = sum(int(a.sum()) for a in active)
            pos = ops.topk_select_segments(flat, min(nnz, nv), active=active)
        out, start = [], 0
        for s, q in zip(self.scopes, flat):
            keep = torch.zeros(q.numel(), dtype=torch.bool, device=q.device)
            lo = int(torch.searchsorted(pos, start))
            hi = int(torch.searchsorted(pos, start + q.numel()))
            keep[pos[lo:hi] - start] = True
            out.append((s, keep.reshape(s.block.grid_shape)))
            start += q.numel()
        return out

    def get_masks(self, nnz: int, block_scores: Optional[Tensor] = None, values: Values = None,
                  ties: str = "exact", p: float = 2, format: str = "bool", block_mask: Optional[Tensor] = None,
                  **kwargs) -> Dict[BlockSpec, Tensor]:
        """As :meth:`ScopeSpec.get_masks`, with SparseKit's argument order. ``block_mask``
        (``(*grid_shape, numblk_per_scope)`` bool, the coupled scopes' blocks in order) is used as the
        joint keep-mask (SparseKit silently ignores it and selects by norms); other unknown keyword
        arguments are a TypeError."""
        _check_format(format)
        _no_extra_kwargs("get_masks", kwargs)
        if block_mask is not None:
            want = self.grid_shape + (self.numblk_per_scope(),)
            if not isinstance(block_mask, Tensor) or tuple(block_mask.shape) != want:
                raise ShapeMismatchError(want, getattr(block_mask, "shape", ()), "block_mask")
            _mask_arg(block_mask, "block_mask")
            joint = block_mask.to(torch.bool)
        elif self._global(nnz, values, block_scores, ties):
            out: Dict[BlockSpec, Tensor] = {}
            for s, keep in self._global_keeps(nnz, values, p):
                out.update(_format_masks(s.block.get_masks(keep), format))
            return out
        else:
            joint = self.joint_keep(nnz, values=values, block_scores=block_scores, ties=ties, p=p)
        out: Dict[BlockSpec, Tensor] = {}
        for s, part in self._split(joint):
            out.update(s.get_masks(0, block_mask=part, format=format))
        return out

    def hard_threshold(self, thresholds: Optional[Tensor] = None, nnz: Optional[int] = None, values: Values = None,
                       ties: str = "exact", p: float = 2) -> Tensor:
        """Zero, in place, the blocks not kept across the coupled scopes. Scores come from
        ``values`` (a mapping per BlockSpec) when given, else from the weights - both for ``nnz``
        and for explicit ``thresholds``. Returns the joint keep-mask."""
        if (thresholds is None) == (nnz is None):
            raise ValueError("hard_threshold: give exactly one of thresholds or nnz")
        _ties(ties)  # checked with thresholds too, as ScopeSpec.hard_threshold does
        _check_writable(self.blocks(), "blocks()")  # before the first scope is written
        if nnz is not None and self._global(nnz, values, None, ties):
            keeps = self._global_keeps(nnz, values, p)
            for s, keep in keeps:
                s.block.keep_blocks(keep)
            return torch.cat([k.reshape(-1) for _, k in keeps]).reshape(self.grid_shape + (-1,))
        if nnz is not None:
            joint = self.joint_keep(nnz, values=values, ties=ties, p=p)
        else:
            if not isinstance(thresholds, Tensor) or tuple(thresholds.shape) != self.grid_shape:
                raise ShapeMismatchError(self.grid_shape, getattr(thresholds, "shape", ()), "thresholds")
            _check_thresholds(thresholds)
            b = self.block_norms(values, p)
            joint = _at_least(b, thresholds.unsqueeze(-1))
        for s, part in self._split(joint):
            s.block.keep_blocks(s._unmerge(part))
        return joint

    def soft_threshold(self, thresholds: Tensor, conditioners: Values = None, scale: bool = False,
                       max_iter: int = 20, atol: float = 1e-8, eps: Optional[float] = None) -> None:
        if not isinstance(thresholds, Tensor) or tuple(thresholds.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, getattr(thresholds, "shape", ()), "thresholds")
        _check_thresholds(thresholds, nonneg=True)
        _check_soft_args(thresholds, max_iter, atol, eps)
        scale = ops._flag(scale, "scale")
        for i, s in enumerate(self.scopes):  # every scope takes the thresholds, before the first is written
            _check_targets(s.blocks(), thresholds, "thresholds", f"scopes[{i}].blocks()")
        if conditioners is not None:  # every scope's conditioners, before the first scope is written
            for s in self.scopes:
                for b in s.blocks():
                    if isinstance(s.block, BlockCoupling) and not isinstance(conditioners, Mapping):
                        raise ValueError("conditioners: a BlockCoupling needs a mapping {BlockSpec: tensor}")
                    x = b.view.data  # what ops.block_soft_threshold_ checks of it, ahead of any write
                    h = b.resolve(conditioners, "conditioners")
                    ops._check_companion(h, x, "conditioners", x.shape)
                    _check_soft_values(None, h, _acc_dtype(x.dtype), ("thresholds", "conditioners"))
        eps = _default_eps(thresholds, eps)
        for ro, s in zip(self._reverse_orders, self.scopes):
            s.soft_threshold(thresholds.permute(ro).contiguous(), conditioners=conditioners, scale=scale,
                             max_iter=max_iter, atol=atol, eps=eps)

    def __repr__(self) -> str:
        return f"ScopeCoupling(orders={self.orders}, scopes={self.scopes}, name={self.name!r})"

    def __hash__(self) -> int:
        return hash(tuple(hash(s) for s in self.scopes))


# --------------------------------------------------------------------------- N:M helpers


def check_nm(mask: Tensor, n: int, m: int) -> None:
    """Raise ValueError unless every group of ``m`` consecutive elements along the last dim
    keeps at most ``n`` (the layout ``torch.sparse.to_sparse_semi_structured`` needs for 2:4)."""
    _tensor_arg(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor, got {mask.dtype}")
    n, m = ops._int(n, "n"), ops._int(m, "m")
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"n, m: expected 0 <= n <= m and m >= 1, got {n}:{m}")
    if mask.dim() < 1 or mask.shape[-1] % m:
        raise ValueError(f"mask: last dim {tuple(mask.shape)[-1:]} is not a multiple of m={m}")
    counts = mask.reshape(*mask.shape[:-1], mask.shape[-1] // m, m).sum(-1)  # (an empty mask too)
    if counts.numel() and int(counts.max()) > n:
        raise ValueError(f"mask: a group of {m} keeps {int(counts.max())} > {n} elements")


def semi_structured(weight: Tensor, mask: Tensor):
    """``torch.sparse.to_sparse_semi_structured`` of ``weight`` with the 2:4 ``mask`` applied
    (CUDA only, as in torch). The mask is checked first: a broken pattern is an error, never
    a silently different sparsity."""
    _tensor_arg(weight, "weight")
    _tensor_arg(mask, "mask")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ShapeMismatchError(weight.shape, mask.shape, "mask")
    check_nm(mask, 2, 4)
    if weight.device.type != "cuda":
        raise ValueError("semi_structured: torch's semi-structured sparse tensors need a CUDA weight")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight.masked_fill(~mask, 0))

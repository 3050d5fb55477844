"""The param-map: which entries of which parameters form a flat "input space".

A :class:`ParamMap` is an ordered list of entries ``name -> (shape, selection)``.
The selection of an entry is one of

* ``"all"``      every element, in row-major order;
* ``"mask"``     a bool tensor of the parameter's shape; order = ascending flat position;
* ``"bitmask"``  the same as a packed uint8 tensor of ceil(numel/8) bytes
                 (bit ``j`` of byte ``i`` is element ``8*i + j``), 1 bit per element;
* ``"indices"``  a 1-D integer tensor of flat positions, in the order given (need not be sorted).

The input space is the concatenation of the entries' selections in insertion order,
exactly as in GRADIEND's ``ParamMappedGradiendModel.param_map``. Masks and bitmasks
are compiled once into per-entry int32 (int64 past 2^31-1 elements) position plans,
cached per device; gather and scatter then run one fused kernel over all entries.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import operator
import os
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from gradkit import ops
from gradkit._io import NO_LIMIT, parse_json, read_regular, write_dir_atomic, write_safetensors
from gradkit._rules import FLOATS as _FLOAT_DTYPES, flag, not_meta
from gradkit._unwrap import unwrap_model

REPRS = ("all", "mask", "bitmask", "indices")
_INT32_MAX = 2**31 - 1
# unsigned dtypes past uint8: torch implements neither min / max nor comparisons for them on the CPU
_WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))
CONFIG = "config.json"
INDICES_FILE = "mapping_indices.safetensors"
MASKS_FILE = "mapping_masks.safetensors"


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= _INT32_MAX else torch.int64


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


@dataclass
class _Entry:
    name: str
    shape: Tuple[int, ...]
    numel: int
    repr: str
    sel: Optional[torch.Tensor]  # None | bool mask (shape) | uint8 bits | int indices (CPU)
    count: int
    ascending: bool  # selection positions strictly increasing (always true for all/mask/bitmask)
    pos: Optional[torch.Tensor] = None  # CPU position plan (int32/int64), computed once

    def positions(self) -> Optional[torch.Tensor]:
        """Flat positions in input order on CPU (None for "all")."""
        if self.repr == "all":
            return None
        if self.repr == "indices":
            return self.sel
        if self.pos is None:
            if self.repr == "mask":
                self.pos = ops.mask_to_indices(self.sel, _index_dtype(self.numel))
            else:
                self.pos = ops.bitmask_to_indices(self.sel, self.numel, _index_dtype(self.numel))
        return self.pos


def _check_shape(where: str, shape: Any) -> Tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in shape):
        raise ValueError(f"{where}['shape']: expected a list of non-negative ints, got {shape!r}")
    if math.prod(int(d) for d in shape) > (1 << 63) - 1:
        raise ValueError(f"{where}['shape']: {list(shape)} has more than 2^63 - 1 elements")
    return tuple(int(d) for d in shape)


def _make_entry(name: str, spec: Mapping[str, Any], label: Optional[str] = None) -> _Entry:
    """``label``: how errors name the selection tensor (default ``spec[name][repr]``; ``from_model`` passes
    ``masks[name]``, the argument its caller gave)."""
    where = f"spec[{name!r}]"
    if not isinstance(name, str) or not name:
        raise ValueError(f"spec: parameter names must be non-empty strings, got {name!r}")
    if not isinstance(spec, Mapping):
        raise TypeError(f"{where}: expected a dict with 'shape' and 'repr', got {type(spec).__name__}")
    if "shape" not in spec:
        raise ValueError(f"{where}: missing 'shape'")
    shape = _check_shape(where, spec["shape"])
    numel = _numel(shape)
    if "repr" not in spec and any(key in spec for key in REPRS if key != "all"):
        raise ValueError(f"{where}: holds a {[key for key in REPRS if key in spec][0]!r} selection but no 'repr' "
                         "(without one the entry would select every element); add e.g. 'repr': 'mask'")
    r = spec.get("repr", "all")
    if r not in REPRS:
        raise ValueError(f"{where}['repr']: expected one of {REPRS}, got {r!r}")
    if r == "all":
        return _Entry(name, shape, numel, r, None, numel, True)
    if r not in spec:
        raise ValueError(f"{where}: repr {r!r} needs a {r!r} tensor")
    t = spec[r]
    lab = label or f"{where}[{r!r}]"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{lab}: expected a tensor, got {type(t).__name__}")
    not_meta(t, lab)
    t = t.detach()
    if r == "mask":
        if t.dtype != torch.bool:
            raise TypeError(f"{lab}: expected dtype torch.bool, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{lab}: shape {tuple(t.shape)} differs from the parameter shape {shape}")
        t = _own_cpu_copy(t, t)
        pos = ops.mask_to_indices(t, _index_dtype(numel))  # counts, and is the gather plan
        return _Entry(name, shape, numel, r, t, int(pos.numel()), True, pos)
    if r == "bitmask":
        nbytes = (numel + 7) // 8
        if t.dtype != torch.uint8:
            raise TypeError(f"{lab}: expected dtype torch.uint8, got {t.dtype}")
        if t.dim() != 1 or t.numel() != nbytes:
            raise ValueError(f"{lab}: expected shape ({nbytes},) for {numel} elements, "
                             f"got {tuple(t.shape)}")
        t = _own_cpu_copy(t, t)
        if numel % 8 and int(t[-1]) >> (numel % 8):
            raise ValueError(f"{lab}: bits are set beyond the {numel} elements")
        pos = ops.bitmask_to_indices(t, numel, _index_dtype(numel))
        return _Entry(name, shape, numel, r, t, int(pos.numel()), True, pos)
    # indices
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{lab}: expected an integer tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{lab}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    t = t.to("cpu")
    if t.dtype in _WIDE_UNSIGNED:  # torch has no min / max for them: compared as int64 (uint64 past 2^63-1: refused)
        if t.dtype == torch.uint64:
            t = t.view(torch.int64)
            if t.numel() and int(t.min()) < 0:
                raise ValueError(f"{lab}: positions must lie in [0, {numel}), got one >= 2^63")
        else:
            t = t.to(torch.int64)
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= numel:
            raise ValueError(f"{lab}: positions must lie in [0, {numel}), got range [{lo}, {hi}]")
    t = _own_cpu_copy(t.to(_index_dtype(numel)), spec[r])
    ascending = bool((t[1:] > t[:-1]).all()) if t.numel() > 1 else True
    if not ascending and t.numel() > 1:
        s = torch.sort(t).values
        dup = (s[1:] == s[:-1]).nonzero()
        if dup.numel():
            raise ValueError(f"{lab}: position {int(s[int(dup[0])])} is selected more than once")
    return _Entry(name, shape, numel, r, t, int(t.numel()), ascending)


def _own_cpu_copy(t: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, contiguous, sharing no memory with the caller's ``user`` tensor: a selection is validated
    (and its count, position plan and hash cached) once, so a later in-place edit of the caller's mask / index
    tensor must not reach the map (it made gather, hash, to_spec and save disagree, and skipped validation)."""
    c = t.to("cpu").contiguous()
    if user.device.type == "cpu" and (c.numel() == 0
                                      or c.untyped_storage().data_ptr() == user.untyped_storage().data_ptr()):
        c = c.clone()
    return c


def _float_at_least(imp: torch.Tensor, threshold: Union[int, float]) -> torch.Tensor:
    """``imp >= threshold`` for a floating tensor, exact: torch's ``imp >= float(threshold)`` rounds the threshold to
    imp's dtype first, so a float16 0.0999755859375 passed a 0.1 threshold (a bfloat16 0.69921875 a 0.7 one)."""
    try:
        t = float(threshold)
    except OverflowError:  # an int past the float range
        t = math.inf if threshold > 0 else -math.inf
    c = torch.tensor(t, dtype=torch.float64).to(imp.dtype)  # a neighbour of threshold in imp's dtype
    # no value of imp's dtype lies strictly between c and threshold: below it, "> c" is ">= threshold"
    return imp > c if float(c) < threshold else imp >= c


def _int_at_least(imp: torch.Tensor, threshold: Union[int, float]) -> torch.Tensor:
    """``imp >= threshold`` for an integer tensor, exact for an int or float threshold (torch would compare in
    float32 past 2**24, or refuse an int outside imp's dtype)."""
    if isinstance(threshold, float):
        if math.isinf(threshold):
            return torch.full(imp.shape, threshold < 0, dtype=torch.bool)
        threshold = math.ceil(threshold)  # an integer is >= t exactly when it is >= ceil(t)
    if imp.dtype in _WIDE_UNSIGNED:  # no comparison kernels for them: compared through int64 (exact)
        if imp.dtype != torch.uint64:
            return _int_at_least(imp.to(torch.int64), threshold)
        if threshold <= 0:
            return torch.ones(imp.shape, dtype=torch.bool)
        if threshold >= 2**64:
            return torch.zeros(imp.shape, dtype=torch.bool)
        v = imp.view(torch.int64)  # a value u >= 2^63 reads as u - 2^64 < 0
        return (v < 0) | (v >= threshold) if threshold < 2**63 else (v < 0) & (v >= threshold - 2**64)
    info = torch.iinfo(imp.dtype)
    if threshold > info.max:
        return torch.zeros(imp.shape, dtype=torch.bool)
    if threshold <= info.min:
        return torch.ones(imp.shape, dtype=torch.bool)
    return imp >= int(threshold)


class ParamMap:
    """An ordered selection of parameter entries forming one flat input space.

    Build it from a GRADIEND-style spec dict (insertion order = input-space order)::

        pm = ParamMap({"fc.weight": {"shape": (4, 8), "repr": "mask", "mask": m},
                       "fc.bias": {"shape": (4,), "repr": "all"}})

    or from a model with :meth:`from_model`. Every tensor in the spec is validated
    once here (shapes, dtypes, index range, duplicates); the hot paths never re-check.
    """

    def __init__(self, spec: Mapping[str, Mapping[str, Any]]):
        if not isinstance(spec, Mapping):
            raise TypeError(f"spec: expected a dict of name -> entry spec, got {type(spec).__name__}")
        self._entries: List[_Entry] = [_make_entry(n, s) for n, s in spec.items()]
        self._finish()

    @classmethod
    def _from_entries(cls, entries: List[_Entry]) -> "ParamMap":
        pm = cls.__new__(cls)
        pm._entries = entries
        pm._finish()
        return pm

    def _finish(self) -> None:
        self._by_name = {e.name: i for i, e in enumerate(self._entries)}
        counts = torch.tensor([e.count for e in self._entries], dtype=torch.int64)
        self._ends = torch.cumsum(counts, 0)
        self._plans: Dict[torch.device, List[Optional[torch.Tensor]]] = {}
        self._hash: Optional[str] = None

    def __getstate__(self) -> Dict[str, Any]:
        # (session 41) the per-device position plans are caches, rebuilt on first use: a copy or pickle (a DataLoader
        # worker, torch.multiprocessing) of a map used on a GPU carried its CUDA plans, which do not load where CUDA
        # is absent and go to the receiving process by CUDA IPC
        return {**self.__dict__, "_plans": {}}

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_model(cls, model: torch.nn.Module, names: Union[None, str, Iterable[str]] = None,
                   masks: Optional[Mapping[str, torch.Tensor]] = None, *, bitmask: bool = False) -> "ParamMap":
        """Select parameters of ``model`` by exact name or glob pattern (``"*.attn.*"``).

        names: None = every parameter; otherwise names/patterns, each of which must
        match at least one parameter. Selected parameters keep the model's order.
        masks: optional {name: bool mask (parameter shape) | 1-D integer flat indices};
        a listed parameter gets that selection, the others "all". ``bitmask=True``
        stores bool masks packed (1 bit per element).
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        bitmask = flag(bitmask, "bitmask")  # session 42: bitmask="no" was taken as True
        params = dict(_named_parameters(model))
        if names is None:
            chosen = list(params)
        else:
            try:
                pats = [names] if isinstance(names, str) else list(names)
            except TypeError:  # session 42: names=3 raised "'int' object is not iterable", naming nothing
                raise TypeError(f"names: expected None, a name / glob pattern or a list of them, got "
                                f"{type(names).__name__}") from None
            hit = set()
            for p in pats:
                if not isinstance(p, str):
                    raise TypeError(f"names: expected strings, got {type(p).__name__}")
                m = [n for n in params if n == p or fnmatch.fnmatchcase(n, p)]
                if not m:
                    raise ValueError(f"names: {p!r} matches no parameter of the model "
                                     f"(e.g. {list(params)[:5]})")
                hit.update(m)
            chosen = [n for n in params if n in hit]
        try:
            masks = dict(masks or {})
        except (TypeError, ValueError):  # session 42: masks=3 raised "'int' object is not iterable", naming nothing
            raise TypeError(f"masks: expected None or a dict name -> mask, got {type(masks).__name__}") from None
        for n in masks:
            if n not in params:
                raise ValueError(f"masks: unknown parameter name {n!r}")
            if n not in chosen:
                raise ValueError(f"masks: {n!r} is not among the selected names")
        spec: Dict[str, Dict[str, Any]] = {}
        for n in chosen:
            shape = tuple(params[n].shape)
            if n not in masks:
                spec[n] = {"shape": shape, "repr": "all"}
                continue
            m = masks[n]
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"masks[{n!r}]: expected a tensor, got {type(m).__name__}")
            not_meta(m, f"masks[{n!r}]")
            if m.dtype == torch.bool:
                if tuple(m.shape) != shape:
                    raise ValueError(f"masks[{n!r}]: shape {tuple(m.shape)} differs from the parameter shape {shape}")
                spec[n] = ({"shape": shape, "repr": "bitmask", "bitmask": ops.pack_bitmask(m.detach().cpu())}
                           if bitmask else {"shape": shape, "repr": "mask", "mask": m})
            else:
                if m.dtype == torch.uint8:
                    # GRADIEND stores masks as U8: read as flat indices, a 0/1 mask [0, 1] of a 2-element bias
                    # silently selected both elements
                    raise TypeError(f"masks[{n!r}]: a uint8 tensor is ambiguous (a 0/1 mask as GRADIEND stores it, "
                                    "or flat indices): pass mask.bool() for a mask or an int32/int64 tensor of flat "
                                    "indices")
                if m.dtype.is_floating_point or m.dtype.is_complex:
                    raise TypeError(f"masks[{n!r}]: expected a bool mask or an integer tensor of flat indices, "
                                    f"got {m.dtype}")
                spec[n] = {"shape": shape, "repr": "indices", "indices": m}
        # errors about a mask's tensor name masks[n], the argument the caller gave (session 43: an index tensor an
        # entry refused, 2-D, out of range or repeated, was named spec[n]['indices'])
        return cls._from_entries([_make_entry(n, e, f"masks[{n!r}]" if n in masks else None)
                                  for n, e in spec.items()])

    def to_spec(self, *, bitmask_as_mask: bool = False) -> Dict[str, Dict[str, Any]]:
        """The GRADIEND-style spec dict (bitmask entries unpacked to masks if asked). Its tensors are copies:
        editing them in place leaves this map as it is."""
        bitmask_as_mask = flag(bitmask_as_mask, "bitmask_as_mask")
        out: Dict[str, Dict[str, Any]] = {}
        for e in self._entries:
            d: Dict[str, Any] = {"shape": e.shape, "repr": e.repr}
            if e.repr == "bitmask" and bitmask_as_mask:
                d = {"shape": e.shape, "repr": "mask", "mask": self._dense_mask(e)}
            elif e.repr != "all":
                d[e.repr] = e.sel.clone()
            out[e.name] = d
        return out

    # ------------------------------------------------------------------ introspection

    @property
    def names(self) -> List[str]:
        return [e.name for e in self._entries]

    @property
    def input_dim(self) -> int:
        return int(self._ends[-1]) if self._entries else 0

    def __len__(self) -> int:
        return self.input_dim

    @property
    def counts(self) -> List[int]:
        return [e.count for e in self._entries]

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entries[self._index_of(name)].shape

    def repr_of(self, name: str) -> str:
        return self._entries[self._index_of(name)].repr

    def unpruned_length(self) -> int:
        return sum(e.numel for e in self._entries)

    def __repr__(self) -> str:
        kinds = {r: sum(e.repr == r for e in self._entries) for r in REPRS}
        return (f"ParamMap({len(self._entries)} entries, input_dim={self.input_dim}, "
                + ", ".join(f"{k}={v}" for k, v in kinds.items() if v) + ")")

    def _index_of(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"name: {name!r} is not in this map") from None

    def _dense_mask(self, e: _Entry) -> torch.Tensor:
        if e.repr == "mask":
            return e.sel
        m = torch.zeros(e.numel, dtype=torch.bool)
        if e.repr == "all":
            m.fill_(True)
        else:
            m[e.positions().long()] = True
        return m.reshape(e.shape)

    # ------------------------------------------------------------------ plans

    def _plan(self, device: torch.device) -> List[Optional[torch.Tensor]]:
        """Per-entry int position tensors on ``device`` (None for "all"), built once and cached."""
        device = torch.device(device)
        plan = self._plans.get(device)
        if plan is None:
            cpu = self._plans.get(torch.device("cpu"))
            if cpu is None:
                cpu = [e.positions() for e in self._entries]
                self._plans[torch.device("cpu")] = cpu
            plan = cpu if device.type == "cpu" else [None if p is None else p.to(device) for p in cpu]
            self._plans[device] = plan
        return plan

    # ------------------------------------------------------------------ gather / scatter

    def _sources(self, source) -> Tuple[List[int], List[torch.Tensor], str]:
        """(entry ids with a non-empty selection, their full-shape tensors, how an entry's tensor is named in
        errors: a format string taking the entry's name), validated."""
        active = [i for i, e in enumerate(self._entries) if e.count > 0]
        tensors: List[torch.Tensor] = []
        if isinstance(source, torch.nn.Module):
            params = dict(_named_parameters(source))
            unknown = [self._entries[i].name for i in active if self._entries[i].name not in params]
            if unknown:
                raise ValueError(f"source: the model has no parameter(s) {unknown}")
            missing = [self._entries[i].name for i in active if params[self._entries[i].name].grad is None]
            if missing:
                raise ValueError(f"source: .grad is None for selected parameter(s) {missing} "
                                 "(no backward yet, requires_grad=False, or zeroed with set_to_none)")
            tensors = [params[self._entries[i].name].grad for i in active]
            where = "source[{!r}].grad"
        elif isinstance(source, Mapping):
            missing = [self._entries[i].name for i in active if self._entries[i].name not in source]
            if missing:
                raise ValueError(f"source: missing tensor(s) for {missing}")
            tensors = [source[self._entries[i].name] for i in active]
            where = "source[{!r}]"
        else:
            raise TypeError(f"source: expected a torch.nn.Module or a dict of tensors, got {type(source).__name__}")
        for i, t in zip(active, tensors):
            e = self._entries[i]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where.format(e.name)}: expected a tensor, got {type(t).__name__}")
            if tuple(t.shape) != e.shape:
                raise ValueError(f"{where.format(e.name)}: shape {tuple(t.shape)} differs from the map's {e.shape}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{where.format(e.name)}: expected float32/float64/float16/bfloat16, got {t.dtype}")
            if t.layout != torch.strided:
                raise TypeError(f"{where.format(e.name)}: expected a dense tensor, got layout {t.layout} "
                                "(e.g. a sparse Embedding gradient: call .to_dense() first)")
        if tensors:
            dev = tensors[0].device
            for i, t in zip(active, tensors):
                if t.device != dev:
                    raise ValueError(f"{where.format(self._entries[i].name)}: on {t.device}, "
                                     f"but other sources are on {dev}")
        return active, tensors, where

    def _all_given(self, source) -> List[Optional[torch.Tensor]]:
        if isinstance(source, torch.nn.Module):
            params = dict(_named_parameters(source))
            return [params[e.name].grad if e.name in params else None for e in self._entries]
        return [source.get(e.name) for e in self._entries]

    def gather(self, source, out: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
               accumulate: bool = False) -> torch.Tensor:
        """Flat vector (input_dim,) of the selected entries, in map order.

        source: a model (its parameters' ``.grad``) or a dict {name: full-shape tensor}.
        out: optional preallocated (input_dim,) tensor, filled without allocating;
        ``accumulate=True`` adds into it (running sums over batches). The values are rounded to
        ``out``'s dtype before the add (on every backend), so a float16 / bfloat16 ``out`` fed wider
        sources is rounded twice, unlike ``out.add_(values)``: keep running sums in float32 / float64.
        dtype: result dtype (default: the sources' promoted dtype).
        """
        active, tensors, where = self._sources(source)
        if dtype is not None and dtype not in _FLOAT_DTYPES:  # also when nothing is selected (no kernel checks it)
            raise TypeError(f"dtype: expected float32/float64/float16/bfloat16, got {dtype!r}")
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out: expected a tensor, got {type(out).__name__}")
            if out.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"out: expected float32/float64/float16/bfloat16, got {out.dtype}")
            if out.dim() != 1 or out.numel() != self.input_dim:
                raise ValueError(f"out: expected shape ({self.input_dim},), got {tuple(out.shape)}")
            if dtype is not None and out.dtype != dtype:
                raise TypeError(f"out: dtype {out.dtype} differs from dtype={dtype}")
            if tensors and out.device != tensors[0].device:
                raise ValueError(f"out: on {out.device} but the gradients are on {tensors[0].device}")
            # named by entry, before the op's own check would name them src[i]
            ops._check_read_no_grad([(where.format(self._entries[i].name), t) for i, t in zip(active, tensors)],
                                    "out", "gather without `out`")
        elif accumulate:
            raise ValueError("accumulate: needs an `out` tensor to add into")
        if not tensors:
            if out is not None:
                return out
            # nothing selected: dtype/device still follow whatever sources were given
            given = [t for t in self._all_given(source) if isinstance(t, torch.Tensor)]
            if dtype is None and given:
                dtype = given[0].dtype
                for t in given[1:]:
                    dtype = torch.promote_types(dtype, t.dtype)
            return torch.empty(0, dtype=dtype or torch.float32, device=given[0].device if given else "cpu")
        if out is not None:
            # an `out` sharing memory with a source would be read after being written: snapshot those sources
            tensors = [t.clone() if _shares_storage(t, out) else t for t in tensors]
        plan = self._plan(tensors[0].device)
        return ops.gather_segments(tensors, [plan[i] for i in active], dtype=dtype, out=out, accumulate=accumulate)

    def scatter(self, flat: torch.Tensor, out=None, mode: str = "write", scale: float = 1.0,
                target: str = "grad"):
        """Put a flat (input_dim,) vector back into parameter-shaped tensors.

        out=None: returns {name: tensor of the parameter's shape}, zeros where unselected.
        out=dict of tensors, or a model (its ``.grad`` with target="grad", its
        parameters with target="param"): written in place; mode="write" overwrites the
        selected entries, mode="add" adds ``scale * flat`` into them (allocates nothing
        when every ``.grad`` exists; a missing ``.grad`` is created as zeros).
        Everything is validated before the first element is written.
        """
        if mode not in ("write", "add"):
            raise ValueError(f"mode: expected 'write' or 'add', got {mode!r}")
        if target not in ("grad", "param"):
            raise ValueError(f"target: expected 'grad' or 'param', got {target!r}")
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f"flat: expected a tensor, got {type(flat).__name__}")
        if flat.dim() != 1 or flat.numel() != self.input_dim:
            raise ValueError(f"flat: expected shape ({self.input_dim},), got {tuple(flat.shape)}")
        if flat.dtype not in _FLOAT_DTYPES:  # before any .grad is created below (float8 passed is_floating_point)
            raise TypeError(f"flat: expected float32/float64/float16/bfloat16, got {flat.dtype}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not _finite(scale):
            raise ValueError(f"scale: expected a finite number, got {scale!r}")
        plan = self._plan(flat.device)
        if out is None:
            full = ops.scatter_segments(flat, plan, [e.numel for e in self._entries], scale=scale)
            return {e.name: t.view(e.shape) for e, t in zip(self._entries, full)}
        active = [i for i, e in enumerate(self._entries) if e.count > 0]
        if isinstance(out, torch.nn.Module):
            params = dict(_named_parameters(out))
            unknown = [self._entries[i].name for i in active if self._entries[i].name not in params]
            if unknown:
                raise ValueError(f"out: the model has no parameter(s) {unknown}")
            for i in active:
                p = params[self._entries[i].name]
                if tuple(p.shape) != self._entries[i].shape:
                    raise ValueError(f"out[{self._entries[i].name!r}]: shape {tuple(p.shape)} differs from "
                                     f"the map's {self._entries[i].shape}")
                if p.device != flat.device:
                    raise ValueError(f"out[{self._entries[i].name!r}]: on {p.device} but flat is on {flat.device}")
                if p.dtype not in _FLOAT_DTYPES:  # checked before any .grad is created below
                    raise TypeError(f"out[{self._entries[i].name!r}]: expected float32/float64/float16/bfloat16, "
                                    f"got {p.dtype}")
            for i in active:  # every existing destination, before the first .grad is created below
                name = self._entries[i].name
                d = params[name].grad if target == "grad" else params[name]
                what = f"out[{name!r}].grad" if target == "grad" else f"out[{name!r}]"
                if d is None:
                    continue
                if d.layout != torch.strided:
                    raise TypeError(f"{what}: expected a dense tensor, got layout {d.layout} (sparse)")
                if _internal_overlap(d):
                    raise ValueError(f"{what}: several elements share one memory location (an expanded tensor); "
                                     "clone() it first")
                # refused by the op too, but only after the missing .grads below were created as zeros
                ops._check_not_inference([d], what)
            if target == "grad":
                for i in active:  # only after every check passed
                    p = params[self._entries[i].name]
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                dst = [params[self._entries[i].name].grad for i in active]
            else:
                # detach(), not .data: it shares the parameter's version counter, so a pending backward that saved
                # the parameter raises (as after torch's own no_grad p.add_) instead of using the new values
                dst = [params[self._entries[i].name].detach() for i in active]
        elif isinstance(out, Mapping):
            missing = [self._entries[i].name for i in active if self._entries[i].name not in out]
            if missing:
                raise ValueError(f"out: missing tensor(s) for {missing}")
            dst = [out[self._entries[i].name] for i in active]
            for i, t in zip(active, dst):
                e = self._entries[i]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != e.shape:
                    raise ValueError(f"out[{e.name!r}]: expected a tensor of shape {e.shape}, got "
                                     f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
                if t.device != flat.device:
                    raise ValueError(f"out[{e.name!r}]: on {t.device} but flat is on {flat.device}")
                if t.dtype not in _FLOAT_DTYPES:
                    raise TypeError(f"out[{e.name!r}]: expected float32/float64/float16/bfloat16, got {t.dtype}")
                if t.layout != torch.strided:
                    raise TypeError(f"out[{e.name!r}]: expected a dense tensor, got layout {t.layout}")
                if _internal_overlap(t):
                    raise ValueError(f"out[{e.name!r}]: several elements share one memory location (an expanded "
                                     "tensor); clone() it first")
        else:
            raise TypeError(f"out: expected None, a dict of tensors or a torch.nn.Module, got {type(out).__name__}")
        if any(_shares_storage(flat, d) for d in dst):  # flat would be overwritten while still being read
            flat = flat.clone()
        with torch.no_grad():
            if _storage_ptrs_repeat(dst):
                # destinations sharing memory (tied weights in a dict): the kernel's work items run in
                # parallel, so apply the entries one after another, as torch would
                start = 0
                for i, d in zip(active, dst):
                    c = self._entries[i].count
                    ops.scatter_segments_(flat[start:start + c], [plan[i]], [d], scale=scale,
                                          accumulate=(mode == "add"))
                    start += c
            else:
                ops.scatter_segments_(flat, [plan[i] for i in active], dst, scale=scale, accumulate=(mode == "add"))
        return out

    # ------------------------------------------------------------------ prune

    def prune(self, mask: Optional[torch.Tensor] = None, threshold: Optional[float] = None,
              topk: Union[int, float, None] = None, importance: Optional[torch.Tensor] = None
              ) -> Tuple["ParamMap", torch.Tensor]:
        """Shrink the input space; returns ``(new_map, kept)``.

        Applied in GRADIEND's order: ``mask`` (bool, (input_dim,)), then
        ``threshold`` (keep importance >= threshold), then ``topk`` among the
        survivors (float in (0, 1]: that fraction, rounded up; int: that many, capped
        at the survivors; ``topk=1.0`` keeps every survivor). Equal importances at
        the cut are kept lowest input position first, so the result is
        deterministic. ``kept`` holds the ascending int64 positions (in this map's
        input space) that remain, so callers can slice their own weights with it.

        ``importance`` (needed with threshold / topk) may be floating or integer: integers
        are compared with the threshold exactly (an int or a float one: ``importance >=
        ceil(threshold)``, where torch's own ``>=`` would round both to float32 past 2**24)
        and ranked exactly by topk; floating ones are compared with the threshold exactly too
        (torch's ``>=`` would first round the threshold to their dtype: a float16 0.09998
        passed ``threshold=0.1``); bool / complex importances are a TypeError, NaN at a
        position the mask leaves a ValueError.
        """
        n = self.input_dim
        if mask is None and threshold is None and topk is None:
            raise ValueError("prune: give at least one of mask, threshold, topk")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
                raise ValueError(f"mask: expected a bool tensor of shape ({n},)")
            not_meta(mask, "mask")
        if threshold is not None or topk is not None:
            if importance is None:
                raise ValueError("importance: required with threshold or topk (a (input_dim,) score tensor)")
            if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (n,):
                raise ValueError(f"importance: expected a tensor of shape ({n},), got "
                                 f"{tuple(importance.shape) if isinstance(importance, torch.Tensor) else importance!r}")
            if importance.dtype == torch.bool or importance.dtype.is_complex:
                raise TypeError(f"importance: expected a floating or integer dtype, got {importance.dtype}")
            not_meta(importance, "importance")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or (isinstance(threshold, float) and math.isnan(threshold))):
            raise ValueError(f"threshold: expected a number, got {threshold!r}")
        if topk is not None:
            if isinstance(topk, bool) or not isinstance(topk, (int, float)):
                raise TypeError(f"topk: expected an int or a float, got {type(topk).__name__}")
            if isinstance(topk, float) and not (0.0 < topk <= 1.0):
                raise ValueError(f"topk: a float must lie in (0, 1], got {topk}")
            if isinstance(topk, int) and topk < 1:
                raise ValueError(f"topk: an int must be >= 1, got {topk}")
        imp = None if importance is None else importance.detach().to("cpu").contiguous()
        active = None if mask is None else mask.detach().to("cpu")
        if imp is not None and not imp.dtype.is_floating_point and (threshold is not None or topk is not None):
            # integer importances (GRADIEND takes them): the threshold compared exactly (_int_at_least; the compat
            # layer keeps GRADIEND's float32 compare), folded into the mask; topk then ranks the values' dense
            # ranks (float64 of a rank is exact for any int64 value)
            if threshold is not None:
                t = _int_at_least(imp, threshold)
                active = t if active is None else (active & t)
                threshold = None
            imp = torch.unique(imp, sorted=True, return_inverse=True)[1].to(torch.float64)
        if imp is not None and (threshold is not None or topk is not None):
            # NaN where the mask leaves a position is an error whichever criteria follow (the threshold
            # would otherwise drop it silently, since NaN >= t is False); importance is unused otherwise
            nan = torch.isnan(imp) if active is None else (torch.isnan(imp) & active)
            if bool(nan.any()):
                raise ValueError(f"importance: contains NaN (first at input position {int(nan.nonzero()[0])})")

        if threshold is not None:
            t = _float_at_least(imp, threshold)
            active = t if active is None else (active & t)
        n_active = n if active is None else int(active.sum())
        kept: torch.Tensor
        if topk is not None and not (isinstance(topk, float) and topk == 1.0):
            if n_active == 0:
                raise ValueError("prune: no input dimension is left after mask/threshold")
            k = math.ceil(topk * n_active) if isinstance(topk, float) else min(int(topk), n_active)
            try:
                kept = ops.topk_select(imp, k, active)
            except ValueError as exc:
                raise ValueError(f"importance: {exc}") from None
        elif active is None:
            kept = torch.arange(n, dtype=torch.int64)
        else:
            kept = ops.mask_to_indices(active, torch.int64)
        if kept.numel() == 0:
            raise ValueError("prune: the criteria remove every input dimension")
        return self._select_positions(kept), kept

    def _select_positions(self, kept: torch.Tensor) -> "ParamMap":
        """New map keeping input positions ``kept`` (ascending int64)."""
        bounds = torch.searchsorted(kept, torch.cat([torch.zeros(1, dtype=torch.int64), self._ends]))
        plan = self._plan(torch.device("cpu"))
        entries = []
        start = 0
        for i, e in enumerate(self._entries):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            local = kept[lo:hi] - start
            start += e.count
            if local.numel() == e.count:  # nothing removed from this entry
                entries.append(e)
                continue
            pos = local if plan[i] is None else plan[i][local]
            entries.append(_entry_from_positions(e, pos.to(_index_dtype(e.numel))))
        return ParamMap._from_entries(entries)

    # ------------------------------------------------------------------ decode

    def base_global_index(self, positions):
        """Decode input-space positions to (parameter name, flat index in that parameter).

        int -> (name, flat); a sequence of ints -> list of (name, flat);
        a tensor -> (entry ids, flat indices) as int64 tensors (names via ``self.names``).
        Uses only the per-entry position plans; never builds an input_dim-long map.
        """
        scalar = not isinstance(positions, (torch.Tensor, list, tuple)) and _as_int(positions) is not None
        if scalar or isinstance(positions, (list, tuple)):
            items = [positions] if scalar else list(positions)
            ints = [_as_int(p) for p in items]
            bad = [p for p, q in zip(items, ints) if q is None]
            if bad:  # torch.as_tensor(..., dtype=int64) truncated 3.7 to 3 and read True as 1: a wrong entry
                raise TypeError(f"positions: expected integers, got {bad[0]!r} ({type(bad[0]).__name__})")
            pos = torch.tensor(ints, dtype=torch.int64) if ints else torch.empty(0, dtype=torch.int64)
        elif isinstance(positions, torch.Tensor):
            if positions.dtype.is_floating_point or positions.dtype == torch.bool or positions.dtype.is_complex:
                raise TypeError(f"positions: expected integers, got {positions.dtype}")
            not_meta(positions, "positions")
            pos = positions.detach().to("cpu", torch.int64).reshape(-1)
        else:
            raise TypeError(f"positions: expected an int, a sequence of ints or a tensor, got {type(positions).__name__}")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.input_dim):
            raise ValueError(f"positions: must lie in [0, {self.input_dim})")
        seg = torch.searchsorted(self._ends, pos, right=True)
        starts = self._ends - torch.tensor([e.count for e in self._entries], dtype=torch.int64)
        local = pos - starts[seg] if pos.numel() else pos
        flat = local.clone()
        plan = self._plan(torch.device("cpu"))
        for s in torch.unique(seg).tolist():
            if plan[s] is not None:
                sel = seg == s
                flat[sel] = plan[s][local[sel]].long()
        if isinstance(positions, torch.Tensor):
            return seg, flat
        out = [(self._entries[s].name, f) for s, f in zip(seg.tolist(), flat.tolist())]
        return out[0] if scalar else out

    def base_global_index_map(self) -> torch.Tensor:
        """GRADIEND's full map: for every input position, its index in the concatenation
        of all mapped parameters (int64, input_dim long). Only on request: 8 bytes per entry."""
        parts, base = [], 0
        for e, p in zip(self._entries, self._plan(torch.device("cpu"))):
            parts.append((torch.arange(e.numel, dtype=torch.int64) if p is None else p.long()) + base)
            base += e.numel
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    # ------------------------------------------------------------------ hash

    @property
    def hash(self) -> str:
        """Hex digest that depends only on names, shapes and the selected positions in
        order — not on the representation (mask, bitmask, indices and "all" hash alike,
        before and after save/load)."""
        if self._hash is None:
            h = hashlib.sha256(b"gradkit-parammap-v1")
            plan = self._plan(torch.device("cpu"))
            for e, p in zip(self._entries, plan):
                h.update(json.dumps([e.name, list(e.shape)]).encode())
                if e.count == e.numel and e.ascending:
                    h.update(b"A")  # every element, in order (however it is represented)
                else:
                    h.update(b"P%d:" % e.count)
                    h.update(memoryview(p.to(_index_dtype(e.numel)).contiguous().numpy()))
            self._hash = h.hexdigest()
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, ParamMap) and self.hash == other.hash

    __hash__ = None  # __eq__ compares selections; use .hash (a str) as a dict key

    # ------------------------------------------------------------------ save / load

    def save(self, directory: str, *, _hook=None) -> None:
        """Write the map in GRADIEND's on-disk mapping format, atomically.

        ``config.json`` gets a "mapping" section (other keys of an existing
        config.json, e.g. a GRADIEND model's architecture, are kept);
        ``mapping_indices.safetensors`` (I32, I64 past 2^31-1) and
        ``mapping_masks.safetensors`` (U8, parameter-shaped) hold the selections.
        An ascending selection (mask, bitmask, sorted indices) is written as whichever of
        index list and U8 mask is smaller (GRADIEND's rule, 0.8 margin); an unsorted index
        list is always written as given (a mask would reorder the input space). Every
        entry hashes the same after load. A crash mid-save leaves the previous files
        intact where the file system can exchange directories; elsewhere the files are moved
        in one by one and a torn save is caught on load by the checksums (see gradkit._io).
        """
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
        # through symlinks: the swap must happen at the real directory (swapping the link itself
        # replaced it with a plain directory and left the linked-to files untouched)
        directory = os.path.realpath(os.fspath(directory))
        cfg_path = os.path.join(directory, CONFIG)
        cfg: Dict[str, Any] = {}
        if os.path.isfile(cfg_path):
            # read as load() reads it (the open file checked regular, at most 64 MiB): a FIFO swapped in after the
            # isfile check is refused rather than waited on
            try:
                cfg = parse_json(read_regular(cfg_path, 1 << 26, "directory"), cfg_path, "directory")
            except ValueError as exc:
                raise ValueError(f"{exc}; refusing to overwrite it") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"directory: existing {cfg_path} does not hold a JSON object")
        entries, idx_t, mask_t = [], {}, {}
        for i, e in enumerate(self._entries):
            ent: Dict[str, Any] = {"name": e.name, "shape": list(e.shape)}
            if e.count == e.numel and e.ascending:
                ent.update(repr="all", num_selected=e.numel)
            elif not e.ascending or e.count * (4 if e.numel <= _INT32_MAX else 8) < 0.8 * e.numel:
                # an index list when smaller (GRADIEND's 0.8 margin) or when the order is not ascending
                ent.update(repr="indices", key=f"L{i}", num_selected=e.count)
                idx_t[ent["key"]] = e.positions().to(_index_dtype(e.numel)).contiguous()
            else:
                ent.update(repr="mask", key=f"L{i}", num_selected=e.count)
                mask_t[ent["key"]] = self._dense_mask(e).to(torch.uint8).contiguous()
            entries.append(ent)
        kinds = sorted({x["repr"] for x in entries})
        mode = kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "all")
        mapping: Dict[str, Any] = {"mode": mode, "param_map": entries}
        crcs: Dict[str, int] = {}
        writers = {}
        for fname, field, group in ((INDICES_FILE, "indices_file", idx_t), (MASKS_FILE, "masks_file", mask_t)):
            if group:
                mapping[field] = fname
                writers[fname] = (lambda path, g=group, fn=fname: crcs.__setitem__(fn, write_safetensors(path, g)))

        def write_config(path: str) -> None:  # runs after the tensor files: their crc32s are known
            mapping["gradkit"] = {"format": 1, "hash": self.hash, "entries_sha256": _entries_digest(entries),
                                  "crc32": {k: f"{v:08x}" for k, v in crcs.items()}}
            cfg["mapping"] = mapping
            with open(path, "w") as f:
                json.dump(cfg, f, indent=2)

        writers[CONFIG] = write_config
        # Stale mapping files (and GRADIEND's cached index map) no longer referenced are dropped.
        stale = tuple(n for n in (INDICES_FILE, MASKS_FILE, "input_index_map.safetensors") if n not in writers)
        write_dir_atomic(directory, writers, remove=stale, _hook=_hook, what="directory")

    @classmethod
    def load(cls, directory: str) -> "ParamMap":
        """Read a map written by :meth:`save` or by GRADIEND's ``save_pretrained``.

        Only JSON and safetensors are read (never pickle). Every field is validated;
        a truncated or edited file raises ValueError naming it, and nothing is returned.
        """
        from safetensors.torch import load as st_load

        try:
            directory = os.fspath(directory)
        except TypeError:  # session 42: os.fspath's own TypeError named no argument
            raise TypeError(f"directory: expected a path, got {type(directory).__name__}") from None
        if not os.path.isdir(directory):
            raise ValueError(f"directory: {directory!r} is not a directory")
        cfg_path = os.path.join(directory, CONFIG)
        if not os.path.lexists(cfg_path):
            raise ValueError(f"directory: no {CONFIG} in {directory!r}")
        # a regular file (a FIFO would block, a link to /dev/zero never end) of at most 64 MiB, valid UTF-8 JSON
        cfg = parse_json(read_regular(cfg_path, 1 << 26, "directory"), cfg_path, "directory")
        mapping = cfg.get("mapping") if isinstance(cfg, dict) else None
        if not isinstance(mapping, dict) or not isinstance(mapping.get("param_map"), list):
            raise ValueError(f"{cfg_path}: no 'mapping' section with a 'param_map' list")
        sums = (mapping.get("gradkit") or {}).get("crc32", {}) if isinstance(mapping.get("gradkit"), dict) else {}
        tensors: Dict[str, Dict[str, torch.Tensor]] = {}
        tensors_files = set()
        for field in ("indices_file", "masks_file"):
            fn = mapping.get(field)
            if fn is None:
                continue
            if not isinstance(fn, str) or os.path.basename(fn) != fn:
                raise ValueError(f"{cfg_path}: mapping.{field} must be a plain file name, got {fn!r}")
            if not fn.endswith(".safetensors"):
                raise ValueError(f"{cfg_path}: mapping.{field}={fn!r} is not safetensors; gradkit never unpickles "
                                 "files (re-save the map with safetensors)")
            path = os.path.join(directory, fn)
            if os.path.dirname(os.path.realpath(path)) != os.path.realpath(directory):
                raise ValueError(f"{path}: links outside {directory!r} (mapping.{field} must be a file of the map's "
                                 "own directory)")
            data = read_regular(path, NO_LIMIT, path)  # not a FIFO / device (checked on the open file)
            if fn in sums and f"{zlib.crc32(data):08x}" != sums[fn]:
                raise ValueError(f"{path}: contents do not match the checksum in {CONFIG} (truncated or edited)")
            tensors_files.add(fn)
            try:
                tensors[field] = st_load(data)
            except Exception as exc:  # safetensors raises its own error types
                raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
        entries: List[_Entry] = []
        seen = set()
        for j, ent in enumerate(mapping["param_map"]):
            where = f"{cfg_path}: mapping.param_map[{j}]"
            if not isinstance(ent, dict) or not isinstance(ent.get("name"), str):
                raise ValueError(f"{where}: expected an object with a 'name'")
            name = ent["name"]
            if name in seen:
                raise ValueError(f"{where}: duplicate name {name!r}")
            seen.add(name)
            r = ent.get("repr")
            try:
                shape = _check_shape(where, ent.get("shape"))
            except ValueError as exc:
                raise ValueError(str(exc)) from None
            if r == "all":
                spec = {"shape": shape, "repr": "all"}
            elif r in ("indices", "mask"):
                field = "indices_file" if r == "indices" else "masks_file"
                key = ent.get("key")
                if not isinstance(key, str) or field not in tensors or key not in tensors[field]:
                    raise ValueError(f"{where}: {r} tensor {key!r} missing from mapping.{field}")
                t = tensors[field][key]
                if r == "mask":
                    if t.dtype not in (torch.uint8, torch.bool):
                        raise ValueError(f"{where}: mask {key!r} has dtype {t.dtype}, expected U8")
                    if t.numel() != _numel(shape):
                        raise ValueError(f"{where}: mask {key!r} has {t.numel()} elements, shape {shape} needs "
                                         f"{_numel(shape)}")
                    if t.dtype == torch.uint8 and t.numel() and int(t.max()) > 1:
                        raise ValueError(f"{where}: mask {key!r} holds values other than 0/1")
                    t = t.to(torch.bool).reshape(shape)
                spec = {"shape": shape, "repr": r, r: t}
            else:
                raise ValueError(f"{where}: unknown repr {r!r}")
            try:
                entry = _make_entry(name, spec)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{where}: {exc}") from None
            ns = ent.get("num_selected")
            if ns is not None and ns != entry.count:
                raise ValueError(f"{where}: num_selected={ns} but the stored selection has {entry.count}")
            entries.append(entry)
        pm = cls._from_entries(entries)
        gk = mapping.get("gradkit") if isinstance(mapping.get("gradkit"), dict) else {}
        want = gk.get("hash")
        if want is not None and not isinstance(want, str):
            raise ValueError(f"{cfg_path}: mapping.gradkit.hash is not a string")
        if want is not None and not (gk.get("entries_sha256") == _entries_digest(mapping["param_map"])
                                     and set(sums) == set(tensors_files)) and want != pm.hash:
            raise ValueError(f"{cfg_path}: the loaded map's hash differs from the one recorded at save (edited)")
        # the recorded hash is never adopted (session 34): anyone can recompute entries_sha256 and the crc32s, so an
        # edited file could make two different maps report one hash; pm.hash is computed from the selection itself
        return pm


def _entries_digest(entries: List[Dict[str, Any]]) -> str:
    """sha256 of the JSON entry list (names, shapes, reprs, keys, counts) in canonical form."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _entry_from_positions(e: _Entry, pos: torch.Tensor) -> _Entry:
    """Entry with the same name/shape selecting ``pos`` (in that order).

    Representation: "all" when every element in order; an ascending selection is
    stored as a mask / bitmask (keeping the entry's kind) when that is smaller than
    an index list (GRADIEND's 0.8 size margin), otherwise as indices.
    """
    k = int(pos.numel())
    ascending = bool((pos[1:] > pos[:-1]).all()) if k > 1 else True
    if k == e.numel and ascending:
        return _Entry(e.name, e.shape, e.numel, "all", None, k, True)
    bpi = 4 if e.numel <= _INT32_MAX else 8
    if ascending and k > 0 and not (k * bpi < e.numel * 0.8):
        m = torch.zeros(e.numel, dtype=torch.bool)
        m[pos.long()] = True
        if e.repr == "bitmask":
            return _Entry(e.name, e.shape, e.numel, "bitmask", ops.pack_bitmask(m), k, True)
        return _Entry(e.name, e.shape, e.numel, "mask", m.reshape(e.shape), k, True)
    return _Entry(e.name, e.shape, e.numel, "indices", pos.contiguous(), k, ascending)


def _as_int(x) -> Optional[int]:
    """``x`` as a Python int when it is an integer (int, numpy integer, ...; not a bool), else None."""
    if isinstance(x, (bool, torch.Tensor)) or type(x).__name__ == "bool_":
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _finite(x: Union[int, float]) -> bool:
    """math.isfinite, with an int past the float range (which math.isfinite refuses with OverflowError) infinite."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` view the same storage (conservatively: any overlap possible)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (e.g. meta)
        return False


def _storage_ptrs_repeat(ts: Sequence[torch.Tensor]) -> bool:
    """True when two of ``ts`` view the same storage."""
    seen = set()
    for t in ts:
        if t.numel() == 0:
            continue
        try:
            p = (t.device, t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            continue
        if p in seen:
            return True
        seen.add(p)
    return False


def _internal_overlap(t: torch.Tensor) -> bool:
    """True when some elements of ``t`` provably share memory (torch refuses in-place writes there)."""
    try:
        return int(torch._debug_has_internal_overlap(t)) == 1  # 0: no, 1: yes, 2: too hard to tell
    except (AttributeError, RuntimeError):
        return any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape))


def _named_parameters(model: torch.nn.Module):
    """named_parameters of the model inside DDP / DataParallel / torch.compile wrappers (their ``module.`` /
    ``_orig_mod.`` prefixes dropped); a model that merely has a child named ``module`` keeps all its names."""
    return unwrap_model(model).named_parameters()

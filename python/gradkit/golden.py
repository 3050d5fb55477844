"""Golden-parameter masks, packed-bitmask mask algebra, and mask-aware training helpers.

GoldenParams-compatible semantics on gradkit's kernels:

* :func:`golden_masks`: per sample, the top ``percent``% of each tensor by ``|g|`` (or of all
  selected tensors together, ``scope="global"``), intersected across samples as a running AND.
  One fused kernel per tensor and sample (exact select of the k-th largest ``|g|``, then select +
  AND into the packed bitmask + per-entry counts + popcount in one pass).
* Top-k% keeps ``k = max(1, ceil(numel * percent / 100))`` entries of a non-empty tensor, GoldenParams' count
  (:func:`percent_to_k`; session 39, floor before: one entry fewer than GoldenParams in most tensors). Ties at
  the threshold are taken lowest flat (row-major) position first, on every backend, so masks are deterministic; NaN gradients are never selected.
* :class:`Bitmask` / :class:`MaskSet`: masks stored packed (1 bit per entry, 8x smaller than
  bool, and unlike COO never larger than dense), with and / or / xor / andnot / not, count,
  density, memory, and conversions to and from dense bool, torch sparse COO, flat indices, the
  :class:`gradkit.ParamMap` and GoldenParams' saved ``.pt`` results (loaded with
  ``weights_only=True``; never unpickled).
* :class:`SparseGradientAccumulator`: gradients accumulated only at mask positions, compact.
* :class:`MaskedAdamW` (``gradkit.optim``, re-exported), :func:`reverse_golden_masks`, :func:`kl_divergence`,
  :func:`logprobs_for_fixed_ids`, :func:`layer_filter` (``gradkit.golden_reverse``) are
  re-exported here.
"""
from __future__ import annotations

import functools
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from gradkit import ops
from gradkit._io import open_regular
from gradkit._rules import as_written, ceil_count, flag, int_seq, widened
from gradkit.kernels.reference.parammap import unpack_bitmask
from gradkit.golden_reverse import (DEFAULT_LAYER_PATTERN, STRATEGIES, AdaptiveSinusoidal, ChaosDriven,  # noqa: F401
                                    ExplorationDecay, FluctuationStrategy, HarmonicOscillator, MomentumBased,
                                    ReverseGoldenResult, full_logprobs, kl_divergence, layer_filter,
                                    logprobs_for_fixed_ids, masked_kl, reverse_golden_masks, zeroed_params)
from gradkit.optim import MaskedAdamW  # noqa: F401

__all__ = ["percent_to_k", "topk_mask", "Bitmask", "MaskSet", "GoldenResult", "golden_masks",
           "SparseGradientAccumulator", "load_goldenparams",
           # gradkit.golden_reverse
           "reverse_golden_masks", "ReverseGoldenResult", "kl_divergence", "full_logprobs", "logprobs_for_fixed_ids",
           "layer_filter", "DEFAULT_LAYER_PATTERN", "zeroed_params", "masked_kl", "FluctuationStrategy",
           "AdaptiveSinusoidal", "MomentumBased", "ExplorationDecay", "HarmonicOscillator", "ChaosDriven", "STRATEGIES",
           "MaskedAdamW"]


def _check_percent(percent) -> float:
    # numbers.Real: numpy's float32 / int64 scalars too (np.float64 alone subclasses float); numpy's bool_ is no Real
    if isinstance(percent, bool) or not isinstance(percent, numbers.Real) or not 0 < percent <= 100 \
            or math.isnan(percent):
        raise ValueError(f"percent: expected a number in (0, 100], got {percent!r}")
    return as_written(percent)  # np.float32(1.1) is 1.1 (session 40: its double value took 12 of 1000)


def _shape_arg(shape, what: str = "shape") -> Tuple[int, ...]:
    """A mask's shape: a sequence of ints >= 0 (numpy integers and a torch.Size too), else a TypeError /
    ValueError naming ``what`` (``int(s)`` would truncate 4.5 to 4, and take True as 1 and "45" as 45)."""
    if isinstance(shape, (str, bytes, Mapping)) or not isinstance(shape, (Sequence, torch.Size)) \
            and not (isinstance(shape, torch.Tensor) and shape.dim() == 1 and not shape.is_floating_point()):
        raise TypeError(f"{what}: expected a sequence of ints, got {type(shape).__name__}")
    out = int_seq(shape.tolist() if isinstance(shape, torch.Tensor) else shape, what,
                  negative=f"sizes must be >= 0, got {tuple(shape)}")
    if math.prod(out) >= 1 << 63:
        raise ValueError(f"{what}: {tuple(out)} has 2^63 entries or more")
    return tuple(out)


def percent_to_k(numel: int, percent: float) -> int:
    """Entries a top-``percent``% selection keeps in a tensor of ``numel`` entries:
    ``max(1, ceil(numel * percent / 100))`` for a non-empty tensor, 0 for an empty one: GoldenParams' count
    (``get_golden_params`` and its reverse search take ``max(1, ceil(pct / 100 * numel))``), so a drop-in user
    gets its masks (session 39; gradkit floored before and kept one entry fewer in most tensors).

    Exact on ``percent``'s value (``gradkit._rules.ceil_count``), with a product that ``percent``'s own rounding
    could move onto an integer taken as that integer (1.1% of 1000 entries is 11, where float arithmetic gives
    11.000000000000002, which GoldenParams' float ceil takes as 12). A numpy float32 / float16 ``percent`` is read as
    the decimal numpy prints for it (``np.float32(1.1)`` is 1.1, not 1.10000002384...; session 40)."""
    numel = ops._int(numel, "numel")
    if numel < 0:
        raise ValueError(f"numel: must be >= 0, got {numel}")
    p = _check_percent(percent)
    if numel == 0:
        return 0
    return max(1, min(numel, ceil_count(numel, p, 100)))


def _fresh_bits(numel: int, device) -> torch.Tensor:
    return torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=device)


def topk_mask(t: torch.Tensor, percent: float) -> torch.Tensor:
    """Bool mask (``t``'s shape) of the top ``percent``% of ``|t|`` (ties lowest position first; NaN never)."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"t: expected a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.layout != torch.strided:
        raise TypeError(f"t: expected a dense (strided) tensor, got a {t.layout} one")
    if t.is_meta:
        raise ValueError("t: a meta tensor holds no values")
    k = percent_to_k(t.numel(), percent)
    g = widened(t).contiguous()
    bits = _fresh_bits(g.numel(), g.device)
    ops.golden_topk_and_(g, bits, k, first=True)
    return unpack_bitmask(bits, g.numel()).reshape(t.shape)


# --------------------------------------------------------------------------- packed masks


class Bitmask:
    """A boolean mask of ``shape`` stored packed: bit ``j`` of byte ``i`` is flat entry ``8i + j``
    (padding bits 0). Immutable in use: the algebra returns new masks."""

    __slots__ = ("bits", "shape")

    def __init__(self, bits: torch.Tensor, shape: Sequence[int]):
        shape = _shape_arg(shape)
        numel = math.prod(shape)
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1 \
                or bits.numel() != (numel + 7) // 8:
            raise ValueError(f"bits: expected a uint8 tensor of shape ({(numel + 7) // 8},) for shape {shape}, got "
                             f"{getattr(bits, 'dtype', type(bits).__name__)} {tuple(getattr(bits, 'shape', ()))}")
        if bits.is_meta or bits.layout != torch.strided:
            # session 42: a meta one made a Bitmask whose count() / algebra raised torch's "Tensor.item() cannot be
            # called on meta tensors" (or, with a partial last byte, the constructor did), naming nothing
            raise ValueError(f"bits: expected a dense uint8 tensor with data, got a {bits.layout} one on {bits.device}")
        if numel % 8 and int(bits[-1]) >> (numel % 8):
            raise ValueError(f"bits: bits are set beyond the {numel} entries of shape {shape}")
        self.bits = bits.contiguous()
        self.shape = shape

    def __getstate__(self):  # (a __slots__ class: pickle protocols 0 and 1 need the state spelled out)
        return {"bits": self.bits, "shape": self.shape}

    def __setstate__(self, state) -> None:
        self.bits, self.shape = state["bits"], tuple(state["shape"])

    # construction / conversion
    @classmethod
    def from_bool(cls, mask: torch.Tensor) -> "Bitmask":
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.layout != torch.strided:
            raise TypeError(f"mask: expected a dense bool tensor, got a {mask.layout} one (a sparse COO mask: "
                            "Bitmask.from_coo)")
        return cls(ops.pack_bitmask(mask.contiguous()), mask.shape)

    @classmethod
    def from_indices(cls, indices: torch.Tensor, shape: Sequence[int]) -> "Bitmask":
        shape = _shape_arg(shape)
        numel = math.prod(shape)
        try:
            idx = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"indices: expected integer positions (a tensor, array or sequence of ints), got "
                            f"{type(indices).__name__}") from None
        if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:  # .long() would truncate
            raise TypeError(f"indices: expected integer positions, got {idx.dtype} values")
        if idx.is_meta:
            raise ValueError("indices: a meta tensor holds no positions")
        if idx.dim() > 1:  # (ndim, nnz) coordinates (mask.nonzero().t(), a COO tensor's indices()) are not positions
            raise ValueError(f"indices: expected a 1-D tensor of flat (row-major) positions, got shape "
                             f"{tuple(idx.shape)} (coordinates: pass the sparse COO tensor to Bitmask.coerce, or flatten them first)")
        idx = idx.reshape(-1).long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(f"indices: positions must lie in [0, {numel}) for shape {shape}")
        return cls(_bits_of_flat(idx, numel), shape)

    @classmethod
    def from_coo(cls, coo: torch.Tensor) -> "Bitmask":
        """From a torch sparse COO tensor (entries stored with a non-zero value are set), hybrid ones too (dense
        trailing dimensions: each stored value block sets its non-zero entries; session 40, an IndexError before)."""
        if not isinstance(coo, torch.Tensor) or coo.layout != torch.sparse_coo:
            raise TypeError("coo: expected a torch sparse COO tensor")
        ind = coo._indices()
        if ind.numel() and (int(ind.min()) < 0 or bool((ind.max(1).values >= torch.tensor(coo.shape[:ind.shape[0]],
                                                                                        device=ind.device)).any())):
            raise ValueError(f"coo: indices outside the shape {tuple(coo.shape)}")
        c = coo.coalesce()
        sd = c.sparse_dim()
        inner = math.prod(c.shape[sd:])  # 1 unless hybrid: the entries of one stored value block
        vals = c.values()
        ent, sub = (vals.reshape(vals.shape[0], inner) != 0).nonzero(as_tuple=True)
        ind = c.indices().long()
        # flat positions (row-major) packed straight into bits: no dense bool copy of the mask's shape (a file of a
        # few hundred bytes could name a shape of 2^33 entries); a 0-dim mask's indices are (0, nnz)
        flat = torch.zeros(ind.shape[1], dtype=torch.long, device=ind.device)
        stride = 1
        for d in range(sd - 1, -1, -1):
            flat += ind[d] * stride
            stride *= int(c.shape[d])
        flat = flat[ent] * inner + sub
        return cls(_bits_of_flat(flat, math.prod(c.shape)), tuple(c.shape))

    @classmethod
    def coerce(cls, m, shape: Optional[Sequence[int]] = None, what: str = "mask") -> "Bitmask":
        """A Bitmask from a Bitmask, a bool tensor, a sparse COO tensor or a packed uint8 tensor (needs
        ``shape``); with ``shape`` given, the mask's shape must equal it (an error names ``what``)."""
        if isinstance(m, Bitmask):
            b = m
        elif isinstance(m, torch.Tensor) and m.layout == torch.sparse_coo:
            b = cls.from_coo(m)
        elif isinstance(m, torch.Tensor) and m.layout != torch.strided:  # CSR / CSC / BSR: no conversion here
            raise TypeError(f"{what}: expected a dense or sparse COO mask, got a {m.layout} tensor "
                            "(convert it with .to_sparse_coo())")
        elif isinstance(m, torch.Tensor) and m.dtype == torch.bool:
            b = cls.from_bool(m)
        elif isinstance(m, torch.Tensor) and m.dtype == torch.uint8 and m.dim() == 1 and shape is not None:
            b = cls(m, shape)
        else:
            raise TypeError(f"{what}: expected a bool tensor, a Bitmask, a sparse COO tensor or a packed uint8 "
                            f"bitmask, got {getattr(m, 'dtype', type(m).__name__)}")
        if shape is not None and tuple(b.shape) != _shape_arg(shape):
            raise ValueError(f"{what}: shape {tuple(b.shape)} differs from the parameter's {tuple(shape)}")
        return b

    def to_bool(self) -> torch.Tensor:
        return unpack_bitmask(self.bits, self.numel).reshape(self.shape)

    def to_indices(self, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return ops.bitmask_to_indices(self.bits, self.numel, dtype)

    def to_coo(self) -> torch.Tensor:
        """A torch sparse COO bool tensor (what GoldenParams stores; ~17 bytes per set entry)."""
        idx = self.to_indices()
        coords = torch.stack(torch.unravel_index(idx, self.shape)) if self.shape else idx.new_zeros((0, idx.numel()))
        return torch.sparse_coo_tensor(coords, torch.ones(idx.numel(), dtype=torch.bool, device=idx.device),
                                       self.shape, is_coalesced=True, check_invariants=False)

    # statistics
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def count(self) -> int:
        return int(ops.bitmask_count([self.bits])[0])

    def density(self) -> float:
        return self.count() / self.numel if self.numel else 0.0

    def memory(self) -> int:
        """Bytes of the packed representation."""
        return self.bits.numel()

    # algebra
    def _other(self, o) -> "Bitmask":
        o = Bitmask.coerce(o, self.shape, "other")
        if o.device != self.device:
            raise ValueError(f"other: on {o.device} but this mask is on {self.device}")
        return o

    def _bin(self, o, op: str) -> "Bitmask":
        return Bitmask(ops.bitmask_binary([self.bits], [self._other(o).bits], op)[0], self.shape)

    def __and__(self, o) -> "Bitmask":
        return self._bin(o, "and")

    def __or__(self, o) -> "Bitmask":
        return self._bin(o, "or")

    def __xor__(self, o) -> "Bitmask":
        return self._bin(o, "xor")

    def andnot(self, o) -> "Bitmask":
        return self._bin(o, "andnot")

    def __invert__(self) -> "Bitmask":
        return Bitmask(ops.bitmask_not([self.bits], [self.numel])[0], self.shape)

    def __eq__(self, o) -> bool:
        return isinstance(o, Bitmask) and o.shape == self.shape and torch.equal(o.bits.cpu(), self.bits.cpu())

    def __repr__(self) -> str:
        return f"Bitmask(shape={self.shape}, count={self.count()}, bytes={self.memory()})"


def _bits_of_flat(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """The packed bitmask (ceil(numel / 8) uint8, bit j of byte i = entry 8i + j) of the flat positions ``idx``
    (in range, duplicates allowed), without a dense bool mask."""
    bits = torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=idx.device)
    if idx.numel():
        u = torch.unique(idx)
        bits.index_put_((u >> 3,), (1 << (u & 7)).to(torch.uint8), accumulate=True)  # distinct bits of a byte: OR
    return bits


def _same_keys(a: "MaskSet", b: "MaskSet") -> None:
    """The same names (in any order: masks pair by name) and, name by name, the same shapes."""
    if set(a) != set(b):
        raise ValueError(f"other: mask names differ ({sorted(set(a) ^ set(b))[:5]} ...)")
    for n in a:
        if a[n].shape != b[n].shape:
            raise ValueError(f"other[{n!r}]: shape {b[n].shape} differs from {a[n].shape}")


class MaskSet(Mapping[str, Bitmask]):
    """Named packed masks (e.g. one per parameter) with the algebra applied to every mask in one
    kernel call. Build from ``{name: bool tensor | Bitmask | COO}``."""

    def __init__(self, masks: Mapping[str, Union[Bitmask, torch.Tensor]]):
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks: expected a dict of name -> mask, got {type(masks).__name__}")
        self._m: Dict[str, Bitmask] = {n: Bitmask.coerce(m, what=f"masks[{n!r}]") for n, m in masks.items()}

    def __getitem__(self, name: str) -> Bitmask:
        return self._m[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def _lists(self) -> List[torch.Tensor]:
        return [m.bits for m in self._m.values()]

    def _bin(self, other: "MaskSet", op: str) -> "MaskSet":
        if not isinstance(other, Mapping):
            raise TypeError(f"other: expected a MaskSet or a dict of name -> mask, got {type(other).__name__}")
        other = other if isinstance(other, MaskSet) else MaskSet(other)
        _same_keys(self, other)
        out = ops.bitmask_binary(self._lists(), [other[n].bits for n in self._m], op)  # paired by name
        return MaskSet({n: Bitmask(b, self._m[n].shape) for n, b in zip(self._m, out)})

    def __and__(self, o) -> "MaskSet":
        return self._bin(o, "and")

    def __or__(self, o) -> "MaskSet":
        return self._bin(o, "or")

    def __xor__(self, o) -> "MaskSet":
        return self._bin(o, "xor")

    def andnot(self, o) -> "MaskSet":
        return self._bin(o, "andnot")

    def __invert__(self) -> "MaskSet":
        out = ops.bitmask_not(self._lists(), [m.numel for m in self._m.values()])
        return MaskSet({n: Bitmask(b, self._m[n].shape) for n, b in zip(self._m, out)})

    def counts(self) -> Dict[str, int]:
        c = ops.bitmask_count(self._lists()).tolist() if self._m else []
        return dict(zip(self._m, c))

    def count(self) -> int:
        return sum(self.counts().values())

    def numel(self) -> int:
        return sum(m.numel for m in self._m.values())

    def density(self) -> float:
        n = self.numel()
        return self.count() / n if n else 0.0

    def memory(self) -> Dict[str, int]:
        """Bytes: packed (this), dense bool, and torch sparse COO (int64 coords + bool values)."""
        cnt = self.counts()
        return {"packed": sum(m.memory() for m in self._m.values()), "dense_bool": self.numel(),
                "coo": sum(cnt[n] * (8 * max(1, len(m.shape)) + 1) for n, m in self._m.items())}

    def summary(self) -> Dict[str, Dict[str, float]]:
        cnt = self.counts()
        return {n: {"numel": m.numel, "active": cnt[n], "density": cnt[n] / m.numel if m.numel else 0.0}
                for n, m in self._m.items()}

    def to_bool(self) -> Dict[str, torch.Tensor]:
        return {n: m.to_bool() for n, m in self._m.items()}

    def to_coo(self) -> Dict[str, torch.Tensor]:
        return {n: m.to_coo() for n, m in self._m.items()}

    def to_indices(self, dtype: torch.dtype = torch.int64) -> Dict[str, torch.Tensor]:
        return {n: m.to_indices(dtype) for n, m in self._m.items()}

    def to_parammap(self):
        """A :class:`gradkit.ParamMap` selecting the set entries (bitmask representation)."""
        from gradkit.parammap import ParamMap

        return ParamMap({n: {"shape": m.shape, "repr": "bitmask", "bitmask": m.bits.cpu()} for n, m in self._m.items()})

    @classmethod
    def from_parammap(cls, pm) -> "MaskSet":
        out = {}
        specs = pm.to_spec(bitmask_as_mask=False)
        for n in pm.names:
            shape = pm.shape(n)
            numel = math.prod(shape)
            spec = specs[n]
            r = spec.get("repr", "all")
            if r == "all":
                out[n] = Bitmask.from_bool(torch.ones(shape, dtype=torch.bool))
            elif r == "mask":
                out[n] = Bitmask.from_bool(spec["mask"])
            elif r == "bitmask":
                out[n] = Bitmask(spec["bitmask"], shape)
            else:
                out[n] = Bitmask.from_indices(spec["indices"], shape) if numel else Bitmask(_fresh_bits(0, "cpu"), shape)
        return cls(out)

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} masks, {self.count()}/{self.numel()} set)"


def _compact_sparse(m: Mapping, what: str, path) -> "Bitmask":
    """GoldenParams' compact sparse mask (``convert_masks_to_sparse_coo``): ``{"indices": int32 flat positions,
    "shape", "nnz", "dtype": "bool", "layout": "compact_sparse"}``, checked field by field (session 39: refused
    before, so no results file of the current GoldenParams could be read)."""
    idx, shape = m.get("indices"), m.get("shape")
    if not isinstance(idx, torch.Tensor) or type(idx) is not torch.Tensor or idx.device.type != "cpu":
        raise ValueError(f"{what}: a compact sparse mask's 'indices' must be a plain CPU tensor in {path!r}, got "
                         f"{type(idx).__name__}")
    if not isinstance(shape, (torch.Size, tuple, list)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                                   and d >= 0 for d in shape):
        raise ValueError(f"{what}: a compact sparse mask's 'shape' must be a sequence of sizes in {path!r}, got "
                         f"{shape!r}")
    if m.get("dtype", "bool") != "bool":
        raise ValueError(f"{what}: a compact sparse mask of dtype {m.get('dtype')!r} in {path!r}; expected 'bool'")
    nnz = m.get("nnz")
    if nnz is not None and (not isinstance(nnz, int) or nnz != idx.numel()):
        raise ValueError(f"{what}: a compact sparse mask with nnz={nnz!r} but {idx.numel()} indices in {path!r} "
                         "(truncated or edited)")
    try:
        return Bitmask.from_indices(idx, tuple(shape))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e} (in {path!r})") from None


def load_goldenparams(path: str, key: Optional[str] = None) -> MaskSet:
    """Masks from a GoldenParams results file (``.pt`` with ``masks`` or ``intersection_masks``:
    name -> sparse COO, dense bool, or the compact sparse dict GoldenParams' ``convert_masks_to_sparse_coo``
    writes; a mask of numbers selects its non-zero entries, and one holding NaN is refused). Loaded with
    ``weights_only=True``: nothing is unpickled; a file that is not a regular file, cannot be loaded that way, or
    holds masks that are not plain CPU tensors raises ValueError naming it."""
    with open_regular(path, "path") as f:  # not a FIFO / device (checked on the open file)
        try:
            data = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError (a refused global), OSError, RuntimeError (damaged)
            raise ValueError(f"path: {path!r} cannot be loaded as a GoldenParams results file with weights_only=True "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"path: {path!r} does not hold a dict of results")
    keys = [key] if key else ["masks", "intersection_masks"]
    for k in keys:
        if k in data:
            masks = data[k]
            if not isinstance(masks, Mapping):
                raise ValueError(f"path: {path!r}[{k!r}] is not a dict of name -> mask")
            out = {}
            for n, m in masks.items():
                what = f"{k}[{n!r}]"
                if isinstance(m, Mapping) and m.get("layout") == "compact_sparse":
                    out[n] = _compact_sparse(m, what, path)  # what GoldenParams' convert_masks_to_sparse_coo writes
                    continue
                if not isinstance(m, torch.Tensor):
                    raise TypeError(f"{what}: expected a mask tensor (dense or sparse COO) or GoldenParams' compact "
                                    f"sparse dict in {path!r}, got {type(m).__name__}")
                if m.device.type != "cpu" or type(m) is not torch.Tensor:
                    raise ValueError(f"{what}: expected a plain CPU tensor in {path!r}, got a {type(m).__name__} "
                                     f"on {m.device}")
                if m.dtype != torch.bool and (m.is_floating_point() or m.is_complex()):
                    # non-zero selects (torch's .bool()); a NaN is no decision either way (.bool() made it True)
                    vals = m._values() if m.layout == torch.sparse_coo else m
                    if bool(torch.isnan(vals).any()):
                        raise ValueError(f"{what}: a {m.dtype} mask in {path!r} holds NaN; expected a bool mask (or "
                                         "numbers, non-zero = selected)")
                try:
                    out[n] = Bitmask.coerce(m if m.dtype == torch.bool or m.layout == torch.sparse_coo
                                            else m.bool(), what=what)
                except (TypeError, ValueError, RuntimeError, IndexError) as e:  # a damaged sparse tensor
                    msg = str(e)
                    raise ValueError(f"{msg if msg.startswith(what) else f'{what}: {msg}'} (in {path!r})") from None
            return MaskSet(out)
    raise ValueError(f"path: {path!r} has none of the keys {keys} (found {sorted(map(repr, data))[:8]})")


# --------------------------------------------------------------------------- golden masks


@dataclass
class GoldenResult:
    """Output of :func:`golden_masks`."""
    masks: MaskSet
    samples: int
    counts: Optional[Dict[str, torch.Tensor]] = None  # per entry: how many samples selected it (int32)
    summary: Dict[str, Dict[str, float]] = field(default_factory=dict)
    history: List[int] = field(default_factory=list)  # total active entries after each sample


def _grad_tensor(grads: Mapping[str, torch.Tensor], name: str, sample: int) -> torch.Tensor:
    if name not in grads:
        raise ValueError(f"grad_iter: sample {sample} has no gradient for {name!r}")
    g = grads[name]
    if not isinstance(g, torch.Tensor) or not g.dtype.is_floating_point:
        raise TypeError(f"grad_iter: sample {sample}, {name!r}: expected a floating tensor")
    if g.layout != torch.strided:
        raise TypeError(f"grad_iter: sample {sample}, {name!r}: expected a dense (strided) gradient, got a "
                        f"{g.layout} one (densify it with .to_dense())")
    if g.is_meta:
        raise ValueError(f"grad_iter: sample {sample}, {name!r}: a meta tensor holds no gradient values")
    return widened(g)


def golden_masks(grad_iter: Iterable[Mapping[str, torch.Tensor]], percent: float, scope: str = "tensor",
                 params: Optional[Sequence[str]] = None, *, return_counts: bool = False,
                 progress: bool = False) -> GoldenResult:
    """Golden masks: per sample, the top ``percent``% of |g| per tensor (``scope="tensor"``) or
    over all selected tensors together (``"global"``), ANDed across samples.

    grad_iter yields one ``{name: gradient}`` dict per sample; ``params`` restricts (and orders)
    the names (default: the first sample's keys; every later sample must hold them with the same
    shapes). ``return_counts`` also keeps, per entry, how many samples selected it. Ties at the
    threshold: lowest flat position first (globally: in ``params`` order); NaN is never selected.
    Gradients must be dense (a sparse one is a TypeError naming it); float8 ones are widened to float32 (exact).
    A tensor listed under two names (a tied parameter's gradient) counts twice in the global scope, as any two
    entries do: pass each parameter once (``named_parameters()`` does).
    """
    pct = _check_percent(percent)
    if scope not in ("tensor", "global"):
        raise ValueError(f"scope: expected 'tensor' or 'global', got {scope!r}")
    if params is not None:
        if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
            raise TypeError(f"params: expected a sequence of parameter names, got {type(params).__name__}")
        params = list(params)
        if len(set(params)) != len(params):
            raise ValueError("params: expected a sequence of distinct parameter names")
        bad = [p for p in params if not isinstance(p, str)]
        if bad:
            raise TypeError(f"params: expected parameter names (str), got {bad[0]!r}")
    return_counts, progress = flag(return_counts, "return_counts"), flag(progress, "progress")
    try:
        it = iter(grad_iter)
    except TypeError:
        raise TypeError(f"grad_iter: expected an iterable of dicts name -> gradient, got "
                        f"{type(grad_iter).__name__}") from None
    bits: Dict[str, torch.Tensor] = {}
    counts: Dict[str, torch.Tensor] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    history: List[int] = []
    names: List[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="golden masks", unit="sample")
    n = 0
    for grads in it:
        if not isinstance(grads, Mapping):
            raise TypeError(f"grad_iter: sample {n} is a {type(grads).__name__}, expected a dict name -> gradient")
        gs = {}
        if n == 0:
            names = list(params) if params is not None else list(grads)
            if not names:
                raise ValueError("params: empty selection" if params is not None
                                 else "grad_iter: the first sample holds no gradients")
            bad = [k for k in names if not isinstance(k, str)]
            if bad:  # session 42: kept as mask names, which MaskSet.to_parammap and MaskedAdamW then refuse
                raise TypeError(f"grad_iter: sample 0 names a gradient {bad[0]!r}; expected parameter names (str)")
        for name in names:
            g = _grad_tensor(grads, name, n)
            if n == 0:
                shapes[name] = tuple(g.shape)
            elif tuple(g.shape) != shapes[name]:
                raise ValueError(f"grad_iter: sample {n}, {name!r}: shape {tuple(g.shape)} differs from {shapes[name]}")
            gs[name] = g.contiguous()
        if n == 0:
            for name, g in gs.items():
                bits[name] = _fresh_bits(g.numel(), g.device)
                if return_counts:
                    counts[name] = torch.zeros(g.shape, dtype=torch.int32, device=g.device)
        first = n == 0
        total = 0
        if scope == "tensor":
            for name, g in gs.items():
                k = percent_to_k(g.numel(), pct)
                total += int(ops.golden_topk_and_(g, bits[name], k, counts=counts.get(name), first=first))
        else:
            total = _global_update(gs, bits, counts, pct, first)
        history.append(total)
        n += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=total)
    if bar is not None:
        bar.close()
    if n == 0:
        raise ValueError("grad_iter: yielded no samples")
    masks = MaskSet({name: Bitmask(bits[name], shapes[name]) for name in names})
    return GoldenResult(masks=masks, samples=n, counts=counts if return_counts else None,
                        summary=masks.summary(), history=history)


def _global_update(gs: Dict[str, torch.Tensor], bits, counts, pct: float, first: bool) -> int:
    """One sample of the global scope: top-k of |g| over every tensor (k from the total size), by the
    multi-tensor exact select (no concatenation), then AND per tensor."""
    total_n = sum(g.numel() for g in gs.values())
    k = percent_to_k(total_n, pct)
    wide = functools.reduce(torch.promote_types, [g.dtype for g in gs.values()])  # exact for every float pair
    # NaN below every |g|; +inf kept as +inf (nan_to_num's default would make it the dtype's largest finite value,
    # tied with a real one and losing to it by position)
    scores = [g.abs().reshape(-1).to(wide).nan_to_num(nan=-1.0, posinf=math.inf) for g in gs.values()]
    pos = ops.topk_select_segments(scores, k)
    start = 0
    for (name, g), s in zip(gs.items(), scores):
        lo = int(torch.searchsorted(pos, start))
        hi = int(torch.searchsorted(pos, start + g.numel()))
        sel = torch.zeros(g.numel(), dtype=torch.bool, device=g.device)
        sel[pos[lo:hi] - start] = True
        sel &= s >= 0
        packed = ops.pack_bitmask(sel)
        if first:
            bits[name].copy_(packed)
        else:
            bits[name].bitwise_and_(packed)
        if name in counts:
            counts[name] += sel.reshape(counts[name].shape).to(torch.int32)
        start += g.numel()
    return int(ops.bitmask_count(list(bits.values())).sum())


# --------------------------------------------------------------------------- sparse accumulation


class SparseGradientAccumulator:
    """Accumulates gradients only at mask positions, in compact form: one flat vector per tensor
    holding the running sum of the selected entries (``count`` entries, fp32 by default).

    ``add(grads)`` takes ``{name: gradient}`` (or a model: its parameters' ``.grad``);
    ``values()`` the compact sums, ``mean()`` divided by the number of ``add`` calls,
    ``to_dense()`` scattered back to full shapes (zeros elsewhere). Gradients are not inspected: a
    NaN / Inf at a mask position enters its sum, and a sum past ``dtype``'s range (an fp16 accumulator)
    becomes +-inf, as torch's own ``+=`` would. Float8 gradients are widened to float32 (exact); with a model,
    a mask may name a tied parameter by any of its names (``named_parameters(remove_duplicate=False)``)."""

    def __init__(self, masks: Union[MaskSet, Mapping[str, torch.Tensor]], dtype: torch.dtype = torch.float32):
        self.masks = masks if isinstance(masks, MaskSet) else MaskSet(masks)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize == 1:
            raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype}")
        self.dtype = dtype
        self._idx = {n: m.to_indices(torch.int64 if m.numel > 2**31 - 1 else torch.int32) for n, m in self.masks.items()}
        total = sum(i.numel() for i in self._idx.values())
        dev = next(iter(self._idx.values())).device if self._idx else torch.device("cpu")
        # every tensor's sums back to back; never an inference tensor (session 43: one built under
        # torch.inference_mode() refused every later add() outside it, naming an internal "out")
        with torch.inference_mode(False):
            self._flat = torch.zeros(total, dtype=dtype, device=dev)
        self._views()
        self.steps = 0
        # add / reset one at a time: threads sharing one accumulator (a loader thread per data source) lost addends
        # (the fused gather-add runs without the GIL) and step counts (session 43 concurrency audit)
        self._lock = threading.Lock()

    def _views(self) -> None:
        """``_acc``: each tensor's sums, a view of ``_flat`` (which ``add`` writes)."""
        self._acc: Dict[str, torch.Tensor] = {}
        off = 0
        for n, i in self._idx.items():
            self._acc[n] = self._flat[off:off + i.numel()]
            off += i.numel()

    def __getstate__(self):
        # the views are rebuilt on load: pickle stores each view's values apart from _flat, so an unpickled
        # accumulator's add() updated _flat while values() / mean() / to_dense() kept the old sums (session 41)
        return {k: v for k, v in self.__dict__.items() if k not in ("_acc", "_lock")}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if self._flat.is_inference():  # unpickled under torch.inference_mode(): the sums must stay writable
            with torch.inference_mode(False):
                self._flat = self._flat.clone()
        self._views()

    def add(self, grads) -> None:
        """Add one set of gradients (``{name: grad}`` or a model whose ``.grad`` are set); all checked first."""
        if isinstance(grads, torch.nn.Module):  # every name of a tied parameter: a mask may name any of them
            grads = {n: p.grad for n, p in grads.named_parameters(remove_duplicate=False) if n in self._idx}
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads: expected a dict name -> gradient or a model, got {type(grads).__name__}")
        src = []
        for n in self._idx:
            g = grads.get(n)
            if g is None:
                raise ValueError(f"grads: no gradient for {n!r}")
            if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.layout != torch.strided:
                got = f"a {g.layout} {g.dtype} tensor" if isinstance(g, torch.Tensor) else type(g).__name__
                raise TypeError(f"grads[{n!r}]: expected a dense floating tensor, got {got}")
            if tuple(g.shape) != self.masks[n].shape:
                raise ValueError(f"grads[{n!r}]: shape {tuple(g.shape)} differs from its mask's {self.masks[n].shape}")
            if g.device != self._flat.device:
                raise ValueError(f"grads[{n!r}]: on {g.device} but the accumulator is on {self._flat.device}")
            src.append(widened(g))
        with self._lock:
            if src:
                ops.gather_segments(src, list(self._idx.values()), out=self._flat, accumulate=True)
            self.steps += 1

    def values(self) -> Dict[str, torch.Tensor]:
        return dict(self._acc)

    def mean(self) -> Dict[str, torch.Tensor]:
        if self.steps == 0:
            raise ValueError("mean: nothing accumulated yet")
        return {n: v / self.steps for n, v in self._acc.items()}

    def to_dense(self) -> Dict[str, torch.Tensor]:
        out = {}
        for n, v in self._acc.items():
            d = torch.zeros(self.masks[n].numel, dtype=self.dtype, device=v.device)
            d[self._idx[n].long()] = v
            out[n] = d.reshape(self.masks[n].shape)
        return out

    def reset(self) -> None:
        with self._lock:
            self._flat.zero_()
            self.steps = 0

    def memory(self) -> int:
        """Bytes held (compact sums + positions)."""
        return sum(v.numel() * v.element_size() + self._idx[n].numel() * self._idx[n].element_size()
                   for n, v in self._acc.items())

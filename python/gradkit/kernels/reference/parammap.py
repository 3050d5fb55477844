"""Plain-PyTorch oracles for the param-map family: the definition of what every
backend of these ops must return.

Conventions shared by every backend:
* a *segment* is one source tensor plus an optional 1-D integer ``index`` of flat
  (row-major) positions into it; ``index=None`` selects every element in order;
* the flat vector is the concatenation of the segments' selections in list order;
* bitmasks are packed little-endian: bit ``j`` of byte ``i`` is element ``8*i + j``;
* ``topk_select`` returns ascending positions of the ``k`` largest scores among the
  active ones, equal scores taken lowest position first.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _checked(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """int64 positions, rejecting anything outside [0, numel) like every kernel does
    (plain indexing would wrap negative positions silently)."""
    i = idx.long()
    if i.numel() and (int(i.min()) < 0 or int(i.max()) >= numel):
        raise IndexError("index: a position is out of range for its segment")
    return i


def _check_scatter(index, numel) -> None:
    """Every segment's positions in range (IndexError), then none repeated (ValueError): scatter positions are a
    set; every kernel refuses a repeat, whose writes would race and whose += would lose updates."""
    pos = [None if i is None else _checked(i, int(n)) for i, n in zip(index, numel)]
    for i in pos:
        if i is not None and i.numel() > 1 and torch.unique(i).numel() != i.numel():
            raise ValueError("index: a position occurs more than once in a segment; scatter positions must be "
                             "distinct")


def gather_segments(src: Sequence[torch.Tensor], index: Sequence[Optional[torch.Tensor]],
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if dtype is None:
        dtype = src[0].dtype if len(src) else torch.float32
        for s in src[1:]:
            dtype = torch.promote_types(dtype, s.dtype)
    device = src[0].device if len(src) else torch.device("cpu")
    parts = []
    for s, i in zip(src, index):
        f = _flat(s)
        parts.append(f if i is None else f[_checked(i, f.numel())])
    if not parts:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([p.to(dtype) for p in parts])


def gather_segments_out(src, index, out: torch.Tensor, accumulate: bool = False) -> None:
    vals = gather_segments(src, index, dtype=out.dtype)
    if accumulate:
        out.add_(vals)
    else:
        out.copy_(vals)


def scatter_segments(flat: torch.Tensor, index: Sequence[Optional[torch.Tensor]],
                     numel: Sequence[int], scale: float = 1.0) -> List[torch.Tensor]:
    _check_scatter(index, numel)
    outs, off = [], 0
    for i, n in zip(index, numel):
        full = torch.zeros(int(n), dtype=flat.dtype, device=flat.device)
        c = int(n) if i is None else i.numel()
        vals = flat[off:off + c]
        if scale != 1.0:
            vals = vals * scale
        if i is None:
            full.copy_(vals)
        else:
            full[i.long()] = vals
        outs.append(full)
        off += c
    return outs


def scatter_segments_(flat: torch.Tensor, index, dst: Sequence[torch.Tensor],
                      scale: float = 1.0, accumulate: bool = False) -> None:
    _check_scatter(index, [d.numel() for d in dst])  # every position first: an error leaves every dst untouched
    off = 0
    for i, d in zip(index, dst):
        c = d.numel() if i is None else i.numel()
        vals = flat[off:off + c].to(torch.float64) * scale
        cur = d.reshape(-1).to(torch.float64, copy=True)  # never aliases d (float64 dst included)
        if i is None:
            new = cur + vals if accumulate else vals
            d.copy_(new.to(d.dtype).reshape(d.shape))
        else:
            li = _checked(i, d.numel())
            upd = cur[li] + vals if accumulate else vals
            cur[li] = upd
            d.copy_(cur.to(d.dtype).reshape(d.shape))
        off += c


def mask_to_indices(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.reshape(-1).nonzero().reshape(-1).to(dtype)


def unpack_bitmask(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat bool vector (numel,) of a packed little-endian bitmask (padding bits ignored)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].to(torch.bool)


def bitmask_to_indices(bits: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    unpacked = unpack_bitmask(bits, bits.numel() * 8)
    if unpacked[numel:].any():
        raise ValueError("bits: bits set beyond numel")
    return unpacked[:numel].nonzero().reshape(-1).to(dtype)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    m = mask.reshape(-1).to(torch.uint8)
    n = m.numel()
    pad = (-n) % 8
    if pad:
        m = torch.cat([m, m.new_zeros(pad)])
    weights = (2 ** torch.arange(8, device=m.device, dtype=torch.int32))
    return (m.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def topk_select(scores: torch.Tensor, active: Optional[torch.Tensor], k: int) -> torch.Tensor:
    s = scores.reshape(-1)
    pos = torch.arange(s.numel(), device=s.device) if active is None else active.reshape(-1).nonzero().reshape(-1)
    if torch.isnan(s[pos]).any():
        raise ValueError("scores: contains NaN among the active entries")
    if not 0 <= k <= pos.numel():  # the native op's check (a negative k sliced order[:k]: all but |k| kept)
        raise ValueError(f"k: must be in [0, {pos.numel()}] (active scores), got {k}")
    vals = s[pos].to(torch.float64)
    order = torch.sort(vals, descending=True, stable=True).indices[:k]
    return torch.sort(pos[order]).values.to(torch.int64)


def topk_select_segments(scores: Sequence[torch.Tensor], active: Sequence[Optional[torch.Tensor]],
                         k: int) -> torch.Tensor:
    """topk_select over the concatenation of the flattened ``scores`` (list order)."""
    if not scores:
        if k != 0:
            raise ValueError(f"k: must be in [0, 0] (active scores), got {k}")
        return torch.empty(0, dtype=torch.int64)
    flat = torch.cat([s.reshape(-1) for s in scores])
    acts = None
    if any(a is not None for a in active):
        acts = torch.cat([torch.ones(s.numel(), dtype=torch.bool, device=s.device) if a is None else a.reshape(-1)
                          for s, a in zip(scores, active)])
    return topk_select(flat, acts, k)

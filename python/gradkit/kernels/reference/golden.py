"""Plain-PyTorch oracles for the golden family (golden-mask updates and packed-bitmask algebra).

Bitmasks are packed little-endian as everywhere in gradkit: bit ``j`` of byte ``i`` is element
``8*i + j`` of the flattened tensor, and the padding bits of the last byte are always 0.

``golden_topk_and_`` selects the ``k`` largest ``|g|`` of the flattened gradient. Ties at the
threshold are taken lowest flat position first; NaN entries are never selected (when fewer than
``k`` entries are not NaN, all of those are selected).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from gradkit.kernels.reference.parammap import pack_bitmask, unpack_bitmask  # noqa: F401 (re-exported)


def topk_abs_mask(g: torch.Tensor, k: int) -> torch.Tensor:
    """The flat bool selection of golden_topk_and_ (the k largest |g|, ties lowest position first)."""
    a = g.reshape(-1).abs().to(torch.float64)
    valid = ~torch.isnan(a)
    a = torch.where(valid, a, torch.full_like(a, -1.0))  # NaN below every |g|
    order = torch.sort(a, descending=True, stable=True).indices[:k]
    sel = torch.zeros(a.numel(), dtype=torch.bool, device=g.device)
    sel[order] = True
    return sel & valid


def golden_topk_and_(g: torch.Tensor, bits: torch.Tensor, counts, k: int, first: bool) -> torch.Tensor:
    sel = topk_abs_mask(g, int(k))
    packed = pack_bitmask(sel)
    if first:
        bits.copy_(packed)
    else:
        bits.bitwise_and_(packed)
    if counts is not None:
        counts.add_(sel.reshape(counts.shape).to(counts.dtype))
    return unpack_bitmask(bits, g.numel()).sum().to(torch.int64)


def bitmask_binary(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], op: int) -> List[torch.Tensor]:
    fn = {0: torch.bitwise_and, 1: torch.bitwise_or, 2: torch.bitwise_xor,
          3: lambda x, y: torch.bitwise_and(x, torch.bitwise_not(y))}[int(op)]
    return [fn(x, y) for x, y in zip(a, b)]


def bitmask_not(a: Sequence[torch.Tensor], numel: Sequence[int]) -> List[torch.Tensor]:
    out = []
    for t, n in zip(a, numel):
        full = pack_bitmask(torch.ones(int(n), dtype=torch.bool, device=t.device))
        out.append(torch.bitwise_and(torch.bitwise_not(t), full))
    return out


def bitmask_count(bits: Sequence[torch.Tensor]) -> torch.Tensor:
    counts = [int(unpack_bitmask(t, t.numel() * 8).sum()) for t in bits]
    return torch.tensor(counts, dtype=torch.int64, device=bits[0].device if len(bits) else "cpu")

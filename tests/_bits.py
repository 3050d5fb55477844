"""Bitwise comparison helpers shared by the tests (session 43's dtype audits)."""
import torch

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as integers of the same width (NaN payloads and signed zeros compared bit for bit)."""
    t = t.detach().contiguous()
    return t.view(_INT_OF[t.element_size()]) if t.is_floating_point() else t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads, signed zeros), same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))

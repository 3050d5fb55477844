"""Session 44's fast paths for cases the performance-cliff survey (benchmarks/micro/s44_cliffs.py) found slower than
plain torch: each must give the bits of the general path it short-cuts.

* block_norms with one-entry blocks on a contiguous tensor: a flat |x| loop (30 -> 0.9 ms for 2048^2 float32 at
  2 threads, Zen 4), against the general block walk, which a non-contiguous view of the same values still takes.
"""
import pytest
import torch

from gradkit import _ext, ops

from _bits import same  # noqa: E402  (tests/_bits.py)

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, float("inf")])
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 7), (64, 300), (2, 3, 5)])
def test_one_entry_block_norms_are_the_general_walks_bits(dt, p, shape):
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(shape, generator=gen).to(dt)
    flat = x.reshape(-1)
    if flat.numel() >= 5:  # NaN (both signs), +-inf, +-0, a subnormal
        tiny = torch.finfo(dt).tiny / 4
        flat[:5] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf"), -tiny]).to(dt)
        flat[-1] = -flat[0]
    block = (1,) * len(shape)
    got = ops.block_norms(x, block, p)
    # the same values through a non-contiguous view (the general walk)
    t = torch.empty(shape[::-1], dtype=dt).permute(*reversed(range(len(shape))))
    t.copy_(x)
    assert not t.is_contiguous() or len(shape) == 1 or min(shape) == 1
    want = ops.block_norms(t, block, p)
    assert same(got, want.contiguous())
    assert torch.equal(torch.isnan(got), torch.isnan(x))
    fin = ~torch.isnan(x)
    assert torch.equal(got[fin], x.abs()[fin])

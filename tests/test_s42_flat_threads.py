"""Session 42: the flat projection's GEMM path gives the same bits at any thread count.

Before the fix, a GEMM group run on the calling thread (tiny problems, or tiles that give a single group) let MKL
split the product itself, and for short batches it split the inner dimension: these shapes gave other bits at 2
threads than at 1 (Gaussian, and Rademacher below k = 32, which take the GEMM path). Tall batches over few tiles
now run in shape-only row blocks over the threads; their bits are checked as well, and every result against the
float64 product of the explicit matrix.
"""
import pytest
import torch

from gradkit import _ext
from gradkit import projection as P

needs_ext = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

# (B, D, k, kind): the first ten differed between 1 and 2 threads before the fix; the rest take the row-block
# schedule (B >= 512 over a few tiles) or the grouped one
SHAPES = [
    (5, 3000, 100, "gaussian"), (7, 3000, 100, "gaussian"), (5, 1500, 16, "gaussian"), (5, 3000, 20, "gaussian"),
    (9, 300, 100, "gaussian"), (5, 1500, 20, "gaussian"), (5, 1500, 16, "rademacher"), (5, 3000, 20, "rademacher"),
    (5, 1500, 20, "rademacher"), (3, 3000, 100, "gaussian"),
    (600, 3000, 100, "gaussian"), (2000, 500, 64, "gaussian"), (513, 1000, 20, "rademacher"),
    (1030, 700, 300, "gaussian"), (64, 1000, 2048, "gaussian"),
]


def _explicit(x, k, kind, seed):
    R = P.projection_matrix(k, x.shape[1], seed=seed, kind=kind).double()
    return x.double() @ R.T


@needs_ext
@pytest.mark.parametrize("B,D,k,kind", SHAPES)
def test_same_bits_at_one_and_two_threads(B, D, k, kind):
    gen = torch.Generator().manual_seed(B * 7919 + D * 31 + k)
    x = torch.randn(B, D, generator=gen)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            outs.append(P.project(x, k, seed=3, kind=kind))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]), "2 threads changed the bits"
    assert torch.equal(outs[0], outs[2]), "the same call at 1 thread changed its bits"
    want = _explicit(x, k, kind, 3)
    # float32 summation over D terms of |x| ~ 1 scaled by 1/sqrt(k): a few e-6 at these D
    err = (outs[1].double() - want).abs().max().item()
    assert err < 5e-5 * max(1.0, want.abs().max().item()), err


@needs_ext
def test_row_blocks_keep_rows_independent_of_their_neighbours():
    """In the row-block schedule each row's output does not depend on the other rows' values (the products
    are row-wise; only the block shapes, set by B, choose the BLAS kernel)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(700, 600, generator=gen)
    y = P.project(x, 64, seed=1, kind="gaussian")
    x2 = x.clone()
    x2[1::2] = torch.randn(350, 600, generator=gen)  # change every other row
    y2 = P.project(x2, 64, seed=1, kind="gaussian")
    assert torch.equal(y[0::2], y2[0::2])
    assert not torch.equal(y[1::2], y2[1::2])

"""The CPU score_topk's bf16 screen (AVX512-BF16 machines) returns bitwise the same top-k as its exact fp32 path.

The screen computes approximate scores in bf16 and scores exactly only the keys whose approximate
score plus a proven error bound can still enter the running top-k; every reported score is the
exact fp32 FMA chain. These tests run each call twice in one process, screened and with
GRADKIT_SEARCH_EXACT=1, on data built to break a wrong bound: scores that differ below bf16
resolution, scaled keys (negative scales too), fp16/bf16 keys, odd and minimal D, blocks holding
NaN / inf / huge values (which must fall back), subnormal magnitudes and zero queries.
"""
import os

import pytest
import torch
from hypothesis import given, strategies as st

from gradkit import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.has_op("score_topk"), reason="compiled extension not built")


def both(q, keys, k, largest=True, key_scale=None, scores_in=None, idx_in=None, base=0):
    got = ops.score_topk(q, keys, k, largest=largest, key_scale=key_scale, scores_in=scores_in, idx_in=idx_in,
                         base=base)
    old = os.environ.get("GRADKIT_SEARCH_EXACT")
    os.environ["GRADKIT_SEARCH_EXACT"] = "1"
    try:
        want = ops.score_topk(q, keys, k, largest=largest, key_scale=key_scale, scores_in=scores_in,
                              idx_in=idx_in, base=base)
    finally:
        if old is None:
            del os.environ["GRADKIT_SEARCH_EXACT"]
        else:
            os.environ["GRADKIT_SEARCH_EXACT"] = old
    assert torch.equal(got[1], want[1]), (got[1] != want[1]).nonzero()[:5]
    assert torch.equal(got[0], want[0])
    return got


@given(Q=st.integers(1, 20), N=st.integers(1, 3000), D=st.sampled_from([15, 16, 17, 33, 64, 130]),
       k=st.sampled_from([1, 5, 10, 40]), largest=st.booleans(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), scaled=st.booleans(),
       kind=st.sampled_from(["gauss", "near_ties", "wide_range"]))
def test_screen_equals_exact(Q, N, D, k, largest, seed, dtype, scaled, kind):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, D, generator=g)
    if kind == "gauss":
        keys = torch.randn(N, D, generator=g)
    elif kind == "near_ties":  # scores apart by ~1e-6 relative: far below bf16 resolution
        keys = torch.randn(1, D, generator=g).expand(N, D) * (1 + 1e-6 * torch.randn(N, D, generator=g))
    else:  # per-row magnitudes over 30 decades
        keys = torch.randn(N, D, generator=g) * torch.logspace(-15, 15, N)[torch.randperm(N, generator=g)][:, None]
    keys = keys.to(dtype)
    scale = (torch.randn(N, generator=g) if scaled else None)
    both(q, keys, k, largest, scale)


def test_screen_fallback_blocks_and_special_values():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(9, 64, generator=g)
    keys = torch.randn(4000, 64, generator=g)
    keys[700, 3] = float("nan")  # block 1: fp32 path
    keys[1500, 0] = float("inf")  # block 2
    keys[2600] *= 1e19  # block 5: huge (bf16 products could overflow)
    keys[3100:3200] *= 1e-40  # subnormal magnitudes
    both(q, keys, 12)
    both(q, keys, 12, largest=False)
    q2 = q.clone()
    q2[3] = 0.0  # a zero query: every score is 0, ties by index
    q2[4] *= 1e-39
    both(q2, keys, 12)
    s, i = both(q2, keys[:512], 7)
    assert i[3].tolist() == list(range(7)) and bool((s[3] == 0).all())


def test_screen_with_running_topk_streams_like_one_call():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(25, 48, generator=g)
    keys = torch.randn(6000, 48, generator=g)
    whole = both(q, keys, 10)
    s = i = None
    for j in range(0, 6000, 1700):
        s, i = both(q, keys[j:j + 1700], 10, scores_in=s, idx_in=i, base=j)
    assert torch.equal(i, whole[1]) and torch.equal(s, whole[0])


@pytest.mark.parametrize("D", [16, 64, 255])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_worst_case_rounding_cannot_hide_the_best_key(D, dtype):
    """Every query and key element just below a bf16 rounding midpoint (t = 1 + 2^-8 - 2^-20 rounds to 1):
    the approximate score of the best key is low by ~2^-7 relative, the worst case the bound must cover.
    Key 0 (offered first, exactly) scores just below key 1; a margin under 2 u |q| |x| (u = 2^-8) skips key 1."""
    t = 1 + 2.0 ** -8 - 2.0 ** -20 if dtype == torch.float32 else 1 + 2.0 ** -8 - 2.0 ** -11
    q = torch.full((1, D), t)
    keys = torch.full((40, D), t)
    keys[0] -= 2.0 ** -18 if dtype == torch.float32 else 2.0 ** -10  # one step below, in the key dtype
    keys[2:] = 0.25  # exact in bf16, far below
    keys = keys.to(dtype)
    s, i = both(q, keys, 1)
    assert i.tolist() == [[1]]

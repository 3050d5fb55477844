"""gradkit._rules: the one counting rule (golden's percent_to_k and scope's sparsity_to_nnz) and the one
symmetry rule (OBS Hessians and the search preconditioner)."""
import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradkit.golden as G
from gradkit._rules import ceil_count, check_symmetric, floor_count
from gradkit.index import Precondition
from gradkit.obs.metrics import _check_symmetric as obs_check_symmetric
from gradkit.scope import BlockSpec, ScopeSpec


@pytest.mark.parametrize("n,x,d,want", [(10000, 0.57, 100, 57), (100, 0.29, 1, 29), (3, 1 / 3, 1, 1),
                                        (3, 2 / 3, 1, 2), (100, 0.295, 1, 29), (7, 0.5, 1, 3), (0, 0.5, 1, 0),
                                        (10, 0.0, 1, 0), (10, 1.0, 1, 10), (3, 1e-9, 100, 0)])
def test_floor_count_cases(n, x, d, want):
    assert floor_count(n, x, d) == want


def test_floor_count_still_floors_large_counts():
    # a fixed relative tolerance (1e-9 of the product, scope's old rule) rounded instead of flooring here:
    # 0.3 of 7e9 + 3 is 2,100,000,000.9, which must give 2,100,000,000
    n = 7_000_000_003
    assert floor_count(n, 0.3) == 2_100_000_000
    assert floor_count(n, 30.0, 100) == 2_100_000_000
    big = ScopeSpec(BlockSpec(torch.zeros(1, 1), (1, 1)), (1, -1))
    big.numblk_per_scope = lambda: n  # the rule, not the tensor, is under test
    assert big.sparsity_to_nnz(0.3) == n - 2_100_000_000


@given(st.integers(0, 10 ** 7), st.integers(0, 10 ** 4))
def test_floor_count_is_the_decimal_floor(n, p):
    # x written with at most 4 decimals: the answer is the floor of the exact decimal product
    x = p / 10 ** 4
    assert floor_count(n, x) == math.floor(n * Fraction(p, 10 ** 4))
    assert floor_count(n, p / 100, 100) == math.floor(n * Fraction(p, 10 ** 4))


@given(st.integers(1, 10 ** 6), st.integers(1, 10 ** 4))
def test_percent_and_sparsity_read_the_same_decimal(n, p):
    pct = p / 100  # percent in (0, 100]
    s = ScopeSpec(BlockSpec(torch.zeros(1, 1), (1, 1)), (1, -1))
    s.numblk_per_scope = lambda: n
    kept_by_golden = G.percent_to_k(n, pct)
    pruned_by_scope = n - s.sparsity_to_nnz(pct / 100)
    # pct / 100 is a second rounding of the same decimal: both readings give the decimal's exact product, which
    # scope floors (blocks pruned) and golden ceils (entries kept: GoldenParams' count, session 39)
    exact = n * Fraction(p, 10 ** 4)
    assert pruned_by_scope == math.floor(exact)
    assert kept_by_golden == max(1, min(n, math.ceil(exact)))


def test_sparsity_nan_refused():
    s = ScopeSpec(BlockSpec(torch.zeros(1, 4), (1, 1)), (1, -1))
    with pytest.raises(ValueError, match="^sparsity: "):
        s.sparsity_to_nnz(float("nan"))


def _gram(k, dtype, seed=0):
    a = torch.randn(4 * k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (a.T @ a).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetry_rule_shared_by_obs_and_precondition(dtype):
    h = _gram(48, dtype)
    # round-off asymmetry (an fp32 Gram from BLAS is rarely bitwise symmetric) passes both
    noisy = h + 1e-5 * float(h.abs().max()) * torch.triu(torch.ones_like(h), 1)
    check_symmetric(noisy, "h")
    obs_check_symmetric(noisy, "h")
    Precondition(noisy).blocks({"m": 48}, -1.0)  # used, not refused
    # a clearly asymmetric matrix is refused by both, naming the argument
    bad = h.clone()
    bad[0, 5] += 0.01 * float(h.abs().max())
    with pytest.raises(ValueError, match="^h: is not symmetric"):
        check_symmetric(bad, "h")
    with pytest.raises(ValueError, match="^h: is not symmetric.*X\\^T X"):
        obs_check_symmetric(bad, "h")
    with pytest.raises(ValueError, match="^precondition: .*not symmetric"):
        Precondition(bad).blocks({"m": 48}, -1.0)


def test_symmetry_rule_nan_gap_refused():
    h = torch.eye(4)
    h[0, 1] = float("nan")  # callers check finiteness first; the rule itself must not pass a NaN gap
    with pytest.raises(ValueError, match="^h: is not symmetric"):
        check_symmetric(h, "h")


@pytest.mark.parametrize("n", [1, 255, 256, 257, 600])
@pytest.mark.parametrize("upper", [True, False])
def test_symmetry_rule_tiles_see_every_entry(n, upper):
    """The rule compares 256 x 256 tiles, each upper one with its mirror: one asymmetric entry anywhere (either
    triangle, diagonal tiles, the ragged last tile) is refused, and the reported gap is max |H - H^T| itself."""
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        h = _gram(n, torch.float32, seed=n)
        i, j = (int(v) for v in torch.randint(n, (2,), generator=g))
        if i == j:
            j = (i + 1) % n
        if n > 1:
            (i, j) = (min(i, j), max(i, j)) if upper else (max(i, j), min(i, j))
            h[i, j] += 0.05 * float(h.abs().max())
            want = float((h - h.T).abs().max())
            with pytest.raises(ValueError, match=r"^h: is not symmetric \(max \|H - H\^T\| = " + re.escape(f"{want:.3g},")):
                check_symmetric(h, "h")
        else:
            check_symmetric(h, "h")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_matches_isfinite(dtype):
    """all_finite (one aminmax pass) against torch.isfinite(t).all(): NaN, +-inf anywhere, empty, ints."""
    from gradkit._rules import all_finite

    g = torch.Generator().manual_seed(0)
    t = torch.randn(37, 53, generator=g).to(dtype)
    assert all_finite(t) and all_finite(t[:, ::2]) and all_finite(t[:0])
    for v in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (36, 52), (17, 3)):
            b = t.clone()
            b[where] = v
            assert not all_finite(b) and not all_finite(b.T) and bool(torch.isfinite(b).all()) is False
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(3, dtype=torch.bool))
    c = torch.complex(torch.ones(3), torch.tensor([0.0, float("inf"), 1.0]))
    assert not all_finite(c) and all_finite(c[:1])


@pytest.mark.parametrize("n,x,d,want", [(1000, 1.1, 100, 11), (10000, 0.57, 100, 57), (7, 50, 100, 4), (768, 5, 100, 39),
                                        (3, 1e-9, 100, 1), (10, 0.0, 100, 0), (2_000_000_001, 0.3, 1, 600_000_001)])
def test_ceil_count_cases(n, x, d, want):
    assert ceil_count(n, x, d) == want


@given(st.integers(1, 10 ** 6), st.integers(0, 10 ** 4))
def test_ceil_count_is_the_decimal_ceil(n, p):
    x = p / 10 ** 4
    assert ceil_count(n, x) == math.ceil(n * Fraction(p, 10 ** 4))
    assert ceil_count(n, p / 100, 100) == math.ceil(n * Fraction(p, 10 ** 4))

"""Regression tests from an audit of the search kernels (score_topk): inputs on which a backend gave a
silently wrong answer before its fix.

* CPU, ``largest=False`` with queries whose rows are not contiguous (a transposed view): the kernel
  negated the queries with ``neg()``, which keeps the input's strides, then read the result as
  row-major (every packed / direct scoring level; BLAS blocks were unaffected).
* CPU bf16 screen with a huge or infinite ``key_scale``: the screen's bound ``a * sc + margin`` became
  ``-inf + inf = NaN`` when the approximate score had the wrong sign, and the key was skipped although
  its exact scaled score was the best.
* ``base`` such that ``base + N - 1`` passes int64's maximum: the row numbers wrapped to negative
  values (read as empty slots by the next merge); now refused, naming ``base``.
* CUDA C++ host code (run under the emulator): scores_in / idx_in of different widths, or of the
  wrong dtypes, were merged without an error when the op was called through the dispatcher.
"""
import re

import pytest
import torch

from conftest import CPU_ISAS, env_set
from gradkit import _ext, ops
from gradkit.kernels.reference import search as ref

pytestmark = pytest.mark.skipif(not _ext.has_op("score_topk"), reason="compiled extension not built")

# every CPU scoring level this machine has (GRADKIT_SEARCH_ISA), BLAS blocks last
SEARCH_ISAS = [isa for isa in CPU_ISAS if isa != "portable"] + ["blas"]


def _same(got, want):
    return torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("isa", SEARCH_ISAS)
@pytest.mark.parametrize("largest", [True, False])
def test_non_contiguous_queries_every_level(isa, largest):
    """Transposed, column-strided and expanded query views give the reference's result (integer data:
    exact products, ties decided by index), with and without a scale and a running top-k. Q = 3
    takes the direct (unpacked) path, Q = 9 and 20 the packed micro-kernels; D = 33 spans SIMD tails."""
    g = torch.Generator().manual_seed(11)
    for Q, D in [(3, 7), (9, 20), (20, 33)]:
        keys = torch.randint(-3, 4, (700, D), generator=g).float()
        scale = torch.randint(-2, 3, (700,), generator=g).float()
        s_in = torch.randint(-9, 10, (Q, 4), generator=g).float()
        i_in = torch.randint(-1, 900, (Q, 4), generator=g)
        views = {
            "transposed": torch.randint(-3, 4, (D, Q), generator=g).float().t(),
            "column stride": torch.randint(-3, 4, (Q, 2 * D), generator=g).float()[:, ::2],
            "expanded": torch.randint(-3, 4, (1, D), generator=g).float().expand(Q, D),
        }
        for name, q in views.items():
            with env_set("GRADKIT_SEARCH_ISA", isa):
                got = ops.score_topk(q, keys, 6, largest=largest)
                got2 = ops.score_topk(q, keys, 6, largest=largest, key_scale=scale, scores_in=s_in, idx_in=i_in,
                                      base=3)
            assert _same(got, ref.score_topk(q.contiguous(), keys, 6, largest, None, None, None, 0)), (name, Q)
            assert _same(got2, ref.score_topk(q.contiguous(), keys, 6, largest, scale, s_in, i_in, 3)), (name, Q)


@pytest.mark.parametrize("exact", ["0", "1"])
def test_huge_and_infinite_key_scale_keeps_the_best_key(exact):
    """A key whose bf16-rounded score has the wrong sign (a = -1.5, exact +0.42: 8 + 8 entries near 100 that
    cancel) times a scale of 3e38 overflows a * sc to -inf while the margin overflows to +inf; with sc = inf a
    bf16 score of exactly 0 (1 + 2^-9 rounds to 1) gives 0 * inf = NaN. The key's exact scaled score is the
    largest (1.26e38, inf), so it must come first, with the screen (GRADKIT_SEARCH_EXACT=0, on CPUs with
    AVX512-BF16) as without it. Also for smallest (negative scales) and a key past the heap's first fill."""
    D, N = 16, 40
    q = torch.ones(1, D)
    keys = torch.zeros(N, D)
    keys[:, 0] = torch.arange(N).float() * 0.01  # scores 0 .. 0.39, scale 1
    keys[30] = torch.tensor([100.24] * 8 + [-100.0] * 7 + [-101.5])
    keys2 = keys.clone()
    keys2[30] = torch.tensor([1 + 2 ** -9, -1.0] + [0.0] * (D - 2))
    with env_set("GRADKIT_SEARCH_EXACT", exact):
        for kv, big in ((keys, 3e38), (keys2, float("inf"))):
            for largest in (True, False):
                sc = torch.ones(N) if largest else -torch.ones(N)
                sc[30] = big if largest else -big
                got = ops.score_topk(q, kv, 3, largest=largest, key_scale=sc)
                want = ref.score_topk(q, kv, 3, largest, sc, None, None, 0)
                assert got[1][0, 0].item() == 30, (big, largest, got)
                assert torch.equal(got[1], want[1]), (big, largest, got, want)  # scores: fp32 rounding
                torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=0)  # 0.42 out of sums of 800
        # many queries and blocks: inf / huge scales spread over 1500 keys, against the exact path's bits
        g = torch.Generator().manual_seed(29)
        qq = torch.randn(17, 100, generator=g) * 100
        kk = torch.randn(1500, 100, generator=g)
        sc = torch.exp(torch.randn(1500, generator=g) * 40)  # ~20 inf, many above 1e30
        for largest in (True, False):
            got = ops.score_topk(qq, kk, 20, largest=largest, key_scale=sc)
            with env_set("GRADKIT_SEARCH_EXACT", "1"):
                want = ops.score_topk(qq, kk, 20, largest=largest, key_scale=sc)
            assert _same(got, want), largest


def test_base_overflowing_int64_is_refused():
    q, keys = torch.ones(2, 3), torch.ones(5, 3)
    top = (1 << 63) - 1
    for base in (top - 3, top, 1 << 63):
        with pytest.raises(ValueError, match=r"^base: "):
            ops.score_topk(q, keys, 5, base=base)
    with pytest.raises(ValueError, match=r"^base: "):  # the kernel's own check (dispatcher calls)
        torch.ops.gradkit.score_topk(q, keys, 5, True, None, None, None, top - 3)
    # the last row number int64 holds is fine, and so is any base with no keys
    s, i = ops.score_topk(q, keys, 5, base=top - 4)
    assert i[0].tolist() == list(range(top - 4, top + 1))
    assert ops.score_topk(q, keys[:1], 2, base=top)[1][0].tolist() == [top, -1]
    assert ops.score_topk(q, keys[:0], 2, base=top)[1][0].tolist() == [-1, -1]


_BAD_RUNNING = [
    ("idx_in", torch.zeros(2, 5), torch.arange(10, 16).view(2, 3)),  # idx_in narrower: was merged silently
    ("idx_in", torch.zeros(2, 3), torch.arange(10, 20).view(2, 5)),
    ("idx_in", torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int32)),
    ("scores_in", torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.int64)),
    ("scores_in", torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.int64)),
]


@pytest.mark.cuda_emu
@pytest.mark.parametrize("name, s_in, i_in", _BAD_RUNNING)
def test_cuda_host_checks_running_topk(name, s_in, i_in):
    """The CUDA C++ op (under the CPU emulator; its build is shared with test_cuda_emulated) refuses a running
    top-k that the CPU kernel refuses, naming the argument, instead of merging mismatched columns."""
    from test_cuda_emulated import emu

    E = emu("search")
    q, keys = torch.ones(2, 3), torch.ones(5, 3)
    for f in (E.score_topk, torch.ops.gradkit.score_topk):
        with pytest.raises((ValueError, TypeError), match=rf"^{re.escape(name)}: "):
            f(q, keys, 4, True, None, s_in, i_in, 0)
    with pytest.raises(ValueError, match=r"^base: "):
        E.score_topk(q, keys, 4, True, None, None, None, (1 << 63) - 3)


# ---- session 32: identical keys tie on every level, whatever the blocking --------------------------------------
@pytest.mark.parametrize("isa", SEARCH_ISAS)
@pytest.mark.parametrize("Q", [1, 2, 3, 20])
def test_identical_keys_tie_whatever_the_blocking(isa, Q):
    """On the BLAS blocks (CPUs without AVX2, and non-x86 ones) a key's score depended on the product's shape (MKL:
    a one-key block or one query goes through a GEMV, whose sums depend on the key's position mod 4; short query
    tiles at large D through other kernels), so copies of one key scored a few ulps apart and the top-k changed
    with the blocking and thread count (1000 keys in blocks of 513: key 1538 outranked key 3). BLAS scores now
    only screen and candidates are rescored exactly. Real data (non-integer: the sums' order matters). The
    answer must not depend on the blocking or the level, and among equal scores the lowest row wins."""
    g = torch.Generator().manual_seed(5)
    for D in (16, 37, 256):
        keys = torch.randn(5, D, generator=g).repeat(200, 1)  # key j == key j + 5 == ...
        q = torch.randn(Q, D, generator=g)
        results = []
        with env_set("GRADKIT_SEARCH_ISA", isa):
            for br in (1, 2, 3, 5, 7, 64, 511, 513, 1000):
                run_s = run_i = None
                for b0 in range(0, keys.shape[0], br):
                    run_s, run_i = ops.score_topk(q, keys[b0:b0 + br], 3, scores_in=run_s, idx_in=run_i, base=b0)
                results.append((br, run_s, run_i))
        _, s0, i0 = results[0]
        for br, s, i in results[1:]:
            assert torch.equal(s, s0) and torch.equal(i, i0), (isa, Q, D, br)
        # the BLAS blocks rescore their candidates as the packed kernels' FMA chain: every level, the same bits
        for other in SEARCH_ISAS:
            with env_set("GRADKIT_SEARCH_ISA", other):
                s1, i1 = ops.score_topk(q, keys, 3)
            assert torch.equal(s1, s0) and torch.equal(i1, i0), (isa, other, Q, D)
        best = (q @ keys[:5].T).argmax(1)  # the top 3 are the best key's first three copies
        assert torch.equal(i0, best[:, None] + torch.tensor([0, 5, 10])), (isa, Q, D)
        assert torch.equal(s0[:, 0], s0[:, 1]) and torch.equal(s0[:, 1], s0[:, 2])


def test_blas_blocks_equal_the_best_level_on_extreme_scales():
    """The BLAS blocks' error bound used float32 key norms: the squares of a key of 1e-30 underflowed, its norm
    was 0 and its bound nothing, so of two identical keys the later one could be kept (its BLAS score a few ulps
    higher). Random cases with keys and queries from 1e-30 to 1e15, NaN / Inf keys, scales with inf and 0, repeated
    keys, every key dtype: the BLAS blocks give the best level's result, bit for bit (NaN scores compared as NaN)."""
    import random

    rnd = random.Random(0)
    g = torch.Generator().manual_seed(0)
    best = SEARCH_ISAS[0]
    for _ in range(80):
        Q, N, D = rnd.choice([1, 2, 5, 17]), rnd.choice([2, 3, 50, 600]), rnd.choice([1, 7, 33, 256])
        k = rnd.choice([1, 3, 10])
        keys = torch.randn(N, D, generator=g) * rnd.choice([1e-30, 1.0, 1e15])
        if rnd.random() < 0.2:
            keys[rnd.randrange(N)] = float("nan")
        if rnd.random() < 0.2:
            keys[rnd.randrange(N), 0] = float("inf")
        if rnd.random() < 0.4:
            keys = keys[: max(1, N // 2)].repeat(2, 1)
        keys = keys.to(rnd.choice([torch.float32, torch.float16, torch.bfloat16]))
        q = torch.randn(Q, D, generator=g) * rnd.choice([1e-20, 1.0, 1e10])
        sc = None
        if rnd.random() < 0.4:
            sc = torch.rand(keys.shape[0], generator=g) * rnd.choice([1.0, 1e30])
            sc[0] = rnd.choice([float("inf"), 0.0, 1.0])
        largest = rnd.random() < 0.7
        with env_set("GRADKIT_SEARCH_ISA", "blas"):
            got = ops.score_topk(q, keys, k, largest=largest, key_scale=sc)
        with env_set("GRADKIT_SEARCH_ISA", best):
            want = ops.score_topk(q, keys, k, largest=largest, key_scale=sc)
        assert torch.equal(got[1], want[1]), (Q, N, D, k, keys.dtype, largest, sc is not None)
        assert torch.equal(got[0].nan_to_num(7.0), want[0].nan_to_num(7.0))

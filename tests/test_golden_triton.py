"""The Triton golden kernels against the plain-PyTorch reference (the oracle).

Runs on CPU tensors through the Triton interpreter. Gradients are mostly integer-valued (many ties
in |g|, +-0.0, NaN, +-inf) so the tie rule (lowest flat position first) and NaN handling decide
the result, plus random-normal data so every digit pass of the radix select matters. Every result
is compared exactly: the packed bits, the counts and the returned popcount, over a running AND of
several updates. Numels are odd or not multiples of 8 so the padding bits of the last byte matter.
Each selection runs with the default blocks and with tiny blocks (many programs, ties spread over
several blocks, multi-block histograms).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from conftest import use_backend  # noqa: E402
from gradkit import ops  # noqa: E402
from gradkit.kernels.reference import golden as R  # noqa: E402
from gradkit.kernels.triton import golden as T  # noqa: E402

# The interpreter evaluates with numpy, which warns on the NaN / inf these tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# The interpreter is slow: a quarter of the profile's examples (ci: 10, deep: 150).
_EX = max(8, settings.default.max_examples // 4)
MORE = settings(deadline=None, max_examples=_EX)

PATHS = {"default": {}, "tiny": {"select": 16, "hist_iters": 2, "bitmask": 4}}


@contextlib.contextmanager
def path(kind):
    saved = dict(T.BLOCKS)
    T.BLOCKS.update(PATHS[kind])
    try:
        yield
    finally:
        T.BLOCKS.clear()
        T.BLOCKS.update(saved)


# --------------------------------------------------------------------------- inputs


def grad(n, dtype, seed, kind, nan=0.1, inf=0.03, zero=0.15, spread=3):
    """n values: "ints" in [-spread, spread] (ties), "randn" (distinct), or "mixed"; some +-0.0, NaN, +-inf."""
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(-spread, spread + 1, (n,), generator=g).to(torch.float64)
    rnd = torch.randn(n, generator=g, dtype=torch.float64) * 4
    v = {"ints": ints, "randn": rnd, "mixed": torch.where(torch.rand(n, generator=g) < 0.5, ints, rnd)}[kind]
    r = torch.rand(n, generator=g)
    v = torch.where(r < zero, torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0), v)
    v = torch.where((r >= zero) & (r < zero + nan), float("nan"), v)
    v = torch.where((r >= zero + nan) & (r < zero + nan + inf), torch.where(v < 0, -float("inf"), float("inf")), v)
    return v.to(dtype)


def random_bits(n, seed):
    """A valid packed bitmask over n elements (padding bits 0)."""
    g = torch.Generator().manual_seed(seed)
    return R.pack_bitmask(torch.rand(n, generator=g) < 0.6)


def draw_k(data, n):
    return data.draw(st.one_of(st.sampled_from(sorted({0, min(1, n), n // 3, max(n - 1, 0), n})), st.integers(0, n)))


def update_both(g, bits, counts, k, first):
    """One update by the kernel and by the reference on separate copies; asserts they agree exactly."""
    b1, b2 = bits.clone(), bits.clone()
    c1, c2 = (None, None) if counts is None else (counts.clone(), counts.clone())
    p1 = T.golden_topk_and_(g, b1, c1, k, first)
    p2 = R.golden_topk_and_(g, b2, c2, k, first)
    assert torch.equal(b1, b2), (k, first, b1, b2)
    assert c1 is None or torch.equal(c1, c2), (k, first, c1, c2)
    assert p1.dtype == torch.int64 and p1.dim() == 0 and p1.device == g.device
    assert int(p1) == int(p2), (k, first, int(p1), int(p2))
    return b1, c1


# --------------------------------------------------------------------------- golden_topk_and_


@MORE
@given(dtype=st.sampled_from(FLOATS), n=st.integers(1, 90), data=st.data(), seed=st.integers(0, 2**31),
       kind=st.sampled_from(["ints", "ints", "randn", "mixed"]), nan=st.sampled_from([0.0, 0.1, 0.6]),
       with_counts=st.booleans(), path_kind=st.sampled_from(["default", "tiny"]))
def test_golden_topk_and_running(dtype, n, data, seed, kind, nan, with_counts, path_kind):
    """A golden run: first=True, then first=False updates with new gradients (running AND, counts)."""
    shape = data.draw(st.sampled_from([(n,), (1, n), (n, 1)]))
    bits = random_bits(n, seed)  # overwritten by the first update
    counts = torch.randint(0, 4, shape, dtype=torch.int32) if with_counts else None
    with path(path_kind):
        for step in range(data.draw(st.integers(1, 3))):
            g = grad(n, dtype, seed + step, kind, nan=nan).reshape(shape)
            bits, counts = update_both(g, bits, counts, draw_k(data, n), step == 0)


@MORE
@given(dtype=st.sampled_from(FLOATS), n=st.integers(0, 70), data=st.data(), seed=st.integers(0, 2**31),
       first=st.booleans(), with_counts=st.booleans(), path_kind=st.sampled_from(["default", "tiny"]))
def test_golden_topk_and_any_bits(dtype, n, data, seed, first, with_counts, path_kind):
    """One update of arbitrary existing bits, heavy ties (|g| in {0, 1, 2})."""
    g = grad(n, dtype, seed, "ints", nan=0.1, inf=0.0, spread=2)
    counts = torch.randint(0, 4, (n,), dtype=torch.int32) if with_counts else None
    with path(path_kind):
        update_both(g, random_bits(n, seed + 1), counts, draw_k(data, n), first)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("path_kind", ["default", "tiny"])
def test_special_inputs_every_k(dtype, path_kind):
    n = 37
    cases = {
        "all_nan": torch.full((n,), float("nan")),
        "all_equal": torch.full((n,), -1.5),
        "signed_zeros": torch.tensor([0.0, -0.0] * 18 + [0.0]),
        "inf_and_nan": torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0] * 9 + [-float("inf")]),
        "tiny_and_huge": torch.tensor([1e-30, -3e30, 5e-8, 7.0] * 9 + [1e-30]),
    }
    with path(path_kind):
        for g in cases.values():
            g = g.to(dtype)
            for k in (0, 1, 2, 5, 18, 35, 36, 37):
                update_both(g, random_bits(n, k), torch.zeros(n, dtype=torch.int32), k, k % 2 == 0)


def test_ties_take_lowest_positions_first():
    g = torch.tensor([1.0, -2.0, 2.0, float("nan"), -2.0, 2.0, 0.5, 2.0, -2.0])  # four |g| == 2 ties
    bits = torch.zeros(2, dtype=torch.uint8)
    counts = torch.zeros(9, dtype=torch.int32)
    with path("tiny"):  # 16-element blocks: one block, then the same over bytes
        assert int(T.golden_topk_and_(g, bits, counts, 3, True)) == 3
    assert R.unpack_bitmask(bits, 9).nonzero().flatten().tolist() == [1, 2, 4]
    assert counts.tolist() == [0, 1, 1, 0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("kind,n,ks", [("default", 5003, (1, 714, 715, 1000, 5002)),
                                       ("tiny", 400, (1, 56, 57, 60, 300))])
def test_ties_across_blocks(kind, n, ks):
    """Ties at the threshold spread over many blocks: |g| == 6 at every 7th position, then 5, ..."""
    g = (torch.arange(n) % 7).to(torch.float32)
    with path(kind):
        for k in ks:
            update_both(g, torch.zeros((n + 7) // 8, dtype=torch.uint8), None, k, True)


def test_empty_gradient():
    g = torch.empty(0, 3)
    bits = torch.empty(0, dtype=torch.uint8)
    p = T.golden_topk_and_(g, bits, torch.empty(0, 3, dtype=torch.int32), 0, False)
    assert p.dtype == torch.int64 and p.dim() == 0 and int(p) == 0


def test_through_ops_triton_backend():
    """gradkit.ops dispatches to these launchers with the schema's positional arguments."""
    g = grad(29, torch.float32, 3, "ints")
    bits = random_bits(29, 4)
    counts = torch.zeros(29, dtype=torch.int32)
    b2, c2 = bits.clone(), counts.clone()
    other = random_bits(29, 5)
    with use_backend("triton"):
        p = ops.golden_topk_and_(g, bits, 11, counts=counts, first=False)
        out = ops.bitmask_binary([bits], [other], "andnot")
        nots = ops.bitmask_not([bits], [29])
        cnt = ops.bitmask_count([bits, other])
    p2 = R.golden_topk_and_(g, b2, c2, 11, False)
    assert torch.equal(bits, b2) and torch.equal(counts, c2) and int(p) == int(p2)
    assert torch.equal(out[0], R.bitmask_binary([b2], [other], 3)[0])
    assert torch.equal(nots[0], R.bitmask_not([b2], [29])[0])
    assert torch.equal(cnt, R.bitmask_count([b2, other]))


# --------------------------------------------------------------------------- bitmask algebra


@st.composite
def mask_lists(draw, max_len=4):
    """(numels, a, b): up to max_len valid packed bitmasks (padding 0), numels 0 / odd / multiples of 8."""
    numel = draw(st.lists(st.one_of(st.integers(0, 150), st.sampled_from([0, 1, 8, 64, 129])), max_size=max_len))
    seed = draw(st.integers(0, 2**31))
    a = [random_bits(n, seed + 2 * i) for i, n in enumerate(numel)]
    b = [random_bits(n, seed + 2 * i + 1) for i, n in enumerate(numel)]
    return numel, a, b


@MORE
@given(masks=mask_lists(), op=st.integers(0, 3), path_kind=st.sampled_from(["default", "tiny"]))
def test_bitmask_binary(masks, op, path_kind):
    _, a, b = masks
    with path(path_kind):
        got = T.bitmask_binary(a, b, op)
    expect = R.bitmask_binary(a, b, op)
    assert len(got) == len(expect)
    for x, y, src in zip(got, expect, a):
        assert x.dtype == torch.uint8 and (x.numel() == 0 or x.data_ptr() != src.data_ptr())
        assert torch.equal(x, y), (op, x, y)


@MORE
@given(masks=mask_lists(), path_kind=st.sampled_from(["default", "tiny"]))
def test_bitmask_not(masks, path_kind):
    numel, a, _ = masks
    with path(path_kind):
        got = T.bitmask_not(a, numel)
    for x, y, n in zip(got, R.bitmask_not(a, numel), numel):
        assert torch.equal(x, y), (n, x, y)


@MORE
@given(masks=mask_lists(max_len=5), path_kind=st.sampled_from(["default", "tiny"]))
def test_bitmask_count(masks, path_kind):
    _, a, b = masks
    full = [torch.randint(0, 256, (x.numel(),), dtype=torch.uint8) for x in b]  # every bit pattern, padding too
    with path(path_kind):
        for lst in (a, full):
            got = T.bitmask_count(lst)
            assert got.dtype == torch.int64 and got.shape == (len(lst),)
            assert torch.equal(got, R.bitmask_count(lst) if lst else torch.zeros(0, dtype=torch.int64))


def test_bitmask_not_complements_exactly():
    """~a over numel bits: popcount(a) + popcount(~a) == numel, and ~~a == a."""
    numel = [1, 7, 8, 9, 63, 64, 65, 200]
    a = [random_bits(n, n) for n in numel]
    with path("tiny"):
        na = T.bitmask_not(a, numel)
        assert (T.bitmask_count(a) + T.bitmask_count(na)).tolist() == numel
        assert all(torch.equal(x, y) for x, y in zip(T.bitmask_not(na, numel), a))

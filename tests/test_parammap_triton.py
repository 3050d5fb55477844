"""The Triton param-map kernels against the plain-PyTorch reference (the oracle).

Runs on CPU tensors through the Triton interpreter. Every function is compared on
hypothesis-drawn inputs; exact where the math is exact (gather, index conversions,
bit packing, top-k positions), 1-ulp tolerances for scatter with a scale.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from gradkit.kernels.reference import parammap as R  # noqa: E402
from gradkit.kernels.triton import parammap as T  # noqa: E402

# The interpreter evaluates with numpy, which warns on the inf/overflow values these tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INDEX = [torch.int32, torch.int64]

# Values that stress conversions: ties for bf16/f16 rounding, float64 values whose
# direct and via-float32 roundings differ, overflow/underflow for the narrow types.
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 1 + 2**-8, -(1 + 3 * 2**-8), 1 + 2**-11 + 2**-40, 1 + 2**-9 + 2**-30,
           65504.0, 70000.0, 1e-6, 1e-40, 3.0e38, 1e300, float("inf"), float("-inf")]

# Tiny blocks make the multi-block paths (work tables, per-block counts, cross-block ties) run on small inputs.
TINY = {"gather": 16, "scatter": 8, "zero": 8, "mask": 32, "pack": 4, "topk": 32}


@contextlib.contextmanager
def blocks(kind):
    saved = dict(T.BLOCKS)
    if kind == "tiny":
        T.BLOCKS.update(TINY)
    try:
        yield
    finally:
        T.BLOCKS.clear()
        T.BLOCKS.update(saved)


def values(n, seed, dtype, special=0.2):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, dtype=torch.float64, generator=g) * 10.0 ** float(torch.randint(-3, 4, (1,), generator=g))
    pick = torch.rand(n, generator=g) < special
    sp = torch.tensor(SPECIAL, dtype=torch.float64)
    v = torch.where(pick, sp[torch.randint(0, len(SPECIAL), (n,), generator=g)], v)
    return v.to(dtype)


@st.composite
def shapes(draw):
    if draw(st.booleans()):
        return (draw(st.integers(0, 300)),)
    return tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))


def make_tensor(shape, dtype, seed, layout):
    """A tensor of `shape`; layout 1 = transposed view, 2 = strided slice of a bigger base."""
    n = 1
    for s in shape:
        n *= s
    if layout == 1 and len(shape) >= 2:
        base = values(n, seed, dtype).reshape(shape[:-2] + (shape[-1], shape[-2]))
        return base.transpose(-1, -2)
    if layout == 2 and len(shape) >= 1:
        return values(2 * n + 1, seed, dtype)[1::2].view(shape)
    return values(n, seed, dtype).reshape(shape)


def index_for(numel, kind, seed, unique):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if numel == 0:
        return torch.empty(0, dtype=kind)
    if unique:
        c = int(torch.randint(0, numel + 1, (1,), generator=g))
        return torch.randperm(numel, generator=g)[:c].to(kind)
    c = int(torch.randint(0, 41, (1,), generator=g))
    return torch.randint(0, numel, (c,), generator=g).to(kind)


@st.composite
def segments(draw, unique=False):
    nseg = draw(st.integers(0, 4))
    src, index = [], []
    for _ in range(nseg):
        shape = draw(shapes())
        dtype = draw(st.sampled_from(FLOATS))
        t = make_tensor(shape, dtype, draw(st.integers(0, 2**31)), draw(st.sampled_from([0, 0, 1, 2])))
        src.append(t)
        index.append(index_for(t.numel(), draw(st.sampled_from([None, torch.int32, torch.int64])),
                               draw(st.integers(0, 2**31)), unique))
    return src, index


def tols(dtype):
    fi = torch.finfo(dtype)
    # ~1 ulp; atol ~ the smallest subnormal; inf * 0 and inf - inf give NaN on both sides
    return dict(rtol=fi.eps, atol=fi.tiny * fi.eps, equal_nan=True)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def assert_same(a, b):
    """Same dtype and shape, and bit-identical (so -0.0 != +0.0); NaN matches NaN of any payload."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype in _BITS:
        assert torch.equal(a.isnan(), b.isnan()), (a, b)
        a, b = (torch.where(t.isnan(), 0, t).contiguous().view(_BITS[t.dtype]) for t in (a, b))
    assert torch.equal(a, b), (a, b)


# --------------------------------------------------------------------------- gather / scatter


@settings(deadline=None)
@given(segs=segments(), out_dtype=st.sampled_from([None] + FLOATS), blk=st.sampled_from(["default", "tiny"]))
def test_gather_segments(segs, out_dtype, blk):
    src, index = segs
    with blocks(blk):
        got = T.gather_segments(src, index, out_dtype)
    assert_same(got, R.gather_segments(src, index, out_dtype))


@settings(deadline=None)
@given(segs=segments(), out_dtype=st.sampled_from(FLOATS), accumulate=st.booleans(), seed=st.integers(0, 2**31),
       blk=st.sampled_from(["default", "tiny"]))
def test_gather_segments_out(segs, out_dtype, accumulate, seed, blk):
    src, index = segs
    total = sum(s.numel() if i is None else i.numel() for s, i in zip(src, index))
    out = values(total, seed, out_dtype, special=0.0)
    expect = out.clone()
    R.gather_segments_out(src, index, expect, accumulate)
    with blocks(blk):
        assert T.gather_segments_out(src, index, out, accumulate) is None
    assert_same(out, expect)


SCALES = [1.0, 0.5, -2.0, 0.1, 1 / 3, 0.0, 1e-3, 12345.678]


@settings(deadline=None)
@given(segs=segments(unique=True), flat_dtype=st.sampled_from(FLOATS), scale=st.sampled_from(SCALES),
       seed=st.integers(0, 2**31), blk=st.sampled_from(["default", "tiny"]))
def test_scatter_segments(segs, flat_dtype, scale, seed, blk):
    dst, index = segs
    numel = [d.numel() for d in dst]
    total = sum(n if i is None else i.numel() for n, i in zip(numel, index))
    flat = values(total, seed, flat_dtype)
    with blocks(blk):
        got = T.scatter_segments(flat, index, numel, scale)
    expect = R.scatter_segments(flat, index, numel, scale)
    assert isinstance(got, list) and len(got) == len(expect)
    for g, e in zip(got, expect):
        assert g.dtype == e.dtype and g.shape == e.shape
        if scale == 1.0:
            assert_same(g, e)
        else:
            torch.testing.assert_close(g, e, **tols(flat_dtype))


def ref_scatter_(flat, index, dst, scale, accumulate):
    R.scatter_segments_(flat, index, dst, scale, accumulate)


@settings(deadline=None)
@given(segs=segments(unique=True), flat_dtype=st.sampled_from(FLOATS), scale=st.sampled_from(SCALES),
       accumulate=st.booleans(), seed=st.integers(0, 2**31), blk=st.sampled_from(["default", "tiny"]))
def test_scatter_segments_inplace(segs, flat_dtype, scale, accumulate, seed, blk):
    dst, index = segs
    total = sum(d.numel() if i is None else i.numel() for d, i in zip(dst, index))
    flat = values(total, seed, flat_dtype)
    # Keep the bases: writes through non-contiguous views must land in (and only in) the view.
    bases = [d._base if d._base is not None else d for d in dst]
    ref_bases = [b.clone() for b in bases]
    ref_dst = [rb.as_strided(d.shape, d.stride(), d.storage_offset() - b.storage_offset())
               for d, b, rb in zip(dst, bases, ref_bases)]
    ref_scatter_(flat, index, ref_dst, scale, accumulate)
    with blocks(blk):
        assert T.scatter_segments_(flat, index, dst, scale, accumulate) is None
    for b, rb in zip(bases, ref_bases):
        if scale == 1.0 and not accumulate:
            assert_same(b, rb)
        else:
            torch.testing.assert_close(b, rb, **tols(b.dtype))


SPECIALS_BOTH_SIGNS = torch.tensor(SPECIAL + [-v for v in SPECIAL], dtype=torch.float64)


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_value_conversions(dtype):
    """Every (source, destination) dtype pair on the rounding/overflow edge cases, deterministically."""
    sp = SPECIALS_BOTH_SIGNS
    n = sp.numel()
    rev = torch.arange(n - 1, -1, -1)
    # gather: four source dtypes into one `dtype` output, with and without accumulation
    src = [sp.to(dt) for dt in FLOATS]
    index = [None, rev, None, torch.arange(n, dtype=torch.int32)]
    assert_same(T.gather_segments(src, index, dtype), R.gather_segments(src, index, dtype))
    out, expect = torch.full((4 * n,), 0.75, dtype=dtype), torch.full((4 * n,), 0.75, dtype=dtype)
    T.gather_segments_out(src, index, out, True)
    R.gather_segments_out(src, index, expect, True)
    assert_same(out, expect)
    # scatter: `dtype` flat into four destination dtypes
    flat = torch.cat([sp, sp.flip(0), sp, sp]).to(dtype)
    for scale in (1.0, 0.1, -3.0):
        for accumulate in (False, True):
            dst = [torch.full((n,), 0.75, dtype=dt) for dt in FLOATS]
            ref = [d.clone() for d in dst]
            T.scatter_segments_(flat, index, dst, scale, accumulate)
            ref_scatter_(flat, index, ref, scale, accumulate)
            for d, r in zip(dst, ref):
                assert_same(d, r)
        got, want = T.scatter_segments(flat, index, [n] * 4, scale), R.scatter_segments(flat, index, [n] * 4, scale)
        for g, w in zip(got, want):
            assert_same(g, w)


@pytest.mark.parametrize("which", ["gather", "scatter", "scatter_"])
@pytest.mark.parametrize("idt", INDEX)
def test_out_of_range_index_raises(which, idt):
    src = [torch.randn(4), torch.randn(5, dtype=torch.float64)]
    index = [torch.tensor([0, 3], dtype=idt), torch.tensor([1, 5, 2], dtype=idt)]  # 5 is out of range
    flat = torch.randn(5)
    calls = {
        "gather": lambda m: m.gather_segments(src, index, None),
        "scatter": lambda m: m.scatter_segments(flat, index, [4, 5], 1.0),
        "scatter_": lambda m: m.scatter_segments_(flat, index, [s.clone() for s in src], 1.0, False),
    }
    for mod in (R, T):
        with pytest.raises(IndexError, match="^index: a position is out of range for its segment$"):
            calls[which](mod)


@pytest.mark.parametrize("blk", ["default", "tiny"])
@pytest.mark.parametrize("bad", [torch.tensor([0, 12]), torch.tensor([-1]), torch.tensor([5, 2, 99], dtype=torch.int32)])
def test_out_of_range_position_leaves_every_destination_untouched(bad, blk):
    """In-place scatter / gather(out=): _check_kernel runs first and the gated kernel writes nothing, so the
    in-range entries (here a whole earlier segment, over several programs with tiny blocks) stay as they were;
    a non-contiguous destination's write-back does not happen either."""
    good = torch.arange(20) % 12
    n = good.numel() + bad.numel()
    with blocks(blk):
        for accumulate in (False, True):
            dst = [torch.zeros(4, 3), torch.zeros(3, 4).t()]
            with pytest.raises(IndexError, match="^index: a position is out of range for its segment$"):
                T.scatter_segments_(torch.ones(n), [good, bad], dst, 1.0, accumulate)
            assert not dst[0].any() and not dst[1].any()
            for out in (torch.full((n,), 7.0), torch.full((n, 2), 7.0)[:, 0]):
                with pytest.raises(IndexError, match="^index: a position is out of range for its segment$"):
                    T.gather_segments_out([torch.randn(4, 3), torch.randn(4, 3)], [good, bad], out, accumulate)
                assert torch.equal(out, torch.full((n,), 7.0))
        # in range (and distinct: scatter positions are a set): the gate is open and the same calls write, sorted
        # positions at once, unsorted ones after the repeat check
        dst = [torch.zeros(4, 3), torch.zeros(3, 4).t()]
        pos = [torch.arange(12), torch.tensor([5, 0, 11, 3, 7, 1, 2, 9, 4, 10, 6, 8])]
        flat = torch.arange(24.0)
        T.scatter_segments_(flat, pos, dst, 1.0, False)
        want = [torch.zeros(4, 3), torch.zeros(3, 4).t()]
        R.scatter_segments_(flat, pos, want, 1.0, False)
        assert all(torch.equal(d, w) for d, w in zip(dst, want))


class _Counter:
    """Wraps a kernel so that launches through ``kernel[grid]`` are counted."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_one_launch_for_all_segments(monkeypatch):
    src = [torch.randn(3, 5), torch.randn(40, dtype=torch.float64), torch.randn(7).half(),
           torch.randn(2, 9).bfloat16().t(), torch.randn(0)]
    index = [torch.tensor([0, 4, 9, 14]), None, torch.tensor([1, 6], dtype=torch.int32), None, None]
    names = ["_gather_kernel", "_scatter_kernel", "_zero_kernel", "_check_kernel"]
    counters = {n: _Counter(getattr(T, n)) for n in names}
    for n, c in counters.items():
        monkeypatch.setattr(T, n, c)
    monkeypatch.setitem(T.BLOCKS, "gather", 16)
    monkeypatch.setitem(T.BLOCKS, "scatter", 16)
    flat = T.gather_segments(src, index, torch.float32)
    assert_same(flat, R.gather_segments(src, index, torch.float32))
    assert counters["_gather_kernel"].launches == 1 and counters["_check_kernel"].launches == 0
    dst = [s.clone() for s in src]
    T.scatter_segments_(flat, index, dst, 2.0, True)  # in place with an index: one check launch first
    assert counters["_scatter_kernel"].launches == 1 and counters["_check_kernel"].launches == 1
    T.scatter_segments(flat, index, [s.numel() for s in src], 1.0)  # the functional one is checked too
    assert counters["_scatter_kernel"].launches == 2 and counters["_zero_kernel"].launches == 1
    assert counters["_check_kernel"].launches == 2
    T.gather_segments_out(src, [None] * len(src), torch.empty(sum(s.numel() for s in src)), False)
    assert counters["_gather_kernel"].launches == 2 and counters["_check_kernel"].launches == 2  # no index
    # unsorted (distinct) positions: the gated writer skips, the repeat check passes, a second launch writes
    index[0] = torch.tensor([4, 0, 14, 9])
    T.scatter_segments_(flat, index, dst, 2.0, True)
    assert counters["_scatter_kernel"].launches == 4 and counters["_check_kernel"].launches == 3


# --------------------------------------------------------------------------- selection encodings


@st.composite
def masks(draw):
    shape = draw(shapes())
    n = 1
    for s in shape:
        n *= s
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    m = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
    m = m.reshape(shape)
    if len(shape) >= 2 and draw(st.booleans()):
        m = m.transpose(0, 1)
    return m


@settings(deadline=None)
@given(mask=masks(), dtype=st.sampled_from(INDEX), blk=st.sampled_from(["default", "tiny"]))
def test_mask_to_indices(mask, dtype, blk):
    with blocks(blk):
        got = T.mask_to_indices(mask, dtype)
    assert_same(got, R.mask_to_indices(mask, dtype))


@settings(deadline=None)
@given(mask=masks(), blk=st.sampled_from(["default", "tiny"]))
def test_pack_bitmask(mask, blk):
    with blocks(blk):
        got = T.pack_bitmask(mask)
    assert_same(got, R.pack_bitmask(mask))


@settings(deadline=None)
@given(mask=masks(), dtype=st.sampled_from(INDEX), garbage=st.integers(0, 255),
       blk=st.sampled_from(["default", "tiny"]))
def test_bitmask_to_indices(mask, dtype, garbage, blk):
    numel = mask.numel()
    bits = R.pack_bitmask(mask)
    with blocks(blk):
        assert_same(T.bitmask_to_indices(bits, numel, dtype), R.bitmask_to_indices(bits, numel, dtype))
        tail = numel % 8
        junk = garbage >> tail << tail  # bits at positions >= numel inside the last byte
        if tail and junk:
            bad = bits.clone()
            bad[-1] |= junk
            for mod in (R, T):
                with pytest.raises(ValueError, match="^bits: bits set beyond numel$"):
                    mod.bitmask_to_indices(bad, numel, dtype)


# --------------------------------------------------------------------------- top-k select


@st.composite
def topk_cases(draw):
    dtype = draw(st.sampled_from(FLOATS))
    n = draw(st.integers(0, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["ties", "continuous", "special"]))
    if kind == "ties":
        s = torch.randint(-3, 4, (n,), generator=g).to(torch.float64)
    elif kind == "continuous":
        s = torch.randn(n, dtype=torch.float64, generator=g)
    else:
        sp = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-30, -1e-30, 3e38, -3e38],
                          dtype=torch.float64)
        s = sp[torch.randint(0, len(sp), (n,), generator=g)]
    s = s.to(dtype)
    active = None
    if draw(st.booleans()):
        active = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    n_active = n if active is None else int(active.sum())
    kk = draw(st.sampled_from(["zero", "one", "all", "some"]))
    k = {"zero": 0, "one": min(1, n_active), "all": n_active}.get(kk)
    if k is None:
        k = draw(st.integers(0, n_active))
    return s, active, k


@settings(deadline=None)
@given(case=topk_cases(), blk=st.sampled_from(["default", "tiny"]))
def test_topk_select(case, blk):
    scores, active, k = case
    with blocks(blk):
        got = T.topk_select(scores, active, k)
    assert_same(got, R.topk_select(scores, active, k))


@settings(deadline=None)
@given(case=topk_cases(), where=st.integers(0, 299), bad=st.sampled_from(["nan", "k_big", "k_neg"]),
       blk=st.sampled_from(["default", "tiny"]))
def test_topk_select_errors(case, where, bad, blk):
    scores, active, k = case
    n_active = scores.numel() if active is None else int(active.sum())
    if bad == "nan":
        if scores.numel() == 0:
            return
        scores = scores.clone()
        pos = where % scores.numel()
        scores[pos] = float("nan")
        if active is not None and not bool(active[pos]):
            # NaN where inactive is ignored (like the reference): same result as without it
            with blocks(blk):
                assert_same(T.topk_select(scores, active, k), R.topk_select(scores, active, k))
            return
        with pytest.raises(ValueError, match="^scores: contains NaN among the active"):
            R.topk_select(scores, active, k)
    elif bad == "k_big":
        k = n_active + 1 + where % 3
        with pytest.raises(ValueError, match=r"^k: must be in \[0, "):
            R.topk_select(scores, active, k)
    else:
        k = -1 - where % 3
        with pytest.raises(ValueError, match=r"^k: must be in \[0, "):
            R.topk_select(scores, active, k)
    # k too large or negative: "k: must be in [0, n] (active scores)", as the native op says
    with blocks(blk), pytest.raises(ValueError, match="^scores: contains NaN among the active" if bad == "nan"
                                    else r"^k: must be in \[0, "):
        T.topk_select(scores, active, k)



def test_reference_topk_select_negative_k():
    """The reference checked only k > n: a negative k sliced order[:k] and returned all but the last |k| ranked
    positions, where the native and Triton kernels raise."""
    scores = torch.arange(10.0)
    for k in (-1, -3):
        with pytest.raises(ValueError, match=r"^k: "):
            R.topk_select(scores, None, k)
        with pytest.raises(ValueError, match=r"^k: "):
            T.topk_select(scores, None, k)

@st.composite
def topk_segment_cases(draw, max_segments=5):
    """0-5 segments of one float dtype (sizes 0..200, some 2-D / non-contiguous), active None or a mask
    per segment, values with ties / signed zeros / inf, NaN possibly planted where inactive."""
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["ties", "continuous", "special", "mixed"]))
    nan_inactive = draw(st.booleans())
    scores, active = [], []
    for _ in range(draw(st.integers(0, max_segments))):
        n = draw(st.integers(0, 200))
        k_ = kind if kind != "mixed" else draw(st.sampled_from(["ties", "continuous", "special"]))
        if k_ == "ties":
            s = torch.randint(-3, 4, (n,), generator=g).to(torch.float64)
        elif k_ == "continuous":
            s = torch.randn(n, dtype=torch.float64, generator=g)
        else:
            s = TOPK_SPECIAL[torch.randint(0, len(TOPK_SPECIAL), (n,), generator=g)]
        s = s.to(dtype)
        a = None
        if draw(st.booleans()):
            a = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
            if nan_inactive and n:
                s = torch.where(a, s, torch.full_like(s, float("nan")))
        layout = draw(st.sampled_from(["flat", "flat", "2d", "transposed", "strided"]))
        if layout != "flat" and n and n % 2 == 0:
            if layout == "2d":
                s, a = s.view(2, n // 2), (None if a is None else a.view(2, n // 2))
            elif layout == "transposed":  # positions follow the row-major order of the view
                s = s.view(2, n // 2).t()
                a = None if a is None else a.view(2, n // 2).t()
            else:
                s = torch.stack([s, s.flip(0)], 1)[:, 0]
                a = None if a is None else torch.stack([a, a], 1)[:, 1]
        scores.append(s)
        active.append(a)
    n_active = sum(s.numel() if a is None else int(a.sum()) for s, a in zip(scores, active))
    kk = draw(st.sampled_from(["zero", "one", "all", "all_but_one", "some"]))
    k = {"zero": 0, "one": min(1, n_active), "all": n_active, "all_but_one": max(n_active - 1, 0)}.get(kk)
    if k is None:
        k = draw(st.integers(0, n_active))
    return scores, active, k


TOPK_SPECIAL = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-30, -1e-30, 3e38, -3e38, 1e-320],
                            dtype=torch.float64)


@settings(deadline=None)
@given(case=topk_segment_cases(), blk=st.sampled_from(["default", "tiny"]))
def test_topk_select_segments(case, blk):
    scores, active, k = case
    before = [s.clone() for s in scores]
    with blocks(blk):
        got = T.topk_select_segments(scores, active, k)
    assert_same(got, R.topk_select_segments(scores, active, k))
    for s, b in zip(scores, before):  # inputs are left alone
        assert_same(s, b)


@settings(deadline=None)
@given(case=topk_segment_cases(max_segments=3), which=st.integers(0, 2**31),
       bad=st.sampled_from(["nan", "k_big", "k_neg"]), blk=st.sampled_from(["default", "tiny"]))
def test_topk_select_segments_errors(case, which, bad, blk):
    scores, active, k = case
    n_active = sum(s.numel() if a is None else int(a.sum()) for s, a in zip(scores, active))
    if bad == "nan":
        act_pos = [(i, j) for i, (s, a) in enumerate(zip(scores, active))
                   for j in (range(s.numel()) if a is None else a.reshape(-1).nonzero().reshape(-1).tolist())]
        if not act_pos:
            return
        i, j = act_pos[which % len(act_pos)]
        s = scores[i].clone()  # keeps a transposed layout
        s[tuple(torch.unravel_index(torch.tensor(j), s.shape))] = float("nan")
        scores = scores[:i] + [s] + scores[i + 1:]
        with pytest.raises(ValueError, match="^scores: contains NaN among the active"):
            R.topk_select_segments(scores, active, k)
    elif bad == "k_big":
        k = n_active + 1 + which % 3
        with pytest.raises(ValueError, match=r"^k: must be in \[0, "):
            R.topk_select_segments(scores, active, k)
    else:
        k = -1 - which % 3
        with pytest.raises(ValueError, match=r"^k: must be in \[0, "):
            R.topk_select_segments(scores, active, k)
    with blocks(blk), pytest.raises(ValueError, match="^scores: contains NaN among the active" if bad == "nan"
                                    else r"^k: must be in \[0, "):
        T.topk_select_segments(scores, active, k)


def test_topk_select_segments_edges():
    # no segments
    assert_same(T.topk_select_segments([], [], 0), torch.empty(0, dtype=torch.int64))
    for k in (1, -1):
        with pytest.raises(ValueError, match="k"):
            T.topk_select_segments([], [], k)
    # only empty segments
    e = [torch.empty(0), torch.empty(0, 3)]
    assert_same(T.topk_select_segments(e, [None, torch.empty(0, 3, dtype=torch.bool)], 0),
                torch.empty(0, dtype=torch.int64))
    # ties across segment boundaries go to the lowest global position; -0.0 == +0.0
    s = [torch.tensor([1.0, -0.0]), torch.empty(0), torch.tensor([[0.0, 1.0], [-0.0, 2.0]])]
    for k in range(6):
        assert_same(T.topk_select_segments(s, [None] * 3, k), R.topk_select_segments(s, [None] * 3, k))
    # a NaN where inactive is ignored, one where active raises
    s = [torch.tensor([float("nan"), 1.0]), torch.tensor([3.0, float("nan")])]
    a = [torch.tensor([False, True]), torch.tensor([True, False])]
    assert_same(T.topk_select_segments(s, a, 1), torch.tensor([2]))
    with pytest.raises(ValueError, match="NaN among the active"):
        T.topk_select_segments(s, [None, a[1]], 0)
    # mixed dtypes are refused
    with pytest.raises(TypeError, match="^scores: every tensor must have the same dtype"):
        T.topk_select_segments([torch.ones(2), torch.ones(2, dtype=torch.float64)], [None, None], 1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_one_launch_per_pass_for_all_segments(monkeypatch, dtype):
    """Every pass is one launch over all segments, and topk_select is the one-segment case."""
    names = ["_topk_hist_kernel", "_topk_walk_kernel", "_topk_count_kernel", "_topk_write_kernel"]
    counters = {n: _Counter(getattr(T, n)) for n in names}
    for n, c in counters.items():
        monkeypatch.setattr(T, n, c)
    monkeypatch.setitem(T.BLOCKS, "topk", 16)
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(3, 20, generator=g).to(dtype).t(), torch.randn(0).to(dtype),
              torch.randint(-2, 3, (37,), generator=g).to(dtype), torch.randn(5, generator=g).to(dtype)]
    active = [None, None, torch.rand(37, generator=g) < 0.5, torch.ones(5, dtype=torch.bool)]
    got = T.topk_select_segments(scores, active, 9)
    assert_same(got, R.topk_select_segments(scores, active, 9))
    npass = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}[dtype]
    assert [counters[n].launches for n in names] == [npass, npass, 1, 1]
    # k == n_active takes every active score without the radix passes
    n_active = 60 + int(active[2].sum()) + 5
    assert_same(T.topk_select_segments(scores, active, n_active), R.topk_select_segments(scores, active, n_active))
    assert [counters[n].launches for n in names] == [npass + 1, npass, 2, 2]
    flat = torch.cat([s.reshape(-1) for s in scores])
    assert_same(T.topk_select(flat, None, 7), T.topk_select_segments([flat], [None], 7))


# --------------------------------------------------------------------------- through the op surface


def test_op_surface_uses_triton_backend(monkeypatch):
    from gradkit import ops

    monkeypatch.setenv("GRADKIT_BACKEND", "triton")
    src = [torch.randn(2, 3), torch.randn(4, dtype=torch.float64)]
    index = [torch.tensor([5, 0]), None]
    flat = ops.gather_segments(src, index)
    assert_same(flat, R.gather_segments(src, index))
    out = torch.ones(6, dtype=torch.float16)
    ops.gather_segments(src, index, out=out, accumulate=True)
    assert_same(out, (torch.ones(6, dtype=torch.float16) + R.gather_segments(src, index, torch.float16)))
    for g, e in zip(ops.scatter_segments(flat, index, [6, 4], scale=0.5), R.scatter_segments(flat, index, [6, 4], 0.5)):
        assert_same(g, e)
    dst, ref = [s.clone() for s in src], [s.clone() for s in src]
    ops.scatter_segments_(flat, index, dst, scale=3.0, accumulate=True)
    R.scatter_segments_(flat, index, ref, 3.0, True)
    for g, e in zip(dst, ref):
        assert_same(g, e)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert_same(ops.mask_to_indices(mask, torch.int64), R.mask_to_indices(mask, torch.int64))
    bits = ops.pack_bitmask(mask)
    assert_same(bits, R.pack_bitmask(mask))
    assert_same(ops.bitmask_to_indices(bits, 6, torch.int32), R.bitmask_to_indices(bits, 6, torch.int32))
    scores = torch.tensor([0.5, -1.0, 0.5, 2.0, -0.0, 0.0])
    assert_same(ops.topk_select(scores, 3), R.topk_select(scores, None, 3))
    segs, act = [scores, torch.tensor([[2.0, 0.5], [-0.0, 3.0]])], [None, torch.tensor([[True, True], [True, False]])]
    assert_same(ops.topk_select_segments(segs, 4, active=act), R.topk_select_segments(segs, act, 4))
    assert_same(ops.topk_select_segments(segs, 2), R.topk_select_segments(segs, [None, None], 2))

"""Native (dispatcher) kernels of the param-map family against the plain-PyTorch reference,
plus opcheck, torch.compile and the bad-input contract of the op surface."""
import pytest
import torch
from hypothesis import given, strategies as st

from gradkit import _ext, ops
from gradkit.kernels.reference import parammap as ref

from conftest import DEVICES

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
IDX = [torch.int32, torch.int64]


@st.composite
def tensors(draw, dtype=None):
    """A float tensor of 0-3 dims (sizes 0..6), sometimes a non-contiguous view."""
    dtype = dtype or draw(st.sampled_from(FLOATS))
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    view = draw(st.sampled_from(["contig", "transpose", "step"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if view == "step" and shape:
        big = list(shape)
        big[-1] = 2 * shape[-1]
        t = torch.randn(big, generator=g).to(dtype)[..., ::2]
    elif view == "transpose" and len(shape) >= 2:
        dims = list(range(len(shape)))[::-1]
        t = torch.randn(shape[::-1], generator=g).to(dtype).permute(dims)  # shape == `shape`, non-contiguous
    else:
        t = torch.randn(shape, generator=g).to(dtype)
    return t


@st.composite
def index_for(draw, numel):
    kind = draw(st.sampled_from(["none", "perm", "sorted"]))
    if kind == "none":
        return None
    dt = draw(st.sampled_from(IDX))
    k = draw(st.integers(0, numel))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pos = torch.randperm(numel, generator=g)[:k]
    if kind == "sorted":
        pos = pos.sort().values
    return pos.to(dt)


@st.composite
def segment_lists(draw, max_segments=4):
    n = draw(st.integers(0, max_segments))
    src = [draw(tensors()) for _ in range(n)]
    index = [draw(index_for(t.numel())) for t in src]
    return src, index


def _to(dev, xs):
    return [None if x is None else x.to(dev) for x in xs]


@pytest.mark.parametrize("device", DEVICES)
@given(segs=segment_lists(), out_dtype=st.sampled_from([None] + FLOATS))
def test_gather_matches_reference(device, segs, out_dtype):
    src, index = segs
    src, index = _to(device, src), _to(device, index)
    got = ops.gather_segments(src, index, dtype=out_dtype)
    want = ref.gather_segments(src, index, dtype=out_dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@given(segs=segment_lists(), out_dtype=st.sampled_from(FLOATS), accumulate=st.booleans())
def test_gather_out_matches_reference(device, segs, out_dtype, accumulate):
    src, index = _to(device, segs[0]), _to(device, segs[1])
    total = sum(t.numel() if i is None else i.numel() for t, i in zip(src, index))
    start = torch.randn(total, device=device).to(out_dtype)
    got, want = start.clone(), start.clone()
    ptr = got.data_ptr()
    res = ops.gather_segments(src, index, out=got, accumulate=accumulate)
    ref.gather_segments_out(src, index, want, accumulate)
    assert res is got and got.data_ptr() == ptr  # wrote in place, allocated no output
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@given(segs=segment_lists(), scale=st.sampled_from([1.0, -0.5, 3.0]))
def test_scatter_matches_reference(device, segs, scale):
    src, index = _to(device, segs[0]), _to(device, segs[1])
    flat = ref.gather_segments(src, index, dtype=torch.float32) if src else torch.empty(0, device=device)
    numel = [t.numel() for t in src]
    got = ops.scatter_segments(flat, index, numel, scale=scale)
    want = ref.scatter_segments(flat, index, numel, scale)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@given(segs=segment_lists(), flat_dtype=st.sampled_from(FLOATS), scale=st.sampled_from([1.0, 0.25, -2.0]),
       accumulate=st.booleans())
def test_scatter_inplace_matches_reference(device, segs, flat_dtype, scale, accumulate):
    dst, index = _to(device, segs[0]), _to(device, segs[1])
    total = sum(t.numel() if i is None else i.numel() for t, i in zip(dst, index))
    flat = torch.randn(total, device=device).to(flat_dtype)
    got = [d.clone() for d in dst]
    want = [d.clone() for d in dst]
    # keep non-contiguous layouts for the kernel under test
    got = [g if d.is_contiguous() else torch.empty_strided(d.size(), d.stride(), dtype=d.dtype, device=device).copy_(d)
           for g, d in zip(got, dst)]
    ops.scatter_segments_(flat, index, got, scale=scale, accumulate=accumulate)
    ref.scatter_segments_(flat, index, want, scale, accumulate)
    for g, w in zip(got, want):
        # Both round the exact (float64) result once to the destination dtype.
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@given(shape=st.lists(st.integers(0, 40), max_size=3), p=st.floats(0, 1), dtype=st.sampled_from(IDX),
       seed=st.integers(0, 2**31 - 1))
def test_mask_encodings_match_reference(shape, p, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < p
    assert torch.equal(ops.mask_to_indices(mask, dtype), ref.mask_to_indices(mask, dtype))
    bits = ops.pack_bitmask(mask)
    assert torch.equal(bits, ref.pack_bitmask(mask))
    got = ops.bitmask_to_indices(bits, mask.numel(), dtype)
    assert got.dtype == dtype
    assert torch.equal(got, ref.bitmask_to_indices(bits, mask.numel(), dtype))


def test_mask_to_indices_large_parallel():
    # several scan chunks (64 Ki) and both threads: positions stay ascending and exact
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(1_000_003, generator=g) < 0.05
    assert torch.equal(ops.mask_to_indices(mask, torch.int64), mask.nonzero().reshape(-1))
    bits = ops.pack_bitmask(mask)
    assert torch.equal(ops.bitmask_to_indices(bits, mask.numel(), torch.int32), mask.nonzero().reshape(-1).int())


@st.composite
def score_vectors(draw):
    n = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(FLOATS))
    kind = draw(st.sampled_from(["ties", "normal", "signed_zero", "inf"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "ties":
        s = torch.randint(-3, 4, (n,), generator=g).float()
    elif kind == "signed_zero":
        s = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        s = torch.where(torch.rand(n, generator=g) < 0.2, torch.randn(n, generator=g), s)
    elif kind == "inf":
        s = torch.randn(n, generator=g)
        s[torch.rand(n, generator=g) < 0.2] = float("inf")
        s[torch.rand(n, generator=g) < 0.2] = float("-inf")
    else:
        s = torch.randn(n, generator=g) * 1e3
    s = s.to(dtype)
    active = None if draw(st.booleans()) else torch.rand(n, generator=g) < draw(st.floats(0, 1))
    n_act = n if active is None else int(active.sum())
    k = draw(st.sampled_from(sorted({0, min(1, n_act), n_act // 2, n_act, draw(st.integers(0, n_act))})))
    return s, active, k


@pytest.mark.parametrize("device", DEVICES)
@given(case=score_vectors())
def test_topk_select_matches_reference(device, case):
    s, active, k = case
    s = s.to(device)
    active = None if active is None else active.to(device)
    got = ops.topk_select(s, k, active)
    want = ref.topk_select(s, active, k)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want.cpu())


def test_topk_select_large_and_ties_lowest_position():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 1000, (2_000_000,), generator=g).float()  # heavy ties
    for k in (1, 1234, 200_000, 1_999_999):
        got = ops.topk_select(s, k)
        assert torch.equal(got, ref.topk_select(s, None, k))
    s64 = torch.randn(300_000, generator=g, dtype=torch.float64)
    assert torch.equal(ops.topk_select(s64, 777), ref.topk_select(s64, None, 777))


def test_topk_select_rejects_nan_and_bad_k():
    s = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="scores"):
        ops.topk_select(s, 1)
    with pytest.raises(ValueError, match="k"):
        ops.topk_select(torch.ones(3), 4)
    with pytest.raises(ValueError, match="k"):
        ops.topk_select(torch.ones(3), 2, torch.tensor([True, False, False]))
    with pytest.raises(TypeError, match="k"):
        ops.topk_select(torch.ones(3), True)
    with pytest.raises(ValueError, match="active"):
        ops.topk_select(torch.ones(3), 1, torch.ones(2, dtype=torch.bool))


# --------------------------------------------------------------------------- bad input


def test_gather_bad_input_names_argument():
    a = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"index\[0\]"):
        ops.gather_segments([a], [torch.tensor([0.5])])
    with pytest.raises(ValueError, match="index"):
        ops.gather_segments([a], [])
    with pytest.raises(TypeError, match=r"src\[0\]"):
        ops.gather_segments([torch.ones(3, dtype=torch.int64)], [None])
    with pytest.raises(ValueError, match="out"):
        ops.gather_segments([a], [None], out=torch.empty(11))
    with pytest.raises(TypeError, match="out"):
        ops.gather_segments([a], [None], out=torch.empty(12, dtype=torch.int32))
    with pytest.raises(ValueError, match="accumulate"):
        ops.gather_segments([a], [None], accumulate=True)
    # out-of-range positions: never read, reported as IndexError naming `index`
    with pytest.raises(IndexError, match="index"):
        ops.gather_segments([a], [torch.tensor([0, 12])])
    with pytest.raises(IndexError, match="index"):
        ops.gather_segments([a], [torch.tensor([-1])])


def test_scatter_bad_input_names_argument():
    with pytest.raises(ValueError, match="flat"):
        ops.scatter_segments(torch.ones(3), [None], [4])
    with pytest.raises(ValueError, match="numel"):
        ops.scatter_segments(torch.ones(3), [None], [3, 1])
    with pytest.raises(ValueError, match="flat"):
        ops.scatter_segments_(torch.ones(2, 2), [None], [torch.zeros(4)])
    with pytest.raises(IndexError, match="index"):
        ops.scatter_segments(torch.ones(1), [torch.tensor([5])], [3])


def test_encoding_bad_input():
    with pytest.raises(TypeError, match="mask"):
        ops.mask_to_indices(torch.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        ops.mask_to_indices(torch.ones(3, dtype=torch.bool), torch.float32)
    with pytest.raises(ValueError, match="bits"):
        ops.bitmask_to_indices(torch.zeros(2, dtype=torch.uint8), 20)
    with pytest.raises(ValueError, match="bits"):  # bit 5 set but numel=4
        ops.bitmask_to_indices(torch.tensor([0b100000], dtype=torch.uint8), 4)


def test_backend_env_validation(monkeypatch):
    monkeypatch.setenv("GRADKIT_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="GRADKIT_BACKEND"):
        ops.pack_bitmask(torch.ones(3, dtype=torch.bool))
    monkeypatch.setenv("GRADKIT_BACKEND", "reference")
    assert ops.backend() == "reference"
    assert torch.equal(ops.pack_bitmask(torch.ones(9, dtype=torch.bool)), torch.tensor([255, 1], dtype=torch.uint8))


# --------------------------------------------------------------------------- opcheck / compile / autograd


def _opcheck_cases():
    a = torch.randn(5, 4, dtype=torch.float64)
    b = torch.randn(6, 3).t()  # non-contiguous
    idx = [torch.tensor([3, 0, 7], dtype=torch.int32), None]
    flat = torch.randn(3 + 18)
    mask = torch.rand(37) < 0.4
    return [
        ("gather_segments", ([a, b], idx, None)),
        ("gather_segments", ([a, b], idx, torch.float32)),
        ("gather_segments_out", ([a, b], idx, torch.zeros(21, dtype=torch.float64), True)),
        ("scatter_segments", (flat, idx, [20, 18], 2.0)),
        ("scatter_segments_", (flat, idx, [torch.zeros(5, 4), torch.zeros(6, 3).t()], 1.0, True)),
        ("mask_to_indices", (mask, torch.int32)),
        ("bitmask_to_indices", (ops.pack_bitmask(mask), 37, torch.int64)),
        ("pack_bitmask", (mask,)),
        ("topk_select", (torch.randn(50), None, 7)),
        ("topk_select", (torch.randn(50), torch.rand(50) < 0.5, 3)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, args):
    op = getattr(torch.ops.gradkit, name)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if name in ("gather_segments", "scatter_segments"):
        tests = tests + ("test_autograd_registration",)
    torch.library.opcheck(op, args, test_utils=tests)


def test_gather_autograd_is_scatter():
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    idx = [torch.tensor([3, 0, 7]), None]
    torch.autograd.gradcheck(lambda x, y: torch.ops.gradkit.gather_segments([x, y], idx, None), (a, b))
    flat = torch.randn(10, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f: torch.ops.gradkit.scatter_segments(f, idx, [20, 7], 0.5)[0], (flat,))


@pytest.mark.parametrize("idx", [[[3, 1]], [[0], [1, 2]], [[3, 1], None], [None]])
def test_gather_scatter_autograd_for_every_index_structure(idx):
    """torch.library matches the backward's return to the inputs' structure, which differs between an
    index list of tensors only and one holding a None: both backward (a one-entry ParamMap with an index
    list raised "Expected the return from backward to be of the same structure as the inputs")."""
    idx = [None if i is None else torch.tensor(i) for i in idx]
    srcs = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in idx]
    torch.autograd.gradcheck(lambda *s: torch.ops.gradkit.gather_segments(list(s), idx, None), srcs)
    n = sum(4 if i is None else len(i) for i in idx)
    flat = torch.randn(n, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f: torch.ops.gradkit.scatter_segments(f, idx, [4] * len(idx), 0.5)[0], (flat,))


def test_parammap_gather_backward_one_index_entry():
    from gradkit import ParamMap

    pm = ParamMap({"a": {"shape": (4,), "repr": "indices", "indices": torch.tensor([3, 1])}})
    x = torch.randn(4, requires_grad=True)
    (pm.gather({"a": x}) * torch.tensor([2.0, 5.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 5.0, 0.0, 2.0]))


def test_gather_under_torch_compile():
    idx = [torch.tensor([3, 0, 7], dtype=torch.int32), None]

    def f(x, y):
        return torch.ops.gradkit.gather_segments([x * 2, y], idx, None).sum()

    a, b = torch.randn(5, 4), torch.randn(3)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(a, b), f(a, b))


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
def test_every_backend_rejects_out_of_range_positions(backend, monkeypatch):
    monkeypatch.setenv("GRADKIT_BACKEND", backend)
    a = torch.randn(4, 3)
    for bad in (torch.tensor([0, 12]), torch.tensor([-1]), torch.tensor([2, -12], dtype=torch.int32)):
        with pytest.raises(IndexError, match="index"):
            ops.gather_segments([a], [bad])
        with pytest.raises(IndexError, match="index"):
            ops.scatter_segments(torch.ones(bad.numel()), [bad], [12])
        dst = torch.zeros(4, 3)
        with pytest.raises(IndexError, match="index"):
            ops.scatter_segments_(torch.ones(bad.numel()), [bad], [dst])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("bad", [torch.tensor([0, 12]), torch.tensor([-1]), torch.tensor([5, 2, 99], dtype=torch.int32)])
def test_out_of_range_position_leaves_every_destination_untouched(backend, bad, device, monkeypatch):
    """An in-place scatter or gather(out=) whose positions run out of range raises before writing anything:
    the CPU kernel used to write the in-range entries (and the reference the earlier segments) first; on a GPU
    the writing kernel is gated on a check launch (in CI: test_cuda_emulated / test_parammap_triton)."""
    monkeypatch.setenv("GRADKIT_BACKEND", backend)
    good, bad = torch.tensor([1, 3], device=device), bad.to(device)
    n = good.numel() + bad.numel()
    for accumulate in (False, True):
        dst = [torch.zeros(4, 3, device=device), torch.zeros(4, 3, device=device)]
        with pytest.raises(IndexError, match="^index: a position is out of range"):
            ops.scatter_segments_(torch.ones(n, device=device), [good, bad], dst, accumulate=accumulate)
        assert not dst[0].any() and not dst[1].any()
        out = torch.full((n,), 7.0, device=device)
        with pytest.raises(IndexError, match="^index: a position is out of range"):
            ops.gather_segments([torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)], [good, bad],
                                out=out, accumulate=accumulate)
        assert torch.equal(out, torch.full((n,), 7.0, device=device))


@pytest.mark.parametrize("density", [0.002, 0.05, 0.7, 1.0])
@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_scatter_large_multi_chunk(density, order):
    """Many work items per segment (the functional scatter zeroes each item's destination
    range just before writing it): every unselected element must still read zero."""
    g = torch.Generator().manual_seed(7)
    n = 300_001
    pos = (torch.rand(n, generator=g) < density).nonzero().reshape(-1)
    if order == "shuffled":
        pos = pos[torch.randperm(pos.numel(), generator=g)]
    empty = torch.empty(0, dtype=torch.int64)
    index = [pos.int(), None, empty, pos]
    numel = [n, 5, 17, n]
    flat = torch.randn(2 * pos.numel() + 5, generator=g)
    got = ops.scatter_segments(flat, index, numel, scale=0.5)
    want = ref.scatter_segments(flat, index, numel, 0.5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@st.composite
def score_lists(draw):
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n_seg = draw(st.integers(1, 5))
    scores, active = [], []
    for _ in range(n_seg):
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=2))
        kind = draw(st.sampled_from(["ties", "normal", "signed_zero"]))
        if kind == "ties":
            t = torch.randint(-2, 3, shape, generator=g).float()
        elif kind == "signed_zero":
            t = torch.where(torch.rand(shape, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        else:
            t = torch.randn(shape, generator=g)
        t = t.to(dtype)
        if draw(st.booleans()) and t.dim() == 2:
            t = t.t()  # non-contiguous
        scores.append(t)
        active.append(None if draw(st.booleans()) else torch.rand(t.shape, generator=g) < 0.6)
    if draw(st.booleans()):
        active = None
    n_act = sum(s.numel() if active is None or a is None else int(a.sum())
                for s, a in zip(scores, active or [None] * n_seg))
    k = draw(st.sampled_from(sorted({0, min(1, n_act), n_act // 3, n_act})))
    return scores, active, k


@pytest.mark.parametrize("device", DEVICES)
@given(case=score_lists())
def test_topk_select_segments_matches_reference(device, case):
    scores, active, k = case
    scores = [s.to(device) for s in scores]
    active = None if active is None else [None if a is None else a.to(device) for a in active]
    got = ops.topk_select_segments(scores, k, active)
    want = ref.topk_select_segments(scores, active or [None] * len(scores), k)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want.cpu())


def test_topk_select_segments_many_tensors_no_concat():
    """148 tensors of very different sizes (a GPT-2-like set, scaled down), blocks spanning many
    tensors, heavy ties: exact against the reference on the concatenation."""
    g = torch.Generator().manual_seed(11)
    sizes = [int(x) for x in torch.randint(1, 40_000, (148,), generator=g)]
    scores = [torch.randint(0, 500, (n,), generator=g).float() for n in sizes]
    cat = torch.cat(scores)
    for k in (1, cat.numel() // 100, cat.numel() // 2):
        assert torch.equal(ops.topk_select_segments(scores, k), ref.topk_select(cat, None, k))


def test_topk_select_segments_bad_input():
    a, b = torch.randn(4), torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"scores\[1\]"):
        ops.topk_select_segments([a, b], 1)
    with pytest.raises(ValueError, match=r"active\[0\]"):
        ops.topk_select_segments([a], 1, [torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="k"):
        ops.topk_select_segments([a, torch.randn(2)], 7)
    with pytest.raises(ValueError, match="NaN"):
        ops.topk_select_segments([a, torch.tensor([float("nan")])], 1)
    # NaN in an inactive entry is ignored
    got = ops.topk_select_segments([a, torch.tensor([float("nan")])], 2, [None, torch.tensor([False])])
    assert torch.equal(got, ref.topk_select(a, None, 2))
    assert ops.topk_select_segments([], 0).numel() == 0


def test_opcheck_topk_select_segments():
    args = ([torch.randn(5, 4), torch.randn(7), torch.randn(3, 2).t()],
            [None, torch.rand(7) < 0.5, None], 6)
    torch.library.opcheck(torch.ops.gradkit.topk_select_segments, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_active", [False, True])
def test_topk_select_heavy_bucket_fallback(dtype, with_active):
    """Scores packed into one narrow range share one top-12-bit bucket (more than n/4 candidates):
    the kernel then resolves the remaining bits with radix passes instead of compaction."""
    g = torch.Generator().manual_seed(3)
    n = 600_000
    s = (0.5 + torch.rand(n, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
    active = (torch.rand(n, generator=g) < 0.7) if with_active else None
    n_act = n if active is None else int(active.sum())
    for k in (1, n_act // 3, n_act - 1):
        assert torch.equal(ops.topk_select(s, k, active), ref.topk_select(s, active, k))
    parts = list(s.split([100_000, 1, 299_999, 200_000]))
    acts = None if active is None else list(active.split([100_000, 1, 299_999, 200_000]))
    assert torch.equal(ops.topk_select_segments(parts, n_act // 2, acts), ref.topk_select(s, active, n_act // 2))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_precheck_finds_one_bad_position_anywhere(dtype):
    """The in-place ops' position pre-check (a vectorised min / max reduction per work item of 32768 positions)
    finds a single out-of-range position at any place of a long list -- the first, the last, inside the
    vector body or its tail, in a later work item -- and lets the boundary values 0 and n - 1 through."""
    n = 70_001  # positions per segment: three work items, the last one short
    numel = 100_003
    base = torch.arange(n, dtype=dtype) % numel
    base[0], base[1] = 0, numel - 1
    limits = [numel, -1, torch.iinfo(dtype).min, torch.iinfo(dtype).max]
    for where in (0, 1, 7, 31, 32767, 32768, 65536, n - 2, n - 1):
        for v in limits:
            idx = base.clone()
            idx[where] = v
            dst = torch.zeros(numel)
            with pytest.raises(IndexError, match="^index: a position is out of range"):
                ops.scatter_segments_(torch.ones(n), [idx], [dst])
            assert not dst.any()
            out = torch.full((n,), 3.0)
            with pytest.raises(IndexError, match="^index: a position is out of range"):
                ops.gather_segments([torch.randn(numel)], [idx], out=out)
            assert torch.equal(out, torch.full((n,), 3.0))
    dst = torch.zeros(numel)
    ops.scatter_segments_(torch.ones(n), [base], [dst])  # every position valid: written
    assert dst[base.long()].eq(1).all() and int(dst.sum()) == torch.unique(base).numel()
    with pytest.raises(IndexError, match="^index: a position is out of range"):  # an empty destination
        ops.scatter_segments_(torch.ones(1), [torch.zeros(1, dtype=dtype)], [torch.zeros(0)])


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_scatter_refuses_a_repeated_position(backend, dtype, monkeypatch):
    """Scatter positions are a set. A repeated one made the native kernels' writes race (two threads: 5e5 of
    1e6 ones added into one position, a different count each run) and the reference keep one of them: every
    backend now refuses it with a ValueError naming index, before writing (in place: dst untouched), whether
    the repeat lies in one work item or two (positions 3 and 70,000 of 100,000). Unsorted distinct positions
    are written as sorted ones are (the GPU writers, gated on a check that flags unsorted positions, write
    them after the repeat check), and an out-of-range position in another segment is reported first."""
    monkeypatch.setenv("GRADKIT_BACKEND", backend)
    g = torch.Generator().manual_seed(11)
    # Triton's interpreter: a tenth of the size (positions 3 and 7,000 still lie in different programs of
    # BLOCKS["scatter"] = 1024; the full size took 35 s per dtype there)
    n = 100_000 if backend != "triton" else 10_000
    numel = n * 3 // 2
    distinct = torch.randperm(numel, generator=g)[:n].to(dtype)
    flat = torch.randn(n, generator=g)
    for where in ((0, 1), (3, n * 7 // 10), (n - 2, n - 1)):
        for order in ("shuffled", "sorted"):
            pos = distinct.clone()
            if order == "sorted":
                pos = pos.sort().values
            pos[where[1]] = pos[where[0]]
            for accumulate in (False, True):
                dst = [torch.zeros(numel), torch.zeros(7)]
                with pytest.raises(ValueError, match="^index: a position occurs more than once"):
                    ops.scatter_segments_(torch.cat([flat, torch.ones(2)]), [pos, torch.tensor([1, 5])], dst,
                                          accumulate=accumulate)
                assert not dst[0].any() and not dst[1].any()
            with pytest.raises(ValueError, match="^index: a position occurs more than once"):
                ops.scatter_segments(flat, [pos], [numel])
            # a position out of range in another segment is reported first
            with pytest.raises(IndexError, match="^index: a position is out of range"):
                ops.scatter_segments_(torch.cat([flat, torch.ones(1)]), [pos, torch.tensor([9])],
                                      [torch.zeros(numel), torch.zeros(7)])
    for pos in (distinct, distinct.sort().values):  # distinct positions, either order: written
        for accumulate in (False, True):
            dst = torch.full((numel,), 2.0)
            ops.scatter_segments_(flat, [pos], [dst], accumulate=accumulate)
            want = torch.full((numel,), 2.0)
            want[pos.long()] = (flat + 2.0) if accumulate else flat
            assert torch.equal(dst, want)
        (got,) = ops.scatter_segments(flat, [pos], [numel], scale=0.5)
        want = torch.zeros(numel)
        want[pos.long()] = flat * 0.5
        assert torch.equal(got, want)

"""Golden family: the native kernels against the plain-PyTorch reference (hypothesis + large
multi-block cases), opcheck, and the gradkit.golden API against independent torch oracles."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradkit import _ext, golden as G, ops
from gradkit.kernels.reference import golden as ref

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _oracle_topk(g: torch.Tensor, k: int) -> torch.Tensor:
    """Independent oracle: rank (|g| desc, position asc) with NaN last, via lexsort on float64."""
    a = g.reshape(-1).double().abs()
    nan = torch.isnan(a)
    pos = torch.arange(a.numel(), dtype=torch.float64)
    key = torch.where(nan, torch.full_like(a, -1.0), a)
    order = sorted(range(a.numel()), key=lambda i: (-key[i].item(), pos[i].item()))[:k]
    sel = torch.zeros(a.numel(), dtype=torch.bool)
    sel[order] = True
    return sel & ~nan


@st.composite
def grads(draw, max_n=300):
    n = draw(st.integers(0, max_n))
    dtype = draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randint(-4, 5, (n,), generator=g).to(dtype)  # many ties
    if n and draw(st.booleans()):
        x[torch.randint(0, n, (max(1, n // 9),), generator=g)] = float("nan")
    return x


def check_running_and(fn, g, data):
    """fn(g, bits, counts, k, first) (golden_topk_and_'s argument order) against the reference over a
    running AND of two samples, with and without counts, starting from random bits and counts."""
    n = g.numel()
    bits0 = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8)
    if n % 8:
        bits0[-1] &= (1 << (n % 8)) - 1
    counts0 = torch.randint(0, 5, (n,), dtype=torch.int32)
    for _ in range(2):  # a running AND over two samples
        k = data.draw(st.integers(0, n))
        first = data.draw(st.booleans())
        use_counts = data.draw(st.booleans())
        b1, b2, c1, c2 = bits0.clone(), bits0.clone(), counts0.clone(), counts0.clone()
        p1 = fn(g, b1, c1 if use_counts else None, k, first)
        p2 = ref.golden_topk_and_(g, b2, c2 if use_counts else None, k, first)
        assert torch.equal(b1, b2) and int(p1) == int(p2) == int(ref.unpack_bitmask(b1, n).sum())
        assert torch.equal(c1, c2)
        bits0, counts0 = b1, c1
        g = g.flip(0) if n else g


@given(grads(), st.data())
def test_golden_topk_and_matches_reference(g, data):
    check_running_and(lambda g, b, c, k, first: ops.golden_topk_and_(g, b, k, counts=c, first=first), g, data)


@pytest.mark.parametrize("dtype", FLOATS)
def test_golden_topk_large_multiblock_ties(dtype):
    """Several parallel blocks; thresholds inside a run of ties that spans blocks, NaN, zeros."""
    gen = torch.Generator().manual_seed(1)
    n = 300_007
    g = torch.randint(-3, 4, (n,), generator=gen).to(dtype)
    g[torch.rand(n, generator=gen) < 0.01] = float("nan")
    for k in (0, 1, 5, 40_000, 150_000, 260_000, n - 5_000, n):
        sel = ref.topk_abs_mask(g, k)
        b = torch.zeros((n + 7) // 8, dtype=torch.uint8)
        c = torch.zeros(n, dtype=torch.int32)
        p = ops.golden_topk_and_(g, b, k, counts=c, first=True)
        assert torch.equal(ref.unpack_bitmask(b, n), sel), k
        assert torch.equal(c, sel.int()) and int(p) == int(sel.sum())
    # the reference agrees with an independent oracle on a small case
    small = torch.tensor([1.0, -3.0, 3.0, float("nan"), 0.0, 3.0, -1.0])
    for k in range(8):
        assert torch.equal(ref.topk_abs_mask(small, k), _oracle_topk(small, k))


def test_golden_topk_smooth_data_and_k_percent():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(1_000_003, generator=gen)
    for pct in (0.1, 1.0, 30.0):
        k = G.percent_to_k(g.numel(), pct)
        m = G.topk_mask(g, pct)
        assert int(m.sum()) == k
        thr = g.abs().kthvalue(g.numel() - k + 1).values
        assert bool((g.abs()[m] >= thr).all()) and bool((g.abs()[~m] <= thr).all())


def bitmask_case(sizes, seed):
    """Two lists of random masks of the given sizes and their packed bitmasks: ms, ns, a, b."""
    gen = torch.Generator().manual_seed(seed)
    ms = [torch.rand(n, generator=gen) < 0.5 for n in sizes]
    ns = [torch.rand(n, generator=gen) < 0.5 for n in sizes]
    return ms, ns, [ops.pack_bitmask(m) for m in ms], [ops.pack_bitmask(m) for m in ns]


@given(st.lists(st.integers(0, 70), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_bitmask_ops_match_reference(sizes, seed):
    ms, ns, a, b = bitmask_case(sizes, seed)
    for op, fn in (("and", torch.logical_and), ("or", torch.logical_or), ("xor", torch.logical_xor),
                   ("andnot", lambda x, y: x & ~y)):
        out = ops.bitmask_binary(a, b, op)
        assert all(torch.equal(o, r) for o, r in zip(out, ref.bitmask_binary(a, b, ops.BITMASK_OPS[op])))
        assert all(torch.equal(ref.unpack_bitmask(o, len(m)), fn(m, q)) for o, m, q in zip(out, ms, ns))
    nots = ops.bitmask_not(a, sizes)
    assert all(torch.equal(o, ops.pack_bitmask(~m)) for o, m in zip(nots, ms))  # padding bits stay 0
    assert ops.bitmask_count(a).tolist() == [int(m.sum()) for m in ms] == ref.bitmask_count(a).tolist()


def test_bitmask_ops_large_multi_piece():
    gen = torch.Generator().manual_seed(3)
    ms = [torch.rand(n, generator=gen) < 0.3 for n in (3_000_001, 17, 2_500_000)]
    a = [ops.pack_bitmask(m) for m in ms]
    assert ops.bitmask_count(a).tolist() == [int(m.sum()) for m in ms]
    nots = ops.bitmask_not(a, [m.numel() for m in ms])
    assert ops.bitmask_count(nots).tolist() == [int((~m).sum()) for m in ms]


def test_opcheck_golden_ops():
    g = torch.randn(1000)
    b = torch.zeros(125, dtype=torch.uint8)
    c = torch.zeros(1000, dtype=torch.int32)
    torch.library.opcheck(torch.ops.gradkit.golden_topk_and_, (g, b, c, 17, True))
    torch.library.opcheck(torch.ops.gradkit.golden_topk_and_, (g, b, None, 17, False))
    a = [torch.randint(0, 256, (9,), dtype=torch.uint8), torch.randint(0, 256, (3,), dtype=torch.uint8)]
    torch.library.opcheck(torch.ops.gradkit.bitmask_binary, (a, [t.flip(0) for t in a], 2))
    torch.library.opcheck(torch.ops.gradkit.bitmask_not, (a, [70, 24]))
    torch.library.opcheck(torch.ops.gradkit.bitmask_count, (a,))


@pytest.mark.parametrize("call, err, msg", [
    (lambda: ops.golden_topk_and_(torch.randn(10), torch.zeros(1, dtype=torch.uint8), 3), ValueError, "bits"),
    (lambda: ops.golden_topk_and_(torch.randn(10), torch.zeros(2, dtype=torch.uint8), 11), ValueError, "k"),
    (lambda: ops.golden_topk_and_(torch.arange(10), torch.zeros(2, dtype=torch.uint8), 1), TypeError, "g"),
    (lambda: ops.golden_topk_and_(torch.randn(10), torch.zeros(2, dtype=torch.uint8), 1,
                                  counts=torch.zeros(10)), ValueError, "counts"),
    (lambda: ops.bitmask_binary([torch.zeros(2, dtype=torch.uint8)], [torch.zeros(3, dtype=torch.uint8)], "and"),
     ValueError, "b[0]"),
    (lambda: ops.bitmask_binary([torch.zeros(2, dtype=torch.uint8)], [torch.zeros(2, dtype=torch.uint8)], "nand"),
     ValueError, "op"),
    (lambda: ops.bitmask_not([torch.zeros(2, dtype=torch.uint8)], [17]), ValueError, "a[0]"),
])
def test_bad_input_raises_before_work(call, err, msg):
    with pytest.raises(err, match="^" + msg.replace("[", r"\[").replace("]", r"\]") + ": "):
        call()


def test_native_checks_match_wrapper():
    with pytest.raises(ValueError, match="^k: "):
        torch.ops.gradkit.golden_topk_and_(torch.randn(10), torch.zeros(2, dtype=torch.uint8), None, 11, True)
    with pytest.raises(ValueError, match="^bits: "):
        torch.ops.gradkit.golden_topk_and_(torch.randn(10), torch.zeros(3, dtype=torch.uint8), None, 1, True)


# --------------------------------------------------------------------------- the golden API


def _samples(shapes, n, seed=0, nan=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = {name: torch.randn(s, generator=gen) for name, s in shapes.items()}
        if nan:
            d["w"].view(-1)[3] = float("nan")
        out.append(d)
    return out


SHAPES = {"w": (40, 33), "b": (7,), "e": (101, 8)}


@pytest.mark.parametrize("pct", [1.0, 10.0, 50.0, 100.0])
def test_golden_masks_per_tensor_matches_oracle(pct):
    samples = _samples(SHAPES, 4, nan=True)
    res = G.golden_masks(iter(samples), pct, return_counts=True)
    for name, shape in SHAPES.items():
        numel = math.prod(shape)
        k = max(1, math.ceil(numel * pct / 100))  # GoldenParams' count
        sels = [_oracle_topk(s[name], k) for s in samples]
        inter = torch.stack(sels).all(0)
        assert torch.equal(res.masks[name].to_bool().reshape(-1), inter)
        assert torch.equal(res.counts[name].reshape(-1), torch.stack(sels).sum(0).int())
        assert res.summary[name]["active"] == int(inter.sum())
    assert res.samples == 4 and len(res.history) == 4 and res.history[-1] == res.masks.count()
    assert all(a >= b for a, b in zip(res.history, res.history[1:]))  # a running AND only shrinks


def test_golden_masks_global_matches_oracle():
    samples = _samples(SHAPES, 3, seed=5)
    names = list(SHAPES)
    res = G.golden_masks(samples, 5.0, scope="global", params=names, return_counts=True)
    total = sum(math.prod(s) for s in SHAPES.values())
    k = int(total * 5 / 100)
    inter = None
    for s in samples:
        sel = _oracle_topk(torch.cat([s[n].reshape(-1) for n in names]), k)
        inter = sel if inter is None else inter & sel
    got = torch.cat([res.masks[n].to_bool().reshape(-1) for n in names])
    assert torch.equal(got, inter)


def test_golden_masks_bad_input():
    with pytest.raises(ValueError, match="^percent: "):
        G.golden_masks(_samples(SHAPES, 1), 0)
    with pytest.raises(ValueError, match="^percent: "):
        G.golden_masks(_samples(SHAPES, 1), 100.5)
    with pytest.raises(ValueError, match="^grad_iter: yielded no samples"):
        G.golden_masks(iter([]), 5)
    with pytest.raises(ValueError, match="^scope: "):
        G.golden_masks(_samples(SHAPES, 1), 5, scope="layer")
    with pytest.raises(ValueError, match="^grad_iter: .*'nope'"):
        G.golden_masks(_samples(SHAPES, 1), 5, params=["w", "nope"])
    bad = _samples(SHAPES, 2)
    bad[1]["w"] = torch.randn(33, 40)
    with pytest.raises(ValueError, match="^grad_iter: sample 1"):
        G.golden_masks(bad, 5)
    with pytest.raises(TypeError, match="^grad_iter: .*floating"):
        G.golden_masks([{"w": torch.ones(3, dtype=torch.int64)}], 5)


def test_bitmask_algebra_and_conversions(tmp_path):
    gen = torch.Generator().manual_seed(7)
    a = torch.rand(9, 11, generator=gen) < 0.3
    b = torch.rand(9, 11, generator=gen) < 0.6
    A, B = G.Bitmask.from_bool(a), G.Bitmask.from_bool(b)
    assert torch.equal((A & B).to_bool(), a & b) and torch.equal((A | B).to_bool(), a | b)
    assert torch.equal((A ^ B).to_bool(), a ^ b) and torch.equal(A.andnot(B).to_bool(), a & ~b)
    assert torch.equal((~A).to_bool(), ~a) and (~A).count() == int((~a).sum())
    assert A.count() == int(a.sum()) and A.density() == pytest.approx(float(a.float().mean()))
    assert A.memory() == 13
    assert G.Bitmask.from_coo(A.to_coo()) == A
    assert torch.equal(A.to_coo().to_dense(), a)
    assert G.Bitmask.from_indices(A.to_indices(), a.shape) == A
    assert torch.equal(A.to_indices(), a.reshape(-1).nonzero().reshape(-1))
    with pytest.raises(ValueError, match="^other: shape"):
        A & G.Bitmask.from_bool(torch.zeros(11, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="^mask: "):
        G.Bitmask.coerce(torch.zeros(9, 11))
    S = G.MaskSet({"a": a, "b": b})
    T = G.MaskSet({"a": b, "b": a})
    assert torch.equal((S & T)["a"].to_bool(), a & b) and (~S).count() == int((~a).sum() + (~b).sum())
    assert G.MaskSet.from_parammap(S.to_parammap())["b"] == S["b"]
    mem = S.memory()
    assert mem["packed"] == 26 and mem["dense_bool"] == 198
    # GoldenParams' saved results: sparse COO masks in a .pt, loaded without unpickling
    path = tmp_path / "golden.pt"
    torch.save({"masks": {"a": a.to_sparse(), "b": b}, "summary": {}}, path)
    L = G.load_goldenparams(str(path))
    assert L["a"] == A and L["b"] == B
    torch.save({"intersection_masks": {"a": a.to_sparse()}}, path)
    assert G.load_goldenparams(str(path))["a"] == A
    torch.save({"other": 1}, path)
    with pytest.raises(ValueError, match="^path: .*none of the keys"):
        G.load_goldenparams(str(path))


def test_sparse_gradient_accumulator():
    gen = torch.Generator().manual_seed(9)
    masks = {"w": torch.rand(30, 20, generator=gen) < 0.1, "b": torch.rand(5, generator=gen) < 0.5}
    acc = G.SparseGradientAccumulator(masks)
    total = {n: torch.zeros(m.shape) for n, m in masks.items()}
    for _ in range(3):
        gs = {n: torch.randn(m.shape, generator=gen) for n, m in masks.items()}
        acc.add(gs)
        for n in total:
            total[n] += gs[n]
    dense = acc.to_dense()
    for n, m in masks.items():
        torch.testing.assert_close(dense[n], torch.where(m, total[n], torch.zeros(())), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(acc.values()[n], total[n][m], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(acc.mean()[n], total[n][m] / 3, rtol=1e-6, atol=1e-6)
    assert acc.memory() < sum(m.numel() * 4 for m in masks.values())
    with pytest.raises(ValueError, match=r"^grads\['w'\]: shape"):
        acc.add({"w": torch.randn(20, 30), "b": torch.randn(5)})
    assert acc.steps == 3
    acc.reset()
    assert acc.steps == 0 and all(float(v.abs().sum()) == 0 for v in acc.values().values())

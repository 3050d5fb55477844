"""Audit (session 43): gradkit.index.GradientIndex from a dtype / memory-layout / semantics angle -- append and
search inputs across float16 / bfloat16 / float32 / float64 (int, bool, complex and numpy arrays refused by name),
non-contiguous views (transposes, stepped slices, expand()ed stride-0 tensors, storage offsets, tensors with
torch's negative bit), per-module dicts of mixed dtypes against flat tensors, one-row indexes and k edges, ties of
power-of-two scaled rows, overflow at each storage dtype's rounding boundary, and bergson's layout (structured
records with reordered / padded / 2-D fields, bf16 ``V2`` and float64 fields, ``offsets.npy`` dtypes, rows holding
Inf) against float64 brute force and bergson's own ``Attributor`` run in float64.

Reference semantics (README "GradientIndex", the index module docstring): rows are stored rounded once to the
index dtype (float64 too), rows that hold NaN / Inf or overflow are refused and counted; search scores are float32,
ties go to the lowest row, a query's result does not depend on its layout, dtype form (the same values), batch,
``batch_rows``, shard size or ``low_memory``.

Defects found (fixed here, python/gradkit/index.py):

* ``append`` of a contiguous float tensor carrying torch's negative bit (``torch._neg_view(x)``, or a (1, 1)
  ``z.conj().imag``) into an index of its own dtype raised torch's RuntimeError "Can't call numpy() on Tensor that
  has negative bit set" (the cast and ``contiguous()`` returned it as it was); ``num_tokens`` likewise. Now stored
  as its values.
* A bergson ``offsets.npy`` of unsigned ints that decrease (uint64 ``[0, 5, 3, 6]``) passed the monotonic check
  (``np.diff`` wrapped) and was refused later as "negative token counts"; now "not a valid offsets array".
"""
import json
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

import bergson  # noqa: F401  (installed wherever the suite runs)
import ml_dtypes
from bergson import Attributor
from bergson.data import create_index, create_token_index
from bergson.gradients import GradientProcessor
from bergson.utils.utils import tensor_to_numpy

from gradkit.index import GradientIndex, IndexFormatError, NonFiniteGradientError, Precondition

pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")

M = OrderedDict([("a", 13), ("b", 24), ("c", 7)])
D = 44
COLS = {"a": (0, 13), "b": (13, 37), "c": (37, 44)}
# (significant bits, exponent of the smallest subnormal, largest finite) of each storage dtype
FMT = {"fp16": (11, -24, 65504.0), "bf16": (8, -133, float(torch.finfo(torch.bfloat16).max)),
       "fp32": (24, -149, float(torch.finfo(torch.float32).max))}
TDT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _round_once(x: np.ndarray, name: str) -> np.ndarray:
    """float64 values rounded once (to nearest, ties to even) to a storage dtype, as float64; inf past its range.
    Independent of gradkit and torch: frexp, an exact power-of-two scaling and numpy's rint (ties to even)."""
    p, qmin, big = FMT[name]
    _, e = np.frexp(x)
    q = np.maximum(e - p, qmin)
    r = np.ldexp(np.rint(np.ldexp(x, -q)), q)
    return np.where(np.abs(r) > big, np.copysign(np.inf, x), r)


def _near_midpoints(n: int, d: int, name: str, seed: int) -> torch.Tensor:
    """float64 values within 2^-30 (relative) of a rounding midpoint of the storage dtype, either side, over several
    binades (a float32 step first would round them onto the midpoint: the double-rounding cases)."""
    rng = np.random.default_rng(seed)
    p = FMT[name][0]
    m = rng.integers(2 ** (p - 1), 2 ** p, size=(n, d)).astype(np.float64) + 0.5  # p+1 bits: an exact midpoint
    e = rng.integers(-8, 8, size=(n, d)) - p
    x = np.ldexp(m, e) * (1 + rng.choice([-1.0, 1.0], size=(n, d)) * 2.0 ** -30)
    return torch.from_numpy(x * rng.choice([-1.0, 1.0], size=(n, d)))


def _brute(X, Q, *, unit_norm=False, reverse=False, modules=None, weights=None, pre=None, mode="query"):
    """float64 scores (Q, N) of the documented semantics on the stored rows X."""
    X, Q = X.double(), Q.double()
    if pre is not None:
        ev, v = torch.linalg.eigh(pre.double())
        if mode == "both":
            h = (v * ev.pow(-0.5)) @ v.T
            Q, X = Q @ h, X @ h
            unit_norm = True
        else:
            Q = Q @ ((v * ev.pow(-1.0)) @ v.T)
    if unit_norm:
        Q = Q / Q.norm(dim=1, keepdim=True)
        X = X / X.norm(dim=1, keepdim=True)
    w = torch.zeros(Q.shape[1], dtype=torch.float64)
    for m in modules or list(COLS):
        w[COLS[m][0]:COLS[m][1]] = float(np.float32((weights or {}).get(m, 1.0)))
    return (Q * w) @ X.T


def _check_exact_topk(s, i, ref, k, reverse):
    """One query row: the reference's indices at every rank whose score is separated from its neighbours by more
    than twice the error bound (most ranks, else the case proves nothing), and scores within that bound (float32
    summation error, relative to the row's largest |score|)."""
    want = ref.topk(k, largest=not reverse)
    v = want.values[0]
    tol = max(1e-6 * float(ref.abs().amax()), 2.0 ** -149)  # scores below float32's range: its subnormal step
    gap = torch.full((k + 1,), float("inf"), dtype=torch.float64)
    gap[1:-1] = (v[:-1] - v[1:]).abs()
    sep = (gap[:-1] > 2 * tol) & (gap[1:] > 2 * tol)
    assert int(sep.sum()) >= 0.8 * k
    assert torch.equal(i[0][sep], want.indices[0][sep])
    assert float((s[0].double() - v).abs().max()) <= tol


def _build(path, x, dtype="fp32", modules=M, chunks=2, **kw):
    with GradientIndex.create(path, modules, dtype=dtype, **kw) as w:
        for part in x.tensor_split(chunks):
            w.append(part)
    return GradientIndex.open(path)


# ============================================================================ append: dtypes, layouts, rounding


def test_append_refuses_non_float_inputs_by_name_before_any_work(tmp_path):
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    w = GradientIndex.create(tmp_path / "ix", M, dtype="bf16", shard_rows=2)
    w.append(x)
    for dt in (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128):
        bad = x.to(dt)
        with pytest.raises(TypeError, match=rf"^grads: expected a floating tensor, got {dt}$"):
            w.append(bad)
        with pytest.raises(TypeError, match=r"^grads\['b'\]: expected a floating tensor$"):
            w.append({"a": x[:, :13], "b": bad[:, 13:37], "c": x[:, 37:]})
    with pytest.raises(TypeError, match=r"^grads: expected a \(n, 44\) tensor or a dict module -> \(n, d\) tensor, "
                                        r"got ndarray$"):
        w.append(x.numpy())
    with pytest.raises(TypeError, match=r"^grads\['a'\]: expected a floating tensor$"):
        w.append({"a": x[:, :13].numpy(), "b": x[:, 13:37], "c": x[:, 37:]})
    with pytest.raises(TypeError, match=r"^grads: expected a floating tensor, got torch.int64$"):
        w.append(torch.empty(0, D, dtype=torch.int64))  # refused even with no row to store
    assert len(w) == 3 and w.nonfinite_rows == 0
    w.close()
    ix = GradientIndex.open(tmp_path / "ix")
    assert len(ix) == 3 and torch.equal(ix.get(range(3)), x.bfloat16().float())


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_append_rounds_every_input_dtype_and_layout_once(tmp_path, name):
    """float64 values next to the storage dtype's rounding midpoints, and their float32 / float16 / bfloat16
    casts, given as contiguous, transposed, stepped, offset, expanded, negative-bit and dict forms: every stored row
    is the independent round-once reference of the input's values (bit for bit), whatever the form."""
    n = 6
    x64 = _near_midpoints(n, D, name, seed=1)
    inputs = [x64, x64.float(), x64.half(), x64.bfloat16()]
    forms = []
    for v in inputs:
        big = torch.zeros(3 * n + 3, 2 * D, dtype=v.dtype)
        big[3::3, 1::2] = v
        off = torch.zeros(7 + n * D, dtype=v.dtype)[7:].view(n, D)  # a storage offset of 7 elements
        off.copy_(v)
        forms += [
            ("contiguous", v, v),
            ("transposed", v.T.contiguous().T, v),
            ("stepped", big[3::3, 1::2], v),
            ("offset", off, v),
            ("expanded", v[2:3].expand(4, D), v[2:3].expand(4, D)),
            ("neg-bit", torch._neg_view(-v), v),  # DEFECT (fixed): numpy() refused it where no cast copied it
            ("dict", {"c": v[:, 37:], "a": v[:, :13], "b": v[:, 13:37]}, v),
        ]
    # a dict of mixed dtypes: each module's values as given (promoted exactly, then rounded once)
    mixed = {"a": x64[:, :13], "b": x64[:, 13:37].half(), "c": x64[:, 37:].bfloat16()}
    forms.append(("mixed dict", mixed, torch.cat([mixed["a"], mixed["b"].double(), mixed["c"].double()], 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no row here overflows: a refusal warning would fail the test
        with GradientIndex.create(tmp_path / name, M, dtype=name, shard_rows=5) as w:
            ids = [w.append(g) for _, g, _ in forms]
    ix = GradientIndex.open(tmp_path / name)
    assert ix.dtype == TDT[name] and ix.nonfinite_rows == 0
    first = 0
    for (what, _, vals), rid in zip(forms, ids):
        rows = vals.shape[0]
        assert rid.tolist() == list(range(first, first + rows)), what
        want = torch.from_numpy(_round_once(vals.double().numpy(), name)).float()
        got = ix.get(range(first, first + rows))
        assert torch.equal(got, want), (what, vals.dtype)
        first += rows
    assert len(ix) == first


def test_neg_bit_num_tokens_and_public_neg_views(tmp_path):
    # DEFECT (fixed): num_tokens with the negative bit reached numpy() in append
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(2))
    z = torch.complex(torch.randn(1, 1), torch.randn(1, 1))
    one = z.conj().imag  # a public (1, 1) float32 view with the negative bit, contiguous
    assert one.is_neg() and one.is_contiguous()
    with GradientIndex.create(tmp_path / "t", M, dtype="fp32", per_token=True) as w:
        assert w.append(torch._neg_view(x), torch._neg_view(torch.tensor([-2, 0, -3]))).tolist() == [0, 1, 2, 3, 4]
    ix = GradientIndex.open(tmp_path / "t")
    assert torch.equal(ix.get(range(5)), -x) and ix.offsets.tolist() == [0, 2, 2, 5]
    with GradientIndex.create(tmp_path / "one", {"m": 1}, dtype="fp32") as w:
        assert w.append(one).tolist() == [0]
    assert torch.equal(GradientIndex.open(tmp_path / "one").get(0), -z.imag)


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_overflow_at_the_rounding_boundary_is_refused_and_counted(tmp_path, name):
    """The largest finite value and the midpoint to the next power of two: below the midpoint (float64, by one
    ulp) it rounds to the largest finite value and is stored; at the midpoint (ties to even: away) it overflows,
    refused and counted, never stored as inf -- in every input dtype that holds the value."""
    p, _, big = FMT[name]
    mid = big + 2.0 ** (np.frexp(big)[1] - p - 1)  # halfway to 2^(emax+1)
    below = float(np.nextafter(mid, 0))
    cases = [(torch.float64, below, True), (torch.float64, mid, False), (torch.float64, -mid, False),
             (torch.float64, 1e300, False)]
    if name != "fp32":  # float32 holds these exactly (the midpoint) or rounds them onto it (below)
        cases += [(torch.float32, mid, False), (torch.float32, below, False), (torch.float32, big, True)]
    if name == "fp16":
        cases += [(torch.bfloat16, -65504.0, False)]  # bfloat16 holds it as -65536: past fp16
    x = torch.zeros(len(cases), D, dtype=torch.float64)
    for r, (_, v, _) in enumerate(cases):
        x[r, r % D] = v
    with pytest.warns(RuntimeWarning, match=r"only after casting to " + TDT[name].__repr__()[6:]):
        with GradientIndex.create(tmp_path / name, M, dtype=name) as w:
            got = [w.append(x[r:r + 1].to(dt)).item() for r, (dt, _, _) in enumerate(cases)]
            with pytest.raises(NonFiniteGradientError, match=r"nothing of this chunk was written"):
                w.append(x.to(torch.float64), on_nonfinite="error")
            assert len(w) == sum(ok for *_, ok in cases)
    want, nxt = [], 0
    for *_, ok in cases:
        want.append(nxt if ok else -1)
        nxt += ok
    assert got == want
    ix = GradientIndex.open(tmp_path / name)
    assert ix.nonfinite_rows == len(cases) - nxt
    stored = ix.get(range(len(ix)))
    assert torch.isfinite(stored).all() and float(stored.abs().max()) == big


# ============================================================================ search: forms, bits, blocking


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("s43ix")
    g = torch.Generator().manual_seed(3)
    X = torch.randn(61, D, generator=g, dtype=torch.float64)
    out = {}
    for name in ("fp16", "bf16", "fp32"):
        out[name] = _build(root / name, X, dtype=name, chunks=1)
        out[name, "sharded"] = _build(root / f"{name}-s", X, dtype=name, chunks=3, shard_rows=7)
        out[name, "lm"] = GradientIndex.open(root / f"{name}-s", low_memory=True)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    H = (a @ a.T / D + 0.5 * torch.eye(D, dtype=torch.float64)).float()
    return out, H, Precondition(H), Precondition(H, mode="both")  # the objects cache their matrix powers


def _queries(qdt, seed=4):
    q = torch.randn(5, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if qdt == torch.float64:
        q[1] *= 2.0 ** -140  # below float32's normal range: scaled by a power of two in float64 before the cast
        q[3] *= 2.0 ** 70   # beyond 2**64: scaled after the weights
        return q
    return (q / 4).to(qdt)


def _forms(q):
    big = torch.zeros(2 * q.shape[0], 3 * D, dtype=q.dtype)
    big[::2, 1::3] = q
    off = torch.zeros(5 + q.numel(), dtype=q.dtype)[5:].view_as(q).copy_(q)
    return {"stepped": big[::2, 1::3], "transposed": q.T.contiguous().T, "offset": off,
            "neg-bit": torch._neg_view(-q), "3-d": q.reshape(1, *q.shape),
            "dict": {"c": q[:, 37:], "b": q[:, 13:37], "a": q[:, :13]}}


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_search_bits_do_not_depend_on_query_form_batch_or_blocking(indexes, name):
    ixs, _, one, both = indexes
    base = ixs[name]
    kws = [{}, {"unit_norm": True, "reverse": True}, {"modules": ["a", "c"], "weights": {"c": -0.5}},
           {"precondition": one}, {"precondition": both, "reverse": True}]
    for qdt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        q = _queries(qdt)
        for kw in kws:
            S, I = base.search(q, 9, **kw)
            assert S.dtype == torch.float32 and I.dtype == torch.int64 and S.shape == I.shape == (5, 9)
            for what, v in _forms(q).items():
                s, i = base.search(v, 9, **kw)
                assert torch.equal(s.reshape(5, 9), S) and torch.equal(i.reshape(5, 9), I), (what, qdt, kw)
            for j in (1, 3):  # one query alone, and one expanded (stride 0) into a batch of its copies
                s, i = base.search(q[j], 9, **kw)
                assert torch.equal(s, S[j]) and torch.equal(i, I[j]), (j, qdt, kw)
                s, i = base.search(q[j:j + 1].expand(3, D), 9, **kw)
                assert torch.equal(s, S[j].expand(3, 9)) and torch.equal(i, I[j].expand(3, 9)), (j, qdt, kw)
            for key, br in (((name, "sharded"), 4), ((name, "lm"), 11), ((name, "lm"), None)):
                s, i = ixs[key].search(q, 9, batch_rows=br, **kw)
                assert torch.equal(s, S) and torch.equal(i, I), (key, br, qdt, kw)


def test_dict_queries_of_mixed_dtypes_equal_the_flat_float64_query(indexes):
    """Each module's part in its own dtype gives what the flat float64 query of the same values gives (also for a
    row whose every part is below 2**-64, found across the parts); bit for bit."""
    ixs, _, one, both = indexes
    q = _queries(torch.float32)
    parts = {"a": q[:, :13].half(), "b": q[:, 13:37].double(), "c": q[:, 37:].bfloat16()}
    parts["b"][2] *= 2.0 ** -140  # float32 would hold it as subnormals
    parts["a"][2] = 0
    parts["c"][2] = 0
    flat = torch.cat([parts["a"].double(), parts["b"], parts["c"].double()], 1)
    big = flat[2:3] * 2.0 ** 140
    for kw in ({"unit_norm": True}, {"precondition": both}):  # cosines are scale-free: the same bits
        for form in (flat[2:3], {n: p[2:3] for n, p in parts.items()}):
            a, b = ixs["bf16"].search(form, 7, **kw), ixs["bf16"].search(big, 7, **kw)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), kw
    for name in ("fp16", "fp32"):
        for kw in ({}, {"unit_norm": True}, {"precondition": one}, {"modules": ["b"], "reverse": True}):
            a = ixs[name].search(parts, 7, **kw)
            b = ixs[name].search(flat, 7, **kw)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (name, kw)
    s, i = ixs["fp32"].search(flat[2:3], 3)
    t, j = ixs["fp32"].search(big, 3)
    assert torch.equal(i, j)  # ranked on the scaled row; the inner products scaled back (float32 subnormals here)
    assert torch.equal(s, torch.ldexp(t.double(), torch.tensor(-140)).float())


def test_search_refuses_non_float_queries_by_name(indexes):
    ix = indexes[0]["bf16"]
    q = _queries(torch.float32)
    for dt in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=rf"^queries: expected a floating tensor, got {dt}$"):
            ix.search(q.to(dt), 3)
        with pytest.raises(TypeError, match=r"^queries\['c'\]: expected a floating tensor$"):
            ix.search({"a": q[:, :13], "b": q[:, 13:37], "c": q[:, 37:].to(dt)}, 3)
        with pytest.raises(TypeError, match=rf"^queries: expected a floating tensor, got {dt}$"):
            ix.search(q[:0].to(dt), 3)  # an empty batch is checked too
    with pytest.raises(TypeError, match=r"^queries: expected a \(Q, 44\) tensor or a dict"):
        ix.search(q.numpy(), 3)
    bad = q.clone()
    bad[2, 40] = float("nan")  # in module c, left out by modules=: still a NaN query (refused, as documented)
    with pytest.raises(ValueError, match=r"^queries: rows \[2\] hold NaN or Inf$"):
        ix.search({"a": bad[:, :13], "b": bad[:, 13:37], "c": bad[:, 37:]}, 3, modules=["a"])
    with pytest.raises(ValueError, match=r"^queries: rows \[0\] hold NaN or Inf$"):
        ix.search(torch.full((1, D), float("inf"), dtype=torch.float16), 3)


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_one_row_index_and_k_edges(tmp_path, name):
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(5))
    ix = _build(tmp_path / name, x, dtype=name, chunks=1)
    q = torch.randn(3, D, generator=torch.Generator().manual_seed(6))
    xs = x.to(TDT[name]).double()
    want = q.double() @ xs.T
    bound = 1e-6 * (q.double().abs() @ xs.abs().T)  # float32 summation error
    for be in ("torch", "faiss"):
        for kw in ({}, {"reverse": True}, {"unit_norm": True}, {"precondition": Precondition(torch.eye(D), "both")}):
            s, i = ix.search(q, 1, backend=be, **kw)
            assert i.tolist() == [[0]] * 3, (be, kw)
            nrm = 1.0 if not kw or "reverse" in kw else q.double().norm(dim=1, keepdim=True) * xs.norm()
            assert ((s.double() - want / nrm).abs() <= bound / nrm).all(), (be, kw)
    with pytest.raises(ValueError, match=r"^k: 2 is larger than the index \(1 rows\)$"):
        ix.search(q, 2)
    with pytest.raises(ValueError, match=r"^k: must be >= 1, got 0$"):
        ix.search(q, 0)
    with pytest.raises(ValueError, match=r"^k: 2 is larger than the index \(1 rows\)$"):
        ix.search(q[:0], 2)  # k is checked before the empty batch returns
    s, i = ix.search(q.reshape(3, 1, D)[:0], 1)
    assert s.shape == i.shape == (0, 1, 1)


# ============================================================================ search: semantics


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_search_matches_float64_brute_force_on_both_backends(indexes, name):
    ixs, H = indexes[:2]
    ix = ixs[name, "sharded"]
    X = ix.get(range(len(ix)))
    q = _queries(torch.float64, seed=7)
    for kw in ({}, {"unit_norm": True}, {"reverse": True, "modules": ["b"], "weights": {"b": 3.0}},
               {"pre": H, "mode": "both", "reverse": True}, {"pre": H}):
        call = {k: v for k, v in kw.items() if k not in ("pre", "mode")}
        if "pre" in kw:
            call["precondition"] = Precondition(kw["pre"], mode=kw["mode"]) if "mode" in kw else kw["pre"]
        ref = _brute(X, q, **kw)
        for be in ("torch", "faiss"):
            s, i = ix.search(q, 61, backend=be, batch_rows=13, **call)
            # every row, in order; the tiny and huge float64 query rows checked at their own scale
            for r in range(q.shape[0]):
                _check_exact_topk(s[r:r + 1], i[r:r + 1], ref[r:r + 1], 61, kw.get("reverse", False))


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp32"])
def test_power_of_two_scaled_copies_tie_to_the_lowest_row(tmp_path, name):
    """Rows that are one row times powers of two (far outside float32's comfortable range in bf16 / fp32, where
    the cosine path rescales them) have the same cosine, bit for bit, and rank lowest row first in either
    direction, across shards, blocks and low_memory."""
    g = torch.Generator().manual_seed(8)
    base = torch.randint(-8, 9, (D,), generator=g).double()
    rows = torch.randn(20, D, generator=g, dtype=torch.float64)
    pos, exps = [1, 6, 13, 19], {"fp16": (-6, 0, 6, -1), "bf16": (-100, 0, 40, -1), "fp32": (-100, 0, 40, -1)}[name]
    for p, e in zip(pos, exps):
        rows[p] = base * 2.0 ** e
    _build(tmp_path / name, rows, dtype=name, shard_rows=7)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    both = Precondition((a @ a.T / D + 0.5 * torch.eye(D, dtype=torch.float64)).float(), mode="both")
    q = torch.randn(3, D, generator=g)
    q[0], q[1] = base.float(), -base.float()  # the tied group first / last
    for lm in (False, True):
        ix = GradientIndex.open(tmp_path / name, low_memory=lm)
        for kw in ({"unit_norm": True}, {"precondition": both}):
            for rev in (False, True):
                for br in (None, 2, 5):
                    s, i = ix.search(q, 20, reverse=rev, batch_rows=br, **kw)
                    for b in range(3):
                        at = [j for j, r in enumerate(i[b].tolist()) if r in pos]
                        assert [i[b, j].item() for j in at] == pos, (lm, kw, rev, br, b)
                        assert at == list(range(at[0], at[0] + 4)) and len({s[b, j].item() for j in at}) == 1
                    assert i[0, 0].item() == 1 if not rev else i[1, 0].item() == 1


# ============================================================================ bergson's layout


def _bergson_struct(root, X, npdt, width, place, per_token=None):
    """An older-bergson structured store: ``place`` maps module -> (element offset, field shape); the record is
    ``width`` elements wide and its padding holds junk. Returns the stored module columns (float64)."""
    root.mkdir(parents=True)
    rec = np.full((X.shape[0], width), 7.0)
    for m, (off, _) in place.items():
        lo, hi = COLS[m]
        rec[:, off:off + hi - lo] = X[:, lo:hi]
    arr = rec.astype(ml_dtypes.bfloat16 if npdt == "bf16" else npdt)
    es, code = (2, "V2") if npdt == "bf16" else (np.dtype(npdt).itemsize, np.dtype(npdt).str)
    arr.tofile(root / "gradients.bin")
    spec = {"names": list(place), "formats": [f"{shp}{code}" for _, shp in place.values()],
            "offsets": [off * es for off, _ in place.values()], "itemsize": width * es}
    info = {"num_grads": X.shape[0], "grad_sizes": dict(M), "dtype": spec}
    if per_token is not None:
        info["attribute_tokens"] = True
        np.save(root / "offsets.npy", per_token)
    (root / "info.json").write_text(json.dumps(info))
    st = torch.from_numpy(arr.astype(np.float64))
    return torch.cat([st[:, place[m][0]:place[m][0] + hi - lo] for m, (lo, hi) in COLS.items()], 1)


LAYOUTS = {  # fields in another order than grad_sizes, 2-D sub-array fields, and padding between them
    "reordered": (44, {"c": (0, "(7,)"), "a": (7, "(13,)"), "b": (20, "(4,6)")}),
    "padded": (50, {"b": (1, "(6,4)"), "c": (27, "(7,)"), "a": (36, "(13,)")}),
}


@pytest.mark.parametrize("npdt", ["<f2", "bf16", "<f4", "<f8"])
def test_bergson_structured_records_search_as_their_module_columns(tmp_path, npdt):
    g = torch.Generator().manual_seed(9)
    X = torch.randn(30, D, generator=g, dtype=torch.float64).numpy()
    q = torch.randn(4, D, generator=g, dtype=torch.float64)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    H = (a @ a.T / D + 0.5 * torch.eye(D, dtype=torch.float64)).float()
    offs = np.array([0, 4, 4, 17, 30])
    for lname, (width, place) in LAYOUTS.items():
        root = tmp_path / lname
        want = _bergson_struct(root, X, npdt, width, place, per_token=offs if lname == "padded" else None)
        ix = GradientIndex.open(root)
        assert list(ix.modules.items()) == list(M.items()) and len(ix) == 30
        assert ix.dtype == {"<f2": torch.float16, "bf16": torch.bfloat16, "<f4": torch.float32,
                            "<f8": torch.float64}[npdt]
        assert torch.equal(ix.get(range(30)), want.float())
        if lname == "padded":
            assert ix.per_token and ix.offsets.tolist() == offs.tolist()
        for kw in ({}, {"unit_norm": True}, {"reverse": True, "modules": ["a", "c"], "weights": {"c": 2.0}},
                   {"pre": H, "mode": "both", "reverse": True}):
            call = {k: v for k, v in kw.items() if k not in ("pre", "mode")}
            if "pre" in kw:
                call["precondition"] = Precondition(kw["pre"], mode=kw["mode"])
            ref = _brute(want, q, **kw)
            S, I = ix.search(q, 30, batch_rows=7, **call)
            for r in range(q.shape[0]):
                _check_exact_topk(S[r:r + 1], I[r:r + 1], ref[r:r + 1], 30, kw.get("reverse", False))
            sf, i_f = ix.search(q, 30, batch_rows=7, backend="faiss", **call)
            assert torch.equal(i_f, I), (lname, kw)
            lm = GradientIndex.open(root, low_memory=True)
            s, i = lm.search(q, 30, batch_rows=3, **call)
            assert torch.equal(s, S) and torch.equal(i, I), (lname, kw)
            s, i = ix.search(q[2], 30, **call)
            assert torch.equal(s, S[2]) and torch.equal(i, I[2]), (lname, kw)


def test_bergson_structured_dtypes_gradkit_cannot_map_are_refused(tmp_path):
    X = np.zeros((3, D))
    for what, width, place, code, msg in (
            ("big-endian", 44, LAYOUTS["reordered"][1], ">f4", r"unsupported element dtype >f4"),
            ("short field", 44, {"c": (0, "(6,)"), "a": (7, "(13,)"), "b": (20, "(24,)")}, "<f4",
             r"field 'c' of .* does not hold 7 aligned elements"),
            ("ints", 44, LAYOUTS["reordered"][1], "<i4", r"unsupported element dtype int32")):
        root = tmp_path / what.replace(" ", "-")
        root.mkdir()
        np.zeros((3, width), np.float32).tofile(root / "gradients.bin")
        spec = {"names": list(place), "formats": [f"{shp}{code}" for _, shp in place.values()],
                "offsets": [off * 4 for off, _ in place.values()], "itemsize": width * 4}
        (root / "info.json").write_text(json.dumps({"num_grads": len(X), "grad_sizes": dict(M), "dtype": spec}))
        with pytest.raises(IndexFormatError, match=r"^open: " + msg):
            GradientIndex.open(root)


def test_bergson_attributor_in_float64_agrees(tmp_path):
    """bergson's own scoring run in float64 (``Attributor(dtype=torch.float64)``) on a float64 index and on a
    bf16 per-token one: the same top-k rows, scores within float32 error."""
    g = torch.Generator().manual_seed(10)
    sizes = dict(M)
    for npdt, per_token in ((np.float64, False), (ml_dtypes.bfloat16, True)):
        x = torch.randn(40, D, generator=g, dtype=torch.float64) * torch.rand(40, 1, generator=g, dtype=torch.float64)
        root = tmp_path / np.dtype(npdt).name
        if per_token:
            mm, _ = create_token_index(root, np.array([5, 0, 20, 15]), sizes, np.dtype(npdt))
            mm[:] = tensor_to_numpy(x.bfloat16())
        else:
            mm = create_index(root, 40, sizes, np.dtype(npdt))
            mm[:] = x.numpy()
        mm.flush()
        del mm
        GradientProcessor(projection_dim=None).save(root)
        ix = GradientIndex.open(root)
        q = torch.randn(3, D, generator=g, dtype=torch.float64)
        qd = {n: q[:, lo:hi] for n, (lo, hi) in COLS.items()}
        for un in (False, True):
            att = Attributor(root, unit_norm=un, dtype=torch.float64)
            for rev in (False, True):
                for mods in (None, {"b"}, {"a", "c"}):
                    theirs = att.search({n: t.clone() for n, t in qd.items()}, 8, modules=mods, reverse=rev)
                    s, i = ix.search(qd, 8, unit_norm=un, reverse=rev, modules=sorted(mods) if mods else None)
                    assert torch.equal(i, theirs.indices), (npdt, un, rev, mods)
                    torch.testing.assert_close(s.double(), theirs.values, rtol=2e-6, atol=2e-6)


def test_bergson_rows_holding_inf_rank_as_documented(tmp_path):
    """A row holding Inf scores +-inf; where the query is 0 on that column, or under cosine, it scores NaN and
    ranks last (reported -inf, +inf with reverse); ties by row; both backends, fp16 / fp32 / fp64 stores."""
    inf = float("inf")
    x = np.array([[1, 0, 0], [inf, 0, 0], [2, 0, 0], [0, -inf, 0], [0, 0, inf], [3, 0, 0], [-inf, 0, 0]])
    q = torch.tensor([[1.0, 1.0, 0.0]])
    expect = {  # (kwargs) -> (rows, scores)
        (): ([1, 5, 2, 0, 3, 4, 6], [inf, 3, 2, 1, -inf, -inf, -inf]),
        ("reverse",): ([3, 6, 0, 2, 5, 1, 4], [-inf, -inf, 1, 2, 3, inf, inf]),
        ("unit_norm",): ([0, 2, 5, 1, 3, 4, 6], [2 ** -0.5] * 3 + [-inf] * 4),
        ("unit_norm", "reverse"): ([0, 2, 5, 1, 3, 4, 6], [2 ** -0.5] * 3 + [inf] * 4),
        ("modules",): ([1, 5, 2, 0, 4, 3, 6], [inf, 3, 2, 1, 0, -inf, -inf]),  # column 2 (module b) not read
    }
    for npdt in (np.float16, np.float32, np.float64):
        root = tmp_path / np.dtype(npdt).name
        mm = create_index(root, len(x), {"a": 2, "b": 1}, npdt)
        mm[:] = x.astype(npdt)
        mm.flush()
        del mm
        ix = GradientIndex.open(root)
        for key, (rows, scores) in expect.items():
            kw = {k: True for k in key if k != "modules"}
            if "modules" in key:
                kw["modules"] = ["a"]
            for be in ("torch", "faiss"):
                s, i = ix.search(q, 7, backend=be, batch_rows=3, **kw)
                assert i.tolist() == [rows], (npdt, key, be)
                assert s[0].tolist() == pytest.approx(scores, rel=1e-6), (npdt, key, be)


def test_bergson_offsets_dtypes(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    for name, offs, ok in (("i32", np.array([0, 2, 2, 6], np.int32), True),
                           ("u16", np.array([0, 2, 2, 6], np.uint16), True),
                           ("big-endian", np.array([0, 2, 2, 6], ">i8"), True),
                           ("u64 decreasing", np.array([0, 5, 3, 6], np.uint64), False),  # DEFECT (fixed): message
                           ("u64 past int64", np.array([0, 2 ** 63 + 1, 6], np.uint64), False),
                           ("float", np.array([0, 2, 2, 6], np.float64), False),
                           ("bool", np.array([0, 1, 1, 1], bool), False)):
        root = tmp_path / name.replace(" ", "-")
        mm, _ = create_token_index(root, np.array([2, 0, 4]), {"a": 3}, np.float32)
        mm[:] = x
        mm.flush()
        del mm
        np.save(root / "offsets.npy", offs)
        if ok:
            ix = GradientIndex.open(root)
            assert ix.offsets.tolist() == [0, 2, 2, 6] and ix.example_of(range(6)).tolist() == [0, 0, 2, 2, 2, 2]
        else:
            with pytest.raises(IndexFormatError, match=r"^open: .*offsets\.npy is not a valid offsets array for 6 "
                                                       r"rows$"):
                GradientIndex.open(root)

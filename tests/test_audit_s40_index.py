"""Audit (session 40): GradientIndex.search and Precondition against a plain float64 PyTorch computation on the
stored rows (``index.get``), and the argument / failure paths around them.

Reference semantics (the module docstring, bergson's ``Attributor``): ``mode="query"``: q <- q (H + damping I)^-1;
``mode="both"``: q and every row <- . (H + damping I)^-1/2, then both unit-normalised; ``unit_norm``: one norm
over every module of the index (rows of norm 0 score 0); module selection and weights on the query's columns after
that; ``reverse``: lowest first; ties lowest row first.

Tests marked ``# DEFECT:`` failed on the code before session 40's fixes (python/gradkit/index.py) and check the
fixed behaviour; the others pin behaviour that was checked and found correct. Small shapes, one thread.
"""
import itertools
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

import gradkit.index as gindex
from gradkit.index import GradientIndex, NonFiniteGradientError, Precondition

pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")

torch.set_num_threads(1)

M = OrderedDict([("a", 4), ("b", 3), ("c", 2)])
D = 9
COLS = {"a": (0, 4), "b": (4, 7), "c": (7, 9)}


# ============================================================================ helpers


def _build(path, x, dtype=torch.float32, modules=M, **kw):
    with GradientIndex.create(path, modules, dtype=dtype, **kw) as w:
        half = x.shape[0] // 2
        w.append(x[:half])
        w.append(x[half:])
    return GradientIndex.open(path)


def _spd(d, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    return (a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)) * scale


def _mpow(h, p, damping):
    ev, v = torch.linalg.eigh(h.double())
    return (v * (ev + damping).pow(p)) @ v.T


def _transform(pre, p, damping):
    if isinstance(pre, torch.Tensor):
        return _mpow(pre, p, damping)
    t = torch.eye(D, dtype=torch.float64)
    for n, h in pre.items():
        lo, hi = COLS[n]
        t[lo:hi, lo:hi] = _mpow(h, p, damping)
    return t


def _unit(x):
    n = x.norm(dim=1, keepdim=True)
    return torch.where(n > 0, x / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(x))


def _reference(X, Q, unit_norm=False, modules=None, weights=None, pre=None, mode="query", damping=0.0):
    """float64 (Q, N) scores of the documented semantics; weights rounded to float32 as documented."""
    X, Q = X.double(), Q.double()
    if pre is not None:
        if mode == "query":
            Q = Q @ _transform(pre, -1.0, damping)
        else:
            t = _transform(pre, -0.5, damping)
            Q, X, unit_norm = Q @ t, X @ t, True
    if unit_norm:
        Q, X = _unit(Q), _unit(X)
    keep = torch.zeros(D, dtype=torch.float64)
    for m in (modules or list(M)):
        lo, hi = COLS[m]
        keep[lo:hi] = float(np.float32((weights or {}).get(m, 1.0)))
    return (Q * keep) @ X.T


def _topk(S, k, reverse=False):
    s, i = torch.sort(S, dim=1, descending=not reverse, stable=True)  # stable: ties lowest row first
    return s[:, :k], i[:, :k]


# ============================================================================ DEFECT 1: weights applied after the rescale


# DEFECT: the plain inner product brought a query row to [0.5, 1) only when its largest entry was >= 2**64 (or
# < 2**-64) and multiplied by the weights afterwards, in float32: a query of entries 1e18 (< 2**64, so not rescaled)
# weighted by 1e21 (a finite float32 weight, accepted) became +-inf in float32, so a row with 0 in that module scored
# NaN (ranked last, reported -inf) and rows whose true scores were +2e39 came back -inf: wrong signs, wrong order
# (reverse=True gave [0, 1, 2, 3] instead of [3, 2, 0, 1]). Correct: weights are applied in float64 and the weighted
# row is rescaled by a power of two before the float32 cast; scores out of float32's range are reported +-inf with
# the true sign and ranked by their true values.
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_weights_that_push_a_query_past_fp32_keep_signs_and_ranks(tmp_path, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    mods = OrderedDict([("a", 2), ("b", 2)])
    X = torch.tensor([[1., 0., 1., 0.], [0., 0., 2., 0.], [-1., 0., 0.5, 0.], [0.5, 0., -3., 0.]])
    ix = _build(tmp_path / "ix", X, modules=mods)
    Q = torch.tensor([[1e18, 0., 1e18, 0.]])
    for wts in ({"a": 1e21}, {"a": 1e21, "b": 1e21}):
        w64 = torch.tensor([float(np.float32(wts.get("a", 1.0)))] * 2 + [float(np.float32(wts.get("b", 1.0)))] * 2,
                           dtype=torch.float64)
        S = (Q.double() * w64) @ X.double().T
        for rev in (False, True):
            s, i = ix.search(Q, 4, weights=wts, reverse=rev, backend=backend)
            _, ri = _topk(S, 4, rev)
            assert i.tolist() == ri.tolist(), (wts, rev)
            want = S.gather(1, i)
            # the float32 value of the true score: +-inf past float32's range, with its sign
            assert torch.equal(s, want.to(torch.float32)) or torch.allclose(s.double(), want.to(torch.float32).double(),
                                                                            rtol=1e-6), (wts, rev, s, want)
            assert not torch.isnan(s).any()


# DEFECT: the same order made small weights underflow: a query of entries ~2**-60 (>= 2**-64, so not rescaled)
# times weights 2**-100 was 0 in float32, every score 0, and the "top-k" was rows 0..k-1. Correct: the ranking of
# the weighted query, its scores scaled back (0 or subnormal where float32 cannot hold them).
def test_weights_that_push_a_query_below_fp32_keep_the_ranking(tmp_path):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, D, generator=g)
    ix = _build(tmp_path / "ix", X)
    Q = torch.randn(3, D, generator=g) * 2.0 ** -60
    wts = {"a": 2.0 ** -100, "b": 2.0 ** -101, "c": 2.0 ** -99}
    S = _reference(X, Q, weights=wts)
    for rev in (False, True):
        s, i = ix.search(Q, 6, weights=wts, reverse=rev)
        _, ri = _topk(S, 6, rev)
        assert i.tolist() == ri.tolist()
        assert torch.equal(s, S.gather(1, i).to(torch.float32))  # below float32's range: 0
    # scores that float32 holds come back at full precision: weights 2**-60 on queries 2**-60 (products 2**-120)
    wts2 = {m: 2.0 ** -60 for m in M}
    s, i = ix.search(Q, 6, weights=wts2)
    S2 = _reference(X, Q, weights=wts2)
    assert i.tolist() == _topk(S2, 6)[1].tolist()
    assert torch.allclose(s.double(), S2.gather(1, i), rtol=1e-5, atol=0)
    # float64 queries below float32's range (scaled by _tiny_rows) and weights that bring them back into it
    Q64 = torch.randn(3, D, generator=g, dtype=torch.float64) * 1e-50
    wts3 = {m: 1e30 for m in M}
    s, i = ix.search(Q64, 6, weights=wts3)
    S3 = _reference(X, Q64, weights=wts3)
    assert i.tolist() == _topk(S3, 6)[1].tolist()
    assert torch.allclose(s.double(), S3.gather(1, i), rtol=1e-5, atol=0)


# ============================================================================ DEFECT 2: Precondition's cache key


# DEFECT: Precondition cached each matrix power under (module, p, damping, id(tensor), tensor._version). A dict
# entry replaced by a new tensor after the old one was freed gets the old tensor's id in CPython (the freed object's
# memory is reused by the next tensor of the same size), and a fresh tensor's version is 0 as the old one's was:
# search() silently used the powers of the old matrix. Correct: the cache entry holds the tensor it was computed
# from (its id cannot be reused while cached) and is used only for that very tensor.
def test_a_dict_matrix_replaced_after_its_powers_were_cached_is_used(tmp_path):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(25, D, generator=g)
    ix = _build(tmp_path / "ix", X)
    Q = torch.randn(2, D, generator=g)
    old = np.eye(4, dtype=np.float32)
    new = np.diag(np.array([1.0, 100.0, 0.01, 3.0], dtype=np.float32))
    S = {mode: _reference(X, Q, pre={"a": torch.from_numpy(new).double()}, mode=mode) for mode in ("query", "both")}
    for mode, trial in itertools.product(("query", "both"), range(10)):
        mats = {"a": torch.from_numpy(old.copy())}
        pre = Precondition(mats, mode=mode)
        ix.search(Q, 5, precondition=pre)  # powers of the identity cached
        oid = id(mats["a"])
        mats["a"] = None  # the old tensor is freed ...
        # ... and its memory (CPython: its id) usually goes to one of the next tensors made (version 0, as it was)
        cands = [torch.from_numpy(new.copy()) for _ in range(20)]
        h = next((c for c in cands if id(c) == oid), cands[0])
        del cands
        mats["a"] = h
        s, i = ix.search(Q, 5, precondition=pre)
        s_new, i_new = ix.search(Q, 5, precondition=Precondition({"a": h.clone()}, mode=mode))
        assert torch.equal(s, s_new) and torch.equal(i, i_new), (mode, trial)
        assert i.tolist() == _topk(S[mode], 5)[1].tolist(), (mode, trial)


# DEFECT: the dict of per-module matrices is the caller's own (not copied) and its entries were validated only in
# Precondition's constructor: an entry replaced afterwards by an integer tensor raised "torch.finfo() requires a
# floating point input type", by a non-tensor AttributeError ("'str' object has no attribute 'shape'"), by a NaN
# matrix "is not symmetric (max |H - H^T| = nan)". Correct: the entry is validated when it is used, by name.
def test_a_dict_matrix_replaced_by_an_invalid_value_is_refused_by_name(tmp_path):
    X = torch.randn(10, D)
    ix = _build(tmp_path / "ix", X)
    Q = torch.randn(2, D)
    mats = {"a": torch.eye(4)}
    pre = Precondition(mats)
    ix.search(Q, 3, precondition=pre)
    for bad, err, msg in ((torch.eye(4, dtype=torch.int64), TypeError, "floating"),
                          ("not a matrix", TypeError, "floating"),
                          (torch.full((4, 4), float("nan")), ValueError, "NaN"),
                          (torch.ones(4, 3), ValueError, "square")):
        mats["a"] = bad
        with pytest.raises(err, match=r"precondition: matrix\['a'\].*" + msg):
            ix.search(Q, 3, precondition=pre)
    # a full matrix edited in place to hold NaN: named as such, not as asymmetric
    h = torch.eye(D)
    pre = Precondition(h, mode="both")
    ix.search(Q, 3, precondition=pre)
    h[0, 0] = float("inf")
    with pytest.raises(ValueError, match="precondition: matrix: contains NaN or Inf"):
        ix.search(Q, 3, precondition=pre)


# ============================================================================ DEFECT 3: sparse tensors


# DEFECT: sparse (non-strided) queries, appended rows and precondition matrices passed every check and then failed
# inside torch with messages naming no argument ("reshape is not implemented for sparse tensors", a NotImplementedError
# listing every dispatch key). Correct: refused by name as not dense.
def test_sparse_queries_grads_and_matrices_are_refused_by_name(tmp_path):
    X = torch.randn(6, D)
    ix = _build(tmp_path / "ix", X)
    with pytest.raises(TypeError, match=r"^queries: expected a dense"):
        ix.search(torch.randn(2, D).to_sparse(), 2)
    q = dict(zip(M, torch.randn(2, D).split(list(M.values()), 1)))
    q["b"] = q["b"].to_sparse()
    with pytest.raises(TypeError, match=r"^queries\['b'\]: expected a dense"):
        ix.search(q, 2)
    with pytest.raises(TypeError, match=r"^precondition: matrix: expected a dense"):
        ix.search(torch.randn(2, D), 2, precondition=torch.eye(D).to_sparse())
    with pytest.raises(TypeError, match=r"^matrix\['c'\]: expected a dense"):
        Precondition({"c": torch.eye(2).to_sparse()})
    with GradientIndex.create(tmp_path / "w", M, dtype=torch.float16) as w:
        with pytest.raises(TypeError, match=r"^grads: expected a dense"):
            w.append(torch.randn(2, D).to_sparse())
        w.append(X[:2])
        assert len(w) == 2
    assert torch.equal(GradientIndex.open(tmp_path / "w").get([0, 1]), X[:2].half().float())


# ============================================================================ checked and found correct


def test_search_matches_a_float64_brute_force_over_every_mode(tmp_path):
    """Every combination of storage dtype, unit_norm, reverse, module subset, weights, full / partial per-module
    preconditioner in both modes with and without damping, and block size, against the float64 reference on the
    stored rows: scores within float32 round-off, the returned rows a valid top-k, exact duplicates lowest first."""
    g = torch.Generator().manual_seed(1)
    pres = [None, _spd(D, seed=1), {"a": _spd(4, seed=2), "c": _spd(2, 1e-3, seed=3)}]
    combos = list(itertools.product((False, True), (False, True), (None, ["a", "c"], ["b"]), (False, True),
                                    range(3), ("query", "both"), (0.0, 0.3)))
    combos = [c for c in combos if c[4] or (c[5] == "query" and c[6] == 0.0)]
    rng = np.random.default_rng(0)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        X = torch.randn(31, D, generator=g)
        X[5] = 0  # a zero row
        X[20] = X[3]  # an exact duplicate (other shard, other block)
        ix = _build(tmp_path / f"ix{str(dt)[6:]}", X, dtype=dt, shard_rows=10)
        Xs = ix.get(torch.arange(len(ix)))
        assert torch.equal(Xs, X.to(dt).float())
        Q = torch.randn(3, D, generator=g)
        for j in rng.choice(len(combos), size=40, replace=False):
            un, rev, mods, weighted, pi, mode, damp = combos[j]
            pre = pres[pi]
            wts = {m: [2.0, -0.5, 3.0][n] for n, m in enumerate(mods or list(M))} if weighted else None
            prec = None if pre is None else Precondition(pre, mode=mode, damping=damp)
            br = [None, 7][j % 2]
            s, i = ix.search(Q, 6, unit_norm=un, reverse=rev, modules=mods, weights=wts, precondition=prec,
                             batch_rows=br)
            S = _reference(Xs, Q, un, mods, wts, pre, mode, damp)
            rs, _ = _topk(S, 6, rev)
            tol = 1e-5 * max(1.0, float(rs.abs().max()))
            what = (dt, un, rev, mods, weighted, pi, mode, damp, br)
            assert torch.allclose(s.double(), rs, rtol=1e-4, atol=tol), what
            assert torch.allclose(S.gather(1, i), rs, rtol=1e-4, atol=tol), what  # the rows returned are a top-k
            for r in i.tolist():
                if 3 in r and 20 in r:
                    assert r.index(3) < r.index(20), what


def test_argument_errors_name_the_argument_before_any_work(tmp_path):
    X = torch.randn(13, D)
    ix = _build(tmp_path / "ix", X)
    Q = torch.randn(3, D)
    cases = [
        (dict(queries=Q, k=0), ValueError, r"^k: must be >= 1"),
        (dict(queries=Q, k=14), ValueError, r"^k: 14 is larger than the index \(13 rows\)"),
        (dict(queries=Q, k=True), TypeError, r"^k: expected an int"),
        (dict(queries=Q, k=2.0), TypeError, r"^k: expected an int"),
        (dict(queries=torch.randn(3, 8), k=2), ValueError, r"^queries: expected shape \(\.\.\., 9\)"),
        (dict(queries=torch.tensor(1.0), k=2), ValueError, r"^queries: expected shape"),
        (dict(queries=Q.long(), k=2), TypeError, r"^queries: expected a floating tensor"),
        (dict(queries=Q.to(torch.complex64), k=2), TypeError, r"^queries: expected a floating tensor"),
        (dict(queries=Q.numpy(), k=2), TypeError, r"^queries: expected a \(Q, 9\) tensor"),
        (dict(queries=torch.full((2, D), float("nan")), k=2), ValueError, r"^queries: rows \[0, 1\] hold NaN"),
        (dict(queries=Q.double() * 1e300, k=2), ValueError, r"^queries: rows \[0, 1, 2\] are finite but overflow"),
        (dict(queries={"a": torch.randn(2, 4)}, k=2), ValueError, r"^queries: module set differs"),
        (dict(queries=Q, k=2, unit_norm=1), TypeError, r"^unit_norm: expected a bool"),
        (dict(queries=Q, k=2, precondition=torch.eye(8)), ValueError, r"^precondition: matrix is 8 x 8 but the index"),
        (dict(queries=Q, k=2, precondition=torch.eye(D) + torch.triu(torch.ones(D, D), 1)), ValueError,
         r"^precondition: .*not symmetric"),
        (dict(queries=Q, k=2, precondition=torch.zeros(D, D)), ValueError, r"^precondition: .*not positive definite"),
        (dict(queries=Q, k=2, precondition=-torch.eye(D)), ValueError, r"^precondition: .*not positive definite"),
        (dict(queries=Q, k=2, precondition=torch.eye(D).long()), TypeError, r"^precondition: matrix: expected a float"),
        (dict(queries=Q, k=2, precondition={"z": torch.eye(2)}), ValueError, r"^precondition: matrices for modules"),
        (dict(queries=Q, k=2, precondition={"a": torch.eye(3)}), ValueError, r"^precondition: matrix\['a'\] is 3 x 3"),
        (dict(queries=Q, k=2, modules="a"), TypeError, r"^modules: expected a list"),
        (dict(queries=Q, k=2, modules=[]), ValueError, r"^modules: empty selection"),
        (dict(queries=Q, k=2, weights={"a": "1"}), ValueError, r"^weights\['a'\]: expected a finite number"),
        (dict(queries=Q, k=2, weights={"a": 1e39}), ValueError, r"^weights\['a'\]: .* outside float32's range"),
        (dict(queries=Q, k=2, modules=["b"], weights={"a": 1.0}), ValueError, r"^weights: module 'a' is not among"),
        (dict(queries=Q, k=2, batch_rows=0), ValueError, r"^batch_rows: must be >= 1"),
        (dict(queries=Q, k=2, backend="x"), ValueError, r"^backend: expected one of"),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            ix.search(**kw)
    with pytest.raises(ValueError, match=r"^mode: expected one of"):
        Precondition(torch.eye(D), mode="key")
    with pytest.raises(ValueError, match=r"^damping: expected a finite number >= 0"):
        Precondition(torch.eye(D), damping=-1)
    # a singular H is accepted with damping > 0 and then equals the reference
    sing = torch.zeros(D, D, dtype=torch.float64)
    sing[0, 0] = 2.0
    s, i = ix.search(Q, 4, precondition=Precondition(sing, damping=0.5))
    S = _reference(ix.get(torch.arange(13)), Q, pre=sing, damping=0.5)
    assert i.tolist() == _topk(S, 4)[1].tolist()
    # an index of 0 rows: every k is larger than it; an empty batch of queries gives (0, k) results
    with GradientIndex.create(tmp_path / "empty", M) as w:
        pass
    e = GradientIndex.open(tmp_path / "empty")
    assert len(e) == 0
    with pytest.raises(ValueError, match=r"^k: 1 is larger than the index \(0 rows\)"):
        e.search(Q, 1)
    s, i = ix.search(torch.randn(0, D), 2)
    assert s.shape == (0, 2) and i.shape == (0, 2) and s.dtype == torch.float32 and i.dtype == torch.int64
    s, i = ix.search(torch.randn(2, 0, D), 2)
    assert s.shape == (2, 0, 2)


def test_zero_norm_queries_and_k_equal_to_the_rows(tmp_path):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(8, D, generator=g)
    X[2] = 0
    ix = _build(tmp_path / "ix", X, dtype=torch.bfloat16)
    zero = torch.zeros(1, D)
    for kw in (dict(unit_norm=True), dict(), dict(precondition=Precondition(_spd(D), mode="both"))):
        for rev in (False, True):
            s, i = ix.search(zero, 8, reverse=rev, **kw)
            assert torch.equal(s, torch.zeros(1, 8)) and i.tolist() == [list(range(8))]
    # k == len(index): a full ranking, the zero row at score 0 among the others
    Q = torch.randn(2, D, generator=g)
    s, i = ix.search(Q, 8, unit_norm=True)
    S = _reference(ix.get(torch.arange(8)), Q, unit_norm=True)
    assert i.tolist() == _topk(S, 8)[1].tolist()
    assert torch.allclose(s.double(), _topk(S, 8)[0], atol=1e-6)


def test_results_do_not_depend_on_the_query_batch_or_block_size(tmp_path):
    g = torch.Generator().manual_seed(6)
    mods = OrderedDict([("a", 40), ("b", 27)])
    X = torch.randn(120, 67, generator=g)
    ix = _build(tmp_path / "ix", X, dtype=torch.float16, modules=mods)
    Q = torch.randn(9, 67, generator=g)
    for kw in ({}, {"unit_norm": True}, {"precondition": Precondition(torch.eye(67) * 2 + 0.1, mode="both")},
               {"modules": ["b"], "weights": {"b": 1e25}}):
        S, I = ix.search(Q, 7, **kw)
        for br in (1, 13):
            for j in (0, 4, 8):
                s, i = ix.search(Q[j:j + 1], 7, batch_rows=br, **kw)
                assert torch.equal(s[0], S[j]) and torch.equal(i[0], I[j]), (kw, br, j)


def test_failed_appends_leave_the_index_unchanged_and_a_reader_sees_committed_rows(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(7)
    mods = OrderedDict([("a", 3), ("b", 2)])
    X = torch.randn(40, 5, generator=g)
    p = tmp_path / "ix"
    w = GradientIndex.create(p, mods, dtype=torch.bfloat16, shard_rows=6)
    w.append(X[:10])
    reader = GradientIndex.open(p, allow_incomplete=True)
    assert len(reader) == 10
    # a write failing in the middle of a chunk that spans new shards: rolled back to the 10 committed rows
    real, calls = gindex._write_all, []

    def failing(fd, data):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(gindex, "_write_all", failing)
    with pytest.raises(OSError, match="holds its 10 committed rows"):
        w.append(X[10:25])
    monkeypatch.setattr(gindex, "_write_all", real)
    assert len(w) == 10 and sorted(os.listdir(p / "shards")) == ["r00000-000000.bin", "r00000-000001.bin"]
    with pytest.raises(ValueError, match=r"^grads: expected shape \(n, 5\)"):
        w.append(torch.randn(3, 4))
    with pytest.raises(NonFiniteGradientError):
        w.append(torch.tensor([[1.0, float("nan"), 0.0, 0.0, 0.0]]), on_nonfinite="error")
    assert len(w) == 10
    w.append(X[10:40])
    Q = torch.randn(3, 5, generator=g)
    s, i = reader.search(Q, 10)  # the reader opened during the build scores its 10 rows only
    S = _reference_plain(X[:10].bfloat16().float(), Q)
    assert i.tolist() == _topk(S, 10)[1].tolist()
    w.close()
    ix = GradientIndex.open(p)
    assert len(ix) == 40 and torch.equal(ix.get(torch.arange(40)), X.bfloat16().float())
    lm = GradientIndex.open(p, low_memory=True)
    for kw in ({}, {"unit_norm": True, "reverse": True}):
        s, i = ix.search(Q, 7, batch_rows=4, **kw)
        s2, i2 = lm.search(Q, 7, batch_rows=4, **kw)
        assert torch.equal(s, s2) and torch.equal(i, i2)
        S = _reference_plain(X.bfloat16().float(), Q, **kw)
        assert i.tolist() == _topk(S, 7, kw.get("reverse", False))[1].tolist()


def _reference_plain(X, Q, unit_norm=False, reverse=False):
    X, Q = X.double(), Q.double()
    if unit_norm:
        X, Q = _unit(X), _unit(Q)
    return Q @ X.T

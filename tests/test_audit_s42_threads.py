"""Session 42 audit: results that must not depend on the thread count, the batch composition or the chunking.

Each public entry point is run with ``torch.set_num_threads(1)`` and with 2 (restored afterwards), on shapes past
the kernels' split thresholds (csrc/cpu/*.cpp: factored_project's work items, ``factored_examples_per_item``;
score_topk's key chunks of ``kBlockKeys`` = 512 keys and query groups; golden's radix blocks of
``max(2^16, n / 2T)``; parammap's ``kGrain`` items; the scope kernels' 16384-element grains; obs_select /
obs_shared_prune / obs_sweep_'s ``kGrainElems``), and compared bit for bit where README.md, a docstring or a csrc
comment promises bits, else within a stated tolerance:

* bitwise (promised): ``factored_project``'s fused per-example op (README: "results are bitwise independent of
  thread count and batch"), ``GradientCollector`` rows made by it, ``project``'s sign-table path, ``score_topk`` and
  ``GradientIndex.search`` ("independent of blocking and threads"; a query's or row's preconditioned values "do not
  depend on the other rows in its block or the other queries"), index building, the scope / golden / parammap /
  adamw kernels and the obs ops whose comments say their results do not depend on threads;
* fixed in session 42: ``factored_project`` with an ``AdafactorNormalizer`` and ``bias=True`` (and so a
  ``GradientCollector`` with both) left the fused op for a Python composite whose bias term was a float32 BLAS
  product on the calling thread, so its bits followed the thread count and the batch; it is now two fused calls;
* within tolerance (no bitwise promise): the Adam normaliser's blocked products, ``per_token`` and float64
  factored projections, the preconditioner powers (float64 ``eigh`` on the calling thread) and every OBS pruner
  (``torch.linalg`` Cholesky / ``cholesky_inverse`` / ``solve_triangular`` on the calling thread in
  ``compute_inverse``, ``_active_inverse``, ``sparsegpt`` and ``resolve``; masks equal, weights within float32
  rounding).
"""
import contextlib
import os
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

from gradkit import _ext, ops
from gradkit import projection as P

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _at(n: int, fn, *args, **kwargs):
    with _threads(n):
        return fn(*args, **kwargs)


def _both(fn):
    """fn() at 1 thread and at 2 threads."""
    return _at(1, fn), _at(2, fn)


def _equal(x, y) -> bool:
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor):
        return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
    return x == y


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).abs().max()) / max(float(x.double().abs().max()), 1e-30)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- factored_project (fused)

# (B, T, I, O, p): T = 1 and 2 give work items of many examples whose count depends on the threads
# (factored_examples_per_item: 4 items per thread), T = 300 > kTokChunk = 256 the (example, chunk) items; p = 4, 16
# and 64 take the sign path on AMD CPUs, 8 and 12 the FMA kernel only
FUSED = [(1000, 1, 64, 48, 16), (701, 2, 33, 65, 64), (300, 5, 33, 31, 12), (37, 300, 40, 30, 4),
         (129, 13, 50, 40, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,I,O,p", FUSED)
def test_factored_project_fused_bits_any_threads_any_batch(B, T, I, O, p, dtype):
    gen = _gen(B * 31 + T * 7 + p)
    a = torch.randn(B, T, I, generator=gen).to(dtype)
    g = torch.randn(B, T, O, generator=gen).to(dtype)
    mask = torch.rand(B, T, generator=gen) < 0.7
    idx = torch.randperm(B, generator=gen)[: max(1, B // 3)]
    for bias in (False, True):
        def f(rows=slice(None)):
            return P.factored_project(a[rows], g[rows], p, seed=1, name="m", mask=mask[rows], bias=bias)

        r1, r2 = _both(f)
        assert torch.equal(r1, r2), f"bias={bias}: 2 threads changed the bits"
        assert torch.equal(_at(2, f, idx), r1[idx]), f"bias={bias}: a row's bits depend on the other rows of the batch"
        assert torch.equal(_at(1, f, slice(B - 1, B)), r1[B - 1:]), f"bias={bias}: a row alone differs"


@pytest.mark.parametrize("env", [{"GRADKIT_FACTORED_SIGN": "0"}, {"GRADKIT_FACTORED_SIGN": "1"},
                                 {"GRADKIT_FACTORED_ISA": "avx2"}, {"GRADKIT_FACTORED_ISA": "portable"}])
def test_factored_op_direct_bits_any_threads_every_kernel(env, monkeypatch):
    """torch.ops.gradkit.factored_project called directly, each CPU kernel (read per call): same bits at 1 and 2
    threads and for a subset of the examples."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    gen = _gen(11)
    B, T, I, O, p = 3001, 1, 40, 24, 64
    a, g = torch.randn(B * T, I, generator=gen), torch.randn(B * T, O, generator=gen)
    lt = P.projection_matrix(p, O, seed=5).T.contiguous()
    rt = P.projection_matrix(p, I, seed=6).T.contiguous()
    rb = torch.randn(p, generator=gen)
    mask = torch.rand(B * T, generator=gen) < 0.6
    r1, r2 = _both(lambda: torch.ops.gradkit.factored_project(a, g, lt, rt, rb, mask, T))
    assert torch.equal(r1, r2)
    sub = _at(2, lambda: torch.ops.gradkit.factored_project(a[100:400], g[100:400], lt, rt, rb, mask[100:400], T))
    assert torch.equal(sub, r1[100:400])


def test_factored_project_adafactor_without_bias_is_the_fused_op():
    gen = _gen(12)
    B, T, I, O, p = 5, 300, 700, 500, 16
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    nz = P.AdafactorNormalizer(torch.rand(O, generator=gen) + 0.1, torch.rand(I, generator=gen) + 0.1)

    def f(rows=slice(None)):
        return P.factored_project(a[rows], g[rows], p, seed=1, name="m", normalizer=nz)

    r1, r2 = _both(f)
    assert torch.equal(r1, r2)
    assert torch.equal(_at(1, f, slice(1, 2)), r1[1:2])


# (B, T, I, O, p): on the Zen 4 host the first two differed between 1 and 2 threads (MKL split the B x O x p bias
# product's O); the 1st, 2nd and 4th differed between a row alone (a GEMV) and the row in its batch
ADAFACTOR_BIAS = [(5, 300, 700, 500, 16), (7, 1, 4000, 3000, 64), (3, 1, 3000, 3000, 16), (4, 64, 256, 1024, 16)]


def test_factored_project_adafactor_bias_bits_any_threads_any_batch():
    bad = []
    for B, T, I, O, p in ADAFACTOR_BIAS:
        gen = _gen(B * 1000 + O)
        a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
        nz = P.AdafactorNormalizer(torch.rand(O, generator=gen) + 0.1, torch.rand(I, generator=gen) + 0.1,
                                   bias_avg_sq=torch.rand(O, generator=gen) + 0.1)

        def f(rows=slice(None)):
            return P.factored_project(a[rows], g[rows], p, seed=1, name="m", bias=True, normalizer=nz)

        r1, r2 = _both(f)
        if not torch.equal(r1, r2):
            bad.append(("threads", B, T, I, O, p))
        if not torch.equal(_at(1, f, slice(1, 2)), r1[1:2]):
            bad.append(("batch", B, T, I, O, p))
    assert not bad, bad


def test_factored_project_adam_threads_and_budget_within_float32_rounding():
    """AdamNormalizer forms G in blocks with torch products (no bitwise promise; the docstring: the result does not
    depend on the budget beyond float32 rounding). Thread count and budget stay within float32 summation error."""
    gen = _gen(13)
    B, T, I, O, p = 4, 100, 300, 200, 16
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    nz = P.AdamNormalizer(torch.rand(O, I, generator=gen), bias_avg_sq=torch.rand(O, generator=gen))
    ref = None
    for budget in (256 << 20, 1 << 19):
        for bias in (False, True):
            r1, r2 = _both(lambda: P.factored_project(a, g, p, seed=1, name="m", bias=bias, normalizer=nz,
                                                      memory_budget=budget))
            assert _rel(r1, r2) < 1e-5, (budget, bias)
            if not bias:
                ref = r1 if ref is None else ref
                assert _rel(ref, r1) < 1e-5
            one = _at(2, lambda: P.factored_project(a[2:3], g[2:3], p, seed=1, name="m", bias=bias, normalizer=nz,
                                                    memory_budget=budget))
            assert _rel(r1[2:3], one) < 1e-5


def test_factored_project_per_token_and_float64_within_rounding():
    """per_token (torch products, float32) and float64 inputs (float64 products rounded once): no bitwise promise
    across threads; per_token within float32 summation error, float64 within one float32 rounding."""
    gen = _gen(14)
    B, T, I, O, p = 3, 40, 2000, 1500, 16
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    r1, r2 = _both(lambda: P.factored_project(a, g, p, seed=1, name="m", per_token=True, bias=True))
    assert r1.shape == (B, T, p * p) and _rel(r1, r2) < 1e-5
    a64, g64 = a.double(), g.double()
    r1, r2 = _both(lambda: P.factored_project(a64, g64, p, seed=1, name="m", bias=True))
    ulp = torch.finfo(torch.float32).eps
    assert bool(((r1.double() - r2.double()).abs() <= ulp * r1.double().abs()).all())


# ----------------------------------------------------------------------------------------- GradientCollector


def _linear_collect(X, Gf, rows, **kw):
    """A one-Linear model whose hooked input is X and output gradient exactly Gf (loss = sum(out * Gf))."""
    model = torch.nn.Sequential(torch.nn.Linear(X.shape[-1], Gf.shape[-1]))
    col = P.GradientCollector(model, p=16, seed=0, **kw)
    with col:
        (model(X[rows]) * Gf[rows]).sum().backward()
        return col.collect(flat=True)


def _collector_inputs():
    gen = _gen(15)
    B, T, I, O = 5, 300, 700, 500
    X, Gf = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    af = P.AdafactorNormalizer(torch.rand(O, generator=gen) + 0.1, torch.rand(I, generator=gen) + 0.1,
                               bias_avg_sq=torch.rand(O, generator=gen) + 0.1)
    return X, Gf, af


@pytest.mark.parametrize("kind", ["plain", "bias", "adafactor"])
def test_collector_rows_bits_any_threads_any_batch(kind):
    X, Gf, af = _collector_inputs()
    kw = {"plain": {}, "bias": {"bias": True}, "adafactor": {"normalizers": {"0": af}}}[kind]
    r1, r2 = _both(lambda: _linear_collect(X, Gf, slice(None), **kw))
    assert torch.equal(r1, r2)
    assert torch.equal(_at(2, lambda: _linear_collect(X, Gf, slice(1, 2), **kw)), r1[1:2])
    assert torch.equal(_at(1, lambda: _linear_collect(X, Gf, slice(2, 5), **kw)), r1[2:5])


def test_collector_adafactor_bias_rows_bits_any_threads_any_batch():
    X, Gf, af = _collector_inputs()
    kw = {"bias": True, "normalizers": {"0": af}}
    r1, r2 = _both(lambda: _linear_collect(X, Gf, slice(None), **kw))
    one = _at(1, lambda: _linear_collect(X, Gf, slice(1, 2), **kw))
    assert torch.equal(r1, r2) and torch.equal(one, r1[1:2])


def test_collector_per_token_within_rounding():
    X, Gf, _ = _collector_inputs()
    r1, r2 = _both(lambda: _linear_collect(X[:2, :50], Gf[:2, :50], slice(None), per_token=True))
    assert _rel(r1, r2) < 1e-5


# ----------------------------------------------------------------------------------------- flat projection


@pytest.mark.parametrize("B,D,k", [(4, 100000, 64), (300, 20000, 512), (3, 70000, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_project_sign_table_path_bits_any_threads(B, D, k, dtype):
    """Rademacher at B >= 4, k >= 32 takes the sign-table path (AVX2 / AVX-512), whose outputs are split over
    threads by (row tile, output range) with a thread-count-dependent jsplit: each output's sum has one order.
    (tests/test_s42_flat_threads.py covers the GEMM path.)"""
    x = torch.randn(B, D, generator=_gen(B + D + k)).to(dtype)
    for chunk in (None, 7000):
        r1, r2 = _both(lambda: P.project(x, k, seed=2, kind="rademacher", chunk=chunk))
        assert torch.equal(r1, r2), chunk
    r1, r2 = _both(lambda: torch.ops.gradkit.project_flat(x, k, 2, 0, 5))
    assert torch.equal(r1, r2)


# ----------------------------------------------------------------------------------------- score_topk / search


@pytest.mark.parametrize("isa", [None, "avx2", "blas"])
@pytest.mark.parametrize("kdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_score_topk_bits_any_threads_queries_blocks(isa, kdtype, monkeypatch):
    """README: the same bits independent of blocking and threads (GRADKIT_SEARCH_ISA is read per call)."""
    if isa is None:
        monkeypatch.delenv("GRADKIT_SEARCH_ISA", raising=False)
    else:
        monkeypatch.setenv("GRADKIT_SEARCH_ISA", isa)
    gen = _gen(16)
    for Q, N, D in [(5, 3000, 4000), (33, 5000, 257), (1, 20000, 300)]:
        q = torch.randn(Q, D, generator=gen)
        keys = torch.randn(N, D, generator=gen)
        keys[N // 2] = keys[3]  # equal rows tie to the lower one
        keys = keys.to(kdtype)
        sc = torch.rand(N, generator=gen) + 0.5
        r1, r2 = _both(lambda: ops.score_topk(q, keys, 10, key_scale=sc))
        assert _equal(r1, r2), (Q, N, D)
        one = _at(2, lambda: torch.ops.gradkit.score_topk(q[-1:], keys, 10, True, sc, None, None, 0))
        assert _equal(one[0], r1[0][-1:]) and _equal(one[1], r1[1][-1:])
        c = N // 3
        first = _at(1, lambda: ops.score_topk(q, keys[:c], 10, key_scale=sc[:c]))
        merged = _at(2, lambda: ops.score_topk(q, keys[c:], 10, key_scale=sc[c:], scores_in=first[0],
                                               idx_in=first[1], base=c))
        assert _equal(merged, r1)


@pytest.fixture(scope="module")
def fp16_index(tmp_path_factory):
    from gradkit.index import GradientIndex

    path = str(tmp_path_factory.mktemp("s42threads") / "idx")
    gen = _gen(17)
    rows = torch.randn(1100, 500, generator=gen) * torch.rand(1100, 1, generator=gen)
    rows[1000] = rows[10]  # an exact duplicate: ties go to the lower row
    with GradientIndex.create(path, OrderedDict(a=300, b=200), dtype=torch.float16) as ix:
        ix.append(rows[:1])
        ix.append(rows[1:])
    return path


def _precond(kind: str):
    from gradkit.index import Precondition

    gen = _gen(18)
    A = torch.randn(500, 500, generator=gen)
    H = A @ A.T / 500 + 0.1 * torch.eye(500)
    Ha = torch.randn(300, 300, generator=gen)
    Ha = Ha @ Ha.T / 300 + 0.1 * torch.eye(300)
    return {"full-query": lambda: Precondition(H, mode="query"), "full-both": lambda: Precondition(H, mode="both"),
            "dict-query": lambda: Precondition({"a": Ha}, mode="query"),
            "dict-both": lambda: Precondition({"a": Ha}, mode="both")}[kind]


SEARCHES = {"plain": {}, "unit": {"unit_norm": True}, "reverse": {"unit_norm": True, "reverse": True},
            "weights": {"weights": {"a": 0.5, "b": 3.0}}, "modules": {"modules": ["b"], "unit_norm": True},
            "full-query": {"precondition": "full-query"}, "full-both": {"precondition": "full-both"},
            "dict-query": {"precondition": "dict-query"}, "dict-both": {"precondition": "dict-both"}}


@pytest.mark.parametrize("name", list(SEARCHES))
def test_search_bits_any_threads_batch_rows_queries(fp16_index, name):
    from gradkit.index import GradientIndex

    kw = dict(SEARCHES[name])
    if "precondition" in kw:
        kw["precondition"] = _precond(kw["precondition"])()  # powers cached on the object, as a user reuses it
    ix = GradientIndex.open(fp16_index)
    qs = torch.randn(5, 500, generator=_gen(19))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the index records no projection: nothing to warn about
        r1, r2 = _both(lambda: ix.search(qs, 10, **kw))
        assert _equal(r1, r2), "2 threads changed the results"
        # one row per block on one thread (many small calls: cheap there), 333-row blocks on two
        for br, t in ((1, 1), (333, 2)):
            assert _equal(_at(t, lambda: ix.search(qs, 10, batch_rows=br, **kw)), r1), f"batch_rows={br}"
        one = _at(2, lambda: ix.search(qs[2:3], 10, **kw))
        assert _equal(one[0], r1[0][2:3]) and _equal(one[1], r1[1][2:3]), "a query alone differs"
        low = GradientIndex.open(fp16_index, low_memory=True)
        assert _equal(_at(2, lambda: low.search(qs, 10, **kw)), r1), "low_memory"


@pytest.mark.parametrize("kind", ["full-query", "full-both"])
def test_search_precondition_fresh_powers_any_threads(fp16_index, kind):
    """Powers computed afresh at each thread count (float64 eigh on the calling thread, whose bits follow the
    thread count): on this matrix the float32 powers, hence the results, are the same."""
    from gradkit.index import GradientIndex

    ix = GradientIndex.open(fp16_index)
    qs = torch.randn(5, 500, generator=_gen(20))
    mk = _precond(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r1, r2 = _both(lambda: ix.search(qs, 10, precondition=mk()))
    assert _equal(r1, r2)


def test_precondition_powers_within_one_float32_ulp_across_threads():
    """Precondition's powers come from float64 eigh and GEMMs on the calling thread (no bitwise promise across
    thread counts: MKL's eigh vectors differ in their last float64 bits); rounded to float32 they agree within one
    float32 ulp of the largest entry, with the same power-of-two exponent."""
    from gradkit.index import Precondition

    gen = _gen(21)
    A = torch.randn(400, 400, generator=gen)
    H = A @ A.T / 400 + 0.1 * torch.eye(400)
    mods = OrderedDict(a=400)
    for p in (-1.0, -0.5):
        b1, b2 = _both(lambda: Precondition(H).blocks(mods, p))
        (_, _, m1, e1), (_, _, m2, e2) = b1[0], b2[0]
        assert e1 == e2
        assert float((m1 - m2).abs().max()) <= torch.finfo(torch.float32).eps * float(m1.abs().max())


def test_index_build_bits_any_threads_any_chunking(tmp_path):
    """float64 rows rounded into fp16 / bf16 (round to odd, then the cast) give the same stored bytes at 1 and 2
    threads and for any split of the appends."""
    from gradkit.index import GradientIndex

    rows = torch.randn(700, 4500, generator=_gen(22), dtype=torch.float64) * 10
    mods = OrderedDict(a=3000, b=1500)

    def build(name, t, cuts):
        path = str(tmp_path / name)

        def f():
            with GradientIndex.create(path, mods, dtype=dt) as ix:
                for a, b in zip(cuts[:-1], cuts[1:]):
                    ix.append(rows[a:b])

        _at(t, f)
        sh = os.path.join(path, "shards")
        return [np.fromfile(os.path.join(sh, s), dtype=np.uint8) for s in sorted(os.listdir(sh))]

    for dt in (torch.float16, torch.bfloat16):
        a = build(f"a{dt}", 1, [0, 700])
        b = build(f"b{dt}", 2, [0, 700])
        c = build(f"c{dt}", 2, [0, 1, 300, 700])
        assert len(a) == len(b) == len(c)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), dt
        assert all(np.array_equal(x, y) for x, y in zip(a, c)), dt


# ----------------------------------------------------------------------------------------- scope / golden / parammap


@pytest.mark.parametrize("shape,block,scope", [((1024, 2048), (1, 1), (1, 4)), ((1024, 1024), (1, 16), (8, 2)),
                                               ((256, 8192), (1, 1), (1, -1)), ((3, 400003), (1, 1), (-1, -1)),
                                               ((64, 32000), (4, 64), (1, 1))])
def test_scope_kernels_bits_any_threads(shape, block, scope):
    x = torch.randn(*shape, generator=_gen(sum(shape)))
    sc = tuple(s if s > 0 else shape[i] // block[i] for i, s in enumerate(scope))
    nnz = max(1, sc[0] * sc[1] // 2)
    grid = tuple(shape[i] // block[i] for i in range(2))
    th = torch.rand(grid, generator=_gen(1))
    cond = torch.rand(shape, generator=_gen(2)) + 0.5

    def run():
        out = [ops.block_norms(x, block), ops.block_norms(x, block, p=1.0), ops.scope_kth(x, block, sc, 1),
               ops.scope_mask(x, block, sc, nnz)]
        y = x.clone()
        ops.scope_hard_threshold_(y, block, sc, nnz)
        z = x.clone()
        ops.block_soft_threshold_(z, block, th)
        c = x.clone()
        ops.block_soft_threshold_(c, block, th, conditioner=cond)
        return out + [y, z, c]

    assert _equal(*_both(run))


def test_scope_api_coupled_and_global_bits_any_threads():
    from gradkit.scope import BlockCoupling, BlockSpec, ScopeSpec, View

    gen = _gen(23)
    q, k, v = (torch.randn(1024, 256, generator=gen) for _ in range(3))
    o = torch.randn(256, 1024, generator=gen)
    W = torch.randn(2048, 2048, generator=gen)

    def run():
        qq, kk, vv, oo, ww = q.clone(), k.clone(), v.clone(), o.clone(), W.clone()
        heads = ScopeSpec(BlockCoupling([BlockSpec(qq, (1, -1)), BlockSpec(kk, (1, -1)), BlockSpec(vv, (1, -1)),
                                         BlockSpec(oo, (-1, 1))], [(0, 1), (0, 1), (0, 1), (1, 0)]), (-1, 1))
        masks = list(heads.get_masks(300, format="param").values())
        heads.hard_threshold(nnz=300)
        pairs = ScopeSpec(BlockSpec(View.pairs(ww), (1, 1, 1, 2)), (1, 1, 4, 1))
        whole = ScopeSpec(BlockSpec(ww, (1, 1)), (-1, -1))
        masks += [pairs.get_masks(2)[pairs.block], whole.get_masks(1_000_000)[whole.block],
                  whole.kth_largest(nnz=1_000_000), whole.mid_kth_largest(nnz=1_000_000)]
        rows16 = ScopeSpec(BlockSpec(View.row_pairs(ww), (1, 1, 1, 16)), (1, 1, 2, 1))
        th = torch.rand(rows16.grid_shape, generator=_gen(5))
        rows16.soft_threshold(th, conditioners=torch.rand(ww.shape, generator=_gen(6)) + 0.5, scale=True)
        return masks + [qq, kk, vv, oo, ww]

    assert _equal(*_both(run))


def test_golden_and_topk_bits_any_threads():
    import gradkit.golden as G

    gen = _gen(24)
    x = torch.randn(600_000, generator=gen)  # radix blocks of max(2^16, n / 2T): 2 at 1 thread, 4 at 2

    def run():
        out = []
        for k in (1, 777, 300_000):
            bits = torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8)
            cnt = torch.zeros(x.numel(), dtype=torch.int32)
            tot = ops.golden_topk_and_(x, bits, k, counts=cnt, first=True)
            out += [bits, cnt, int(tot), ops.topk_select(x.abs(), k),
                    ops.topk_select_segments([x[:250_000].abs(), x[250_000:].abs()], k)]
        return out

    assert _equal(*_both(run))
    grads = [{"a": torch.randn(600, 500, generator=gen), "b": torch.randn(3000, generator=gen).half()}
             for _ in range(3)]
    for scope in ("tensor", "global"):
        def gm():
            r = G.golden_masks(grads, 1.0, scope=scope, return_counts=True)
            return [r.masks[n].bits for n in r.masks], r.counts, r.history

        assert _equal(*_both(gm)), scope


def test_parammap_and_segment_ops_bits_any_threads():
    from gradkit.parammap import ParamMap

    gen = _gen(25)
    shapes = {f"w{i}": (700, 333) for i in range(4)}
    model = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.randn(*s, generator=gen)) for n, s in shapes.items()})
    for p in model.values():
        p.grad = torch.randn(p.shape, generator=gen)
    pm = ParamMap.from_model(model, list(shapes), masks={n: torch.rand(s, generator=gen) < 0.3
                                                         for n, s in shapes.items()})
    flat = torch.randn(pm.input_dim, generator=gen)
    imp = torch.rand(pm.input_dim, generator=gen)
    src = [p.grad for p in model.values()]
    idx = [torch.randperm(233_100, generator=gen)[:90_000], None, None, torch.arange(0, 233_100, 3)]

    def run():
        d = [s.clone() for s in src]
        ops.scatter_segments_(ops.gather_segments(src, idx) * 0.5, idx, d, scale=1.7, accumulate=True)
        m = torch.rand(2_000_000, generator=_gen(3)) < 0.1
        bits = ops.pack_bitmask(m)
        return [pm.gather(model), pm.scatter(flat), pm.prune(threshold=0.1, topk=0.37, importance=imp)[1], pm.hash,
                d, ops.mask_to_indices(m), bits, ops.bitmask_to_indices(bits, m.numel()), ops.bitmask_count([bits])]

    assert _equal(*_both(run))


def test_masked_adamw_bits_any_threads():
    from gradkit.optim import MaskedAdamW

    def run():
        ps = {"a": torch.nn.Parameter(torch.randn(1000, 700, generator=_gen(1))),
              "b": torch.nn.Parameter(torch.randn(7777, generator=_gen(2)))}
        ms = {"a": torch.rand(1000, 700, generator=_gen(3)) < 0.5, "b": torch.rand(7777, generator=_gen(4)) < 0.5}
        opt = MaskedAdamW(ps.items(), ms, masked_lr=1e-3, unmasked_lr=1e-4, amsgrad=True)
        for s in range(3):
            for p in ps.values():
                p.grad = torch.randn(p.shape, generator=_gen(10 + s))
            opt.step()
        return [p.detach() for p in ps.values()] + [opt.state[p]["exp_avg_sq"] for p in ps.values()]

    assert _equal(*_both(run))


# ----------------------------------------------------------------------------------------- OBS


def test_obs_ops_bits_any_threads():
    """obs_select, obs_shared_prune ("results do not depend on threads", csrc/cpu/obs.cpp) and obs_sweep_ ("the same
    bits on every backend"), called through torch.ops.gradkit, on sizes that split over threads."""
    gen = _gen(26)
    n, nq = 2048, 64
    w = torch.randn(n, nq * 4, generator=gen)
    d = torch.rand(n, nq * 4, generator=gen) + 0.1
    r1, r2 = _both(lambda: torch.ops.gradkit.obs_select(w, d, 4, 1, 2, 1e-8))
    assert torch.equal(r1, r2)
    assert torch.equal(_at(2, lambda: torch.ops.gradkit.obs_select(w[5:9], d[5:9], 4, 1, 2, 1e-8)), r1[5:9])
    K = nq * 4
    A = torch.randn(K, K, generator=gen)
    c = A @ A.T / K + torch.eye(K)
    pidx = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    cinv = torch.randn(nq, 6, 2, 2, generator=gen)
    cinv = cinv @ cinv.transpose(-1, -2) + torch.eye(2)
    for local in (True, False):
        r1, r2 = _both(lambda: torch.ops.gradkit.obs_shared_prune(w, c, cinv, pidx, 4, local))
        assert _equal(r1, r2)
        sub = _at(2, lambda: torch.ops.gradkit.obs_shared_prune(w[7:8], c, cinv, pidx, 4, local))
        assert _equal(sub[0], r1[0][7:8]) and _equal(sub[1], r1[1][7:8])
    m, bs = 8192, 64
    B = torch.randn(bs, bs, generator=gen, dtype=torch.float64)
    u = torch.linalg.cholesky(B @ B.T + bs * torch.eye(bs, dtype=torch.float64), upper=True)
    w0 = torch.randn(bs, m, generator=gen, dtype=torch.float64)
    pr = torch.rand(bs, m, generator=gen) < 0.5
    for dt in (torch.float32, torch.float64):
        outs = []
        for t in (1, 2):
            ww, err = w0.to(dt).clone(), torch.zeros(bs, m, dtype=dt)
            _at(t, torch.ops.gradkit.obs_sweep_, ww, err, u.to(dt), pr, 0, bs)
            outs.append((ww, err))
        assert _equal(*outs), dt


def _obs_problem():
    gen = _gen(27)
    M, K = 64, 256
    W0 = torch.randn(M, K, generator=gen)
    X = torch.randn(2 * K, K, generator=gen) * torch.rand(K, generator=gen)
    return W0, X.T @ X, torch.rand(M, K, generator=gen) < 0.5


def _obs_methods():
    from gradkit.obs import StructuredOBS, magnitude, obd, sparsegpt

    return {
        "true_obs": lambda sc, H: StructuredOBS(sc, H, damp=0.01).prune_true_obs(2, return_mask=True),
        "true_obs joint": lambda sc, H: StructuredOBS(sc, H, damp=0.01).prune_true_obs(2, scoring="joint",
                                                                                      return_mask=True),
        "true_obs largest_first": lambda sc, H: StructuredOBS(sc, H, damp=0.01).prune_true_obs(
            2, order="largest_first", return_mask=True),
        "true_obs resolve": lambda sc, H: StructuredOBS(sc, H, damp=0.01).prune_true_obs(2, mode="resolve",
                                                                                        return_mask=True),
        "prune local": lambda sc, H: StructuredOBS(sc, H, damp=0.01).prune(2, return_mask=True),
        "prune full": lambda sc, H: StructuredOBS(sc, H, damp=0.01).prune(2, compensate="full", return_mask=True),
        "prune split": lambda sc, H: StructuredOBS(sc, H, damp=0.01).prune(2, compensate="split", n_splits=2,
                                                                          return_mask=True),
        "prune interleaved": lambda sc, H: StructuredOBS(sc, H, damp=0.01).prune(2, compensate="interleaved",
                                                                                n_splits=2, return_mask=True),
        "sparsegpt": lambda sc, H: sparsegpt(sc, H, 2, inplace=True),
        "obd": lambda sc, H: obd(sc, H, 2, damp=0.01, inplace=True),
        "magnitude": lambda sc, H: magnitude(sc, 2, inplace=True),
    }


@pytest.mark.parametrize("method", list(_obs_methods()))
def test_obs_pruners_threads_within_float32_rounding(method):
    """No bitwise promise across thread counts: compute_inverse's cholesky_ex / cholesky_inverse, _active_inverse,
    sparsegpt's Cholesky and triangular inverse run torch.linalg on the calling thread with its MKL threads
    (at K = 256 their bits differ between 1 and 2 threads). Masks agree and weights stay within float32 rounding."""
    import gradkit.scope as S

    W0, H, _ = _obs_problem()
    fn = _obs_methods()[method]
    res = []
    for t in (1, 2):
        W = torch.nn.Parameter(W0.clone())
        out = _at(t, fn, S.ScopeSpec(S.BlockSpec(W, (1, 1)), (1, 4)), H)
        res.append((W.detach().clone(), out))
    (w1, o1), (w2, o2) = res
    assert torch.equal(w1 != 0, w2 != 0), "the pruned support depends on the thread count"
    assert _rel(w1, w2) < 1e-5
    if isinstance(o1, torch.Tensor) and o1.dtype == torch.bool:
        assert torch.equal(o1, o2)


def test_obs_inverse_resolve_error_within_float32_rounding():
    from gradkit.obs import compute_inverse, damped_hessian, output_error, resolve

    W0, H, keep = _obs_problem()
    c1, c2 = _both(lambda: compute_inverse(H, 0.01))
    assert _rel(c1, c2) < 1e-5
    d1, d2 = _both(lambda: damped_hessian(H, 0.01))
    assert _equal(d1, d2)  # elementwise: the same bits
    r1, r2 = _both(lambda: resolve(W0, H, keep, damp=0.01))
    assert torch.equal(r1 != 0, r2 != 0) and _rel(r1, r2) < 1e-5
    e1, e2 = _both(lambda: output_error(W0, r1, H=H))
    assert abs(e1 - e2) <= 1e-6 * abs(e1)

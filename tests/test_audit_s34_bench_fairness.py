"""s34 audit: do the benchmarks compare like with like?

Each benchmark module's provider functions are run at tiny shapes through a recording stand-in for the
harness's Recorder (every timed callable is called once and kept, with the keyword arguments its timing got) and
a stand-in for harness.time_interleaved (each provider called once). The tests then check, on the captured
callables themselves, that both sides of a comparison do the same work (shapes, dtype, k / p, threads), that
their outputs are right, and how the timing and the ratio are set up.

Tests of correct behaviour pass. A test marked ``# DEFECT:`` shows an unfair comparison and fails on the
current code.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402

bergson = pytest.importorskip("bergson")


# ---------------------------------------------------------------------------------------------- stand-ins


class FakeRec:
    """harness.Recorder's interface; rec.time calls fn once and keeps (fn, kwargs) for the row added next."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.min_run_time = 0.01
        self.rows = []
        self._last = None

    def time(self, fn, **kw):
        fn()
        self._last = (fn, kw)
        return {"p20": 1.0, "p50": 1.0, "p80": 1.0, "n": 1}

    time_raw = time

    def add(self, family, op, provider, shape, dtype, stats, metric="seconds", **extra):
        fn, kw = self._last if (self._last is not None and metric == "seconds") else (None, None)
        self.rows.append({"family": family, "op": op, "provider": provider, "shape": shape, "dtype": dtype,
                          "metric": metric, "fn": fn, "time_kw": kw, **stats, **extra})
        if metric == "seconds":
            self._last = None

    def find(self, op, provider):
        got = [r for r in self.rows if r["op"] == op and r["provider"] == provider and r["metric"] == "seconds"]
        assert got, f"no row ({op!r}, {provider!r}); rows: {[(r['op'], r['provider']) for r in self.rows]}"
        return got[0]


INTERLEAVED = []  # (fns dict, baseline) of every time_interleaved call


def fake_interleaved(fns, rounds=30, calls=10, baseline=None):
    INTERLEAVED.append((dict(fns), baseline))
    out = {}
    for n, f in fns.items():
        f()
        st = {"p20": 1.0, "p50": 1.0, "p80": 1.0, "n": rounds * calls}
        if baseline is not None and n != baseline:
            st.update(ratio_p20=1.0, ratio_p50=1.0, ratio_p80=1.0)
        out[n] = st
    return out


@pytest.fixture
def threads2():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _nonlocals(fn):
    """fn's closure variables, empty cells (deleted after the timing) left out."""
    out = {}
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            out[var] = cell.cell_contents
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------------------------------------- flat projection

FLAT_B, FLAT_D, FLAT_K = 4, 2048, 64


TRAK_PROJECTORS = []


def _flat(kind):
    import bench_projection
    import trak.projectors as tp

    real = tp.BasicProjector

    class Kept(real):  # keeps the projector the benchmark builds (it deletes its own reference after timing)
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            TRAK_PROJECTORS.append(self)

    TRAK_PROJECTORS.clear()
    tp.BasicProjector = Kept
    try:
        x = torch.randn(FLAT_B, FLAT_D, generator=torch.Generator().manual_seed(3))
        rec = FakeRec()
        bench_projection._flat_rows(rec, kind, x, FLAT_K, "note")
    finally:
        tp.BasicProjector = real
    return rec, x


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_flat_providers_project_the_same_gradients_to_the_same_k(kind, threads2):
    """gradkit, bergson's project_global and TRAK's BasicProjector get the same (B, D) fp32 tensor and the same k
    and each returns a correct projection x @ M of it, M (D, k) its own matrix of the asked kind."""
    from bergson.collector.collector import global_projection_blocks

    from gradkit import projection as P

    rec, x = _flat(kind)
    op = f"flat {kind}"
    gk, bg, tr = (rec.find(op, p) for p in ("gradkit", "bergson 2.5.1", "trak BasicProjector"))
    (proj,) = TRAK_PROJECTORS  # TRAK's lambda is proj.project(x, model_id=0); _flat_rows deletes proj after timing
    # the peers' timed calls are wrapped to keep their last output for the benchmark's own check (session 34)
    bg_fn, tr_fn = (_nonlocals(r["fn"])["fn"] for r in (bg, tr))
    assert tr_fn.__code__.co_freevars == ("proj", "x") and _nonlocals(tr_fn)["x"] is x
    calls = {"gradkit": gk["fn"], "bergson": bg_fn, "trak": lambda: proj.project(x, model_id=0)}
    for f in (gk["fn"], bg_fn):
        nl = _nonlocals(f)
        assert nl["x"] is x and nl.get("k", FLAT_K) == FLAT_K
    for name, f in calls.items():
        y = f()
        assert y.shape == (FLAT_B, FLAT_K) and y.dtype == torch.float32, name
    # gradkit: x @ R^T with its documented matrix
    R = P.projection_matrix(FLAT_K, FLAT_D, seed=0, kind=kind)
    torch.testing.assert_close(gk["fn"](), x @ R.T, rtol=1e-4, atol=1e-4)
    # bergson: x @ R^T / sqrt(k), R its Philox blocks (normal for gradkit's gaussian)
    pk = "rademacher" if kind == "rademacher" else "normal"
    Rb = torch.cat([b for _, _, b in global_projection_blocks("bench/single", FLAT_K, FLAT_D, torch.float32,
                                                              torch.device("cpu"), pk)], 1)
    assert Rb.shape == (FLAT_K, FLAT_D)
    torch.testing.assert_close(bg["fn"](), x @ Rb.T / math.sqrt(FLAT_K), rtol=1e-4, atol=1e-4)
    # TRAK: its matrix, recovered by projecting the identity with the same projector object
    assert (proj.grad_dim, proj.proj_dim) == (FLAT_D, FLAT_K)
    M = proj.project(torch.eye(FLAT_D), model_id=0)
    if kind == "rademacher":
        assert set(M.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(calls["trak"](), x @ M, rtol=1e-4, atol=1e-3)


def test_flat_benchmark_checks_the_peers_outputs(monkeypatch, threads2):
    # DEFECT: bench_projection.py:76-101 (_flat_rows, peers at :87 and :97) times bergson's project_global and TRAK's project without
    # ever looking at what they return (only gradkit is checked, lines 39-51): a misconfigured peer call (wrong
    # D, k, kind, or a no-op) would be timed and reported as a ratio. Here both peers are replaced by calls that
    # return zeros of the right shape, and the benchmark records their rows without complaint.
    import bergson.collector.collector as bcc
    import trak.projectors as tp

    monkeypatch.setattr(bcc, "project_global", lambda ident, P, m, *a, **k: P.new_zeros(P.shape[0], m))
    monkeypatch.setattr(tp.BasicProjector, "project", lambda self, g, model_id: g.new_zeros(g.shape[0], self.proj_dim))
    with pytest.raises(Exception):
        _flat("rademacher")


def test_flat_peers_are_timed_like_gradkit(threads2):
    # DEFECT: bench_projection.py:87 and :97 time bergson and TRAK with slow_reps=1 (one sample after the warm-up)
    # while gradkit (line 81) gets the default 3 samples (or blocked_autorange), not interleaved: the peer's p50 is
    # one draw from a noisy shared host (bergson moved 11.6-18.6 s between runs, README), set against gradkit's
    # median. A single draw has the mean's expectation, above the median under right-skewed load noise, so the
    # ratio leans towards gradkit, and its spread is not known. Every provider of one op should be sampled alike
    # (or interleaved, as the factored rows are).
    rec, _ = _flat("rademacher")
    reps = {r["provider"]: r["time_kw"].get("slow_reps", 3) for r in rec.rows
            if r["op"] == "flat rademacher" and r["metric"] == "seconds"}
    assert len(set(reps.values())) == 1, f"samples per provider differ: {reps}"


# ---------------------------------------------------------------------------------------------- factored / collector

CB, CT, CD = 4, 8, 64  # examples, tokens, width of bench_collector's main Linear at test size


def _run_collector(monkeypatch, quick):
    import bench_collector

    monkeypatch.setattr(bench_collector, "B", CB)
    monkeypatch.setattr(bench_collector, "T", CT)
    monkeypatch.setattr(bench_collector, "D", CD)
    monkeypatch.setattr(harness, "time_interleaved", fake_interleaved)
    # the wide A/B layers (1024, 4096 and one-token) keep their widths; at B = 4 they are 4 x 128, 1 x 128 and
    # 32 x 1 tokens
    INTERLEAVED.clear()
    rec = FakeRec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench_collector.run(rec, quick=quick)
    return rec


@pytest.fixture(scope="module")
def collector_rec():
    mp = pytest.MonkeyPatch()
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rec = _run_collector(mp, quick=False)
        inter = list(INTERLEAVED)
        yield rec, inter
    finally:
        mp.undo()
        torch.set_num_threads(old)


def test_factored_hook_work_same_inputs_p_dtype_and_correct_outputs(collector_rec):
    """Hook work: gradkit's factored_project and bergson's forward + backward hooks get the same a and g (fp32,
    B x T x D), p = 16, and both return (B, p*p) fp32 rows equal to vec(L G_b R^T) with their own matrices."""
    import bench_collector

    from gradkit.projection import derive_seed, projection_matrix

    rec, _ = collector_rec
    op = "factored proj (hook work)"
    gk, bg = rec.find(op, "gradkit"), rec.find(op, "bergson")
    ng = _nonlocals(gk["fn"])
    a, g = ng["a"], ng["g"]
    assert a.shape == g.shape == (CB, CT, CD) and a.dtype == g.dtype == torch.float32
    bfn = bg["fn"]
    bcol = inspect.signature(bfn).parameters["c"].default
    lin = _nonlocals(bfn)["lin"]
    bench_collector._tag(lin)  # the benchmark untags the Linear after timing; its hooks need the tags
    try:
        yb = bfn()
    finally:
        bench_collector._untag(lin)
    yg = gk["fn"]()
    assert yg.shape == yb.shape == (CB, 16 * 16) and yg.dtype == yb.dtype == torch.float32
    assert bcol.processor.projection_dim == 16 and bcol.processor.projection_type == "rademacher"
    # gradkit against its own matrices
    L = projection_matrix(16, CD, seed=derive_seed(0, "lin", "left")).double()
    R = projection_matrix(16, CD, seed=derive_seed(0, "lin", "right")).double()
    torch.testing.assert_close(yg.double(), bench_collector._lgr(L, R, a, g), rtol=1e-4, atol=1e-4)
    # bergson against its own (cached) matrices: the hooks did the whole L G R^T, with the same a and g
    Lb = bcol.projection("lin", 16, CD, "left", a.device, torch.float32).double()
    Rb = bcol.projection("lin", 16, CD, "right", a.device, torch.float32).double()
    torch.testing.assert_close(yb.double(), bench_collector._lgr(Lb, Rb, a, g), rtol=1e-4, atol=1e-4)


def test_factored_interleaved_pairs_same_inputs(collector_rec):
    """Every interleaved hook-work pair hands gradkit and bergson the same a, g and p (fp32), both warm."""
    import bench_collector

    _, inter = collector_rec
    pairs = [f for f, base in inter if set(f) == {"gradkit", "bergson"}]
    assert len(pairs) == 4  # 1000^2, 1024^2, 4096^2, one-token examples
    for fns in pairs:
        ng, nb = _nonlocals(fns["gradkit"]), _nonlocals(fns["bergson"])
        a, g = ng["a"], ng["g"]
        assert nb["a"] is a and nb["g"] is g
        lin = nb["lin"]
        bench_collector._tag(lin)
        try:
            yg, yb = fns["gradkit"](), fns["bergson"]()
        finally:
            bench_collector._untag(lin)
        assert yg.shape == yb.shape == (a.shape[0], 256) and yg.dtype == yb.dtype == torch.float32
        # same work: vec(L G R^T) of the same per-example gradients -> the same Frobenius norms in expectation;
        # each is a JL projection of G_b, so both norms track |G_b|_F (loosely, p = 16)
        G = torch.einsum("bto,bti->boi", g.double(), a.double()).flatten(1).norm(dim=1)
        for y in (yg, yb):
            ratio = (y.double().norm(dim=1) / G).mean().item()
            assert 0.5 < ratio < 1.5, ratio


def test_factored_benchmark_checks_bergson_values(monkeypatch, threads2):
    # DEFECT: bench_collector.py:232-233 checks only the shape of bergson's float32 hook result
    # (`assert got.shape == (B, P * P)`), never its values (gradkit's are checked against L G R^T at lines
    # 208-216; bergson's bf16 error is only printed into a note). A bergson call that skipped work (e.g. its
    # projection left off, or an output left unformed) would be timed as the peer. Here bergson's hook work is
    # replaced by zeros of the right shape and the benchmark records it.
    import bench_collector

    monkeypatch.setattr(bench_collector, "_bergson_hooks", lambda c, lin, a, g: torch.zeros(a.shape[0], 256))
    with pytest.raises(Exception):
        _run_collector(monkeypatch, quick=True)


def test_cold_peer_row_has_a_cold_gradkit_row(collector_rec):
    # DEFECT: bench_collector.py:244-251 adds "bergson cold" (a fresh GradientProcessor: matrices generated in the
    # timed call) to the op "factored proj (hook work)", whose ratio column (harness.ratio_table) divides it by the
    # warm "gradkit" row (matrices cached in gradkit's _MATRICES since the agreement check): cold against warm.
    # No gradkit row with its matrix cache cleared exists. The committed table shows "bergson cold ... 3.3x"
    # against 2.9x warm. A fair row pairs it with gradkit after projection.clear_matrix_cache().
    rec, _ = collector_rec
    provs = {r["provider"] for r in rec.rows if r["op"] == "factored proj (hook work)" and r["metric"] == "seconds"}
    assert "bergson cold" in provs
    assert any("cold" in p and p.startswith("gradkit") for p in provs), provs


def test_collector_step_baseline_does_the_peers_work(collector_rec):
    # DEFECT: bench_collector.py:335-336 records "gradkit" (col.backward on a model whose input does not require
    # grad: autograd stops at the hooked output, no input-gradient GEMM) and :352-354 "bergson" (weights frozen, input
    # requiring grad: loss.backward() forms the input gradient) under the same op "collector step (fwd+bwd)".
    # harness.ratio_table (harness.py:181-190) divides every row of an op by the provider named "gradkit", so the
    # table's "time / gradkit" for bergson is against a baseline that skips half the backward: 2.2x in the
    # committed projection-cpu-2t.md (189.25 / 87.22 ms), where the like-for-like pair ("gradkit collector +
    # loss.backward()", 173.19 ms) gives 1.09x. The docstring says the first row "is not a bergson comparison",
    # but the ratio column makes it one. Fix: give the like-for-like row the provider name "gradkit" (or a
    # separate op for the col.backward row), so the ratio column is bergson / like-for-like.
    from torch.utils.flop_counter import FlopCounterMode

    rec, _ = collector_rec
    op = "collector step (fwd+bwd)"

    def flops(fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with FlopCounterMode(display=False) as fc:
                fn()
        return fc.get_total_flops()

    base = rec.find(op, "gradkit")
    floor = rec.find(op, "torch fwd+bwd (no collection)")
    peer = rec.find(op, "bergson")
    f_base, f_floor, f_peer = flops(base["fn"]), flops(floor["fn"]), flops(peer["fn"])
    assert f_peer >= f_floor  # bergson's row does at least the model's forward + backward
    # the ratio column's baseline must do at least the model's forward + backward too (its own collection aside)
    assert f_base >= f_floor, (f"ratio baseline 'gradkit' counts {f_base} aten FLOPs, the forward + backward floor "
                               f"{f_floor}, bergson {f_peer}")


def test_collector_step_like_for_like_rows_match_setup(collector_rec):
    """The like-for-like pair: 'gradkit' (hooks + loss.backward()) and 'bergson' run the same frozen model with
    the same input requiring grad and both return (B, p*p) fp32 projected rows."""
    rec, _ = collector_rec
    op = "collector step (fwd+bwd)"
    gk, bg = rec.find(op, "gradkit"), rec.find(op, "bergson")  # the like-for-like row is the baseline (session 34)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yg = gk["fn"]()["lin"]
        yb = bg["fn"]()
    assert yg.shape == yb.shape == (CB, 256) and yg.dtype == yb.dtype == torch.float32
    # both wrapped by `frozen`: the same closure variables (model, xg, w)
    cg = inspect.getclosurevars(gk["fn"]).nonlocals["fn"]
    cb = inspect.getclosurevars(bg["fn"]).nonlocals["fn"]
    ng, nb = _nonlocals(cg), _nonlocals(cb)
    assert ng["model"] is nb["model"] and ng["xg"] is nb["xg"] and ng["w"] is nb["w"]


# ---------------------------------------------------------------------------------------------- pipeline


def _pipeline(monkeypatch, tmp_path):
    """bench_pipeline's two builds at T = 16 tokens (32 examples): (fns, model), the indexes kept in tmp_path."""
    import bench_pipeline

    monkeypatch.setattr(bench_pipeline, "T", 16)
    monkeypatch.setattr(harness, "time_interleaved", fake_interleaved)
    INTERLEAVED.clear()
    captured = {}
    real_model = bench_pipeline._model

    def model():
        m = real_model()
        captured["model"] = m
        return m

    monkeypatch.setattr(bench_pipeline, "_model", model)
    # keep the indexes: the benchmark deletes its temp root at the end
    monkeypatch.setattr(bench_pipeline.tempfile, "mkdtemp", lambda prefix="": str(tmp_path))
    monkeypatch.setattr(bench_pipeline.shutil, "rmtree",
                        lambda p, ignore_errors=False, _r=bench_pipeline.shutil.rmtree: None if p == str(tmp_path)
                        else _r(p, ignore_errors=ignore_errors))
    rec = FakeRec()
    bench_pipeline.run(rec, quick=True)
    (fns, base), = INTERLEAVED
    assert set(fns) == {"gradkit", "bergson"} and base == "gradkit"
    return fns, captured["model"]


def test_pipeline_both_builds_do_the_same_work(monkeypatch, tmp_path, threads2):
    """GPT-2 build: the same model, batches of 16, the same 16 modules, fp32 indexes of n rows; neither build
    leaves hooks on the shared model that the other would then run (at T = 16 tokens)."""
    from gradkit.index import GradientIndex

    fns, m = _pipeline(monkeypatch, tmp_path)

    def hooks():
        return sum(len(mod._forward_hooks) + len(mod._backward_hooks) + len(mod._forward_pre_hooks)
                   + len(getattr(mod, "_backward_pre_hooks", {})) for mod in m.modules())

    assert hooks() == 0
    paths = {}
    for name in ("gradkit", "bergson"):
        paths[name] = fns[name]()
        assert hooks() == 0, f"{name}'s build left hooks on the shared model"
    # same frozen setup for both (weights frozen, embeddings trainable)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.wte.weight"]
    ixs = {k: GradientIndex.open(p) for k, p in paths.items()}
    for k, ix in ixs.items():
        rows = ix.get(range(len(ix)))
        assert len(ix) == 32 and ix.dim == 16 * 256 and rows.dtype == torch.float32, (k, len(ix), ix.dim, rows.dtype)


def test_pipeline_weight_gradients_as_documented(monkeypatch, tmp_path, threads2):
    # DEFECT (claim, small): bench_pipeline.py:11-12 and :79-86 justify the pair as like for like with "weights
    # frozen, input embeddings trainable: no weight gradients on either side". GPT-2 ties lm_head.weight to
    # transformer.wte.weight, so making the input embeddings trainable makes the LM head's weight trainable too:
    # bergson's loss.backward() forms the 1000 x 256 LM-head weight gradient (2 T V W = 1.05 GFLOP per 16 x 128
    # batch, ~3.5% of its ~30 GFLOP) plus the embedding scatter and block 0's c_attn input gradient (0.8 GFLOP),
    # which gradkit's per_example_grads (autograd to the hooked outputs only) skips. This is bergson's own
    # build() setup, so the measured ratio is what its users pay, but the stated invariant is false and the
    # ~6% of extra backward work sits on bergson's side. Fix: correct the docstring (or untie, or count it).
    fns, m = _pipeline(monkeypatch, tmp_path)
    assert m.lm_head.weight is m.transformer.wte.weight
    # bergson calls model.zero_grad() after each backward, so count the gradients formed, not the ones left
    formed = {}
    handles = [p.register_hook(lambda gr, n=n: formed.__setitem__(n, formed.get(n, 0) + 1))
               for n, p in m.named_parameters() if p.requires_grad]
    grads = {}
    try:
        for name in ("gradkit", "bergson"):
            formed.clear()
            fns[name]()
            grads[name] = dict(formed)
    finally:
        for h in handles:
            h.remove()
    assert grads["gradkit"] == {}
    # bergson's build forms exactly the tied embedding / LM-head weight's gradient, once per batch; the benchmark's
    # docstring now says so (session 34) instead of claiming no weight gradient on either side
    assert set(grads["bergson"]) == {"transformer.wte.weight"}, grads["bergson"]
    import bench_pipeline
    assert "ties" in bench_pipeline.__doc__ and "no\nweight gradients on either side" not in bench_pipeline.__doc__


# ---------------------------------------------------------------------------------------------- index / search

IQ, IN = 40, 6000


def test_index_faiss_same_threads_queries_and_k(monkeypatch, tmp_path):
    """faiss searches with torch's thread count (the benchmark sets it from torch.get_num_threads()), the same
    fp32 queries and k as gradkit, and agrees with gradkit's top-k."""
    faiss = pytest.importorskip("faiss")
    import bench_index

    from gradkit.index import GradientIndex

    path = str(tmp_path / "ix")
    g = torch.Generator().manual_seed(0)
    with GradientIndex.create(path, {"all": bench_index.D}, dtype=torch.float32) as ix:
        ix.append(torch.randn(IN, bench_index.D, generator=g))
    monkeypatch.setattr(bench_index, "_cache_index", lambda n: path)
    monkeypatch.setattr(bench_index, "Q", IQ)
    seen = []

    class RecIP(faiss.IndexFlatIP):
        def search(self, x, k, *a, **kw):
            seen.append((faiss.omp_get_max_threads(), x.shape, x.dtype, k))
            return super().search(x, k, *a, **kw)

    monkeypatch.setattr(faiss, "IndexFlatIP", RecIP)
    old_t, old_f = torch.get_num_threads(), faiss.omp_get_max_threads()
    # Note: in this venv torch's and faiss's bundled libgomp share the OpenMP thread count (faiss.omp_set_num_threads
    # changes torch.get_num_threads() and back), so the two cannot even drift apart; checked at 1 thread here.
    torch.set_num_threads(1)
    try:
        rec = FakeRec()
        bench_index.run(rec, quick=True)
    finally:
        torch.set_num_threads(old_t)
        faiss.omp_set_num_threads(old_f)
    assert seen and all(s == (1, (IQ, bench_index.D), np.float32, bench_index.K) for s in seen), seen
    gk = rec.find("exact top10 search", "gradkit")
    fz = rec.find("exact top10 search", "faiss IndexFlatIP")
    s, i = gk["fn"]()
    fs, fi = fz["fn"]()
    assert i.shape == fi.shape == (IQ, bench_index.K)
    assert (torch.from_numpy(fi) == i).float().mean() > 0.999
    torch.testing.assert_close(torch.from_numpy(fs), s, rtol=1e-5, atol=1e-5)


def test_rows_record_host_load():
    # DEFECT: harness.py:44-53 (environment) records device, threads, versions and time, but not the host's load
    # (os.getloadavg) or steal time, although the comparisons run on a shared 2-vCPU VM ("The host showed steal
    # time", results README) and the load does not hit the two sides alike: faiss IndexFlatIP runs two OpenMP
    # regions per 1024-key block (OpenBLAS sgemm + heap update), gradkit's score_topk one parallel_for per call.
    # Measured in this audit on the Zen 3 VM at load average ~3.7 (1,000 queries x 50,000 x 256, top-10,
    # alternated): faiss 0.53-0.61 s at 1 thread but 1.00-1.16 s at 2 threads, gradkit 0.48-0.56 s / 0.54-0.60 s:
    # under load the 2-thread setting alone makes faiss ~2x slower while gradkit is unaffected, so the reported
    # ratio moves with load in gradkit's favour and a reader cannot tell. Record os.getloadavg() (and ideally
    # /proc/stat steal) at each row, or refuse to write results above a load threshold.
    env = harness.environment("cpu")
    assert any("load" in k for k in env), sorted(env)

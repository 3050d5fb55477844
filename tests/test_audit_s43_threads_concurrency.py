"""Session 43 audit: gradkit's public objects used from several Python threads AT ONCE (data loaders, evaluation
and serving threads; torch releases the GIL inside its ops, so those threads really run together).

tests/test_concurrency.py runs the stateless kernels (factored_project, project, one index's search) from a thread
pool; tests/test_audit_s42_threads.py compares thread COUNTS, not concurrent callers; tests/test_s42_review.py
simulates a reader's close() racing a read inside one thread. Here, with real threads started together on a
``threading.Barrier``, each repeating its call, and joined with a timeout (a deadlock fails the test instead of
hanging CI):

* one opened ``GradientIndex`` (gradkit layout, bergson's flat fp16 and padded structured layouts, ``low_memory``
  or not) searched with different queries / k / modules / weights / reverse / unit_norm / Precondition / batch_rows /
  faiss backend / dict queries: every thread's results equal the serial ones bit for bit; a ``close()`` on another
  thread lets running reads finish (same bits) and refuses later ones with "closed";
* ``factored_project`` / ``project`` with the process-wide matrix cache bounded small (evictions racing lookups,
  the limit changed and the cache cleared meanwhile): the serial bits, and the byte count equal to what the table
  holds afterwards;
* ``GradientCollector``: two collectors on two model copies in two threads (the serial bits); a no-grad evaluation
  forward beside a pending batch (same thread and another thread); one collector's model run with grad from two
  threads (not refused: strict xfail);
* a ``GradientIndex`` writer appended from two threads, racing its own ``close()``, and a reader opening the index
  while a writer commits;
* ``torch.set_num_threads`` changed on one thread while another computes (README: thread-count independent bits);
* MaskedAdamW, golden's masks and accumulator, ParamMap from two threads.

Defects found and fixed (session 43):

* index.py ``Precondition._power``: one Precondition shared by concurrent searches (the docstring says to reuse it)
  raised ``RuntimeError: dictionary changed size during iteration`` (a thread listing the cache's old entries while
  another inserted its own), or could raise KeyError on the ``del`` / the final lookup. Fixed: the cache is changed
  under a module lock and the call returns what it computed.
* index.py ``append`` / ``commit``: a writer shared by two threads interleaved their seeks / writes on the shard
  descriptor and the shard bookkeeping: commits failed with FileNotFoundError ("committing ... failed (No such file
  or directory)") and ``close()`` then raised IndexFormatError for a shard listed in the header but missing.
  Fixed: append / commit / close / abort of one writer run one at a time (an RLock), whole chunks in some order.
* projection.py ``_MatrixCache.get``: a lock-free hit on another thread moves its key to the end, so a miss's
  eviction under a small ``MATRIX_CACHE_BYTES`` could drop the entry it had just inserted, and its final
  ``self._table[key]`` raised KeyError out of ``factored_project``. Fixed: the miss returns the matrix it made.
* _collector.py ``_model_pre_hook`` / ``_model_hook``: a forward under ``torch.no_grad()`` (evaluation, which the
  docstring says the hooks ignore) replaced the pending batch's model-input shape, so a no-grad forward of another
  batch size between a batch's forward and its backward (or on an evaluation thread) raised ValueError ("gave the
  batch 3 rows, but the model's ... holds 5 examples") in the evaluation forward and dropped the pending batch.
  Fixed: both model-level hooks return at once when grad is disabled.

Left as strict xfails (files not assigned to this audit, or no small fix): one collector's model run with grad from
two threads (silently sums both threads' rows), optim.py ``MaskedAdamW.step`` shared by threads (lost steps; as
torch.optim's own). Fixed after the audit: golden.py ``SparseGradientAccumulator.add`` shared by threads (lost sums).
"""
from __future__ import annotations

import copy
import json
import sys
import threading
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from gradkit import _ext
from gradkit import projection as P
from gradkit.index import GradientIndex, Precondition

pytestmark = [pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built"),
              pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")]

JOIN_S = 60  # per thread: far above any test's own time, so only a deadlock reaches it


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _together(*targets, args=None):
    """Run each target on its own thread, all released at once by a barrier; re-raise the first exception of any;
    fail if a thread has not finished after JOIN_S seconds (a deadlock)."""
    bar = threading.Barrier(len(targets))
    errors = []

    def wrap(i, fn):
        try:
            bar.wait(JOIN_S)
            fn(*(args[i] if args else ()))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(targets)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + JOIN_S
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in ts), "a thread did not finish (deadlock?)"
    if errors:
        raise errors[0]


@pytest.fixture
def fast_switch():
    """Switch threads every microsecond (Python's default is 5 ms): interleavings come up in a few iterations."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# ------------------------------------------------------------------------------------------------ indexes

SIZES = OrderedDict(a=24, b=40, c=16)
DIM = sum(SIZES.values())
N = 1200


def _rows() -> torch.Tensor:
    x = torch.randn(N, DIM, generator=_gen(3)) * torch.rand(N, 1, generator=_gen(4))
    x[900] = x[17]  # an exact duplicate: ties go to the lower row
    return x.half().float()  # exact in every layout below


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("s43threads")
    x = _rows()
    with GradientIndex.create(root / "gradkit", SIZES, dtype=torch.float16, shard_rows=400) as w:
        w.append(x[:1])
        w.append(x[1:])
    flat = root / "bergson_flat"  # bergson 2.x: base_dtype, modules back to back
    flat.mkdir()
    x.numpy().astype("<f2").tofile(flat / "gradients.bin")
    (flat / "info.json").write_text(json.dumps({"num_grads": N, "grad_sizes": dict(SIZES), "base_dtype": "float16"}))
    padded = root / "bergson_padded"  # older bergson: a structured record with padding between the fields
    padded.mkdir()
    rec = np.full((N, DIM + 8), 7.5, dtype="<f4")  # junk in the padding columns
    rec[:, 0:24], rec[:, 28:68], rec[:, 72:88] = x[:, :24].numpy(), x[:, 24:64].numpy(), x[:, 64:].numpy()
    rec.tofile(padded / "gradients.bin")
    spec = {"names": list(SIZES), "formats": ["(24,)<f4", "(40,)<f4", "(16,)<f4"], "offsets": [0, 112, 288],
            "itemsize": 4 * (DIM + 8)}
    (padded / "info.json").write_text(json.dumps({"num_grads": N, "grad_sizes": dict(SIZES), "dtype": spec}))
    return {"gradkit": root / "gradkit", "bergson_flat": flat, "bergson_padded": padded}


def _spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=_gen(seed))
    return a @ a.T / d + 0.1 * torch.eye(d)


def _search_calls():
    """(queries, kwargs) pairs over every search option; Precondition objects shared by all threads."""
    pre = {"query": Precondition(_spd(DIM, 5)), "both": Precondition(_spd(DIM, 6), mode="both"),
           "module b": Precondition({"b": _spd(40, 7)}, mode="both")}
    qs = [torch.randn(n, DIM, generator=_gen(10 + n)) for n in (1, 5, 17)]
    kws = [dict(k=10), dict(k=7, unit_norm=True), dict(k=5, reverse=True), dict(k=3, modules=["c", "a"]),
           dict(k=9, weights={"b": 0.5, "a": 2.0}), dict(k=4, precondition=pre["query"]),
           dict(k=6, precondition=pre["both"]), dict(k=8, precondition=pre["module b"], modules=["b"]),
           dict(k=5, backend="faiss"), dict(k=5, backend="faiss", unit_norm=True, reverse=True),
           dict(k=11, batch_rows=97), dict(k=6, unit_norm=True, modules=["a", "c"], batch_rows=250)]
    calls = [(q, kw) for q in qs for kw in kws]
    q = qs[1]
    calls.append(({"a": q[:, :24], "b": q[:, 24:64], "c": q[:, 64:]}, dict(k=4, unit_norm=True)))
    return calls


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("layout", ["gradkit", "bergson_flat", "bergson_padded"])
def test_one_open_index_searched_from_four_threads_keeps_its_bits(layouts, layout, low_memory):
    pytest.importorskip("faiss")
    ix = GradientIndex.open(layouts[layout], low_memory=low_memory)
    calls = _search_calls()
    want = [ix.search(q, **kw) for q, kw in calls]
    # the serial answers are the exact ones where that is cheap to say: float64 inner products, no ties but row 900
    x = _rows().double()
    for (q, kw), (s, i) in zip(calls, want):
        if kw == dict(k=10):
            exact = (q.double() @ x.T).topk(10, dim=1).indices
            assert torch.equal(i, exact)
    bad = []

    def work(w):
        for r in range(2):
            for j in range(len(calls)):
                jj = (j * 7 + w * 13 + r * 5) % len(calls)
                q, kw = calls[jj]
                if not _same(ix.search(q, **kw), want[jj]):
                    bad.append(jj)

    _together(work, work, work, work, args=[(w,) for w in range(4)])
    assert not bad, sorted(set(bad))
    # get() from threads too (the same rows whichever thread reads them)
    rows = [torch.arange(w, N, 37) for w in range(4)]
    got = [None] * 4

    def fetch(w):
        for _ in range(3):
            got[w] = ix.get(rows[w])

    _together(fetch, fetch, fetch, fetch, args=[(w,) for w in range(4)])
    assert all(torch.equal(g, _rows()[r]) for g, r in zip(got, rows))


def test_one_fresh_precondition_shared_by_concurrent_searches_fixed(tmp_path, fast_switch):
    """index.py Precondition._power, before: threads missing the same cache at once (a fresh Precondition, the first
    searches of a serving process) listed the cache's old entries while another thread inserted its own:
    RuntimeError 'dictionary changed size during iteration' (in the first 1-3 runs of four threads here)."""
    mods = OrderedDict((f"m{i:03d}", 2) for i in range(200))
    x = torch.randn(64, 400, generator=_gen(20))
    with GradientIndex.create(tmp_path / "ix", mods, dtype=torch.float32) as w:
        w.append(x)
    ix = GradientIndex.open(tmp_path / "ix")
    hs = {n: _spd(2, 100 + i) for i, n in enumerate(mods)}
    q = torch.randn(3, 400, generator=_gen(21))
    want = ix.search(q, 5, precondition=Precondition(dict(hs), mode="both"))
    for _ in range(6):
        pre = Precondition(dict(hs), mode="both")  # fresh: every thread misses every module at once
        out = [None] * 4

        def work(w):
            out[w] = ix.search(q, 5, precondition=pre)

        _together(work, work, work, work, args=[(w,) for w in range(4)])
        assert all(_same(o, want) for o in out)
        assert len(pre._cache) == len(mods)  # one power per module, whichever thread stored it


def test_close_racing_searches_and_gets_finishes_them_or_refuses(layouts):
    """close() on another thread while three threads read: a read begun before it ends with the serial bits (also
    low_memory's madvise and faiss), a read begun after it raises RuntimeError naming the close, never anything
    else; afterwards the maps are released."""
    pytest.importorskip("faiss")
    path = layouts["gradkit"]
    q = torch.randn(4, DIM, generator=_gen(30))
    ref = GradientIndex.open(path)
    want = {be: ref.search(q, 5, backend=be, batch_rows=150) for be in ("auto", "faiss")}
    want_get = ref.get(range(0, N, 7))
    counts = {"finished": 0, "refused": 0}
    lock = threading.Lock()
    for trial in range(8):
        ix = GradientIndex.open(path, low_memory=bool(trial % 2))

        def read(w, ix=ix):
            for _ in range(15):
                try:
                    if w == 2:
                        ok = torch.equal(ix.get(range(0, N, 7)), want_get)
                    else:
                        be = ("auto", "faiss")[w]
                        ok = _same(ix.search(q, 5, backend=be, batch_rows=150), want[be])
                    assert ok, f"thread {w}: wrong results"
                    with lock:
                        counts["finished"] += 1
                except RuntimeError as e:
                    assert "closed" in str(e), e
                    with lock:
                        counts["refused"] += 1

        def closer(ix=ix, trial=trial):
            time.sleep(0.001 * trial)
            ix.close()

        _together(read, read, read, closer, args=[(0,), (1,), (2,), ()])
        assert ix._shards == [] and ix._maps == [] and ix._reads == 0
    assert counts["finished"] > 0 and counts["refused"] > 0, counts


# ------------------------------------------------------------------------------------------------ matrix cache


def test_matrix_cache_under_concurrent_calls_evictions_limit_changes_and_clears(monkeypatch, fast_switch):
    gen = _gen(40)
    calls = []
    for i in range(18):
        I, O, p = 5 + 7 * i % 41, 3 + 11 * i % 29, (4, 8, 16)[i % 3]
        a, g = torch.randn(3, 4, I, generator=gen), torch.randn(3, 4, O, generator=gen)
        kw = dict(seed=i % 5, name=f"m{i % 7}", kind=("rademacher", "gaussian")[i % 2], bias=i % 4 == 0)
        calls.append(lambda a=a, g=g, p=p, kw=kw: P.factored_project(a, g, p, **kw))
    for i in range(4):
        x = torch.randn(5, 300 + 50 * i, generator=gen)
        calls.append(lambda x=x, i=i: P.project(x, 32, seed=i))
    P.clear_matrix_cache()
    try:
        want = [c() for c in calls]
        P.clear_matrix_cache()
        monkeypatch.setattr(P, "MATRIX_CACHE_BYTES", 3000)  # a few entries: most calls evict
        bad = []
        stop = threading.Event()

        def work(w):
            for r in range(20):
                for j in range(len(calls)):
                    jj = (j * 5 + w * 3 + r) % len(calls)
                    if not torch.equal(calls[jj](), want[jj]):
                        bad.append(jj)

        def meddle():
            i = 0
            while not stop.is_set() and i < 2000:
                monkeypatch.setattr(P, "MATRIX_CACHE_BYTES", (0, 3000, 600)[i % 3])
                if i % 7 == 0:
                    P.clear_matrix_cache()
                i += 1
                time.sleep(0.0005)

        workers = [work] * 3

        def run_workers(w):
            try:
                workers[w](w)
            finally:
                if w == 0:
                    stop.set()

        _together(run_workers, run_workers, run_workers, meddle, args=[(0,), (1,), (2,), ()])
        assert not bad, sorted(set(bad))
        monkeypatch.setattr(P, "MATRIX_CACHE_BYTES", 3000)
        assert torch.equal(calls[0](), want[0])  # a call applies the limit at once
        table = P._MATRICES._table
        exact = sum(t.numel() * t.element_size() for t in table.values())
        assert P._MATRICES.nbytes == exact, (P._MATRICES.nbytes, exact)
        assert exact <= 3000 or len(table) == 1
    finally:
        P.clear_matrix_cache()


def test_matrix_cache_miss_returns_its_matrix_when_a_racing_hit_reorders_the_table_fixed():
    """projection.py _MatrixCache.get, before: a miss inserted its key and evicted under the lock while a hit on
    another thread (no lock) moved its own key to the end, so the eviction (limit 0: keep the newest only) dropped the
    key just inserted and ``return self._table[key]`` raised KeyError. The interleaving is forced here: the miss's
    eviction waits until the hit has reordered the table."""
    cache = P._MatrixCache(0)
    dev = torch.device("cpu")
    k1, k2 = (4, 3, 1, 0), (4, 5, 2, 0)
    fresh = P._MatrixCache(None)
    want1, want2 = fresh.get(*k1, dev), fresh.get(*k2, dev)
    cache.get(*k2, dev)  # the only entry
    go = threading.Event()
    real = P._MatrixCache._evict
    out = {}

    def slow_evict(self, limit):
        if threading.current_thread().name == "miss":
            go.set()
            time.sleep(0.2)  # the hit's lock-free move_to_end runs meanwhile, then it waits for the lock
        return real(self, limit)

    def miss():
        out["miss"] = cache.get(*k1, dev)

    def hit():
        assert go.wait(JOIN_S)
        out["hit"] = cache.get(*k2, dev)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P._MatrixCache, "_evict", slow_evict)
        ts = [threading.Thread(target=miss, name="miss"), threading.Thread(target=hit, name="hit")]
        for t in ts:
            t.start()
        for t in ts:
            t.join(JOIN_S)
        assert not any(t.is_alive() for t in ts)
    assert torch.equal(out["miss"], want1) and torch.equal(out["hit"], want2)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache._table.values())
    assert len(cache) == 1


# ------------------------------------------------------------------------------------------------ collectors


def _model():
    from gradkit.testing import tiny_gpt

    torch.manual_seed(0)
    return tiny_gpt(n_layer=2, d_model=32)


def _batches(n=4, B=3, T=9):
    return [torch.randint(1, 97, (B, T), generator=_gen(50 + i)) for i in range(n)]


def _loss(model, ids):
    return model(ids).float().logsumexp(-1).sum()


def _collect(col, model, ids):
    with col:
        col.backward(_loss(model, ids))
        return col.collect(flat=True)


def test_two_collectors_on_two_model_copies_in_two_threads_keep_their_bits():
    base = _model()
    models = [copy.deepcopy(base) for _ in range(2)]
    cols = [P.GradientCollector(models[0], p=4, seed=3, bias=True),
            P.GradientCollector(models[1], p=4, seed=3, bias=True)]
    per_tok = [P.GradientCollector(m, p=2, seed=1, per_token=True, modules=["lm_head"]) for m in models]
    batches = _batches()
    want = [_collect(cols[0], models[0], b) for b in batches]
    want_tok = [_collect(per_tok[0], models[0], b) for b in batches]
    bad = []

    def work(w):
        for r in range(3):
            for j, b in enumerate(batches):
                if not torch.equal(_collect(cols[w], models[w], b), want[j]):
                    bad.append(("rows", w, j))
                if not torch.equal(_collect(per_tok[w], models[w], b), want_tok[j]):
                    bad.append(("per_token", w, j))

    _together(work, work, args=[(0,), (1,)])
    assert not bad, bad
    assert not any(c.attached for c in cols + per_tok)


def test_no_grad_evaluation_forward_beside_a_pending_batch_is_ignored_fixed():
    """_collector.py _model_pre_hook / _model_hook, before: the no-grad forward's input (5 examples) replaced the
    pending batch's (3), the evaluation forward raised ValueError ('gave the batch 3 rows, but the model's its first
    argument of shape (5, 7) holds 5 examples') and dropped the pending batch."""
    model = _model()
    col = P.GradientCollector(model, p=4, seed=3, bias=True)
    b = _batches(1)[0]
    ev = torch.randint(1, 97, (5, 7), generator=_gen(60))
    want = _collect(col, model, b)
    with torch.no_grad():
        want_ev = model(ev)
    with col:
        loss = _loss(model, b)
        with torch.no_grad():
            assert torch.equal(model(ev), want_ev)
        with torch.inference_mode():
            assert torch.equal(model(ev[:2]), want_ev[:2])
        col.backward(loss)
        assert torch.equal(col.collect(flat=True), want)


def test_no_grad_evaluation_thread_beside_a_collecting_thread_fixed():
    """A training thread collects while an evaluation thread runs the same model under torch.no_grad (other batch
    size): every collected batch has the serial bits and every evaluation its plain output. Before: both threads
    raised ValueError on the batch-size mismatch and no batch was collected whole."""
    model = _model()
    col = P.GradientCollector(model, p=4, seed=3, bias=True)
    batches = _batches()
    want = [_collect(col, model, b) for b in batches]
    ev = torch.randint(1, 97, (5, 7), generator=_gen(61))
    with torch.no_grad():
        want_ev = model(ev)
    done = threading.Event()
    bad, evals = [], [0]

    def train():
        try:
            with col:
                for r in range(4):
                    for j, b in enumerate(batches):
                        col.backward(_loss(model, b))
                        if not torch.equal(col.collect(flat=True), want[j]):
                            bad.append(("train", r, j))
        finally:
            done.set()

    def evaluate():
        while not done.is_set():
            with torch.no_grad():
                if not torch.equal(model(ev), want_ev):
                    bad.append("eval")
            evals[0] += 1

    _together(train, evaluate)
    assert not bad, bad
    assert evals[0] > 0


@pytest.mark.xfail(strict=True, reason="_collector.py keeps one batch per collector, not per thread "
                   "(_forward_hook / _grad_hook / collect share _grads, _edges, _gen): a model carrying one "
                   "collector's hooks run with grad from two threads at once gives each thread's collect() the SUM of "
                   "both threads' rows (as gradient accumulation would), or 'no hooked module ran forward' after the "
                   "other thread's collect() dropped its batch; neither refused by name nor per thread")
def test_one_collector_model_run_with_grad_from_two_threads_is_refused_or_correct():
    model = _model()
    col = P.GradientCollector(model, p=4, seed=3, bias=True)
    b1, b2 = _batches(2)
    want1 = _collect(col, model, b1)
    a_forward, b_done = threading.Event(), threading.Event()
    out = {}

    def thread_a():
        try:
            loss = _loss(model, b1)
            a_forward.set()
            assert b_done.wait(JOIN_S)
            loss.backward()
            out["a"] = col.collect(flat=True)
        except RuntimeError as e:
            out["a"] = e

    def thread_b():
        assert a_forward.wait(JOIN_S)
        try:
            _loss(model, b2).backward()
        except RuntimeError as e:
            out["b"] = e
        finally:
            b_done.set()

    with col:
        _together(thread_a, thread_b)
    got = out["a"]
    if isinstance(got, RuntimeError) or "b" in out:  # refused: by a message that says why
        err = got if isinstance(got, RuntimeError) else out["b"]
        assert "thread" in str(err), err
    else:
        assert torch.equal(got, want1), "thread A's rows include thread B's batch"


# ------------------------------------------------------------------------------------------------ index writers


def test_one_writer_appended_from_two_threads_is_serialised_fixed(tmp_path, fast_switch):
    """index.py append / commit, before: rows of one thread written over the other's, commits failing with
    FileNotFoundError, and close() raising IndexFormatError for a shard the header listed but the disk lacked."""
    chunks = [[torch.full((7, 12), float(1000 * t + i)) + torch.arange(12.0) for i in range(30)] for t in range(2)]
    ids = [[], []]
    w = GradientIndex.create(tmp_path / "ix", {"a": 4, "b": 8}, dtype=torch.float32, shard_rows=10)

    def work(t):
        for c in chunks[t]:
            ids[t].append(w.append(c))

    _together(work, work, args=[(0,), (1,)])
    w.close()
    r = GradientIndex.open(tmp_path / "ix")
    assert len(r) == 2 * 30 * 7
    header = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert header["count"] == len(r) and header["complete"] is True
    assert sum(s["rows"] for s in header["shards"]) == len(r)
    allrows = r.get(range(len(r)))
    for t in range(2):
        for c, i in zip(chunks[t], ids[t]):
            assert torch.equal(i, torch.arange(int(i[0]), int(i[0]) + 7)), "a chunk's rows are not contiguous"
            assert torch.equal(allrows[i], c)
    every = torch.cat([torch.cat(x) for x in ids])
    assert torch.equal(every.sort().values, torch.arange(len(r)))


def test_append_racing_its_own_close_stores_exactly_the_appends_that_returned(tmp_path):
    x = torch.randn(400, 6, generator=_gen(70))
    w = GradientIndex.create(tmp_path / "ix", {"a": 6}, dtype=torch.float32, shard_rows=16)
    done, refused = [], []

    def appender():
        for i in range(0, 400, 4):
            try:
                done.append((i, w.append(x[i:i + 4])))
            except RuntimeError as e:
                assert "not open for writing" in str(e), e
                refused.append(i)

    def closer():
        time.sleep(0.01)
        w.close()

    _together(appender, closer)
    r = GradientIndex.open(tmp_path / "ix")
    assert len(r) == 4 * len(done) and len(done) + len(refused) == 100
    if len(r):
        got = r.get(range(len(r)))
        for i, ids in done:
            assert torch.equal(got[ids], x[i:i + 4])
    # every refused append came after every stored one
    assert not refused or not done or max(i for i, _ in done) < min(refused)


@pytest.mark.parametrize("per_token", [False, True])
def test_reader_opening_while_a_writer_commits_sees_a_committed_prefix(tmp_path, per_token):
    x = torch.randn(400, 12, generator=_gen(71))
    counts = torch.tensor([1, 2, 3, 4] * 25)  # 100 examples, 250 tokens ... per chunk of 4 examples: 10 tokens
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    w = GradientIndex.create(tmp_path / "ix", {"a": 4, "b": 8}, dtype=torch.float32, shard_rows=16,
                             per_token=per_token)
    done = threading.Event()
    seen = []

    def writer():
        try:
            for e in range(0, 100, 4):
                lo, hi = int(offs[e]), int(offs[e + 4])
                if per_token:
                    w.append(x[lo:hi], num_tokens=counts[e:e + 4])
                else:
                    w.append(x[lo:hi])
            w.close()
        finally:
            done.set()

    def reader():
        while not done.is_set() or len(seen) < 3:
            try:
                r = GradientIndex.open(tmp_path / "ix", allow_incomplete=True)
            except Exception as e:  # noqa: BLE001 - only before the first commit
                assert "no committed index header" in str(e), e
                continue
            n = len(r)
            assert torch.equal(r.get(range(n)), x[:n]), n
            if per_token:
                k = r.num_examples
                assert np.array_equal(r.offsets, offs[:k + 1].numpy()), k
            seen.append(n)
            r.close()

    _together(writer, reader, reader)
    assert len(set(seen)) > 1, seen  # some opens fell between commits
    r = GradientIndex.open(tmp_path / "ix")  # complete now
    assert len(r) == int(offs[-1]) and torch.equal(r.get(range(len(r))), x[:len(r)])


# ------------------------------------------------------------------------------------------------ thread counts


def test_set_num_threads_changed_on_another_thread_keeps_the_promised_bits(layouts):
    """README: factored_project's fused op, project (MKL) and search are bitwise independent of the thread count;
    one thread switching torch.set_num_threads between 1 and 2 while another computes changes nothing."""
    gen = _gen(80)
    a, g = torch.randn(40, 30, 96, generator=gen), torch.randn(40, 30, 80, generator=gen)
    x = torch.randn(8, 20000, generator=gen)
    ix = GradientIndex.open(layouts["gradkit"])
    q = torch.randn(9, DIM, generator=gen)
    calls = [lambda: P.factored_project(a, g, 16, seed=1, name="m"),
             lambda: P.factored_project(a.bfloat16(), g.bfloat16(), 8, seed=2, name="n", bias=True),
             lambda: P.project(x, 64, seed=3),
             lambda: P.project(x, 48, seed=4, kind="gaussian"),
             lambda: ix.search(q, 10),
             lambda: ix.search(q, 7, unit_norm=True, batch_rows=300)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = [c() for c in calls]
        torch.set_num_threads(1)
        assert all(_same(c(), w) for c, w in zip(calls, want))
        stop = threading.Event()
        bad = []

        def compute():
            try:
                for r in range(6):
                    for j, c in enumerate(calls):
                        if not _same(c(), want[j]):
                            bad.append(j)
            finally:
                stop.set()

        def switch():
            i = 0
            while not stop.is_set():
                torch.set_num_threads(1 + i % 2)
                i += 1
                time.sleep(0.0005)

        _together(compute, switch)
        assert not bad, sorted(set(bad))
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------- optim / golden / parammap


def _adamw(seed):
    from gradkit.optim import MaskedAdamW

    ps = {"a": torch.nn.Parameter(torch.randn(600, 500, generator=_gen(seed))),
          "b": torch.nn.Parameter(torch.randn(3001, generator=_gen(seed + 1)))}
    ms = {"a": torch.rand(600, 500, generator=_gen(seed + 2)) < 0.5,
          "b": torch.rand(3001, generator=_gen(seed + 3)) < 0.5}
    return ps, MaskedAdamW(ps.items(), ms, masked_lr=1e-3, unmasked_lr=1e-4, amsgrad=True, weight_decay=0.01)


def _adamw_run(seed, steps=4):
    ps, opt = _adamw(seed)
    for s in range(steps):
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=_gen(100 + s))
        opt.step()
    return [p.detach().clone() for p in ps.values()] + [opt.state[p]["exp_avg_sq"].clone() for p in ps.values()]


def test_separate_masked_adamw_optimizers_in_four_threads_keep_their_bits():
    want = [_adamw_run(s) for s in (1, 11, 21, 31)]
    got = [None] * 4

    def work(i):
        for _ in range(2):
            got[i] = _adamw_run((1, 11, 21, 31)[i])

    _together(work, work, work, work, args=[(i,) for i in range(4)])
    assert all(_same(g, w) for g, w in zip(got, want))


@pytest.mark.xfail(strict=True, reason="optim.py MaskedAdamW.step has no lock: two threads stepping ONE optimizer at "
                   "once both read state['step'] == 0 and run their fused updates over the same parameters and "
                   "moments concurrently; the result is neither one step nor two (state['step'] ends at 1 after two "
                   "steps, ~1400 of 350k entries differ from two serial steps), silently (as torch.optim's own)")
def test_one_masked_adamw_stepped_from_two_threads_is_two_steps():
    for _ in range(20):  # (the first run that overlaps fails: 20 runs that never overlap would pass)
        ps, opt = _adamw(1)
        for p in ps.values():
            p.grad = torch.ones_like(p)
        ref_ps, ref = _adamw(1)
        for p in ref_ps.values():
            p.grad = torch.ones_like(p)
        ref.step()
        ref.step()
        _together(opt.step, opt.step)
        assert all(torch.isfinite(p).all() for p in ps.values())  # no crash, nothing non-finite
        for p, r in zip(ps.values(), ref_ps.values()):
            assert torch.equal(p.detach(), r.detach())
            assert float(opt.state[p]["step"]) == 2


def test_golden_masks_topk_and_a_shared_parammap_from_four_threads_keep_their_bits():
    import gradkit.golden as G
    from gradkit.parammap import ParamMap

    grads = [[{"w": torch.randn(300, 200, generator=_gen(10 * i + s)), "b": torch.randn(777, generator=_gen(5 + s))}
              for s in range(3)] for i in range(4)]

    def golden(i):
        r = G.golden_masks(grads[i], 2.0, scope=("tensor", "global")[i % 2], return_counts=True)
        return [r.masks[n].bits for n in r.masks] + [G.topk_mask(grads[i][0]["w"], 1.5)]

    want_g = [golden(i) for i in range(4)]
    model = torch.nn.ParameterDict({f"w{i}": torch.nn.Parameter(torch.randn(200, 133, generator=_gen(i)))
                                    for i in range(3)})
    for i, p in enumerate(model.values()):
        p.grad = torch.randn(p.shape, generator=_gen(20 + i))
    masks = {n: torch.rand(p.shape, generator=_gen(9)) < 0.3 for n, p in model.items()}
    masks["w1"] = torch.randperm(200 * 133, generator=_gen(7))[:5000]  # flat indices, out of order
    flat = torch.randn(sum(int(m.sum()) if m.dtype == torch.bool else m.numel() for m in masks.values()),
                       generator=_gen(8))

    def pm_ops(pm):
        return [pm.gather(model), *pm.scatter(flat).values(), pm.base_global_index_map(),
                pm.prune(threshold=0.5, importance=flat.abs())[1]]

    def fresh(bitmask):
        return ParamMap.from_model(model, list(masks), masks=masks, bitmask=bitmask)

    want_pm = pm_ops(fresh(False))
    want_hash = fresh(False).hash
    pms = [fresh(False), fresh(True)]  # fresh: their lazy plans and hashes built by the threads
    bad = []

    def work(i):
        for _ in range(3):
            if not _same(golden(i), want_g[i]):
                bad.append(("golden", i))
            pm = pms[i % 2]
            if not _same(pm_ops(pm), want_pm) or pm.hash != want_hash:
                bad.append(("parammap", i))

    _together(work, work, work, work, args=[(i,) for i in range(4)])
    assert not bad, bad


# (session 43: failed before golden.py's accumulator took a lock: thousands of sums lost an addend)
def test_one_sparse_gradient_accumulator_shared_by_four_threads_sums_every_add():
    from gradkit.golden import SparseGradientAccumulator

    masks = {"w": torch.rand(1000, 1000, generator=_gen(90)) < 0.5, "b": torch.rand(5000, generator=_gen(91)) < 0.3}
    grads = [{"w": torch.full((1000, 1000), float(i + 1)), "b": torch.full((5000,), float(i + 1))} for i in range(4)]
    for _ in range(5):
        acc = SparseGradientAccumulator(masks, dtype=torch.float64)

        def work(i, acc=acc):
            for _ in range(40):
                acc.add(grads[i])

        _together(work, work, work, work, args=[(i,) for i in range(4)])
        assert acc.steps == 160
        for n, v in acc.values().items():
            assert bool((v == 40 * (1 + 2 + 3 + 4)).all()), n

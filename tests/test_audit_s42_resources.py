"""Audit (s42): resource leaks and degradation under repeated use.

What each module holds, and what is checked here (descriptors from /proc/self/fd, maps from /proc/self/maps):

* gradkit.index: a writer holds its ``.lock`` (flock) and the descriptor of the shard it is filling (plus a per-token
  index's token file); a reader holds one memory map per shard. Checked after create / append / close, open /
  search / close, refused calls, a write failing mid-append, ``with`` blocks left by an exception, an index removed
  or overwritten under a reader, and a writer killed by SIGKILL (its lock goes with its process).
* gradkit._io.write_dir_atomic: a hidden staging directory, removed on success and on failure.
* gradkit.obs.driver: forward (pre-)hooks, tqdm bars, ``.tmp-*`` checkpoint files (stale ones of a killed run removed
  by the next run).
* gradkit._collector / gradkit.projection: module hooks, per-batch state, the collector's projection matrices and the
  process-wide (bounded) matrix cache; gradkit.index.Precondition's cache of matrix powers.

Defects found (tests named ``..._fixed`` failed before this session's fixes):

* A reader's memory maps were Python ``mmap`` objects, each holding a duplicate of its shard's descriptor: an open
  index (also a writer once closed) held one descriptor per shard until garbage collected, ``close()`` on a reader
  released nothing, and an index of more shards than the descriptor limit failed in ``open()`` / ``close()`` with
  EMFILE. Now the maps are made with the C library's mmap (no descriptor kept), and a reader's ``close()`` (or the
  end of its ``with`` block) releases them (``test_indexes_hold_no_descriptors_and_a_readers_close_unmaps_fixed``).
* A writer kept the descriptor of every shard it filled until the next commit: one append over 100 one-row shards
  failed with EMFILE under a limit of 64 files. A full shard's descriptor is now closed when the next one starts
  (commit fsyncs it by name) (``test_many_shards_under_a_low_descriptor_limit_fixed``).
* Lowering ``gradkit.projection.MATRIX_CACHE_BYTES`` did not shrink the process-wide matrix cache while every call
  hit it (evictions ran only on a miss) (``test_process_wide_matrix_cache_stays_within_its_limit_fixed``).

Not defects: the index directory keeps its ``.lock`` file (documented: removing it would let two writers lock two
different files); tqdm >= 4.67 keeps one ``tqdm_monitor`` daemon thread per tqdm class for the process's life (one,
reused by every later bar: checked not to grow).
"""
from __future__ import annotations

import gc
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import gradkit._io as gio
import gradkit.index as gi
import gradkit.projection as P
from gradkit._io import write_dir_atomic
from gradkit.index import GradientIndex, Precondition
from gradkit.obs.driver import collect_hessians, prune_model
from gradkit.projection import GradientCollector
from gradkit.testing import random_batches, tiny_gpt

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")]

ROOT = Path(__file__).resolve().parents[1]
MODS = {"a": 3, "b": 5}
D = 8


# --------------------------------------------------------------------------- probes


def _fds(under=None):
    """{fd: target} of this process's open descriptors (those whose target lies under ``under``, if given)."""
    out = {}
    for e in os.listdir("/proc/self/fd"):
        try:
            t = os.readlink(f"/proc/self/fd/{e}")
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
        if under is None or t.startswith(str(under)):
            out[int(e)] = t
    return out


def _maps(under):
    with open("/proc/self/maps") as f:
        return [ln for ln in f.read().splitlines() if str(under) in ln]


def _hooks(model: nn.Module):
    """Every non-empty hook dict of every submodule (forward, forward-pre, backward, with-kwargs, always-called,
    state-dict ...) and torch's global module hooks."""
    out = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if "hook" in k and isinstance(v, dict) and v:
                out[(name, k)] = len(v)
    for k, v in vars(torch.nn.modules.module).items():
        if k.startswith("_global_") and isinstance(v, dict) and v:
            out[("<global>", k)] = len(v)
    return out


def _tqdm_instances():
    from tqdm import tqdm

    return len(tqdm._instances)


def _threads():
    return {t for t in threading.enumerate() if t.is_alive()}


def _check_threads(before):
    new = _threads() - before
    # tqdm's monitor: a daemon that tqdm starts with a bar and stops after the last bar closes (its exit takes up to
    # its polling interval, so a new bar's monitor can start while the old one is still alive): no other new thread,
    # and at most two monitors, however many bars came and went (a full test run leaves older ones from other tests)
    assert all(t.name == "tqdm_monitor" and t.daemon for t in new), new
    assert len(new) <= 2, threading.enumerate()


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The system temp dir pointed at an empty directory of this test's, to see what is left in it."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _rows(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _listing(p: Path):
    return sorted(str(q.relative_to(p)) for q in p.rglob("*"))


# --------------------------------------------------------------------------- gradkit.index


def test_indexes_hold_no_descriptors_and_a_readers_close_unmaps_fixed(tmp_path, private_tmp):
    """Before: each shard of an open index held a duplicated descriptor (Python's mmap) until the object was garbage
    collected, and a reader's close() released nothing (4 descriptors and 4 maps after `r.close()` here)."""
    p = tmp_path / "ix"
    x = _rows(10, 1)
    q = _rows(2, 2)
    base = _fds()
    with GradientIndex.create(p, MODS, dtype=torch.float32, shard_rows=3) as w:
        w.append(x[:4])
        assert set(_fds(p).values()) == {str(p / ".lock"), str(p / "shards" / "r00000-000001.bin")}
        w.append(x[4:])
    assert _fds(p) == {}  # the writer, now a searchable index: its maps need no descriptor
    assert len(_maps(p)) == 4  # 4 shards of 3, 3, 3, 1 rows
    want = w.search(q, k=3)
    w.close()  # a closed writer's close() does nothing: it stays searchable (documented)
    assert all(torch.equal(a, b) for a, b in zip(w.search(q, k=3), want))
    del w  # its maps go with it (reference counting, no gc run needed)
    assert _maps(p) == [] and _fds() == base
    assert _listing(p) == [".lock", "index.json", "shards"] + [f"shards/r00000-00000{i}.bin" for i in range(4)]

    r = GradientIndex.open(p)
    got = r.search(q, k=3)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and torch.equal(r.get([0, 9]), x[[0, 9]])
    assert _fds() == base and len(_maps(p)) == 4
    r.close()
    assert _maps(p) == [] and _fds() == base and "closed" in repr(r)
    for call in (lambda: r.search(q, k=3), lambda: r.get(0), lambda: r.offsets):
        with pytest.raises(RuntimeError, match=r"the index was closed \(close\(\) released its memory maps\); open it "
                                               r"again with GradientIndex\.open$"):
            call()
    r.close()  # twice: nothing more to do
    assert len(r) == 10  # what it held is still described
    # a with-block left by an exception releases a reader's maps too
    with pytest.raises(KeyError):
        with GradientIndex.open(p) as r2:
            assert len(_maps(p)) == 4
            raise KeyError("caller")
    assert _maps(p) == [] and _fds() == base
    # the directory can be deleted and made again at the same path
    shutil.rmtree(p)
    with GradientIndex.create(p, MODS, dtype=torch.float32) as w:
        w.append(x[:2])
    assert torch.equal(GradientIndex.open(p).get([0, 1]), x[:2])
    del w
    assert _maps(p) == [] and _fds() == base and list(private_tmp.iterdir()) == []


def test_many_shards_under_a_low_descriptor_limit_fixed(tmp_path):
    """Before: with 40 descriptors to spare, one append over 100 one-row shards failed (EMFILE: the writer kept every
    shard's descriptor until the commit), and so did open() and close() of an index of 100 shards (a duplicated
    descriptor per map)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    x = _rows(100, 3)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(_fds()) + 40, hard))
    try:
        with GradientIndex.create(tmp_path / "one", MODS, dtype=torch.float32, shard_rows=1) as w:
            w.append(x)
        with GradientIndex.create(tmp_path / "many", MODS, dtype=torch.float32, shard_rows=1) as w2:
            for i in range(100):
                w2.append(x[i:i + 1], commit=i % 10 == 9)  # pending rows across many shards too
        r = GradientIndex.open(tmp_path / "one")
        s, i = r.search(x[[7, 93]], k=1, unit_norm=True)
        assert i.flatten().tolist() == [7, 93]
        assert torch.equal(GradientIndex.open(tmp_path / "many").get(range(100)), x)
        assert torch.equal(w.get(range(100)), x) and torch.equal(w2.get(range(100)), x)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(list((tmp_path / "one" / "shards").iterdir())) == 100


def test_low_memory_search_releases_pages_through_the_new_maps(tmp_path, monkeypatch):
    """low_memory drops each scored block's pages with madvise on the descriptor-free maps; results are the same."""
    x = _rows(50, 4)
    with GradientIndex.create(tmp_path / "ix", MODS, dtype=torch.float32, shard_rows=20) as w:
        w.append(x)
    calls = []
    real = gi._FileMap.madvise
    monkeypatch.setattr(gi._FileMap, "madvise", lambda self, *a: (calls.append(a), real(self, *a))[1])
    q = _rows(3, 5)
    plain = GradientIndex.open(tmp_path / "ix").search(q, k=5, batch_rows=7)
    assert calls == []
    low = GradientIndex.open(tmp_path / "ix", low_memory=True).search(q, k=5, batch_rows=7)
    assert all(torch.equal(a, b) for a, b in zip(plain, low))
    import mmap

    assert len(calls) == 3 + 3 + 2  # blocks of 7 rows over shards of 20, 20 and 10 rows
    assert {a[0] for a in calls} == {mmap.MADV_DONTNEED}


def test_refused_calls_and_a_failed_append_leave_nothing_open_or_behind(tmp_path, private_tmp, monkeypatch):
    p = tmp_path / "ix"
    base = _fds()
    for kw, err in (({"modules": {"a": 0}}, ValueError), ({"modules": MODS, "dtype": "int8"}, TypeError),
                    ({"modules": MODS, "shard_rows": 0}, ValueError),
                    ({"modules": MODS, "resume": True, "overwrite": True}, ValueError)):
        with pytest.raises(err):
            GradientIndex.create(p, **kw)
        assert not p.exists() and _fds() == base
    with pytest.raises(gi.IndexFormatError):  # resume of nothing
        GradientIndex.create(p, MODS, resume=True)
    assert _fds() == base
    w = GradientIndex.create(p, MODS, dtype=torch.float32, shard_rows=2)
    w.append(_rows(3, 6))
    held = set(_fds(p).values())
    assert held == {str(p / ".lock"), str(p / "shards" / "r00000-000001.bin")}
    with pytest.raises(ValueError, match=r"^grads: expected shape"):
        w.append(torch.zeros(2, D + 1))
    assert set(_fds(p).values()) == held
    real = gi._write_all
    n = [0]

    def flaky(fd, data):  # the second shard write of the chunk fails (disk full)
        n[0] += 1
        if n[0] == 2:
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(gi, "_write_all", flaky)
    with pytest.raises(OSError, match="No space left on device"):
        w.append(_rows(5, 7))
    monkeypatch.setattr(gi, "_write_all", real)
    assert set(_fds(p).values()) <= held and len(w) == 3
    assert _listing(p) == [".lock", "index.json", "shards", "shards/r00000-000000.bin", "shards/r00000-000001.bin"]
    real_replace = os.replace

    def replace_fails(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(OSError, match=r"committing .* failed"):
        w.append(_rows(4, 8))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (p / "index.json.tmp").exists() and len(w) == 3
    with pytest.raises(ZeroDivisionError):
        with w:
            w.append(_rows(1, 9), commit=False)
            1 / 0
    assert _fds() == base and _maps(p) == []
    # the lock went with the aborted writer: the next writer goes on at once
    with GradientIndex.create(p, MODS, dtype=torch.float32, shard_rows=2, resume=True) as w2:
        assert len(w2) == 3
    assert [q for q in _listing(p) if q.endswith(".tmp") or "token" in q] == []
    del w, w2
    assert _fds() == base and _maps(p) == [] and list(private_tmp.iterdir()) == []
    # open() refused part-way (its second shard cut short after the first was mapped): nothing stays mapped or open
    for kw in ({"low_memory": "yes"}, {"allow_incomplete": 1.5}):
        with pytest.raises(TypeError):
            GradientIndex.open(p, **kw)
    os.truncate(p / "shards" / "r00000-000001.bin", 4)
    with pytest.raises(gi.IndexFormatError, match=r"r00000-000001\.bin is truncated"):
        GradientIndex.open(p)
    assert _fds() == base and _maps(p) == []


_CHILD = r"""
import os, shutil, signal, sys, torch
sys.path.insert(0, sys.argv[1])
import gradkit._io as gio
from gradkit.index import GradientIndex
from gradkit.obs.driver import prune_model
from gradkit.testing import random_batches, tiny_gpt
root = sys.argv[2]
g = torch.Generator().manual_seed(0)
x = torch.randn(12, 8, generator=g)
q = x[:2] + 0.01
mods = {"a": 3, "b": 5}
# 1. an index removed while a reader holds it: the reader's next search still works (its maps stay valid)
with GradientIndex.create(root + "/A", mods, dtype=torch.float32, shard_rows=5) as w:
    w.append(x)
r = GradientIndex.open(root + "/A")
want = r.search(q, k=3)
shutil.rmtree(root + "/A")
got = r.search(q, k=3)
print("REMOVED", all(torch.equal(a, b) for a, b in zip(got, want)), torch.equal(r.get(range(12)), x), flush=True)
# 2. an index overwritten under a reader: the reader keeps the rows it opened
with GradientIndex.create(root + "/B", mods, dtype=torch.float32) as w:
    w.append(x)
rb = GradientIndex.open(root + "/B")
with GradientIndex.create(root + "/B", mods, dtype=torch.float32, overwrite=True) as w:
    w.append(-x[:4])
print("OVERWRITTEN", torch.equal(rb.get(range(12)), x), torch.equal(GradientIndex.open(root + "/B").get(range(4)), -x[:4]),
      flush=True)
# 3. a writer holding its lock, killed by SIGKILL in the middle of writing a prune_model checkpoint file
w = GradientIndex.create(root + "/C", mods, dtype=torch.float32, shard_rows=4)
w.append(x[:6])
w.append(x[6:9], commit=False)
print("LOCKED", flush=True)
sys.stdin.readline()
def torn(path, tensors):
    with open(path, "wb") as f:
        f.write(b"half a file")
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
gio.write_safetensors = torn
prune_model(tiny_gpt(n_layer=1, d_model=16), random_batches(2, batch=2, seq=8), checkpoint_dir=root + "/ck",
            progress=False)
print("NOT KILLED", flush=True)
"""


def test_killed_writer_and_removed_index(tmp_path, private_tmp):
    """In a child (a crash there cannot take the test process down): an index removed, or overwritten, while a
    reader holds it open; a writer holding the lock while another process asks for it (a clear error naming the
    lock), then killed by SIGKILL mid-checkpoint: its lock goes with it, the next writer resumes at once, and the
    next prune_model removes the half-written ``.tmp-*`` file it left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(private_tmp)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(ROOT / "python"), str(tmp_path)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1] != "LOCKED":
            ln = child.stdout.readline()
            assert ln, (lines, child.stderr.read()[-3000:])
            lines.append(ln.strip())
        assert lines == ["REMOVED True True", "OVERWRITTEN True True", "LOCKED"], lines
        c = tmp_path / "C"
        with pytest.raises(RuntimeError, match=rf"^path: {c} is being written by another writer \(the lock "
                                               rf"{c / '.lock'} is held by a GradientIndex\.create not closed yet, "
                                               r"in this process or another\); close\(\) that writer"):
            GradientIndex.create(c, MODS, dtype=torch.float32, shard_rows=4, resume=True)
        child.stdin.write("go\n")
        child.stdin.flush()
        rc = child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert rc == -signal.SIGKILL, (rc, child.stdout.read(), child.stderr.read()[-3000:])
    ck = tmp_path / "ck"
    stale = [n for n in os.listdir(ck) if n.startswith(".tmp-")]
    assert len(stale) == 1 and (ck / stale[0]).read_bytes() == b"half a file"
    # the killed writer's lock went with its process; its committed rows are resumed
    with GradientIndex.create(c, MODS, dtype=torch.float32, shard_rows=4, resume=True) as w:
        assert len(w) == 6
    assert [n for n in _listing(c) if n.endswith(".tmp")] == []
    model = tiny_gpt(n_layer=1, d_model=16)
    rep = prune_model(model, random_batches(2, batch=2, seq=8), checkpoint_dir=ck, progress=False)
    assert sorted(n for n in os.listdir(ck) if not n.startswith("layer_")) == ["progress.json"]
    assert len([n for n in os.listdir(ck) if n.startswith("layer_")]) == len(rep.layers) == 5
    assert list(private_tmp.iterdir()) == []


def test_precondition_cache_stays_bounded_across_searches(tmp_path):
    """200 searches with one Precondition whose matrices are replaced, edited in place and re-damped: the cache holds
    at most one power per module (the replaced matrices' powers are dropped, not kept beside the new ones)."""
    with GradientIndex.create(tmp_path / "ix", MODS, dtype=torch.float32) as w:
        w.append(_rows(6, 10))
    g = torch.Generator().manual_seed(11)

    def spd(d):
        a = torch.randn(d, d + 2, generator=g, dtype=torch.float64)
        return a @ a.T + torch.eye(d, dtype=torch.float64)

    mats = {"a": spd(3), "b": spd(5)}
    pre = Precondition(mats, mode="both")
    q = _rows(2, 12)
    for i in range(200):
        if i % 3 == 0:
            mats["a"] = spd(3)  # replaced in the dict
        elif i % 3 == 1:
            mats["b"].mul_(1.01)  # edited in place
        else:
            pre.damping = 1e-3 * (i % 7)
        w.search(q, k=2, precondition=pre)
        assert len(pre._cache) <= 2, (i, list(pre._cache))


# --------------------------------------------------------------------------- gradkit._io


def test_write_dir_atomic_leaves_no_stage_or_descriptor(tmp_path, private_tmp):
    target = tmp_path / "model"
    base = _fds()
    write_dir_atomic(target, {"a.bin": lambda p: Path(p).write_bytes(b"1")})
    (target / "keep.txt").write_text("k")

    def fails(p):
        Path(p).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    for _ in range(3):
        with pytest.raises(OSError, match="No space"):
            write_dir_atomic(target, {"a.bin": lambda p: Path(p).write_bytes(b"2"), "b.bin": fails})
    write_dir_atomic(target, {"a.bin": lambda p: Path(p).write_bytes(b"3")})
    assert sorted(os.listdir(tmp_path)) == ["model", "systmp"]  # no hidden .model.gradkit-* stage
    assert sorted(os.listdir(target)) == ["a.bin", "keep.txt"] and (target / "a.bin").read_bytes() == b"3"
    assert _fds() == base and list(private_tmp.iterdir()) == []


# --------------------------------------------------------------------------- gradkit.obs.driver


def test_prune_model_and_collect_hessians_release_hooks_bars_threads_and_temporaries(tmp_path, private_tmp,
                                                                                     monkeypatch):
    data = random_batches(2, batch=2, seq=8)
    threads = _threads()
    base = _fds()

    def clean(model, ck=None):
        assert _hooks(model) == {}
        assert _tqdm_instances() == 0
        _check_threads(threads)
        assert _fds() == base
        if ck is not None and ck.exists():
            assert [n for n in os.listdir(ck) if n.startswith(".tmp")] == []
        assert list(private_tmp.iterdir()) == []

    # success, twice (no thread or bar accumulates)
    for i in range(2):
        m = tiny_gpt(n_layer=1, d_model=16)
        prune_model(m, data, checkpoint_dir=tmp_path / f"ok{i}", progress=True)
        clean(m, tmp_path / f"ok{i}")
        collect_hessians(m, data, progress=True)
        clean(m)
    # refused arguments: nothing made, no hook
    m = tiny_gpt(n_layer=1, d_model=16)
    for kw in ({"method": "nope"}, {"pattern": "2-4"}, {"modules": "nothing.*"}, {"device": "nope"}):
        with pytest.raises(ValueError):
            prune_model(m, data, checkpoint_dir=tmp_path / "refused", progress=True, **kw)
        assert not (tmp_path / "refused").exists()
        clean(m)
    for kw in ({"device": "nope"}, {"modules": "nothing.*"}, {"progress": "yes"}):
        with pytest.raises((ValueError, TypeError)):
            collect_hessians(m, data, **kw)
        clean(m)
    # a callback raising after the second layer
    n = [0]

    def cb(rep):
        n[0] += 1
        if n[0] == 2:
            raise KeyError("caller's error")

    with pytest.raises(KeyError):
        prune_model(m, data, checkpoint_dir=tmp_path / "cb", progress=True, callback=cb)
    clean(m, tmp_path / "cb")
    assert sorted(os.listdir(tmp_path / "cb"))[-1] == "progress.json"
    # writing a checkpoint file fails half-way
    real = gio.write_safetensors

    def full(path, tensors):
        real(path, tensors)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gio, "write_safetensors", full)
    m = tiny_gpt(n_layer=1, d_model=16)
    with pytest.raises(OSError, match="No space"):
        prune_model(m, data, checkpoint_dir=tmp_path / "full", progress=True)
    monkeypatch.setattr(gio, "write_safetensors", real)
    clean(m, tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["progress.json"]

    # a calibration forward raising (the hooks of every stage: execution order, Hessians, early stop)
    class Boom(Exception):
        pass

    for after in (0, 1, 2, 3):
        m = tiny_gpt(n_layer=1, d_model=16)
        seen = [0]

        def boom(mod, args):
            seen[0] += 1
            if seen[0] > after:
                raise Boom()

        h = m.lm_head.register_forward_pre_hook(boom)
        with pytest.raises(Boom):
            prune_model(m, data, checkpoint_dir=tmp_path / f"boom{after}", progress=True, early_stop=False)
        h.remove()
        clean(m, tmp_path / f"boom{after}")
        h = list(m.modules())[-1].register_forward_pre_hook(boom)
        seen[0] = after - after % 2  # 2 batches: the first (even `after`) or the second forward raises
        with pytest.raises(Boom):
            collect_hessians(m, data, progress=True)
        h.remove()
        clean(m)


# --------------------------------------------------------------------------- GradientCollector


def _loss(model, ids):
    return model(ids).float().logsumexp(-1).sum()


def test_collector_removes_every_hook_on_every_exit(tmp_path):
    model = tiny_gpt(n_layer=1, d_model=16)
    before = _hooks(model)
    assert before == {}
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    col = GradientCollector(model, p=2)
    with col:
        col.backward(_loss(model, ids))
        col.collect()
    assert _hooks(model) == before and not col.attached
    with pytest.raises(KeyError):
        with col:
            _loss(model, ids)
            assert _hooks(model) != before
            raise KeyError("caller")
    assert _hooks(model) == before
    with pytest.raises(ValueError, match="^missing: "):  # a refused argument inside the block
        with col:
            col.backward(_loss(model, ids))
            col.collect(missing="nope")
    assert _hooks(model) == before
    with pytest.raises(ValueError, match="^mask: "):
        with col:
            col.set_mask(torch.full((2, 6), 3))
    assert _hooks(model) == before
    with pytest.raises(ValueError):  # the forward hook refusing a mask of another shape
        with col.batch(torch.ones(3, 6, dtype=torch.bool)), col:
            _loss(model, ids)
    assert _hooks(model) == before
    for kw in ({"p": 0}, {"modules": "nothing.*"}, {"kind": "nope"}, {"normalizers": {"x": None}}):
        with pytest.raises((ValueError, TypeError)):
            GradientCollector(model, **kw)
        assert _hooks(model) == before
    with pytest.raises(TypeError, match="^loss_fn: "):
        next(col.per_example_grads([ids], loss_fn=None))
    with pytest.raises(TypeError, match="^batches: "):
        next(col.per_example_grads(5, loss_fn=_loss))
    assert _hooks(model) == before

    def failing(model_, batch):
        if batch is None:
            raise KeyError("the loss failed")
        return _loss(model_, batch)

    with pytest.raises(KeyError):
        for _ in col.per_example_grads([ids, None], loss_fn=failing):
            pass
    assert _hooks(model) == before and not col.attached
    gen = col.per_example_grads([ids, ids, ids], loss_fn=_loss)
    next(gen)
    assert _hooks(model) != before  # attached while the generator is suspended
    del gen  # abandoned: closed by reference counting
    assert _hooks(model) == before and not col.attached
    r = weakref.ref(col)
    del col
    assert r() is None  # nothing (no hook, no tensor hook of a finished batch) keeps the collector alive


def test_collector_state_and_matrix_cache_stay_bounded_over_200_batches():
    model = tiny_gpt(n_layer=1, d_model=16)
    col = GradientCollector(model, p=2, bias=True)
    nmod = len(col.module_dims)
    sizes = set()
    for i in range(200):
        ids = torch.randint(1, 97, (1 + i % 4, 3 + i % 6), generator=torch.Generator().manual_seed(i))
        with col:
            col.backward(_loss(model, ids))
            g = col.collect(flat=True)
        assert g.shape == (1 + i % 4, col.dim)
        sizes.add((len(col._matrices), col._matrices.nbytes, len(col._grads), len(col._edges),
                   len(col._forward_shapes), len(col._pending), len(col._tokens), col._rows))
    assert len(col._matrices) == 2 * nmod  # L and R of each module, made once
    assert sizes == {(2 * nmod, col._matrices.nbytes, 0, 0, 0, 0, 0, None)}, sizes
    assert _hooks(model) == {}


def test_process_wide_matrix_cache_stays_within_its_limit_fixed(monkeypatch):
    """200 factored_project calls of varying shapes, seeds and names stay within MATRIX_CACHE_BYTES (the newest
    entry always kept). Before: a lowered limit was applied only on a miss, so a cache all of whose calls hit kept
    its old size (60140 bytes here under a limit of 4096)."""
    P.clear_matrix_cache()

    def call(i):
        I, O, p = 3 + i % 17, 2 + i % 13, 2 + i % 5
        g = torch.Generator().manual_seed(i)
        P.factored_project(torch.randn(2, 3, I, generator=g), torch.randn(2, 3, O, generator=g), p, seed=i,
                           name=f"m{i}")

    def exact():
        return sum(t.numel() * t.element_size() for t in P._MATRICES._table.values())

    try:
        for i in range(200):
            call(i)
            assert P._MATRICES.nbytes == exact() <= P.MATRIX_CACHE_BYTES
        assert len(P._MATRICES) == 400 and exact() == 60140
        monkeypatch.setattr(P, "MATRIX_CACHE_BYTES", 4096)
        call(199)  # a hit: the lowered limit applies at once
        assert P._MATRICES.nbytes == exact() <= 4096, (P._MATRICES.nbytes, len(P._MATRICES))
        for i in range(200):
            call(i)
            assert P._MATRICES.nbytes == exact() <= 4096
        monkeypatch.setattr(P, "MATRIX_CACHE_BYTES", 0)  # nothing fits: only the newest entry stays
        call(5)
        assert len(P._MATRICES) == 1
    finally:
        P.clear_matrix_cache()

"""Session 43: fault injection at EVERY call of the steps that long, resumable work passes through.

Earlier audits interrupt a run at one or a few chosen points (a callback, one ``_prune_layer`` call, SIGKILL / ENOSPC at
the index's write sites). Here a failure is injected at the n-th call of each internal step, for n = 1, 2, ... until a
run completes without reaching the n-th call, with both an ``Exception`` and a ``KeyboardInterrupt`` (a
``BaseException``: ``except Exception`` does not see it), and "after" variants that let the step finish first. After
each failure: what is visible (a checkpoint's files and progress.json, the index's header and ``open``), what the
user's model / writer holds, that descriptors, tqdm bars and hooks are released; then the work is resumed and
compared with an uninterrupted run, bit for bit.

Defects found and fixed (session 43):

* ``prune_model`` (``python/gradkit/obs/driver.py``, the ``for mod, w in pending: mod.weight.copy_(w)`` loop): an
  interrupt between the weight copies of a group left the group half pruned in the model, against "the layers of a
  group are written into the model together". The remaining copies of the (already pruned and checkpointed) group
  are now made before the interrupt propagates.
* ``GradientIndex.commit`` (``python/gradkit/index.py``): a ``KeyboardInterrupt`` (or any non-``OSError``) inside the
  commit, before the header was replaced, left the writer counting the uncommitted rows (``len(writer)`` past the
  header's ``count``), against ``append``'s "an append that fails or is interrupted goes back to the last commit":
  an append retried after the interrupt stored its rows twice. It now rolls back as a failed commit does.
* ``index.py`` ``_atomic_write_json``: an exception right after the temporary header's ``os.close`` (before the
  ``os.replace``'s handler) left ``index.json.tmp`` behind; one handler now covers the write, close and replace.
"""
from __future__ import annotations

import json
import os
import types
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gradkit._io as gio
import gradkit.index as gi
import gradkit.obs.driver as D
from gradkit.index import GradientIndex, IndexFormatError
from gradkit.obs import prune_model
from gradkit.obs.driver import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread_module")


class _Boom(RuntimeError):
    pass


def _fds(under=None):
    out = {}
    for e in os.listdir("/proc/self/fd"):
        try:
            t = os.readlink(f"/proc/self/fd/{e}")
        except OSError:
            continue
        if under is None or t.startswith(str(under)):
            out[int(e)] = t
    return out


def _tqdm_alive() -> int:
    from tqdm import tqdm

    return len(tqdm._instances)


class _OsProxy(types.ModuleType):
    """The ``os`` module as one module sees it, with some functions replaced (other modules keep the real one)."""

    def __init__(self, over):
        super().__init__("os")
        self.__dict__.update(over)

    def __getattr__(self, name):
        return getattr(os, name)


class _Injector:
    """Counts the calls of wrapped functions (one counter for all) and raises ``exc`` at call ``n``: before the real
    call ("before") or after it returned ("after")."""

    def __init__(self, n: int, exc, mode: str = "before", skip_after=(), skip_before=()):
        self.n, self.exc, self.mode, self.skip_after, self.skip_before = n, exc, mode, skip_after, skip_before
        self.calls = 0
        self.raised = None
        self.where = None

    def wrap(self, name, real, noop=False):
        def f(*a, **k):
            self.calls += 1
            hit = self.calls == self.n
            if hit and self.mode == "before" and name not in self.skip_before:
                self._raise(name)
            r = None if noop else real(*a, **k)
            if hit and self.mode == "after" and name not in self.skip_after:
                self._raise(name)
            return r
        return f

    def _raise(self, name):
        self.where = name
        self.raised = self.exc(f"injected at call {self.n} ({name})")
        raise self.raised


# =========================================================================== prune_model


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Net(nn.Module):
    """Groups (prune_model's "block"): blocks.0 (fc1, fc2), blocks.1 (fc1, fc2), head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


GROUPS = [["blocks.0.fc1", "blocks.0.fc2"], ["blocks.1.fc1", "blocks.1.fc2"], ["head"]]
LAYERS = [n for g in GROUPS for n in g]


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    net = _Net().to(dtype)
    net.train()
    net.blocks[1].eval()  # each module's own mode must come back as it was
    return net


def _data():
    return [torch.randn(12, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _weights(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _rep_key(rep):
    return [(r.name, tuple(r.shape), r.nnz, r.density, r.error, r.error_mask_only, r.tokens) for r in rep.layers]


@pytest.fixture(scope="module")
def prune_ref():
    dense = _net()
    ref = _net()
    rep = prune_model(ref, _data(), "2:4", progress=False)
    assert [r.name for r in rep.layers] == LAYERS
    return _weights(dense), _weights(ref), _rep_key(rep)


def _hooks(m):
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def _modes(m):
    return [x.training for x in m.modules()]


def _check_model_after_failure(m, dense, ref, where):
    """Groups all dense or all pruned (the reference's weights), the pruned ones a prefix; the rest untouched."""
    state = []
    for g in GROUPS:
        s = set()
        for n in g:
            w = m.get_submodule(n).weight.detach()
            s.add("dense" if torch.equal(w, dense[n + ".weight"]) else
                  "pruned" if torch.equal(w, ref[n + ".weight"]) else "other")
        assert len(s) == 1 and "other" not in s, f"{where}: group {g} holds {s}"
        state.append(s.pop())
    assert state == sorted(state, key=lambda s: s != "pruned"), f"{where}: pruned groups {state} are not a prefix"
    for n, p in m.named_parameters():
        if n[:-len(".weight")] not in LAYERS:
            assert torch.equal(p.detach(), dense[n]), f"{where}: {n} changed"
    return [n for g, s in zip(GROUPS, state) if s == "pruned" for n in g]


def _check_checkpoint(ck, ref, in_model, where):
    """No temporary left; progress.json whole; every listed layer's file intact and the reference's weights."""
    names = os.listdir(ck) if os.path.isdir(ck) else []
    assert not [f for f in names if f.startswith(".tmp-")], f"{where}: {names}"
    if "progress.json" not in names:
        assert in_model == [], where
        return []
    with open(os.path.join(ck, "progress.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    listed = list(state["layers"])
    from safetensors.torch import load as st_load

    for n in listed:
        e = state["layers"][n]
        raw = Path(ck, e["file"]).read_bytes()
        assert zlib.crc32(raw) == e["crc32"], f"{where}: {n}"
        assert torch.equal(st_load(raw)["weight"], ref[n + ".weight"]), f"{where}: {n}"
    assert set(in_model) <= set(listed), f"{where}: the model holds {in_model}, the checkpoint {listed}"
    return listed


def _install(monkeypatch, target: str, inj: _Injector):
    if target == "os.replace":  # the checkpoint's renames (driver.py sees its own os)
        monkeypatch.setattr(D, "os", _OsProxy({"replace": inj.wrap("os.replace", os.replace)}))
    elif target == "write_safetensors":  # imported at each save from gradkit._io
        monkeypatch.setattr(gio, "write_safetensors", inj.wrap(target, gio.write_safetensors))
    elif target == "output_error":
        monkeypatch.setattr(D.metrics, "output_error", inj.wrap(target, D.metrics.output_error))
    elif target == "_Collector.result":
        monkeypatch.setattr(D._Collector, "result", inj.wrap(target, D._Collector.result))
    elif target == "_Checkpoint.load":
        monkeypatch.setattr(D._Checkpoint, "load", inj.wrap(target, D._Checkpoint.load))
    elif target != "callback":
        monkeypatch.setattr(D, target, inj.wrap(target, getattr(D, target)))


_PRUNE_TARGETS = [
    ("_forward", "before"),           # every calibration forward (execution order, each group's Hessians)
    ("_Collector.result", "before"),
    ("_prune_layer", "before"),
    ("output_error", "before"),       # the report, inside the layer's try
    ("_digest", "before"),            # parameter digests, dense / pruned digests of each checkpointed layer
    ("write_safetensors", "after"),   # a layer file written whole, then the failure (before its fsync / rename)
    ("_atomic_write", "before"),      # each checkpoint write (the first progress.json, each layer, each progress)
    ("os.replace", "after"),          # a file renamed into place, then the failure
    ("callback", "after"),            # the caller's callback (the layer is checkpointed)
    ("_check_resumed_weight", "before"),  # these two run only on resume: a resumed run is interrupted too
    ("_Checkpoint.load", "before"),
]
_ON_RESUME = ("_check_resumed_weight", "_Checkpoint.load")


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
@pytest.mark.parametrize("target,mode", _PRUNE_TARGETS, ids=[t for t, _ in _PRUNE_TARGETS])
def test_prune_model_failure_at_every_call_then_resume_is_bitwise_uninterrupted(tmp_path, monkeypatch, prune_ref,
                                                                                 target, mode, exc):
    dense, ref, ref_rep = prune_ref
    data = _data()
    fd0 = _fds()
    bars0 = _tqdm_alive()
    n = 0
    while True:
        n += 1
        ck = str(tmp_path / f"ck{n}")
        m = _net()
        modes = _modes(m)
        inj = _Injector(n, exc, mode)
        cb = None
        if target == "callback":
            cb = inj.wrap("callback", lambda rep: None)
        if target in _ON_RESUME:  # a first run stopped at its third layer; the resume is injected
            stop = _Injector(3, _Boom)
            with pytest.raises(_Boom):
                prune_model(m, data, "2:4", checkpoint_dir=ck, progress=False, callback=stop.wrap("cb", lambda r: 0))
        with monkeypatch.context() as mp:
            _install(mp, target, inj)
            try:
                prune_model(m, data, "2:4", checkpoint_dir=ck, progress=True, callback=cb)
            except (_Boom, KeyboardInterrupt) as e:
                assert e is inj.raised, f"n={n}: {e!r}"
                where = f"{target} {mode} {exc.__name__} call {n}"
                # released while the exception (and its frames) are still alive
                assert _tqdm_alive() == bars0, where
                assert _fds(tmp_path) == {}, where
                del e
            else:
                assert inj.calls < n, f"{target}: call {n} was reached but nothing was raised"
                break
        assert _hooks(m) == 0 and _modes(m) == modes, where
        in_model = _check_model_after_failure(m, dense, ref, where)
        listed = _check_checkpoint(ck, ref, in_model, where)
        m2 = m if n % 2 else _net()  # the same model object, or a fresh dense one
        rep = prune_model(m2, data, "2:4", checkpoint_dir=ck, progress=False)
        got = _weights(m2)
        assert all(torch.equal(got[k], ref[k]) for k in ref), where
        assert _rep_key(rep) == ref_rep, where
        assert [r.name for r in rep.layers if r.resumed] == [x for x in LAYERS if x in listed], where
        assert not [f for f in os.listdir(ck) if f.startswith(".tmp-")], where
        assert _fds() == fd0, where
    assert n > 2, (target, n)  # the step ran at least twice


def _patch_copies(model, inj):
    """Every selected layer's ``weight.copy_`` counted (an instance attribute shadows the Tensor method)."""
    for name in LAYERS:
        w = model.get_submodule(name).weight
        w.copy_ = inj.wrap(name, w.copy_)


def _unpatch_copies(model):
    for name in LAYERS:
        w = model.get_submodule(name).weight
        if "copy_" in w.__dict__:
            del w.copy_


@pytest.mark.parametrize("checkpoint", [False, True])
def test_interrupt_between_a_groups_weight_copies_leaves_the_group_whole(tmp_path, prune_ref, checkpoint):
    """Fixed (driver.py, the group's copy loop): a KeyboardInterrupt after the first copy of blocks.0 left fc1 pruned
    and fc2 dense in the model. The interrupt is raised before the n-th copy (as Python raises it between bytecodes)."""
    dense, ref, ref_rep = prune_ref
    data = _data()
    for n in range(1, len(LAYERS) + 1):
        m = _net()
        inj = _Injector(n, KeyboardInterrupt)
        _patch_copies(m, inj)
        ck = str(tmp_path / f"ck{n}") if checkpoint else None
        try:
            with pytest.raises(KeyboardInterrupt):
                prune_model(m, data, "2:4", checkpoint_dir=ck, progress=False)
        finally:
            _unpatch_copies(m)
        where = f"KeyboardInterrupt before copy {n} ({inj.where})"
        in_model = _check_model_after_failure(m, dense, ref, where)
        assert inj.where in in_model, where  # the interrupted group is written whole (pruned and checkpointed)
        if checkpoint:
            _check_checkpoint(ck, ref, in_model, where)
            rep = prune_model(m, data, "2:4", checkpoint_dir=ck, progress=False)
            assert _rep_key(rep) == ref_rep and all(torch.equal(v, ref[k]) for k, v in _weights(m).items()), where


def test_resuming_an_interrupted_run_with_other_arguments_is_refused_by_name_leaving_everything(tmp_path, prune_ref):
    """After an interrupted run (two groups checkpointed and in the model): a resume with another setting is a
    CheckpointError naming it, before any work: the model and the checkpoint directory (every byte) are as they were,
    and the right resume still ends bitwise at the uninterrupted result."""
    dense, ref, ref_rep = prune_ref
    data = _data()
    ck = tmp_path / "ck"
    m = _net()
    stop = _Injector(4, _Boom)  # the 4th layer done: blocks.0 and blocks.1 finished
    with pytest.raises(_Boom):
        prune_model(m, data, "2:4", checkpoint_dir=str(ck), progress=False, callback=stop.wrap("cb", lambda r: 0))

    def snapshot():
        return {p.name: p.read_bytes() for p in sorted(ck.iterdir())}

    files, held = snapshot(), _weights(m)
    cases = [
        ({"sequential": False}, "sequential"),
        ({"method_kwargs": {"blocksize": 8}}, "method_kwargs"),
        ({"damp": 0.02}, "damp"),
        ({"pattern": "unstructured:0.5"}, "pattern"),
        ({"early_stop": False}, "early_stop"),
        ({"groups": "layer"}, "groups"),
        ({"data": _data()[:1]}, "calibration"),
        ({"modules": "blocks.*"}, "layers"),
    ]
    for change, key in cases:
        kw = dict(change)
        batches = kw.pop("data", data)
        with pytest.raises(CheckpointError, match=rf"differs in: {key}\)"):
            prune_model(m, batches, kw.pop("pattern", "2:4"), checkpoint_dir=str(ck), progress=False, **kw)
        assert snapshot() == files, key
        assert all(torch.equal(v, held[k]) for k, v in _weights(m).items()), key
    # a model of another dtype: its layers' dtypes differ from the checkpoint's
    m64 = _net(torch.float64)
    with pytest.raises(CheckpointError, match=r"differs in: calibration, layers\)"):
        prune_model(m64, [x.double() for x in data], "2:4", checkpoint_dir=str(ck), progress=False)
    assert snapshot() == files
    rep = prune_model(m, data, "2:4", checkpoint_dir=str(ck), progress=False)
    assert _rep_key(rep) == ref_rep and [r.resumed for r in rep.layers] == [True] * 4 + [False]
    assert all(torch.equal(v, ref[k]) for k, v in _weights(m).items())


# =========================================================================== GradientIndex


MODS = {"a": 3, "b": 2}
KW = dict(dtype=torch.bfloat16, per_token=True, shard_rows=2)
X = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
# (rows, num_tokens, commit): the committed states hold 0, 3, 6 or 10 rows
OPS = ["create", (0, 3, [1, 2], True), (3, 5, [2], False), (5, 6, [1], False), "commit", (6, 10, [3, 1], True),
       "close"]
COMMITTED = {0: 0, 3: 2, 6: 4, 10: 6}  # rows -> examples


def _header(p: Path):
    return json.loads((p / gi.HEADER).read_text())


def _build(path, stop_on=()):
    """Run OPS; returns (index of the op that raised one of stop_on, or None, the exception, the writer)."""
    w = None
    for k, op in enumerate(OPS):
        try:
            if op == "create":
                w = GradientIndex.create(path, MODS, **KW)
            elif op == "commit":
                w.commit()
            elif op == "close":
                w.close()
            else:
                lo, hi, c, cm = op
                w.append(X[lo:hi], num_tokens=c, commit=cm)
        except stop_on as e:
            return k, e, w
    return None, None, w


@pytest.fixture(scope="module")
def index_ref(tmp_path_factory):
    p = tmp_path_factory.mktemp("ref") / "ix"
    _build(p)
    ix = GradientIndex.open(p)
    out = (_header(p), ix.get(range(10)).view(torch.int16).clone(), ix.offsets.tolist())
    ix.close()
    return out


def _finish(path, w, ref, where):
    """Append the chunks the writer does not hold yet, close, and compare with the uninterrupted build."""
    have = len(w)
    assert have in COMMITTED, where
    for lo, hi, c, _ in [op for op in OPS if isinstance(op, tuple) and op[0] >= have]:
        w.append(X[lo:hi], num_tokens=c)
    w.close()
    w.close()
    hdr, rows, offs = ref
    assert _header(path) == hdr, where
    ix = GradientIndex.open(path)
    assert torch.equal(ix.get(range(10)).view(torch.int16), rows) and ix.offsets.tolist() == offs, where
    ix.close()


def _install_index(monkeypatch, inj):
    over = {name: inj.wrap(name, getattr(os, name)) for name in
            ("open", "write", "replace", "ftruncate", "truncate", "lseek", "unlink", "close")}
    over["fsync"] = inj.wrap("fsync", os.fsync, noop=True)  # counted, not run (speed)
    monkeypatch.setattr(gi, "os", _OsProxy(over))
    monkeypatch.setattr(gi, "_fsync_dir", inj.wrap("_fsync_dir", gi._fsync_dir, noop=True))


@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_index_build_interrupted_at_every_file_call(tmp_path, monkeypatch, index_ref, exc, mode):
    """An exception at the n-th os call of index.py (open, write, fsync, replace, ftruncate, truncate, lseek, unlink,
    close, the directory fsync), for every n. After it: the writer (still open) counts exactly the rows the header on
    disk commits (fixed: an interrupted commit left it counting uncommitted ones); ``open`` refuses the unfinished
    index and ``allow_incomplete`` reads a committed prefix; no temporary header is left. Then the same writer (odd
    n) or a resume after the with-block's abort (even n, which must release every descriptor) finishes the build,
    equal to an uninterrupted one (header and rows bitwise)."""
    hdr_ref, rows_ref, offs_ref = index_ref
    n = 0
    while True:
        n += 1
        path = tmp_path / f"ix{n}"
        # (after an os.open its descriptor would be lost, before an os.close it would never be closed: not injected)
        inj = _Injector(n, exc, mode, skip_after=("open",), skip_before=("close",))
        with monkeypatch.context() as mp:
            _install_index(mp, inj)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                k, e, w = _build(path, stop_on=(exc,))
        if k is None:
            assert inj.raised is None, n
            if inj.calls < n:
                break
            continue  # a call not injected (see above)
        where = f"{exc.__name__} {mode} call {n} ({inj.where}) in op {k} {OPS[k]}"
        assert e is inj.raised, where
        e = None
        hp = path / gi.HEADER
        assert not (path / (gi.HEADER + ".tmp")).exists(), where
        hdr = _header(path) if hp.exists() else None
        if hdr is not None:
            c = hdr["count"]
            assert COMMITTED.get(c) == hdr["examples"], where
            if w is not None and w._writable:
                assert (len(w), w.num_examples, w.nonfinite_rows) == (c, hdr["examples"], 0), where
            if hdr["complete"]:
                assert hdr == hdr_ref, where
            else:
                with pytest.raises(IndexFormatError):
                    GradientIndex.open(path)
            ix = GradientIndex.open(path, allow_incomplete=True)
            assert torch.equal(ix.get(range(c)).view(torch.int16), rows_ref[:c]), where
            assert ix.offsets.tolist() == offs_ref[:COMMITTED[c] + 1], where
            ix.close()
        else:
            assert w is None or not w._writable, where
        if n % 2 and w is not None and w._writable:
            _finish(path, w, index_ref, where)
        else:
            if w is not None and w._writable:
                w.__exit__(exc, inj.raised, None)  # the with-block's exit: the build is aborted
            w = None
            assert _fds(path) == {}, where  # no shard, token file or lock left open
            w2 = GradientIndex.create(path, MODS, resume=hdr is not None, **KW)
            _finish(path, w2, index_ref, where)
        w = None
        assert _fds(path) == {}, where
    assert n > 40, n


def test_append_retried_after_an_interrupted_commit_stores_its_rows_once(tmp_path, monkeypatch):
    """Fixed (index.py, commit): a KeyboardInterrupt while the header was being written left the rows counted; the
    retried append then stored them a second time (the index held 2 + 3 + 3 rows)."""
    path = tmp_path / "ix"
    w = GradientIndex.create(path, MODS, dtype=torch.float32)
    w.append(X[:2])
    real = gi._atomic_write_json

    def interrupted(p, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(gi, "_atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.append(X[2:5])
    monkeypatch.setattr(gi, "_atomic_write_json", real)
    assert len(w) == 2 and _header(path)["count"] == 2
    assert w.append(X[2:5]).tolist() == [2, 3, 4]
    w.close()
    ix = GradientIndex.open(path)
    assert len(ix) == 5 and torch.equal(ix.get(range(5)), X[:5])
    ix.close()


# =========================================================================== gradkit._io.write_dir_atomic


@pytest.mark.parametrize("existed", [True, False])
def test_write_dir_atomic_interrupted_at_every_os_call(tmp_path, monkeypatch, existed):
    """KeyboardInterrupt / an exception before or after every os call (and the directory exchange) of a save: the
    target is exactly the old directory or exactly the new one, no staging directory and no descriptor is left."""

    def listing(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} \
            if d.exists() else None

    writers = {"a.bin": lambda p: Path(p).write_bytes(b"new-a"), "config.json": lambda p: Path(p).write_text("2")}
    new = {"a.bin": b"new-a", "config.json": b"2", **({"keep.bin": b"k"} if existed else {})}
    names = ("mkdir", "link", "open", "fsync", "rename", "replace", "chmod", "chown", "listdir", "close")
    runs = 0
    for mode in ("before", "after"):
        for exc in (KeyboardInterrupt, _Boom):
            n = 0
            while True:
                n += 1
                base = tmp_path / f"{mode}{exc.__name__}{n}"
                base.mkdir()
                d = base / "model"
                if existed:
                    d.mkdir()
                    (d / "a.bin").write_bytes(b"old-a")
                    (d / "config.json").write_text("1")
                    (d / "keep.bin").write_bytes(b"k")
                old = listing(d)
                # (after mkdir / open the new directory / descriptor would be lost; before close, never closed)
                inj = _Injector(n, exc, mode, skip_after=("mkdir", "open"), skip_before=("close",))
                over = {nm: inj.wrap(nm, getattr(os, nm)) for nm in names}
                with monkeypatch.context() as mp:
                    mp.setattr(gio, "os", _OsProxy(over))
                    mp.setattr(gio, "_exchange", inj.wrap("exchange", gio._exchange))
                    try:
                        gio.write_dir_atomic(str(d), writers)
                    except exc as e:
                        assert e is inj.raised
                        e = None
                where = f"{mode} {exc.__name__} call {n} ({inj.where})"
                assert listing(d) in (old, new), where
                assert [p.name for p in base.iterdir() if p.name != "model"] == [], where
                assert _fds(base) == {}, where
                runs += 1
                if inj.calls < n:
                    break
    assert runs > 40, runs

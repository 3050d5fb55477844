"""Audit (s33): crash safety of GradientIndex builds, by a randomized kill-point fuzzer.

A schedule (made from a seed: dtype fp16/bf16/fp32, per-token or not, small shard sizes so shards roll over,
appends of random sizes holding some NaN / Inf / fp16-overflow rows, commit() and commit=False at random
points, writers dropped without close() or aborted by an exception in their with-block and resumed, complete
indexes resumed, an old index overwritten, a 2-rank build) is run by a forked child that
kills itself with SIGKILL just before its N-th file-system call (os.open / write / fsync / replace / rename /
ftruncate / truncate / unlink / mkdir), or in the middle of its N-th os.write (half the bytes written:
a "torn" write), or after a random delay. The children are forked from one helper process (a fork server:
this module run with ``python -c``) that imported torch and gradkit once, so a kill point costs a fork, not an
interpreter start. The child logs through a pipe (never through the hooked calls) which op of the schedule it
had begun and finished.

After each kill the parent checks, against a model of the schedule (every header state each op may leave on
disk, and the rows, token counts and non-finite count of every committed prefix of the chunks):

* ``open()`` either raises IndexFormatError (no committed header / build did not complete) or opens a complete
  index whose build had reached close(); it never opens an incomplete build;
* ``open(allow_incomplete=True)`` shows exactly a committed state the op in flight may leave (never rows not
  committed, never other values), with consistent per-token offsets and non-finite count;
* ``create(..., resume=True)`` (or a fresh create where no header was ever committed) continues from that
  state, and finishing the build gives an index byte-identical to an uninterrupted build, with no stray
  files (temporary header, uncommitted shards) left.

Disk-full is simulated in this process (os.write / os.fsync / os.replace / os.open(O_CREAT) / os.mkdir raising
ENOSPC at the N-th call, once or for every later write), and for real with RLIMIT_FSIZE in a child (EFBIG,
SIGXFSZ ignored): the error must be an OSError naming the index, what is left on disk obeys the same
invariants, and the same writer (or a resume) finishes the build. A 2-rank (gloo) build is killed the same
way (the other rank killed with it).

The logged calls of an uninterrupted run also give a power-loss proxy (which SIGKILL cannot show): every
commit fsyncs the data it lists and makes new shard names durable before it replaces the header, and fsyncs
the index directory after.

The default run takes a fixed subset of kill points (about 25 s on 2 cores; the builds run on /dev/shm where
there is one); ``GRADKIT_DEEP=1`` (or ``HYPOTHESIS_PROFILE=deep``, the suite's deep profile) sweeps every kill
point (before each call, and a torn version of each write) of 66 schedules, every ENOSPC site of 19, more
RLIMIT_FSIZE limits and every kill point of the 2-rank build (about 7 minutes).

No kill point, disk-full site or file-size limit broke an invariant. Defects found (tests marked ``# DEFECT:``,
failing on the code audited, fixed in session 33): create() that fails on a full disk raises a bare OSError naming neither the
index nor its state (test_create_disk_full_error_names_the_index), and a per-token create() that fails after
writing its first header leaves that header behind, so that retrying it is refused
(test_create_that_fails_leaves_no_index_behind); a writer's nonfinite_rows leaves out the rows refused by
appends not yet committed (test_nonfinite_rows_counts_pending_appends).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import gradkit.index as gi
from gradkit.index import GradientIndex, IndexFormatError, NonFiniteGradientError

pytestmark = [pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning"),
              pytest.mark.filterwarnings("ignore:grads. .* rows hold NaN or Inf:RuntimeWarning")]

DEEP = os.environ.get("GRADKIT_DEEP") == "1" or os.environ.get("HYPOTHESIS_PROFILE") == "deep"

MODS = {"m.a": 5, "m.b": 3}
D = sum(MODS.values())
PROJ = {"kind": "rademacher", "seed": 5}
TORCH_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HOOKED = ("open", "write", "fsync", "replace", "rename", "ftruncate", "truncate", "unlink", "mkdir", "rmdir")
NOHEADER = "no-header"
_UNSET = object()


# =========================================================================== schedules and their model


class Schedule:
    """A build: settings, chunks (rows, token counts) and ops. Ops: ("create", "new" | "resume" | "overwrite"),
    ("append", chunk, commit), ("commit",), ("close",), ("drop",) (the writer dropped without close: an
    interrupted build), ("abort",) (an exception inside the writer's with-block); the op after close / drop /
    abort resumes the build. Chunks are appended in order; after a drop or abort the chunks since the last
    commit are appended again."""

    def __init__(self, seed, dtype=None, per_token=None, shard_rows=_UNSET, breaks=None, nchunks=None,
                 overwrite=False, ops=None):
        rng = random.Random(seed)
        self.overwrite = overwrite
        self.seed = seed
        # every draw is made whatever the arguments, so that spec() rebuilds the same schedule
        r_dtype, r_tok, r_shard, r_n = rng.choice(list(TORCH_DT)), rng.random() < 0.5, \
            rng.choice([1, 2, 3, 4, None]), rng.randint(4, 7)
        self.dtype = dtype or r_dtype
        self.per_token = r_tok if per_token is None else per_token
        self.shard_rows = r_shard if shard_rows is _UNSET else shard_rows
        nchunks = nchunks or r_n
        g = torch.Generator().manual_seed(seed)
        self.chunks = []
        for _ in range(nchunks):
            n = rng.choice([0, 1, 2, 3, 3, 5, 7])
            x = torch.randint(-32, 33, (n, D), generator=g).float() / 8  # exact in fp16 / bf16 / fp32
            if n and rng.random() < 0.4:
                x[rng.randrange(n), rng.randrange(D)] = rng.choice([math.nan, math.inf, -math.inf, 1e5])
            counts = None
            if self.per_token:
                ne = rng.randint(1, n + 1) if n else rng.randint(0, 2)
                cuts = sorted(rng.randint(0, n) for _ in range(ne - 1))
                counts = [b - a for a, b in zip([0] + cuts, cuts + [n])] if ne else []
            self.chunks.append((x, counts))
        # ops
        self.ops = [("create", "overwrite" if overwrite else "new")]
        r_breaks = rng.choice([0, 1, 2])
        breaks = r_breaks if breaks is None else breaks
        self._breaks = breaks
        committed = pending = 0
        while pending < nchunks:
            commit = rng.random() < 0.55
            self.ops.append(("append", pending, commit))
            pending += 1
            if commit:
                committed = pending
            r = rng.random()
            if r < 0.2:
                self.ops.append(("commit",))
                committed = pending
            elif r < 0.5 and breaks and pending < nchunks:
                breaks -= 1
                kind = rng.choice(["close", "drop", "abort"])
                self.ops.append((kind,))
                if kind == "close":
                    committed = pending
                else:
                    pending = committed
                self.ops.append(("create", "resume"))
        self.ops.append(("close",))
        if ops is not None:  # given: the chunks and settings above, these ops
            self.ops = [tuple(op) for op in ops]
        self.finish_commits = [rng.random() < 0.5 for _ in range(nchunks)]
        self._prefixes()
        self._op_states()

    def spec(self):
        return {"seed": self.seed, "dtype": self.dtype, "per_token": self.per_token, "shard_rows": self.shard_rows,
                "breaks": self._breaks, "nchunks": len(self.chunks), "overwrite": self.overwrite, "ops": self.ops}

    def __repr__(self):
        return (f"Schedule(seed={self.seed}, {self.dtype}, per_token={self.per_token}, shard_rows={self.shard_rows}, "
                f"chunks={[c[0].shape[0] for c in self.chunks]}, ops={self.ops})")

    def create(self, path, resume=False, **kw):
        return GradientIndex.create(path, MODS, dtype=TORCH_DT[self.dtype], projection=PROJ, per_token=self.per_token,
                                    shard_rows=self.shard_rows, resume=resume, **kw)

    def _prefixes(self):
        """The committed content after the first j chunks: stored rows (as float32), token counts, non-finite."""
        dt = TORCH_DT[self.dtype]
        rows, counts, nonfinite = [torch.zeros(0, D)], [], 0
        self.prefix = [(torch.zeros(0, D), [] if self.per_token else None, 0)]
        for x, c in self.chunks:
            st = x.to(dt)
            ok = torch.isfinite(x).all(1) & torch.isfinite(st).all(1)
            nonfinite += int((~ok).sum())
            rows.append(st[ok].float())
            if self.per_token:
                ex = torch.repeat_interleave(torch.arange(len(c)), torch.tensor(c, dtype=torch.int64))
                counts += torch.bincount(ex[ok], minlength=len(c)).tolist()
            self.prefix.append((torch.cat(rows), list(counts) if self.per_token else None, nonfinite))

    def _same_prefix(self, a, b):
        (ra, ca, na), (rb, cb, nb) = self.prefix[a], self.prefix[b]
        return ra.shape == rb.shape and torch.equal(ra, rb) and ca == cb and na == nb

    def _op_states(self):
        """For each op: (pre, mid, post): the disk state before it, the states it may leave when it is
        interrupted (besides pre), and after it. A state: NOHEADER or (j, complete)."""
        disk, committed, pending = NOHEADER, 0, 0
        resumed_complete = None  # the session resumed a complete index holding this many chunks
        self.states = []
        for op in self.ops:
            pre, mid = disk, set()
            if op[0] == "create":
                resumed_complete = committed if op[1] == "resume" and disk != NOHEADER and disk[1] else None
                committed = 0 if op[1] != "resume" else committed
                pending = committed
                mid = {(committed, False)}
            elif op[0] == "append":
                assert op[1] == pending
                pending += 1
                if op[2]:
                    committed = pending
                    mid = {(pending, False)}
            elif op[0] == "commit":
                committed = pending
                mid = {(pending, False)}
            elif op[0] == "close":
                committed = pending
                mid = {(pending, False), (pending, True)}
            elif op[0] == "drop":
                pending = committed
            elif op[0] == "abort":  # rolls back to the last commit; a resumed complete index that gained
                pending = committed  # nothing is marked complete again
                if resumed_complete is not None and self._same_prefix(committed, resumed_complete):
                    mid = {(committed, True)}
            if mid:
                disk = max(mid, key=lambda s: s[1])
            self.states.append((pre, mid, disk))

    def allowed_after(self, log):
        """The disk states allowed after the child stopped, from its log ("B k" begun, "E k" ended)."""
        begun = [int(ln.split()[1]) for ln in log if ln.startswith("B ")]
        ended = {int(ln.split()[1]) for ln in log if ln.startswith("E ")}
        if not begun:
            return {NOHEADER}, "before the first op"
        k = begun[-1]
        pre, mid, post = self.states[k]
        if k in ended:
            return {post}, f"after op {k} {self.ops[k]}"
        return {pre} | mid, f"during op {k} {self.ops[k]}"


# =========================================================================== running a schedule


def run_ops(path, sched, log, start=0, writer=None):
    """Run sched.ops[start:]; log("B k") / log("E k") around op k. Returns (None, writer) when done, or
    (k, the OSError) when op k raised one (the writer as it was left is then returned too)."""
    w = writer
    for k in range(start, len(sched.ops)):
        op = sched.ops[k]
        log(f"B {k}")
        try:
            if op[0] == "create":
                w = sched.create(path, resume=op[1] == "resume", overwrite=op[1] == "overwrite")
            elif op[0] == "append":
                x, c = sched.chunks[op[1]]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    w.append(x, num_tokens=c, commit=op[2])
            elif op[0] == "commit":
                w.commit()
            elif op[0] == "close":
                w.close()
            elif op[0] == "drop":
                w = None  # freed at once (refcount): its lock and descriptors go with it, nothing is committed
            elif op[0] == "abort":  # an exception inside `with GradientIndex.create(...)`
                w.__exit__(RuntimeError, RuntimeError("the caller's error"), None)
                w = None
        except OSError as e:
            log(f"X {k} {e.errno} {e}")
            return (k, e), w
        log(f"E {k}")
    return None, w


def _describe(name, args):
    a = args[0] if args else None
    if isinstance(a, int) and name in ("write", "fsync", "ftruncate"):
        try:
            a = os.readlink(f"/proc/self/fd/{a}")
        except OSError:
            pass
    return f"{name} {Path(str(a)).name}" if a is not None else name


def _install_hooks(on_call):
    """Wrap the os functions of HOOKED: on_call(i, name, real, args, kwargs) -> result, i counting calls."""
    reals = {n: getattr(os, n) for n in HOOKED if hasattr(os, n)}
    count = [0]

    for name, real in reals.items():
        def wrapper(*a, _name=name, _real=real, **k):
            i = count[0]
            count[0] += 1
            return on_call(i, _name, _real, a, k)
        setattr(os, name, wrapper)

    def restore():
        for name, real in reals.items():
            setattr(os, name, real)
    return restore, count


# =========================================================================== the fork server (child side)


def _child(req, wfd):
    """In a forked child: run the build the request describes, with its kill / count / rlimit setting."""
    real_write = os.write

    def log(s):
        real_write(wfd, (s + "\n").encode())

    if req.get("fsize") is not None:
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    kill = req.get("kill") if req.get("kill_rank") in (None, req.get("rank")) else None
    if kill is not None:
        n, mode = kill

        def on_call(i, name, real, a, k):
            if i == n:
                if mode == "torn" and name == "write":
                    mv = memoryview(a[1]).cast("B")
                    if len(mv) >= 2:
                        real(a[0], mv[:len(mv) // 2])
                log(f"K {i} {_describe(name, a)}")
                os.kill(os.getpid(), signal.SIGKILL)
                while True:  # pragma: no cover - SIGKILL does not return
                    time.sleep(1)
            return real(*a, **k)
        _install_hooks(on_call)
    elif req.get("count"):
        def on_call(i, name, real, a, k):
            log(f"H {i} {_describe(name, a)}")
            return real(*a, **k)
        _install_hooks(on_call)
    if req["kind"] == "build":
        sched = Schedule(**req["sched"])
        run_ops(req["path"], sched, log)
    elif req["kind"] == "dist":
        _dist_child(req, log)
    log("DONE")


def _fork_one(req, rank=None):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            if rank is not None:
                req = dict(req, rank=rank)
            _child(req, w)
        except BaseException:  # noqa: BLE001 - reported through the pipe
            try:
                os.write(w, ("TRACEBACK " + traceback.format_exc().replace("\n", "\\n") + "\n").encode())
            except BaseException:  # noqa: BLE001
                pass
            code = 3
        os._exit(code)
    os.close(w)
    return pid, r


def _read_all(fd):
    out = b""
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        out += b
    os.close(fd)
    return out.decode().splitlines()


def _status(st):
    if os.WIFSIGNALED(st):
        return {"signal": os.WTERMSIG(st), "code": None}
    return {"signal": None, "code": os.WEXITSTATUS(st)}


def _serve_one(req):
    t0 = time.monotonic()
    if req["kind"] == "build":
        pid, r = _fork_one(req)
        if req.get("delay") is not None:
            time.sleep(req["delay"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log = _read_all(r)
        _, st = os.waitpid(pid, 0)
        return dict(_status(st), log=log, elapsed=time.monotonic() - t0)
    if req["kind"] == "dist":
        kids = [_fork_one(req, rank) for rank in range(2)]
        left = {pid for pid, _ in kids}
        status = {}
        deadline = time.monotonic() + 60
        while left:
            pid, st = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if time.monotonic() > deadline:  # a rank waiting for a dead peer: the job is killed
                    for p in left:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
                time.sleep(0.002)
                continue
            left.discard(pid)
            status[pid] = _status(st)
            if os.WIFSIGNALED(st) or (os.WIFEXITED(st) and os.WEXITSTATUS(st)):
                for p in left:  # one rank died: the job dies with it
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
        return {"ranks": [dict(status[pid], log=_read_all(r)) for pid, r in kids], "elapsed": time.monotonic() - t0}
    raise ValueError(req["kind"])


def _server():
    torch.set_num_threads(1)
    for line in sys.stdin:
        try:
            res = _serve_one(json.loads(line))
        except BaseException:  # noqa: BLE001
            res = {"error": traceback.format_exc()}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


class ForkServer:
    def __init__(self):
        here = Path(__file__).resolve()
        boot = ("import importlib.util, sys\n"
                f"spec = importlib.util.spec_from_file_location('_s33_crash', {str(here)!r})\n"
                "m = importlib.util.module_from_spec(spec); sys.modules['_s33_crash'] = m\n"
                "spec.loader.exec_module(m); m._server()\n")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.p = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env, cwd=str(here.parent))

    def __call__(self, **req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, "the fork server died"
        res = json.loads(line)
        assert "error" not in res, res["error"]
        return res

    def close(self):
        with contextlib.suppress(Exception):
            self.p.stdin.close()
        self.p.wait(30)


@pytest.fixture
def work(tmp_path):
    """A scratch directory on tmpfs where there is one (/dev/shm): the builds' many fsyncs cost nothing there
    (they cost the most of the default run's time on a busy disk), and what a SIGKILL leaves is the same on any
    file system (the page cache). Elsewhere pytest's tmp_path."""
    base = Path("/dev/shm")
    if not (base.is_dir() and os.access(base, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="gradkit-s33-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    if not hasattr(os, "fork") or not Path("/proc/self/fd").is_dir():
        pytest.skip("the fork server needs os.fork and /proc (Linux)")
    s = ForkServer()
    yield s
    s.close()


# =========================================================================== checks (parent side)


def tree(path):
    """Every file under path but the writer locks: {relative name: bytes}."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*"))
            if p.is_file() and not p.name.startswith(".lock")}


def reference(sched, path):
    """The same chunks built without interruption; its files."""
    w = sched.create(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x, c in sched.chunks:
            w.append(x, num_tokens=c)
    w.close()
    return tree(path)


def _data(ix):
    n = len(ix)
    rows = ix.get(range(n)) if n else torch.zeros(0, D)
    counts = None
    if ix.per_token:
        off = ix.offsets
        assert off[0] == 0 and off[-1] == n and (off[1:] >= off[:-1]).all(), off
        assert len(off) == ix.num_examples + 1
        counts = [int(b - a) for a, b in zip(off[:-1], off[1:])]
        if n:  # example_of agrees with the offsets
            ex = ix.example_of(range(n)).tolist()
            assert ex == [i for i, c in enumerate(counts) for _ in range(c)]
    else:
        assert ix.num_examples == n and ix.offsets is None
    assert torch.isfinite(rows).all(), "a non-finite row was stored"
    return rows, counts, ix.nonfinite_rows


def _same(sched, j, data):
    rows, counts, nf = sched.prefix[j]
    return rows.shape == data[0].shape and torch.equal(rows, data[0]) and counts == data[1] and nf == data[2]


def observe(path):
    """What is on disk: NOHEADER, or (data, complete) (data of the index open() shows, complete: whether
    open() without allow_incomplete accepts it). Every refusal must be an IndexFormatError that says why."""
    try:
        ix = GradientIndex.open(path)
    except FileNotFoundError:
        return NOHEADER, "directory missing"
    except IndexFormatError as e:
        msg = str(e)
        if re.match(r"^path: \S+ holds no committed index header", msg):
            with pytest.raises(IndexFormatError, match="holds no committed index header"):
                GradientIndex.open(path, allow_incomplete=True)
            return NOHEADER, msg
        assert re.match(r"^open: the build of \S+ did not complete \(\d+ rows committed", msg), msg
        inc = GradientIndex.open(path, allow_incomplete=True)
        return (_data(inc), False), msg
    return (_data(ix), True), "complete"


def check_disk(path, sched, allowed, where):
    """The disk state must be one of `allowed`; returns the chunk position j it holds (None: no header)."""
    got, how = observe(path)
    ctx = f"{sched!r} {where}: disk shows {how}; allowed {sorted(allowed, key=str)}"
    if got == NOHEADER:
        assert NOHEADER in allowed, ctx
        return None
    data, complete = got
    hits = [j for (j, c) in (s for s in allowed if s != NOHEADER) if c == complete and _same(sched, j, data)]
    assert hits, (f"{ctx}; open(allow_incomplete=True) shows {len(data[0])} rows, counts {data[1]}, nonfinite "
                  f"{data[2]}, complete={complete}; committed prefixes hold "
                  f"{[len(sched.prefix[j][0]) for j, _ in (s for s in allowed if s != NOHEADER)]} rows")
    return max(hits)


def assert_trimmed(path, sched, where):
    """The files in shards/ are exactly what the header on disk lists, of exactly its sizes: no uncommitted
    bytes or shard files (resume cuts them off; a failed write rolls them back). A token file the header does
    not list yet may exist empty (create makes it before the first commit lists it)."""
    h = json.loads((Path(path) / gi.HEADER).read_text())
    rb = D * TORCH_DT[sched.dtype].itemsize
    want = {Path(s["file"]).name: s["rows"] * rb for s in h["shards"]}
    want.update({Path(t["file"]).name: t["examples"] * 8 for t in h["token_files"]})
    got = {f.name: f.stat().st_size for f in (Path(path) / gi.SHARD_DIR).iterdir()}
    got = {k: v for k, v in got.items() if not (k.endswith(".tokens.bin") and v == 0 and k not in want)}
    assert got == want, f"{sched!r} {where}: shards/ holds {got}, the header lists {want}"


def finish(path, sched, j, ref, writer=None, where=""):
    """Continue the build from chunk position j (resume, or a fresh create without a header; or `writer`)
    and close it: the result must be byte-identical to the uninterrupted build, with no stray files."""
    if writer is not None:
        w = writer
    elif j is None:
        with pytest.raises(IndexFormatError, match="nothing to resume"):
            sched.create(path, resume=True)
        w, j = sched.create(path), 0
    else:
        w = sched.create(path, resume=True)
        assert_trimmed(path, sched, f"{where}, after resume")
    rows, counts, nf = sched.prefix[j]
    assert (len(w), w.num_examples, w.nonfinite_rows) == \
        (len(rows), len(counts) if sched.per_token else len(rows), nf), (sched, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(j, len(sched.chunks)):
            x, c = sched.chunks[i]
            w.append(x, num_tokens=c, commit=sched.finish_commits[i])
    w.close()
    got = tree(path)
    assert sorted(got) == sorted(ref), f"{sched!r} {where}: files after resume+close {sorted(got)} != {sorted(ref)}"
    bad = [f for f in ref if got[f] != ref[f]]
    assert not bad, f"{sched!r} {where}: files differ from an uninterrupted build: {bad}"
    ix = GradientIndex.open(path)
    assert _same(sched, len(sched.chunks), _data(ix))


# =========================================================================== the kill-point fuzzer

# (seed, settings) of the default run: every dtype, per-token or not, shard sizes 1..3 and one growing shard,
# interrupted-and-resumed and closed-and-resumed sessions
CI_CASES = [
    (101, dict(dtype="float16", per_token=False, shard_rows=2, breaks=1)),
    (202, dict(dtype="bfloat16", per_token=True, shard_rows=3, breaks=2)),
    (303, dict(dtype="float32", per_token=True, shard_rows=1, breaks=0)),
    (404, dict(dtype="float16", per_token=True, shard_rows=None, breaks=1)),
    (505, dict(dtype="bfloat16", per_token=False, shard_rows=4, breaks=2)),
    (1009, {}),
    # a complete index resumed, then with-blocks that raise: the first after committing an empty chunk, the
    # second before committing anything (the index is marked complete again where nothing new was committed)
    (404, dict(dtype="bfloat16", per_token=False, shard_rows=2, ops=[
        ("create", "new"), ("append", 0, True), ("append", 1, False), ("close",), ("create", "resume"),
        ("append", 2, True), ("abort",), ("create", "resume"), ("append", 3, False), ("abort",), ("create", "resume"),
        ("append", 3, True), ("close",)])),
]
DEEP_CASES = CI_CASES + [(s, {}) for s in range(1000, 1060) if s != 1009]


def _plan(sched, server, tmp_path):
    """A run with every hooked call logged: the number of kill points and what each is."""
    res = server(kind="build", path=str(tmp_path / "count"), sched=sched.spec(), count=True)
    assert res["code"] == 0 and res["log"][-1] == "DONE", res["log"][-3:]
    calls = [ln.split(" ", 2)[2] for ln in res["log"] if ln.startswith("H ")]
    _check_durability_order(sched, res["log"], tmp_path / "count")
    return calls, res["elapsed"]


def _check_durability_order(sched, log, path):
    """From the logged calls of an uninterrupted run (a proxy for power loss, which SIGKILL does not model): in
    every op that commits, each shard / token file written since its last fsync is fsynced, and each new name in
    shards/ made durable (shards/ fsynced), before the header is replaced; and the index directory is fsynced
    after the replace, before the op returns."""
    dirty, new, existing = set(), set(), set()
    op, replaced = None, False
    for ln in log:
        if ln.startswith("B "):
            op = sched.ops[int(ln.split()[1])]
            if op[0] == "create":
                dirty.clear()
            continue
        if ln.startswith("E "):
            if replaced:
                assert False, f"{sched!r}: op {op} returned without fsyncing {path.name}/ after the header replace"
            continue
        if not ln.startswith("H "):
            continue
        name, _, arg = ln.split(" ", 2)[2].partition(" ")
        data_file = gi._SHARD_RE.match(arg) or gi._TOKENS_RE.match(arg)
        if name in ("write", "ftruncate") and data_file:
            dirty.add(arg)
        elif name in ("fsync", "truncate") and data_file:  # (truncate: a rollback to the committed, synced size)
            dirty.discard(arg)
        elif name == "open" and data_file and arg not in existing:
            existing.add(arg)
            new.add(arg)
        elif name == "unlink" and data_file:
            existing.discard(arg)
            new.discard(arg)
            dirty.discard(arg)
        elif name == "fsync" and arg == gi.SHARD_DIR:
            new.clear()
        elif name == "fsync" and arg == path.name:
            replaced = False
        elif name == "replace" and arg == gi.HEADER + ".tmp" and op[0] != "create":
            assert not dirty, f"{sched!r}: op {op} replaced the header before fsyncing {sorted(dirty)}"
            assert not new, f"{sched!r}: op {op} replaced the header before shards/ made {sorted(new)} durable"
            replaced = True


def _kill_points(calls, deep, rng):
    points = [(i, "before") for i in range(len(calls) + 1)]  # len(calls): no kill (the whole build runs)
    points += [(i, "torn") for i, c in enumerate(calls) if c.startswith("write")]
    if deep:
        return points
    # every header replace and the first call of each kind, plus a random sample
    must = {(i, "before") for i, c in enumerate(calls) if c.startswith("replace")}
    seen = set()
    for i, c in enumerate(calls):
        if c.split()[0] not in seen:
            seen.add(c.split()[0])
            must.add((i, "before"))
    must.add((len(calls), "before"))
    rest = [p for p in points if p not in must]
    return sorted(must | set(rng.sample(rest, min(len(rest), 24))))


@pytest.mark.parametrize("seed, kw", DEEP_CASES if DEEP else CI_CASES,
                         ids=[f"{c[0]}{'-ops' if 'ops' in c[1] else ''}" for c in (DEEP_CASES if DEEP else CI_CASES)])
def test_sigkill_at_every_write_site(server, work, seed, kw):
    sched = Schedule(seed, **kw)
    ref = reference(sched, work / "ref")
    calls, _ = _plan(sched, server, work)
    assert any(c.startswith("replace") for c in calls) and any(c.startswith("write r0") for c in calls), calls
    points = _kill_points(calls, DEEP, random.Random(seed))
    for n, mode in points:
        path = work / f"k{n}{mode[0]}"
        res = server(kind="build", path=str(path), sched=sched.spec(), kill=[n, mode])
        where = f"kill {mode} call {n} ({calls[n] if n < len(calls) else 'none'})"
        if n < len(calls):
            assert res["signal"] == signal.SIGKILL, (where, res["log"][-3:])
        else:
            assert res["code"] == 0 and res["log"][-1] == "DONE", (where, res["log"][-3:])
        allowed, when = sched.allowed_after(res["log"])
        j = check_disk(path, sched, allowed, f"{where}, {when}")
        finish(path, sched, j, ref, where=f"{where}, {when}")


def test_sigkill_after_random_delays(server, work):
    """Kills at moments the hooks do not see (inside torch, between ops, in the dropped writer's GC)."""
    rng = random.Random(7)
    cases = [(505, dict(dtype="bfloat16", per_token=True, shard_rows=2)),
             (606, dict(dtype="float32", per_token=False, shard_rows=1))]
    for seed, kw in cases:
        sched = Schedule(seed, breaks=2, **kw)
        ref = reference(sched, work / f"ref{seed}")
        _, elapsed = _plan(sched, server, work / f"plan{seed}")
        for t in range(40 if DEEP else 10):
            path = work / f"d{seed}-{t}"
            res = server(kind="build", path=str(path), sched=sched.spec(), delay=rng.uniform(0, elapsed))
            allowed, when = sched.allowed_after(res["log"])
            j = check_disk(path, sched, allowed, f"delay kill, {when}")
            finish(path, sched, j, ref, where=f"delay kill, {when}")


def test_sigkill_during_overwrite_never_opens_a_mix(server, work):
    """create(overwrite=True) of a complete index, killed anywhere: the old index (intact), or a refusal, or
    the new build's committed state; never a mix of the two. Afterwards create(overwrite=True) (or a resume of
    the new build's committed state) builds the new index, equal to an uninterrupted build."""
    old = Schedule(11, dtype="float32", per_token=True, shard_rows=2, breaks=0)
    new = Schedule(12, dtype="float32", per_token=True, shard_rows=2, breaks=0, overwrite=True)
    ref = reference(new, work / "ref")
    reference(old, work / "old")
    oldtree = tree(work / "old")

    def populate(path):
        for name, b in oldtree.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(b)

    populate(work / "count")
    calls, _ = _plan(new, server, work)
    first_header = next(i for i, c in enumerate(calls) if c.startswith("replace"))
    points = range(len(calls) + 1) if DEEP else sorted(set(range(first_header + 2)) | {first_header + 6, len(calls)})
    for n in points:
        path = work / f"o{n}"
        populate(path)
        res = server(kind="build", path=str(path), sched=new.spec(), kill=[n, "before"])
        where = f"overwrite killed before call {n} ({calls[n] if n < len(calls) else 'none'})"
        if "E 0" in res["log"]:  # the overwrite is done: the new build's own states
            allowed, when = new.allowed_after(res["log"])
            j = check_disk(path, new, allowed, f"{where}, {when}")
            finish(path, new, j, ref, where=where)
            continue
        try:
            ix = GradientIndex.open(path, allow_incomplete=True)
        except IndexFormatError as e:  # the old index partly deleted: refused, never opened
            assert re.match(r"^(open: shard \S+ listed in the header is missing|open: token count file \S+ is missing"
                            r"|path: \S+ holds no committed index header)", str(e)), (where, str(e))
        else:
            d = _data(ix)
            assert _same(old, len(old.chunks), d) or _same(new, 0, d), \
                f"{where}: opens neither the old index nor the new build's empty start"
        finish(path, new, 0, ref, writer=new.create(path, overwrite=True), where=where)


# =========================================================================== disk full (ENOSPC), in this process


@contextlib.contextmanager
def enospc_at(n, sticky):
    """os.write / fsync / replace / rename / mkdir of a new directory / os.open creating a file raise ENOSPC at
    the n-th such call (sticky: every os.write from then on too, as on a disk that stays full)."""
    full = [False]

    def can_fail(name, a, k):
        if name in ("write", "fsync", "replace", "rename"):
            return True
        if name == "mkdir":
            return not os.path.exists(a[0])
        if name == "open":
            flags = a[1] if len(a) > 1 else k.get("flags", 0)
            return bool(flags & os.O_CREAT) and not os.path.exists(a[0])
        return False

    seen = [0]

    def on_call(i, name, real, a, k):
        if can_fail(name, a, k):
            hit = seen[0] == n or (full[0] and name == "write")
            seen[0] += 1
            if hit:
                full[0] = full[0] or sticky
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    restore, _ = _install_hooks(on_call)
    try:
        yield seen
    finally:
        restore()


ENOSPC_CASES = [(701, dict(dtype="float16", per_token=True, shard_rows=2, breaks=1)),
                (702, dict(dtype="bfloat16", per_token=False, shard_rows=1, breaks=1)),
                (703, dict(dtype="float32", per_token=True, shard_rows=None, breaks=2))]


def _enospc_run(sched, tmp_path, ref, n, sticky, errors):
    path = tmp_path / f"f{n}{'s' if sticky else ''}"
    log = []
    with enospc_at(n, sticky) as seen:
        failed, w = run_ops(path, sched, log.append)
    if failed is None:
        return seen[0], True
    k, e = failed
    where = f"ENOSPC at call {n}{' (sticky)' if sticky else ''}, op {k} {sched.ops[k]}"
    assert e.errno == errno.ENOSPC, where
    if str(path) not in str(e):  # the error must name the index it failed to write
        errors.append(f"{where}: {e}")
    # an op that failed with an error (not a kill) has rolled back: append / commit to the state before them
    # (rows appended with commit=False since the last commit go too), close() to it or to the committed but not
    # complete state (the complete header failed); create to no header or the empty / resumed header
    pre, mid, _ = sched.states[k]
    op = sched.ops[k]
    allowed = {pre} if op[0] in ("append", "commit") else {pre} | {m for m in mid if not m[1]}
    assert sched.allowed_after(log)[0] >= allowed
    j = check_disk(path, sched, allowed, where)
    if op[0] != "create":
        assert_trimmed(path, sched, f"{where}, after the failure")
    if w is not None and w._writable:
        # the same writer continues from its last commit
        assert op[0] != "create"
        assert (len(w), w.num_examples, w.nonfinite_rows) == (len(sched.prefix[j][0]), len(sched.prefix[j][1])
                                                              if sched.per_token else len(sched.prefix[j][0]),
                                                              sched.prefix[j][2]), where
    else:
        w = None
    finish(path, sched, j, ref, writer=w, where=where)
    return seen[0], False


ENOSPC_DEEP = ENOSPC_CASES + [(s, {}) for s in range(2000, 2016)]


@pytest.mark.parametrize("seed, kw", ENOSPC_DEEP if DEEP else ENOSPC_CASES,
                         ids=[str(c[0]) for c in (ENOSPC_DEEP if DEEP else ENOSPC_CASES)])
def test_disk_full_at_every_write_site(work, seed, kw):
    """ENOSPC at the n-th write-site call: an OSError (errno kept) naming the index; the disk holds the last
    committed state; the same writer (or a resume) finishes the build, identical to an uninterrupted one.
    create's errors do not name the index: see test_create_disk_full_error_names_the_index."""
    sched = Schedule(seed, **kw)
    ref = reference(sched, work / "ref")
    errors = []
    total, clean = _enospc_run(sched, work, ref, -1, False, errors)  # no failure: counts the calls
    assert clean and total > 10, total
    for n in range(total):  # default run: every call; a disk that stays full from every other call
        _enospc_run(sched, work, ref, n, False, errors)
        if DEEP or n % 2 == 1:
            _enospc_run(sched, work, ref, n, True, errors)
    # the create-time errors are pinned down (as a defect) by test_create_disk_full_error_names_the_index
    assert [e for e in errors if ", op 0 ('create'" not in e and "('create', 'resume')" not in e] == []


# =========================================================================== real EFBIG (RLIMIT_FSIZE)


def test_file_size_limit_efbig(server, work):
    """A child under RLIMIT_FSIZE (SIGXFSZ ignored): writes past the limit fail with EFBIG (after a short
    write up to it). The build raises an OSError naming the index; what is left obeys the invariants; a resume
    without the limit finishes it (the limits hit the shards, the growing single shard, and the header)."""
    cases = [(801, dict(dtype="float32", per_token=True, shard_rows=None, breaks=0)),
             (802, dict(dtype="float16", per_token=False, shard_rows=None, breaks=1))]
    hit = set()
    for seed, kw in cases:
        sched = Schedule(seed, **kw)
        ref = reference(sched, work / f"ref{seed}")
        hdr = len((work / f"ref{seed}" / "index.json").read_bytes())
        row = D * TORCH_DT[sched.dtype].itemsize
        limits = sorted({hdr - 40, hdr + 2, row * 3 + 1, row * 9, row * 14 + 3})
        if DEEP:
            limits = sorted(set(limits) | set(range(row, row * 40, max(1, row // 2)))
                            | set(range(hdr - 200, hdr + 50, 7)))
        for lim in limits:
            path = work / f"l{seed}-{lim}"
            res = server(kind="build", path=str(path), sched=sched.spec(), fsize=lim)
            assert res["code"] == 0, res["log"][-3:]
            x = [ln for ln in res["log"] if ln.startswith("X ")]
            where = f"RLIMIT_FSIZE={lim} (header {hdr} bytes, row {row} bytes)"
            if not x:
                assert res["log"][-1] == "DONE"
                assert tree(path) == ref
                continue
            _, k, eno, msg = x[0].split(" ", 3)
            assert int(eno) == errno.EFBIG, (where, x)
            op = sched.ops[int(k)]
            if op[0] != "create":  # (create's error names nothing: test_create_disk_full_error_names_the_index)
                assert str(path) in msg and "committed rows" in msg, (where, msg)
                hit.add(re.search(r"gradkit\.index: (\w+)", msg).group(1))
            else:
                hit.add("create")
            allowed, when = sched.allowed_after(res["log"])
            j = check_disk(path, sched, allowed, f"{where}, {when}")
            if op[0] != "create":
                assert_trimmed(path, sched, f"{where}, after the failure")
            finish(path, sched, j, ref, where=where)
    assert hit >= {"create", "committing", "writing"}, hit  # the header (first or later) and a shard hit the limit


# =========================================================================== 2-rank build killed


def _dist_rows(rank, seed):
    g = torch.Generator().manual_seed(seed * 10 + rank)
    x = torch.randint(-32, 33, (9 + 2 * rank, D), generator=g).float() / 8
    x[3, 1] = math.nan
    return x


def _dist_child(req, log):
    import torch.distributed as dist
    from datetime import timedelta

    rank = req["rank"]
    dist.init_process_group("gloo", init_method=f"file://{req['init']}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    x = _dist_rows(rank, req["seed"])
    kw = dict(dtype=torch.float16, projection=PROJ, shard_rows=2)
    warnings.simplefilter("ignore", RuntimeWarning)
    if req.get("mode") == "finish":
        try:
            w = GradientIndex.create(req["path"], MODS, resume=True, **kw)
        except (IndexFormatError, gi.DistributedBuildError) as e:
            log(f"FRESH {type(e).__name__}")
            w = GradientIndex.create(req["path"], MODS, **kw)
        n = len(w)
        log(f"RESUMED {n} {w.nonfinite_rows}")
        w.append(x[n + (n >= 3):])  # the NaN row 3 was refused: stored rows skip it
        w.close()
    else:
        log("B 0")
        w = GradientIndex.create(req["path"], MODS, **kw)
        log("E 0")
        for k, (a, b, commit) in enumerate([(0, 2, True), (2, 5, False), (5, 6, True), (6, len(x), False)], 1):
            log(f"B {k}")
            w.append(x[a:b], commit=commit)
            log(f"E {k}")
        log("B 5")
        w.close()
        log("E 5")
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_sigkill_of_a_two_rank_build(server, work):
    """A 2-rank gloo build, one rank killed at its n-th write-site call and the other with it: the index never
    opens unless rank 0 wrote the complete merged header (then it is the whole build); open(allow_incomplete)
    shows rank 0's committed view; 2 new ranks resume, each from its own committed rows, and the result equals
    an uninterrupted 2-rank build."""
    seed = 31
    want = torch.cat([x[torch.isfinite(x).all(1)] for x in (_dist_rows(0, seed), _dist_rows(1, seed))])
    want = want.half().float()
    res = server(kind="dist", path=str(work / "ref"), init=str(work / "init-ref"), seed=seed)
    assert [r["code"] for r in res["ranks"]] == [0, 0], res
    ref = tree(work / "ref")
    res = server(kind="dist", path=str(work / "count"), init=str(work / "init-count"), seed=seed, count=True)
    ncalls = [sum(ln.startswith("H ") for ln in r["log"]) for r in res["ranks"]]
    assert min(ncalls) > 30, ncalls
    # each rank's committed positions (stored rows): the first header, the commits after rows 0:2 and 5:6
    # (row 3 is NaN: 5 stored rows), and the whole build
    full = [int(torch.isfinite(_dist_rows(r, seed)).all(1).sum()) for r in (0, 1)]
    committed = [{0, 2, 5, full[r]} for r in (0, 1)]
    rng = random.Random(seed)
    points = [(r, n) for r in (0, 1) for n in range(ncalls[r])]
    if not DEEP:
        points = rng.sample(points, 16)
    for rank, n in points:
        path = work / f"k{rank}-{n}"
        res = server(kind="dist", path=str(path), init=str(work / f"init-k{rank}-{n}"), seed=seed,
                     kill=[n, "before"], kill_rank=rank)
        where = f"rank {rank} killed before its call {n}"
        assert res["ranks"][rank]["signal"] == signal.SIGKILL, (where, res["ranks"][rank]["log"][-3:])
        try:
            ix = GradientIndex.open(path)
        except FileNotFoundError:
            assert n < 2, where  # killed before the directory was made
        except IndexFormatError as e:
            assert re.match(r"^(path: \S+ holds no committed index header|open: the build of \S+ did not complete)",
                            str(e)), (where, str(e))
            if "did not complete" in str(e):  # rank 0's first header: the ranks' rows are in their own headers
                assert len(GradientIndex.open(path, allow_incomplete=True)) == 0, where
        else:  # only once rank 0 wrote the merged header, in close()
            assert "B 5" in res["ranks"][0]["log"], where
            assert torch.equal(_data(ix)[0], want) and ix.nonfinite_rows == 2, where
        fin = server(kind="dist", path=str(path), init=str(work / f"init-f{rank}-{n}"), seed=seed, mode="finish")
        assert [r["code"] for r in fin["ranks"]] == [0, 0], (where, fin)
        for r in (0, 1):  # each rank resumed from one of its commits
            pos = [int(ln.split()[1]) for ln in fin["ranks"][r]["log"] if ln.startswith("RESUMED")]
            assert len(pos) == 1 and pos[0] in committed[r], (where, r, pos)
        got = tree(path)
        assert sorted(got) == sorted(ref) and all(got[f] == ref[f] for f in ref), (where, sorted(got))


# =========================================================================== NaN / Inf, short writes, damaged files


def test_nonfinite_rows_are_counted_reported_and_never_stored(tmp_path):
    """Every append holding NaN / Inf (or fp16 overflow) rows warns with their count; they are never stored;
    the committed count survives an interruption and a resume; on_nonfinite="error" raises before anything of
    the chunk reaches the disk (pending rows stay pending)."""
    sched = Schedule(901, dtype="float16", per_token=True, shard_rows=2, breaks=0, nchunks=7)
    assert any(not torch.isfinite(x).all() for x, _ in sched.chunks)
    path = tmp_path / "ix"
    w = sched.create(path)
    last = len(sched.chunks) - 1
    j = 1 + max(i for i in range(last) if i % 2 == 0)  # the chunks committed when the writer is dropped
    for i, (x, c) in enumerate(sched.chunks):
        nbad = int((~(torch.isfinite(x).all(1) & torch.isfinite(x.to(torch.float16)).all(1))).sum())
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ids = w.append(x, num_tokens=c, commit=i % 2 == 0 and i < last)
        got = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
        assert (len(got) == 1 and got[0].startswith(f"grads: {nbad} of {x.shape[0]} rows hold NaN or Inf")) \
            if nbad else not got, (i, got)
        assert int((ids < 0).sum()) == nbad
    before = tree(path)
    x = torch.ones(3, D)
    x[1, 0] = math.inf
    with pytest.raises(NonFiniteGradientError, match=r"^grads: 1 of 3 rows hold NaN or Inf .*nothing of this chunk"):
        w.append(x, num_tokens=[3], on_nonfinite="error")
    assert tree(path) == before
    w = None  # interrupted: the chunks appended with commit=False since are lost
    ix = GradientIndex.open(path, allow_incomplete=True)
    assert _same(sched, j, _data(ix))
    finish(path, sched, j, reference(sched, tmp_path / "ref"))
    ix = GradientIndex.open(path)
    assert ix.nonfinite_rows == sched.prefix[-1][2] > 0


def test_nonfinite_rows_counts_pending_appends(tmp_path):
    # DEFECT: a writer's nonfinite_rows leaves out the rows refused by appends not committed yet, while len()
    # and num_examples count those appends' stored rows: after w.append(x, commit=False) with one NaN row, the
    # warning says the row was "refused (not stored) and counted in nonfinite_rows", len(w) has grown by the
    # stored rows, but w.nonfinite_rows is still 0 (index.py's append adds to _w_nonfinite only; the attribute
    # is set from the committed snapshot in _commit_snapshot). Reproduction:
    #   w = GradientIndex.create(p, {"a": 2}); x = torch.ones(3, 2); x[1, 0] = float("nan")
    #   w.append(x, commit=False); len(w) == 2, w.nonfinite_rows == 0   (1 once committed)
    # Correct: nonfinite_rows counts the writer's refused rows as len() counts its stored ones (and goes back
    # with them on a rollback).
    w = GradientIndex.create(tmp_path / "ix", {"a": 2})
    x = torch.ones(3, 2)
    x[1, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="counted in nonfinite_rows"):
        w.append(x, commit=False)
    assert len(w) == 2
    assert w.nonfinite_rows == 1


def test_short_writes_build_the_same_index(tmp_path, monkeypatch):
    """os.write may write fewer bytes than asked (here at most 3 per call): every byte still lands once."""
    sched = Schedule(902, dtype="bfloat16", per_token=True, shard_rows=3, breaks=1)
    ref = reference(sched, tmp_path / "ref")
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, memoryview(data).cast("B")[:3]))
    done, w = run_ops(tmp_path / "ix", sched, lambda s: None)
    monkeypatch.setattr(os, "write", real)
    assert done is None
    assert tree(tmp_path / "ix") == ref


def test_truncated_or_extended_files_are_refused(tmp_path):
    """A complete index with any file cut short (header, a shard, the token file; at 0, mid-row, at a row
    boundary) or a shard / token file longer than its header says is refused by open() with IndexFormatError
    (allow_incomplete too); an incomplete one whose committed rows were cut is refused, by resume too."""
    sched = Schedule(903, dtype="float32", per_token=True, shard_rows=3, breaks=0, nchunks=6)
    base = tmp_path / "base"
    ref = reference(sched, base)
    rb = D * 4
    rng = random.Random(3)
    for name, b in ref.items():
        sizes = {0, len(b) - 1, len(b) // 2, rng.randrange(len(b))} if len(b) else set()
        if name.startswith(gi.SHARD_DIR) and name.endswith(".bin") and "tokens" not in name:
            sizes |= {len(b) - rb}
        for size in sorted(x for x in sizes if 0 <= x < len(b)):
            path = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
            for n2, b2 in ref.items():
                (path / n2).parent.mkdir(parents=True, exist_ok=True)
                (path / n2).write_bytes(b2[:size] if n2 == name else b2)
            for kw in ({}, {"allow_incomplete": True}):
                with pytest.raises(IndexFormatError):
                    GradientIndex.open(path, **kw)
        if name != gi.HEADER and len(b):
            path = tmp_path / f"x{len(list(tmp_path.iterdir()))}"
            for n2, b2 in ref.items():
                (path / n2).parent.mkdir(parents=True, exist_ok=True)
                (path / n2).write_bytes(b2 + b"\0" * 8 if n2 == name else b2)
            with pytest.raises(IndexFormatError, match=r"has \d+ bytes, the header says"):
                GradientIndex.open(path)
    # an incomplete build whose committed rows were cut: refused, and resume does not make it valid
    path = tmp_path / "inc"
    w = sched.create(path)
    w.append(*sched.chunks[0])
    w.append(*sched.chunks[1])
    w = None
    shard = sorted((path / gi.SHARD_DIR).glob("r00000-*.bin"))[0]
    os.truncate(shard, shard.stat().st_size - 1)
    with pytest.raises(IndexFormatError, match="is truncated"):
        GradientIndex.open(path, allow_incomplete=True)
    with pytest.raises(IndexFormatError, match="shorter than its"):
        sched.create(path, resume=True)
    with pytest.raises(IndexFormatError):
        GradientIndex.open(path, allow_incomplete=True)


# =========================================================================== defects: create under disk full


def _fail_header_write(monkeypatch, eno=errno.ENOSPC):
    """os.write of the header's temporary file fails (disk full)."""
    real = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith(gi.HEADER + ".tmp"):
            raise OSError(eno, os.strerror(eno))
        return real(fd, data)
    monkeypatch.setattr(os, "write", write)
    return lambda: monkeypatch.setattr(os, "write", real)


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_create_disk_full_error_names_the_index(tmp_path, monkeypatch, resume):
    # DEFECT: create() (a new build, or resume=True, whose first step rewrites the header as incomplete) that
    # fails to write its header on a full disk raises the bare OSError of os.write, "[Errno 28] No space left on
    # device", naming neither the index nor what it left (the same with RLIMIT_FSIZE: "[Errno 27] File too
    # large"; test_disk_full_at_every_write_site and test_file_size_limit_efbig see it at every create-time
    # write site). append / commit / close wrap the same failure as "gradkit.index: ... <path> failed (...);
    # <state and how to go on>", as the module docstring promises for "a failed write (e.g. disk full)".
    # Reproduction: os.write raising ENOSPC for index.json.tmp, then GradientIndex.create(p, {"a": 2}).
    # Correct: an OSError with the errno kept whose message names the index directory and the state it was
    # left in (nothing created / the index as it was).
    path = tmp_path / "ix"
    if resume:
        with GradientIndex.create(path, {"a": 2}) as w:
            w.append(torch.ones(2, 2))
    restore = _fail_header_write(monkeypatch)
    with pytest.raises(OSError) as e:
        GradientIndex.create(path, {"a": 2}, resume=resume)
    restore()
    assert e.value.errno == errno.ENOSPC
    # what is left is fine: nothing (new), or the complete index as it was (resume)
    if resume:
        assert len(GradientIndex.open(path)) == 2
    else:
        with pytest.raises(IndexFormatError, match="holds no committed index header"):
            GradientIndex.open(path, allow_incomplete=True)
    assert str(path) in str(e.value), f"the error does not name the index: {e.value}"


def test_create_that_fails_leaves_no_index_behind(tmp_path, monkeypatch):
    # DEFECT: create() of a new per-token index writes its first header (0 rows, incomplete) and only then makes
    # the token count file; when that fails (ENOSPC: no inode left), create() raises the bare OSError of os.open
    # but leaves the header behind, so the caller, who never got a writer, finds an index there: retrying the
    # same create() once space is freed raises FileExistsError "already holds a gradkit index; pass resume=True
    # ...". The module docstring says a failed write rolls the files back to the last commit (for create:
    # nothing). Reproduction: os.open raising ENOSPC for shards/r00000.tokens.bin, then
    # GradientIndex.create(p, {"a": 2}, per_token=True); then the same create() again.
    # Correct: create() that raises leaves no header (make the token file before the header, or remove the
    # header it wrote), so that the retry succeeds.
    path = tmp_path / "ix"
    real = os.open

    def fake_open(p, flags, *a, **k):
        if str(p).endswith(".tokens.bin") and not os.path.exists(p):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
        return real(p, flags, *a, **k)
    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(OSError) as e:
        GradientIndex.create(path, {"a": 2}, per_token=True)
    monkeypatch.setattr(os, "open", real)
    assert e.value.errno == errno.ENOSPC
    assert not (path / gi.HEADER).exists(), (
        f"create() raised ({e.value}) but left an index header behind: {(path / gi.HEADER).read_text()[:120]}...")
    with GradientIndex.create(path, {"a": 2}, per_token=True) as w:  # the retry, space freed
        w.append(torch.ones(3, 2), num_tokens=[1, 2])
    assert GradientIndex.open(path).offsets.tolist() == [0, 1, 3]

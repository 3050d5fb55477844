"""Audit of gradkit's own index build path (create / append / commit / close / resume) and of
open()'s header validation. Each test names the bug it pins down; all of them failed before the fix
that came with them, except test_sigkill_mid_append_never_opens_and_resumes (a crash-safety check
that found no bug and stays as a regression test)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import gradkit.index as gi
from gradkit.index import DistributedBuildError, GradientIndex, IndexFormatError

pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")

MODS = {"h.0.mlp": 4, "h.0.attn": 3}
D = sum(MODS.values())


def grads(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (n, D), generator=g).float()


def tree(path):
    """Every file under path (names and bytes)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- resume


def test_resume_refuses_a_different_shard_rows(tmp_path):
    """resume=True with another shard_rows than the build started with was accepted: the shards already
    written kept the old size, new ones the new one, and the header then recorded only the new value."""
    path = tmp_path / "ix"
    x = grads(10, 1)
    with GradientIndex.create(path, MODS, shard_rows=4) as w:
        w.append(x[:6])
    before = tree(path)
    for other in (3, None, 8):
        with pytest.raises(ValueError, match=rf"^resume: the index at {re.escape(str(path))} was built with different "
                                             rf"settings: shard_rows 4 != {other}$"):
            GradientIndex.create(path, MODS, shard_rows=other, resume=True)
    assert tree(path) == before  # nothing changed: still complete, same files
    assert len(GradientIndex.open(path)) == 6
    with GradientIndex.create(path, MODS, shard_rows=4, resume=True) as w:  # the same value still resumes
        w.append(x[6:])
    ix = GradientIndex.open(path)
    assert torch.equal(ix.get(range(10)), x)
    assert sorted(p.name for p in (path / "shards").iterdir()) == [f"r00000-{i:06d}.bin" for i in range(3)]


# --------------------------------------------------------------------------- chunks of 0 rows


def test_empty_chunks_are_accepted(tmp_path):
    """A per-token chunk of 0 rows with num_tokens=[] raised TypeError (an empty list is a float array), and a
    dict chunk of 0 rows whose tensors have more than 2 dims raised torch's reshape error."""
    path = tmp_path / "ix"
    x = grads(5, 2)
    with GradientIndex.create(path, MODS, per_token=True, shard_rows=1) as w:
        assert w.append(torch.zeros(0, D), num_tokens=[]).tolist() == []
        assert w.append(torch.zeros(0, D), num_tokens=torch.tensor([])).tolist() == []
        assert w.append(torch.zeros(0, D), num_tokens=np.zeros(0)).tolist() == []
        assert w.append(x[:2], num_tokens=[2]).tolist() == [0, 1]
        empty = {"h.0.mlp": torch.zeros(0, 2, 2), "h.0.attn": torch.zeros(0, 3)}
        assert w.append(empty, num_tokens=[0]).tolist() == []
        assert w.append(x[2:], num_tokens=[1, 2]).tolist() == [2, 3, 4]
        assert len(w) == 5 and w.num_examples == 4
    ix = GradientIndex.open(path)
    assert ix.offsets.tolist() == [0, 2, 2, 3, 5] and torch.equal(ix.get(range(5)), x)
    with GradientIndex.create(tmp_path / "plain", MODS, shard_rows=1) as w:
        assert w.append({"h.0.mlp": torch.zeros(0, 4, 1), "h.0.attn": torch.zeros(0, 3)}).tolist() == []
        w.append(x[:1])
    assert len(GradientIndex.open(tmp_path / "plain")) == 1
    # a fractional count is still refused, empty or not
    with GradientIndex.create(tmp_path / "bad", MODS, per_token=True) as w:
        with pytest.raises(TypeError, match=r"^num_tokens: expected a 1-D sequence of ints$"):
            w.append(x[:2], num_tokens=[2.0])


# --------------------------------------------------------------------------- interrupted writes


def test_interrupt_between_rows_and_token_counts_rolls_back(tmp_path, monkeypatch):
    """A non-OSError (KeyboardInterrupt) raised after an append had written its rows but before its token
    counts left the writer counting the rows without their counts: close() then wrote a complete header that
    open() refused ("token counts ... sum to 3 but it holds 7 rows")."""
    path = tmp_path / "ix"
    x = grads(7, 3)
    w = GradientIndex.create(path, MODS, per_token=True)
    w.append(x[:3], num_tokens=[1, 2])
    real, calls = gi._write_all, []

    def interrupted(fd, data):
        calls.append(fd)
        if len(calls) == 2:  # the rows went through; the token counts do not
            raise KeyboardInterrupt
        real(fd, data)

    monkeypatch.setattr(gi, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.append(x[3:], num_tokens=[4])
    monkeypatch.setattr(gi, "_write_all", real)
    assert len(calls) == 2 and len(w) == 3 and w.num_examples == 2  # back at the last commit
    w.append(x[3:], num_tokens=[4])
    w.close()
    ix = GradientIndex.open(path)
    assert ix.offsets.tolist() == [0, 1, 3, 7] and torch.equal(ix.get(range(7)), x)


def test_interrupt_after_the_header_was_replaced_keeps_those_rows_committed(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside commit after os.replace had published the header (in the directory fsync)
    left the writer's snapshot at the previous commit: a later failed write rolled back to it and truncated
    rows the header on disk lists, so the index no longer opened (shard shorter than its header says)."""
    path = tmp_path / "ix"
    x = grads(9, 5)
    w = GradientIndex.create(path, MODS, dtype=torch.float32, shard_rows=4)
    w.append(x[:2])
    real = gi._fsync_dir

    def interrupted(p):
        if Path(p) == path:  # the header's directory fsync: after the replace
            raise KeyboardInterrupt
        real(p)

    monkeypatch.setattr(gi, "_fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.append(x[2:6])
    monkeypatch.setattr(gi, "_fsync_dir", real)
    assert json.loads((path / gi.HEADER).read_text())["count"] == 6  # published
    real_write = gi._write_all

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gi, "_write_all", full)
    with pytest.raises(OSError, match="No space left"):
        w.append(x[6:])
    monkeypatch.setattr(gi, "_write_all", real_write)
    assert len(w) == 6
    w.append(x[6:])
    w.close()
    assert torch.equal(GradientIndex.open(path).get(range(9)), x)


def test_a_dropped_writer_closes_its_descriptors(tmp_path):
    """A writer garbage-collected without close() released its lock but kept its shard files open."""
    import gc

    path = tmp_path / "ix"
    w = GradientIndex.create(path, MODS, dtype=torch.float32, shard_rows=4, per_token=True)
    w.append(grads(6, 1), num_tokens=[2, 4])

    def open_here():
        fds = Path("/proc/self/fd")
        out = []
        for f in fds.iterdir():
            try:
                t = os.readlink(f)
            except OSError:
                continue
            if t.startswith(str(path)):
                out.append(t)
        return out

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc")
    assert open_here()  # the writer holds its shard / token files open
    del w
    gc.collect()
    assert open_here() == []
    w = GradientIndex.create(path, MODS, dtype=torch.float32, shard_rows=4, per_token=True, resume=True)
    assert len(w) == 6
    w.close()


def test_complete_index_with_a_longer_token_file_is_refused(tmp_path):
    """A complete index whose token count file holds more than its header says opened (its shards are
    refused in the same case): the extra counts are an unexplained difference, like extra shard bytes."""
    path = tmp_path / "ix"
    with GradientIndex.create(path, MODS, dtype=torch.float32, per_token=True) as w:
        w.append(grads(5, 2), num_tokens=[2, 3])
    tf = next((path / "shards").glob("*.tokens.bin"))
    with open(tf, "ab") as f:
        f.write(np.array([4], dtype="<i8").tobytes())
    with pytest.raises(IndexFormatError, match="token count file .* has 24 bytes, the header says 2 examples"):
        GradientIndex.open(path)


def test_commit_makes_new_shard_names_durable_before_the_header(tmp_path, monkeypatch):
    """commit fsynced the shard data and the index directory (after the header's replace) but never shards/:
    after a power loss the header could name a shard file whose directory entry was lost, and the index
    (resume included) was refused for a missing shard."""
    path = tmp_path / "ix"
    w = GradientIndex.create(path, MODS, shard_rows=2, per_token=True)
    events = []
    real_fsync_dir, real_replace = gi._fsync_dir, os.replace

    def fsync_dir(p):
        events.append(("fsync_dir", Path(p)))
        real_fsync_dir(p)

    def replace(a, b):
        events.append(("replace", Path(b)))
        real_replace(a, b)

    monkeypatch.setattr(gi, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "replace", replace)
    w.append(grads(3, 4), num_tokens=[3])  # creates two shard files (and commits the tokens file)
    hdr = events.index(("replace", path / "index.json"))
    assert ("fsync_dir", path / "shards") in events[:hdr], events
    events.clear()
    w.append(grads(1, 5), num_tokens=[1])  # fills the second shard: no new name, no directory fsync needed
    assert ("replace", path / "index.json") in events
    events.clear()
    w.append(grads(1, 6), num_tokens=[1])  # a third shard file
    hdr = events.index(("replace", path / "index.json"))
    assert ("fsync_dir", path / "shards") in events[:hdr], events
    w.close()


def test_close_that_cannot_mark_complete_names_the_index(tmp_path, monkeypatch):
    """close() whose final header write failed (disk full) raised the bare OSError ("[Errno 28] No space left on
    device"), naming neither the index nor what it was left holding."""
    path = tmp_path / "ix"
    x = grads(5, 7)
    w = GradientIndex.create(path, MODS)
    w.append(x)
    real = gi._atomic_write_json

    def full(p, obj):
        if obj.get("complete"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(p, obj)

    monkeypatch.setattr(gi, "_atomic_write_json", full)
    with pytest.raises(OSError) as e:
        w.close()
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (f"[Errno {errno.ENOSPC}] gradkit.index: marking {path} complete failed (No space left on "
                            "device); its 5 committed rows are kept but the index is not marked complete (free space, "
                            "then close() this writer again; or drop this writer, which releases its lock, then "
                            "create(..., resume=True) and close())")
    with pytest.raises(IndexFormatError, match=r"did not complete \(5 rows committed"):
        GradientIndex.open(path)
    monkeypatch.setattr(gi, "_atomic_write_json", real)
    w.close()
    assert torch.equal(GradientIndex.open(path).get(range(5)), x)


# --------------------------------------------------------------------------- header validation


def _build_and_tamper(path, change, per_token=False):
    with GradientIndex.create(path, MODS, shard_rows=2, per_token=per_token) as w:
        w.append(grads(5, 8), **({"num_tokens": [2, 3]} if per_token else {}))
    h = json.loads((path / "index.json").read_text())
    change(h)
    (path / "index.json").write_text(json.dumps(h))


def _rename_shard(path, old, new):
    os.rename(path / "shards" / old, path / "shards" / new)


@pytest.mark.parametrize("change, msg", [
    (lambda h: h.update(complete="false"), r"field complete must be a bool, got 'false'"),
    (lambda h: h.update(complete=1), r"field complete must be a bool, got 1"),
    (lambda h: h.update(dim=99), r"field dim is 99 but the modules add up to 7"),
    (lambda h: h.update(examples=4), r"field examples is 4 but the index holds 5 examples"),
    (lambda h: h.update(byteorder="big"), r"field byteorder must be 'little', got 'big'"),
    (lambda h: h.update(world_size=0), r"field world_size must be an int >= 1, got 0"),
    (lambda h: h["shards"][1].update(rank=1), r"lists shard file 'r00000-000001\.bin' with rank 1 \(its name says "
                                              r"rank 0\)"),
    (lambda h: h["shards"].reverse(), r"lists the shards of rank 0 out of order: 'r00000-000002\.bin' where "
                                      r"'r00000-000000\.bin' belongs"),
], ids=["complete-str", "complete-int", "dim", "examples", "byteorder", "world_size", "rank-field", "order"])
def test_inconsistent_header_is_refused(tmp_path, change, msg):
    """Headers that contradict themselves opened: "complete": "false" (a string) opened as a complete index, a
    wrong dim / examples / byteorder / world_size was ignored, and shards listed under another rank or out of
    order were read in that order (a resume of such a header reused a committed shard's name for a new shard
    and truncated it)."""
    path = tmp_path / "ix"
    _build_and_tamper(path, change)
    with pytest.raises(IndexFormatError, match=rf"^open: {re.escape(str(path / 'index.json'))} {msg}$"):
        GradientIndex.open(path)


def test_resume_of_a_header_with_a_gap_in_its_shards_changes_nothing(tmp_path):
    """A header whose shards of one rank skip a number (r00000-000000, r00000-000002): resume started the next
    shard as r00000-000002 again, truncating that committed shard (ftruncate to 0) and listing it twice."""
    path = tmp_path / "ix"

    def gap(h):
        h["shards"] = [h["shards"][0], dict(h["shards"][2], file="shards/r00000-000002.bin")]
        h["count"] = h["examples"] = 3
    _build_and_tamper(path, gap)
    (path / "shards" / "r00000-000001.bin").unlink()
    before = tree(path)
    with pytest.raises(IndexFormatError, match=rf"^resume: {re.escape(str(path / 'index.json'))} lists the shards "
                                               r"of rank 0 out of order: 'r00000-000002\.bin' where "
                                               r"'r00000-000001\.bin' belongs$"):
        GradientIndex.create(path, MODS, shard_rows=2, resume=True)
    assert tree(path) == before


# --------------------------------------------------------------------------- crash (SIGKILL)


def test_sigkill_mid_append_never_opens_and_resumes(tmp_path):
    """A writer killed with SIGKILL while it appends and commits in a loop leaves an index that open() refuses;
    resume=True continues after its last committed row, every committed row intact."""
    root = Path(__file__).resolve().parents[1] / "python"
    path = tmp_path / "ix"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(root)!r})
        from gradkit.index import GradientIndex
        x = torch.arange(100000 * {D}, dtype=torch.float32).reshape(-1, {D}) % 1000
        ix = GradientIndex.create({str(path)!r}, {MODS!r}, shard_rows=5, dtype=torch.float32)
        i = 0
        while True:
            ix.append(x[i:i + 3], commit=(i % 2 == 0))
            i = (i + 3) % 99000
            if i == 30:
                print("go", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "go"
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    assert p.returncode == -signal.SIGKILL
    with pytest.raises(IndexFormatError, match=r"^open: the build of \S+ did not complete \(\d+ rows committed"):
        GradientIndex.open(path)
    part = GradientIndex.open(path, allow_incomplete=True)
    n = len(part)
    x = torch.arange(100000 * D, dtype=torch.float32).reshape(-1, D) % 1000
    assert n >= 27 and torch.equal(part.get(range(n)), x[:n])  # rows 0-26 were committed before "go"
    with GradientIndex.create(path, MODS, shard_rows=5, dtype=torch.float32, resume=True) as w:
        assert len(w) == n
        w.append(x[n:n + 7])
    ix = GradientIndex.open(path)
    assert len(ix) == n + 7 and torch.equal(ix.get(range(n + 7)), x[:n + 7])
    names = sorted(f.name for f in (path / "shards").iterdir())
    assert names == [f"r00000-{i:06d}.bin" for i in range((n + 7 + 4) // 5)]


# --------------------------------------------------------------------------- distributed create


GLOO_TIMEOUT = timedelta(seconds=20)
DEADLINE_S = 90
PROMPT_S = 10


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=GLOO_TIMEOUT)


def _outcome(e):
    if e is None:
        return None
    return {"type": type(e).__name__, "msg": str(e), "notes": list(getattr(e, "__notes__", []))}


def _rank_main(rank, world, init_file, root, name, body):
    """One spawned rank: body(rank, root, out) records into out; then an all_reduce checks the group is still in
    step (out["group"]); out is written to <root>/<name>-rank<r>.json whatever happened."""
    _init(rank, world, init_file)
    out = {}
    try:
        body(rank, root, out)
        t = torch.ones(1)
        dist.all_reduce(t)
        out["group"] = int(t)
    finally:
        with open(f"{root}/{name}-rank{rank}.json", "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()


def _run_two_ranks(body, name, tmp_path):
    """body on 2 spawned gloo ranks (_rank_main); fails the test if they hang; returns their two records."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), name, body), nprocs=2, join=False)
    end = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > end:
                pytest.fail(f"the workers did not finish within {DEADLINE_S} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]


def _create_body(rank, root, out):
    """On 2 ranks: (a) rank 1 passes a bad argument; (b) rank 1 passes another dtype than rank 0;
    (c) rank 1 passes distributed="yes"; then (d) a good build, to check the ranks are still in step."""
    for tag, kw in (("bad_arg", {"shard_rows": 0} if rank == 1 else {}),
                    ("dtype", {"dtype": torch.float16} if rank == 1 else {}),
                    ("dist_arg", {"distributed": "yes"} if rank == 1 else {})):
        kw = {"dtype": torch.float32, "shard_rows": 2, **kw}
        err, t0 = None, time.monotonic()
        try:
            w = GradientIndex.create(f"{root}/{tag}", MODS, **kw)
        except Exception as e:  # noqa: BLE001 - recorded for the parent
            err = e
        else:
            w._abort()
        out[tag] = {"err": _outcome(err), "s": time.monotonic() - t0}
    with GradientIndex.create(f"{root}/good", MODS, dtype=torch.float32, shard_rows=2) as w:
        w.append(grads(3 + rank, rank))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_distributed_create_fails_promptly_on_every_rank(tmp_path):
    """A bad argument on one rank only (it raised before create's first collective) left the other ranks in
    that collective until the gloo timeout; ranks passing different settings (e.g. dtype) built one index of
    mixed rows; an invalid distributed= was taken for False. Now every rank raises at once, before anything
    is written: the failing rank its own error, the others DistributedBuildError; settings that differ raise
    ValueError naming them on every rank."""
    out = _run_two_ranks(_create_body, "create", tmp_path)
    note = (r"^GradientIndex\.create: rank\(s\) \[1\] of 2 refused their arguments \(see those ranks' errors\); "
            r"nothing was written to \S+{}$")
    # (a) rank 1's own error, with a note; rank 0: DistributedBuildError with the same text
    own, other = out[1]["bad_arg"]["err"], out[0]["bad_arg"]["err"]
    assert own["type"] == "ValueError" and own["msg"] == "shard_rows: must be >= 1, got 0"
    assert len(own["notes"]) == 1 and re.match(note.format("bad_arg"), own["notes"][0])
    assert other["type"] == DistributedBuildError.__name__ and re.match(note.format("bad_arg"), other["msg"])
    # (b) every rank: ValueError naming dtype
    for r in (0, 1):
        e = out[r]["dtype"]["err"]
        assert e["type"] == "ValueError" and re.match(
            r"^dtype: differs between the ranks of the distributed build \(ranks \[0\] and \[1\] passed different "
            rf"values; this rank, {r}, passed {'float16' if r else 'float32'}\); every rank must pass the same "
            r"modules, dtype, projection, per_token, shard_rows, resume and overwrite; nothing was written to "
            r"\S+dtype$",
            e["msg"]), e
    # (c) rank 1's distributed="yes" refused
    own, other = out[1]["dist_arg"]["err"], out[0]["dist_arg"]["err"]
    assert own["type"] == "TypeError" and own["msg"] == "distributed: expected a bool or None, got str"
    assert other["type"] == "DistributedBuildError" and re.match(note.format("dist_arg"), other["msg"])
    for r in (0, 1):
        for tag in ("bad_arg", "dtype", "dist_arg"):
            assert out[r][tag]["s"] < PROMPT_S, (r, tag, out[r][tag])
            assert not (tmp_path / tag).exists()  # refused before anything was written
        assert out[r]["group"] == 2
    ix = GradientIndex.open(tmp_path / "good")
    assert torch.equal(ix.get(range(7)), torch.cat([grads(3, 0), grads(4, 1)]))


# --------------------------------------------------------------------------- session 32 audit


def test_an_error_in_a_resumed_build_that_added_nothing_leaves_the_index_complete(tmp_path):
    """create(resume=True) marks the header incomplete at once; an error before anything new was committed (a
    refused append, an exception in the with-block) left a complete index unopenable. Now it is complete again;
    one that committed new rows stays incomplete (resume continues it)."""
    path = tmp_path / "ix"
    with GradientIndex.create(path, MODS) as w:
        w.append(grads(6, 1))
    before = tree(path)
    with pytest.raises(ValueError, match=r"^grads: expected shape"):
        with GradientIndex.create(path, MODS, resume=True) as w:
            w.append(torch.zeros(2, D + 1))
    assert tree(path) == before and len(GradientIndex.open(path)) == 6
    with pytest.raises(KeyError):
        with GradientIndex.create(path, MODS, resume=True) as w:
            w.append(grads(2, 2), commit=False)  # pending rows only: rolled back
            raise KeyError("user code")
    assert tree(path) == before
    with pytest.raises(KeyError):
        with GradientIndex.create(path, MODS, resume=True) as w:
            w.append(grads(2, 3))  # committed: the build has changed the index
            raise KeyError("user code")
    with pytest.raises(IndexFormatError, match="did not complete|not complete|incomplete"):
        GradientIndex.open(path)
    assert len(GradientIndex.open(path, allow_incomplete=True)) == 8


def test_per_example_queries_search_a_per_token_index(tmp_path):
    """A collector's projection_config records per_token and the normalisers, and search compared whole configs:
    per-example queries (the sum of their tokens' vectors, the same matrices) were refused on a per-token index
    and back, and plain query gradients on an Adam-normalised index (LESS's setting)."""
    from gradkit.projection import GradientCollector

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 7, 6)
    tok = GradientCollector(model, p=2, seed=3, per_token=True)
    with tok:
        tok.backward(model(x).sum())
        rows = tok.collect(flat=True)  # (4, 7, D)
    ex = GradientCollector(model, p=2, seed=3)
    with ex:
        ex.backward(model(x).sum())
        q = ex.collect(flat=True)
    torch.testing.assert_close(q, rows.sum(1), rtol=1e-5, atol=1e-5)
    with GradientIndex.create(tmp_path / "t", tok.module_dims, dtype=torch.float32, projection=tok,
                              per_token=True) as w:
        w.append(rows.reshape(28, -1), num_tokens=[7] * 4)
    with GradientIndex.create(tmp_path / "e", ex.module_dims, dtype=torch.float32, projection=ex) as w:
        w.append(q)
    flat = rows.reshape(28, -1)
    s, i = GradientIndex.open(tmp_path / "t").search(q, 3, projection=ex)
    assert torch.equal(i, (q @ flat.T).topk(3).indices)
    GradientIndex.open(tmp_path / "e").search(flat[:2], 2, projection=tok)
    other = GradientCollector(model, p=2, seed=4)
    with pytest.raises(ValueError, match=r"^projection: the queries were projected with .*'seed': 4"):
        GradientIndex.open(tmp_path / "t").search(q, 3, projection=other)
    # normalisers rescale the gradients, not the projection: LESS-style Adam-normalised index, plain queries
    from gradkit.projection import AdamNormalizer

    adam = GradientCollector(model, p=2, seed=3, normalizers={"0": AdamNormalizer(torch.rand(5, 6) + 0.1)})
    with GradientIndex.create(tmp_path / "n", adam.module_dims, dtype=torch.float32, projection=adam) as w:
        w.append(q)
    GradientIndex.open(tmp_path / "n").search(q, 2, projection=ex)
    GradientIndex.open(tmp_path / "e").search(q, 2, projection=adam)


def test_search_takes_numpy_and_tensor_weights_and_any_iterable_of_modules(tmp_path):
    """weights={"m": np.float32(2)} (or a 0-d tensor) was refused as "not a finite number", and modules=ix.modules
    .keys() as "not a list/set"; a finite float64 query beyond float32's range was reported as NaN / Inf."""
    path = tmp_path / "ix"
    x = grads(12, 4)
    with GradientIndex.create(path, MODS, dtype=torch.float32) as w:
        w.append(x)
    ix = GradientIndex.open(path)
    q = grads(3, 5)
    want = ix.search(q, 4, weights={"h.0.mlp": 2.0})
    for wv in (np.float32(2.0), np.int64(2), torch.tensor(2.0), torch.tensor([2.0])):
        got = ix.search(q, 4, weights={"h.0.mlp": wv})
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), wv
    for bad in (np.bool_(True), torch.tensor(True), torch.tensor(float("nan")), "2", torch.ones(2)):
        with pytest.raises(ValueError, match=r"^weights\['h\.0\.mlp'\]: expected a finite number"):
            ix.search(q, 4, weights={"h.0.mlp": bad})
    a = ix.search(q, 4, modules=["h.0.attn"])
    for mods in ((m for m in ["h.0.attn"]), {"h.0.attn"}, ("h.0.attn",)):
        assert torch.equal(ix.search(q, 4, modules=mods)[1], a[1])
    assert torch.equal(ix.search(q, 4, modules=ix.modules.keys())[1], ix.search(q, 4)[1])
    for bad in ("h.0.attn", 3, {"h.0.attn": 1.0}):
        with pytest.raises(TypeError, match=r"^modules: expected a list/set of module names or None"):
            ix.search(q, 4, modules=bad)
    big = torch.zeros(2, D, dtype=torch.float64)
    big[1, 0] = 1e39
    with pytest.raises(ValueError, match=r"^queries: rows \[1\] are finite but overflow float32"):
        ix.search(big, 2)
    big[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^queries: rows \[1\] hold NaN or Inf$"):
        ix.search(big, 2)


def _raise_in_block_body(rank, root, out):
    """Rank 1 raises inside its with-block after appending; rank 0 closes normally."""
    t0 = time.monotonic()
    err = None
    try:
        with GradientIndex.create(f"{root}/ix", MODS, dtype=torch.float32) as w:
            w.append(grads(3 + rank, rank))
            if rank == 1:
                raise RuntimeError("user code failed on rank 1")
    except Exception as e:  # noqa: BLE001 - recorded for the parent
        err = e
    out.update({"err": _outcome(err), "s": time.monotonic() - t0})


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_an_error_in_one_ranks_with_block_fails_every_rank_promptly(tmp_path):
    """A rank whose with-block raised only aborted locally: the other ranks waited in close()'s collective until
    the process group timed out. Now it joins that collective as a failed rank: it re-raises its own error, the
    others raise DistributedBuildError naming it, at once; the committed rows stay (resume continues)."""
    out = _run_two_ranks(_raise_in_block_body, "raise", tmp_path)
    own, other = out[1]["err"], out[0]["err"]
    assert own["type"] == "RuntimeError" and own["msg"] == "user code failed on rank 1"
    assert other["type"] == "DistributedBuildError" and other["msg"].startswith(
        "GradientIndex.close: rank(s) [1] of 2 failed to commit their rows of ") and "(rank(s) [1] raised an error in "\
        "their with-block before close())" in other["msg"], other
    for r in (0, 1):
        assert out[r]["s"] < PROMPT_S, out[r]
        assert out[r]["group"] == 2
    with pytest.raises(IndexFormatError):
        GradientIndex.open(tmp_path / "ix")
    got = GradientIndex.open(tmp_path / "ix", allow_incomplete=True)  # every rank's committed rows
    assert torch.equal(got.get(range(len(got))), torch.cat([grads(3, 0), grads(4, 1)]))

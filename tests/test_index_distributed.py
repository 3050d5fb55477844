"""A gradkit index built across 2 torch.distributed (gloo, CPU) processes: every rank writes its
own shard files, rank 0 writes the final header after all_gather of the counts; the result opens
as one index holding rank 0's rows then rank 1's. Also a distributed per-token build, and a
build whose ranks stop before close (no complete index). One spawn runs all three builds.

Failures on one rank (a commit in close() failing with ENOSPC on rank 1; a damaged shard of
rank 1 on resume) must make every rank raise, promptly, instead of leaving the other ranks in a
collective until the process group times out; and an interrupted 2-rank build resumed by 2 new
ranks must equal a single-process build of the same rows. Every spawn runs under a hard deadline:
past it the workers are terminated and the test fails (the gloo timeout is shorter, so a
collective left waiting errors out inside the workers first)."""
import errno
import json
import os
import re
import shutil
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradkit.index import DistributedBuildError, GradientIndex, IndexFormatError

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

MODS = {"a": 4, "b": 3}
D = 7
PROJ = {"seed": 3}
DEADLINE_S = 120                      # per spawn, in the parent
GLOO_TIMEOUT = timedelta(seconds=60)  # per collective, in the workers
PROMPT_S = 30                         # a failure must be reported well before the gloo timeout
N = (10, 7)                           # resume test: rows of rank 0, rank 1
C = (6, 3)                            # ... of which committed before the interruption


def rows(rank, n):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(100 + rank))


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=GLOO_TIMEOUT)


def _spawn(worker, root, tag, world=2):
    """worker(rank, world, init_file, root) on ``world`` processes; past DEADLINE_S they are
    terminated and the test fails. A worker that raises fails the test with its traceback."""
    ctx = mp.spawn(worker, args=(world, str(root / f"init-{tag}"), str(root)), nprocs=world, join=False)
    end = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > end:
                pytest.fail(f"{tag}: the {world} workers did not finish within {DEADLINE_S} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()


def _outcome(e):
    """What a worker saw raised (None: nothing), as JSON for the parent."""
    if e is None:
        return None
    return {"type": type(e).__name__, "msg": str(e), "errno": getattr(e, "errno", None),
            "notes": list(getattr(e, "__notes__", [])),
            "cause": type(e.__cause__).__name__ if e.__cause__ is not None else None}


def _group_check():
    """One more collective after the scenario: it completes (sum 2) only if every rank made the
    same collective calls before it."""
    t = torch.ones(1)
    dist.all_reduce(t)
    return int(t)


def _record(root, tag, rank, out):
    with open(f"{root}/{tag}-rank{rank}.json", "w") as f:
        json.dump(out, f)


def _load(root, tag, world=2):
    out = []
    for r in range(world):
        with open(root / f"{tag}-rank{r}.json") as f:
            out.append(json.load(f))
    return out


# --------------------------------------------------------------------------- successful builds


def _worker(rank, world, init_file, root):
    _init(rank, world, init_file)
    try:
        out = {}
        with GradientIndex.create(f"{root}/plain", MODS, dtype=torch.float32, projection=PROJ,
                                  shard_rows=4) as ix:
            x = rows(rank, 10 + rank)
            got = ix.append(x[:6]).tolist() + ix.append(x[6:]).tolist()
        out["plain"] = {"rows": got, "row_offset": ix.row_offset, "example_offset": ix.example_offset}
        with GradientIndex.create(f"{root}/tokens", MODS, dtype=torch.float32, per_token=True) as ix:
            counts = [2, 3] if rank == 0 else [1, 0, 4]
            got = ix.append(rows(rank, sum(counts)), num_tokens=counts).tolist()
        out["tokens"] = {"rows": got, "row_offset": ix.row_offset, "example_offset": ix.example_offset}
        _record(root, "builds", rank, out)
        ix = GradientIndex.create(f"{root}/fail", MODS, dtype=torch.float32)
        ix.append(rows(rank, 3))
        # the ranks stop here without close(): nobody writes the final header
    finally:
        dist.destroy_process_group()


def test_two_rank_builds(tmp_path):
    _spawn(_worker, tmp_path, "builds")

    ix = GradientIndex.open(tmp_path / "plain")
    assert len(ix) == 21 and ix.projection == PROJ
    want = torch.cat([rows(0, 10), rows(1, 11)])
    assert torch.equal(ix.get(range(21)), want)
    names = sorted(p.name for p in (tmp_path / "plain" / "shards").iterdir() if p.suffix == ".bin")
    assert names == [f"r0000{r}-{i:06d}.bin" for r in (0, 1) for i in range(3)]
    s, i = ix.search(want[[3, 15]], 1, unit_norm=True, projection=PROJ)
    assert i[:, 0].tolist() == [3, 15]  # an example retrieves itself, across the rank boundary

    ix = GradientIndex.open(tmp_path / "tokens")
    assert ix.offsets.tolist() == [0, 2, 5, 6, 6, 10] and len(ix) == 10 and ix.num_examples == 5
    assert torch.equal(ix.get(range(10)), torch.cat([rows(0, 5), rows(1, 5)]))

    with pytest.raises(IndexFormatError, match="did not complete"):
        GradientIndex.open(tmp_path / "fail")

    # append's row numbers are the rank's own; row_offset / example_offset place them in the index
    out = _load(tmp_path, "builds")
    assert [o["plain"]["row_offset"] for o in out] == [0, 10]
    assert [o["plain"]["example_offset"] for o in out] == [0, 10]
    assert [o["tokens"]["row_offset"] for o in out] == [0, 5]
    assert [o["tokens"]["example_offset"] for o in out] == [0, 2]
    ix = GradientIndex.open(tmp_path / "plain")
    for r, o in enumerate(out):
        assert o["plain"]["rows"] == list(range(10 + r))
        glob = [n + o["plain"]["row_offset"] for n in o["plain"]["rows"]]
        assert torch.equal(ix.get(glob), rows(r, 10 + r))
    ix = GradientIndex.open(tmp_path / "tokens")
    assert torch.equal(ix.get([n + out[1]["tokens"]["row_offset"] for n in out[1]["tokens"]["rows"]]), rows(1, 5))
    assert ix.example_of(out[1]["tokens"]["row_offset"]) == out[1]["tokens"]["example_offset"]


# --------------------------------------------------------------------------- failures and resume


def _enospc_on_fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _phase1_worker(rank, world, init_file, root):
    """(a) close() whose commit fails with ENOSPC on rank 1 only; (b) and (c) builds interrupted
    before close() (committed rows, then rows never committed), resumed by phase 2."""
    _init(rank, world, init_file)
    try:
        out = {}
        ix = GradientIndex.create(f"{root}/enospc", MODS, dtype=torch.float32, projection=PROJ, shard_rows=4)
        x = rows(rank, 9)
        ix.append(x[:5])                # committed
        ix.append(x[5:], commit=False)  # pending: close() commits it (and fails to on rank 1)
        real_fsync = os.fsync
        if rank == 1:
            os.fsync = _enospc_on_fsync
        err, t0 = None, time.monotonic()
        try:
            ix.close()
        except Exception as e:  # noqa: BLE001 - recorded for the parent
            err = e
        finally:
            os.fsync = real_fsync
        out.update(close=_outcome(err), close_s=time.monotonic() - t0, writable=ix._writable)
        try:
            ix.search(x[:1], 1, projection=PROJ)
        except RuntimeError as e:
            out["search_after"] = str(e)

        ix = GradientIndex.create(f"{root}/resume", MODS, dtype=torch.float32, projection=PROJ, shard_rows=4)
        x = rows(rank, N[rank])
        ix.append(x[:2])
        ix.append(x[2:C[rank]])
        ix.append(torch.full((3, D), 7.0), commit=False)  # written past the committed end, never committed
        # interrupted: no close(); the writer is simply dropped

        ix = GradientIndex.create(f"{root}/broken", MODS, dtype=torch.float32)
        ix.append(rows(rank, 5))  # interrupted too; the parent then damages rank 1's shard

        out["group"] = _group_check()
        _record(root, "phase1", rank, out)
    finally:
        dist.destroy_process_group()


def _phase2_worker(rank, world, init_file, root):
    """2 new ranks: resume (b) and (a) and finish them; resume (c), whose rank-1 shard is damaged."""
    _init(rank, world, init_file)
    try:
        out = {}
        ix = GradientIndex.create(f"{root}/resume", MODS, dtype=torch.float32, projection=PROJ, shard_rows=4,
                                  resume=True)
        out["resume_rows"] = len(ix)
        ix.append(rows(rank, N[rank])[C[rank]:])
        ix.close()

        ix = GradientIndex.create(f"{root}/enospc", MODS, dtype=torch.float32, projection=PROJ, shard_rows=4,
                                  resume=True)
        out["enospc_rows"] = len(ix)
        ix.append(rows(rank, 9)[len(ix):])
        ix.close()

        err, t0 = None, time.monotonic()
        try:
            GradientIndex.create(f"{root}/broken", MODS, dtype=torch.float32, resume=True)
        except Exception as e:  # noqa: BLE001 - recorded for the parent
            err = e
        out.update(broken=_outcome(err), broken_s=time.monotonic() - t0)

        out["group"] = _group_check()
        _record(root, "phase2", rank, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Phase 1 (2 processes), the parent's snapshot and damage, phase 2 (2 new processes)."""
    root = tmp_path_factory.mktemp("dist")
    _spawn(_phase1_worker, root, "phase1")
    p1 = _load(root, "phase1")
    shutil.copytree(root / "enospc", root / "enospc-after-close")
    f = root / "broken" / "shards" / "r00001-000000.bin"
    assert f.stat().st_size == 5 * D * 4
    os.truncate(f, 2 * D * 4)  # rank 1's committed shard lost 3 of its 5 rows
    _spawn(_phase2_worker, root, "phase2")
    return root, p1, _load(root, "phase2")


CLOSE_NOTE = (r"^GradientIndex\.close: rank\(s\) \[1\] of 2 failed to commit their rows of \S+enospc \(see those "
              r"ranks' errors\); the index was not marked complete\. ")


def test_commit_failure_in_close_raises_on_every_rank(runs):
    root, p1, _ = runs
    own, other = p1[1]["close"], p1[0]["close"]
    # rank 1: its own error (errno kept, chained to the fsync failure), with a note naming the ranks
    assert own["type"] == "OSError" and own["errno"] == errno.ENOSPC and own["cause"] == "OSError"
    assert re.match(rf"^\[Errno {errno.ENOSPC}\] gradkit\.index: committing \S+enospc failed \(No space left on "
                    r"device\); nothing of this chunk .* holds its 5 committed rows and is not marked complete",
                    own["msg"])
    assert len(own["notes"]) == 1 and re.match(CLOSE_NOTE, own["notes"][0])
    # rank 0, whose own commit worked: the same message, as DistributedBuildError
    assert other["type"] == "DistributedBuildError" and other["cause"] is None and not other["notes"]
    assert re.match(CLOSE_NOTE, other["msg"])
    for r in (0, 1):
        assert p1[r]["close_s"] < PROMPT_S, p1[r]["close_s"]  # reported at once, not after a timeout
        assert p1[r]["writable"] is False
        assert p1[r]["search_after"].startswith("search: the build was aborted")
        assert p1[r]["group"] == 2  # the ranks' collectives stayed in step

    snap = root / "enospc-after-close"
    with pytest.raises(IndexFormatError, match=r"^open: the build of \S+ did not complete \(14 rows committed"):
        GradientIndex.open(snap)
    ix = GradientIndex.open(snap, allow_incomplete=True)  # every rank's committed rows, rank order
    assert len(ix) == 14 and ix.projection == PROJ
    assert torch.equal(ix.get(range(14)), torch.cat([rows(0, 9), rows(1, 9)[:5]]))
    # rank 1's rows appended after its last commit are gone from the files too
    names = sorted(p.name for p in (snap / "shards").iterdir() if p.suffix == ".bin")
    assert names == ["r00000-000000.bin", "r00000-000001.bin", "r00000-000002.bin",
                     "r00001-000000.bin", "r00001-000001.bin"]
    assert (snap / "shards" / "r00001-000001.bin").stat().st_size == 1 * D * 4


def _single_process(path, parts):
    with GradientIndex.create(path, MODS, dtype=torch.float32, projection=PROJ, shard_rows=4,
                              distributed=False) as ix:
        for x in parts:
            ix.append(x)
    return GradientIndex.open(path)


def test_resume_after_interruption_equals_single_process_build(runs, tmp_path):
    root, _, p2 = runs
    assert [p2[r]["resume_rows"] for r in (0, 1)] == list(C)  # the uncommitted rows were cut off
    ix = GradientIndex.open(root / "resume")
    ref = _single_process(tmp_path / "ref", [rows(0, N[0]), rows(1, N[1])])  # rank 0's rows, then rank 1's
    n = sum(N)
    assert len(ix) == len(ref) == ix.num_examples == n
    assert (ix.modules, ix.dtype, ix.projection, ix.per_token, ix.nonfinite_rows) == \
        (ref.modules, ref.dtype, ref.projection, ref.per_token, ref.nonfinite_rows)
    assert torch.equal(ix.get(range(n)), ref.get(range(n)))
    q = rows(1, N[1])[[0, 5]]
    got = ix.search(q, 3, unit_norm=True, projection=PROJ)
    want = ref.search(q, 3, unit_norm=True, projection=PROJ)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1][:, 0].tolist() == [N[0], N[0] + 5]
    names = sorted(p.name for p in (root / "resume" / "shards").iterdir() if p.suffix == ".bin")
    assert names == [f"r00000-{i:06d}.bin" for i in range(3)] + [f"r00001-{i:06d}.bin" for i in range(2)]


def test_resume_after_failed_close(runs, tmp_path):
    root, _, p2 = runs
    assert [p2[r]["enospc_rows"] for r in (0, 1)] == [9, 5]
    ix = GradientIndex.open(root / "enospc")
    ref = _single_process(tmp_path / "ref", [rows(0, 9), rows(1, 9)])
    assert len(ix) == 18 and torch.equal(ix.get(range(18)), ref.get(range(18)))


def test_resume_error_on_one_rank_raises_on_every_rank(runs):
    root, _, p2 = runs
    own, other = p2[1]["broken"], p2[0]["broken"]
    note = (r"^GradientIndex\.create: rank\(s\) \[1\] of 2 failed to load their committed state of \S+broken \(see "
            r"those ranks' errors\); no rank opened it for writing and it is not marked complete$")
    assert own["type"] == "IndexFormatError"
    assert re.match(r"^resume: shard \S+r00001-000000\.bin is shorter than its 5 committed rows$", own["msg"])
    assert len(own["notes"]) == 1 and re.match(note, own["notes"][0])
    assert other["type"] == "DistributedBuildError" and re.match(note, other["msg"])
    for r in (0, 1):
        assert p2[r]["broken_s"] < PROMPT_S, p2[r]["broken_s"]
        assert p2[r]["group"] == 2
    with pytest.raises(IndexFormatError, match=r"^open: the build of \S+broken did not complete"):
        GradientIndex.open(root / "broken")

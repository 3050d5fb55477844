"""Audit (session 34): the on-disk gradient index built across ranks (torch.distributed, 2 gloo processes on
CPU) and in shards: global row order, row_offset / example_offset, per-token offsets across ranks and shards,
search over a distributed / sharded index against a single-process index of the same rows and against a plain
torch top-k, fp16 / bf16 storage, settings that differ between ranks, a failure writing the merged header,
resume of a complete 2-rank index, headers that lie about the ranks' files, and an error on one rank that
comes from another index (nested builds).

Every spawn runs under a hard deadline in the parent (the workers are killed past it, and the test fails), and
every worker's process group has a short gloo timeout, so that a hang fails instead of blocking.

Tests marked ``# DEFECT:`` fail on the current code; the others pass."""
import errno
import json
import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradkit.index as gi
from gradkit.index import DistributedBuildError, GradientIndex, IndexFormatError

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")]

MODS = {"h.0.mlp": 5, "h.1.attn": 3}
D = sum(MODS.values())
PROJ = {"kind": "rademacher", "seed": 7, "p": 8}
GLOO_TIMEOUT = timedelta(seconds=30)
SHORT_GLOO_TIMEOUT = timedelta(seconds=6)  # the nested-build scenarios: a collective out of step fails after this
DEADLINE_S = 90
PROMPT_S = 5.5  # under SHORT_GLOO_TIMEOUT: an out-of-step collective would wait that long (slow CI disks fsync slowly)


def ints(n, seed):
    """Small-integer rows: exact in fp16 / bf16, and their inner products exact in fp32 (ties are real ties)."""
    return torch.randint(-3, 4, (n, D), generator=torch.Generator().manual_seed(seed)).float()


def rank_rows(rank):
    """Rank 0: 9 rows; rank 1: 6 rows, two of them copies of rank 0's rows 2 and 7 (cross-rank ties)."""
    if rank == 0:
        return ints(9, 10)
    x = ints(6, 11)
    x0 = ints(9, 10)
    x[1], x[4] = x0[2], x0[7]
    return x


CHUNKS = {0: [4, 0, 5], 1: [6]}  # rank 0 appends 3 chunks (one of 0 rows), rank 1 one chunk
QUERIES = torch.cat([ints(5, 99), rank_rows(0)[2:3], rank_rows(1)[[0]]])

# per-token: (token counts per example, token rows refused) on each rank
TOK_COUNTS = {0: [2, 3, 1], 1: [1, 2, 3]}


def tok_rows(rank):
    x = ints(sum(TOK_COUNTS[rank]), 20 + rank)
    if rank == 0:
        x[3, 1] = float("nan")            # example 1, its 2nd token
    else:
        x[1, 0] = float("inf")            # example 1: both tokens refused
        x[2, 4] = float("-inf")
        x[4, 2] = 1e5                     # example 2: fp16 overflow (finite in fp32)
    return x


def outcome(e):
    if e is None:
        return None
    return {"type": type(e).__name__, "msg": str(e), "notes": list(getattr(e, "__notes__", []))}


def _group_check():
    t = torch.ones(1)
    dist.all_reduce(t)
    return int(t)


def _rank_main(rank, world, init_file, root, name, body, timeout_s):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    out = {}
    try:
        body(rank, root, out)
        t0 = time.monotonic()
        try:
            out["group"] = _group_check()
        except Exception as e:  # noqa: BLE001 - a group out of step: recorded, the test fails on it
            out["group"] = f"{type(e).__name__}: {e}"[:300]
        out["group_s"] = time.monotonic() - t0
    finally:
        with open(f"{root}/{name}-rank{rank}.json", "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()


def run_two_ranks(body, name, root, timeout=GLOO_TIMEOUT):
    """body(rank, root, out) on 2 spawned gloo ranks; fails the test if they do not finish within DEADLINE_S;
    returns the two ranks' records."""
    ctx = mp.spawn(_rank_main, args=(2, str(root / f"init-{name}"), str(root), name, body,
                                     timeout.total_seconds()), nprocs=2, join=False)
    end = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > end:
                pytest.fail(f"{name}: the 2 workers did not finish within {DEADLINE_S} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [json.loads((root / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]


def _search_record(ix):
    res = {}
    for tag, kw in (("ip", {}), ("cos", {"unit_norm": True}), ("rev", {"reverse": True}),
                    ("sub", {"modules": ["h.1.attn"]})):
        s, i = ix.search(QUERIES, 6, projection=PROJ, **kw)
        res[tag] = [s.tolist(), i.tolist()]
    return res


# --------------------------------------------------------------------------- the 2-rank builds (one spawn)


def _builds_body(rank, root, out):
    # (1) uneven chunks per rank, fp16, shards of 3 rows; a reader opening mid-build
    x = rank_rows(rank)
    ids, pos = [], 0
    with GradientIndex.create(f"{root}/uneven", MODS, dtype=torch.float16, projection=PROJ, shard_rows=3) as w:
        for n in CHUNKS[rank]:
            ids += w.append(x[pos:pos + n]).tolist()
            pos += n
            if rank == 0 and n == 4:  # committed rows on both ranks' side; the build is not closed
                try:
                    GradientIndex.open(f"{root}/uneven")
                except Exception as e:  # noqa: BLE001 - recorded for the parent
                    out["open_mid_build"] = outcome(e)
        out["uneven_pending_len"] = len(w)
    out["uneven"] = {"ids": ids, "row_offset": w.row_offset, "example_offset": w.example_offset, "len": len(w),
                     "search": _search_record(w)}

    # (2) bf16, one growing shard per rank, rank 1 appends nothing at all
    with GradientIndex.create(f"{root}/bf16", MODS, dtype="bf16", projection=PROJ) as w:
        if rank == 0:
            w.append(x * 0.3)
    out["bf16"] = {"row_offset": w.row_offset, "len": len(w)}

    # (3) per-token, fp16, shards of 2 rows, NaN / Inf / fp16-overflow tokens refused on both ranks
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientIndex.create(f"{root}/tok", MODS, dtype=torch.float16, projection=PROJ, per_token=True,
                                  shard_rows=2) as w:
            tids = w.append(tok_rows(rank), num_tokens=TOK_COUNTS[rank]).tolist()
            own_nonfinite = w.nonfinite_rows  # this rank's, before close()
    out["tok"] = {"ids": tids, "row_offset": w.row_offset, "example_offset": w.example_offset,
                  "own_nonfinite": own_nonfinite, "nonfinite": w.nonfinite_rows, "warned": [str(c.message) for c in caught]}

    # (4) settings that differ between the ranks: refused on both, by name, before anything is written
    for tag, kw in (("seed", {"projection": dict(PROJ, seed=PROJ["seed"] + rank)}),
                    ("order", {"modules": dict(reversed(list(MODS.items()))) if rank else MODS}),
                    ("per_token", {"per_token": bool(rank)})):
        kw = {"modules": MODS, "dtype": torch.float16, "projection": PROJ, **kw}
        err = None
        t0 = time.monotonic()
        try:
            GradientIndex.create(f"{root}/mismatch-{tag}", **kw)
        except Exception as e:  # noqa: BLE001 - recorded for the parent
            err = e
        out[f"mismatch-{tag}"] = {"err": outcome(err), "s": time.monotonic() - t0}

    # (5) a complete 2-rank index resumed by 2 ranks: rank 0's new rows come before rank 1's old ones
    with GradientIndex.create(f"{root}/res", MODS, dtype=torch.float32, projection=PROJ, shard_rows=2) as w:
        w.append(x[:4 - rank])
    with GradientIndex.create(f"{root}/res", MODS, dtype=torch.float32, projection=PROJ, shard_rows=2,
                              resume=True) as w:
        out["res_resumed_len"] = len(w)
        w.append(x[4 - rank:])
    out["res"] = {"row_offset": w.row_offset, "len": len(w)}

    # (6) rank 0 fails to write the merged header (disk full): every rank raises, nothing is complete; a
    # resume by 2 ranks that appends nothing then completes it
    real = GradientIndex._write_merged_header

    def enospc(self, counts, complete):
        if complete:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, counts, complete)

    w = GradientIndex.create(f"{root}/hdr", MODS, dtype=torch.float32, projection=PROJ, shard_rows=4)
    w.append(x)
    if rank == 0:
        GradientIndex._write_merged_header = enospc
    err, t0 = None, time.monotonic()
    try:
        w.close()
    except Exception as e:  # noqa: BLE001 - recorded for the parent
        err = e
    finally:
        GradientIndex._write_merged_header = real
    out["hdr"] = {"err": outcome(err), "s": time.monotonic() - t0}
    try:
        GradientIndex.open(f"{root}/hdr")
    except IndexFormatError as e:
        out["hdr_open"] = str(e)
    dist.barrier()  # the parent's snapshot is not taken here; both ranks checked the index before the resume
    with GradientIndex.create(f"{root}/hdr", MODS, dtype=torch.float32, projection=PROJ, shard_rows=4,
                              resume=True) as w:
        out["hdr_resumed_len"] = len(w)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("s34")
    out = run_two_ranks(_builds_body, "builds", root)
    for r in (0, 1):
        assert out[r].get("group") == 2, out[r]
    return root, out


def single(path, x, dtype, shard_rows=None, per_token_counts=None):
    """The same rows in one single-process index (rank 0's, then rank 1's)."""
    with GradientIndex.create(path, MODS, dtype=dtype, projection=PROJ, shard_rows=shard_rows, distributed=False,
                              per_token=per_token_counts is not None) as w:
        w.append(x, num_tokens=per_token_counts)
    return GradientIndex.open(path)


def torch_topk(q, keys, k, largest=True, cosine=False):
    """Reference: float64 scores, ranking by (score, row) with ties to the lowest row."""
    q64, k64 = q.double(), keys.double()
    if cosine:
        q64 = q64 / q64.norm(dim=1, keepdim=True)
        n = k64.norm(dim=1, keepdim=True)
        k64 = torch.where(n > 0, k64 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(k64))
    s = q64 @ k64.T
    order = torch.sort(-s if largest else s, dim=1, stable=True).indices[:, :k]
    return torch.gather(s, 1, order), order


def test_uneven_ranks_row_order_and_row_numbers(built):
    """Rows: rank 0's (in its append order) then rank 1's, whatever the chunk sizes; append's numbers plus
    row_offset give each example's global row; the mid-build index never opens."""
    root, out = built
    want = torch.cat([rank_rows(0), rank_rows(1)]).half().float()
    ix = GradientIndex.open(root / "uneven")
    assert len(ix) == ix.num_examples == 15 and ix.dtype == torch.float16 and ix.projection == PROJ
    assert torch.equal(ix.get(range(15)), want)
    assert [out[r]["uneven"]["row_offset"] for r in (0, 1)] == [0, 9]
    assert [out[r]["uneven"]["example_offset"] for r in (0, 1)] == [0, 9]
    assert [out[r]["uneven_pending_len"] for r in (0, 1)] == [9, 6]  # the rank's own rows before close()
    assert [out[r]["uneven"]["len"] for r in (0, 1)] == [15, 15]    # the merged index after close()
    for r in (0, 1):
        ids = out[r]["uneven"]["ids"]
        assert ids == list(range(len(rank_rows(r))))
        assert torch.equal(ix.get([i + out[r]["uneven"]["row_offset"] for i in ids]), rank_rows(r).half().float())
    names = sorted(p.name for p in (root / "uneven" / "shards").glob("*.bin"))
    assert names == [f"r00000-{i:06d}.bin" for i in range(3)] + [f"r00001-{i:06d}.bin" for i in range(2)]
    e = out[0]["open_mid_build"]
    assert e["type"] == "IndexFormatError" and re.match(r"^open: the build of \S+uneven did not complete", e["msg"])


def test_distributed_search_equals_single_process_and_torch(built, tmp_path):
    """Search over the 2-rank, 3-row-shard index: equal (scores and rows, bit for bit) to one unsharded
    single-process index of the same rows, and to each rank's own closed writer; inner products equal a plain
    float64 top-k (exact: integer rows), ties (rank 1's copies of rank 0's rows) to the lower row, i.e. rank 0's."""
    root, out = built
    rows = torch.cat([rank_rows(0), rank_rows(1)])
    ix = GradientIndex.open(root / "uneven")
    ref = single(tmp_path / "ref", rows, torch.float16)
    got = _search_record(ix)
    assert got == _search_record(ref)
    for r in (0, 1):
        assert out[r]["uneven"]["search"] == got
    stored = rows.half().float()
    for tag, kw in (("ip", {}), ("rev", {"largest": False})):
        ws, wi = torch_topk(QUERIES, stored, 6, **kw)
        assert torch.equal(torch.tensor(got[tag][0]), ws.float()) and got[tag][1] == wi.tolist(), tag
    ws, wi = torch_topk(QUERIES[:, 5:], stored[:, 5:], 6)
    assert torch.equal(torch.tensor(got["sub"][0]), ws.float()) and got["sub"][1] == wi.tolist()
    cs, ci = torch_topk(QUERIES, stored, 6, cosine=True)
    torch.testing.assert_close(torch.tensor(got["cos"][0]), cs.float(), rtol=0, atol=2e-6)
    # the query equal to rank 0's row 2 (and rank 1's row 1 = global row 10): row 2 first, then 10
    assert got["cos"][1][5][:2] == [2, 10]
    # the query equal to rank 1's row 0 (global row 9) finds itself
    assert got["cos"][1][6][0] == 9


def test_k_bounds_over_a_distributed_index(built):
    root, _ = built
    ix = GradientIndex.open(root / "uneven")
    s, i = ix.search(QUERIES, 15, projection=PROJ)
    assert sorted(i[0].tolist()) == list(range(15))
    with pytest.raises(ValueError, match=r"^k: 16 is larger than the index \(15 rows\)$"):
        ix.search(QUERIES, 16, projection=PROJ)


def test_bf16_with_a_rank_of_no_rows(built, tmp_path):
    root, out = built
    x = rank_rows(0) * 0.3
    ix = GradientIndex.open(root / "bf16")
    assert ix.dtype == torch.bfloat16 and len(ix) == 9
    assert [out[r]["bf16"]["row_offset"] for r in (0, 1)] == [0, 9]
    assert torch.equal(ix.get(range(9)), x.bfloat16().float())
    ref = single(tmp_path / "ref", x, torch.bfloat16, shard_rows=2)
    for kw in ({}, {"unit_norm": True}, {"reverse": True}):
        a, b = ix.search(QUERIES, 9, projection=PROJ, **kw), ref.search(QUERIES, 9, projection=PROJ, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_per_token_offsets_and_nonfinite_across_ranks(built, tmp_path):
    """Per-token 2-rank build with refused tokens on both ranks: offsets describe the stored rows (an example all
    of whose tokens were refused kept with 0 tokens), example_of maps search hits to the right example, the
    refused rows are counted on each rank and in the merged header, and search equals a single-process index."""
    root, out = built
    keep, counts = [], []
    for r in (0, 1):
        x = tok_rows(r)
        fin = torch.isfinite(x).all(1) & torch.isfinite(x.half()).all(1)
        ex = torch.repeat_interleave(torch.arange(len(TOK_COUNTS[r])), torch.tensor(TOK_COUNTS[r]))
        keep.append(x[fin])
        counts += torch.bincount(ex[fin], minlength=len(TOK_COUNTS[r])).tolist()
        assert out[r]["tok"]["own_nonfinite"] == int((~fin).sum())
        assert out[r]["tok"]["nonfinite"] == 4  # after close(): the merged index's
        assert out[r]["tok"]["ids"] == torch.where(fin, fin.long().cumsum(0) - 1, -1).tolist()
        assert any("rows hold NaN or Inf" in m for m in out[r]["tok"]["warned"])
    assert counts == [2, 2, 1, 1, 0, 2]  # rank 1's example 1 lost both its tokens
    ix = GradientIndex.open(root / "tok")
    assert ix.nonfinite_rows == 1 + 3 and ix.num_examples == 6 and len(ix) == 8
    assert ix.offsets.tolist() == [0, 2, 4, 5, 6, 6, 8]
    assert [out[r]["tok"]["row_offset"] for r in (0, 1)] == [0, 5]
    assert [out[r]["tok"]["example_offset"] for r in (0, 1)] == [0, 3]
    stored = torch.cat(keep).half().float()
    assert torch.equal(ix.get(range(8)), stored)
    ref = single(tmp_path / "ref", torch.cat(keep), torch.float16, per_token_counts=counts)
    s, i = ix.search(stored, 1, unit_norm=True, projection=PROJ)
    assert torch.equal(i[:, 0], torch.arange(8))  # each token row finds itself
    rs, ri = ref.search(stored, 1, unit_norm=True, projection=PROJ)
    assert torch.equal(s, rs) and torch.equal(i, ri)
    assert ix.example_of(i[:, 0]).tolist() == [0, 0, 1, 1, 2, 3, 5, 5]
    # rank 1's first stored token (its row 0 + row_offset) belongs to its example 0 (+ example_offset)
    assert int(ix.example_of(out[1]["tok"]["row_offset"])) == out[1]["tok"]["example_offset"]


@pytest.mark.parametrize("tag, field", [("seed", "projection"), ("order", "modules"), ("per_token", "per_token")])
def test_settings_differing_between_ranks_are_refused_by_name(built, tag, field):
    root, out = built
    for r in (0, 1):
        e = out[r][f"mismatch-{tag}"]
        assert e["err"]["type"] == "ValueError", e
        assert e["err"]["msg"].startswith(f"{field}: differs between the ranks of the distributed build"), e
        assert e["s"] < PROMPT_S
    assert not (root / f"mismatch-{tag}").exists()


def test_resume_of_a_complete_two_rank_index(built, tmp_path):
    """A complete 2-rank index resumed by 2 ranks: each continues after its own rows; the result is rank 0's
    rows then rank 1's (rank 0's new rows come before rank 1's old ones: row_offset says where)."""
    root, out = built
    assert [out[r]["res_resumed_len"] for r in (0, 1)] == [4, 3]
    assert [out[r]["res"]["row_offset"] for r in (0, 1)] == [0, 9]
    ix = GradientIndex.open(root / "res")
    rows = torch.cat([rank_rows(0), rank_rows(1)])
    assert len(ix) == 15 and torch.equal(ix.get(range(15)), rows)
    ref = single(tmp_path / "ref", rows, torch.float32, shard_rows=2)
    a, b = _search_record(ix), _search_record(ref)
    assert a == b


def test_failed_merged_header_raises_on_every_rank_and_resumes(built):
    root, out = built
    own, other = out[0]["hdr"]["err"], out[1]["hdr"]["err"]
    assert own["type"] == "OSError" and other["type"] == "DistributedBuildError", (own, other)
    assert "rank 0 failed to write the header" in other["msg"]
    for r in (0, 1):
        assert out[r]["hdr"]["s"] < PROMPT_S
        assert re.match(r"^open: the build of \S+hdr did not complete", out[r]["hdr_open"])
    assert [out[r]["hdr_resumed_len"] for r in (0, 1)] == [9, 6]
    ix = GradientIndex.open(root / "hdr")
    assert torch.equal(ix.get(range(15)), torch.cat([rank_rows(0), rank_rows(1)]))


# --------------------------------------------------------------------------- headers and files that lie


def _copy(root, name, dst):
    shutil.copytree(root / name, dst)
    return dst


def _edit(path, change):
    h = json.loads((path / "index.json").read_text())
    change(h)
    (path / "index.json").write_text(json.dumps(h))


@pytest.mark.parametrize("what", ["truncate_rank1", "extend_rank1", "count", "modules", "rank1_first",
                                  "world_size"])
def test_damaged_or_lying_distributed_index_is_refused(built, tmp_path, what):
    root, _ = built
    p = _copy(root, "uneven", tmp_path / "ix")
    last = p / "shards" / "r00001-000001.bin"
    if what == "truncate_rank1":
        os.truncate(last, last.stat().st_size - D * 2)
    elif what == "extend_rank1":
        with open(last, "ab") as f:
            f.write(b"\0" * D * 2)
    elif what == "count":
        _edit(p, lambda h: h.update(count=16, examples=16))
    elif what == "modules":
        _edit(p, lambda h: h.update(modules=[["h.0.mlp", 6], ["h.1.attn", 3]], dim=9))
    elif what == "rank1_first":
        _edit(p, lambda h: h.update(shards=h["shards"][3:] + h["shards"][:3]))
    elif what == "world_size":
        _edit(p, lambda h: h.update(world_size=1))
    for kw in ({}, {"allow_incomplete": True}):
        with pytest.raises(IndexFormatError):
            GradientIndex.open(p, **kw)


def test_token_files_listed_out_of_rank_order_are_refused(built, tmp_path):
    # DEFECT: open() checks that the shards are listed in rank order (rank 0's, then rank 1's) but not the
    # token_files: a header listing rank 1's token file before rank 0's opens as a valid index whose offsets
    # are rank 1's token counts followed by rank 0's, so example_of / offsets map every row to the wrong
    # example (here [0, 1, 1, 3, 5, 7, 8] instead of [0, 2, 4, 5, 6, 6, 8]), silently.
    root, _ = built
    p = _copy(root, "tok", tmp_path / "ix")
    _edit(p, lambda h: h["token_files"].reverse())
    with pytest.raises(IndexFormatError, match=r"token"):
        got = GradientIndex.open(p)
        pytest.fail(f"opened with offsets {got.offsets.tolist()} (the real ones are [0, 2, 4, 5, 6, 6, 8])")


# --------------------------------------------------------------------------- an error from another index


def _nested_body(rank, root, out):
    """Two indexes built together (outer A, inner B); rank 1's inner with-block raises."""
    t0, err = time.monotonic(), None
    try:
        with GradientIndex.create(f"{root}/A", MODS, dtype=torch.float32) as a:
            a.append(ints(3, rank))
            with GradientIndex.create(f"{root}/B", MODS, dtype=torch.float32) as b:
                b.append(ints(2, 10 + rank))
                if rank == 1:
                    raise RuntimeError("user code failed on rank 1")
    except Exception as e:  # noqa: BLE001 - recorded for the parent
        err = e
    out.update(err=outcome(err), s=time.monotonic() - t0)


def _create_in_block_body(rank, root, out):
    """A second create() inside A's with-block, whose arguments rank 1 refuses (every rank raises at once:
    rank 1 its ValueError, rank 0 DistributedBuildError) and which propagates out of A's with-block."""
    t0, err = time.monotonic(), None
    try:
        with GradientIndex.create(f"{root}/A", MODS, dtype=torch.float32) as a:
            a.append(ints(3, rank))
            GradientIndex.create(f"{root}/B", MODS, dtype=torch.float32, shard_rows=0 if rank else None)
    except Exception as e:  # noqa: BLE001 - recorded for the parent
        err = e
    out.update(err=outcome(err), s=time.monotonic() - t0)


@pytest.mark.parametrize("body", [_nested_body, _create_in_block_body], ids=["nested", "create_in_block"])
def test_an_error_from_another_index_keeps_the_ranks_in_step(tmp_path, body):
    # DEFECT: GradientIndex.__exit__ (python/gradkit/index.py:1079-1080) joins close()'s collective as a failed
    # rank only when the with-block's exception is not a DistributedBuildError. When the failure comes from
    # another distributed index (a nested build, or a create() refused on one rank), the failing rank sees its
    # own error (RuntimeError / ValueError) and joins A's all_gather, while the other rank sees
    # DistributedBuildError and skips it: the ranks leave the with-block one collective apart. Their next
    # collective (here an all_reduce) is paired with that all_gather and fails only after the gloo timeout
    # (30 min by default), on both ranks.
    out = run_two_ranks(body, body.__name__, tmp_path, timeout=SHORT_GLOO_TIMEOUT)
    errs = [out[r]["err"] for r in (0, 1)]
    assert errs[0]["type"] == "DistributedBuildError" and errs[1]["type"] in ("RuntimeError", "ValueError"), errs
    for r in (0, 1):
        assert out[r]["group"] == 2, (r, out[r]["group"])  # the ranks' collectives stayed in step
        assert out[r]["s"] + out[r]["group_s"] < PROMPT_S, out[r]
    with pytest.raises(IndexFormatError, match="did not complete"):
        GradientIndex.open(tmp_path / "A")

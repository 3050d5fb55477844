"""Audit (session 39): GradientIndex in real workflows -- fed by GradientCollector (dicts, flat, per-token with a
padding mask), resumed after an interrupt, built by 2 gloo ranks, read while another process appends, bergson
layouts holding NaN rows, preconditioning per module vs full, float64 / bf16 / non-contiguous appends and fp16
overflow.

Tests marked ``# DEFECT:`` failed on the code before session 39's fixes (one per defect; line numbers are of that
code) and now check the fixed behaviour; the others pin behaviour that was checked and found correct. Everything is small and single-threaded (one 2-rank spawn for the distributed cases)."""
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradkit.index import GradientIndex, IndexFormatError, NonFiniteGradientError, Precondition
from gradkit.projection import GradientCollector

pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")

torch.set_num_threads(1)

M = OrderedDict([("a", 3), ("b", 2)])
D = 5


# ============================================================================ helpers


class Tiny(torch.nn.Module):
    """Two Linear layers on (B, T, I) inputs, registered so that model order ("up", "down") is not sorted order."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(6, 5)
        self.down = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _collect(col, model, x, mask=None, flat=False):
    with col:
        if mask is not None:
            col.set_mask(mask)
        out = model(x)
        w = torch.tensor([0.7, -1.3, 0.4, 1.1][:out.shape[-1]])
        loss = (out * w + 0.5 * out ** 2).sum(-1)
        if mask is not None:
            loss = loss * mask
        loss.sum().backward()
        return col.collect(flat=flat)


def _brute(X, Q, k, unit_norm=False, reverse=False, cols=None):
    """float64 top-k (NaN last, ties lowest row), the reference for small indexes."""
    X = X.double().clone()
    Q = Q.double().clone()
    if unit_norm:
        nx = X.norm(dim=1, keepdim=True)
        X = torch.where(nx > 0, X / nx, torch.zeros_like(X))
        Q = Q / Q.norm(dim=1, keepdim=True)
    if cols is not None:
        keep = torch.zeros(X.shape[1], dtype=torch.float64)
        keep[cols] = 1
        Q = Q * keep
        X = torch.where(keep.bool(), X, torch.zeros_like(X))
    S = Q @ X.T
    out = []
    for s in S:
        key = [(float("inf") if torch.isnan(v) else (-float(v) if not reverse else float(v)), j)
               for j, v in enumerate(s)]
        out.append([j for _, j in sorted(key)[:k]])
    return torch.tensor(out)


# ============================================================================ DEFECT 1: module order of flat queries


# DEFECT: GradientIndex.search(projection=col) accepts flat (Q, D) queries from a GradientCollector whose columns
# are in another module order than the index's, and scores them against misaligned columns (wrong top-k, no error).
# create() never compares the order of `modules` with the order of projection["modules"], and the stored config is
# key-sorted by _projection_dict (index.py:301, json.dumps(..., sort_keys=True)), so the index's own
# `ix.projection["modules"]` is in sorted, not model, order: building a second index from it (a natural
# `GradientIndex.create(p2, ix.projection["modules"], projection=ix.projection)`) gives the layout ("down", "up")
# while the collector's flat vectors are ("up", "down"); the check at index.py:2147 compares dicts, which ignores
# order. Correct: a query layout that differs from the index's column order is refused (the collector's
# module_dims order is known when projection= is the collector), or create() refuses a module order that contradicts
# the projection config.
def test_flat_queries_from_a_collector_in_another_module_order_are_refused(tmp_path):
    # session 39: the stored config keeps the collector's module order; create() refuses a module order that
    # contradicts the projection's, and search() refuses flat queries whose collector order is not the index's
    torch.manual_seed(0)
    model = Tiny()
    col = GradientCollector(model, p=2, seed=0)
    assert list(col.module_dims) == ["up", "down"]
    grads = _collect(col, model, torch.randn(8, 4, 6))
    with GradientIndex.create(tmp_path / "first", col.module_dims, dtype="fp32",
                              projection=col.projection_config) as w:
        w.append(grads)
    first = GradientIndex.open(tmp_path / "first")
    assert list(first.modules) == ["up", "down"]
    assert list(first.projection["modules"]) == ["up", "down"]  # the model order is kept
    with GradientIndex.create(tmp_path / "second", first.projection["modules"], dtype="fp32",
                              projection=first.projection) as w:  # the natural copy: the same column order
        w.append(grads)
    assert list(GradientIndex.open(tmp_path / "second").modules) == ["up", "down"]
    rev = {"down": col.module_dims["down"], "up": col.module_dims["up"]}
    with pytest.raises(ValueError, match=r"^modules: given in the order \['down', 'up'\], but the projection's "
                                         r"modules .* are in the order \['up', 'down'\]"):
        GradientIndex.create(tmp_path / "third", rev, dtype="fp32", projection=col)
    assert not (tmp_path / "third" / "index.json").exists()
    # an index in the other order (built without the projection's order to compare) searched with flat queries
    # (the same projection, its modules listed in the index's order: equal as configs)
    with GradientIndex.create(tmp_path / "fourth", rev, dtype="fp32",
                              projection=dict(col.projection_config, modules=rev)) as w:
        w.append(grads)
    ix = GradientIndex.open(tmp_path / "fourth")
    q = col.flatten(grads)[:3]  # the collector's flat layout: up, down
    with pytest.raises(ValueError, match=r"^queries: flat rows of the projection's collector have their columns in "
                                         r"its module order \['up', 'down'\], but this index's columns are in the "
                                         r"order \['down', 'up'\]"):
        ix.search(q, 8, projection=col)
    # dict queries are placed by name: the right answer whatever the orders
    X = torch.cat([grads[n] for n in ix.modules], dim=1)
    want = _brute(X, torch.cat([grads[n][:3] for n in ix.modules], dim=1), 8)
    _, i = ix.search({n: grads[n][:3] for n in ix.modules}, 8)
    assert torch.equal(i, want)


# ============================================================================ DEFECT 2: Precondition.matrix


# DEFECT: assigning Precondition.matrix (a public attribute, e.g. an updated Hessian estimate) is ignored: the
# cached powers are keyed by (module key, p, damping) only (index.py:748, `ck = (key, str(p), self._damping)`; the
# cache is cleared only by the damping setter, index.py:728-732), so later searches keep using H_old^-1 silently.
# Correct: the new matrix is used (as the damping setter does for damping), or assignment is refused.
def test_precondition_matrix_reassignment_takes_effect(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, D, generator=g)
    with GradientIndex.create(tmp_path / "ix", M, dtype="fp32") as w:
        w.append(X)
    ix = GradientIndex.open(tmp_path / "ix")
    Q = torch.randn(2, D, generator=g)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    B = torch.randn(D, D, generator=g, dtype=torch.float64)
    H1 = A @ A.T + torch.eye(D, dtype=torch.float64)
    H2 = B @ B.T + 0.1 * torch.eye(D, dtype=torch.float64)
    pre = Precondition(H1)
    ix.search(Q, 10, precondition=pre)
    pre.matrix = H2
    s, i = ix.search(Q, 10, precondition=pre)
    want_s, want_i = ix.search(Q, 10, precondition=Precondition(H2))
    ref = torch.linalg.solve(H2, Q.double().T).T @ X.double().T
    assert torch.equal(want_i, ref.topk(10).indices)  # a fresh Precondition(H2) is right
    assert torch.equal(i, want_i), f"stale H1 powers used after pre.matrix = H2: {i.tolist()} vs {want_i.tolist()}"
    # edited in place (its version counter moves): the powers are made again; a dict entry replaced likewise
    pre2 = Precondition(H1.clone())
    ix.search(Q, 10, precondition=pre2)
    pre2.matrix.copy_(H2)
    assert torch.equal(ix.search(Q, 10, precondition=pre2)[1], want_i)
    # mode is validated when assigned, as in the constructor
    with pytest.raises(ValueError, match=r"^mode: expected one of \('query', 'both'\), got 'Both'"):
        pre2.mode = "Both"
    assert pre2.mode == "query"


# ============================================================================ DEFECT 3: float64 -> fp16 / bf16


# DEFECT: float64 rows are cast to the storage dtype with torch's Tensor.to (index.py:1278, `stored =
# x.to(self.dtype)`), which goes float64 -> float32 -> float16 / bfloat16: two roundings. 1 + 2**-11 + 2**-30 is
# stored as 1.0 (fp16) instead of 1.0009765625 (the correctly rounded fp16, numpy's np.float16), 1 + 2**-8 + 2**-30 as
# 1.0 in bf16 instead of 1.0078125 (1 ulp), and a finite row whose largest entry 65519.99999999999 rounds to fp16's
# 65504 is refused as an overflow ("NaN or Inf after casting to float16") and counted in nonfinite_rows, though
# the docstring says only rows that are NaN / Inf after casting are refused. Correct: float64 rows rounded once to
# the storage dtype (e.g. through numpy's correctly rounded casts, or float64 -> fp32 with round-to-odd), so the
# value stored is the nearest fp16 / bf16 and only rows that really overflow are refused.
def test_float64_rows_are_rounded_once_into_fp16_and_bf16(tmp_path):
    v16 = 1 + 2.0 ** -11 + 2.0 ** -30
    vbf = 1 + 2.0 ** -8 + 2.0 ** -30
    near = float(np.nextafter(65520.0, 0.0))
    assert float(np.float16(near)) == 65504.0 and float(np.float16(v16)) == 1 + 2.0 ** -10
    x = torch.tensor([[v16, 0, 0, 0, 0], [near, 1, 0, 0, 0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradientIndex.create(tmp_path / "h", M, dtype="fp16") as w:
            rows_h = w.append(x)
        with GradientIndex.create(tmp_path / "b", M, dtype="bf16") as w:
            w.append(torch.tensor([[vbf, 0, 0, 0, 0]], dtype=torch.float64))
    h = GradientIndex.open(tmp_path / "h")
    b = GradientIndex.open(tmp_path / "b")
    got = {"fp16 row 0": float(h.get(0)[0, 0]) if len(h) else None, "bf16 row 0": float(b.get(0)[0, 0]),
           "fp16 row ids": rows_h.tolist(), "nonfinite_rows": h.nonfinite_rows}
    want = {"fp16 row 0": 1 + 2.0 ** -10, "bf16 row 0": 1 + 2.0 ** -7, "fp16 row ids": [0, 1], "nonfinite_rows": 0}
    assert got == want


# ============================================================================ distributed (one spawn)


def _dist_main(rank, world, init_file, root):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    out = {}
    try:
        # (A) rank 0 fails before committing anything; rank 1 committed 4 rows, 1 of them NaN (refused, counted).
        # Then both ranks resume and add one clean row each.
        x = torch.randn(4, D, generator=torch.Generator().manual_seed(rank))
        if rank == 1:
            x[2, 0] = float("nan")
        try:
            with GradientIndex.create(f"{root}/nf", M, dtype="fp32") as w:
                if rank == 0:
                    raise KeyError("rank 0 fails at its first batch")
                w.append(x)
        except Exception as e:  # noqa: BLE001
            out["A_first"] = type(e).__name__
        with GradientIndex.create(f"{root}/nf", M, dtype="fp32", resume=True) as w:
            w.append(torch.ones(1, D))
        out["A_nonfinite"] = w.nonfinite_rows
        out["A_len"] = len(w)

        # (B) a complete 2-rank index, resumed to add rows, whose rank 1 raises before committing anything
        with GradientIndex.create(f"{root}/rc", M, dtype="fp32") as w:
            w.append(x.nan_to_num())
        try:
            with GradientIndex.create(f"{root}/rc", M, dtype="fp32", resume=True):
                if rank == 1:
                    raise KeyError("rank 1 fails before its first append")
        except Exception as e:  # noqa: BLE001
            out["B_err"] = type(e).__name__

        # (C) a dataset of 11 examples split as DistributedSampler(shuffle=False) does (rank r: r, r+2, ...), fed in
        # chunks; rank 1's example 5 is NaN (refused). Row ids + row_offset must map every stored row back.
        data = torch.randn(11, D, generator=torch.Generator().manual_seed(42))
        data[5, 1] = float("nan")
        mine = list(range(rank, 11, world))
        placed = []
        with GradientIndex.create(f"{root}/order", M, dtype="fp16", projection={"seed": 1}) as w:
            for a in range(0, len(mine), 2):
                ids = w.append(data[mine[a:a + 2]])
                placed += [(mine[a + j], int(r)) for j, r in enumerate(ids)]
        out["C_map"] = [(ex, r + w.row_offset) for ex, r in placed if r >= 0]
        out["C_refused"] = [ex for ex, r in placed if r < 0]

        # (D) per-token: rank r has examples with token counts; example_offset places them
        counts = [[2, 0, 3], [1, 4]][rank]
        toks = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(7 + rank))
        with GradientIndex.create(f"{root}/tok", M, dtype="fp32", per_token=True) as w:
            w.append(toks, counts)
        out["D_offsets"] = (w.row_offset, w.example_offset)
    finally:
        with open(f"{root}/rank{rank}.json", "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    root = tmp_path_factory.mktemp("dist")
    ctx = mp.spawn(_dist_main, args=(2, str(root / "init"), str(root)), nprocs=2, join=False)
    end = time.monotonic() + 90
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > end:
                pytest.fail("the 2 gloo workers did not finish within 90 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


# DEFECT: a 2-rank build in which rank 0 failed before committing anything (no shards/rank-00000.json) and rank 1
# refused 1 NaN row: after create(..., resume=True) on 2 ranks and close(), nonfinite_rows is 2, not 1. On resume,
# rank 0 has no rank header of its own, so it reads the merged header and takes ITS nonfinite_rows (every rank's
# total) as its own (index.py:1101-1102, `if self._world == 1 or own or self._rank == 0: nonfinite = ...`); close()
# then adds rank 1's own count again (_write_merged_header, index.py:1547). Correct: rank 0 starts from 0 when it has
# no committed state (only its own refused rows count), so the merged count stays 1.
def test_distributed_resume_counts_refused_rows_once(dist_run):
    root, (r0, r1) = dist_run
    assert r0["A_first"] == "KeyError" and r1["A_first"] == "DistributedBuildError"
    ix = GradientIndex.open(root / "nf")
    assert len(ix) == 3 + 2 and r0["A_len"] == r1["A_len"] == 5
    assert ix.nonfinite_rows == 1, f"one NaN row was refused but the index reports {ix.nonfinite_rows}"


# DEFECT: README.md:397 says "A resumed build of a complete index that raises before committing anything new leaves
# it complete", in the paragraph on torch.distributed builds; for a 2-rank build it does not: create(resume=True)
# marks the header incomplete (index.py:1050) and only a one-process build remembers the complete header to
# restore it (index.py:1048, `and self._world == 1`); the failed close() then writes an incomplete merged header, so
# the complete, searchable index no longer opens (IndexFormatError "did not complete") until it is resumed and closed
# again. Correct: rank 0 restores the complete header when no rank committed anything new (as one process does), or
# the README limits the promise to one process.
def test_distributed_resume_of_a_complete_index_that_raises_leaves_it_complete(dist_run):
    root, (r0, r1) = dist_run
    assert r1["B_err"] == "KeyError" and r0["B_err"] == "DistributedBuildError"
    try:
        ix = GradientIndex.open(root / "rc")
    except IndexFormatError as e:
        pytest.fail(f"a complete 2-rank index became unopenable after a resume that added nothing: {e}")
    assert len(ix) == 8


def test_distributed_rows_map_back_to_the_dataset_order(dist_run):
    root, (r0, r1) = dist_run
    ix = GradientIndex.open(root / "order")
    data = torch.randn(11, D, generator=torch.Generator().manual_seed(42))
    mapping = [tuple(m) for m in r0["C_map"] + r1["C_map"]]
    assert r0["C_refused"] == [] and r1["C_refused"] == [5] and ix.nonfinite_rows == 1
    assert sorted(r for _, r in mapping) == list(range(len(ix))) == list(range(10))
    for ex, row in mapping:
        assert torch.equal(ix.get(row), data[ex].half().float()[None])
    # search through the merged index returns rows that map back to the right examples
    s, i = ix.search(data[[0, 3, 8]], 1, unit_norm=True, projection={"seed": 1})
    back = dict((row, ex) for ex, row in mapping)
    assert [back[int(r)] for r in i[:, 0]] == [0, 3, 8]


def test_distributed_per_token_example_offset_and_example_of(dist_run):
    root, (r0, r1) = dist_run
    ix = GradientIndex.open(root / "tok")
    assert tuple(r0["D_offsets"]) == (0, 0) and tuple(r1["D_offsets"]) == (5, 3)
    assert ix.offsets.tolist() == [0, 2, 2, 5, 6, 10]
    assert ix.example_of(torch.arange(10)).tolist() == [0, 0, 2, 2, 2, 3, 4, 4, 4, 4]


# ============================================================================ passing: collector -> index


def test_per_token_collector_rows_map_back_to_example_and_token(tmp_path):
    """per_token=True collector, a padding mask with an all-padding example, a NaN token refused by "skip":
    example_of maps every stored row to its example; per-example queries (same seed / p) are accepted."""
    torch.manual_seed(1)
    model = Tiny()
    col = GradientCollector(model, p=2, seed=3, per_token=True)
    x = torch.randn(4, 5, 6)
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    mask[2] = 0  # an example with no token
    g = _collect(col, model, x, mask, flat=True)
    assert g.shape == (4, 5, 8)
    rows, nt = GradientCollector.pack_tokens(g, mask)
    assert nt.tolist() == [5, 3, 0, 5]
    rows = rows.clone()
    rows[6, 0] = float("nan")  # example 1, token 1
    pos = [(e, t) for e in range(4) for t in range(5) if mask[e, t]]
    with pytest.warns(RuntimeWarning, match="1 of 8 rows hold NaN"):
        with GradientIndex.create(tmp_path / "ix", col.module_dims, dtype="fp32", per_token=True,
                                  projection=col.projection_config) as w:
            ids = w.append(rows[:8], nt[:2])
            ids2 = w.append(rows[8:], nt[2:])
    ids = torch.cat([ids, ids2])
    ix = GradientIndex.open(tmp_path / "ix")
    assert ids.tolist() == [0, 1, 2, 3, 4, 5, -1, 6, 7, 8, 9, 10, 11]
    assert ix.offsets.tolist() == [0, 5, 7, 7, 12] and ix.num_examples == 4 and ix.nonfinite_rows == 1
    kept = [p for p, r in zip(pos, ids.tolist()) if r >= 0]
    assert ix.example_of(torch.arange(len(ix))).tolist() == [e for e, _ in kept]
    s, i = ix.search(rows[[0, 9]], 1, unit_norm=True, projection=col)
    assert [kept[r] for r in i[:, 0].tolist()] == [pos[0], pos[9]]
    # per-example queries from a per_token=False collector of the same projection search the per-token index
    col2 = GradientCollector(model, p=2, seed=3)
    q = _collect(col2, model, x, mask, flat=True)
    torch.testing.assert_close(q, g.sum(1), rtol=1e-5, atol=1e-6)
    s, i = ix.search(q, 3, projection=col2)
    assert i.shape == (4, 3)


@pytest.mark.parametrize("change", ["p", "seed", "modules", "kind", "bias"])
def test_queries_from_another_projection_are_refused(tmp_path, change):
    torch.manual_seed(2)
    model = Tiny()
    col = GradientCollector(model, p=2, seed=0)
    with GradientIndex.create(tmp_path / "ix", col.module_dims, projection=col) as w:
        w.append(_collect(col, model, torch.randn(4, 3, 6)))
    ix = GradientIndex.open(tmp_path / "ix")
    kw = {"p": 2, "seed": 0}
    if change == "p":
        kw["p"] = 3
    elif change == "seed":
        kw["seed"] = 1
    elif change == "kind":
        kw["kind"] = "gaussian"
    elif change == "bias":
        kw["bias"] = True
    else:
        kw["modules"] = ["down"]
    other = GradientCollector(model, **kw)
    q = torch.randn(2, ix.dim)
    with pytest.raises(ValueError, match="^projection: the queries were projected with"):
        ix.search(q, 2, projection=other)
    ix.search(q, 2, projection=col)  # the index's own collector is accepted


def test_dict_appends_in_another_order_and_odd_views_store_the_same_rows(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=g, dtype=torch.float64)
    views = [base[:, 1:6].float(), base[::2, :5].float(), torch.randn(1, D, generator=g).expand(3, D),
             torch.randn(D, 4, generator=g).T, base[:3, :5].to(torch.bfloat16)]
    for dt in ("fp16", "bf16", "fp32"):
        p = tmp_path / dt
        with GradientIndex.create(p, M, dtype=dt) as w:
            for v in views:
                w.append(v)
                w.append({"b": v[:, 3:], "a": v[:, :3]})  # the dict in another order than the index's
        ix = GradientIndex.open(p)
        want = torch.cat([torch.cat([v, v]) for v in views]).to(ix.dtype).float()
        assert torch.equal(ix.get(range(len(ix))), want), dt


def test_fp16_overflow_is_refused_and_counted_for_every_input_form(tmp_path):
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    x[1, 3] = 7e4      # beyond fp16's 65504
    x[2, 0] = -65519   # rounds to -65504: finite, stored
    with pytest.warns(RuntimeWarning, match=r"only after casting to float16"):
        with GradientIndex.create(tmp_path / "ix", M) as w:
            assert w.append(x).tolist() == [0, -1, 1, 2]
            # in bf16, -65519 is -65536: beyond fp16 as well
            assert w.append(x.to(torch.bfloat16)).tolist() == [3, -1, -1, 4]
            assert w.append({"a": x[:, :3].double(), "b": x[:, 3:]}).tolist() == [5, -1, 6, 7]
            with pytest.raises(NonFiniteGradientError):
                w.append(x, on_nonfinite="error")
    ix = GradientIndex.open(tmp_path / "ix")
    assert len(ix) == 8 and ix.nonfinite_rows == 4
    assert torch.isfinite(ix.get(range(8))).all() and float(ix.get(1)[0, 0]) == -65504.0


def test_resume_after_an_interrupt_equals_an_uninterrupted_build(tmp_path):
    X = torch.randn(20, D, generator=torch.Generator().manual_seed(5))
    X[7, 2] = float("inf")
    nt = [2, 3, 0, 4, 1, 5, 5]

    def build(path, interrupt):
        ids = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = GradientIndex.create(path, M, per_token=True, shard_rows=4, dtype="fp16")
            ids.append(w.append(X[:5], nt[:2]))
            if interrupt:
                w.append(X[5:9], nt[2:4], commit=False)  # pending when the process "dies"
                w._close_fds()
                w._unlock()
                del w
                w = GradientIndex.create(path, M, per_token=True, shard_rows=4, dtype="fp16", resume=True)
                assert len(w) == 5 and w.num_examples == 2
            ids.append(w.append(X[5:9], nt[2:4]))
            ids.append(w.append(X[9:], nt[4:]))
            w.close()
        return torch.cat(ids), GradientIndex.open(path)

    ia, a = build(tmp_path / "a", False)
    ib, b = build(tmp_path / "b", True)
    assert torch.equal(ia, ib) and ia.tolist()[7] == -1
    assert a.offsets.tolist() == b.offsets.tolist() == [0, 2, 5, 5, 8, 9, 14, 19]
    assert a.nonfinite_rows == b.nonfinite_rows == 1
    assert torch.equal(a.get(range(19)), b.get(range(19)))
    ha, hb = (json.loads((p / "index.json").read_text()) for p in (tmp_path / "a", tmp_path / "b"))
    assert ha == hb
    for f in sorted((tmp_path / "a" / "shards").iterdir()):
        if f.suffix == ".bin":
            assert f.read_bytes() == (tmp_path / "b" / "shards" / f.name).read_bytes()


_WRITER = r'''
import os, sys, time, torch
torch.set_num_threads(1)
from gradkit.index import GradientIndex
root = sys.argv[1]
X = torch.arange(40 * 5, dtype=torch.float32).reshape(40, 5) / 7
w = GradientIndex.create(root + "/ix", {"a": 3, "b": 2}, per_token=True, shard_rows=6)
for step in range(3):
    w.append(X[step * 10:(step + 1) * 10], [3, 0, 7])
    w.append(X[:2] * 0 + 99, [2], commit=False)   # written past the committed end, never committed
    open(root + f"/step{step}", "w").close()
    t0 = time.time()
    while not os.path.exists(root + f"/go{step}") and time.time() - t0 < 30:
        time.sleep(0.005)
    w._rollback()
w.close()
'''


def test_an_index_read_while_another_process_appends_sees_committed_rows_only(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    X = torch.arange(40 * 5, dtype=torch.float32).reshape(40, 5) / 7
    try:
        for step in range(3):
            t0 = time.time()
            while not (tmp_path / f"step{step}").exists():
                assert time.time() - t0 < 30 and p.poll() is None, "the writer died"
                time.sleep(0.005)
            with pytest.raises(IndexFormatError, match="did not complete"):
                GradientIndex.open(tmp_path / "ix")
            ix = GradientIndex.open(tmp_path / "ix", allow_incomplete=True, low_memory=True)
            n = len(ix)
            assert n == 10 * (step + 1) and ix.num_examples == 3 * (step + 1)
            assert torch.equal(ix.get(range(n)), X[:n].half().float())
            assert ix.offsets.tolist()[-3:] == [n - 7, n - 7, n]
            s, i = ix.search(X[n - 1:n], n, unit_norm=True)
            assert i.max() < n
            (tmp_path / f"go{step}").touch()
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    ix = GradientIndex.open(tmp_path / "ix")
    assert len(ix) == 30 and ix.num_examples == 9


# ============================================================================ passing: bergson layout, search


def _bergson(path, x, sizes, offsets=None):
    path.mkdir(parents=True)
    np.ascontiguousarray(x, dtype=np.float32).tofile(path / "gradients.bin")
    info = {"num_grads": int(x.shape[0]), "grad_sizes": sizes, "base_dtype": "float32"}
    if offsets is not None:
        info["attribute_tokens"] = True
        np.save(path / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (path / "info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_bergson_rows_with_nan_ties_reverse_and_k_equal_rows_match_brute_force(tmp_path, backend):
    sizes = {"m.c": 2, "m.a": 3}
    nan = float("nan")
    x = np.array([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [nan, 0, 1, 0, 0], [0, 0, 0, 0, 0], [-1, 0, 0, 0, 0],
                  [0, 0, nan, 0, 0], [2, 0, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=np.float32)
    _bergson(tmp_path / "b", x, sizes, offsets=[0, 2, 2, 5, 8])
    ix = GradientIndex.open(tmp_path / "b")
    assert ix.per_token and ix.example_of([0, 1, 2, 4, 7]).tolist() == [0, 0, 2, 2, 3]
    q = torch.tensor([[1.0, 0, 0, 0, 1], [-1.0, 0, 0, 0, 0]])
    X = torch.from_numpy(x)
    for reverse in (False, True):
        for mods, cols in ((None, None), (["m.c"], [0, 1])):
            s, i = ix.search(q, len(ix), reverse=reverse, modules=mods, backend=backend, batch_rows=3)
            want = _brute(X, q, len(ix), reverse=reverse, cols=cols)
            if backend == "torch":
                assert torch.equal(i, want), (reverse, mods)
            else:  # faiss: its own tie order; the NaN rows still last
                assert torch.equal(i[:, -1:].sort().values, want[:, -1:].sort().values)
            assert torch.isinf(s[:, -1]).all()


def test_precondition_per_module_dict_equals_the_block_diagonal_full_matrix(tmp_path):
    g = torch.Generator().manual_seed(6)
    X = torch.randn(30, D, generator=g)
    with GradientIndex.create(tmp_path / "ix", M, dtype="fp32", shard_rows=7) as w:
        w.append(X)
    ix = GradientIndex.open(tmp_path / "ix")
    Q = torch.randn(4, D, generator=g)
    Ha = (lambda a: a @ a.T + 0.5 * torch.eye(3, dtype=torch.float64))(torch.randn(3, 3, generator=g,
                                                                                  dtype=torch.float64))
    Hb = (lambda a: 1e3 * (a @ a.T) + torch.eye(2, dtype=torch.float64))(torch.randn(2, 2, generator=g,
                                                                                    dtype=torch.float64))
    full = torch.block_diag(Ha, Hb)
    for mode, unit in (("query", False), ("query", True), ("both", False)):
        for mods in (None, ["b"]):
            s1, i1 = ix.search(Q, 30, unit_norm=unit, modules=mods, batch_rows=4,
                               precondition=Precondition(full, mode=mode, damping=0.1))
            s2, i2 = ix.search(Q, 30, unit_norm=unit, modules=mods,
                               precondition=Precondition({"b": Hb, "a": Ha}, mode=mode, damping=0.1))
            torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6 * float(s1.abs().max()))
            # the float64 reference: H^-1 q . x, or cos(H^-1/2 q, H^-1/2 x) over every module
            Hd = full + 0.1 * torch.eye(D, dtype=torch.float64)
            ev, V = torch.linalg.eigh(Hd)
            P = (V * ev.pow(-1.0 if mode == "query" else -0.5)) @ V.T
            q, xk = Q.double() @ P, X.double()
            if mode == "both":
                xk = xk @ P
            if unit or mode == "both":
                q = q / q.norm(dim=1, keepdim=True)
                xk = xk / xk.norm(dim=1, keepdim=True)
            if mods is not None:
                q = q.clone()
                q[:, :3] = 0
            ref = q @ xk.T
            torch.testing.assert_close(s1.double(), ref.gather(1, i1), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
            assert (s1[:, :-1] >= s1[:, 1:]).all()

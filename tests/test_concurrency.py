"""Calls from several Python threads at once (issue 6): a serving process or threaded hooks may run gradkit's CPU
kernels concurrently. Each call must give the bits it gives alone. The kernels keep per-thread scratch (the AMX
split buffers, the widened rows, the tile configuration) and share one output pool (csrc/cpu/out_pool.h), so a
scratch made static, or a pool handing one block to two calls, shows up here as wrong bits.

Covers factored_project on every dtype and on p = 16, 32 and 64 (the AMX paths on an AMX CPU, the FMA kernels
elsewhere), flat projection, and GradientIndex.search on one open index shared by the threads.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gradkit import _ext
from gradkit.projection import factored_project, project

pytestmark = pytest.mark.skipif(not _ext.has_op("factored_project"), reason="compiled extension not built")

THREADS = 4
ROUNDS = 8


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _run_concurrently(calls, want):
    """Each worker runs every call in its own rotated order, ROUNDS times; returns the indices of calls whose
    result differed from ``want`` in any worker."""
    def work(w):
        bad = set()
        for r in range(ROUNDS):
            for j in range(len(calls)):
                k = (w * 5 + r * 3 + j) % len(calls)
                if not _same(calls[k](), want[k]):
                    bad.add(k)
        return bad

    with ThreadPoolExecutor(THREADS) as ex:
        return set().union(*ex.map(work, range(THREADS)))


def test_factored_project_from_threads_keeps_its_bits():
    gen = torch.Generator().manual_seed(31)
    calls = []
    # tiles of 16 and 32 tokens, one-token examples, a width off any multiple of 32, g wider than a, a long sequence
    shapes = ((3, 128, 1000, 1000), (40, 1, 1024, 1024), (2, 300, 200, 232))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for p in (16, 32, 64):
            for nb, T, I, O in shapes:
                a = torch.randn(nb, T, I, generator=gen).to(dt)
                g = torch.randn(nb, T, O, generator=gen).to(dt)
                calls.append(lambda a=a, g=g, p=p: factored_project(a, g, p, seed=7, name="layer"))
    want = [c() for c in calls]
    assert all(torch.isfinite(w).all() and w.abs().max() > 0 for w in want)
    assert _run_concurrently(calls, want) == set()


def test_flat_projection_from_threads_keeps_its_bits():
    gen = torch.Generator().manual_seed(32)
    calls = []
    for kind in ("rademacher", "gaussian"):
        for B, D, k in ((8, 5000, 256), (3, 70000, 64), (1, 999, 17)):
            x = torch.randn(B, D, generator=gen)
            calls.append(lambda x=x, k=k, kind=kind: project(x, k, seed=3, kind=kind))
    want = [c() for c in calls]
    assert _run_concurrently(calls, want) == set()


def test_search_of_one_index_from_threads(tmp_path):
    from gradkit.index import GradientIndex

    gen = torch.Generator().manual_seed(33)
    rows = torch.randn(3000, 48, generator=gen)
    with GradientIndex.create(tmp_path / "ix", {"a": 16, "b": 32}, dtype=torch.float32) as ix:
        ix.append(rows[:1700])
        ix.append(rows[1700:])
    ix = GradientIndex.open(tmp_path / "ix")
    qs = [torch.randn(n, 48, generator=gen) for n in (1, 7, 64)]
    calls = []
    for q in qs:
        calls.append(lambda q=q: torch.cat([t.float().reshape(len(q), -1) for t in ix.search(q, 10)], 1))
        calls.append(lambda q=q: torch.cat([t.float().reshape(len(q), -1)
                                            for t in ix.search(q, 5, unit_norm=True, reverse=True)], 1))
        calls.append(lambda q=q: torch.cat([t.float().reshape(len(q), -1)
                                            for t in ix.search(q, 3, modules=["a"])], 1))
    want = [c() for c in calls]
    # the serial answers are the exact ones (float64 scores; no ties among random rows)
    for q, w in zip(qs, want[::3]):
        exact = (q.double() @ rows.double().T).topk(10, dim=1).indices
        assert torch.equal(w[:, 10:].long(), exact)
    assert _run_concurrently(calls, want) == set()

"""gradkit.index: building (sharded, per-token, NaN policy), crash safety (interrupted builds, resume,
truncated shards, disk full), and exact search (inner product / cosine, reverse, module selection
and weights, preconditioning, streaming, faiss) against independent torch oracles."""
import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradkit.index as gi
from gradkit import ops
from gradkit.index import (GradientIndex, IndexFormatError, NonFiniteGradientError, Precondition,
                           UncheckedProjectionWarning)

# most searches here score queries that carry no projection config on purpose; the warning that says so
# is asserted in test_search_without_projection_warns_once_per_index
pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")

MODS = {"h.0.mlp": 6, "h.0.attn": 3, "h.1.mlp": 5}
D = sum(MODS.values())
PROJ = {"kind": "rademacher", "seed": 7, "p": 4}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def build(path, x, dtype=torch.float32, shard_rows=None, chunk=17, **kw):
    with GradientIndex.create(path, MODS, dtype=dtype, projection=PROJ, shard_rows=shard_rows, **kw) as ix:
        for i in range(0, x.shape[0], chunk):
            ix.append(x[i:i + chunk])
    return ix


def oracle(q, x, k, largest=True, unit_norm=False, cols=None, wcols=None):
    """Brute force on float64: (scores, indices) with ties lowest index first."""
    q, x = q.double(), x.double()
    if unit_norm:
        nq = q.norm(dim=1, keepdim=True)
        q = torch.where(nq > 0, q / nq, torch.zeros_like(q))
        nx = x.norm(dim=1, keepdim=True)
        x = torch.where(nx > 0, x / nx, torch.zeros_like(x))
    if wcols is not None:
        q = q * wcols.double()
    s = q @ x.T
    out = []
    for r in range(s.shape[0]):
        order = sorted(range(s.shape[1]), key=lambda j: ((-s[r, j] if largest else s[r, j]).item(), j))[:k]
        out.append(order)
    idx = torch.tensor(out, dtype=torch.int64)
    return s.gather(1, idx).float(), idx


def int_grads(n, seed, spread=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-spread, spread + 1, (n, D), generator=g).float()


# --------------------------------------------------------------------------- build + open + search


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_sharded_and_header(tmp_path, dtype):
    x = int_grads(103, 0)
    ix = build(tmp_path / "ix", x, dtype=dtype, shard_rows=20)
    assert len(ix) == 103 and ix.dtype == dtype
    ix = GradientIndex.open(tmp_path / "ix")
    assert len(ix) == 103 and list(ix.modules.items()) == list(MODS.items()) and ix.dim == D
    assert ix.projection == PROJ and ix.dtype == dtype and ix.layout == "gradkit" and not ix.per_token
    assert torch.equal(ix.get(range(103)), x)
    assert torch.equal(ix.get([-1, -103, 5]), x[[102, 0, 5]])  # negative rows count from the end
    for bad in ([103], [-104]):
        with pytest.raises(IndexError, match=r"rows: out of range for an index of 103 rows \(valid: -103 \.\. 102\)"):
            ix.get(bad)
    h = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert h["complete"] and h["count"] == 103 and len(h["shards"]) == 6
    assert all(s["rows"] <= 20 for s in h["shards"])
    # dict input, same rows
    with GradientIndex.create(tmp_path / "d", MODS, dtype=dtype) as ix2:
        parts, lo = {}, 0
        for n_, d_ in MODS.items():
            parts[n_] = x[:, lo:lo + d_]
            lo += d_
        ix2.append(parts)
    assert torch.equal(GradientIndex.open(tmp_path / "d").get(range(103)), x)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 12), st.booleans(), st.booleans(), st.integers(1, 40),
       st.sampled_from([None, ["h.0.attn"], ["h.0.mlp", "h.1.mlp"]]), st.booleans())
def test_search_matches_oracle(tmp_path_factory, seed, k, reverse, unit_norm, batch_rows, modules, weighted):
    tmp = tmp_path_factory.mktemp("s")
    x = int_grads(61, seed)
    q = int_grads(5, seed + 1)
    ix = build(tmp / "ix", x, shard_rows=23)
    weights = None
    wcols = torch.zeros(D)
    sel = modules or list(MODS)
    lo = 0
    for n_, d_ in MODS.items():
        if n_ in sel:
            w = (2.0 if n_ == sel[0] else 1.0) if weighted else 1.0
            wcols[lo:lo + d_] = w
        lo += d_
    if weighted:
        weights = {sel[0]: 2.0}
    s, i = ix.search(q, k, unit_norm=unit_norm, reverse=reverse, modules=modules, weights=weights,
                     batch_rows=batch_rows)
    so, io = oracle(q, x, k, largest=not reverse, unit_norm=unit_norm, wcols=wcols)
    if unit_norm:  # cosine scores are rounded: the rows returned must carry the oracle's top-k scores
        torch.testing.assert_close(s, so, rtol=1e-5, atol=1e-5)
        qd = q.double() / (q.double().norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps) * wcols.double()
        nx = x.double().norm(dim=1, keepdim=True)
        full = qd @ torch.where(nx > 0, x.double() / nx, torch.zeros_like(x.double())).T
        torch.testing.assert_close(full.gather(1, i).float(), so, rtol=1e-5, atol=1e-5)
        assert all(len(set(r)) == k for r in i.tolist())
    else:
        assert torch.equal(s, so) and torch.equal(i, io)


def test_streaming_bounded_blocks_and_same_result(tmp_path, monkeypatch):
    """A small batch_rows streams the memory-mapped shards block by block (bounded memory) and
    gives exactly the one-block result."""
    x = int_grads(500, 3)
    q = int_grads(7, 4)
    ix = build(tmp_path / "ix", x, dtype=torch.float16, shard_rows=128, chunk=100)
    whole = ix.search(q, 9, batch_rows=10_000)
    seen = []
    real = ops.score_topk

    def spy(queries, keys, k, **kw):
        seen.append(keys.shape[0])
        return real(queries, keys, k, **kw)

    monkeypatch.setattr(gi.ops, "score_topk", spy)
    part = ix.search(q, 9, batch_rows=16)
    assert max(seen) <= 16 and sum(seen) == 500 and len(seen) >= 500 // 16
    assert torch.equal(part[0], whole[0]) and torch.equal(part[1], whole[1])


def test_self_retrieval_top1(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, D, generator=g)
    ix = build(tmp_path / "ix", x, dtype=torch.float16)
    for scale in (1.0, 50.0):  # cosine: the example itself is its nearest neighbour, whatever the scale
        s, i = ix.search(x[:40] * scale, 1, unit_norm=True)
        assert torch.equal(i[:, 0], torch.arange(40))
        # fp16 rows: rounding moves a row's direction only to second order (~2^-22); fp32 dot and norms add a few
        # ulps of 1. Measured 3.0e-7 (the old atol 2e-3 passed a cosine of 0.998)
        torch.testing.assert_close(s[:, 0], torch.ones(40), rtol=0, atol=1e-5)


def test_queries_dict_batch_shape_and_device_forms(tmp_path):
    x = int_grads(30, 6)
    ix = build(tmp_path / "ix", x)
    q = int_grads(6, 7).reshape(2, 3, D)
    s, i = ix.search(q, 4)
    assert s.shape == (2, 3, 4) and i.shape == (2, 3, 4) and s.dtype == torch.float32 and i.dtype == torch.int64
    parts, lo = {}, 0
    for n_, d_ in MODS.items():
        parts[n_] = q[..., lo:lo + d_]
        lo += d_
    s2, i2 = ix.search(parts, 4)
    assert torch.equal(s, s2) and torch.equal(i, i2)


def test_preconditioning_query_and_both(tmp_path):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(80, D, generator=g)
    q = torch.randn(4, D, generator=g)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    H = a @ a.T + 0.5 * torch.eye(D, dtype=torch.float64)
    ix = build(tmp_path / "ix", x)
    ev, V = torch.linalg.eigh(H)
    s, i = ix.search(q, 5, precondition=H.float())
    want = (q.double() @ (V * (1 / ev)) @ V.T) @ x.double().T
    torch.testing.assert_close(s.double(), want.gather(1, i), rtol=1e-4, atol=1e-4)
    assert torch.equal(i, want.topk(5).indices)
    # both sides: cos(H^-1/2 q, H^-1/2 x)
    Hm = (V * ev.rsqrt()) @ V.T
    qa, xa = q.double() @ Hm, x.double() @ Hm
    cos = (qa / qa.norm(dim=1, keepdim=True)) @ (xa / xa.norm(dim=1, keepdim=True)).T
    s, i = ix.search(q, 5, precondition=Precondition(H.float(), mode="both"), batch_rows=13)
    assert torch.equal(i, cos.topk(5).indices)
    torch.testing.assert_close(s.double(), cos.topk(5).values, rtol=1e-4, atol=1e-5)
    # per-module (block diagonal): module left out = identity
    Hb = {"h.0.attn": H[:3, :3].float() + torch.eye(3)}
    s, i = ix.search(q, 5, precondition=Hb)
    M = torch.eye(D, dtype=torch.float64)
    M[6:9, 6:9] = torch.linalg.inv(H[:3, :3] + torch.eye(3, dtype=torch.float64))
    assert torch.equal(i, (q.double() @ M @ x.double().T).topk(5).indices)
    with pytest.raises(ValueError, match=r"precondition: matrix for the full matrix is not positive definite "
                                         r"\(smallest eigenvalue -1 after damping=0\.0\); pass damping > 0"):
        ix.search(q, 5, precondition=-torch.eye(D))
    with pytest.raises(ValueError, match=r"^mode: expected one of \('query', 'both'\), got 'two'$"):
        Precondition(torch.eye(D), mode="two")
    with pytest.raises(ValueError, match=rf"^precondition: matrix is {D + 1} x {D + 1} but the index has {D} dims$"):
        ix.search(q, 5, precondition=torch.eye(D + 1))


def _has_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _cos64(a, b):
    """float64 cosine matrix (rows of norm 0 score 0)."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    a = torch.where(na > 0, a / na, torch.zeros_like(a))
    b = torch.where(nb > 0, b / nb, torch.zeros_like(b))
    return a @ b.T


def test_cosine_invariant_to_query_and_preconditioner_scale(tmp_path):
    """Cosine scores do not depend on the scale of the query or of the preconditioner H: the query is divided by
    its exact norm (no epsilon that dominates a small norm)."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(60, D, generator=g)
    q = torch.randn(3, D, generator=g)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    H = (a @ a.T / D + 0.5 * torch.eye(D, dtype=torch.float64)).float()
    ev, V = torch.linalg.eigh(H.double())
    Hinv, Hmh = (V * (1 / ev)) @ V.T, (V * ev.rsqrt()) @ V.T
    ix = build(tmp_path / "ix", x)
    refs = {None: _cos64(q, x), "query": _cos64(q.double() @ Hinv, x),
            "both": _cos64(q.double() @ Hmh, x.double() @ Hmh)}
    for s_ in (1e-12, 1e-7, 1.0, 1e7):
        for c in (1.0, 1e7):
            for mode in (None, "query", "both"):
                if mode is None and c != 1.0:
                    continue
                pre = None if mode is None else Precondition(H * c, mode=mode)
                backends = ("torch", "faiss") if mode is None and _has_faiss() else ("torch",)
                for be in backends:
                    s, i = ix.search(q * s_, 6, unit_norm=True, precondition=pre, backend=be)
                    want = refs[mode].topk(6)
                    assert torch.equal(i, want.indices), (s_, c, mode, be)
                    torch.testing.assert_close(s.double(), want.values, rtol=0, atol=1e-6, msg=f"{s_} {c} {mode} {be}")
    # a zero query still scores 0 everywhere (no NaN)
    s, _ = ix.search(torch.zeros(1, D), 3, unit_norm=True)
    assert torch.equal(s, torch.zeros(1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_rows_with_tiny_and_huge_norms(tmp_path, dtype):
    """A row whose entries square below (1e-30) or above (1e25) fp32's range keeps its direction: it is its own
    top-1 with cosine 1, and its score against other queries is the float64 cosine."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(40, D, generator=g)
    x[3] *= 1e-30
    x[7] *= 1e25
    x[11] *= 1e-20  # squares partly subnormal
    x[5] = 0.0
    ix = build(tmp_path / "ix", x, dtype=dtype)
    xs = ix.get(range(40))  # the stored values
    assert (xs[3] != 0).any() and torch.isfinite(xs[7]).all()
    rows = torch.tensor([3, 7, 11, 0])
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    H = (a @ a.T / D + torch.eye(D, dtype=torch.float64)).float()
    for pre in (None, Precondition(H, mode="both")):
        backends = ("torch", "faiss") if pre is None and _has_faiss() else ("torch",)
        for be in backends:
            s, i = ix.search(xs[rows], 1, unit_norm=True, precondition=pre, backend=be)
            assert torch.equal(i[:, 0], rows), (pre, be)
            torch.testing.assert_close(s[:, 0], torch.ones(4), rtol=0, atol=1e-6)
    q = torch.randn(4, D, generator=g)
    for be in ("torch", "faiss") if _has_faiss() else ("torch",):
        s, i = ix.search(q, 40, unit_norm=True, backend=be)
        want = _cos64(q, xs)
        torch.testing.assert_close(s.double(), want.gather(1, i), rtol=0, atol=1e-6)
        assert torch.equal(s, s.sort(dim=1, descending=True).values)
        assert torch.equal(i.sort(dim=1).values, torch.arange(40).expand(4, 40))


def test_faiss_backend_matches(tmp_path):
    import faiss  # noqa: F401  (installed wherever the suite runs: scripts/install-peers.sh; never skipped)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(400, D, generator=g)
    q = torch.randn(6, D, generator=g)
    ix = build(tmp_path / "ix", x)
    for kw in ({}, {"reverse": True}, {"unit_norm": True}):
        a = ix.search(q, 7, batch_rows=64, **kw)
        b = ix.search(q, 7, batch_rows=64, backend="faiss", **kw)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)


def test_per_token_offsets_and_nonfinite(tmp_path):
    x = int_grads(12, 10)
    x[4, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        with GradientIndex.create(tmp_path / "ix", MODS, per_token=True, shard_rows=4) as ix:
            ix.append(x[:7], num_tokens=[3, 0, 4])
            rows = ix.append(x[7:], num_tokens=torch.tensor([5]))
    assert rows.tolist() == [6, 7, 8, 9, 10]
    ix = GradientIndex.open(tmp_path / "ix")
    assert ix.per_token and len(ix) == 11 and ix.num_examples == 4 and ix.nonfinite_rows == 1
    assert ix.offsets.tolist() == [0, 3, 3, 6, 11]
    assert ix.example_of([0, 2, 3, 5, 6, 10]).tolist() == [0, 0, 2, 2, 3, 3]
    keep = torch.cat([x[:4], x[5:]])
    assert torch.equal(ix.get(range(11)), keep)
    with pytest.raises(ValueError, match=r"^num_tokens: counts sum to 2 but grads has 3 rows$"):
        with GradientIndex.create(tmp_path / "b", MODS, per_token=True) as ix2:
            ix2.append(x[:3], num_tokens=[1, 1])


# --------------------------------------------------------------------------- bad input


def test_nonfinite_policies(tmp_path):
    x = int_grads(10, 11)
    x[2, 1] = float("inf")
    x[5, 0] = 1e6  # finite in fp32, overflows fp16
    ix = GradientIndex.create(tmp_path / "ix", MODS, dtype=torch.float16)
    with pytest.raises(NonFiniteGradientError, match=r"2 of 10 rows.*nothing of this chunk"):
        ix.append(x, on_nonfinite="error")
    assert len(ix) == 0 and ix.nonfinite_rows == 0
    with pytest.warns(RuntimeWarning, match=r"2 of 10 rows hold NaN or Inf \(1 only after casting to float16\)"):
        rows = ix.append(x)
    assert rows.tolist() == [0, 1, -1, 2, 3, -1, 4, 5, 6, 7] and ix.nonfinite_rows == 2
    ix.close()
    ix = GradientIndex.open(tmp_path / "ix")
    assert len(ix) == 8 and ix.nonfinite_rows == 2
    assert torch.isfinite(ix.get(range(8))).all()
    with pytest.raises(ValueError, match=r"^on_nonfinite: expected one of \('skip', 'error'\), got 'ignore'$"):
        GradientIndex.create(tmp_path / "z", MODS, on_nonfinite="ignore")


def test_search_refusals(tmp_path):
    x = int_grads(20, 12)
    ix = build(tmp_path / "ix", x)
    q = int_grads(2, 13)
    with pytest.raises(ValueError, match="k: 21 is larger than the index"):
        ix.search(q, 21)
    with pytest.raises(ValueError, match=r"^k: must be >= 1, got 0$"):
        ix.search(q, 0)
    # (configs keep their keys' order since session 39: a collector's modules are its flat rows' column order)
    with pytest.raises(ValueError, match=r"^projection: the queries were projected with \{'kind': 'rademacher', "
                                         r"'seed': 8, 'p': 4\} but the index with \{'kind': 'rademacher', 'seed': 7, "
                                         r"'p': 4\}; scores across different projections are meaningless$"):
        ix.search(q, 3, projection={**PROJ, "seed": 8})
    with pytest.raises(ValueError, match=r"^projection: the queries were projected with \{'kind': 'gaussian', 'seed': 7, "
                                         r"'p': 4\} but the index with \{'kind': 'rademacher'"):
        ix.search(q, 3, projection={"kind": "gaussian", "seed": 7, "p": 4})
    ix.search(q, 3, projection=dict(PROJ))  # the same config is accepted
    with pytest.raises(ValueError, match=rf"^queries: expected shape \(\.\.\., {D}\) .*got \(2, {D + 1}\)$"):
        ix.search(torch.zeros(2, D + 1), 3)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 14\) \(the index's dim: every module "
                                         r"\['h.0.mlp', 'h.0.attn', 'h.1.mlp'\] in that order, also when modules="):
        ix.search(torch.zeros(2, 6), 3, modules=["h.0.mlp"])  # only the selected module's columns
    with pytest.raises(ValueError, match=r"^queries: module set differs from the index's: missing \['h\.0\.attn', "
                                         r"'h\.1\.mlp'\], unknown \[\]$"):
        ix.search({"h.0.mlp": torch.zeros(1, 6)}, 3)
    with pytest.raises(ValueError, match=r"^queries\['h\.0\.attn'\]: expected shape \(\.\.\., 3\), got \(1, 4\)$"):
        ix.search({"h.0.mlp": torch.zeros(1, 6), "h.0.attn": torch.zeros(1, 4), "h.1.mlp": torch.zeros(1, 5)}, 3)
    with pytest.raises(ValueError, match=r"^modules: the index has no modules \['nope'\]"):
        ix.search(q, 3, modules=["nope"])
    with pytest.raises(ValueError, match=r"^weights: module 'h\.1\.mlp' is not among the selected modules$"):
        ix.search(q, 3, modules=["h.0.mlp"], weights={"h.1.mlp": 2.0})
    bad = q.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^queries: rows \[1\] hold NaN or Inf$"):
        ix.search(bad, 3)
    # an empty batch of queries: empty results of the usual shape, after the same checks as any other batch
    s, i = ix.search(torch.zeros(0, D), 3)
    assert s.shape == i.shape == (0, 3) and s.dtype == torch.float32 and i.dtype == torch.int64
    s, i = ix.search({m: torch.zeros(2, 0, d) for m, d in MODS.items()}, 4)
    assert s.shape == i.shape == (2, 0, 4)
    with pytest.raises(ValueError, match="k: 21 is larger than the index"):
        ix.search(torch.zeros(0, D), 21)
    with pytest.raises(ValueError, match=r"^backend: expected one of \('auto', 'torch', 'faiss'\), got 'annoy'$"):
        ix.search(q, 3, backend="annoy")
    with pytest.raises(TypeError, match=r"^batch_rows: expected an int, got float$"):
        ix.search(q, 3, batch_rows=2.5)


def test_search_without_projection_warns_once_per_index(tmp_path):
    x = int_grads(20, 30)
    q = int_grads(3, 31)
    build(tmp_path / "ix", x)
    ix = GradientIndex.open(tmp_path / "ix")
    with pytest.warns(UncheckedProjectionWarning, match=r"^search: the index at .*ix records the projection .*passed "
                                                        r"no projection=, so the queries' projection could not be "
                                                        r"checked.*pass projection=") as rec:
        plain = ix.search(q, 4)
    assert len(rec) == 1 and issubclass(rec[0].category, UserWarning)
    assert rec[0].filename == __file__  # attributed to the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ix.search(q, 4)  # once per index object
        checked = ix.search(q, 4, projection=dict(PROJ))  # a checked call never warns
        with GradientIndex.create(tmp_path / "np", MODS) as ix2:  # without a projection there is nothing to check
            ix2.append(x)
        GradientIndex.open(tmp_path / "np").search(q, 1)
    for a in (again, checked):
        assert torch.equal(a[0], plain[0]) and torch.equal(a[1], plain[1])
    with pytest.warns(UncheckedProjectionWarning):  # a fresh index object warns again
        GradientIndex.open(tmp_path / "ix").search(q, 4)


def test_search_projection_from_collector(tmp_path):
    """projection= also takes the GradientCollector that made the queries (its projection_config)."""
    from gradkit.projection import GradientCollector

    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    col = GradientCollector(model, modules=["0", "2"], p=2, seed=11)
    g = torch.Generator().manual_seed(32)
    x = torch.randn(25, col.dim, generator=g)
    q = torch.randn(4, col.dim, generator=g)
    with GradientIndex.create(tmp_path / "ix", col.module_dims, dtype=torch.float32, projection=col) as ix:
        ix.append(x)
    ix = GradientIndex.open(tmp_path / "ix")
    assert ix.projection == json.loads(json.dumps(col.projection_config))  # create took the collector's config
    with pytest.warns(UserWarning, match="projection could not be checked"):
        before = ix.search(q, 5, unit_norm=True)
    same = GradientCollector(model, modules=["0", "2"], p=2, seed=11)
    for proj in (col, same, col.projection_config):
        got = ix.search(q, 5, unit_norm=True, projection=proj)
        assert torch.equal(got[0], before[0]) and torch.equal(got[1], before[1])
    for kw, what in (({"seed": 12}, "'seed': 12"), ({"p": 3}, "'p': 3")):
        other = GradientCollector(model, modules=["0", "2"], **{"p": 2, "seed": 11, **kw})
        with pytest.raises(ValueError, match=rf"^projection: the queries were projected with \{{.*{what}.*\}} but the "
                                             r"index with \{.*; scores across different projections are meaningless$"):
            ix.search(q, 5, projection=other)
    with pytest.raises(TypeError, match=r"^projection: expected a dict .*GradientCollector.*got Sequential$"):
        ix.search(q, 5, projection=model)


def test_append_and_create_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"^modules: expected at least one module$"):
        GradientIndex.create(tmp_path / "a", {})
    with pytest.raises(ValueError, match=r"^modules\['m'\]: dim must be a positive int, got 0$"):
        GradientIndex.create(tmp_path / "a", {"m": 0})
    with pytest.raises(TypeError, match=r"^dtype: expected torch\.float16, torch\.bfloat16 or torch\.float32, "
                                        r"got torch\.int8$"):
        GradientIndex.create(tmp_path / "a", MODS, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"^shard_rows: must be >= 1, got 0$"):
        GradientIndex.create(tmp_path / "a", MODS, shard_rows=0)
    with pytest.raises(TypeError, match=r"^projection: expected a dict .*got str$"):
        GradientIndex.create(tmp_path / "a", MODS, projection="seed=1")
    ix = GradientIndex.create(tmp_path / "b", MODS)
    with pytest.raises(ValueError, match=rf"^grads: expected shape \(n, {D}\) .*got \(3, {D - 1}\)$"):
        ix.append(torch.zeros(3, D - 1))
    with pytest.raises(ValueError, match=r"^grads: module set differs from the index's: missing \['h\.0\.attn', "
                                         r"'h\.1\.mlp'\], unknown \[\]$"):
        ix.append({"h.0.mlp": torch.zeros(3, 6)})
    with pytest.raises(ValueError, match=r"^num_tokens: only for per-token indexes"):
        ix.append(torch.zeros(3, D), num_tokens=[3])
    with pytest.raises(RuntimeError, match=r"^search: the index is still being built"):
        ix.search(torch.zeros(1, D), 1)
    ix.append(torch.zeros(3, D))
    ix.close()
    with pytest.raises(FileExistsError, match=r"^path: .*b already holds a gradkit index; pass resume=True"):
        GradientIndex.create(tmp_path / "b", MODS)
    with pytest.raises(ValueError, match=r"^resume: the index at .*b was built with different settings: modules "):
        GradientIndex.create(tmp_path / "b", {"x": 3}, resume=True)
    with GradientIndex.create(tmp_path / "b", MODS, overwrite=True) as ix:
        ix.append(torch.ones(2, D))
    assert len(GradientIndex.open(tmp_path / "b")) == 2


# --------------------------------------------------------------------------- crash safety


def test_interrupted_build_never_opens_and_resumes(tmp_path):
    x = int_grads(50, 14)
    ix = GradientIndex.create(tmp_path / "ix", MODS, dtype=torch.bfloat16, shard_rows=8, projection=PROJ)
    ix.append(x[:20])
    ix.append(x[20:30], commit=False)  # written, never committed
    del ix  # "crash": no close()
    with pytest.raises(IndexFormatError,
                       match=r"^open: the build of .*ix did not complete \(20 rows committed.*resume=True"):
        GradientIndex.open(tmp_path / "ix")
    part = GradientIndex.open(tmp_path / "ix", allow_incomplete=True)
    assert len(part) == 20 and torch.equal(part.get(range(20)), x[:20])
    with GradientIndex.create(tmp_path / "ix", MODS, dtype=torch.bfloat16, shard_rows=8, projection=PROJ,
                              resume=True) as ix:
        assert len(ix) == 20
        ix.append(x[20:])
    ix = GradientIndex.open(tmp_path / "ix")
    assert len(ix) == 50 and torch.equal(ix.get(range(50)), x)
    assert sorted(p.name for p in (tmp_path / "ix" / "shards").iterdir()) == [f"r00000-{i:06d}.bin" for i in range(7)]


def test_directory_without_header_and_truncated_shard(tmp_path):
    x = int_grads(30, 15)
    build(tmp_path / "ix", x, shard_rows=10)
    (tmp_path / "ix" / "index.json").unlink()
    with pytest.raises(IndexFormatError, match=r"^path: .*ix holds no committed index header.*never committed"):
        GradientIndex.open(tmp_path / "ix")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match=r"^path: .*empty holds no committed index header"):
        GradientIndex.open(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"^path: .*missing does not exist$"):
        GradientIndex.open(tmp_path / "missing")
    # a leftover directory without a header is discarded by a new build
    build(tmp_path / "ix", x[:5])
    assert len(GradientIndex.open(tmp_path / "ix")) == 5
    build(tmp_path / "t", x, shard_rows=10)
    f = tmp_path / "t" / "shards" / "r00000-000001.bin"
    os.truncate(f, f.stat().st_size - 1)
    with pytest.raises(IndexFormatError, match=r"^open: shard .*r00000-000001\.bin is truncated: "):
        GradientIndex.open(tmp_path / "t")
    (tmp_path / "t" / "index.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match=r"^open: .*index\.json is not valid JSON"):
        GradientIndex.open(tmp_path / "t")


def test_disk_full_during_build(tmp_path, monkeypatch):
    x = int_grads(40, 16)
    ix = GradientIndex.create(tmp_path / "ix", MODS, shard_rows=16)
    ix.append(x[:20])
    real = gi._write_all

    def full(fd, data):  # half the bytes land, then the disk is full
        mv = memoryview(data).cast("B")
        real(fd, mv[:len(mv) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gi, "_write_all", full)
    with pytest.raises(OSError, match="No space left on device.*20 committed rows.*resume=True") as e:
        ix.append(x[20:])
    assert e.value.errno == errno.ENOSPC
    assert len(ix) == 20
    # nothing corrupt is visible: the build is incomplete, its committed rows intact, files trimmed
    with pytest.raises(IndexFormatError, match=r"^open: the build of .*ix did not complete \(20 rows committed"):
        GradientIndex.open(tmp_path / "ix")
    part = GradientIndex.open(tmp_path / "ix", allow_incomplete=True)
    assert torch.equal(part.get(range(20)), x[:20])
    sizes = sorted(p.stat().st_size for p in (tmp_path / "ix" / "shards").iterdir())
    assert sizes == [4 * 2 * D, 16 * 2 * D]  # float16 rows
    monkeypatch.setattr(gi, "_write_all", real)
    ix.append(x[20:])  # space freed: the same writer continues
    ix.close()
    assert torch.equal(GradientIndex.open(tmp_path / "ix").get(range(40)), x)
    # disk full while writing the very first header: no index becomes visible
    monkeypatch.setattr(gi, "_write_all", full)
    with pytest.raises(OSError, match="No space left on device"):
        GradientIndex.create(tmp_path / "new", MODS)
    monkeypatch.setattr(gi, "_write_all", real)
    with pytest.raises(IndexFormatError, match=r"^path: .*new holds no committed index header"):
        GradientIndex.open(tmp_path / "new")


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_disk_full_during_commit(tmp_path, monkeypatch, fail_in):
    """A commit that fails (data fsync, or the header's os.replace) raises ONE OSError that names the index
    and what it holds; nothing of the failed chunk is visible on disk and the same writer can go on."""
    x = int_grads(40, 33)
    path = tmp_path / "ix"
    ix = GradientIndex.create(path, MODS, shard_rows=16, projection=PROJ)
    ix.append(x[:20])
    ix.append(x[20:25], commit=False)  # pending rows: discarded with the failed chunk
    header_before = (path / "index.json").read_bytes()
    real = getattr(os, fail_in)

    def enospc(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fail_in, enospc)
    with pytest.raises(OSError) as e:
        ix.append(x[25:])
    monkeypatch.setattr(os, fail_in, real)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert msg.startswith(f"[Errno {errno.ENOSPC}] gradkit.index: committing {path} failed (No space left on device); ")
    assert "the index still holds its 20 committed rows and is not marked complete" in msg
    assert "resume=True" in msg
    for once in ("No space left on device", "gradkit.index", str(path), "committed rows", "[Errno"):
        assert msg.count(once) == 1, (once, msg)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.__cause__ is None
    assert len(ix) == 20
    # on disk: the previous header, the previous rows, nothing of the failed chunk
    assert (path / "index.json").read_bytes() == header_before
    assert not (path / "index.json.tmp").exists()
    with pytest.raises(IndexFormatError, match=r"^open: the build of .*ix did not complete \(20 rows committed"):
        GradientIndex.open(path)
    part = GradientIndex.open(path, allow_incomplete=True)
    assert len(part) == 20 and torch.equal(part.get(range(20)), x[:20])
    assert sorted(p.stat().st_size for p in (path / "shards").glob("*.bin")) == [4 * 2 * D, 16 * 2 * D]  # float16 rows
    # space freed: the same writer continues from its 20 committed rows
    ix.append(x[20:])
    ix.close()
    assert torch.equal(GradientIndex.open(path).get(range(40)), x)


def test_hard_crash_mid_build_in_subprocess(tmp_path):
    """A process killed (os._exit) between writing rows and committing them leaves an index that
    does not open; resume continues after the last committed row."""
    root = Path(__file__).resolve().parents[1] / "python"
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(root)!r})
        from gradkit.index import GradientIndex
        x = torch.arange(60 * {D}, dtype=torch.float32).reshape(60, {D})
        ix = GradientIndex.create({str(tmp_path / 'ix')!r}, {MODS!r}, shard_rows=7)
        ix.append(x[:25])
        ix.append(x[25:40], commit=False)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with pytest.raises(IndexFormatError, match=r"^open: the build of .*ix did not complete \(25 rows committed"):
        GradientIndex.open(tmp_path / "ix")
    x = torch.arange(60 * D, dtype=torch.float32).reshape(60, D)
    with GradientIndex.create(tmp_path / "ix", MODS, shard_rows=7, resume=True) as ix:
        assert len(ix) == 25
        ix.append(x[25:])
    assert torch.equal(GradientIndex.open(tmp_path / "ix").get(range(60)), x)


def test_raw_shard_layout_is_plain_row_major(tmp_path):
    x = int_grads(9, 17)
    build(tmp_path / "ix", x, dtype=torch.float16)
    raw = np.fromfile(tmp_path / "ix" / "shards" / "r00000-000000.bin", dtype="<f2").reshape(9, D)
    assert np.array_equal(raw.astype(np.float32), x.numpy())


def test_low_memory_search_keeps_resident_set_small(tmp_path):
    """Streaming from the memory map with low_memory=True: the process's peak resident set grows by
    at most about one block while a 48 MiB index is searched, whereas a plain search leaves the
    whole mapping resident; both give the same result."""
    root = Path(__file__).resolve().parents[1] / "python"
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(root)!r})
        from gradkit.index import GradientIndex
        g = torch.Generator().manual_seed(0)
        with GradientIndex.create({str(tmp_path / 'ix')!r}, {{"m": 256}}, dtype=torch.float32, shard_rows=20000) as ix:
            for _ in range(6):
                ix.append(torch.randn(8192, 256, generator=g))
        q = torch.randn(4, 256, generator=g)
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
        def now():
            return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
        small = GradientIndex.open({str(tmp_path / 'ix')!r}, low_memory=True)
        small.search(q, 3, batch_rows=2048)  # warm-up: kernels, allocator
        p0 = peak()
        a = small.search(q, 5, batch_rows=2048)
        p1 = peak()
        big = GradientIndex.open({str(tmp_path / 'ix')!r})
        r0 = now()
        b = big.search(q, 5, batch_rows=2048)
        r1 = now()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        print(p1 - p0, r1 - r0)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, timeout=120, capture_output=True, text=True)
    grow_low, grow_plain = map(float, out.stdout.split()[-2:])
    assert grow_low < 12, out.stdout  # ~2 MiB block + scratch, far below the 48 MiB index
    assert grow_plain > 36, out.stdout  # the plain mapping keeps what it touched resident


# --------------------------------------------------------------------------- row arguments, writer state, one writer


def test_get_and_example_of_take_masks_and_refuse_fractional_rows(tmp_path):
    """A boolean mask selects rows as in numpy (it was read as row numbers 0/1); float row numbers are refused
    (2.9 was truncated to row 2); example_of checks the range and counts negative rows from the end, as get does."""
    x = int_grads(10, 40)
    build(tmp_path / "ix", x, shard_rows=4)
    ix = GradientIndex.open(tmp_path / "ix")
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[7, 8]] = True
    assert torch.equal(ix.get(mask), x[[7, 8]])
    assert torch.equal(ix.get(mask.numpy()), x[[7, 8]])
    assert torch.equal(ix.get([True] * 10), x)
    assert ix.example_of(mask).tolist() == [7, 8]
    assert ix.example_of([-1, 0, -10]).tolist() == [9, 0, 0]
    assert ix.example_of(3).shape == () and ix.get([]).shape == (0, D)
    for f in (ix.get, ix.example_of):
        for bad in (mask[:9], torch.ones(2, 10, dtype=torch.bool), True):
            with pytest.raises(IndexError, match=r"^rows: a boolean mask must be 1-D with one entry per row \(10\), "
                                                 r"got shape \((9,|2, 10|)\)$"):
                f(bad)
        for bad, dt in (([2.9], "float32"), (np.array([2.0]), "float64"), (torch.tensor([1.0]), "float32"),
                        ([1, 2.5], "float32"), (np.array([1j]), "complex128")):
            with pytest.raises(TypeError, match=rf"^rows: expected integer row numbers or a boolean mask, got "
                                                rf"torch\.{dt} values$"):
                f(bad)
        with pytest.raises(TypeError, match=r"^rows: expected row numbers \(an int, or a sequence, array or tensor "
                                            r"of ints\) or a boolean mask, got slice$"):
            f(slice(0, 3))
        for bad in ([10], [-11], [0, 99], np.array([2**63 + 1], dtype=np.uint64)):
            with pytest.raises(IndexError, match=r"^rows: out of range for an index of 10 rows \(valid: -10 \.\. 9\)$"):
                f(bad)


def test_example_of_per_token_ranges_and_writer_refusal(tmp_path):
    """On a per-token writer example_of returned row numbers and offsets None (neither knows the examples
    there): both are refused like every read; on the reader rows are range-checked and negatives wrap."""
    x = int_grads(7, 41)
    ix = GradientIndex.create(tmp_path / "ix", MODS, per_token=True)
    ids = ix.append(x, num_tokens=[3, 4])
    for what, call in (("example_of", lambda: ix.example_of(ids)), ("offsets", lambda: ix.offsets)):
        with pytest.raises(RuntimeError, match=rf"^{what}: the index is still being built; close\(\) it first$"):
            call()
    assert ix.num_examples == 2 and len(ix) == 7
    ix.close()
    assert ix.offsets.tolist() == [0, 3, 7]
    assert ix.example_of(ids).tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert ix.example_of([-1, -7, -4]).tolist() == [1, 0, 1]
    assert ix.example_of(torch.tensor([[2, 3]])).tolist() == [[0, 1]]
    for bad in ([-8], [7], [-1, 99]):
        with pytest.raises(IndexError, match=r"^rows: out of range for an index of 7 rows \(valid: -7 \.\. 6\)$"):
            ix.example_of(bad)


@pytest.mark.parametrize("per_token", [False, True])
def test_aborted_build_reports_committed_state(tmp_path, per_token):
    """len(), num_examples and repr() of a writer whose `with` block raised report the committed rows
    (they raised AttributeError); reads stay refused."""
    x = int_grads(10, 42)
    kw = {"num_tokens": [2, 2]} if per_token else {}
    with pytest.raises(KeyError):
        with GradientIndex.create(tmp_path / "ix", MODS, dtype=torch.float16, per_token=per_token) as ix:
            ix.append(x[:4], **kw)
            ix.append(x[4:], commit=False, **({"num_tokens": [6]} if per_token else {}))
            raise KeyError("boom")
    assert len(ix) == 4 and ix.num_examples == (2 if per_token else 4)
    assert re.fullmatch(rf"GradientIndex\('.*ix', layout=gradkit, rows=4, dim={D}, dtype=torch\.float16, "
                        rf"modules=3, per_token={per_token}, aborted\)", repr(ix))
    for what, call in (("get", lambda: ix.get([0])), ("offsets", lambda: ix.offsets),
                       ("example_of", lambda: ix.example_of([0]))):
        with pytest.raises(RuntimeError, match=rf"^{what}: the build was aborted; reopen with GradientIndex\.open "
                                               r"\(allow_incomplete=True\) or resume it$"):
            call()
    part = GradientIndex.open(tmp_path / "ix", allow_incomplete=True)
    assert len(part) == 4 and torch.equal(part.get(range(4)), x[:4])


def _bergson_shards(root, n=2):
    for k in range(n):
        d = root / f"shard-{k:05d}"
        d.mkdir(parents=True)
        (d / "info.json").write_text(json.dumps({"num_grads": 3, "grad_sizes": {"a": 2}, "base_dtype": "float32"}))
        np.arange(6, dtype=np.float32).tofile(d / "gradients.bin")


def test_create_refuses_a_sharded_bergson_index(tmp_path):
    """create() took over a directory of bergson shard-* sub-directories (only a top-level info.json was
    refused); now refused the way open() detects it, overwrite=True included, leaving it untouched."""
    root = tmp_path / "bs"
    _bergson_shards(root)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(FileExistsError, match=rf"^path: {re.escape(str(root))} holds a bergson index \(2 shard "
                                                  r"directories with info\.json, e\.g\. shard-00000\); choose another "
                                                  r"directory$"):
            GradientIndex.create(root, {"z": 7}, **kw)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # no header, lock or shards/ added
    ix = GradientIndex.open(root)
    assert ix.layout == "bergson" and len(ix) == 6


def test_one_writer_at_a_time(tmp_path, monkeypatch):
    """A second create() of an index whose writer is still open (resume=True reused its shard names and cut
    its rows, leaving a complete-marked index that did not open) is refused before anything changes; the lock
    goes with close(), an aborted build, the writer's garbage collection and a create() that failed."""
    path = tmp_path / "ix"
    x = int_grads(12, 43)
    lock_msg = (rf"^path: {re.escape(str(path))} is being written by another writer \(the lock "
                rf"{re.escape(str(path / '.lock'))} is held by a GradientIndex\.create not closed yet, in this process "
                r"or another\); close\(\) that writer before creating, resuming or overwriting this index$")
    w1 = GradientIndex.create(path, MODS, shard_rows=3, per_token=True)
    w1.append(x[:5], num_tokens=[2, 3])
    files = {p.name: p.read_bytes() for p in (path / "shards").iterdir()}
    header = (path / "index.json").read_bytes()
    for kw in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(RuntimeError, match=lock_msg):
            GradientIndex.create(path, MODS, shard_rows=3, per_token=True, **kw)
    assert (path / "index.json").read_bytes() == header
    assert {p.name: p.read_bytes() for p in (path / "shards").iterdir()} == files
    part = GradientIndex.open(path, allow_incomplete=True)  # readers take no lock
    assert len(part) == 5
    w1.append(x[5:9], num_tokens=[4])
    w1.close()
    ix = GradientIndex.open(path)
    assert ix.offsets.tolist() == [0, 2, 5, 9] and torch.equal(ix.get(range(9)), x[:9])
    # released by close(): resume works; an aborted build releases it too
    with pytest.raises(ZeroDivisionError):
        with GradientIndex.create(path, MODS, shard_rows=3, per_token=True, resume=True) as w2:
            w2.append(x[9:], num_tokens=[3])
            1 / 0
    # a create() that fails after taking the lock releases it (settings differ from the index's)
    with pytest.raises(ValueError, match=r"^resume: the index at .*ix was built with different settings: per_token "):
        GradientIndex.create(path, MODS, shard_rows=3, resume=True)
    w3 = GradientIndex.create(path, MODS, shard_rows=3, per_token=True, resume=True)
    assert len(w3) == 12
    del w3  # dropped without close(): garbage collection releases the lock
    with GradientIndex.create(path, MODS, shard_rows=3, per_token=True, resume=True) as w4:
        assert len(w4) == 12
    assert torch.equal(GradientIndex.open(path).get(range(12)), x)
    # the lock file is no part of the index: a directory holding only it has no header
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / ".lock").touch()
    with pytest.raises(IndexFormatError, match=r"^path: .*only holds no committed index header \(index\.json for "
                                               r"gradkit, info\.json for bergson\)$"):
        GradientIndex.open(tmp_path / "only")
    # without fcntl (not POSIX) builds are not locked
    monkeypatch.setattr(gi, "fcntl", None)
    a = GradientIndex.create(tmp_path / "nolock", MODS)
    b = GradientIndex.create(tmp_path / "nolock", MODS, overwrite=True)
    a._abort()
    b._abort()


def test_overwrite_keeps_foreign_files(tmp_path):
    """overwrite=True deleted every *.tmp file in shards/; only gradkit's own file names go now."""
    path = tmp_path / "ix"
    build(path, int_grads(5, 44))
    sd = path / "shards"
    for name in ("mine.tmp", "results.bin", "notes.json.tmp"):
        (sd / name).write_text("keep")
    (sd / "rank-00000.json.tmp").write_text("{}")  # gradkit's own leftover
    (path / "notes.tmp").write_text("keep")
    build(path, int_grads(3, 45), overwrite=True)
    assert sorted(p.name for p in sd.iterdir()) == ["mine.tmp", "notes.json.tmp", "r00000-000000.bin", "results.bin"]
    assert (path / "notes.tmp").read_text() == "keep" and len(GradientIndex.open(path)) == 3


def _with_header(path, change):
    h = json.loads((path / "index.json").read_text())
    change(h)
    (path / "index.json").write_text(json.dumps(h))


@pytest.mark.parametrize("change, field, want", [
    (lambda h: h.update(shards={"a": 1}), "shards", "a list"),
    (lambda h: h.update(shards="shards/r00000-000000.bin"), "shards", "a list"),
    (lambda h: h.update(shards=[["shards/r00000-000000.bin", 4]]), r"shards\[0\]", "an object"),
    (lambda h: h["shards"][0].update(rows=4.0), r"shards\[0\]\.rows", "an int >= 0"),
    (lambda h: h["shards"][0].update(rows=-1), r"shards\[0\]\.rows", "an int >= 0"),
    (lambda h: h["shards"][0].update(file=7), r"shards\[0\]\.file", "a string"),
    (lambda h: h.update(count="4"), "count", "an int >= 0"),
    (lambda h: h.update(per_token="no"), "per_token", "a bool"),
    (lambda h: h.update(modules=5), "modules", r"a list of \[name, dim\] pairs"),
    (lambda h: h["token_files"][0].update(examples=2.0), r"token_files\[0\]\.examples", "an int >= 0"),
], ids=["shards-dict", "shards-str", "shard-list", "rows-float", "rows-negative", "file-int", "count-str",
        "per_token-str", "modules-int", "examples-float"])
def test_header_with_wrong_json_types_is_refused(tmp_path, change, field, want):
    """Wrong JSON types in a header raised a bare TypeError (or opened); now IndexFormatError naming the field."""
    path = tmp_path / "ix"
    with GradientIndex.create(path, MODS, per_token=True) as ix:
        ix.append(int_grads(4, 46), num_tokens=[1, 3])
    _with_header(path, change)
    for call in (lambda: GradientIndex.open(path),
                 lambda: GradientIndex.create(path, MODS, per_token=True, resume=True)):
        with pytest.raises(IndexFormatError, match=rf"^(open|resume): {re.escape(str(path / 'index.json'))} field "
                                                   rf"{field} must be {want}, got .+$"):
            call()


def test_header_listing_a_file_twice_is_refused(tmp_path):
    """A header naming one shard file twice opened with its rows duplicated."""
    path = tmp_path / "ix"
    build(path, int_grads(4, 47))

    def dup(h):
        h["shards"].append(dict(h["shards"][0], file="shards/./r00000-000000.bin"))
        h["count"] *= 2
    _with_header(path, dup)
    with pytest.raises(IndexFormatError, match=rf"^open: {re.escape(str(path / 'index.json'))} lists the file "
                                               r"'r00000-000000\.bin' more than once in shards$"):
        GradientIndex.open(path)


def test_per_token_skip_drops_tokens_not_examples(tmp_path):
    """on_nonfinite="skip" in a per-token index refuses single token rows: the example stays with fewer
    tokens, an example whose every token is refused stays with 0 tokens, offsets and example_of agree."""
    x = int_grads(9, 48)
    x[3, 0] = float("nan")   # example 1: 1 of its 3 tokens
    x[5, 1] = float("inf")   # example 2: both of its tokens
    x[6, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"^grads: 3 of 7 rows hold NaN or Inf \(input rows \[3, 5, 6\]\); "):
        with GradientIndex.create(tmp_path / "ix", MODS, per_token=True, shard_rows=2) as w:
            ids = w.append(x[:7], num_tokens=[2, 3, 2])
            assert ids.tolist() == [0, 1, 2, -1, 3, -1, -1] and w.num_examples == 3
            assert w.append(x[7:], num_tokens=[2]).tolist() == [4, 5]
    ix = GradientIndex.open(tmp_path / "ix")
    assert ix.num_examples == 4 and len(ix) == 6 and ix.nonfinite_rows == 3
    assert ix.offsets.tolist() == [0, 2, 4, 4, 6]
    assert np.diff(ix.offsets).tolist() == [2, 2, 0, 2]
    assert ix.example_of(range(6)).tolist() == [0, 0, 1, 1, 3, 3]
    assert ix.example_of([-1, -3]).tolist() == [3, 1]
    assert torch.equal(ix.get(range(6)), x[[0, 1, 2, 4, 7, 8]])
    s, i = ix.search(x[[4]], 1)
    assert i.tolist() == [[3]] and ix.example_of(i).tolist() == [[1]]

"""Audit (s34): ``GradientIndex.search`` semantics against bergson 2.5.1's query path (``bergson.Attributor``) and
against an explicit float64 torch reference.

What a bergson user gets from ``Attributor`` (read from bergson/query/attributor.py and
bergson/hessians/{preconditioner,inversion}.py), and what these tests hold gradkit to:

* unit_norm: the *concatenated* row over every module of the index is normalised (one norm, not one per module),
  on both sides, before the module selection; a module subset then scores those modules' columns of the
  all-module unit vectors. (bergson's streaming ``Scorer`` (bergson/score/scorer.py), used by ``bergson score``,
  normalises index rows over the *scored* modules only; gradkit follows ``Attributor``, as its docstring says.)
* preconditioning: one-sided (unit_norm=False) is ``q @ H^-1`` on the queries only, no normalisation; two-sided
  (unit_norm=True) is ``H^-1/2`` on queries and rows, then the all-module normalisation. Modules without a matrix
  pass through. A ``{"joint": H}`` processor is one dense H over the concatenated row (``JointDensePreconditioner``)
  = gradkit's full (D, D) ``Precondition``. ``absolute_damped_inverse`` with c = gradkit's ``damping=c``.
* scores float32; ``torch.topk`` order (ties unspecified: the data here has distinct scores).

Indexes in bergson's layout are written with bergson's own ``create_index`` / ``create_token_index``.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import bergson  # noqa: F401  (installed wherever the suite runs: scripts/install-peers.sh)
from bergson import Attributor
from bergson.config import InversionConfig
from bergson.data import create_index, create_token_index
from bergson.gradients import GradientProcessor
from bergson.utils.utils import tensor_to_numpy

from gradkit.index import GradientIndex, Precondition

pytestmark = pytest.mark.filterwarnings("ignore::gradkit.index.UncheckedProjectionWarning")

SIZES = {"z.mlp": 6, "a.attn": 4, "m.out": 5}  # not alphabetical: grad_sizes order is the module order
D = sum(SIZES.values())
COLS = {}
_lo = 0
for _n, _d in SIZES.items():
    COLS[_n] = (_lo, _lo + _d)
    _lo += _d


def _split(q, sizes=SIZES):
    return dict(zip(sizes, q.split(list(sizes.values()), -1)))


def _bergson_index(root, x, sizes=SIZES, counts=None):
    """An index written by bergson's own storage code (bf16 through bergson's conversion), plus the processor
    config bergson's Attributor loads."""
    npdt = np.dtype(tensor_to_numpy(x[:1]).dtype)
    if counts is not None:
        mm, _ = create_token_index(root, np.asarray(counts), sizes, npdt)
    else:
        mm = create_index(root, x.shape[0], sizes, npdt)
    mm[:] = tensor_to_numpy(x)
    mm.flush()
    del mm
    GradientProcessor(projection_dim=None).save(Path(root))
    return GradientIndex.open(root)


def _power(h, p, damping):
    h = h.double()
    ev, vec = torch.linalg.eigh((h + h.T) / 2)
    return (vec * (ev + damping).pow(p)) @ vec.T


def _full_power(hess, p, damping, sizes=SIZES):
    """(D, D) float64 (H + damping I)^p: a tensor is one joint matrix, a dict per-module blocks (identity where a
    module has none)."""
    dim = sum(sizes.values())
    if isinstance(hess, torch.Tensor):
        return _power(hess, p, damping)
    out = torch.eye(dim, dtype=torch.float64)
    lo = 0
    for n, d in sizes.items():
        if n in hess:
            out[lo:lo + d, lo:lo + d] = _power(hess[n], p, damping)
        lo += d
    return out


def _unit(x):
    n = x.norm(dim=1, keepdim=True)
    return torch.where(n > 0, x / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(x))


def reference(X, Q, *, unit_norm=False, modules=None, weights=None, hess=None, mode=None, damping=0.0,
              sizes=SIZES):
    """(B, N) float64 scores, as the docstrings (and bergson's Attributor) define them."""
    X, Q = X.double(), Q.double()
    cosine = unit_norm
    if hess is not None:
        if mode == "query":
            Q = Q @ _full_power(hess, -1.0, damping, sizes)
        else:
            P = _full_power(hess, -0.5, damping, sizes)
            Q, X, cosine = Q @ P, X @ P, True
    if cosine:  # one norm over the concatenated row of every module
        Q, X = _unit(Q), _unit(X)
    keep = torch.zeros(X.shape[1], dtype=torch.float64)
    lo, cols = 0, {}
    for n, d in sizes.items():
        cols[n] = (lo, lo + d)
        lo += d
    for n in (list(sizes) if modules is None else modules):
        a, b = cols[n]
        keep[a:b] = float((weights or {}).get(n, 1.0))
    return (Q * keep) @ X.T


def ref_topk(S, k, reverse=False):
    """Top-k of float64 reference scores, ties lowest row first (gradkit's documented order)."""
    order = torch.sort(S if reverse else -S, dim=1, stable=True).indices[:, :k]
    return S.gather(1, order), order


def _assert_same(got, want, atol=2e-6, rtol=2e-5, what=""):
    (s, i), (ws, wi) = got, want
    assert s.dtype == torch.float32 and i.dtype == torch.int64, what
    assert torch.equal(i, wi.to(torch.int64)), (what, i.tolist(), wi.tolist())
    torch.testing.assert_close(s.double(), ws.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- bergson parity: preconditioning


def test_joint_hessian_one_and_two_sided_with_module_subsets_and_reverse(tmp_path):
    """bergson's joint (one dense H over the concatenated row) preconditioner = gradkit's (D, D) Precondition, one-
    sided (H^-1 on queries, unit_norm=False) and two-sided (H^-1/2 both sides + all-module normalisation), with a
    module subset (the subset of the transformed / normalised row) and reverse, against Attributor and the
    reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, D, generator=g) * torch.rand(40, 1, generator=g) * 3
    ix = _bergson_index(tmp_path / "ix", x)
    a = torch.randn(D, 3 * D, generator=g)
    H = a @ a.T / D
    GradientProcessor(projection_dim=None, hessians={"joint": H}).save(tmp_path / "hj")
    q = torch.randn(4, D, generator=g)
    inv = InversionConfig(inversion="absolute_damped_inverse", damping_factor=0.1)
    for un, mode in ((False, "query"), (True, "both")):
        att = Attributor(tmp_path / "ix", unit_norm=un, hessian_path=tmp_path / "hj", inversion_cfg=inv)
        assert type(att.preconditioner).__name__ == "JointDensePreconditioner"
        pre = Precondition(H, mode=mode, damping=0.1)
        for mods in (None, ["a.attn"], ["z.mlp", "m.out"]):
            for rev in (False, True):
                theirs = att.search(_split(q.clone()), 7, modules=set(mods) if mods else None, reverse=rev)
                ours = ix.search(q, 7, unit_norm=un, reverse=rev, modules=mods, precondition=pre)
                what = (mode, mods, rev)
                _assert_same(ours, (theirs.values, theirs.indices), atol=1e-5, what=what)
                S = reference(x, q, modules=mods, hess=H, mode=mode, damping=0.1)
                _assert_same(ours, ref_topk(S, 7, rev), atol=1e-5, what=what)


def test_per_module_hessian_for_some_modules_two_sided_normalises_over_all_modules(tmp_path):
    """A Hessian for one module only: bergson passes the others through unchanged and still normalises the whole
    (partly transformed) row; bf16 rows written by bergson, a zero row, per-token storage, every k."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(30, D, generator=g) * torch.rand(30, 1, generator=g) * 3).bfloat16()
    x[3] = 0
    ix = _bergson_index(tmp_path / "ix", x, counts=[4, 0, 11, 15])
    a = torch.randn(4, 12, generator=g)
    hess = {"a.attn": a @ a.T / 4}
    GradientProcessor(projection_dim=None, hessians=hess).save(tmp_path / "hp")
    q = torch.randn(3, D, generator=g)
    inv = InversionConfig(inversion="absolute_damped_inverse", damping_factor=0.05)
    for un, mode in ((False, "query"), (True, "both")):
        att = Attributor(tmp_path / "ix", unit_norm=un, hessian_path=tmp_path / "hp", inversion_cfg=inv)
        pre = Precondition(hess, mode=mode, damping=0.05)
        for mods in (None, ["a.attn"], ["z.mlp", "m.out"]):
            for rev in (False, True):
                theirs = att.search(_split(q.clone()), 30, modules=set(mods) if mods else None, reverse=rev)
                ours = ix.search(q, 30, unit_norm=un, reverse=rev, modules=mods, precondition=pre)
                S = reference(x.float(), q, modules=mods, hess=hess, mode=mode, damping=0.05)
                want = ref_topk(S, 30, rev)
                what = (mode, mods, rev)
                _assert_same(ours, want, atol=1e-5, what=what)
                # bergson: the same order except among the equal scores of the zero row / unselected-only rows
                assert torch.equal(ours[1][:, :10], theirs.indices[:, :10]), what
                torch.testing.assert_close(ours[0], theirs.values, rtol=2e-5, atol=1e-5)
                if un:  # the zero row scores exactly 0 (bergson: NaN turned into 0)
                    s0 = ours[0][ours[1] == 3]
                    assert torch.equal(s0, torch.zeros_like(s0)), what


# --------------------------------------------------------------------------- bergson parity: unit_norm, modules


def test_unit_norm_is_one_norm_over_the_concatenated_row_of_every_module(tmp_path):
    """Data on which the three readings of "unit_norm across modules" give different winners: one norm over the
    concatenated row (bergson's Attributor), one norm per module, one norm over the selected modules (bergson's
    Scorer). gradkit must give Attributor's."""
    sizes = {"a": 2, "b": 2}
    x = torch.tensor([[1.0, 0.0, 0.0, 100.0],   # a aligned with q's a-part, a huge b-part
                      [0.5, 0.5, 0.0, 0.0],     # a 45 degrees off, nothing in b
                      [0.2, -0.9, -0.3, 0.1],
                      [-1.0, 0.1, 0.0, -0.2]])
    ix = _bergson_index(tmp_path / "ix", x, sizes=sizes)
    q = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    for mods in (None, ["a"]):
        theirs = Attributor(tmp_path / "ix", unit_norm=True).search(_split(q.clone(), sizes), 4,
                                                                    modules=set(mods) if mods else None)
        ours = ix.search(q, 4, unit_norm=True, modules=mods)
        want = ref_topk(reference(x, q, unit_norm=True, modules=mods, sizes=sizes), 4)
        _assert_same(ours, want, what=mods)
        _assert_same(ours, (theirs.values, theirs.indices), what=mods)
        assert ours[1][0, 0].item() == 1
    # the other readings would put row 0 first: the data tells them apart
    per_module = sum(_unit(q[:, a:b]) @ _unit(x[:, a:b]).T for a, b in ((0, 2), (2, 4)))
    assert per_module.argmax().item() == 0
    subset_norm = _unit(q[:, :2]) @ _unit(x[:, :2]).T
    assert subset_norm.argmax().item() == 0


def test_reverse_unit_norm_module_subsets_and_query_forms_match_attributor(tmp_path):
    """fp16 rows written by bergson; queries as a dict (bergson's form), a flat tensor, in fp16 / bf16 / fp64, and a
    single 1-D query: every form gives the result of the same values as fp32, and Attributor's."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(50, D, generator=g) * torch.rand(50, 1, generator=g) * 2).half()
    ix = _bergson_index(tmp_path / "ix", x)
    q64 = torch.randn(5, D, generator=g, dtype=torch.float64)
    for un in (False, True):
        att = Attributor(tmp_path / "ix", unit_norm=un)
        for mods in (None, ["m.out"], ["z.mlp", "m.out"]):
            for rev in (False, True):
                for qdt in (torch.float16, torch.bfloat16, torch.float64):
                    q = q64.to(qdt)
                    base = ix.search(q.float(), 9, unit_norm=un, reverse=rev, modules=mods)
                    for form in (q, _split(q)):
                        got = ix.search(form, 9, unit_norm=un, reverse=rev, modules=mods)
                        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]), (un, mods, rev, qdt)
                    theirs = att.search(_split(q.clone()), 9, modules=set(mods) if mods else None, reverse=rev)
                    what = (un, mods, rev, qdt)
                    _assert_same(base, (theirs.values, theirs.indices), atol=1e-5, what=what)
                    S = reference(x.float(), q.float(), unit_norm=un, modules=mods)
                    _assert_same(base, ref_topk(S, 9, rev), atol=1e-5, what=what)
    # one 1-D query: (k,) results, the row of the batched call; bergson takes a 1-D dict without unit_norm
    full = ix.search(q64, 6, modules=["a.attn", "z.mlp"])
    for form in (q64[2], _split(q64[2])):
        s1, i1 = ix.search(form, 6, modules=["a.attn", "z.mlp"])
        assert s1.shape == i1.shape == (6,)
        assert torch.equal(i1, full[1][2]) and torch.equal(s1, full[0][2])
    theirs = Attributor(tmp_path / "ix").search(_split(q64[2].float()), 6, modules={"a.attn", "z.mlp"})
    assert torch.equal(i1, theirs.indices)
    s1u, i1u = ix.search(q64[2], 6, unit_norm=True, reverse=True)
    fullu = ix.search(q64, 6, unit_norm=True, reverse=True)
    assert torch.equal(i1u, fullu[1][2]) and torch.equal(s1u, fullu[0][2])


def test_module_selection_names_duplicates_and_forms(tmp_path):
    """modules=: a name the index lacks is refused by name (bergson drops it silently; an all-unknown selection makes
    bergson's torch.stack fail), an empty selection is refused (bergson reads an empty set as every module), a bare
    string is refused (not read as its characters); a repeated name counts once (bergson: a set); sets, tuples and
    generators are accepted; every selection order gives the index-order result."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(25, D, generator=g)
    ix = _bergson_index(tmp_path / "ix", x)
    q = torch.randn(3, D, generator=g)
    one = ix.search(q, 5, modules=["a.attn"])
    _assert_same(one, ref_topk(reference(x, q, modules=["a.attn"]), 5))
    for mods in (["a.attn", "a.attn"], ("a.attn",), {"a.attn"}, (m for m in ["a.attn"]), {"a.attn": 1}.keys()):
        got = ix.search(q, 5, modules=mods)
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1]), mods
    two = ix.search(q, 5, modules=["m.out", "z.mlp", "m.out"], unit_norm=True)
    _assert_same(two, ref_topk(reference(x, q, unit_norm=True, modules=["z.mlp", "m.out"]), 5))
    with pytest.raises(ValueError, match=r"^modules: the index has no modules \['nope'\] \(it has \['z\.mlp', "
                                         r"'a\.attn', 'm\.out'\]\)$"):
        ix.search(q, 5, modules=["a.attn", "nope"])
    with pytest.raises(ValueError, match=r"^modules: empty selection$"):
        ix.search(q, 5, modules=[])
    with pytest.raises(TypeError, match=r"^modules: expected a list/set of module names or None, got str$"):
        ix.search(q, 5, modules="a.attn")


def test_weights_zero_negative_and_with_cosine_and_reverse(tmp_path):
    """weights scale each selected module's contribution (after the all-module normalisation): 0 removes a module,
    a negative weight flips it, all-zero weights score every row 0 (the lowest rows, in order)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(35, D, generator=g) * torch.rand(35, 1, generator=g)
    ix = _bergson_index(tmp_path / "ix", x)
    q = torch.randn(4, D, generator=g)
    cases = [
        (None, {"a.attn": 0.0}),
        (None, {"a.attn": -0.0, "m.out": -2.5}),
        (["z.mlp", "m.out"], {"z.mlp": -1.0}),
        (["m.out"], {"m.out": -3.0}),
        (["a.attn", "z.mlp"], {"a.attn": 1e-3, "z.mlp": 7.0}),
    ]
    for mods, w in cases:
        for un in (False, True):
            for rev in (False, True):
                got = ix.search(q, 12, unit_norm=un, reverse=rev, modules=mods, weights=w)
                S = reference(x, q, unit_norm=un, modules=mods, weights=w)
                _assert_same(got, ref_topk(S, 12, rev), atol=1e-5, what=(mods, w, un, rev))
    # weight 0 on a module = leaving it out
    a = ix.search(q, 12, weights={"a.attn": 0.0}, unit_norm=True)
    b = ix.search(q, 12, modules=["z.mlp", "m.out"], unit_norm=True)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    # a negative weight on the only module = reverse
    a = ix.search(q, 12, modules=["m.out"], weights={"m.out": -1.0})
    b = ix.search(q, 12, modules=["m.out"], reverse=True)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], -b[0])
    # all weights 0: every score 0, the lowest rows first, either direction
    zero = {n: 0.0 for n in SIZES}
    for rev in (False, True):
        s, i = ix.search(q, 6, weights=zero, reverse=rev, unit_norm=True)
        assert torch.equal(s, torch.zeros(4, 6)) and i.tolist() == [list(range(6))] * 4


# --------------------------------------------------------------------------- k, empty, zero norms


def test_k_edges_empty_index_and_zero_norms_under_cosine(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, D, generator=g)
    x[[2, 9]] = 0
    ix = _bergson_index(tmp_path / "ix", x)
    q = torch.randn(3, D, generator=g)
    q[1] = 0
    for un in (False, True):
        for rev in (False, True):
            s, i = ix.search(q, 12, unit_norm=un, reverse=rev)  # k == count: every row, in order
            _assert_same((s, i), ref_topk(reference(x, q, unit_norm=un), 12, rev), what=(un, rev))
            assert torch.equal(s[1], torch.zeros(12)) and i[1].tolist() == list(range(12))  # zero query
            if un:  # zero rows score exactly 0 (no NaN), like bergson's nan_to_num
                assert torch.equal(s[0][(i[0] == 2) | (i[0] == 9)], torch.zeros(2))
            theirs = Attributor(tmp_path / "ix", unit_norm=un).search(_split(q.clone()), 12, reverse=rev)
            torch.testing.assert_close(s, theirs.values, rtol=2e-5, atol=1e-6)
            # distinct scores (rows 0, 2 of the queries; zero rows tie at 0): bergson's order too
            for b in (0, 2):
                nz = [r for r in i[b].tolist() if r not in (2, 9)]
                assert nz == [r for r in theirs.indices[b].tolist() if r not in (2, 9)], (un, rev, b)
    with pytest.raises(ValueError, match=r"^k: 13 is larger than the index \(12 rows\)$"):  # bergson: clamps
        ix.search(q, 13)
    with pytest.raises(ValueError, match=r"^k: must be >= 1, got 0$"):
        ix.search(q, 0)
    mm = create_index(tmp_path / "empty", 0, SIZES, np.float32)
    del mm
    iz = GradientIndex.open(tmp_path / "empty")
    assert len(iz) == 0
    with pytest.raises(ValueError, match=r"^k: 1 is larger than the index \(0 rows\)$"):
        iz.search(q, 1, unit_norm=True)


# --------------------------------------------------------------------------- faiss backend


def test_faiss_backend_matches_torch_backend_and_reference(tmp_path):
    import faiss  # noqa: F401  (installed wherever the suite runs: scripts/install-peers.sh; never skipped)

    g = torch.Generator().manual_seed(6)
    x = (torch.randn(300, D, generator=g) * torch.rand(300, 1, generator=g)).half()
    x[7] = 0
    ix = _bergson_index(tmp_path / "ix", x)
    q = torch.randn(5, D, generator=g)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    H = a @ a.T / D + 0.3 * torch.eye(D, dtype=torch.float64)
    X = x.float()
    for un in (False, True):
        for rev in (False, True):
            for mods in (None, ["z.mlp", "m.out"], ["a.attn"]):  # z.mlp + m.out: a selection with a hole
                for mode in (None, "query", "both"):
                    for br, k in ((None, 10), (37, 300), (64, 1)):
                        w = {(mods or ["z.mlp"])[0]: -1.5}
                        kw = dict(unit_norm=un, reverse=rev, modules=mods, batch_rows=br, weights=w,
                                  precondition=None if mode is None else Precondition(H, mode=mode))
                        t = ix.search(q, k, **kw)
                        f = ix.search(q, k, backend="faiss", **kw)
                        what = (un, rev, mods, mode, br, k)
                        assert torch.equal(t[1], f[1]), what
                        torch.testing.assert_close(f[0], t[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")
                        if k == 10:
                            S = reference(X, q, unit_norm=un, modules=mods, weights=w,
                                          hess=None if mode is None else H, mode=mode)
                            _assert_same(f, ref_topk(S, k, rev), atol=2e-5, what=what)


def test_faiss_backend_returns_rows_whose_scores_are_not_finite(tmp_path):
    # DEFECT: backend="faiss" drops every row whose score is -inf or NaN (+inf or NaN with reverse=True) and returns
    # the row number -1 in its slot. faiss.knn's inner-product heap only takes scores that compare above its
    # initial value, so such a row never enters the block's result; _faiss_block (python/gradkit/index.py:2339-2342
    # at HEAD) keeps faiss's -1 and score_topk carries it to the output as an "empty slot". The torch backend
    # returns the row (a score that overflows ranks as -inf, ties by row; a NaN one ranks last). Here every row of a
    # gradkit index is finite (append accepts them), the scores overflow fp32 in the product, and k == len(index):
    # the result holds -1, an invalid row number that get()/example_of read as the *last* row.
    import faiss  # noqa: F401

    x = torch.tensor([[1.0], [3e38], [2.0], [-3e38]])
    with GradientIndex.create(tmp_path / "ix", {"m": 1}, dtype=torch.float32) as w:
        w.append(x)
    ix = GradientIndex.open(tmp_path / "ix")
    q = torch.tensor([[10.0]])
    for rev, want in ((False, [1, 2, 0, 3]), (True, [3, 0, 2, 1])):
        t = ix.search(q, 4, reverse=rev)
        assert t[1].tolist() == [want]  # the torch backend: every row
        f = ix.search(q, 4, reverse=rev, backend="faiss")
        assert f[1].tolist() == [want], (rev, f[1].tolist())
        assert torch.equal(f[0], t[0])


# --------------------------------------------------------------------------- streaming memory


_MEM_SCRIPT = textwrap.dedent("""
    import ctypes, sys, threading, time, warnings
    import torch
    from gradkit.index import GradientIndex, Precondition
    warnings.simplefilter("ignore")
    root = sys.argv[1]
    N, W = 400_000, 256  # bf16: 200 MiB on disk, 400 MiB as float32
    g = torch.Generator().manual_seed(0)
    with GradientIndex.create(root, {"a": 128, "b": 128}, dtype=torch.bfloat16, shard_rows=150_000) as w:
        for i in range(0, N, 50_000):
            w.append(torch.randn(50_000, W, generator=g))
    want = torch.randn(3, W, generator=g)

    def anon():  # anonymous resident memory (MiB): a file mapping's pages are not in it
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

    libc = ctypes.CDLL("libc.so.6")

    class Peak:
        def __enter__(self):
            # freed heap memory glibc keeps resident would be reused unseen (the control read 0.0 MiB on some runs):
            # give it back first, so that what the block allocates shows as growth
            libc.malloc_trim(0)
            self.base = self.peak = anon()
            self.stop = False
            def run():
                while not self.stop:
                    self.peak = max(self.peak, anon())
                    time.sleep(0.001)
            self.t = threading.Thread(target=run)
            self.t.start()
            return self
        def __exit__(self, *a):
            self.stop = True
            self.t.join()
            self.peak = max(self.peak, anon())

    ix = GradientIndex.open(root)
    x_rows = ix.get([5, 123_456, 399_999])
    q = torch.cat([x_rows, want])  # three rows of the index (cosine 1 with themselves) and three others
    ix.search(q, 3, batch_rows=8192, unit_norm=True)  # warm-up: kernels, allocator
    for name, kw in (("ip", dict(batch_rows=8192)), ("cos", dict(batch_rows=8192, unit_norm=True)),
                     ("sub", dict(batch_rows=8192, unit_norm=True, modules=["b"])),
                     ("rev", dict(batch_rows=8192, reverse=True, weights={"a": -2.0})),
                     ("faiss", dict(batch_rows=8192, unit_norm=True, backend="faiss")),
                     ("default", dict(unit_norm=True))):
        with Peak() as p:
            s, i = ix.search(q, 5, **kw)
        if name in ("cos", "faiss", "default"):
            assert i[:3, 0].tolist() == [5, 123_456, 399_999], (name, i[:3, 0].tolist())
        print(name, round(p.peak - p.base, 1))
    with Peak() as p:  # control: what materialising the rows as float32 costs, measured the same way
        whole = torch.ones(N // 4, W)  # 100 MiB of float32, held until the probe has stopped
    del whole
    print("control", round(p.peak - p.base, 1))
""")


def test_search_streams_a_large_memmap_without_materialising_it(tmp_path):
    """A 200 MiB bf16 index (400 MiB as float32) searched with batch_rows=8192 (4 MiB of bf16 per block): the
    anonymous memory the search allocates stays within a few blocks, whatever the scoring path (inner product,
    cosine, module subset, weights + reverse, faiss); with the default batch_rows (about 256 MiB of fp32 per
    block) it stays below the whole index as float32."""
    # MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB: every larger allocation is its own mapping, unmapped when freed, so
    # the probe reads live memory. With glibc's moving threshold, freed 8 MiB blocks stayed in the heap (up to
    # ~40 MiB of resident free memory on some runs, the same search 8.5 MiB on others) and a later allocation could
    # reuse them unseen (the 100 MiB control once grew by 0.0).
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(tmp_path / "big")], capture_output=True, text=True,
                         timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    grow = {ln.split()[0]: float(ln.split()[1]) for ln in out.stdout.splitlines() if len(ln.split()) == 2}
    assert set(grow) == {"ip", "cos", "sub", "rev", "faiss", "default", "control"}, out.stdout
    assert grow["control"] > 80, grow  # 100 MiB of float32: the probe sees an allocation
    for name in ("ip", "cos", "sub", "rev", "faiss"):
        assert grow[name] < 24, (name, grow)  # 200 MiB index, 4 MiB blocks (8 MiB as fp32); measured 0.2-11.9
    assert grow["default"] < 300, grow

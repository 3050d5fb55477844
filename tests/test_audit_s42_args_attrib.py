"""Session 42: a bad-argument audit of the data-attribution API, gradkit.projection (project, projection_matrix,
factored_project, the normalisers, GradientCollector and its methods) and gradkit.index (GradientIndex.create /
append / open / search / get / example_of, Precondition).

The rule: a wrong argument is a TypeError / ValueError (or a documented gradkit error) whose message starts with
the argument's name, raised before any work or any file is written, leaving what the user had as it was (input
tensors, an index directory, an open writer or reader, a collector's pending batch); valid but unusual inputs
(numpy scalars, strided / expanded / float64 / half tensors) give the answers of a plain float64 computation.

Defects found and fixed here (each test named ``*_fixed_*`` failed before its fix):

* ``append(num_tokens=...)`` summed the counts in int64: four counts of 2**62 "summed" to 0, passed the check and were
  written; ``close()`` then marked complete an index that ``open()`` refuses. Also: complex counts were taken with
  their imaginary part dropped, strings / None / ints past uint64 raised torch's TypeError, a sparse or meta tensor
  torch's NotImplementedError, none naming ``num_tokens``.
* ``GradientCollector(memory_budget=2**63 or more)`` was accepted and refused by factored_project inside every
  backward pass; ``dtype=`` a float8 dtype was accepted and ``collect()`` raised NotImplementedError after dropping
  the batch (float8_e4m3fn would otherwise saturate at 448 silently).
* Sparse tensors (project's ``x``, factored_project's ``a`` / ``g`` / ``mask``, normaliser moments, collector masks,
  ``get`` / ``example_of`` rows) and meta ones where values are read (a collector mask, a search weight) failed
  with torch's errors naming nothing; factored_project with 2-D inputs and a list mask raised AttributeError.
* ``GradientCollector.flatten(None)`` / ``split(0-d)`` / ``per_example_grads(None, ...)`` / ``(batches, None)``
  raised Python's errors naming nothing.
* ``search(modules=[["a"]])`` raised "unhashable type: 'list'".
* ``projection_matrix`` of more than 2**63 bytes raised torch's RuntimeError; ``factored_project(p >= 2**31)`` an
  allocation error (no result of p * p entries per example fits).
* ``create`` under a path whose parent is a file raised "[Errno 20] Not a directory" without the argument's name; a
  projection config holding NaN / Infinity was written into the header as non-standard JSON.
"""
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradkit import index as IX
from gradkit import projection as P
from gradkit.projection import GradientCollector

GI = IX.GradientIndex


def _expect(fn, exc, prefix):
    with pytest.raises(exc) as ei:
        fn()
    assert str(ei.value).startswith(prefix), str(ei.value)
    return ei.value


def _files(root):
    """{relative path: bytes} of every file under ``root`` (lock files included)."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


# --------------------------------------------------------------------------- projection: refusals by name

_A, _G = torch.randn(2, 5, 3), torch.randn(2, 5, 4)

PROJ_ROWS = [
    ("project-x-sparse", lambda: P.project(torch.ones(3, 10).to_sparse(), 4), TypeError, "x:"),
    ("project-stream-chunk-sparse", lambda: P.project([torch.ones(3, 4), torch.ones(3, 2).to_sparse()], 4),
     TypeError, "x chunk:"),
    ("factored-a-sparse", lambda: P.factored_project(_A.to_sparse(), _G, 2), TypeError, "a:"),
    ("factored-g-sparse", lambda: P.factored_project(_A, _G.to_sparse(), 2), TypeError, "g:"),
    ("factored-mask-sparse",
     lambda: P.factored_project(_A, _G, 2, mask=torch.ones(2, 5, dtype=torch.bool).to_sparse()), TypeError, "mask:"),
    ("factored-2d-list-mask", lambda: P.factored_project(torch.ones(2, 3), torch.ones(2, 4), 2, mask=[True, False]),
     ValueError, "mask:"),
    ("factored-p-2**31", lambda: P.factored_project(_A, _G, 2 ** 31), ValueError, "p:"),
    ("factored-p-2**40", lambda: P.factored_project(_A, _G, 2 ** 40), ValueError, "p:"),
    ("projection_matrix-past-int64-bytes", lambda: P.projection_matrix(2 ** 40, 2 ** 40), ValueError, "rows, cols:"),
    ("projection_matrix-f64-past-int64-bytes",
     lambda: P.projection_matrix(2 ** 31, 2 ** 30, dtype=torch.float64), ValueError, "rows, cols:"),
    ("adafactor-row-sparse", lambda: P.AdafactorNormalizer(torch.ones(4).to_sparse(), torch.ones(3)), TypeError,
     "row:"),
    ("adafactor-col-sparse", lambda: P.AdafactorNormalizer(torch.ones(4), torch.ones(3).to_sparse()), TypeError,
     "col:"),
    ("adam-v-sparse", lambda: P.AdamNormalizer(torch.ones(4, 3).to_sparse()), TypeError, "v:"),
    ("adam-bias-sparse", lambda: P.AdamNormalizer(torch.ones(4, 3), bias_avg_sq=torch.ones(4).to_sparse()),
     TypeError, "bias_avg_sq:"),
    # already right: pinned (numpy floats, 0-d tensors and strings where ints are wanted, capitalised kinds)
    ("pinned-project-k-0d-tensor", lambda: P.project(torch.ones(3, 10), torch.tensor(4)), TypeError, "k:"),
    ("pinned-project-chunk-float", lambda: P.project(torch.ones(3, 10), 4, chunk=2.0), TypeError, "chunk:"),
    ("pinned-project-kind-padded", lambda: P.project(torch.ones(3, 10), 4, kind=" gaussian"), ValueError, "kind:"),
    ("pinned-project-out-f64", lambda: P.project(torch.ones(3, 10), 4, out=torch.zeros(3, 4, dtype=torch.float64)),
     ValueError, "out:"),
    ("pinned-matrix-dtype-numpy", lambda: P.projection_matrix(2, 3, dtype=np.float32), TypeError, "dtype:"),
    ("pinned-matrix-device-upper", lambda: P.projection_matrix(2, 3, device="CPU"), ValueError, "device:"),
    ("pinned-factored-memory_budget-inf", lambda: P.factored_project(_A, _G, 2, memory_budget=math.inf), TypeError,
     "memory_budget:"),
    ("pinned-factored-name-bytes", lambda: P.factored_project(_A, _G, 2, name=b"x"), TypeError, "name:"),
    ("pinned-adam-eps-0d-tensor", lambda: P.AdamNormalizer(torch.ones(4, 3), eps=torch.tensor(1e-8)), ValueError,
     "eps:"),
    ("pinned-derive_seed-side-none", lambda: P.derive_seed(1, "a", None), TypeError, "side:"),
]


@pytest.mark.parametrize("call,exc,prefix", [r[1:] for r in PROJ_ROWS], ids=[r[0] for r in PROJ_ROWS])
def test_fixed_projection_refusals_name_the_argument(call, exc, prefix):
    a0, g0 = _A.clone(), _G.clone()
    _expect(call, exc, prefix)
    assert torch.equal(_A, a0) and torch.equal(_G, g0)


def test_projection_matrix_limits_stop_exactly_at_int64_bytes():
    # the byte bound counts the dtype: the largest rows * cols of float16 is twice float32's; the check only refuses
    # what cannot exist (a meta matrix just inside it is made)
    lim = (1 << 63) - 1
    P.projection_matrix(1, lim // 4, device="meta")
    _expect(lambda: P.projection_matrix(1, lim // 4 + 1), ValueError, "rows, cols:")
    assert P.projection_matrix(1, lim // 2, dtype=torch.float16, device="meta").shape == (1, lim // 2)
    # p just below the bound goes on to its ordinary checks (here the normaliser's shape), not the new one
    _expect(lambda: P.factored_project(_A, _G, 2 ** 31 - 1, normalizer=P.AdamNormalizer(torch.ones(3, 3))),
            ValueError, "normalizer:")


def test_valid_unusual_projection_inputs_match_float64():
    """numpy integers for k / seed / chunk / p / memory_budget, non-contiguous and expanded inputs, float64 and half
    inputs: the float64 product with the documented matrices; no input is modified."""
    g = torch.Generator().manual_seed(42)
    xs = torch.randn(6, 260, generator=g)[:, ::2]  # (6, 130), column stride 2
    for src in (xs, xs.double(), xs.half(), torch.randn(1, 130, generator=g).expand(4, 130),
                torch.randn(130, 5, generator=g).T):
        before = src.clone()
        k = np.int64(11)
        R = P.projection_matrix(11, 130, seed=7, kind="gaussian", dtype=torch.float64)
        want = src.double() @ R.T
        for kw in ({}, {"chunk": np.int32(17)}):
            got = P.project(src, k, seed=np.uint64(7), kind="GAUSSIAN", **kw)
            assert got.dtype == torch.float32 and got.shape == (src.shape[0], 11)
            assert float((got.double() - want).abs().max()) <= 1e-5 * (1 + float(want.abs().max()))
        assert torch.equal(src, before)
    # factored: expanded activations, transposed gradients, a non-contiguous mask; numpy p / seed / memory_budget
    a = torch.randn(1, 6, 5, generator=g).expand(3, 6, 5)
    gr = torch.randn(3, 4, 6, generator=g).transpose(1, 2)  # (3, 6, 4)
    mask = (torch.rand(6, 3, generator=g) > 0.3).T
    v = torch.rand(4, 5, generator=g) + 0.1
    for norm in (None, P.AdamNormalizer(v)):
        got = P.factored_project(a, gr, np.int64(3), seed=np.int64(5), name="m", mask=mask, bias=np.bool_(True),
                                 normalizer=norm, memory_budget=np.int64(200))
        A = torch.cat([a.double(), torch.ones(3, 6, 1, dtype=torch.float64)], -1) * mask[..., None]
        Gm = torch.einsum("bto,bti->boi", gr.double() * mask[..., None], A)
        if norm is not None:
            Gm[..., :5] = Gm[..., :5] / (v.double().sqrt() + norm.eps)
        L = P.projection_matrix(3, 4, P.derive_seed(5, "m", "left"), dtype=torch.float64)
        R = P.projection_matrix(3, 6, P.derive_seed(5, "m", "right"), dtype=torch.float64)
        want = torch.einsum("po,boi,qi->bpq", L, Gm, R).reshape(3, 9)
        assert float((got.double() - want).abs().max()) <= 1e-5 * (1 + float(want.abs().max()))


# --------------------------------------------------------------------------- the collector

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_fixed_collector_memory_budget_past_int64_refused_at_construction():
    m = _model()
    _expect(lambda: GradientCollector(m, p=2, memory_budget=2 ** 63), ValueError, "memory_budget: must be below 2^63")
    _expect(lambda: GradientCollector(m, p=2, memory_budget=np.uint64(2 ** 63)), ValueError, "memory_budget:")
    assert not m._forward_hooks and not m[0]._forward_hooks  # nothing attached
    # the largest budget works, and gives the bits of the default budget (Adam forms G within it)
    v = torch.rand(4, 3) + 0.1
    x = torch.randn(5, 3)
    outs = []
    for mb in (2 ** 63 - 1, 256 << 20):
        col = GradientCollector(m, p=2, memory_budget=mb, normalizers={"0": P.AdamNormalizer(v)})
        with col:
            m(x).sum().backward()
            outs.append(col.collect(flat=True))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fixed_collector_float8_dtype_refused_at_construction(dt):
    _expect(lambda: GradientCollector(_model(), p=2, dtype=dt), TypeError, "dtype:")


def test_collector_numpy_arguments_give_the_bits_of_python_ints():
    m = _model()
    x = torch.randn(5, 3)
    got = []
    for kw in ({"p": 3, "seed": 9, "memory_budget": 4096},
               {"p": np.int64(3), "seed": np.uint64(9), "memory_budget": np.int32(4096)}):
        col = GradientCollector(m, bias=np.bool_(True), kind="Gaussian", **kw)
        assert type(col.p) is int and type(col.seed) is int and col.kind == "gaussian"
        with col:
            m(x).sum().backward()
            got.append(col.collect(flat=True, scale=np.float32(2.0)))
        assert json.dumps(col.projection_config)  # plain JSON: no numpy scalar leaked into it
    assert torch.equal(got[0], got[1])


def test_fixed_collector_helpers_refuse_by_name_and_keep_the_state():
    m = _model()
    col = GradientCollector(m, p=2)
    good = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    col.set_mask(good)
    _expect(lambda: col.set_mask(torch.ones(1, 3, device="meta")), ValueError, "mask:")
    _expect(lambda: col.set_mask(torch.ones(1, 3).to_sparse()), TypeError, "mask:")
    assert torch.equal(col._mask, good)  # the earlier mask stands
    _expect(lambda: col.flatten(None), TypeError, "grads:")
    _expect(lambda: col.flatten([torch.ones(2, 4), torch.ones(2, 4)]), TypeError, "grads:")
    _expect(lambda: col.flatten({"0": [1.0] * 4, "2": torch.ones(1, 4)}), TypeError, "grads['0']:")
    _expect(lambda: col.flatten({"0": torch.tensor(1.0), "2": torch.ones(1, 4)}), TypeError, "grads['0']:")
    _expect(lambda: col.split(torch.tensor(1.0)), ValueError, "flat: expected last dimension 8, got ()")
    _expect(lambda: col.split(torch.ones(2, 8).to_sparse()), TypeError, "flat:")
    x3 = torch.ones(2, 3, 4)
    _expect(lambda: GradientCollector.pack_tokens(x3.to_sparse()), TypeError, "x:")
    _expect(lambda: GradientCollector.pack_tokens(x3, torch.ones(2, 3).to_sparse()), TypeError, "mask:")
    _expect(lambda: GradientCollector.pack_tokens(x3, torch.ones(2, 3, device="meta")), ValueError, "mask:")
    _expect(lambda: GradientCollector.pack_tokens(x3.to("meta"), torch.ones(2, 3, dtype=torch.bool)), ValueError,
            "x:")
    rows, n = GradientCollector.pack_tokens(x3.to("meta"))  # no mask: a meta x has a meta result, as torch's views
    assert rows.is_meta and rows.shape == (6, 4) and n.tolist() == [3, 3]
    # per_example_grads: checked at the first next(), before the hooks are attached or the model runs
    calls = []
    _expect(lambda: next(col.per_example_grads(None, lambda mm, b: calls.append(b))), TypeError, "batches:")
    _expect(lambda: next(col.per_example_grads([{"x": 1}], None)), TypeError, "loss_fn:")
    assert not calls and not col.attached and not m[0]._forward_hooks
    # the helpers' valid forms still work (flatten / split round trip)
    g = {"0": torch.randn(2, 4), "2": torch.randn(2, 4)}
    back = col.split(col.flatten(g))
    assert all(torch.equal(back[n_], g[n_]) for n_ in g)


def test_collector_refusals_keep_a_pending_batch():
    m = _model()
    x = torch.randn(5, 3)
    ref_col = GradientCollector(m, p=2)
    with ref_col:
        m(x).sum().backward()
        want = ref_col.collect(flat=True)
    col = GradientCollector(m, p=2)
    with col:
        m(x).sum().backward()
        for bad in ({"scale": torch.tensor(2.0)}, {"scale": "Batch"}, {"missing": "ZEROS"}, {"flat": 1},
                    {"scale": float("nan")}):
            with pytest.raises((TypeError, ValueError)):
                col.collect(**bad)
        _expect(lambda: col.set_mask(torch.ones(5, 1).to_sparse()), TypeError, "mask:")
        assert torch.equal(col.collect(flat=True), want)


# --------------------------------------------------------------------------- the index: append

def _writer(tmp_path, name="i", per_token=False, **kw):
    return GI.create(tmp_path / name, {"a": 3, "b": 2}, dtype=torch.float32, per_token=per_token, **kw)


def test_fixed_num_tokens_whose_int64_sum_wraps_are_refused_and_nothing_is_written(tmp_path):
    w = _writer(tmp_path, per_token=True)
    first = torch.arange(15.).reshape(3, 5)
    w.append(first, [1, 2])
    before = _files(tmp_path / "i")
    x = torch.arange(20.).reshape(4, 5)
    x0 = x.clone()
    # 4 * 2**62 = 2**64: 0 in int64 plus 4, "the rows' count" before the fix
    _expect(lambda: w.append(x, [2 ** 62] * 4 + [4]), ValueError,
            "num_tokens: counts sum to 18446744073709551620 but grads has 4 rows")
    _expect(lambda: w.append(x, np.array([2 ** 64 - 1, 5], np.uint64)), ValueError,
            "num_tokens: counts sum to 18446744073709551620 but grads has 4 rows")
    _expect(lambda: w.append(x, torch.tensor([2 ** 63 - 1, 2 ** 63 - 1, 6])), ValueError, "num_tokens: counts sum to")
    assert _files(tmp_path / "i") == before and torch.equal(x, x0)
    assert len(w) == 3 and w.num_examples == 2
    assert w.append(x, np.array([3, 0, 1], np.uint64)).tolist() == [3, 4, 5, 6]
    w.close()
    ix = GI.open(tmp_path / "i")
    assert ix.offsets.tolist() == [0, 1, 3, 6, 6, 7]
    assert torch.equal(ix.get(range(7)), torch.cat([first, x]))
    assert ix.example_of([0, 2, 3, 6]).tolist() == [0, 1, 2, 4]


NUM_TOKENS_BAD = [
    ("str", "4", TypeError), ("str-list", ["4"], TypeError), ("none-entry", [None, 4], TypeError),
    ("int-past-uint64", [2 ** 70, 4], TypeError), ("object-array", np.array([4], dtype=object), TypeError),
    ("complex-tensor", torch.tensor([4 + 0j]), TypeError), ("complex-list", [3 + 1j, 1], TypeError),
    ("complex-array", np.array([4 + 0j]), TypeError),
    ("sparse", torch.tensor([4]).to_sparse(), TypeError), ("meta", torch.tensor([4], device="meta"), ValueError),
    # already right: pinned
    ("float-list", [1.0, 3.0], TypeError), ("bool", torch.tensor([True] * 4), TypeError), ("0-d", torch.tensor(4),
                                                                                            TypeError),
    ("2-D", [[4]], TypeError), ("negative", [5, -1], ValueError),
]


@pytest.mark.parametrize("nt,exc", [r[1:] for r in NUM_TOKENS_BAD], ids=[r[0] for r in NUM_TOKENS_BAD])
def test_fixed_num_tokens_refused_by_name_writing_nothing(tmp_path, nt, exc):
    w = _writer(tmp_path, per_token=True)
    w.append(torch.ones(2, 5), [2])
    before = _files(tmp_path / "i")
    _expect(lambda: w.append(torch.ones(4, 5), nt), exc, "num_tokens:")
    assert _files(tmp_path / "i") == before
    assert w.append(torch.ones(4, 5), torch.tensor([4], dtype=torch.uint8)).tolist() == [2, 3, 4, 5]  # still usable
    w.close()
    assert GI.open(tmp_path / "i").offsets.tolist() == [0, 2, 6]


def test_append_unusual_valid_inputs_store_the_values(tmp_path):
    w = _writer(tmp_path)
    base = torch.randn(4, 10, dtype=torch.float64)
    forms = [base[:, ::2], base[:, ::2].T.contiguous().T, torch.randn(1, 5).expand(3, 5),
             torch.randn(2, 5, requires_grad=True), torch.randn(2, 5).half(), torch.randn(2, 5).bfloat16()]
    want = []
    for f in forms:
        keep = f.detach().clone()
        w.append(f, commit=np.bool_(True))
        assert torch.equal(f.detach(), keep)
        want.append(keep.float())  # float64 rounds once to float32 (the storage dtype); halves are exact
    w.append({"b": base[:, 8:], "a": base[:, 1:4]})  # dict in another order, strided float64 parts
    want.append(torch.cat([base[:, 1:4], base[:, 8:]], 1).float())
    w.close()
    assert torch.equal(GI.open(tmp_path / "i").get(range(21)), torch.cat(want))


# --------------------------------------------------------------------------- the index: create / open

def test_fixed_create_under_a_file_names_the_path_and_changes_nothing(tmp_path):
    f = tmp_path / "afile"
    f.write_bytes(b"keep")
    for p in (f / "sub", f / "sub" / "deeper", str(f / "sub")):
        e = _expect(lambda: GI.create(p, {"a": 2}), NotADirectoryError, "path:")
        assert str(f) in str(e)
    _expect(lambda: GI.create(f, {"a": 2}), NotADirectoryError, "path:")
    _expect(lambda: GI.open(f), IX.IndexFormatError, "path:")
    assert f.read_bytes() == b"keep" and os.listdir(tmp_path) == ["afile"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fixed_create_refuses_a_projection_json_cannot_hold(tmp_path, bad):
    _expect(lambda: GI.create(tmp_path / "i", {"a": 2}, projection={"seed": 0, "scale": bad}), ValueError,
            "projection:")
    _expect(lambda: GI.create(tmp_path / "i", {"a": 2}, projection={"nested": [1, {"x": bad}]}), ValueError,
            "projection:")
    assert os.listdir(tmp_path) == []
    with GI.create(tmp_path / "i", {"a": 2}, projection={"seed": 0, "scale": 0.5}) as w:
        w.append(torch.ones(1, 2))
    hdr = (tmp_path / "i" / "index.json").read_text()

    def strict(c):
        raise ValueError(c)
    assert json.loads(hdr, parse_constant=strict)["projection"] == {"seed": 0, "scale": 0.5}


CREATE_ROWS = [
    # already right: pinned (before anything is written)
    ("path-bytes", dict(path=b"idx"), TypeError, "path:"),
    ("modules-0d-tensor-dim", dict(modules={"a": torch.tensor(2)}), ValueError, "modules['a']:"),
    ("modules-float-dim", dict(modules={"a": 2.0}), ValueError, "modules['a']:"),
    ("modules-set", dict(modules={("a", 2)}), TypeError, "modules:"),
    ("dtype-float64", dict(dtype=torch.float64), TypeError, "dtype:"),
    ("dtype-numpy", dict(dtype=np.float16), TypeError, "dtype:"),
    ("projection-numpy-int", dict(projection={"seed": np.int64(1)}), TypeError, "projection:"),
    ("shard_rows-float", dict(shard_rows=2.0), TypeError, "shard_rows:"),
    ("shard_rows-bool", dict(shard_rows=True), TypeError, "shard_rows:"),
    ("on_nonfinite-capitalised", dict(on_nonfinite="Skip"), ValueError, "on_nonfinite:"),
    ("distributed-int", dict(distributed=0), TypeError, "distributed:"),
]


@pytest.mark.parametrize("kw,exc,prefix", [r[1:] for r in CREATE_ROWS], ids=[r[0] for r in CREATE_ROWS])
def test_create_refusals_write_nothing(tmp_path, monkeypatch, kw, exc, prefix):
    monkeypatch.chdir(tmp_path)
    args = dict(path=tmp_path / "new" / "idx", modules={"a": 2})
    args.update(kw)
    _expect(lambda: GI.create(**args), exc, prefix)
    assert os.listdir(tmp_path) == []


def test_create_takes_numpy_sizes_and_path_forms(tmp_path):
    for p in (tmp_path / "a", str(tmp_path / "b")):
        with GI.create(p, {"a": np.int64(2), np.str_("b"): np.int32(1)}, dtype="FP32", shard_rows=np.int64(2)) as w:
            w.append(torch.arange(9.).reshape(3, 3))
        h = json.loads((tmp_path / os.path.basename(str(p)) / "index.json").read_text())
        assert h["modules"] == [["a", 2], ["b", 1]] and h["shard_rows"] == 2 and h["dtype"] == "float32"
        assert [s["rows"] for s in h["shards"]] == [2, 1]
        assert torch.equal(GI.open(p).get([0, 1, 2]), torch.arange(9.).reshape(3, 3))


# --------------------------------------------------------------------------- the index: search / get

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 7, generator=g)
    path = tmp_path_factory.mktemp("s42") / "idx"
    with GI.create(path, {"a": 4, "b": 3}, dtype=torch.float32, projection={"seed": 0}) as w:
        w.append(x)
    return GI.open(path), x


def _ref(x, q, k, unit=False, reverse=False, wa=1.0, wb=1.0):
    q, x = q.double(), x.double()
    if unit:
        q = q / q.norm(dim=-1, keepdim=True)
        x = x / x.norm(dim=-1, keepdim=True)
    w = torch.tensor([wa] * 4 + [wb] * 3, dtype=torch.float64)
    s = (q * w) @ x.T
    return torch.topk(s, k, dim=-1, largest=not reverse)


def _same(got, want, tol=2e-6):
    s, i = got
    ws, wi = want
    assert torch.equal(i, wi), (i, wi)
    assert s.dtype == torch.float32 and float((s.double() - ws).abs().max()) <= tol * (1 + float(ws.abs().max()))


SEARCH_ROWS = [
    ("modules-unhashable-entry", dict(modules=[["a"]]), ValueError, "modules:"),
    ("modules-dict-entry", dict(modules=[{"a": 1}]), ValueError, "modules:"),
    ("weights-meta-0d", dict(weights={"a": torch.tensor(2.0, device="meta")}), ValueError, "weights['a']:"),
    # already right: pinned
    ("k-0d-tensor", dict(k=torch.tensor(2)), TypeError, "k:"),
    ("k-float", dict(k=2.0), TypeError, "k:"),
    ("k-huge", dict(k=2 ** 70), ValueError, "k:"),
    ("unit_norm-none", dict(unit_norm=None), TypeError, "unit_norm:"),
    ("reverse-str", dict(reverse="True"), TypeError, "reverse:"),
    ("modules-bytes-entry", dict(modules=[b"a"]), ValueError, "modules:"),
    ("weights-bool-tensor", dict(weights={"a": torch.tensor(True)}), ValueError, "weights['a']:"),
    ("weights-two-entries", dict(weights={"a": torch.tensor([1.0, 2.0])}), ValueError, "weights['a']:"),
    ("weights-complex", dict(weights={"a": 1 + 0j}), ValueError, "weights['a']:"),
    ("batch_rows-bool", dict(batch_rows=True), TypeError, "batch_rows:"),
    ("backend-capitalised", dict(backend="Torch"), ValueError, "backend:"),
    ("projection-numpy-seed", dict(projection={"seed": np.int64(0)}), TypeError, "projection:"),
    ("precondition-complex", dict(precondition=torch.eye(7, dtype=torch.cfloat)), TypeError, "precondition:"),
    ("precondition-sparse", dict(precondition=torch.eye(7).to_sparse()), TypeError, "precondition:"),
    ("queries-numpy", dict(queries=np.ones((1, 7), np.float32)), TypeError, "queries:"),
    ("queries-0d", dict(queries=torch.tensor(1.0)), ValueError, "queries:"),
    ("queries-f64-past-f32", dict(queries=torch.full((1, 7), 1e300, dtype=torch.float64)), ValueError, "queries:"),
]


@pytest.mark.parametrize("kw,exc,prefix", [r[1:] for r in SEARCH_ROWS], ids=[r[0] for r in SEARCH_ROWS])
def test_fixed_search_refusals_leave_the_index_usable(built, kw, exc, prefix):
    ix, x = built
    q = torch.randn(3, 7)
    q0 = q.clone()
    args = dict(queries=q, k=2, projection={"seed": 0})
    args.update(kw)
    _expect(lambda: ix.search(**args), exc, prefix)
    assert torch.equal(q, q0)
    _same(ix.search(q, 2, projection={"seed": 0}), _ref(x, q, 2))


def test_fixed_sparse_rows_refused_by_name(built):
    ix, _ = built
    r = torch.tensor([1, 2]).to_sparse()
    _expect(lambda: ix.get(r), TypeError, "rows:")
    _expect(lambda: ix.example_of(r), TypeError, "rows:")
    assert ix.get(torch.tensor([1, 2])).shape == (2, 7)


def test_search_unusual_valid_queries_match_float64(built):
    """numpy k, float64 / float16 / bfloat16 / strided / expanded / 3-D queries, dict queries of mixed dtypes and
    layouts, numpy and 0-d tensor weights, module selections as numpy arrays and generators, against a float64
    brute force; the caller's queries are never changed (unit_norm divides copies)."""
    ix, x = built
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 7, generator=g)
    forms = {"f32": q, "f64": q.double(), "strided": torch.randn(6, 14, generator=g)[:, ::2],
             "transposed": q.T.contiguous().T, "expanded": q[:1].expand(4, 7)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IX.UncheckedProjectionWarning)
        for name, f in forms.items():
            keep = f.clone()
            for unit in (False, True):
                for rev in (False, True):
                    _same(ix.search(f, np.int64(5), unit_norm=unit, reverse=np.bool_(rev)), _ref(x, f, 5, unit, rev))
            assert torch.equal(f, keep), name
        for half in (torch.float16, torch.bfloat16):  # half queries score as their float32 values
            qh = q.to(half)
            _same(ix.search(qh, 4, unit_norm=True), _ref(x, qh.float(), 4, True))
        _same(ix.search(q.reshape(2, 3, 7), np.int32(3)), tuple(t.reshape(2, 3, 3) for t in _ref(x, q, 3)))
        d = {"b": q[:, 4:].double().T.contiguous().T, "a": q[:, :4].half()}
        _same(ix.search(d, 4, batch_rows=np.int64(7)), _ref(x, torch.cat([q[:, :4].half().float(), q[:, 4:]], 1), 4))
        _same(ix.search(q, 3, weights={"a": np.float32(2.0), "b": torch.tensor(0.5)}, modules=np.array(["a", "b"])),
              _ref(x, q, 3, wa=2.0, wb=0.5))
        _same(ix.search(q, 3, modules=(m for m in ["b"]), reverse=True), _ref(x, q, 3, reverse=True, wa=0.0))
        # k = len(index), given as a numpy integer; an empty query batch
        s, i = ix.search(q[:2], np.uint8(40))
        assert sorted(i[0].tolist()) == list(range(40))
        s, i = ix.search(q[:0], np.int64(3))
        assert s.shape == (0, 3) and i.dtype == torch.int64


def test_fp16_queries_against_fp16_and_fp32_indexes(tmp_path):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(30, 6, generator=g)
    q = torch.randn(4, 6, generator=g).half()
    for dt in (torch.float16, torch.float32):
        with GI.create(tmp_path / str(dt), {"m": 6}, dtype=dt) as w:
            w.append(x)
        ix = GI.open(tmp_path / str(dt))
        stored = x.to(dt).double()
        for unit in (False, True):
            qq, xx = q.double(), stored
            if unit:
                qq, xx = qq / qq.norm(dim=1, keepdim=True), xx / xx.norm(dim=1, keepdim=True)
            want = torch.topk(qq @ xx.T, 5, dim=1)
            _same(ix.search(q, 5, unit_norm=unit), want)

"""Session 35: a bad-input sweep of the public APIs of gradkit.projection, index, golden, optim and scope.

The rule: bad input is a ValueError / TypeError whose message starts with the argument's name, raised before any
work, leaving what the user had as it was; numpy numbers are taken like Python ones. One row per defect fixed
(each failed before the fix: another exception type, a message naming something else, or a value silently taken),
plus rows pinning behaviours that were already right."""
import copy
import os

import numpy as np
import pytest
import torch

from gradkit import golden as G
from gradkit import index as IX
from gradkit import optim as O
from gradkit import projection as P
from gradkit import scope as S


def _expect(fn, exc, prefix):
    with pytest.raises(exc) as ei:
        fn()
    assert str(ei.value).startswith(prefix), str(ei.value)
    return ei.value


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("s35bad") / "idx"
    with IX.GradientIndex.create(path, {"a": 3, "b": 2}, dtype=torch.float32) as w:
        w.append(torch.arange(30, dtype=torch.float32).reshape(6, 5) / 7)
    return IX.GradientIndex.open(path)


def _w():
    return torch.arange(128, dtype=torch.float32).reshape(8, 16).sin()


def _scope(w):
    return S.ScopeSpec(S.BlockSpec(w, (1, 1)), (1, 4))


# (id, call, exception, message prefix): the call gets the module fixture's index
ROWS = [
    # projection: torch's RuntimeError / AssertionError for a bad device, its overflow errors for sizes past int64
    ("projection_matrix-device-unknown", lambda ix: P.projection_matrix(2, 3, device="nodev"), ValueError, "device:"),
    ("projection_matrix-device-negative", lambda ix: P.projection_matrix(2, 3, device=-1), ValueError, "device:"),
    ("projection_matrix-cols-past-int64", lambda ix: P.projection_matrix(2, 2 ** 70), ValueError, "cols:"),
    ("project-k-past-int64", lambda ix: P.project(torch.ones(2, 3), k=2 ** 70), ValueError, "k:"),
    ("factored_project-p-past-int64",
     lambda ix: P.factored_project(torch.ones(2, 3), torch.ones(2, 4), p=2 ** 70), ValueError, "p:"),
    ("adafactor-meta-row", lambda ix: P.AdafactorNormalizer(torch.ones(3, device="meta"), torch.ones(2)),
     ValueError, "row:"),
    ("adam-meta-v", lambda ix: P.AdamNormalizer(torch.ones(3, 2, device="meta")), ValueError, "v:"),
    ("adam-eps-huge-int", lambda ix: P.AdamNormalizer(torch.ones(3, 2), eps=2 ** 2000), ValueError, "eps:"),
    # index
    ("create-modules-dim-past-int64",
     lambda ix: IX.GradientIndex.create(ix.path.parent / "huge", {"a": 2 ** 70}), ValueError, "modules:"),
    ("create-overwrite-not-bool",
     lambda ix: IX.GradientIndex.create(ix.path.parent / "ow", {"a": 2}, overwrite="yes"), TypeError, "overwrite:"),
    ("search-weight-int-past-float", lambda ix: ix.search(torch.ones(1, 5), 2, weights={"a": 2 ** 2000}),
     ValueError, "weights['a']:"),
    ("search-precondition-not-a-matrix", lambda ix: ix.search(torch.ones(1, 5), 2, precondition="H"),
     TypeError, "precondition:"),
    ("search-precondition-not-square", lambda ix: ix.search(torch.ones(1, 5), 2, precondition=torch.ones(5, 4)),
     ValueError, "precondition:"),
    ("search-queries-meta", lambda ix: ix.search(torch.ones(1, 5, device="meta"), 2), ValueError, "queries:"),
    ("precondition-meta", lambda ix: IX.Precondition(torch.eye(3, device="meta")), ValueError, "matrix:"),
    ("precondition-damping-huge-int", lambda ix: IX.Precondition(torch.eye(3), damping=2 ** 2000),
     ValueError, "damping:"),
    # golden
    ("percent_to_k-numel-float", lambda ix: G.percent_to_k(10.5, 10), TypeError, "numel:"),
    ("percent_to_k-numel-negative", lambda ix: G.percent_to_k(-1, 10), ValueError, "numel:"),
    ("percent_to_k-numel-inf", lambda ix: G.percent_to_k(float("inf"), 10), TypeError, "numel:"),
    ("percent_to_k-numel-bool", lambda ix: G.percent_to_k(True, 10), TypeError, "numel:"),
    ("bitmask-shape-float", lambda ix: G.Bitmask(torch.zeros(3, dtype=torch.uint8), (4.0, 5)), TypeError, "shape:"),
    ("bitmask-shape-str", lambda ix: G.Bitmask(torch.zeros(3, dtype=torch.uint8), "45"), TypeError, "shape:"),
    ("bitmask-shape-none", lambda ix: G.Bitmask(torch.zeros(3, dtype=torch.uint8), None), TypeError, "shape:"),
    ("from_indices-float-positions", lambda ix: G.Bitmask.from_indices(torch.tensor([0.5, 3.0]), (4, 5)),
     TypeError, "indices:"),
    ("from_indices-none", lambda ix: G.Bitmask.from_indices(None, (4, 5)), TypeError, "indices:"),
    ("from_indices-shape-past-int64", lambda ix: G.Bitmask.from_indices([0], (2 ** 70,)), ValueError, "shape:"),
    ("golden_masks-return_counts-str",
     lambda ix: G.golden_masks([{"a": torch.ones(4)}], 50, return_counts="no"), TypeError, "return_counts:"),
    ("golden_masks-progress-int", lambda ix: G.golden_masks([{"a": torch.ones(4)}], 50, progress=1),
     TypeError, "progress:"),
    ("golden_masks-grad_iter-int", lambda ix: G.golden_masks(3, 50), TypeError, "grad_iter:"),
    ("golden_masks-params-int", lambda ix: G.golden_masks([{"a": torch.ones(4)}], 50, params=3),
     TypeError, "params:"),
    ("golden_masks-meta-gradient", lambda ix: G.golden_masks([{"a": torch.ones(4, device="meta")}], 50),
     ValueError, "grad_iter:"),
    ("accumulator-dtype-str", lambda ix: G.SparseGradientAccumulator({"a": torch.ones(4, dtype=torch.bool)},
                                                                      dtype="float32"), TypeError, "dtype:"),
    ("maskset-andnot-int", lambda ix: G.MaskSet({"a": torch.ones(4, dtype=torch.bool)}).andnot(3),
     TypeError, "other:"),
    # optim
    ("adamw-lr-int-past-float", lambda ix: O.MaskedAdamW({"p": torch.nn.Parameter(torch.ones(2))}, None,
                                                          2 ** 2000, 0.1), ValueError, "masked_lr:"),
    ("adamw-named_params-none", lambda ix: O.MaskedAdamW(None, None, 0.1, 0.1), TypeError, "named_params:"),
    ("adamw-non-leaf", lambda ix: O.MaskedAdamW({"p": torch.nn.Parameter(torch.ones(2)) * 2}, None, 0.1, 0.1),
     ValueError, "named_params['p']:"),
    # scope: messages of View / BlockSpec keep their class prefix
    ("view-offset-float", lambda ix: S.View(_w(), (8, 16), (16, 1), np.float64(0.5)), TypeError, "offset:"),
    ("view-offset-inf", lambda ix: S.View(_w(), (8, 16), (16, 1), float("inf")), TypeError, "offset:"),
    ("view-shape-float", lambda ix: S.View(_w(), (8.0, 16), (16, 1)), TypeError, "shape:"),
    ("view-stride-bool", lambda ix: S.View(_w(), (8, 16), (16, True)), TypeError, "stride:"),
    ("blockspec-shape-float", lambda ix: S.BlockSpec(_w(), (1, 4.5)), TypeError, "shape:"),
    ("scopespec-shape-float", lambda ix: S.ScopeSpec(S.BlockSpec(_w(), (1, 1)), (1, 4.0)), TypeError, "shape:"),
    ("view-pairs-not-a-tensor", lambda ix: S.View.pairs("W"), TypeError, "View.pairs: param:"),
    ("view-row_pairs-1d", lambda ix: S.View.row_pairs(torch.ones(16)), TypeError, "View.row_pairs: param:"),
    ("get_masks-block_scores-str", lambda ix: _scope(_w()).get_masks(2, block_scores="s"), TypeError,
     "block_scores:"),
    ("get_masks-block_mask-list", lambda ix: _scope(_w()).get_masks(2, block_mask=[1]), TypeError, "block_mask:"),
    ("check_nm-not-a-tensor", lambda ix: S.check_nm([[True]], 2, 4), TypeError, "mask:"),
    ("semi_structured-weight-not-a-tensor", lambda ix: S.semi_structured("W", torch.ones(1, 4, dtype=torch.bool)),
     TypeError, "weight:"),
    ("scopecoupling-kth_largest-names-k",
     lambda ix: S.ScopeCoupling([_scope(_w())]).kth_largest(-1), ValueError, "k:"),
    # already right: pinned
    ("pinned-project-seed-negative", lambda ix: P.project(torch.ones(2, 3), 4, seed=-1), ValueError, "seed:"),
    ("pinned-project-kind", lambda ix: P.project(torch.ones(2, 3), 4, kind="uniform"), ValueError, "kind:"),
    ("pinned-factored-bias-int", lambda ix: P.factored_project(torch.ones(2, 3), torch.ones(2, 4), 2, bias=1),
     TypeError, "bias:"),
    ("pinned-search-k-too-large", lambda ix: ix.search(torch.ones(1, 5), 7), ValueError, "k:"),
    ("pinned-search-nan-query", lambda ix: ix.search(torch.full((1, 5), float("nan")), 2), ValueError, "queries:"),
    ("pinned-get-float-rows", lambda ix: ix.get([0.5]), TypeError, "rows:"),
    ("pinned-open-missing", lambda ix: IX.GradientIndex.open(ix.path.parent / "nope"), FileNotFoundError, "path:"),
    ("pinned-topk_mask-int", lambda ix: G.topk_mask(torch.ones(4, dtype=torch.int64), 10), TypeError, "t:"),
    ("pinned-golden-percent-nan", lambda ix: G.golden_masks([{"a": torch.ones(4)}], float("nan")),
     ValueError, "percent:"),
    ("pinned-adamw-beta-one", lambda ix: O.MaskedAdamW({"p": torch.nn.Parameter(torch.ones(2))}, None, 0.1, 0.1,
                                                       betas=(0.9, 1.0)), ValueError, "betas[1]:"),
    ("pinned-scope-nnz-float", lambda ix: _scope(_w()).get_masks(2.0), TypeError, "nnz:"),
]


@pytest.mark.parametrize("call,exc,prefix", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_argument_is_named(built, call, exc, prefix):
    _expect(lambda: call(built), exc, prefix)
    if prefix in ("modules:", "overwrite:"):  # refused before the directory is made (a 2^70 dim made it before)
        assert sorted(os.listdir(built.path.parent)) == ["idx"]


def test_index_row_errors_are_index_and_value_errors(built):
    # IndexError (as Python / numpy raise, and earlier tests pin) that is also the ValueError of the rule
    for fn in (lambda: built.get([6]), lambda: built.example_of(torch.tensor([-7])),
               lambda: built.get(torch.ones(5, dtype=torch.bool))):
        e = _expect(fn, IndexError, "rows:")
        assert isinstance(e, ValueError)


def test_scope_missing_mapping_entry_is_key_and_value_error():
    w = _w()
    s = _scope(w)
    e = _expect(lambda: s.get_masks(2, values={}), KeyError, "values:")
    assert isinstance(e, ValueError)
    e = _expect(lambda: s.soft_threshold(torch.full((8, 4), 0.1), conditioners={}), KeyError, "conditioners:")
    assert isinstance(e, ValueError) and torch.equal(w, _w())


def test_numpy_numbers_taken_like_python_ones():
    a = P.AdafactorNormalizer(torch.ones(4), torch.ones(3), eps=np.float32(1e-30), bias_eps=np.int64(1))
    assert type(a.eps) is float and a.eps == float(np.float32(1e-30)) and a.bias_eps == 1.0
    v = torch.rand(4, 3) + 0.5
    x, g = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    want = P.factored_project(x, g, 2, normalizer=P.AdamNormalizer(v, eps=float(np.float32(1e-3))))
    got = P.factored_project(x, g, 2, normalizer=P.AdamNormalizer(v, eps=np.float32(1e-3)))
    assert torch.equal(got, want)
    assert IX.Precondition(torch.eye(3), damping=np.float32(0.5)).damping == 0.5
    assert IX.Precondition(torch.eye(3), damping=np.int64(2)).damping == 2.0
    assert G.percent_to_k(np.int64(1000), np.float32(10)) == 100
    assert G.Bitmask(torch.zeros(3, dtype=torch.uint8), (np.int64(4), 5)).shape == (4, 5)
    assert S.View(_w(), (np.int64(8), 16), (16, np.int32(1)), np.int64(0)).shape == (8, 16)


def test_empty_path_refused_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _expect(lambda: IX.GradientIndex.create("", {"a": 2}), ValueError, "path:")
    _expect(lambda: IX.GradientIndex.open(""), ValueError, "path:")
    assert os.listdir(tmp_path) == []


def test_append_refusals_write_nothing(tmp_path):
    with IX.GradientIndex.create(tmp_path / "i", {"a": 3}, dtype=torch.float32) as w:
        w.append(torch.ones(2, 3))
        _expect(lambda: w.append(torch.ones(2, 3), commit="no"), TypeError, "commit:")
        _expect(lambda: w.append(torch.ones(2, 3), commit=None), TypeError, "commit:")
        _expect(lambda: w.append(torch.ones(2, 3, device="meta")), ValueError, "grads:")
        _expect(lambda: w.append({"a": torch.ones(2, 3, device="meta")}), ValueError, "grads['a']:")
        assert len(w) == 2
    assert len(IX.GradientIndex.open(tmp_path / "i")) == 2


def test_project_out_refused_before_any_work():
    x = torch.randn(3, 10)
    out = torch.zeros(1, 4).expand(3, 4)
    _expect(lambda: P.project(x, 4, out=out), ValueError, "out:")
    assert not out.any()
    leaf = torch.zeros(3, 4, requires_grad=True)
    _expect(lambda: P.project(x, 4, out=leaf), ValueError, "out:")
    assert not leaf.detach().any()
    with torch.no_grad():  # writing a leaf that requires grad is fine there, as torch's own copy_
        assert torch.equal(P.project(x, 4, out=leaf), P.project(x, 4))


def test_soft_threshold_scale_must_be_a_bool():
    w = _w()
    s = _scope(w)
    _expect(lambda: s.soft_threshold(torch.full((8, 4), 0.1), scale="no"), TypeError, "scale:")
    c = S.ScopeCoupling([s])
    _expect(lambda: c.soft_threshold(torch.full((8, 4), 0.1), scale=0), TypeError, "scale:")
    assert torch.equal(w, _w())


def test_adamw_load_state_dict_refuses_malformed_before_any_change():
    p = torch.nn.Parameter(torch.ones(4, 5))
    opt = O.MaskedAdamW({"p": p}, {"p": torch.ones(4, 5, dtype=torch.bool)}, 0.1, 0.01)
    p.grad = torch.full((4, 5), 0.5)
    opt.step()
    sd = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    bad = [lambda d: d["param_groups"][0].pop("masked_lr"), lambda d: d["param_groups"][0].pop("params"),
           lambda d: d.__setitem__("param_groups", [3]), lambda d: d.__setitem__("param_shapes", [[4, 5]]),
           lambda d: d.__setitem__("state", [1]), lambda d: d.__setitem__("masks", [1]),
           lambda d: d["state"][0].__setitem__("step", torch.tensor(1.0, device="meta")),
           lambda d: d["state"][0].__setitem__("exp_avg", torch.ones(4, 5, dtype=torch.complex64)),
           lambda d: d["state"][0].__setitem__("exp_avg_sq", torch.ones(4, 5, device="meta"))]
    for mutate in bad:
        d = copy.deepcopy(sd)
        mutate(d)
        _expect(lambda: opt.load_state_dict(d), ValueError, "state_dict:")
        now = opt.state_dict()
        assert all(torch.equal(now["state"][0][k], before["state"][0][k]) for k in before["state"][0])
        assert torch.equal(now["masks"]["p"], before["masks"]["p"])

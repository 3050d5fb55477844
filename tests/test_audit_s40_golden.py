"""Audit (s40) of gradkit.golden (GoldenParams-style selection: percent_to_k, topk_mask, golden_masks over samples,
Bitmask / MaskSet / load_goldenparams, SparseGradientAccumulator), gradkit.compat.gradiend (GRADIEND prune) and
gradkit._rules, against a plain-PyTorch computation of the documented rule (top-k of |g| by a stable sort: ties
lowest flat position first, NaN never) and against gradiend itself.

Tests marked ``# DEFECT:`` failed on the code before session 40's fixes because of the defect they describe; the
others pass: cases checked and found correct."""
import copy
import math

import numpy as np
import pytest
import torch

from gradiend.model.param_mapped import ParamMappedGradiendModel

import gradkit.golden as G
from gradkit import ParamMap
from gradkit._rules import all_finite, ceil_count
from gradkit.compat.gradiend import accelerate

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- plain-PyTorch oracles


def _plain_top(g: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |g| (flat, row-major), ties lowest position first, NaN never."""
    a = g.detach().double().abs().reshape(-1)
    a = torch.where(torch.isnan(a), torch.full_like(a, -1.0), a)
    m = torch.zeros(a.numel(), dtype=torch.bool)
    m[torch.sort(a, descending=True, stable=True).indices[:k]] = True
    return m & (a >= 0)


def _plain_golden(samples, pct, scope):
    names = list(samples[0])
    inter, counts = None, {n: torch.zeros(samples[0][n].shape, dtype=torch.int32) for n in names}
    history = []
    for s in samples:
        if scope == "tensor":
            cur = {n: _plain_top(s[n], G.percent_to_k(s[n].numel(), pct)) for n in names}
        else:
            flat = torch.cat([s[n].detach().double().reshape(-1) for n in names])
            sel = _plain_top(flat, G.percent_to_k(flat.numel(), pct))
            cur, off = {}, 0
            for n in names:
                cur[n] = sel[off:off + s[n].numel()]
                off += s[n].numel()
        for n in names:
            counts[n] += cur[n].reshape(counts[n].shape).int()
        inter = cur if inter is None else {n: inter[n] & cur[n] for n in names}
        history.append(sum(int(m.sum()) for m in inter.values()))
    return {n: inter[n].reshape(samples[0][n].shape) for n in names}, counts, history


def _samples(seed, n=3, nan=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # small integers: many ties at the k-th value
        d = {"w": torch.randint(-3, 4, (12, 9), generator=g).float(),
             "b": torch.randint(-3, 4, (31,), generator=g).half(),
             "empty": torch.empty(0, 4),
             "scalar": torch.tensor(2.0, dtype=torch.float64),
             "ln": torch.randint(-3, 4, (7, 5), generator=g).bfloat16()}
        if nan:
            d["w"][1, :4] = math.nan
            d["b"][3] = math.inf
            d["ln"][0, 0] = -math.inf
        out.append(d)
    return out


# ----------------------------------------------------------------------------- selections vs plain PyTorch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_topk_mask_is_the_stable_plain_topk(dtype):
    # checked: per dtype, ties / NaN / +-inf / non-contiguous input, exactly the stable-sort top-k of |t|
    g = torch.Generator().manual_seed(3)
    for trial in range(4):
        t = torch.randint(-4, 5, (9, 14), generator=g).to(dtype)
        if trial % 2:
            t[0, :3] = math.nan
            t[2, 5], t[4, 1] = math.inf, -math.inf
        t = t.t() if trial >= 2 else t
        for pct in (0.5, 7, 33.3, 50, 99.9, 100):
            want = _plain_top(t, G.percent_to_k(t.numel(), pct)).reshape(t.shape)
            assert torch.equal(G.topk_mask(t, pct), want), (trial, pct)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("nan", [False, True])
def test_golden_masks_counts_and_history_match_plain(scope, nan):
    samples = _samples(5, nan=nan)
    for pct in (1, 12.5, 50, 100):
        r = G.golden_masks(iter(samples), pct, scope=scope, return_counts=True)
        masks, counts, history = _plain_golden(samples, pct, scope)
        assert r.samples == 3 and r.history == history
        for n in masks:
            assert torch.equal(r.masks[n].to_bool(), masks[n]), (pct, n)
            assert torch.equal(r.counts[n], counts[n]), (pct, n)
            assert r.summary[n]["active"] == int(masks[n].sum())


def test_golden_masks_are_deterministic_and_ignore_the_layout_of_each_gradient():
    base = _samples(7, n=2)
    r1 = G.golden_masks(base, 30, scope="global")
    r2 = G.golden_masks(copy.deepcopy(base), 30, scope="global")
    assert all(r1.masks[n] == r2.masks[n] for n in r1.masks)
    # the same values held transposed-then-back / expanded: the same masks
    strided = [{**s, "w": s["w"].t().contiguous().t()} for s in base]
    r3 = G.golden_masks(strided, 30, scope="global")
    assert all(r1.masks[n] == r3.masks[n] for n in r1.masks)
    row = torch.tensor([1.0, -5.0, 2.0])
    exp = G.golden_masks([{"e": row.expand(4, 3)}], 25)
    assert exp.masks["e"].to_bool().tolist() == [[False, True, False], [False, True, False],
                                                 [False, True, False], [False, False, False]]


def test_zero_element_and_zero_dim_gradients():
    for scope in ("tensor", "global"):
        r = G.golden_masks([{"z": torch.empty(0, 3), "s": torch.tensor(-4.0)}], 10, scope=scope)
        assert r.masks["z"].shape == (0, 3) and r.masks["z"].count() == 0
        assert r.masks["s"].to_bool().item() is True
        only_empty = G.golden_masks([{"z": torch.empty(0)}], 10, scope=scope)
        assert only_empty.masks.count() == 0 and only_empty.history == [0]


def test_all_nan_tensor_selects_nothing_and_fewer_finite_than_k():
    t = torch.tensor([math.nan, 1.0, math.nan, 2.0])
    assert G.topk_mask(t, 100).tolist() == [False, True, False, True]
    assert not G.topk_mask(torch.full((5,), math.nan), 50).any()


# ----------------------------------------------------------------------------- percent


@pytest.mark.parametrize("bad", [0, -1, -0.0, 100.0001, 1e9, math.nan, math.inf, -math.inf, True, False, "5", None,
                                 np.bool_(True), torch.tensor(5.0), np.float32("nan")])
def test_bad_percent_refused_by_name_before_any_work(bad):
    consumed = []

    def gen():
        consumed.append(1)
        yield {"w": torch.randn(4)}

    with pytest.raises(ValueError, match="^percent: "):
        G.golden_masks(gen(), bad)
    assert consumed == []  # refused before the first sample was drawn
    with pytest.raises(ValueError, match="^percent: "):
        G.topk_mask(torch.randn(4), bad)
    with pytest.raises(ValueError, match="^percent: "):
        G.percent_to_k(10, bad)


def test_percent_to_k_is_goldenparams_ceil_with_at_least_one():
    for n in (1, 2, 3, 7, 64, 768, 1000, 12345):
        for p in (1e-9, 0.5, 1, 2.5, 5, 33.3, 50, 99.99, 100):
            exact = max(1, min(n, math.ceil(n * __import__("fractions").Fraction(str(p)) / 100)))
            assert G.percent_to_k(n, p) == exact, (n, p)
    assert G.percent_to_k(0, 50) == 0


@pytest.mark.parametrize("p,n,k", [(np.float32(1.1), 1000, 11), (np.float32(0.1), 1000, 1),
                                   (np.float16(1.1), 1000, 11), (np.float32(0.57), 10000, 57),
                                   (np.float32(5.0), 10**8 + 1, 5000001), (np.float32(0.5), 10**8 + 1, 500001)])
def test_numpy_float32_percent_read_as_written(p, n, k):
    # DEFECT: percent_to_k reads "the decimal the user wrote" for a Python float (1.1% of 1000 is 11) but took a numpy
    # float32 / float16 percent at its double value: np.float32(1.1) is 1.10000002384..., whose product 11.0000002 is
    # far beyond a double's rounding allowance, so it kept 12 entries of 1000 (np.float32(0.1): 2 instead of 1). The
    # numpy scalars are explicitly accepted (s34). Correct: the decimal numpy prints for the value (shortest round-trip).
    assert G.percent_to_k(n, p) == k
    if n == 1000:
        assert G.golden_masks([{"w": torch.arange(1000.0)}], p).masks["w"].count() == k


# ----------------------------------------------------------------------------- bad gradients, named


def test_sparse_gradient_refused_by_name():
    # DEFECT: a sparse COO gradient (nn.Embedding(sparse=True) gives them) passed the floating check and failed deep in
    # torch with "RuntimeError: unsupported memory format option Contiguous", naming nothing. Correct: TypeError
    # naming the sample and the entry; the same for topk_mask.
    g = torch.randn(4, 4).to_sparse()
    with pytest.raises(TypeError, match=r"grad_iter: sample 0, 'emb'.*sparse"):
        G.golden_masks([{"emb": g}], 10)
    with pytest.raises(TypeError, match=r"grad_iter: sample 1, 'emb'"):
        G.golden_masks([{"emb": torch.randn(4, 4)}, {"emb": g}], 10, scope="global")
    with pytest.raises(TypeError, match=r"^t: "):
        G.topk_mask(g, 10)


def test_float8_gradients_selected_exactly():
    # DEFECT: float8 gradients raised "g: expected a floating tensor, got torch.float8_e4m3fn" (an internal name) in
    # the tensor scope and topk_mask, NotImplementedError (nan_to_num) in the global scope, and "src[1]: ..." in the
    # accumulator. Correct: widened to float32 (exact), selecting what the float32 values select.
    g = torch.Generator().manual_seed(11)
    samples = [{"a": (torch.randn(6, 5, generator=g) * 4).to(torch.float8_e4m3fn),
                "b": (torch.randn(9, generator=g) * 4).to(torch.float8_e5m2)} for _ in range(2)]
    wide = [{n: t.float() for n, t in s.items()} for s in samples]
    for scope in ("tensor", "global"):
        r = G.golden_masks(samples, 20, scope=scope)
        ref = G.golden_masks(wide, 20, scope=scope)
        assert all(r.masks[n] == ref.masks[n] for n in ref.masks)
    assert torch.equal(G.topk_mask(samples[0]["a"], 20), G.topk_mask(wide[0]["a"], 20))
    acc = G.SparseGradientAccumulator({"a": torch.ones(6, 5, dtype=torch.bool), "b": torch.ones(9, dtype=torch.bool)})
    acc.add(samples[0])
    assert torch.equal(acc.to_dense()["b"], wide[0]["b"])
    with pytest.raises(TypeError, match="^dtype: "):
        G.SparseGradientAccumulator({"a": torch.ones(2, dtype=torch.bool)}, dtype=torch.float8_e4m3fn)


def test_bad_gradients_and_selections_named():
    with pytest.raises(ValueError, match="^params: "):  # DEFECT: was "grad_iter: the first sample holds no gradients"
        G.golden_masks([{"a": torch.randn(3)}], 10, params=[])
    with pytest.raises(ValueError, match=r"^grad_iter: sample 0 has no gradient for 'zz'"):
        G.golden_masks([{"a": torch.randn(3)}], 10, params=["zz"])
    with pytest.raises(ValueError, match="^params: "):
        G.golden_masks([{"a": torch.randn(3)}], 10, params=["a", "a"])
    with pytest.raises(TypeError, match=r"^grad_iter: sample 0, 'a'"):
        G.golden_masks([{"a": torch.tensor([1, 2])}], 10)
    with pytest.raises(TypeError, match=r"^grad_iter: sample 0, 'a'"):
        G.golden_masks([{"a": torch.randn(3, dtype=torch.complex64)}], 10)
    with pytest.raises(ValueError, match=r"^grad_iter: sample 1, 'a': shape"):
        G.golden_masks([{"a": torch.randn(3)}, {"a": torch.randn(4)}], 10)
    with pytest.raises(ValueError, match="^scope: "):
        G.golden_masks([{"a": torch.randn(3)}], 10, scope="layer")
    with pytest.raises(TypeError, match="^return_counts: "):
        G.golden_masks([{"a": torch.randn(3)}], 10, return_counts="no")


def test_params_restricts_and_orders_the_global_tie_break():
    # ties in the global scope: lowest position in params order first
    s = {"a": torch.ones(3), "b": torch.ones(3)}
    ab = G.golden_masks([s], 50, scope="global", params=["a", "b"])
    ba = G.golden_masks([s], 50, scope="global", params=["b", "a"])
    assert ab.masks["a"].count() == 3 and ab.masks["b"].count() == 0
    assert ba.masks["b"].count() == 3 and ba.masks["a"].count() == 0
    only_b = G.golden_masks([{"a": torch.randn(2), "b": torch.tensor([1.0, 3.0])}], 50, params=["b"])
    assert list(only_b.masks) == ["b"] and only_b.masks["b"].to_bool().tolist() == [False, True]


# ----------------------------------------------------------------------------- masks: conversion, files


def test_hybrid_coo_mask_read_as_its_dense_form(tmp_path):
    # DEFECT: a hybrid sparse COO mask (dense trailing dims, mask.to_sparse(1)) raised "IndexError: too many indices
    # for tensor of dimension 2" in Bitmask.from_coo (and so in coerce / MaskSet / load_goldenparams). Correct: the
    # entries whose stored value is non-zero, as .to_dense() != 0 gives them.
    g = torch.Generator().manual_seed(2)
    dense = torch.rand(5, 3, 4, generator=g) < 0.3
    dense[1] = False  # a row stored by no index
    for sd in (1, 2, 3):
        hyb = dense.to_sparse(sd)
        assert torch.equal(G.Bitmask.from_coo(hyb).to_bool(), dense)
        f = dense.float().to_sparse(sd)
        assert torch.equal(G.Bitmask.coerce(f).to_bool(), f.to_dense() != 0)
    path = tmp_path / "r.pt"
    torch.save({"masks": {"w": dense.to_sparse(1)}}, path)
    assert torch.equal(G.load_goldenparams(str(path))["w"].to_bool(), dense)


def test_csr_mask_refused_by_name():
    # DEFECT: a CSR bool mask went to pack_bitmask and raised "RuntimeError: Sparse CSR tensors do not have
    # is_contiguous". Correct: TypeError naming the argument.
    m = (torch.rand(4, 4) < 0.5).to_sparse_csr()
    with pytest.raises(TypeError, match=r"^masks\['w'\]: .*sparse_csr"):
        G.MaskSet({"w": m})
    with pytest.raises(TypeError, match="^mask: "):
        G.Bitmask.from_bool(m)


def test_maskset_roundtrips_and_algebra_match_plain_bool(tmp_path):
    g = torch.Generator().manual_seed(4)
    a = {"w": torch.rand(6, 7, generator=g) < 0.4, "b": torch.rand(9, generator=g) < 0.5, "z": torch.zeros(0, 2).bool()}
    b = {n: torch.rand(m.shape, generator=g) < 0.5 for n, m in a.items()}
    A, B = G.MaskSet(a), G.MaskSet(b)
    for got, want in (((A & B), {n: a[n] & b[n] for n in a}), ((A | B), {n: a[n] | b[n] for n in a}),
                      ((A ^ B), {n: a[n] ^ b[n] for n in a}), (A.andnot(B), {n: a[n] & ~b[n] for n in a}),
                      ((~A), {n: ~a[n] for n in a})):
        assert {n: torch.equal(got[n].to_bool(), want[n]) for n in a} == {n: True for n in a}
    assert A.count() == sum(int(m.sum()) for m in a.values())
    # the forms GoldenParams keeps / saves, through a file loaded with weights_only=True
    path = tmp_path / "golden.pt"
    torch.save({"intersection_masks": A.to_coo(), "summary": {}}, path)
    back = G.load_goldenparams(str(path))
    assert all(back[n] == A[n] for n in a)
    assert all(G.MaskSet.from_parammap(A.to_parammap())[n] == A[n] for n in a)
    idx = A.to_indices()
    assert all(torch.equal(idx[n], a[n].reshape(-1).nonzero().reshape(-1)) for n in a)


def test_damaged_or_pickled_files_refused_naming_the_path(tmp_path):
    good = tmp_path / "g.pt"
    torch.save({"masks": {"w": torch.ones(3, dtype=torch.bool)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"^path: .*cut\.pt"):
        G.load_goldenparams(str(cut))
    obj = tmp_path / "obj.pt"
    torch.save({"masks": {"w": torch.ones(3, dtype=torch.bool)}, "extra": _Evil()}, obj)
    _Evil.ran = False
    with pytest.raises(ValueError, match=r"^path: "):
        G.load_goldenparams(str(obj))
    assert _Evil.ran is False
    with pytest.raises(ValueError, match=r"none of the keys"):
        G.load_goldenparams(str(good), key="intersection_masks")


class _Evil:
    ran = False

    def __reduce__(self):
        return (_Evil._run, ())

    @staticmethod
    def _run():
        _Evil.ran = True
        return _Evil


# ----------------------------------------------------------------------------- accumulation over batches


def test_accumulator_sums_only_masked_entries_over_batches_and_fails_atomically():
    g = torch.Generator().manual_seed(6)
    masks = {"w": torch.rand(5, 4, generator=g) < 0.4, "b": torch.rand(3, generator=g) < 0.7,
             "z": torch.zeros(0, 2, dtype=torch.bool)}
    acc = G.SparseGradientAccumulator(masks, dtype=torch.float64)
    batches = [{"w": torch.randn(5, 4, generator=g), "b": torch.randn(3, generator=g).half(),
                "z": torch.randn(0, 2)} for _ in range(3)]
    for bt in batches:
        acc.add(bt)
    dense = acc.to_dense()
    for n, m in masks.items():
        want = sum(bt[n].double() for bt in batches) * m
        assert torch.allclose(dense[n], want, rtol=0, atol=1e-12)
        assert torch.allclose(acc.mean()[n], acc.values()[n] / 3)
    before = acc._flat.clone()
    with pytest.raises(ValueError, match=r"^grads\['b'\]: shape"):
        acc.add({"w": torch.randn(5, 4), "b": torch.randn(4), "z": torch.randn(0, 2)})
    assert torch.equal(acc._flat, before) and acc.steps == 3  # nothing half-added


def test_accumulator_takes_a_tied_parameter_by_any_name():
    # DEFECT: add(model) looked gradients up through named_parameters(), which lists a tied parameter under its first
    # name only, so a mask named by the other name ("head.weight", as state_dict and named_parameters(
    # remove_duplicate=False) name it) raised "grads: no gradient for 'head.weight'" though the gradient was there.
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    model.emb.weight.grad = torch.arange(15.0).reshape(5, 3)
    m = torch.zeros(5, 3, dtype=torch.bool)
    m[1, 2] = m[4, 0] = True
    for name in ("emb.weight", "head.weight"):
        acc = G.SparseGradientAccumulator({name: m})
        acc.add(model)
        assert acc.values()[name].tolist() == [5.0, 12.0]


# ----------------------------------------------------------------------------- _rules


def test_all_finite_on_float8():
    # DEFECT: all_finite raised NotImplementedError ("aminmax_cpu" not implemented for 'Float8_e4m3fn'); torch's
    # isfinite has no float8 kernel either. Correct: the answer, through an exact float32 widening.
    assert all_finite(torch.tensor([1.0, -2.0]).to(torch.float8_e4m3fn))
    assert not all_finite(torch.tensor([1.0, math.nan]).to(torch.float8_e4m3fn))
    assert not all_finite(torch.tensor([1.0, math.inf]).to(torch.float8_e5m2))
    assert all_finite(torch.tensor([1, 2])) and not all_finite(torch.tensor([1.0, -math.inf]))


def test_ceil_count_is_exact_on_the_decimal():
    from fractions import Fraction
    for n in (3, 100, 1000, 99991):
        for p in ("0.57", "1.1", "1.13", "7", "33.3", "99.99"):
            assert ceil_count(n, float(p), 100) == math.ceil(n * Fraction(p) / 100), (n, p)


# ----------------------------------------------------------------------------- GRADIEND prune


def _pair(seed=5):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    spec = {"0.weight": {"shape": (6, 8), "repr": "mask", "mask": torch.rand(6, 8, generator=g) < 0.5},
            "0.bias": {"shape": (6,), "repr": "all"},
            "2.weight": {"shape": (3, 6), "repr": "indices", "indices": torch.tensor([0, 2, 5, 7, 11, 17])}}
    n = ParamMap(spec).input_dim
    ref = ParamMappedGradiendModel(n, 2, spec, device=torch.device("cpu"))
    return ref, accelerate(copy.deepcopy(ref)), n


def _prune_both(ref, fast, **kw):
    out = []
    for m in (ref, fast):
        try:
            out.append(m.prune(return_mask=True, **kw)[1])
        except (TypeError, ValueError) as e:
            out.append(type(e))
    return out


def test_prune_selection_matches_gradiend_at_the_edges():
    ref, fast, n = _pair()
    g = torch.Generator().manual_seed(9)
    imp = torch.rand(n, generator=g)
    imp_int = torch.randperm(n, generator=g)
    cases = [dict(topk=1, importance=imp), dict(topk=n, importance=imp), dict(topk=10 * n, importance=imp),
             dict(topk=1e-9, importance=imp), dict(topk=0.25, importance=imp), dict(topk=0.999, importance=imp),
             dict(topk=3, importance=imp_int), dict(threshold=0.5, importance=imp),
             dict(threshold=0.3, topk=4, importance=imp), dict(threshold=0.0, importance=-imp),
             dict(mask=imp > 0.4, topk=0.5, importance=imp), dict(mask=torch.zeros(n, dtype=torch.bool)),
             dict(mask=torch.zeros(n, dtype=torch.bool), topk=2, importance=imp),
             dict(topk=0, importance=imp), dict(topk=-1, importance=imp), dict(topk=1.5, importance=imp),
             dict(topk=0.0, importance=imp), dict(topk=math.nan, importance=imp), dict(topk=True, importance=imp),
             dict(topk=np.int64(3), importance=imp), dict(threshold=-0.1, importance=imp),
             dict(topk=3, importance=imp[:-1]), dict(topk=3, importance=imp.reshape(1, -1))]
    for kw in cases:
        r, f = _prune_both(ref, fast, **kw)
        if isinstance(r, type):
            assert f is r, kw  # the same exception type as GRADIEND
        else:
            assert torch.is_tensor(f) and torch.equal(r, f), kw


def test_prune_ties_and_nan_documented_differences():
    ref, fast, n = _pair()
    tie = torch.ones(n)
    _, keep = fast.prune(topk=3, importance=tie, return_mask=True)
    assert keep.nonzero().reshape(-1).tolist() == [0, 1, 2]  # lowest input positions, deterministic
    nan = torch.rand(n)
    nan[4] = math.nan
    with pytest.raises(ValueError, match="importance"):  # GRADIEND's topk ranks NaN first
        fast.prune(topk=3, importance=nan)
    # a threshold drops NaN, as GRADIEND's >= does
    r, f = _prune_both(ref, fast, threshold=0.2, importance=nan)
    assert torch.equal(r, f) and not f[4]
    with pytest.raises(ValueError, match="^threshold: "):
        fast.prune(threshold=math.nan, importance=torch.rand(n))
    # a bool importance is refused by name (GRADIEND's threshold would read it as 0 / 1): documented
    with pytest.raises(TypeError, match="importance"):
        fast.prune(threshold=0.5, importance=torch.rand(n) > 0.5)


def test_reverse_golden_reads_numpy_float32_percent_as_written():
    # golden_reverse.layer_filter / reverse_golden_masks share golden.percent_to_k's reading of a float32 percent
    import numpy as np
    from gradkit import golden_reverse

    assert golden_reverse._check_percent(np.float32(1.1), "percent") == 1.1
    assert golden_reverse._check_percent(np.float32(0.1), "last_percent") == 0.1
    assert golden_reverse._check_percent(np.float64(1.1), "percent") == 1.1
    with pytest.raises(ValueError, match="percent"):
        golden_reverse._check_percent(np.float32("nan"), "percent")

"""s40 README audit: concrete behavioural claims of README.md's Python-API sections that neither
`tests/test_readme_examples.py` (runs every snippet) nor `tests/test_audit_s34_readme.py` checks, spot-checked at tiny
sizes against plain-PyTorch computations. Each test quotes the README sentence it checks.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from gradkit import ParamMap

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------- param-map

def test_parammap_storage_picks_smaller_of_mask_and_index_list(tmp_path):
    # README: "Ascending selections are stored in whichever of mask / index list is smaller (GRADIEND's rule);
    # an unsorted index list is always stored as written"
    def saved(spec):
        d = str(tmp_path / str(len(os.listdir(tmp_path))))
        ParamMap({"w": spec}).save(d)
        return json.load(open(os.path.join(d, "config.json")))["mapping"]["mode"], sorted(os.listdir(d))

    few = saved({"shape": (1000,), "repr": "indices", "indices": torch.tensor([1, 5, 9])})
    assert few == ("indices", ["config.json", "mapping_indices.safetensors"])
    m = torch.ones(1000, dtype=torch.bool)
    m[3] = False
    assert saved({"shape": (1000,), "repr": "mask", "mask": m}) == ("mask", ["config.json", "mapping_masks.safetensors"])
    # an ascending index list of 999 positions is still written as a mask (the smaller encoding)
    asc = torch.tensor([i for i in range(1000) if i != 3])
    assert saved({"shape": (1000,), "repr": "indices", "indices": asc})[0] == "mask"
    # unsorted: kept as an index list whatever its size, and the order survives a load
    uns = torch.cat([asc[500:], asc[:500]])
    d = str(tmp_path / "uns")
    ParamMap({"w": {"shape": (1000,), "repr": "indices", "indices": uns}}).save(d)
    assert json.load(open(os.path.join(d, "config.json")))["mapping"]["mode"] == "indices"
    back = ParamMap.load(d)
    assert [i for _, i in back.base_global_index([0, 1, 998])] == [uns[0].item(), uns[1].item(), uns[998].item()]


def test_parammap_bad_out_refused_before_any_write():
    # README: "Bad input (... a wrong `out`) raises ValueError/TypeError naming the argument, before anything is
    # written" -- the first entry's destination stays untouched when only the second one is wrong
    lin = torch.nn.Linear(3, 2)
    pm = ParamMap.from_model(lin)
    flat = torch.ones(pm.input_dim)
    out = {"weight": torch.zeros(2, 3), "bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"out\['bias'\]"):
        pm.scatter(flat, out=out)
    assert not out["weight"].any()
    out = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2, dtype=torch.int32)}
    with pytest.raises(TypeError, match=r"out\['bias'\]"):
        pm.scatter(flat, out=out)
    assert not out["weight"].any()
    lin.weight.grad = torch.ones(2, 3)  # bias.grad stays None
    buf = torch.zeros(pm.input_dim)
    with pytest.raises(ValueError, match="grad is None"):
        pm.gather(lin, out=buf, accumulate=True)
    assert not buf.any()


def test_parammap_values_not_inspected_overflow_is_inf():
    # README: "gather / scatter copy NaN / Inf as they are, and a cast, sum or `scale` product past the destination
    # dtype is ±inf (as in torch)"
    pm = ParamMap({"w": {"shape": (3,), "repr": "all"}})
    out = {"w": torch.tensor([0., 0., 3e38])}
    pm.scatter(torch.tensor([1e38, NAN, 3e38]), out=out, mode="add", scale=10.0)
    assert out["w"][0].item() == INF and out["w"][1].isnan() and out["w"][2].item() == INF
    half = {"w": torch.zeros(3, dtype=torch.float16)}
    pm.scatter(torch.tensor([1e6, -1e6, 1.0]), out=half)
    assert half["w"].tolist() == [INF, -INF, 1.0]


def test_parammap_prune_order_mask_threshold_topk():
    # README: "GRADIEND's order: mask, threshold, topk"; topk float = fraction of the survivors of mask and
    # threshold, rounded up
    pm = ParamMap({"w": {"shape": (6,), "repr": "all"}})
    imp = torch.tensor([5., 1, 3, 9, 2, 4])
    mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    # survivors of mask and threshold: 0 (5), 2 (3), 4 (2), 5 (4); half of 4 -> the two largest
    assert pm.prune(mask=mask, threshold=2.0, topk=0.5, importance=imp)[1].tolist() == [0, 5]
    # 0.3 of 4 survivors rounds up to 2 as well
    assert pm.prune(mask=mask, threshold=2.0, topk=0.3, importance=imp)[1].tolist() == [0, 5]
    with pytest.raises(ValueError, match="topk"):
        pm.prune(topk=0.0, importance=imp)


# ---------------------------------------------------------------------------------------------- scope

def test_scope_soft_threshold_nan_norm_and_inf_threshold():
    # README: "`soft_threshold` zeroes NaN-norm blocks, and a +inf threshold zeroes its block whatever it holds"
    from gradkit.scope import BlockSpec, ScopeSpec
    w = torch.tensor([[NAN, 1., 3., 4.]])
    ScopeSpec(BlockSpec(w, (1, 2)), (1, 2)).soft_threshold(torch.tensor([[0.0]]))
    assert w.tolist() == [[0.0, 0.0, 3.0, 4.0]]
    w = torch.tensor([[INF, 1., 3., 4.]])
    ScopeSpec(BlockSpec(w, (1, 2)), (1, 2)).soft_threshold(torch.tensor([[INF]]))
    assert w.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    # group-lasso prox against plain torch: w * max(0, 1 - t / ||w||) per block
    w = torch.tensor([[3., 4., 0.3, 0.4]])
    ref = w.clone().view(2, 2)
    ref = ref * (1 - 1.0 / ref.norm(dim=1, keepdim=True)).clamp_min(0)
    ScopeSpec(BlockSpec(w, (1, 2)), (1, 2)).soft_threshold(torch.tensor([[1.0]]))
    torch.testing.assert_close(w.view(2, 2), ref)


def test_scope_inf_scores_and_mid_kth_never_nan():
    # README: "an Inf element, or a sum past float32's range, scores +inf (ties among those go by index)";
    # "`mid_kth_largest` never returns NaN"
    from gradkit.scope import BlockSpec, ScopeSpec
    s = ScopeSpec(BlockSpec(torch.tensor([[1., INF, INF, 2.]]), (1, 1)), (1, 4))
    assert next(iter(s.get_masks(1).values())).tolist() == [[False, True, False, False]]
    big = ScopeSpec(BlockSpec(torch.tensor([[3e38, 3e38, 1., 2.]]), (1, 2)), (1, 2))
    norms = big.block_norms(None, 2)
    assert norms.flatten()[0].item() == INF and norms.flatten()[1].item() == pytest.approx(5 ** 0.5)
    allnan = ScopeSpec(BlockSpec(torch.full((1, 4), NAN), (1, 1)), (1, 4))
    assert not allnan.mid_kth_largest(None, 2).isnan().any()


def test_scope_view_and_coupling_errors():
    # README: "a View reaching outside its parameter or covering an element twice", "incompatible coupled grids -
    # the error names both -" raise before any work
    from gradkit.scope import BlockCoupling, BlockSpec, ScopeSpec, View
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="outside"):
        View(w, (4, 4), (4, 1), 1)
    with pytest.raises(ValueError, match="twice"):
        View(w, (4, 4), (1, 1), 0)
    with pytest.raises(ValueError) as e:
        BlockCoupling([BlockSpec(torch.randn(8, 4), (1, -1)), BlockSpec(torch.randn(4, 6), (-1, 1))], [(0, 1), (1, 0)])
    assert "(6, 1)" in str(e.value) and "(8, 1)" in str(e.value)
    w = torch.randn(2, 8)
    w0 = w.clone()
    s = ScopeSpec(BlockSpec(w, (1, 1)), (1, 4))
    for bad in (lambda: s.soft_threshold(torch.full((2, 2), 0.1), conditioners=torch.full((2, 8), INF)),
                lambda: s.soft_threshold(torch.full((2, 2), -1.0)),
                lambda: s.hard_threshold(thresholds=torch.full((2, 2), NAN))):
        with pytest.raises(ValueError):
            bad()
    assert torch.equal(w, w0)


# ---------------------------------------------------------------------------------------------- golden / optim

def test_golden_percent_rounding_and_layer_filter_floor():
    # README: "1.1% of 1000 entries is 11"; "layer_filter keeps GoldenParams' max(1, floor(layers * percent / 100))"
    import gradkit.golden as G
    assert G.golden_masks([{"w": torch.randn(1000)}], 1.1).masks["w"].count() == 11
    assert G.golden_masks([{"w": torch.randn(100)}], 1.5).masks["w"].count() == 2  # ceil(1.5)
    names = [f"h.{i}.a" for i in range(10)]
    assert G.layer_filter(names, 25) == ["h.8.a", "h.9.a"]  # floor(2.5)
    assert G.layer_filter(names, 1) == ["h.9.a"]  # max(1, 0)
    # per sample ANDed into the running mask
    r = G.golden_masks([{"w": torch.tensor([3., 2, 1, 0])}, {"w": torch.tensor([0., 2, 3, 1])}], 50)
    assert r.masks["w"].to_indices().tolist() == [1]


def test_masked_adamw_nan_grads_decay_rate_and_atomic_state_check():
    # README: "weight decay scaled by the same rate and applied once"; "NaN / Inf ones reach that entry's state and
    # weight as in torch.optim.AdamW (an entry with rate 0 stays unchanged)"; "it checks every parameter's state ...
    # before the first fused call, so an error never leaves some parameters stepped and others not"
    from gradkit.optim import MaskedAdamW
    p = torch.nn.Parameter(torch.ones(4))
    opt = MaskedAdamW([("p", p)], {"p": torch.tensor([True, True, False, False])}, masked_lr=0.1, unmasked_lr=0.0,
                      weight_decay=0.5)
    p.grad = torch.tensor([NAN, 1., NAN, 1.])
    opt.step()
    # entry 1: decay 1 - 0.1 * 0.5, then Adam's first step moves it by lr * sign(g) (bias-corrected)
    assert p.data[0].isnan() and p.data[1].item() == pytest.approx(0.95 - 0.1, abs=1e-6)
    assert p.data[2:].tolist() == [1.0, 1.0]
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = MaskedAdamW([("a", a), ("b", b)], None, masked_lr=0.1, unmasked_lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    opt.state[b]["exp_avg"] = torch.zeros(4)
    a0, step0 = a.detach().clone(), opt.state[a]["step"].clone()
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()
    assert torch.equal(a.detach(), a0) and torch.equal(opt.state[a]["step"], step0)


# ---------------------------------------------------------------------------------------------- OBS

@pytest.mark.parametrize("method", ["sparsegpt", "obd", "prune_local"])
def test_obs_baselines_do_not_depend_on_scale_of_h(method):
    # README: "Masks and weights do not depend on the scale of H (from session 40): every method works with
    # C / mean(diag(C))"
    import gradkit.scope as S
    from gradkit.obs import StructuredOBS, obd, sparsegpt
    torch.manual_seed(0)
    layer, X = torch.nn.Linear(16, 8), torch.randn(64, 16)
    H = X.T @ X
    w0 = layer.weight.detach().clone()
    sc = S.ScopeSpec(S.BlockSpec(layer.weight, (1, 1)), (1, 4))
    outs = []
    for s in (1.0, 1e4):
        with torch.no_grad():
            layer.weight.copy_(w0)
        if method == "sparsegpt":
            outs.append(sparsegpt(sc, H * s, 2))
        elif method == "obd":
            outs.append(obd(sc, H * s, 2))
        else:
            StructuredOBS(sc, H * s, damp=0.01).prune(2)
            outs.append(layer.weight.detach().clone())
    assert torch.equal(outs[0] != 0, outs[1] != 0)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_obs_resolve_is_least_squares_and_copies_full_rows():
    # README: "resolve(W, H, keep): the exact per-row least-squares re-solve on a support (...; fully kept rows are
    # copied without a solve)"
    from gradkit.obs import resolve
    torch.manual_seed(0)
    W, X = torch.randn(4, 12), torch.randn(48, 12)
    keep = torch.ones(4, 12, dtype=torch.bool)
    keep[0, :6] = False
    Wr = resolve(W, X.T @ X, keep)
    assert torch.equal(Wr[1:], W[1:]) and not Wr[0, :6].any()
    sol = torch.linalg.lstsq(X[:, 6:].double(), X.double() @ W[0].double()).solution
    torch.testing.assert_close(Wr[0, 6:].double(), sol, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- projection / index

def test_project_is_x_times_r_transposed_and_differentiable():
    # README: "entry (row, col) is a counter-based function of (seed, row, col) ... scaled by 1/sqrt(k)";
    # "`project` and `factored_project` are differentiable"
    from gradkit.projection import project, projection_matrix
    torch.manual_seed(0)
    x = torch.randn(5, 300, dtype=torch.float64)
    R = projection_matrix(32, 300, seed=1).double()
    z = project(x, k=32, seed=1)
    torch.testing.assert_close(z.double(), x @ R.T, rtol=1e-5, atol=1e-5)
    xr = x.float().requires_grad_()
    project(xr, k=32, seed=1).sum().backward()
    torch.testing.assert_close(xr.grad.double(), R.sum(0).expand(5, -1), rtol=1e-5, atol=1e-5)


def test_project_result_follows_chunk_only_within_float32_summation_error():
    # project()'s docstring (session 40): chunking changes the float32 summation order only
    from gradkit.projection import project, projection_matrix
    torch.manual_seed(0)
    x = torch.randn(5, 300)
    whole = project(x, k=32, seed=1)
    exact = x.double() @ projection_matrix(32, 300, seed=1).double().T
    for chunk in (1, 64, 299):
        part = project(x, k=32, seed=1, chunk=chunk)
        torch.testing.assert_close(part.double(), exact, rtol=0, atol=1e-5)
        torch.testing.assert_close(part, whole, rtol=2e-6, atol=2e-6)


def test_collector_adding_a_module_changes_nothing_for_others():
    # README: "per-module seeds derive from the user seed, the module name and the side (blake2b), so adding a module
    # changes nothing for the others"
    from gradkit.projection import GradientCollector
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6)

    def coll(mods):
        with GradientCollector(m, modules=mods, p=2, seed=0) as col:
            m.zero_grad()
            m(x).sum().backward()
            return col.collect()

    assert torch.equal(coll(["0"])["0"], coll(["0", "2"])["0"])


def test_index_float64_rows_rounded_once_and_module_order(tmp_path):
    # README: "float64 rows go into an fp16 / bf16 index rounded once (torch's cast rounds twice, via float32)";
    # "`create` refuses `modules` in another order"
    from gradkit.index import GradientIndex
    v = 1 + 2.0 ** -11 + 2.0 ** -40  # just above the fp16 midpoint; via float32 it becomes the midpoint itself
    assert torch.tensor(v, dtype=torch.float64).to(torch.float16).item() == 1.0  # torch: double rounding
    dims = {"a": 4, "b": 4}
    with GradientIndex.create(str(tmp_path / "f"), dims) as ix:
        ix.append(torch.full((1, 8), v, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s, _ = GradientIndex.open(str(tmp_path / "f")).search(torch.eye(8)[:1], k=1)
    assert s.item() == 1 + 2.0 ** -10
    from gradkit.projection import GradientCollector
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    col = GradientCollector(m, p=2)
    rev = dict(reversed(list(col.module_dims.items())))
    with pytest.raises(ValueError, match="order"):
        GradientIndex.create(str(tmp_path / "r"), rev, projection=col.projection_config)
    assert not os.path.exists(str(tmp_path / "r" / "index.json"))  # refused before a header is written


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_scatter_repeat_and_out_of_range_untouched(backend, monkeypatch):
    # README: "a repeated one is a ValueError naming `index` on every backend, before anything is written ...
    # positions need not be sorted"; "an out-of-range one is an IndexError, the destination untouched"
    from gradkit.ops import scatter_segments_
    monkeypatch.setenv("GRADKIT_BACKEND", backend)
    dst = torch.zeros(5)
    with pytest.raises(ValueError, match="index"):
        scatter_segments_(torch.tensor([1., 2., 3.]), [torch.tensor([0, 3, 3])], [dst])
    with pytest.raises(IndexError, match="index"):
        scatter_segments_(torch.tensor([1., 2.]), [torch.tensor([0, 5])], [dst])
    assert not dst.any()
    scatter_segments_(torch.tensor([1., 2.]), [torch.tensor([4, 1])], [dst], accumulate=True)
    assert dst.tolist() == [0., 2., 0., 0., 1.]

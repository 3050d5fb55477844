"""Session-40 audit of ParamMap (gather / scatter / prune / round trips / index dtypes) and gradkit.obs.metrics
(output_error, damped_hessian, dead_diagonal, resolve), each against a plain-PyTorch / float64 computation.

Tests named ``..._fixed`` failed before this session's fixes in python/gradkit/parammap.py and
python/gradkit/obs/metrics.py."""
import math

import numpy as np
import pytest
import torch

from gradkit import ops
from gradkit.obs.metrics import damped_hessian, dead_diagonal, output_error, resolve
from gradkit.parammap import ParamMap


def _mixed_map():
    """Entries of every kind, with strided, zero-element and empty selections."""
    g = torch.Generator().manual_seed(3)
    m_w = torch.rand(2, 3, 4, 5, generator=g) > 0.5
    m_d = torch.rand(18, generator=g) > 0.3
    spec = {
        "w": {"shape": (2, 3, 4, 5), "repr": "mask", "mask": m_w},
        "t": {"shape": (7, 6), "repr": "indices", "indices": torch.tensor([3, 0, 41, 7])},  # unsorted
        "z": {"shape": (0, 3), "repr": "mask", "mask": torch.zeros(0, 3, dtype=torch.bool)},
        "d": {"shape": (3, 3, 2), "repr": "bitmask", "bitmask": ops.pack_bitmask(m_d)},
        "e": {"shape": (0,), "repr": "bitmask", "bitmask": torch.zeros(0, dtype=torch.uint8)},
        "f": {"shape": (2, 2), "repr": "indices", "indices": torch.tensor([], dtype=torch.int64)},
        "b": {"shape": (5,), "repr": "all"},
    }
    pos = {"w": m_w.reshape(-1).nonzero().squeeze(1), "t": torch.tensor([3, 0, 41, 7]),
           "z": torch.zeros(0, dtype=torch.int64), "d": m_d.nonzero().squeeze(1),
           "e": torch.zeros(0, dtype=torch.int64), "f": torch.zeros(0, dtype=torch.int64), "b": torch.arange(5)}
    return ParamMap(spec), pos


def _strided_sources():
    g = torch.Generator().manual_seed(4)
    return {"w": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
            "t": torch.randn(6, 7, generator=g, dtype=torch.float64).t(),  # non-contiguous
            "z": torch.randn(0, 3, generator=g),
            "d": torch.randn(2, 3, 3, 2, generator=g)[1],  # storage offset
            "e": torch.randn(0, generator=g),
            "f": torch.randn(2, 2, generator=g),
            "b": torch.randn(10, generator=g).to(torch.float16)[::2]}


def _plain_gather(pm, pos, src, dtype=torch.float64):
    return torch.cat([src[n].reshape(-1)[pos[n]].to(dtype) for n in pm.names])


def test_gather_and_scatter_match_plain_indexing_for_strided_zero_element_and_empty_entries():
    pm, pos = _mixed_map()
    src = _strided_sources()
    g = pm.gather(src)
    assert g.dtype == torch.float64  # promoted over the sources (float32, float64, float16)
    assert torch.equal(g, _plain_gather(pm, pos, src))
    # functional scatter: zeros where unselected, values at the selected flat positions
    full = pm.scatter(g)
    start = 0
    for n in pm.names:
        ref = torch.zeros(src[n].numel(), dtype=g.dtype)
        ref[pos[n]] = g[start:start + pos[n].numel()]
        start += pos[n].numel()
        assert full[n].shape == src[n].shape and torch.equal(full[n].reshape(-1), ref), n
    # in place into strided destinations: only the selected elements change
    out = {n: torch.full_like(t, 9.0) for n, t in src.items()}
    out["t"] = torch.full((6, 7), 9.0, dtype=torch.float64).t()
    pm.scatter(g, out=out)
    start = 0
    for n in pm.names:
        ref = torch.full((src[n].numel(),), 9.0, dtype=torch.float64)
        ref[pos[n]] = g[start:start + pos[n].numel()]
        start += pos[n].numel()
        assert torch.equal(out[n].reshape(-1).double(), ref.to(out[n].dtype).double()), n


def test_gather_is_differentiable_to_the_selected_positions():
    pm, pos = _mixed_map()
    src = {n: t.detach().double().requires_grad_() for n, t in _strided_sources().items()}
    g = pm.gather(src)
    w = torch.randn(g.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (g * w).sum().backward()
    start = 0
    for n in pm.names:
        ref = torch.zeros(src[n].numel(), dtype=torch.float64)
        ref[pos[n]] = w[start:start + pos[n].numel()]
        start += pos[n].numel()
        got = src[n].grad
        assert torch.equal(torch.zeros_like(ref) if got is None else got.reshape(-1), ref), n


def test_channels_last_model_gather_and_scatter_against_plain_indexing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 2))
    model = model.to(memory_format=torch.channels_last)
    mask = torch.rand(4, 3, 3, 3) > 0.5
    idx = torch.tensor([90, 2, 57])
    pm = ParamMap.from_model(model, masks={"0.weight": mask.to(memory_format=torch.channels_last), "2.weight": idx},
                             bitmask=True)
    model(torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last)).sum().backward()
    p = dict(model.named_parameters())
    ref = torch.cat([p["0.weight"].grad[mask], p["0.bias"].grad, p["2.weight"].grad.reshape(-1)[idx], p["2.bias"].grad])
    assert torch.equal(pm.gather(model), ref)
    old = {n: t.detach().clone() for n, t in p.items()}
    flat = torch.arange(pm.input_dim, dtype=torch.float32)
    pm.scatter(flat, out=model, target="param")
    k = int(mask.sum())
    assert torch.equal(p["0.weight"].detach()[mask], flat[:k])
    assert torch.equal(p["0.weight"].detach()[~mask], old["0.weight"][~mask])
    assert p["0.weight"].is_contiguous(memory_format=torch.channels_last)
    w2 = old["2.weight"].reshape(-1).clone()
    w2[idx] = flat[k + 4:k + 7]
    assert torch.equal(p["2.weight"].detach().reshape(-1), w2)


def test_tied_parameters_are_one_entry_and_dict_aliases_apply_in_order():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.dec = torch.nn.Linear(3, 5, bias=False)
            self.dec.weight = self.emb.weight

    model = Tied()
    pm = ParamMap.from_model(model)
    assert pm.names == ["emb.weight"] and pm.input_dim == 15  # as named_parameters() (and GRADIEND) list it
    model.emb.weight.grad = torch.ones(5, 3)
    pm.scatter(torch.full((15,), 2.0), out=model, mode="add")
    assert torch.equal(model.dec.weight.grad, torch.full((5, 3), 3.0))  # added once, seen under both names
    # the same tensor under two names of a dict: applied one entry after another, as plain torch would
    t = torch.zeros(6)
    pm2 = ParamMap({"a": {"shape": (6,), "repr": "indices", "indices": torch.tensor([4, 1])},
                    "b": {"shape": (6,), "repr": "indices", "indices": torch.tensor([1, 5])}})
    f = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pm2.scatter(f, out={"a": t, "b": t}, mode="write")
    assert t.tolist() == [0, 3, 0, 0, 1, 4]
    pm2.scatter(f, out={"a": t, "b": t}, mode="add", scale=0.5)
    assert t.tolist() == [0, 3 + 1.0 + 1.5, 0, 0, 1.5, 6]
    assert torch.equal(pm2.gather({"a": t, "b": t}), torch.tensor([1.5, 5.5, 5.5, 6.0]))


def test_prune_save_load_and_decode_agree_with_plain_indexing(tmp_path):
    pm, pos = _mixed_map()
    src = _strided_sources()
    g = pm.gather(src)
    imp = torch.randn(pm.input_dim, generator=torch.Generator().manual_seed(6))
    cases = [dict(importance=imp, topk=5), dict(importance=imp, topk=0.5), dict(importance=imp, threshold=0.0),
             dict(mask=torch.rand(pm.input_dim, generator=torch.Generator().manual_seed(7)) > 0.5),
             dict(mask=imp > -0.5, importance=imp, threshold=-0.2, topk=4)]
    for kw in cases:
        new, kept = pm.prune(**kw)
        assert kept.dtype == torch.int64 and bool((kept[1:] > kept[:-1]).all())
        assert torch.equal(new.gather(src), g[kept])
        seg, flat = new.base_global_index(torch.arange(new.input_dim))
        vals = torch.stack([src[new.names[s]].reshape(-1)[f].double() for s, f in zip(seg.tolist(), flat.tolist())])
        assert torch.equal(vals, new.gather(src))
    # GRADIEND's full map indexes the concatenation of the flattened parameters
    cat = torch.cat([src[n].reshape(-1).double() for n in pm.names])
    assert torch.equal(cat[pm.base_global_index_map()], g)
    # round trips keep names, order (the unsorted index list included) and values
    again = ParamMap(pm.to_spec())
    assert again == pm and torch.equal(again.gather(src), g)
    pm.save(str(tmp_path))
    loaded = ParamMap.load(str(tmp_path))
    assert loaded.names == pm.names and loaded == pm and torch.equal(loaded.gather(src), g)
    assert loaded.to_spec()["t"]["indices"].tolist() == [3, 0, 41, 7]


@pytest.mark.parametrize("numel", [2**31 - 1, 2**31, 2**31 + 1])
def test_index_dtype_boundary_keeps_positions_and_order(tmp_path, numel):
    idx = torch.tensor([numel - 1, 0, numel - 2, 5], dtype=torch.int64)
    pm = ParamMap({"big": {"shape": (numel,), "repr": "indices", "indices": idx},
                   "s": {"shape": (3,), "repr": "all"}})
    spec = pm.to_spec()["big"]["indices"]
    assert spec.dtype == (torch.int32 if numel <= 2**31 - 1 else torch.int64)
    assert spec.tolist() == idx.tolist()
    assert pm.base_global_index([0, 2, 4]) == [("big", numel - 1), ("big", numel - 2), ("s", 0)]
    pm.save(str(tmp_path))
    loaded = ParamMap.load(str(tmp_path))
    assert loaded == pm and loaded.to_spec()["big"]["indices"].tolist() == idx.tolist()
    new, kept = pm.prune(importance=torch.tensor([1.0, 5, 3, 4, 0, 0, 9]), topk=3)
    assert kept.tolist() == [1, 3, 6]
    assert new.to_spec()["big"]["indices"].tolist() == [0, 5] and new.base_global_index(2) == ("s", 2)
    # a huge "all" entry before a small one: positions past 2^31 decode exactly
    huge = ParamMap({"a": {"shape": (numel,), "repr": "all"},
                     "s": {"shape": (4,), "repr": "indices", "indices": torch.tensor([3, 1])}})
    assert huge.base_global_index([numel - 1, numel, numel + 1]) == [("a", numel - 1), ("s", 3), ("s", 1)]


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_index_tensors_are_read_as_positions_fixed(dtype):
    # torch has no min / max for these dtypes: the range check raised a bare NotImplementedError
    pm = ParamMap({"a": {"shape": (300,), "repr": "indices", "indices": torch.tensor([250, 3, 7]).to(dtype)}})
    assert pm.to_spec()["a"]["indices"].tolist() == [250, 3, 7]
    assert torch.equal(pm.gather({"a": torch.arange(300.0)}), torch.tensor([250.0, 3.0, 7.0]))
    with pytest.raises(ValueError, match=r"spec\['a'\]\['indices'\]: positions must lie in \[0, 300\)"):
        ParamMap({"a": {"shape": (300,), "repr": "indices", "indices": torch.tensor([1, 300]).to(dtype)}})
    m = torch.nn.Linear(3, 2)
    assert ParamMap.from_model(m, masks={"weight": torch.tensor([5, 0]).to(dtype)}).base_global_index(0) == \
        ("weight", 5)


def test_uint64_index_past_2_63_is_refused_by_name_fixed():
    t = torch.tensor([1, 0], dtype=torch.uint64)
    t.view(torch.int64)[1] = -1  # 2**64 - 1
    with pytest.raises(ValueError, match=r"spec\['a'\]\['indices'\]: positions must lie in \[0, 10\)"):
        ParamMap({"a": {"shape": (10,), "repr": "indices", "indices": t}})


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_importance_threshold_is_exact_fixed(dtype):
    # torch has no >= for these dtypes: prune(threshold=...) raised a bare NotImplementedError
    vals = [5, 1, 9, 3, 9, 0, 65535]
    pm = ParamMap({"a": {"shape": (len(vals),), "repr": "all"}})
    imp = torch.tensor(vals).to(dtype)
    for thr in (-1, 0, 1, 2.5, 3, 9, 9.5, 65535, 65536, 2**70, -math.inf, math.inf):
        want = [i for i, v in enumerate(vals) if v >= thr]
        if not want:
            with pytest.raises(ValueError, match="remove every input dimension"):
                pm.prune(importance=imp, threshold=thr)
            continue
        assert pm.prune(importance=imp, threshold=thr)[1].tolist() == want, thr
    assert pm.prune(importance=imp, threshold=2.5, topk=2)[1].tolist() == [2, 6]


def test_uint64_importance_above_2_63_compares_as_unsigned_fixed():
    big = [2**64 - 1, 2**63, 2**63 - 1, 7, 0]
    imp = torch.tensor([0, 0, 2**63 - 1, 7, 0], dtype=torch.uint64)
    iv = imp.view(torch.int64)
    iv[0], iv[1] = -1, -(2**63)
    pm = ParamMap({"a": {"shape": (5,), "repr": "all"}})
    for thr in (8, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, 2**64):
        want = [i for i, v in enumerate(big) if v >= thr]
        if want:
            assert pm.prune(importance=imp, threshold=thr)[1].tolist() == want, thr
        else:
            with pytest.raises(ValueError, match="remove every input dimension"):
                pm.prune(importance=imp, threshold=thr)
    assert pm.prune(importance=imp, topk=2)[1].tolist() == [0, 1]


def test_prune_refuses_numpy_scalar_topk_by_name_like_gradiend():
    # GRADIEND refuses np.int64 topk with TypeError; tests/test_audit_s40_golden.py pins that parity, so gradkit does too
    pm = ParamMap({"a": {"shape": (6,), "repr": "all"}})
    imp = torch.tensor([5.0, 1, 9, 3, 9, 0])
    with pytest.raises(TypeError, match="topk: expected an int or a float"):
        pm.prune(importance=imp, topk=np.int64(2))
    with pytest.raises(ValueError, match="threshold: expected a number"):
        pm.prune(importance=imp, threshold=np.float32(3.0))
    assert pm.prune(importance=imp, topk=np.float64(0.5))[1].tolist() == [0, 2, 4]  # a float subclass: ceil(3.0)


def test_scatter_into_a_model_with_an_inference_grad_creates_no_grad_fixed():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    pm = ParamMap.from_model(model)
    with torch.inference_mode():
        g = torch.zeros(2)
    model[1].bias.grad = g
    with pytest.raises(RuntimeError, match=r"out\['1.bias'\].grad: is an inference tensor"):
        pm.scatter(torch.randn(pm.input_dim), out=model)
    # the missing .grads were created as zeros before the op refused: an optimizer would then step them
    assert [p.grad is None for p in model.parameters()] == [True, True, True, False]
    assert torch.equal(model[1].bias.grad, torch.zeros(2))


@pytest.mark.parametrize("dst_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("flat_dtype", [torch.float16, torch.float32, torch.float64])
def test_scatter_add_and_write_round_once_from_float64(dst_dtype, flat_dtype):
    g = torch.Generator().manual_seed(8)
    n = 1000
    pm = ParamMap({"a": {"shape": (n,), "repr": "all"}})
    d0 = (torch.randn(n, generator=g) * 3).to(dst_dtype)
    flat = (torch.randn(n, generator=g) * 1.7).to(flat_dtype)
    for scale in (1.0, 0.37):
        d = d0.clone()
        pm.scatter(flat, out={"a": d}, mode="add", scale=scale)
        assert torch.equal(d, (d0.double() + scale * flat.double()).to(dst_dtype))
        d = d0.clone()
        pm.scatter(flat, out={"a": d}, mode="write", scale=scale)
        assert torch.equal(d, (scale * flat.double()).to(dst_dtype))


def test_gather_accumulate_rounds_to_the_out_dtype_before_adding():
    # documented in ParamMap.gather: the values are rounded to out's dtype first (every backend)
    g = torch.Generator().manual_seed(9)
    n = 1000
    pm = ParamMap({"a": {"shape": (n,), "repr": "all"}})
    src = torch.randn(n, generator=g) * 1.3
    for dt in (torch.float16, torch.bfloat16):
        o0 = (torch.randn(n, generator=g) * 3).to(dt)
        o = o0.clone()
        pm.gather({"a": src}, out=o, accumulate=True)
        assert torch.equal(o, o0 + src.to(dt))
    o0 = torch.randn(n, generator=g)
    o = o0.clone()
    pm.gather({"a": src.double()}, out=o, accumulate=True)
    assert torch.equal(o, (o0.double() + src.double().float().double()).float())


# --------------------------------------------------------------------------- metrics


def _ref_error(W, Wp, X):
    Wd, Dd, Xd = W.double(), W.double() - Wp.double(), X.double()
    return float((Dd @ Xd.T).square().sum() / (Wd @ Xd.T).square().sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_error_matches_the_float64_formula(dtype):
    g = torch.Generator().manual_seed(10)
    W = torch.randn(7, 5, generator=g).to(dtype)
    Wp = torch.where(W.abs() < 0.7, torch.zeros((), dtype=dtype), W)
    X = torch.randn(11, 5, generator=g).to(dtype)
    ref = _ref_error(W, Wp, X)
    for chunk in (1, 7, 1 << 22):
        assert output_error(W, Wp, X=X, chunk_elems=chunk) == pytest.approx(ref, rel=1e-12)
    H = X.double().T @ X.double()
    D, Wd = (W.double() - Wp.double()), W.double()
    ref_h = float(torch.trace(D @ H @ D.T) / torch.trace(Wd @ H @ Wd.T))
    assert output_error(W, Wp, H=H) == pytest.approx(ref_h, rel=1e-12)
    assert ref_h == pytest.approx(ref, rel=1e-10)
    Hl = H.to(dtype)
    ref_hl = float(torch.trace(D @ Hl.double() @ D.T) / torch.trace(Wd @ Hl.double() @ Wd.T))
    assert output_error(W, Wp, H=Hl) == pytest.approx(ref_hl, rel=1e-12)


@pytest.mark.parametrize("scale", [1e160, 1e-170, 1e300, 1e-300])
def test_output_error_at_the_ends_of_the_float64_range_fixed(scale):
    # squares of such weights / inputs left the float64 range: NaN, or 0.0 (a "perfect" reconstruction) for 39 %
    g = torch.Generator().manual_seed(11)
    W = torch.randn(4, 3, generator=g, dtype=torch.float64)
    Wp = W.clone()
    Wp[:, 0] = 0
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ref = output_error(W, Wp, X=X)
    assert 0.05 < ref < 0.95
    assert output_error(W * scale, Wp * scale, X=X) == pytest.approx(ref, rel=1e-12)
    assert output_error(W, Wp, X=X * scale) == pytest.approx(ref, rel=1e-12)
    H = X.T @ X
    assert output_error(W * scale, Wp * scale, H=H) == pytest.approx(ref, rel=1e-12)
    Hs = H * min(scale, 1e300)
    Hs_before = Hs.clone()
    Ws = W * scale
    Ws_before = Ws.clone()
    assert output_error(Ws, Wp * scale, H=Hs) == pytest.approx(ref, rel=1e-12)
    assert torch.equal(Hs, Hs_before) and torch.equal(Ws, Ws_before)  # the rescaling never writes the inputs
    # a total loss stays 1, not 0.0 / NaN
    assert output_error(W * scale, torch.zeros_like(W), X=X) == pytest.approx(1.0, rel=1e-12)


def test_damped_hessian_and_dead_diagonal_follow_the_documented_rule():
    g = torch.Generator().manual_seed(12)
    X = torch.randn(20, 6, generator=g, dtype=torch.float64)
    X[:, 2] = 0
    H = X.T @ X
    diag = H.diagonal()
    live_mean = float(torch.cat([diag[:2], diag[3:]]).mean())
    dead = diag == 0
    assert dead_diagonal(diag, dead) == pytest.approx(live_mean, rel=1e-15)
    assert dead_diagonal(torch.zeros(3), torch.ones(3, dtype=torch.bool)) == 1.0
    for damp, lam in ((0.01, 0.01 * float(diag.mean())), (0.999, 0.999 * float(diag.mean())), (1.0, 1.0),
                      (2.5, 2.5), (0.0, 0.0)):
        for dtype in (torch.float64, torch.float32):
            hd, got = damped_hessian(H, damp, dtype=dtype)
            assert hd.dtype == dtype and got == pytest.approx(lam, rel=1e-6)
            ref = H.clone()
            ref[2, 2] = live_mean
            ref += lam * torch.eye(6, dtype=torch.float64)
            assert torch.allclose(hd.double(), ref, rtol=1e-6, atol=0), (damp, dtype)
    assert torch.equal(H.diagonal(), diag) and float(H[2, 2]) == 0.0  # untouched
    hd, lam = damped_hessian(torch.zeros(3, 3), 0.01)
    assert lam == 0.0 and torch.equal(hd, torch.eye(3, dtype=torch.float64))


def test_resolve_matches_float64_least_squares_on_each_support():
    g = torch.Generator().manual_seed(13)
    M, K = 6, 9
    W = torch.randn(M, K, generator=g, dtype=torch.float64)
    X = torch.randn(20, K, generator=g, dtype=torch.float64)
    X[:, 3] = 0  # a dead input
    H = X.T @ X
    mask = torch.rand(M, K, generator=g) > 0.5
    mask[0] = True
    mask[1] = False
    mask[2] = torch.arange(K) != 4  # prune side
    mask[3] = torch.arange(K) == 3  # keeps only the dead column
    for damp in (0.0, 0.01, 2.0):
        hd, _ = damped_hessian(H, damp)
        ref = torch.zeros_like(W)
        for r in range(M):
            S = mask[r].nonzero().squeeze(1)
            if 0 < S.numel() < K:
                ref[r, S] = torch.linalg.solve(hd[S][:, S], (hd @ W[r])[S])
            elif S.numel() == K:
                ref[r] = W[r]
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            got = resolve(W, H, mask, damp=damp, dtype=dtype)
            assert got.dtype == torch.float64 and torch.allclose(got, ref, rtol=0, atol=tol), (damp, dtype)
        assert float(resolve(W, H, mask, damp=damp)[3, 3]) == pytest.approx(float(W[3, 3]), rel=1e-6)

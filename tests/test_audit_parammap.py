"""Audit of gradkit.ParamMap / gradkit.compat.gradiend: silent wrong answers, half-updated state.

Each test failed before its fix (see the audit report) and pins the fixed behaviour."""
import os

import pytest
import torch

from gradkit import ParamMap, ops
from gradkit.kernels.reference import parammap as ref


def _reversed_map(n=8):
    return ParamMap({"a": {"shape": (n,), "repr": "indices", "indices": torch.arange(n - 1, -1, -1)}})


def test_gather_into_out_sharing_memory_with_a_source():
    # out IS the source: the kernel read entries it had already overwritten (native gave 7 6 5 4 4 5 6 7)
    pm = _reversed_map()
    g = torch.arange(8.0)
    assert torch.equal(pm.gather({"a": g}, out=g), torch.arange(7.0, -1, -1))
    g = torch.arange(8.0)
    pm.gather({"a": g}, out=g, accumulate=True)
    assert torch.equal(g, torch.full((8,), 7.0))


def test_scatter_flat_sharing_memory_with_a_destination():
    pm = _reversed_map()
    d = torch.arange(8.0)
    pm.scatter(d, out={"a": d})
    assert torch.equal(d, torch.arange(7.0, -1, -1))
    d = torch.arange(8.0)
    pm.scatter(d, out={"a": d}, mode="add", scale=2.0)
    assert torch.equal(d, torch.arange(8.0) + 2 * torch.arange(7.0, -1, -1))


def test_scatter_into_an_expanded_destination_is_refused():
    # the native kernel added three times into the same four floats (torch refuses such writes)
    pm = ParamMap({"x": {"shape": (3, 4), "repr": "all"}})
    base = torch.zeros(4)
    with pytest.raises(ValueError, match=r"^out\['x'\]: "):
        pm.scatter(torch.ones(12), out={"x": base.expand(3, 4)}, mode="add")
    assert torch.equal(base, torch.zeros(4))


def test_scatter_into_model_with_a_non_float_parameter_changes_nothing():
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.randn(3))
    m.q = torch.nn.Parameter(torch.zeros(3, dtype=torch.int32), requires_grad=False)
    pm = ParamMap.from_model(m)
    a0 = m.a.detach().clone()
    for target in ("grad", "param"):
        with pytest.raises(TypeError, match=r"^out\['q'\]: "):
            pm.scatter(torch.ones(6), out=m, target=target)
        assert m.a.grad is None  # was created as zeros before the error
        assert torch.equal(m.a.detach(), a0)


def test_gather_non_float_source_names_the_entry():
    pm = ParamMap({"w": {"shape": (3,), "repr": "all"}})
    with pytest.raises(TypeError, match=r"^source\['w'\]: "):
        pm.gather({"w": torch.arange(3)})


def test_prune_nan_importance_is_an_error_with_threshold_and_topk():
    pm = ParamMap({"a": {"shape": (10,), "repr": "all"}})
    imp = torch.tensor([1.0, 3, 3, 3, 2, 0, 5, 3, 3, 1])
    imp[5] = float("nan")
    # threshold dropped the NaN silently, then topk ran on the rest
    with pytest.raises(ValueError, match=r"^importance: contains NaN"):
        pm.prune(threshold=1.0, topk=2, importance=imp)
    # a NaN the mask removes is fine, whichever criteria follow
    keep = torch.arange(10) != 5
    assert pm.prune(mask=keep, threshold=1.0, importance=imp)[1].tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert pm.prune(mask=keep, topk=2, importance=imp)[1].tolist() == [1, 6]
    # importance is unused with a mask alone
    assert pm.prune(mask=keep, importance=imp)[1].tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_save_through_a_symlinked_directory_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "weights.bin").write_bytes(b"W")
    link = tmp_path / "link"
    os.symlink(real, link)
    pm = ParamMap({"a": {"shape": (100,), "repr": "indices", "indices": torch.tensor([5, 3, 9])}})
    pm.save(link)
    # the link was replaced by a plain directory, the linked-to one left without the map
    assert os.path.islink(link)
    assert (real / "config.json").is_file() and (real / "weights.bin").read_bytes() == b"W"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]  # no stray staging entry
    assert ParamMap.load(real) == pm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_functional_scatter_scale_rounds_like_the_reference(dtype):
    # the CPU kernel multiplied by the float64 scale (0.1) where the reference (flat * scale) uses
    # flat's opmath type: ~20% of float32 results were 1 ulp off the reference and the Triton kernel
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(4096, generator=g).to(dtype)
    idx = torch.randperm(5000, generator=g)[:2048].to(torch.int32)
    for scale in (0.1, -1.7, 1e-3):
        got = ops.scatter_segments(flat, [None, idx], [2048, 5000], scale=scale)
        want = ref.scatter_segments(flat, [None, idx], [2048, 5000], scale)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        full = ParamMap({"x": {"shape": (2048,), "repr": "all"},
                         "y": {"shape": (5000,), "repr": "indices", "indices": idx}}).scatter(flat, scale=scale)
        assert torch.equal(full["x"], want[0]) and torch.equal(full["y"], want[1])


def test_accelerated_model_follows_an_invalidated_param_map():
    # an in-place edit of model.param_map keeps its id: GRADIEND recompiles after
    # _invalidate_runtime_param_map_cache(), the accelerated model kept gathering the old selection
    import copy

    from gradiend.model.param_mapped import ParamMappedGradiendModel

    from gradkit.compat.gradiend import accelerate

    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4)
    base(torch.randn(2, 6)).pow(2).sum().backward()
    spec = {"weight": {"shape": (4, 6), "repr": "indices", "indices": torch.tensor([0, 5, 7, 11])},
            "bias": {"shape": (4,), "repr": "all"}}
    ref_model = ParamMappedGradiendModel(8, 2, spec, device=torch.device("cpu"))
    fast = accelerate(copy.deepcopy(ref_model))
    assert torch.equal(fast.extract_gradients(base), ref_model.extract_gradients(base))
    for m in (ref_model, fast):
        m.param_map["weight"]["indices"] = torch.tensor([23, 1, 2, 3])  # same count, other positions
        m._invalidate_runtime_param_map_cache()
    want = ref_model.extract_gradients(base)
    assert torch.equal(want[:4], base.weight.grad.reshape(-1)[[23, 1, 2, 3]])
    assert torch.equal(fast.extract_gradients(base), want)
    grads = {"weight": base.weight.grad, "bias": base.bias.grad}
    assert torch.equal(fast.forward_encoder(grads), ref_model.forward_encoder(grads))


def test_sparse_gradients_are_refused_before_anything_is_written():
    # the dispatcher raised NotImplementedError (SparseCPU) from inside the kernel call: after
    # scatter(out=model) had already created zero .grad tensors for the other parameters
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.randn(3))
    m.emb = torch.nn.Embedding(5, 3, sparse=True)
    m.emb(torch.tensor([1, 3])).sum().backward()
    pm = ParamMap.from_model(m)
    with pytest.raises(TypeError, match=r"^out\['emb.weight'\]\.grad: "):
        pm.scatter(torch.ones(pm.input_dim), out=m, mode="add")
    assert m.a.grad is None
    m.a.grad = torch.zeros(3)
    with pytest.raises(TypeError, match=r"^source\['emb.weight'\]\.grad: "):
        pm.gather(m)
    with pytest.raises(TypeError, match=r"^out\['emb.weight'\]: "):
        pm.scatter(torch.ones(pm.input_dim), out={"a": torch.zeros(3), "emb.weight": torch.zeros(5, 3).to_sparse()})


def test_scatter_add_into_destinations_sharing_memory_applies_every_entry():
    # tied weights passed twice in a dict: each entry's additions must all land (the kernel's
    # parallel work items could read-modify-write the same elements at once)
    n = 1 << 16
    pm = ParamMap({"x": {"shape": (n,), "repr": "all"}, "y": {"shape": (256, n // 256), "repr": "all"}})
    w = torch.zeros(n)
    pm.scatter(torch.ones(2 * n), out={"x": w, "y": w.view(256, -1).t().t()}, mode="add", scale=0.5)
    assert torch.equal(w, torch.ones(n))
    w2 = torch.zeros(16)
    pm2 = ParamMap({"x": {"shape": (4, 4), "repr": "all"}, "y": {"shape": (4, 4), "repr": "all"}})
    pm2.scatter(torch.arange(32.0), out={"x": w2.view(4, 4), "y": w2.view(4, 4).t()}, mode="add")
    assert torch.equal(w2.view(4, 4), torch.arange(16.0).view(4, 4) + torch.arange(16.0, 32.0).view(4, 4).t())

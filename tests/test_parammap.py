"""gradkit.ParamMap against a plain-PyTorch model of GRADIEND's param-map semantics."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from gradkit import ParamMap, ops

from conftest import DEVICES, use_backend

REPRS = ["all", "mask", "bitmask", "indices"]


def _positions(spec_entry, numel):
    """Plain-torch oracle: selected flat positions of one GRADIEND spec entry, in input order."""
    r = spec_entry["repr"]
    if r == "all":
        return torch.arange(numel)
    if r == "mask":
        return spec_entry["mask"].reshape(-1).nonzero().reshape(-1)
    if r == "bitmask":
        bits = spec_entry["bitmask"]
        unpacked = ((bits.reshape(-1, 1).long() >> torch.arange(8)) & 1).reshape(-1)[:numel]
        return unpacked.nonzero().reshape(-1)
    return spec_entry["indices"].long()


def _oracle_gather(spec, tensors):
    parts = [tensors[n].reshape(-1)[_positions(e, math.prod(e["shape"]))] for n, e in spec.items()]
    return torch.cat(parts) if parts else torch.empty(0)


@st.composite
def specs(draw, max_entries=5):
    n = draw(st.integers(1, max_entries))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spec = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
        numel = math.prod(shape)
        r = draw(st.sampled_from(REPRS))
        if r == "all":
            spec[f"p{i}.w"] = {"shape": shape, "repr": "all"}
        elif r in ("mask", "bitmask"):
            m = torch.rand(shape, generator=g) < draw(st.floats(0, 1))
            spec[f"p{i}.w"] = ({"shape": shape, "repr": "mask", "mask": m} if r == "mask" else
                               {"shape": shape, "repr": "bitmask", "bitmask": ops.pack_bitmask(m)})
        else:
            k = draw(st.integers(0, numel))
            idx = torch.randperm(numel, generator=g)[:k]
            if draw(st.booleans()):
                idx = idx.sort().values
            spec[f"p{i}.w"] = {"shape": shape, "repr": "indices",
                               "indices": idx.to(draw(st.sampled_from([torch.int32, torch.int64])))}
    return spec


def _tensors(spec, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(e["shape"], generator=g).to(dtype).to(device) for n, e in spec.items()}


BACKENDS = ["native", "triton", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@given(spec=specs(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_gather_scatter_roundtrip_matches_oracle(backend, device, spec, dtype):
    with use_backend(backend):
        _roundtrip(device, spec, dtype)


def _roundtrip(device, spec, dtype):
    pm = ParamMap(spec)
    src = _tensors(spec, dtype, device=device)
    flat = pm.gather(src)
    want = _oracle_gather(spec, {k: v.cpu() for k, v in src.items()})
    assert flat.dtype == dtype and flat.shape == (pm.input_dim,)
    assert torch.equal(flat.cpu(), want)
    # scatter back: selected entries restored, zeros elsewhere
    full = pm.scatter(flat)
    for n, e in spec.items():
        expect = torch.zeros(e["shape"], dtype=dtype)
        expect.view(-1)[_positions(e, math.prod(e["shape"]))] = src[n].cpu().reshape(-1)[
            _positions(e, math.prod(e["shape"]))]
        assert torch.equal(full[n].cpu(), expect)
    # the hash does not depend on the representation
    assert ParamMap(pm.to_spec(bitmask_as_mask=True)).hash == pm.hash


@pytest.mark.parametrize("backend", BACKENDS)
@given(spec=specs())
def test_gather_out_accumulate_and_scatter_add_allocate_nothing(backend, spec):
    with use_backend(backend):
        _out_and_add(spec)


def _out_and_add(spec):
    pm = ParamMap(spec)
    src = _tensors(spec)
    out = torch.zeros(pm.input_dim)
    ptr = out.data_ptr()
    pm.gather(src, out=out)
    pm.gather(src, out=out, accumulate=True)
    assert out.data_ptr() == ptr
    assert torch.equal(out, 2 * _oracle_gather(spec, src))
    dst = {n: t.clone() for n, t in src.items()}
    ptrs = {n: t.data_ptr() for n, t in dst.items()}
    pm.scatter(out, out=dst, mode="add", scale=-0.5)  # subtract back the gathered entries once
    for n, e in spec.items():
        pos = _positions(e, math.prod(e["shape"]))
        expect = src[n].clone().reshape(-1)
        expect[pos] = expect[pos] - src[n].reshape(-1)[pos]
        torch.testing.assert_close(dst[n].reshape(-1), expect, atol=1e-6, rtol=0)
        assert dst[n].data_ptr() == ptrs[n]


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    m(torch.randn(4, 6)).pow(2).sum().backward()
    return m


def test_from_model_globs_masks_and_model_grads():
    m = _model()
    mask = torch.rand(5, 6) < 0.5
    pm = ParamMap.from_model(m, ["*.weight", "2.bias"], masks={"0.weight": mask})
    assert pm.names == ["0.weight", "2.weight", "2.bias"]
    assert pm.repr_of("0.weight") == "mask" and pm.repr_of("2.weight") == "all"
    flat = pm.gather(m)
    want = torch.cat([m[0].weight.grad[mask], m[2].weight.grad.reshape(-1), m[2].bias.grad])
    assert torch.equal(flat, want)
    bm = ParamMap.from_model(m, ["*.weight", "2.bias"], masks={"0.weight": mask}, bitmask=True)
    assert bm.repr_of("0.weight") == "bitmask" and bm.hash == pm.hash and torch.equal(bm.gather(m), flat)
    # scatter into the model: write, add, and into parameters
    before = {n: p.grad.clone() for n, p in m.named_parameters()}
    pm.scatter(torch.ones(pm.input_dim), out=m, mode="write")
    assert torch.equal(m[0].weight.grad[mask], torch.ones(int(mask.sum())))
    assert torch.equal(m[0].weight.grad[~mask], before["0.weight"][~mask])
    assert torch.equal(m[0].bias.grad, before["0.bias"])  # not in the map: untouched
    pm.scatter(torch.ones(pm.input_dim), out=m, mode="add", scale=2.0)
    assert torch.equal(m[2].bias.grad, torch.full((3,), 3.0))
    w = m[2].weight.detach().clone()
    pm.scatter(torch.ones(pm.input_dim), out=m, mode="add", target="param", scale=0.5)
    assert torch.equal(m[2].weight.detach(), w + 0.5)


def test_from_model_errors():
    m = _model()
    with pytest.raises(ValueError, match="names"):
        ParamMap.from_model(m, ["nope.*"])
    with pytest.raises(ValueError, match="masks"):
        ParamMap.from_model(m, masks={"zzz": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks\['0.weight'\]"):
        ParamMap.from_model(m, masks={"0.weight": torch.ones(6, 5, dtype=torch.bool)})


def test_spec_validation_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"spec\['a'\]\['mask'\]"):
        ParamMap({"a": {"shape": (2, 3), "repr": "mask", "mask": torch.ones(3, 2, dtype=torch.bool)}})
    with pytest.raises(TypeError, match=r"spec\['a'\]\['mask'\]"):
        ParamMap({"a": {"shape": (2, 3), "repr": "mask", "mask": torch.ones(2, 3)}})
    with pytest.raises(ValueError, match=r"spec\['a'\]\['indices'\].*\[0, 6\)"):
        ParamMap({"a": {"shape": (2, 3), "repr": "indices", "indices": torch.tensor([0, 6])}})
    with pytest.raises(ValueError, match=r"spec\['a'\]\['indices'\].*position 2 is selected more than once"):
        ParamMap({"a": {"shape": (2, 3), "repr": "indices", "indices": torch.tensor([2, 0, 2])}})
    with pytest.raises(ValueError, match=r"spec\['a'\]\['indices'\]"):
        ParamMap({"a": {"shape": (2, 3), "repr": "indices", "indices": torch.tensor([-1])}})
    with pytest.raises(ValueError, match=r"spec\['a'\]\['repr'\]"):
        ParamMap({"a": {"shape": (2, 3), "repr": "dense"}})
    with pytest.raises(ValueError, match=r"spec\['a'\]\['bitmask'\]"):
        ParamMap({"a": {"shape": (2, 3), "repr": "bitmask", "bitmask": torch.tensor([0b1000000], dtype=torch.uint8)}})
    with pytest.raises(ValueError, match=r"spec\['a'\]\['shape'\]"):
        ParamMap({"a": {"shape": (2, -3), "repr": "all"}})


def test_gather_bad_sources_name_the_problem():
    m = _model()
    pm = ParamMap.from_model(m)
    m[2].bias.grad = None
    with pytest.raises(ValueError, match=r"\.grad is None.*2\.bias"):
        pm.gather(m)
    src = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=r"source\['0.weight'\].*shape"):
        pm.gather({**src, "0.weight": torch.zeros(6, 5)})
    with pytest.raises(ValueError, match="missing.*2.bias"):
        pm.gather({k: v for k, v in src.items() if k != "2.bias"})
    with pytest.raises(ValueError, match="out"):
        pm.gather(src, out=torch.zeros(pm.input_dim + 1))
    with pytest.raises(TypeError, match="out"):
        pm.gather(src, out=torch.zeros(pm.input_dim), dtype=torch.float64)
    other = ParamMap({"0.weight": {"shape": (5, 6), "repr": "all"}, "ghost": {"shape": (2,), "repr": "all"}})
    with pytest.raises(ValueError, match="ghost"):
        other.gather(m)


def test_scatter_validates_everything_before_writing():
    m = _model()
    pm = ParamMap.from_model(m)
    before = {n: p.grad.clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="flat"):
        pm.scatter(torch.ones(pm.input_dim - 1), out=m)
    dst = {n: p.grad.clone() for n, p in m.named_parameters()}
    dst["2.bias"] = torch.zeros(4)  # wrong shape on the LAST entry: nothing may be written
    snapshot = {n: t.clone() for n, t in dst.items()}
    with pytest.raises(ValueError, match=r"out\['2.bias'\]"):
        pm.scatter(torch.ones(pm.input_dim), out=dst, mode="add")
    for n in dst:
        assert torch.equal(dst[n], snapshot[n])
    with pytest.raises(ValueError, match="mode"):
        pm.scatter(torch.ones(pm.input_dim), out=m, mode="overwrite")
    for n, p in m.named_parameters():
        assert torch.equal(p.grad, before[n])


# --------------------------------------------------------------------------- prune


def _oracle_prune(n, mask, threshold, topk, imp):
    keep = torch.ones(n, dtype=torch.bool)
    if mask is not None:
        keep &= mask
    if threshold is not None:
        keep &= imp >= threshold
    if topk is not None and not (isinstance(topk, float) and topk == 1.0):
        act = keep.nonzero().reshape(-1)
        k = math.ceil(topk * act.numel()) if isinstance(topk, float) else min(topk, act.numel())
        order = torch.sort(imp[act].double(), descending=True, stable=True).indices[:k]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[act[order]] = True
    return keep.nonzero().reshape(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@given(spec=specs(), topk=st.one_of(st.none(), st.floats(0.01, 1.0), st.integers(1, 50)),
       use_mask=st.booleans(), use_threshold=st.booleans(), seed=st.integers(0, 1000))
def test_prune_matches_oracle(backend, spec, topk, use_mask, use_threshold, seed):
    with use_backend(backend):
        _prune_case(spec, topk, use_mask, use_threshold, seed)


def _prune_case(spec, topk, use_mask, use_threshold, seed):
    pm = ParamMap(spec)
    n = pm.input_dim
    g = torch.Generator().manual_seed(seed)
    imp = torch.randint(0, 5, (n,), generator=g).float()  # many ties at the cut
    mask = (torch.rand(n, generator=g) < 0.7) if use_mask else None
    threshold = 2.0 if use_threshold else None
    if mask is None and threshold is None and topk is None:
        topk = 0.5
    want = _oracle_prune(n, mask, threshold, topk, imp)
    if want.numel() == 0:
        with pytest.raises(ValueError, match="prune"):
            pm.prune(mask=mask, threshold=threshold, topk=topk, importance=imp)
        return
    new, kept = pm.prune(mask=mask, threshold=threshold, topk=topk, importance=imp)
    assert torch.equal(kept, want)
    assert new.input_dim == kept.numel()
    src = _tensors(spec)
    assert torch.equal(new.gather(src), pm.gather(src)[kept])  # the new map selects exactly the kept entries
    assert new.names == pm.names


def test_prune_topk_edge_cases():
    pm = ParamMap({"a": {"shape": (10,), "repr": "all"}})
    imp = torch.arange(10.0)
    new, kept = pm.prune(topk=1.0, importance=imp)
    assert new.input_dim == 10 and new.hash == pm.hash
    _, kept = pm.prune(topk=3, importance=imp)
    assert kept.tolist() == [7, 8, 9]
    _, kept = pm.prune(topk=0.25, importance=imp)  # ceil(2.5) = 3
    assert kept.tolist() == [7, 8, 9]
    _, kept = pm.prune(topk=100, importance=imp)
    assert kept.numel() == 10
    _, kept = pm.prune(topk=2, importance=torch.zeros(10))  # all tied: lowest positions
    assert kept.tolist() == [0, 1]
    with pytest.raises(TypeError, match="topk"):
        pm.prune(topk=True, importance=imp)
    with pytest.raises(ValueError, match="topk"):
        pm.prune(topk=1.5, importance=imp)
    with pytest.raises(ValueError, match="importance"):
        pm.prune(topk=3)
    with pytest.raises(ValueError, match="importance"):
        pm.prune(topk=3, importance=torch.ones(9))
    with pytest.raises(ValueError, match="mask"):
        pm.prune(mask=torch.ones(10))
    with pytest.raises(ValueError, match="no input dimension"):
        pm.prune(threshold=100.0, topk=2, importance=imp)


def test_prune_integer_importance():
    """Integer importances (GRADIEND takes them): the threshold compares exactly, topk ranks exactly past 2**53
    (float64 would tie 2**60 + 1 with 2**60), ties lowest position first; bool / complex stay refused."""
    pm = ParamMap({"a": {"shape": (2, 3), "repr": "all"}})
    big = torch.tensor([3, 1, 2, 0, 1, 5], dtype=torch.int64) + (1 << 60)
    _, kept = pm.prune(topk=2, importance=big)
    assert kept.tolist() == [0, 5]
    _, kept = pm.prune(threshold=(1 << 60) + 2, importance=big)
    assert kept.tolist() == [0, 2, 5]
    _, kept = pm.prune(threshold=(1 << 60) + 1, topk=2, importance=big, mask=torch.tensor([1, 1, 1, 1, 1, 0]).bool())
    assert kept.tolist() == [0, 2]
    _, kept = pm.prune(topk=3, importance=torch.tensor([1, 2, 2, 0, 2, 1], dtype=torch.int8))
    assert kept.tolist() == [1, 2, 4]
    for bad in (torch.ones(6, dtype=torch.bool), torch.ones(6, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="^importance: expected a floating or integer dtype"):
            pm.prune(topk=2, importance=bad)
    with pytest.raises(ValueError, match="criteria remove every input dimension"):
        pm.prune(threshold=(1 << 60) + 6, importance=big)
    # a float threshold is exact too (torch's >= would compare in float32: 16777219 >= 16777219.5 there)
    mid = torch.tensor([16777219, 16777220, 5, 16777221, -3, 0], dtype=torch.int64)
    _, kept = pm.prune(threshold=16777219.5, importance=mid)
    assert kept.tolist() == [1, 3]
    _, kept = pm.prune(threshold=-2.5, importance=mid)
    assert kept.tolist() == [0, 1, 2, 3, 5]
    _, kept = pm.prune(threshold=float("-inf"), topk=2, importance=mid)
    assert kept.tolist() == [1, 3]
    small = torch.tensor([1, -128, 127, 0, 3, 2], dtype=torch.int8)
    _, kept = pm.prune(threshold=-1000, importance=small)  # outside int8: everything passes
    assert kept.numel() == 6
    with pytest.raises(ValueError, match="criteria remove every input dimension"):
        pm.prune(threshold=1e30, importance=small)
    with pytest.raises(ValueError, match="criteria remove every input dimension"):
        pm.prune(threshold=float("inf"), importance=small)


def test_prune_keeps_unsorted_index_order():
    pm = ParamMap({"a": {"shape": (4, 4), "repr": "indices", "indices": torch.tensor([9, 2, 15, 0, 7])}})
    new, kept = pm.prune(topk=3, importance=torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0]))
    assert kept.tolist() == [0, 2, 4]
    assert new.to_spec()["a"]["indices"].tolist() == [9, 15, 7]


# --------------------------------------------------------------------------- decode / hash


@given(spec=specs(), seed=st.integers(0, 1000))
def test_base_global_index_matches_full_map(spec, seed):
    pm = ParamMap(spec)
    full = pm.base_global_index_map()
    assert full.numel() == pm.input_dim
    if pm.input_dim == 0:
        return
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, pm.input_dim, (20,), generator=g)
    seg, flat = pm.base_global_index(pos)
    starts = torch.tensor([0] + [math.prod(e["shape"]) for e in spec.values()]).cumsum(0)
    assert torch.equal(starts[seg] + flat, full[pos])
    name, f = pm.base_global_index(int(pos[0]))
    assert name == pm.names[int(seg[0])] and f == int(flat[0])
    with pytest.raises(ValueError, match="positions"):
        pm.base_global_index(pm.input_dim)


def test_hash_depends_only_on_names_shapes_positions():
    m = torch.zeros(3, 4, dtype=torch.bool)
    m[0, 1] = m[2, 3] = True
    a = ParamMap({"w": {"shape": (3, 4), "repr": "mask", "mask": m}})
    b = ParamMap({"w": {"shape": (3, 4), "repr": "indices", "indices": torch.tensor([1, 11])}})
    c = ParamMap({"w": {"shape": (3, 4), "repr": "bitmask", "bitmask": ops.pack_bitmask(m)}})
    assert a.hash == b.hash == c.hash
    assert ParamMap({"w": {"shape": (3, 4), "repr": "indices", "indices": torch.tensor([11, 1])}}).hash != a.hash
    assert ParamMap({"v": {"shape": (3, 4), "repr": "mask", "mask": m}}).hash != a.hash
    assert ParamMap({"w": {"shape": (4, 3), "repr": "mask", "mask": m.reshape(4, 3)}}).hash != a.hash
    full = ParamMap({"w": {"shape": (3, 4), "repr": "all"}})
    assert ParamMap({"w": {"shape": (3, 4), "repr": "indices", "indices": torch.arange(12)}}).hash == full.hash
    assert ParamMap({"w": {"shape": (3, 4), "repr": "mask", "mask": torch.ones(3, 4, dtype=torch.bool)}}).hash == full.hash


# --------------------------------------------------------------------------- save / load


@given(spec=specs())
def test_save_load_roundtrip_preserves_order_and_hash(tmp_path_factory, spec):
    d = tmp_path_factory.mktemp("map")
    pm = ParamMap(spec)
    pm.save(d)
    back = ParamMap.load(d)
    assert back.hash == pm.hash and back.names == pm.names
    src = _tensors(spec)
    assert torch.equal(back.gather(src), pm.gather(src))
    cfg = json.loads((d / "config.json").read_text())
    for ent, e in zip(cfg["mapping"]["param_map"], spec.values()):
        idx = e.get("indices")
        if idx is not None and idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            assert ent["repr"] == "indices"  # an unsorted index list is never rewritten as a mask


def test_save_keeps_other_files_and_config_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": {"input_dim": 3}, "mapping": {}}))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    pm = ParamMap({"a": {"shape": (3,), "repr": "all"}})
    pm.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == {"input_dim": 3} and cfg["mapping"]["mode"] == "all"
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def _two_maps():
    a = ParamMap({"w": {"shape": (8, 8), "repr": "indices", "indices": torch.tensor([5, 3, 60])},
                  "m": {"shape": (4,), "repr": "mask", "mask": torch.tensor([True, False, True, True])}})
    b = ParamMap({"w": {"shape": (8, 8), "repr": "indices", "indices": torch.tensor([1, 2])},
                  "m": {"shape": (4,), "repr": "mask", "mask": torch.tensor([False, False, True, False])}})
    return a, b


def _snapshot(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


@pytest.mark.parametrize("stage", ["wrote:mapping_indices.safetensors", "wrote:config.json", "before-swap"])
def test_failed_save_leaves_previous_files_intact(tmp_path, stage):
    a, b = _two_maps()
    d = tmp_path / "map"
    a.save(d)
    before = _snapshot(d)

    def hook(s):
        if s == stage:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        b.save(d, _hook=hook)
    assert _snapshot(d) == before
    assert os.listdir(tmp_path) == ["map"]  # no staging directory left behind
    assert ParamMap.load(d).hash == a.hash


def test_killed_save_leaves_previous_files_intact(tmp_path):
    a, b = _two_maps()
    d = tmp_path / "map"
    a.save(d)
    before = _snapshot(d)
    code = f"""
import os, torch
from gradkit import ParamMap
b = ParamMap({{"w": {{"shape": (8, 8), "repr": "indices", "indices": torch.tensor([1, 2])}},
              "m": {{"shape": (4,), "repr": "mask", "mask": torch.tensor([False, False, True, False])}}}})
b.save({str(d)!r}, _hook=lambda s: os._exit(9) if s == "wrote:config.json" else None)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert _snapshot(d) == before
    assert ParamMap.load(d).hash == a.hash
    b.save(d)  # a later save still works next to the stale hidden staging dir
    assert ParamMap.load(d).hash == b.hash


def test_load_rejects_truncated_and_edited_files(tmp_path):
    a, _ = _two_maps()
    a.save(tmp_path)
    idx = tmp_path / "mapping_indices.safetensors"
    good = idx.read_bytes()
    idx.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="mapping_indices.safetensors"):
        ParamMap.load(tmp_path)
    # an edit that keeps the file valid is caught by the recorded checksum
    from safetensors.torch import load, save
    t = load(good)
    t["L0"] = torch.tensor([5, 3, 61], dtype=torch.int32)
    idx.write_bytes(save(t))
    with pytest.raises(ValueError, match="checksum"):
        ParamMap.load(tmp_path)
    # a valid edit of config.json itself (renaming an entry) changes the map: caught by the recorded hash
    idx.write_bytes(good)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mapping"]["param_map"][0]["name"] = "renamed"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hash differs"):
        ParamMap.load(tmp_path)
    cfg["mapping"]["param_map"][0]["name"] = "w"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ParamMap.load(tmp_path).hash == a.hash
    # GRADIEND-written files carry no checksum: semantic validation still applies
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["mapping"]["gradkit"]
    t["L0"] = torch.tensor([5, 3, 64], dtype=torch.int32)  # out of range for 8x8
    idx.write_bytes(save(t))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"param_map\[0\].*\[0, 64\)"):
        ParamMap.load(tmp_path)
    t["L0"] = torch.tensor([5, 3, 60], dtype=torch.int32)
    idx.write_bytes(save(t))
    cfg["mapping"]["param_map"][0]["num_selected"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_selected"):
        ParamMap.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        ParamMap.load(tmp_path)


def test_load_refuses_pickle_files(tmp_path):
    cfg = {"mapping": {"mode": "indices", "indices_file": "mapping_indices.pth",
                       "param_map": [{"name": "w", "shape": [4], "repr": "indices", "key": "L0"}]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "mapping_indices.pth").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        ParamMap.load(tmp_path)


def test_out_on_wrong_device_and_dtype_requests():
    m = _model()
    pm = ParamMap.from_model(m)
    with pytest.raises(ValueError, match="out: on meta"):
        pm.gather(m, out=torch.empty(pm.input_dim, device="meta"))
    with pytest.raises(ValueError, match=r"out\['0.weight'\]: on meta"):
        pm.scatter(torch.ones(pm.input_dim), out={n: torch.empty(p.shape, device="meta") for n, p in m.named_parameters()})
    flat64 = pm.gather(m, dtype=torch.float64)
    assert flat64.dtype == torch.float64 and torch.equal(flat64, pm.gather(m).double())
    with pytest.raises(ValueError, match="accumulate"):
        pm.gather(m, accumulate=True)


def test_safetensors_writer_is_read_back_by_safetensors(tmp_path):
    import zlib

    from safetensors.torch import load_file

    from gradkit._io import write_safetensors

    tensors = {"L0": torch.tensor([5, 3, 9], dtype=torch.int32), "L1": torch.arange(7, dtype=torch.int64),
               "L2": torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8), "L3": torch.empty(0, dtype=torch.int32),
               "L4": torch.tensor([True, False, True]), "L5": torch.randn(3, 2)[:, 0]}  # non-contiguous
    crc = write_safetensors(str(tmp_path / "t.safetensors"), tensors)
    assert crc == zlib.crc32((tmp_path / "t.safetensors").read_bytes())
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_int64_positions_past_2_31_roundtrip(tmp_path):
    """Entries of more than 2^31-1 elements use int64 positions: in memory, in the file (I64),
    in the hash; no tensor of that size is ever built for an index-list entry."""
    from safetensors import safe_open

    big = 2**31 + 10
    idx = torch.tensor([big - 1, 5, 2**31 + 3])
    pm = ParamMap({"huge": {"shape": (big,), "repr": "indices", "indices": idx},
                   "small": {"shape": (4,), "repr": "all"}})
    assert pm.to_spec()["huge"]["indices"].dtype == torch.int64
    assert pm.base_global_index(0) == ("huge", big - 1)
    pm.save(tmp_path)
    with safe_open(str(tmp_path / "mapping_indices.safetensors"), "pt") as f:
        stored = f.get_tensor("L0")
    assert stored.dtype == torch.int64 and stored.tolist() == idx.tolist()
    back = ParamMap.load(tmp_path)
    assert back.hash == pm.hash and back.to_spec()["huge"]["indices"].tolist() == idx.tolist()
    with pytest.raises(TypeError, match="dtype"):
        ops.mask_to_indices(torch.zeros(0, dtype=torch.bool), torch.float32)
